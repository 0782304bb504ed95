// Reading kvtool.* GGUF keys with strict validation (bad budgets fail the load, they never crash or run wrong).
#include "kvtool-config.h"
#include "kvtool-rederive.h"

#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include "gguf.h"

#include <stdexcept>

static const char * KEY_VERSION = "kvtool.version";
static const char * KEY_ENABLED = "kvtool.kv.enabled";
static const char * KEY_SINK    = "kvtool.kv.sink";
static const char * KEY_WINDOW  = "kvtool.kv.head_window";

static bool kv_integer(const gguf_context * ctx, int kid, int64_t & out) {
    switch (gguf_get_kv_type(ctx, kid)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8 (ctx, kid); return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8 (ctx, kid); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(ctx, kid); return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(ctx, kid); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ctx, kid); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ctx, kid); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) gguf_get_val_u64(ctx, kid); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ctx, kid); return true;
        default: return false;
    }
}

static const llama_model_kv_override * find_override(const llama_model_loader & ml, const char * key) {
    auto it = ml.kv_overrides.find(key);
    return it == ml.kv_overrides.end() ? nullptr : &it->second;
}

void kvtool_load_config(llama_model_loader & ml, llama_model & model) {
    const gguf_context * ctx = ml.metadata;
    const llama_hparams & hp = model.hparams;

    auto cfg = std::make_shared<kvtool_kv_config>();

    uint32_t n_heads_total = 0;
    cfg->layer_offset.resize(hp.n_layer_all);
    for (uint32_t il = 0; il < hp.n_layer_all; ++il) {
        cfg->layer_offset[il] = n_heads_total;
        n_heads_total += hp.n_head_kv(il);
    }

    const int kid_ver = gguf_find_key(ctx, KEY_VERSION);
    if (kid_ver >= 0) {
        int64_t v = 0;
        if (!kv_integer(ctx, kid_ver, v)) {
            throw std::runtime_error(format("%s: expected an unsigned integer, got %s", KEY_VERSION,
                    gguf_type_name(gguf_get_kv_type(ctx, kid_ver))));
        }
        if (v != 1) {
            throw std::runtime_error(format("%s: unsupported schema version %lld (this runtime reads 1)", KEY_VERSION, (long long) v));
        }
    }

    const int kid_win = gguf_find_key(ctx, KEY_WINDOW);
    if (kid_win >= 0) {
        const std::string expect = format("an i32 array of length %u (n_layer %u x n_head_kv %u)",
                n_heads_total, hp.n_layer_all, hp.n_layer_all ? hp.n_head_kv(0) : 0);
        if (gguf_get_kv_type(ctx, kid_win) != GGUF_TYPE_ARRAY) {
            throw std::runtime_error(format("%s: expected %s, got a scalar %s", KEY_WINDOW, expect.c_str(),
                    gguf_type_name(gguf_get_kv_type(ctx, kid_win))));
        }
        const gguf_type at = gguf_get_arr_type(ctx, kid_win);
        if (at != GGUF_TYPE_INT32 && at != GGUF_TYPE_UINT32) {
            throw std::runtime_error(format("%s: expected %s, got an array of %s", KEY_WINDOW, expect.c_str(), gguf_type_name(at)));
        }
        const size_t n = gguf_get_arr_n(ctx, kid_win);
        if (n != n_heads_total) {
            throw std::runtime_error(format("%s: expected %s, got length %zu", KEY_WINDOW, expect.c_str(), n));
        }
        const auto * data = (const int32_t *) gguf_get_arr_data(ctx, kid_win);
        cfg->head_window.assign(data, data + n);
        for (size_t i = 0; i < n; ++i) {
            const int64_t w = at == GGUF_TYPE_UINT32 ? (int64_t) (uint32_t) data[i] : (int64_t) data[i];
            if (w < 0 || w > INT32_MAX) {
                uint32_t il = 0;
                while (il + 1 < hp.n_layer_all && cfg->layer_offset[il + 1] <= i) {
                    ++il;
                }
                throw std::runtime_error(format("%s: window of layer %u head %u is %lld; windows must be >= 0 (0 = full head)",
                        KEY_WINDOW, il, (uint32_t) (i - cfg->layer_offset[il]), (long long) w));
            }
        }
        cfg->present = true;
    }

    // load-time kvtool.kv.sparsity / kvtool.kv.window: the budgets are rebuilt from kvtool.heads.scores
    uint32_t n_head_uniform = hp.n_layer_all ? hp.n_head_kv(0) : 0;
    for (uint32_t il = 1; il < hp.n_layer_all; ++il) {
        if (hp.n_head_kv(il) != n_head_uniform) {
            n_head_uniform = 0;
        }
    }
    kvtool_apply_budget_overrides(ml, *cfg, hp.n_layer_all, n_head_uniform);

    // enabled: defaults to true when budgets are present; kv_overrides can switch it either way
    bool enabled = cfg->present;
    const int kid_en = gguf_find_key(ctx, KEY_ENABLED);
    if (kid_en >= 0) {
        if (gguf_get_kv_type(ctx, kid_en) != GGUF_TYPE_BOOL) {
            throw std::runtime_error(format("%s: expected bool, got %s", KEY_ENABLED, gguf_type_name(gguf_get_kv_type(ctx, kid_en))));
        }
        enabled = gguf_get_val_bool(ctx, kid_en);
    }
    if (const auto * ov = find_override(ml, KEY_ENABLED)) {
        if (ov->tag != LLAMA_KV_OVERRIDE_TYPE_BOOL) {
            throw std::runtime_error(format("%s: override must be a bool", KEY_ENABLED));
        }
        enabled = ov->val_bool;
    }

    int64_t sink = 0;
    const int kid_sink = gguf_find_key(ctx, KEY_SINK);
    if (kid_sink >= 0 && !kv_integer(ctx, kid_sink, sink)) {
        throw std::runtime_error(format("%s: expected u32, got %s", KEY_SINK, gguf_type_name(gguf_get_kv_type(ctx, kid_sink))));
    }
    if (const auto * ov = find_override(ml, KEY_SINK)) {
        if (ov->tag != LLAMA_KV_OVERRIDE_TYPE_INT) {
            throw std::runtime_error(format("%s: override must be an int", KEY_SINK));
        }
        sink = ov->val_i64;
    }
    if (sink < 0 || sink > INT32_MAX) {
        throw std::runtime_error(format("%s: expected a non-negative u32, got %lld", KEY_SINK, (long long) sink));
    }
    cfg->n_sink = (uint32_t) sink;

    if (enabled && !cfg->present) {
        throw std::runtime_error(format("%s: missing (required when %s is true)", KEY_WINDOW, KEY_ENABLED));
    }
    cfg->enabled = enabled;

    if (cfg->present) {
        uint32_t n_comp = 0;
        for (int32_t w : cfg->head_window) {
            n_comp += w > 0;
        }
        LLAMA_LOG_INFO("%s: kvtool budgets: %u of %u KV heads compressed, sink = %u, mixed KV %s\n", __func__,
                n_comp, n_heads_total, cfg->n_sink, enabled ? "enabled" : "disabled");
    }

    model.kvtool_cfg = cfg;
}
