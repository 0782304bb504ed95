// kvtool C API implementation (see kvtool.h).
#include "kvtool.h"

#include "kvtool-config.h"
#include "llama-kv-cache-mixed.h"
#include "llama-model.h"

#include "llama.h"

#include "ggml-backend.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

#ifndef KVTOOL_PATCH_HASH
#    define KVTOOL_PATCH_HASH "unknown"
#endif
#ifndef KVTOOL_BACKEND
#    define KVTOOL_BACKEND "cpu"
#endif

extern "C" int kvtool_runtime_version(void) {
    return KVTOOL_RUNTIME_VERSION;
}

extern "C" const char * kvtool_patch_hash(void) {
    return KVTOOL_PATCH_HASH;
}

extern "C" const char * kvtool_backend(void) {
    return KVTOOL_BACKEND;
}

extern "C" int kvtool_model_budgets(const llama_model * model, int32_t * head_window, int n, uint32_t * n_sink) {
    const kvtool_kv_config * cfg = model ? model->kvtool_cfg.get() : nullptr;
    if (!cfg || !cfg->present) {
        return -1;
    }
    for (int i = 0; head_window && i < n && (size_t) i < cfg->head_window.size(); ++i) {
        head_window[i] = cfg->head_window[i];
    }
    if (n_sink) { *n_sink = cfg->n_sink; }
    return (int) cfg->head_window.size();
}

static llama_memory_i * memory_of(const llama_context * ctx) {
    return ctx ? llama_get_memory(ctx) : nullptr;
}

static size_t breakdown_bytes(const llama_memory_i * mem) {
    size_t total = 0;
    for (const auto & [buft, size] : mem->memory_breakdown()) {
        total += size;
    }
    return total;
}

extern "C" int kvtool_kv_bytes(const llama_context * ctx, size_t * full_bytes, size_t * ring_bytes) {
    size_t full = 0;
    size_t ring = 0;
    int    res  = -1;
    if (auto * mem = memory_of(ctx)) {
        if (auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(mem)) {
            for (size_t g = 0; g < mixed->n_groups(); ++g) {
                (mixed->group_window(g) == 0 ? full : ring) += mixed->group_bytes(g);
            }
            res = 1;
        } else {
            full = breakdown_bytes(mem);
            res  = 0;
        }
    }
    if (full_bytes) { *full_bytes = full; }
    if (ring_bytes) { *ring_bytes = ring; }
    return res;
}

extern "C" int kvtool_kv_used_cells(const llama_context * ctx, uint32_t * full_cells, uint32_t * ring_cells) {
    uint32_t full = 0;
    uint32_t ring = 0;
    int      res  = -1;
    if (auto * mem = memory_of(ctx)) {
        if (auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(mem)) {
            for (size_t g = 0; g < mixed->n_groups(); ++g) {
                (mixed->group_window(g) == 0 ? full : ring) += mixed->group_used_cells(g);
            }
            res = 1;
        } else if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
            for (uint32_t s = 0; s < kv->get_n_stream(); ++s) {
                full += kv->get_cells(kv->get_n_stream() > 1 ? (llama_seq_id) s : 0).get_used();
            }
            res = 0;
        } else {
            res = 0;
        }
    }
    if (full_cells) { *full_cells = full; }
    if (ring_cells) { *ring_cells = ring; }
    return res;
}

extern "C" int kvtool_can_seq_rm(const llama_context * ctx, int32_t seq_id, int32_t p0, int32_t p1) {
    auto * mem = memory_of(ctx);
    if (!mem) {
        return -1;
    }
    auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(mem);
    return !mixed || mixed->can_seq_rm(seq_id, p0, p1) ? 1 : 0;
}

extern "C" int kvtool_kv_n_groups(const llama_context * ctx) {
    auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(memory_of(ctx));
    return mixed ? (int) mixed->n_groups() : 0;
}

extern "C" int kvtool_kv_group_info(const llama_context * ctx, int g, uint32_t * window, uint32_t * n_cells) {
    auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(memory_of(ctx));
    if (!mixed || g < 0 || (size_t) g >= mixed->n_groups()) {
        return -1;
    }
    if (window)  { *window  = mixed->group_window(g); }
    if (n_cells) { *n_cells = mixed->group_cache(g)->get_size(); }
    return 0;
}

// (group, buffer type) -> bytes of the context's KV memory, in a stable order (full before rings, then buft name)
namespace {
struct kv_buffer {
    int                        group;
    ggml_backend_buffer_type_t buft;
    size_t                     bytes;
};
}  // namespace

static std::vector<kv_buffer> kv_buffers(const llama_context * ctx) {
    std::map<std::pair<int, std::string>, kv_buffer> acc;
    auto add = [&](int group, const std::map<ggml_backend_buffer_type_t, size_t> & breakdown) {
        for (const auto & [buft, size] : breakdown) {
            auto & e = acc[{group, ggml_backend_buft_name(buft)}];
            e.group  = group;
            e.buft   = buft;
            e.bytes += size;
        }
    };
    if (auto * mem = memory_of(ctx)) {
        if (auto * mixed = dynamic_cast<llama_kv_cache_mixed *>(mem)) {
            for (size_t g = 0; g < mixed->n_groups(); ++g) {
                add(mixed->group_window(g) == 0 ? 0 : 1, mixed->group_cache(g)->memory_breakdown());
            }
        } else {
            add(0, mem->memory_breakdown());
        }
    }
    std::vector<kv_buffer> out;
    for (const auto & [key, e] : acc) {
        out.push_back(e);
    }
    return out;
}

extern "C" int kvtool_kv_n_buffers(const llama_context * ctx) {
    return (int) kv_buffers(ctx).size();
}

extern "C" int kvtool_kv_buffer_info(const llama_context * ctx, int i, int * group, const char ** buft_name,
                                     size_t * bytes) {
    const auto bufs = kv_buffers(ctx);
    if (i < 0 || (size_t) i >= bufs.size()) {
        return -1;
    }
    if (group)     { *group     = bufs[i].group; }
    if (buft_name) { *buft_name = ggml_backend_buft_name(bufs[i].buft); }
    if (bytes)     { *bytes     = bufs[i].bytes; }
    return 0;
}

static void load_backends() {
    // as llama_supports_gpu_offload does: a build with dynamically loaded backends registers them on demand
    if (!ggml_backend_reg_count()) {
        ggml_backend_load_all();
    }
}

extern "C" int kvtool_n_devices(void) {
    load_backends();
    return (int) ggml_backend_dev_count();
}

static const char * dev_type_name(enum ggml_backend_dev_type t) {
    switch (t) {
        case GGML_BACKEND_DEVICE_TYPE_CPU:   return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU:   return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU:  return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        case GGML_BACKEND_DEVICE_TYPE_META:  return "meta";
    }
    return "unknown";
}

extern "C" int kvtool_device_info(int i, const char ** name, const char ** description, const char ** type,
                                  size_t * free_bytes, size_t * total_bytes) {
    load_backends();
    if (i < 0 || (size_t) i >= ggml_backend_dev_count()) {
        return -1;
    }
    ggml_backend_dev_t dev = ggml_backend_dev_get((size_t) i);
    size_t free = 0;
    size_t total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    if (name)        { *name        = ggml_backend_dev_name(dev); }
    if (description) { *description = ggml_backend_dev_description(dev); }
    if (type)        { *type        = dev_type_name(ggml_backend_dev_type(dev)); }
    if (free_bytes)  { *free_bytes  = free; }
    if (total_bytes) { *total_bytes = total; }
    return 0;
}
