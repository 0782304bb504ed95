// Load a GGUF with the patched libllama, decode a prompt, print the KV cache bytes.
//
// There is no kvtool code in the model path: llama_model_load_from_file reads the kvtool.* budgets from the
// GGUF and the context allocates the mixed cache by itself. kvtool.h is used only to report the bytes.
// --override-kv takes llama.cpp's own form (KEY=int:N, float:X or bool:true|false), so one file loads at any
// sparsity: --override-kv kvtool.kv.sparsity=float:0.75 (the runtime rebuilds the mask from the stored scores).
//
//   c_embed MODEL.gguf [PROMPT] [N_CTX] [--override-kv KEY=TYPE:VALUE ...]
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

#define MAX_OVERRIDES 8

// KEY=int:N | float:X | bool:true|false into *ov; 0 on success
static int parse_override(const char * arg, struct llama_model_kv_override * ov) {
    const char * eq = strchr(arg, '=');
    if (eq == NULL || eq == arg || (size_t) (eq - arg) >= sizeof(ov->key)) {
        return -1;
    }
    memset(ov, 0, sizeof(*ov));
    memcpy(ov->key, arg, (size_t) (eq - arg));
    const char * v = eq + 1;
    if (strncmp(v, "int:", 4) == 0) {
        ov->tag = LLAMA_KV_OVERRIDE_TYPE_INT;
        ov->val_i64 = strtoll(v + 4, NULL, 10);
    } else if (strncmp(v, "float:", 6) == 0) {
        ov->tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT;
        ov->val_f64 = strtod(v + 6, NULL);
    } else if (strcmp(v, "bool:true") == 0 || strcmp(v, "bool:false") == 0) {
        ov->tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
        ov->val_bool = strcmp(v, "bool:true") == 0;
    } else {
        return -1;
    }
    return 0;
}

int main(int argc, char ** argv) {
    const char * pos[3] = { NULL, "The capital of France is", "2048" };
    int n_pos = 0;
    struct llama_model_kv_override overrides[MAX_OVERRIDES + 1];
    int n_ov = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--override-kv") == 0) {
            if (i + 1 >= argc || n_ov >= MAX_OVERRIDES || parse_override(argv[i + 1], &overrides[n_ov]) != 0) {
                fprintf(stderr, "error: --override-kv takes KEY=int:N, KEY=float:X or KEY=bool:true|false\n");
                return 2;
            }
            ++n_ov;
            ++i;
        } else if (n_pos < 3) {
            pos[n_pos++] = argv[i];
        }
    }
    if (n_pos < 1) {
        fprintf(stderr, "usage: %s MODEL.gguf [PROMPT] [N_CTX] [--override-kv KEY=TYPE:VALUE ...]\n", argv[0]);
        return 2;
    }
    memset(&overrides[n_ov], 0, sizeof(overrides[n_ov]));  // the list ends at an empty key
    const char * path   = pos[0];
    const char * prompt = pos[1];
    const int    n_ctx  = atoi(pos[2]);

    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    struct llama_model_params mparams = llama_model_default_params();
    mparams.kv_overrides = n_ov ? overrides : NULL;
    struct llama_model * model = llama_model_load_from_file(path, mparams);
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
    int32_t windows[4096];
    uint32_t n_sink = 0;
    const int n_heads = kvtool_model_budgets(model, windows, 4096, &n_sink);
    if (n_heads > 0 && n_heads <= 4096) {
        printf("budgets sink=%u windows=", n_sink);
        for (int i = 0; i < n_heads; ++i) {
            printf(i ? ",%d" : "%d", windows[i]);
        }
        printf("\n");
    }
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
