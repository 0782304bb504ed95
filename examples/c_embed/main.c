// Load a GGUF with the patched libllama, decode a prompt, print the KV cache bytes.
//
// There is no kvtool code in the model path: llama_model_load_from_file reads the kvtool.* budgets from the
// GGUF and the context allocates the mixed cache by itself. kvtool.h is used only to report the bytes.
//
//   c_embed MODEL.gguf [PROMPT] [N_CTX]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvtool.h"
#include "llama.h"

static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    static enum ggml_log_level last = GGML_LOG_LEVEL_NONE;
    (void) user_data;
    if (level != GGML_LOG_LEVEL_CONT) {  // CONT continues the previous message (e.g. the loading dots)
        last = level;
    }
    if (last == GGML_LOG_LEVEL_WARN || last == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [PROMPT] [N_CTX]\n", argv[0]);
        return 2;
    }
    const char * path   = argv[1];
    const char * prompt = argc > 2 ? argv[2] : "The capital of France is";
    const int    n_ctx  = argc > 3 ? atoi(argv[3]) : 2048;

    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    struct llama_model * model = llama_model_load_from_file(path, llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "error: cannot load %s\n", path);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) n_ctx;
    // flash_attn_type stays at its default (AUTO: on where the backend has it). With flash attention off, llama.cpp
    // pads V rows of every layer to the widest one, and per-layer head budgets lose their V savings.
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == NULL) {
        fprintf(stderr, "error: cannot create a context\n");
        llama_model_free(model);
        return 1;
    }

    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_prompt = -llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), NULL, 0, true, true);
    llama_token * tokens = malloc(sizeof(llama_token) * (size_t) n_prompt);
    if (tokens == NULL || llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), tokens, n_prompt, true, true) < 0) {
        fprintf(stderr, "error: cannot tokenize the prompt\n");
        return 1;
    }
    if (llama_decode(ctx, llama_batch_get_one(tokens, n_prompt)) != 0) {
        fprintf(stderr, "error: llama_decode failed\n");
        return 1;
    }

    // a few greedy tokens, to show the context works as usual
    struct llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    printf("%s", prompt);
    for (int i = 0; i < 8; ++i) {
        llama_token tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, tok)) {
            break;
        }
        char piece[256];
        const int n = llama_token_to_piece(vocab, tok, piece, sizeof(piece), 0, true);
        if (n > 0) {
            fwrite(piece, 1, (size_t) n, stdout);
        }
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) {
            break;
        }
    }
    printf("\n");

    size_t full_bytes = 0, ring_bytes = 0;
    const int mixed = kvtool_kv_bytes(ctx, &full_bytes, &ring_bytes);
    uint32_t full_cells = 0, ring_cells = 0;
    kvtool_kv_used_cells(ctx, &full_cells, &ring_cells);
    printf("kvtool runtime %d, patch %s, backend %s\n", kvtool_runtime_version(), kvtool_patch_hash(), kvtool_backend());
    printf("mixed=%d full_bytes=%zu ring_bytes=%zu total_bytes=%zu\n", mixed, full_bytes, ring_bytes,
           full_bytes + ring_bytes);
    printf("live_cells full=%u ring=%u\n", full_cells, ring_cells);
    for (int g = 0; g < kvtool_kv_n_groups(ctx); ++g) {
        uint32_t window = 0, cells = 0;
        kvtool_kv_group_info(ctx, g, &window, &cells);
        printf("group %d window=%u cells=%u\n", g, window, cells);
    }

    llama_sampler_free(smpl);
    free(tokens);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
