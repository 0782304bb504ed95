// kvtool graph code (see kvtool-graph.h). Only ggml ops: it builds for CPU, CUDA, Metal and Vulkan alike.
#include "kvtool-graph.h"

#include "kvtool-config.h"
#include "llama-kv-cache-mixed.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>

// Per head group attended in a layer: 3 gathers + reshape, the K/V stores (views, set_rows, V transposes),
// the cache views, build_attn_mha (views, permutes, casts, flash attention or mul_mat/soft_max/mul_mat/cont),
// the output reshape and concat, and the group's head index input: about 30 objects, budgeted with headroom.
static const uint32_t KVTOOL_NODES_PER_GROUP_LAYER = 48;
// Per split layer: q cont + reshape, the inverse index, its gather and the final reshape.
static const uint32_t KVTOOL_NODES_PER_SPLIT_LAYER = 8;
// Per group, once per graph: its attention inputs (k/v indices, mask and its cast, rotations).
static const uint32_t KVTOOL_NODES_PER_GROUP = 16;

uint32_t kvtool_graph_extra_nodes(const llama_model & model) {
    const auto & cfg = model.kvtool_cfg;
    if (!cfg || !cfg->present || !cfg->enabled) {
        return 0;
    }
    const llama_hparams & hp = model.hparams;
    std::vector<int32_t> all;
    uint64_t extra = 0;
    for (uint32_t il = 0; il < hp.n_layer_all && il < cfg->layer_offset.size(); ++il) {
        const uint32_t off = cfg->layer_offset[il];
        const uint32_t n   = hp.n_head_kv(il);
        if (n == 0 || off + n > cfg->head_window.size()) {
            continue;
        }
        std::vector<int32_t> w(cfg->head_window.begin() + off, cfg->head_window.begin() + off + n);
        std::sort(w.begin(), w.end());
        w.erase(std::unique(w.begin(), w.end()), w.end());
        all.insert(all.end(), w.begin(), w.end());
        // the stock budget already covers one attention per layer
        extra += (uint64_t) w.size() * KVTOOL_NODES_PER_GROUP_LAYER + (w.size() > 1 ? KVTOOL_NODES_PER_SPLIT_LAYER : 0);
    }
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    extra += (uint64_t) all.size() * KVTOOL_NODES_PER_GROUP;
    return (uint32_t) std::min<uint64_t>(extra, UINT32_MAX / 2);
}

llm_graph_input_attn_kv_mixed::llm_graph_input_attn_kv_mixed(
        const llama_hparams & hparams,
        const llama_cparams & cparams,
        const llama_kv_cache_mixed_context * mctx) :
    llm_graph_input_attn_kv(hparams, cparams, mctx->get_group(0)),
    mctx_mixed(mctx) {
}

ggml_tensor * llm_graph_input_attn_kv_mixed::head_index(ggml_context * ctx, const std::vector<int32_t> & rows, int64_t n_tokens) {
    for (const auto & ix : indices) {
        if (ix.rows == rows && ix.per_head == (n_tokens == 0) && (ix.per_head || ix.t->ne[1] == n_tokens)) {
            return ix.t;
        }
    }
    // n_tokens == 0: one row of indices for per-head (not per-token) tensors such as learned sinks
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (int64_t) rows.size(), std::max<int64_t>(n_tokens, 1));
    ggml_set_input(t);
    ggml_format_name(t, "kvtool_heads_%zu", indices.size());
    indices.push_back({rows, t, n_tokens == 0});
    return t;
}

void llm_graph_input_attn_kv_mixed::set_input(const llama_ubatch * ubatch) {
    for (auto & g : groups) {
        g->set_input(ubatch);
    }
    std::vector<int32_t> buf;
    for (const auto & ix : indices) {
        if (!ix.t->buffer) {
            continue;
        }
        const int64_t n_rows = ix.t->ne[0];
        const int64_t n_tok  = ix.t->ne[1];
        buf.resize(n_rows*n_tok);
        for (int64_t t = 0; t < n_tok; ++t) {
            std::memcpy(buf.data() + t*n_rows, ix.rows.data(), n_rows*sizeof(int32_t));
        }
        ggml_backend_tensor_set(ix.t, buf.data(), 0, ggml_nbytes(ix.t));
    }
}

bool llm_graph_input_attn_kv_mixed::can_reuse(const llm_graph_params & params) {
    const auto * mx = kvtool_as_mixed(params.mctx);
    if (mx == nullptr || mx->get_mem() != mctx_mixed->get_mem()) {
        return false;
    }
    mctx_mixed = mx;
    this->mctx = mx->get_group(0);

    bool res = true;
    for (size_t g = 0; g < groups.size(); ++g) {
        llm_graph_params p = params;
        p.mctx = mx->get_group(g);
        res = groups[g]->can_reuse(p) && res;
    }
    for (const auto & ix : indices) {
        res = res && (ix.per_head || ix.t->ne[1] == (int64_t) params.ubatch.n_tokens);
    }
    return res;
}

