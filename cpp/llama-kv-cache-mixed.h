// llama_kv_cache_mixed: a per-head mixed KV cache (docs/architecture.md §4).
//
// Heads are split into groups by window: group "full" (window 0) keeps every position; each window W keeps
// the S sink positions plus the last W positions in a ring. Every group is an ordinary llama_kv_cache built from
// a copy of the model hparams whose per-layer n_head_kv is the group's head count in that layer, so a group
// only allocates what its heads need. Layers where a group has no heads are filtered out of that group's cache.
// All groups see every ubatch and every sequence op, exactly like llama_kv_cache_iswa does with its two caches.
//
// On a sliding-window model (gemma2/3, gpt-oss) the SWA layers keep the model's own window: their heads form one
// more group, "native", sized and masked exactly as llama_kv_cache_iswa's SWA cache (swa_full included); the budgets
// then apply to the global layers only (docs/semantics.md, "Sliding-window models").
#pragma once

#include "llama-kv-cache.h"

#include <memory>
#include <vector>

struct kvtool_kv_config;

class llama_kv_cache_mixed : public llama_memory_i {
public:
    llama_kv_cache_mixed(
            const llama_model & model,
     const kvtool_kv_config & cfg,
                    ggml_type   type_k,
                    ggml_type   type_v,
                         bool   v_trans,
                         bool   offload,
                         bool   unified,
                     uint32_t   kv_size,
                     uint32_t   n_seq_max,
                     uint32_t   n_ubatch,
                         bool   swa_full = false);

    ~llama_kv_cache_mixed() = default;

    // llama_memory_i

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // kvtool specific API

    size_t           n_groups()            const { return groups.size(); }
    uint32_t         group_window(size_t g) const { return groups[g].window; }
    // true for the group of a sliding-window model's SWA layers (the model's window, no kvtool sinks)
    bool             group_native(size_t g) const { return groups[g].native; }
    llama_kv_cache * group_cache (size_t g) const { return groups[g].cache.get(); }
    size_t           group_bytes (size_t g) const;
    uint32_t         group_used_cells(size_t g) const;
    uint32_t         get_n_sink()          const { return n_sink; }

    // whether seq_rm(seq_id, p0, p1) would be honoured: false when a window ring no longer holds what a token at
    // p0 must see (seq_rm then refuses and changes nothing). No side effects.
    bool             can_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;

    // KV heads of group g in layer il (ascending)
    const std::vector<int32_t> & heads(size_t g, int32_t il) const { return groups[g].heads[il]; }
    // the group that holds every head of layer il, or -1 when the layer is split across groups
    int32_t single_group(int32_t il) const { return layer_single[il]; }
    // position of each original head in the [group 0 heads | group 1 heads | ...] order
    const std::vector<int32_t> & layer_inverse(int32_t il) const { return layer_inv[il]; }

private:
    struct group {
        uint32_t window = 0;                         // 0 = full
        bool     native = false;                     // the model's own SWA layers (window = n_swa, model's swa_type)
        std::unique_ptr<llama_hparams>    hparams;   // llama_kv_cache keeps a reference: must outlive it
        std::unique_ptr<llama_kv_cache>   cache;
        std::vector<std::vector<int32_t>> heads;     // [il] -> KV heads
    };

    // true when every position a new token at p0 could see in a ring group is still there
    bool ring_covers(const group & g, llama_seq_id seq_id, llama_pos p0) const;

    const bool     unified;
    const uint32_t n_seq_max;
    const uint32_t n_sink;
    int32_t        i_full = -1; // index of the full group, if any

    std::vector<group>                groups;
    std::vector<int32_t>              layer_single;
    std::vector<std::vector<int32_t>> layer_inv;
};

class llama_kv_cache_mixed_context : public llama_memory_context_i {
public:
    using slot_info_vec_t = llama_kv_cache::slot_info_vec_t;

    llama_kv_cache_mixed_context(llama_memory_status status);
    llama_kv_cache_mixed_context(llama_kv_cache_mixed * kv);                                  // full
    llama_kv_cache_mixed_context(llama_kv_cache_mixed * kv, llama_context * lctx, bool optimize); // update
    llama_kv_cache_mixed_context(llama_kv_cache_mixed * kv, std::vector<slot_info_vec_t> sinfos,
                                 std::vector<llama_ubatch> ubatches);                          // batch

    virtual ~llama_kv_cache_mixed_context();

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override;
    const llama_ubatch & get_ubatch() const override;

    const llama_kv_cache_mixed   * get_mem() const { return kv; }
    const llama_kv_cache_context * get_group(size_t g) const;

private:
    const llama_kv_cache_mixed * kv = nullptr;

    size_t i_next = 0;

    std::vector<llama_ubatch>             ubatches;
    std::vector<llama_memory_context_ptr> ctxs;

    llama_memory_status status;
};

// nullptr unless mctx belongs to a mixed cache
const llama_kv_cache_mixed_context * kvtool_as_mixed(const llama_memory_context_i * mctx);

// Called by llama_model::create_memory for models on the plain KV-cache path. Returns nullptr (and the caller
// builds the stock cache) when the file has no budgets, they are disabled, or the model cannot take them.
llama_memory_i * kvtool_create_memory(const llama_model & model, const llama_memory_params & params,
                                      const llama_cparams & cparams, bool has_filter);

// The same for a sliding-window model (the iSWA path): the global layers take the budgets, the SWA layers keep
// their window cache. Returns nullptr, and the caller builds the stock llama_kv_cache_iswa, as above or when no
// head of a global layer is compressed (then the stock cache is the same thing, bit for bit).
llama_memory_i * kvtool_create_memory_iswa(const llama_model & model, const llama_memory_params & params,
                                           const llama_cparams & cparams, bool has_filter);

// Logs when a file asks for mixed KV but the architecture's memory cannot take it.
void kvtool_note_memory(const llama_model & model, const llama_memory_i * mem);
