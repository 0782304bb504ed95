// Graph side of the mixed KV cache: one attention input per head group, and the per-layer gather/scatter.
//
// Why here and not in the 88 model builders: they all call build_attn_inp_kv() and build_attn(). The patch makes
// the first return this subclass when the memory is mixed and the second branch to kvtool_build_attn_mixed(),
// so every architecture on the generic attention path gets per-head budgets with no model file edits.
#pragma once

#include "llama-graph.h"

#include <vector>

class llama_kv_cache_mixed_context;
struct llama_model;

// Graph objects (nodes, views and inputs) the mixed attention adds on top of the stock budget, sized from the
// model's actual head groups: llama_context::graph_max_nodes adds this, so a file with many windows per layer
// cannot run out of the graph's memory pool (0 when the file has no budgets or they are disabled).
uint32_t kvtool_graph_extra_nodes(const llama_model & model);

class llm_graph_input_attn_kv_mixed : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_kv_mixed(const llama_hparams & hparams, const llama_cparams & cparams,
                                  const llama_kv_cache_mixed_context * mctx);
    ~llm_graph_input_attn_kv_mixed() = default;

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    // I32 [rows.size(), n_tokens]: the head list repeated for every token, the index ggml_get_rows wants to pick
    // heads per token; layers with the same list share one tensor. n_tokens = 0: [rows.size(), 1], for tensors
    // that are per head only (learned sinks)
    ggml_tensor * head_index(ggml_context * ctx, const std::vector<int32_t> & rows, int64_t n_tokens);

    std::vector<std::unique_ptr<llm_graph_input_attn_kv>> groups; // one per cache group

    const llama_kv_cache_mixed_context * mctx_mixed;

private:
    struct index_input {
        std::vector<int32_t> rows;
        ggml_tensor * t;
        bool per_head; // not per token: survives a change of ubatch size
    };
    std::vector<index_input> indices;
};

ggml_tensor * kvtool_build_attn_mixed(
        const llm_graph_context & gc,
        llm_graph_input_attn_kv_mixed * inp,
        ggml_tensor * wo,
        ggml_tensor * wo_b,
        ggml_tensor * wo_s,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
              float kq_scale,
                int il);

// the iSWA wrapper of the input above (gemma2/3, gpt-oss): llama-graph.cpp sees it through this header
#include "kvtool-graph-iswa.h"