// store one group's heads in its cache and attend over it: [d_v*n_q_heads_of_group, n_tokens]
static ggml_tensor * attend_group(
        const llm_graph_context & gc, llm_graph_input_attn_kv_mixed * inp, size_t g,
        ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * sinks, float kq_scale, int il) {
    ggml_context * ctx0 = gc.ctx0;
    const auto * gi   = inp->groups[g].get();
    const auto * gctx = gi->mctx;

    ggml_build_forward_expand(gc.gf, gctx->cpy_k(ctx0, k, gi->get_k_idxs(), il));
    ggml_build_forward_expand(gc.gf, gctx->cpy_v(ctx0, v, gi->get_v_idxs(), il));

    ggml_tensor * kk = gctx->get_k(ctx0, il);
    ggml_tensor * vv = gctx->get_v(ctx0, il);

    return gc.build_attn_mha(q, kk, vv, nullptr, gi->get_kq_mask(), sinks, nullptr, 0, kq_scale, il);
}

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
                int il) {
    GGML_ASSERT(v_mla == nullptr);
    if (kq_b != nullptr) {
        GGML_ABORT("kvtool: mixed KV does not support an attention bias (layer %d)", il);
    }
    GGML_ASSERT(!gc.cparams.training && "kvtool: mixed KV is an inference cache");

    ggml_context * ctx0 = gc.ctx0;
    const auto * mem  = inp->mctx_mixed->get_mem();
    const auto * inp0 = inp->groups[0].get();

    // the Hadamard rotation of quantized K/V acts per head, so it commutes with the head gather
    if (inp0->self_k_rot) {
        q_cur = llama_mul_mat_hadamard(ctx0, q_cur, inp0->self_k_rot);
        k_cur = llama_mul_mat_hadamard(ctx0, k_cur, inp0->self_k_rot);
    }
    if (inp0->self_v_rot) {
        v_cur = llama_mul_mat_hadamard(ctx0, v_cur, inp0->self_v_rot);
    }

    ggml_build_forward_expand(gc.gf, q_cur);
    ggml_build_forward_expand(gc.gf, v_cur);
    ggml_build_forward_expand(gc.gf, k_cur);

    const int64_t d_q       = q_cur->ne[0];
    const int64_t n_head    = q_cur->ne[1];
    const int64_t n_tokens  = q_cur->ne[2];
    const int64_t n_head_kv = k_cur->ne[1];
    const int64_t d_v       = v_cur->ne[0];
    const int64_t n_gqa     = n_head / n_head_kv;

    ggml_tensor * cur;

    const int32_t single = mem->single_group(il);
    if (single >= 0) {
        cur = attend_group(gc, inp, (size_t) single, q_cur, k_cur, v_cur, sinks, kq_scale, il);
    } else {
        // gather each group's heads (a KV head takes its whole query group with it), attend, then restore order
        if (!ggml_is_contiguous(q_cur)) {
            q_cur = ggml_cont(ctx0, q_cur);
        }
        ggml_tensor * q_by_kv = ggml_reshape_3d(ctx0, q_cur, d_q*n_gqa, n_head_kv, n_tokens);

        ggml_tensor * cat = nullptr;
        for (size_t g = 0; g < mem->n_groups(); ++g) {
            const auto & rows = mem->heads(g, il);
            if (rows.empty()) {
                continue;
            }
            const int64_t n_sel = (int64_t) rows.size();
            ggml_tensor * idx = inp->head_index(ctx0, rows, n_tokens);

            ggml_tensor * q = ggml_get_rows(ctx0, q_by_kv, idx);
            q = ggml_reshape_3d(ctx0, q, d_q, n_gqa*n_sel, n_tokens);
            ggml_tensor * k = ggml_get_rows(ctx0, k_cur, idx);
            ggml_tensor * v = ggml_get_rows(ctx0, v_cur, idx);

            // learned sink logits (gpt-oss) are per query head: they move with their KV head's query group
            ggml_tensor * s = nullptr;
            if (sinks) {
                ggml_tensor * s_by_kv = ggml_reshape_2d(ctx0, sinks, n_gqa, n_head_kv);
                s = ggml_get_rows(ctx0, s_by_kv, inp->head_index(ctx0, rows, 0));
                s = ggml_reshape_1d(ctx0, s, n_gqa*n_sel);
            }

            ggml_tensor * o = attend_group(gc, inp, g, q, k, v, s, kq_scale, il);
            o = ggml_reshape_3d(ctx0, o, d_v*n_gqa, n_sel, n_tokens);

            cat = cat ? ggml_concat(ctx0, cat, o, 1) : o;
        }

        ggml_tensor * inv = inp->head_index(ctx0, mem->layer_inverse(il), n_tokens);
        cur = ggml_get_rows(ctx0, cat, inv);
        cur = ggml_reshape_2d(ctx0, cur, d_v*n_head, n_tokens);
    }
    gc.cb(cur, "kqv_out", il);

    if (inp0->self_v_rot) {
        cur = llama_mul_mat_hadamard(ctx0, cur, inp0->self_v_rot);
    }

    if (wo) {
        if (gc.arch == LLM_ARCH_GLM4 || gc.arch == LLM_ARCH_GLM4_MOE || gc.arch == LLM_ARCH_JAIS2) {
            // as in llama-graph.cpp: these need F32 accumulation
            cur = gc.build_lora_mm(wo, cur);
            ggml_prec_set_acc(cur, GGML_PREC_F32);
            if (wo_s) {
                cur = ggml_mul(ctx0, cur, wo_s);
            }
        } else {
            cur = gc.build_lora_mm(wo, cur, wo_s);
        }
    }

    if (wo_b) {
        cur = ggml_add(ctx0, cur, wo_b);
    }

    return cur;
}
