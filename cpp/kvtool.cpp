// kvtool C API implementation (see kvtool.h).
#include "kvtool.h"

#include "llama-kv-cache-mixed.h"

#include "llama.h"

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
