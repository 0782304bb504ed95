// llama_kv_cache_mixed (see llama-kv-cache-mixed.h).
#include "llama-kv-cache-mixed.h"

#include "kvtool-config.h"

#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cassert>
#include <stdexcept>

// written in front of the groups' state so a blob saved under other budgets is refused, not misread
static const uint32_t KVTOOL_STATE_MAGIC = 0x6b76746d; // "kvtm"

llama_kv_cache_mixed::llama_kv_cache_mixed(
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
                     bool   swa_full) : unified(unified), n_seq_max(n_seq_max), n_sink(cfg.n_sink) {
    const llama_hparams & hp = model.hparams;
    const uint32_t n_layer = hp.n_layer_all;
    const bool model_swa = hp.swa_type != LLAMA_SWA_TYPE_NONE;

    // a group is (window, native); the SWA layers of a sliding-window model form the one native group
    struct key {
        uint32_t window;
        bool     native;
        bool operator==(const key & o) const { return window == o.window && native == o.native; }
        bool operator<(const key & o) const { return native != o.native ? !native : window < o.window; }
    };

    // effective window of each head: a window that covers the whole context is a full head
    auto eff = [&](uint32_t il, uint32_t h) -> key {
        if (model_swa && hp.is_swa(il)) {
            return {hp.n_swa, true};
        }
        const uint32_t w = (uint32_t) cfg.window(il, h);
        return {w >= kv_size ? 0 : w, false};
    };

    std::vector<key> keys;
    for (uint32_t il = 0; il < n_layer; ++il) {
        for (uint32_t h = 0; h < hp.n_head_kv(il); ++h) {
            const key k = eff(il, h);
            if (std::find(keys.begin(), keys.end(), k) == keys.end()) {
                keys.push_back(k);
            }
        }
    }
    std::sort(keys.begin(), keys.end()); // the full group (0), if any, comes first; the native group last

    groups.resize(keys.size());
    for (size_t g = 0; g < keys.size(); ++g) {
        group & gr = groups[g];
        gr.window  = keys[g].window;
        gr.native  = keys[g].native;
        gr.hparams = std::make_unique<llama_hparams>(hp);
        gr.heads.resize(n_layer);
        for (uint32_t il = 0; il < n_layer; ++il) {
            for (uint32_t h = 0; h < hp.n_head_kv(il); ++h) {
                if (eff(il, h) == keys[g]) {
                    gr.heads[il].push_back((int32_t) h);
                }
            }
            gr.hparams->n_head_kv_arr[il] = (uint32_t) gr.heads[il].size();
        }
        if (gr.window == 0 && !gr.native) {
            i_full = (int32_t) g;
        }
    }

    layer_single.assign(n_layer, -1);
    layer_inv.assign(n_layer, {});
    for (uint32_t il = 0; il < n_layer; ++il) {
        std::vector<int32_t> order;
        for (size_t g = 0; g < groups.size(); ++g) {
            const auto & hs = groups[g].heads[il];
            if (hs.size() == hp.n_head_kv(il)) {
                layer_single[il] = (int32_t) g;
            }
            order.insert(order.end(), hs.begin(), hs.end());
        }
        layer_inv[il].resize(order.size());
        for (size_t j = 0; j < order.size(); ++j) {
            layer_inv[il][order[j]] = (int32_t) j;
        }
    }

    for (size_t g = 0; g < groups.size(); ++g) {
        group & gr = groups[g];

        uint32_t size = kv_size;
        if (gr.native) {
            // exactly llama_kv_cache_iswa's SWA cache
            size = swa_full ? kv_size : GGML_PAD(std::min(kv_size, hp.n_swa*(unified ? n_seq_max : 1) + n_ubatch), 256);
        } else if (gr.window > 0) {
            // the SWA ring rule of llama_kv_cache_iswa, plus the sink positions that are never reused
            const uint32_t need = (gr.window + n_sink)*(unified ? n_seq_max : 1) + n_ubatch;
            size = std::min(kv_size, GGML_PAD(std::min(kv_size, need), 256));
        }

        const auto & heads = gr.heads;
        const layer_filter_cb filter = [&heads](int32_t il) { return !heads[il].empty(); };

        const std::string tag = gr.native ? std::string("swa_") : gr.window == 0 ? std::string("full_") : format("w%u_", gr.window);

        LLAMA_LOG_INFO("%s: group %zu: window %u%s, %u cells\n", __func__, g, gr.window, gr.native ? " (model SWA layers)" : "", size);

        const uint32_t       n_swa    = gr.native ? hp.n_swa : gr.window;
        const llama_swa_type swa_type = gr.native ? hp.swa_type : gr.window > 0 ? LLAMA_SWA_TYPE_STANDARD : LLAMA_SWA_TYPE_NONE;

        gr.cache = std::make_unique<llama_kv_cache>(
                model, *gr.hparams, type_k, type_v, v_trans, offload, unified, size, n_seq_max, 1,
                n_swa, swa_type, nullptr, filter, nullptr, nullptr, tag.c_str());

        if (gr.window > 0 && !gr.native) {
            gr.cache->set_n_sink_tokens(n_sink);
        }
    }
}

size_t llama_kv_cache_mixed::group_bytes(size_t g) const {
    size_t total = 0;
    for (const auto & [buft, size] : groups[g].cache->memory_breakdown()) {
        total += size;
    }
    return total;
}

uint32_t llama_kv_cache_mixed::group_used_cells(size_t g) const {
    uint32_t used = 0;
    const auto * cache = groups[g].cache.get();
    for (uint32_t s = 0; s < cache->get_n_stream(); ++s) {
        // get_cells() maps a sequence to its stream; with one stream every sequence maps to 0
        used += cache->get_cells(cache->get_n_stream() > 1 ? (llama_seq_id) s : 0).get_used();
    }
    return used;
}

void llama_kv_cache_mixed::clear(bool data) {
    for (auto & gr : groups) {
        gr.cache->clear(data);
    }
}

bool llama_kv_cache_mixed::ring_covers(const group & gr, llama_seq_id seq_id, llama_pos p0) const {
    // positions of this sequence below p0 that a query at p0 may see: the sinks and the last W-1 (or, for the
    // native group, what the model's own window shows)
    const auto & ring = gr.cache->get_cells(seq_id).seq_pos_get(seq_id);

    auto ring_has = [&](llama_pos p) {
        auto it = ring.lower_bound({p, 0});
        return it != ring.end() && it->first == p;
    };

    const llama_swa_type swa_type = gr.native ? gr.hparams->swa_type : LLAMA_SWA_TYPE_STANDARD;
    const llama_pos      sink     = gr.native ? 0 : (llama_pos) n_sink;
    auto needed = [&](llama_pos p) {
        return !llama_hparams::is_masked_swa(gr.window, swa_type, p, p0, sink);
    };

    if (i_full >= 0) {
        // the full group is the reference of which positions exist
        const auto & full = groups[i_full].cache->get_cells(seq_id).seq_pos_get(seq_id);
        for (const auto & [p, cell] : full) {
            if (p >= p0) {
                break;
            }
            if (needed(p) && !ring_has(p)) {
                return false;
            }
        }
        return true;
    }

    // no full group: require the needed positions to be contiguous up to p0
    if (!gr.native) {
        const llama_pos lo = std::max<llama_pos>((llama_pos) n_sink, p0 - (llama_pos) gr.window + 1);
        for (llama_pos p = 0; p < std::min<llama_pos>(p0, (llama_pos) n_sink); ++p) {
            if (!ring_has(p)) {
                return false;
            }
        }
        for (llama_pos p = std::max<llama_pos>(lo, 0); p < p0; ++p) {
            if (!ring_has(p)) {
                return false;
            }
        }
        return true;
    }
    const llama_pos lo = std::max<llama_pos>(0, p0 - (llama_pos) gr.window);
    for (llama_pos p = lo; p < p0; ++p) {
        if (needed(p) && !ring_has(p)) {
            return false;
        }
    }
    return true;
}

bool llama_kv_cache_mixed::can_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    if (p0 < 0) {
        p0 = 0;
    }

    // a tail truncation is only honest if every ring still holds what the next token at p0 must see; this is
    // the whole test seq_rm applies, kept apart and side-effect free so that a caller (llama-server's prompt
    // reuse) can ask first and re-process the prompt instead of treating the refusal as fatal
    std::vector<llama_seq_id> seqs;
    if (seq_id >= 0) {
        seqs.push_back(seq_id);
    } else {
        for (uint32_t s = 0; s < n_seq_max; ++s) {
            seqs.push_back((llama_seq_id) s);
        }
    }
    for (llama_seq_id s : seqs) {
        const llama_pos pmax = seq_pos_max(s);
        const bool tail = p1 < 0 || p1 > pmax;
        if (!tail || pmax < p0 || p0 == 0) {
            continue;
        }
        for (const auto & gr : groups) {
            if (gr.window > 0 && !ring_covers(gr, s, p0)) {
                return false;
            }
        }
    }
    return true;
}

bool llama_kv_cache_mixed::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (p0 < 0) {
        p0 = 0;
    }

    // refuse before touching anything (callers such as llama-cpp-python then re-evaluate)
    if (!can_seq_rm(seq_id, p0, p1)) {
        return false;
    }

    bool res = true;
    for (auto & gr : groups) {
        res = gr.cache->seq_rm(seq_id, p0, p1) && res;
    }
    return res;
}

void llama_kv_cache_mixed::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    for (auto & gr : groups) {
        gr.cache->seq_cp(seq_id_src, seq_id_dst, p0, p1);
    }
}

void llama_kv_cache_mixed::seq_keep(llama_seq_id seq_id) {
    for (auto & gr : groups) {
        gr.cache->seq_keep(seq_id);
    }
}

void llama_kv_cache_mixed::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    for (auto & gr : groups) {
        gr.cache->seq_add(seq_id, p0, p1, shift);
    }
}

void llama_kv_cache_mixed::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    for (auto & gr : groups) {
        gr.cache->seq_div(seq_id, p0, p1, d);
    }
}

llama_pos llama_kv_cache_mixed::seq_pos_min(llama_seq_id seq_id) const {
    if (i_full >= 0) {
        return groups[i_full].cache->seq_pos_min(seq_id);
    }
    llama_pos res = -1;
    for (const auto & gr : groups) {
        const llama_pos p = gr.cache->seq_pos_min(seq_id);
        if (p >= 0 && (res < 0 || p < res)) {
            res = p;
        }
    }
    return res;
}

llama_pos llama_kv_cache_mixed::seq_pos_max(llama_seq_id seq_id) const {
    llama_pos res = -1;
    for (const auto & gr : groups) {
        res = std::max(res, gr.cache->seq_pos_max(seq_id));
    }
    return res;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_mixed::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> mb;
    for (const auto & gr : groups) {
        for (const auto & [buft, size] : gr.cache->memory_breakdown()) {
            mb[buft] += size;
        }
    }
    return mb;
}

llama_memory_context_ptr llama_kv_cache_mixed::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    // same strategy as llama_kv_cache_iswa: a simple split when unified, else (or on failure) an equal split
    for (int attempt = 0; attempt < 2; ++attempt) {
        if (attempt == 0 && !unified) {
            continue;
        }

        balloc.split_reset();

        std::vector<llama_ubatch> ubatches;
        while (true) {
            auto ubatch = attempt == 0 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, !unified, 0);
            if (ubatch.n_tokens == 0) {
                break;
            }
            ubatches.push_back(std::move(ubatch)); // NOLINT
        }

        if (balloc.get_n_used() < balloc.get_n_tokens()) {
            continue;
        }

        std::vector<llama_kv_cache::slot_info_vec_t> sinfos;
        bool ok = true;
        for (auto & gr : groups) {
            auto si = gr.cache->prepare(ubatches);
            if (si.empty()) {
                ok = false;
                break;
            }
            sinfos.push_back(std::move(si));
        }
        if (!ok) {
            continue;
        }

        return std::make_unique<llama_kv_cache_mixed_context>(this, std::move(sinfos), std::move(ubatches));
    }

    return std::make_unique<llama_kv_cache_mixed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
}

llama_memory_context_ptr llama_kv_cache_mixed::init_full() {
    return std::make_unique<llama_kv_cache_mixed_context>(this);
}

llama_memory_context_ptr llama_kv_cache_mixed::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<llama_kv_cache_mixed_context>(this, lctx, optimize);
}

bool llama_kv_cache_mixed::get_can_shift() const {
    // every group applies the RoPE shift to its own cells; relative distances inside a ring are preserved
    for (const auto & gr : groups) {
        if (!gr.cache->get_can_shift()) {
            return false;
        }
    }
    return true;
}

void llama_kv_cache_mixed::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    const uint32_t n = (uint32_t) groups.size();
    io.write(&KVTOOL_STATE_MAGIC, sizeof(KVTOOL_STATE_MAGIC));
    io.write(&n, sizeof(n));
    for (const auto & gr : groups) {
        io.write(&gr.window, sizeof(gr.window));
    }
    io.write(&n_sink, sizeof(n_sink));

    for (const auto & gr : groups) {
        // like llama_kv_cache_iswa: a partial (checkpoint) state holds only the windowed part
        if (gr.window == 0 && (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)) {
            continue;
        }
        gr.cache->state_write(io, seq_id, flags);
    }
}

void llama_kv_cache_mixed::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    uint32_t magic = 0;
    uint32_t n     = 0;
    io.read(&magic, sizeof(magic));
    io.read(&n, sizeof(n));
    if (magic != KVTOOL_STATE_MAGIC || n != groups.size()) {
        throw std::runtime_error("kvtool: the state was not saved by a mixed KV cache with these budgets");
    }
    for (const auto & gr : groups) {
        uint32_t w = 0;
        io.read(&w, sizeof(w));
        if (w != gr.window) {
            throw std::runtime_error(format("kvtool: the state was saved with window %u where this model has %u", w, gr.window));
        }
    }
    uint32_t s = 0;
    io.read(&s, sizeof(s));
    if (s != n_sink) {
        throw std::runtime_error(format("kvtool: the state was saved with sink %u where this model has %u", s, n_sink));
    }

    for (auto & gr : groups) {
        if (gr.window == 0 && (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)) {
            continue;
        }
        gr.cache->state_read(io, seq_id, flags);
    }
}

//
// llama_kv_cache_mixed_context
//

static llama_memory_status combine_all(const std::vector<llama_memory_context_ptr> & ctxs) {
    llama_memory_status st = LLAMA_MEMORY_STATUS_NO_UPDATE;
    for (const auto & c : ctxs) {
        st = llama_memory_status_combine(st, c->get_status());
    }
    return st;
}

llama_kv_cache_mixed_context::llama_kv_cache_mixed_context(llama_memory_status status) : status(status) {}

llama_kv_cache_mixed_context::llama_kv_cache_mixed_context(llama_kv_cache_mixed * kv) : kv(kv) {
    for (size_t g = 0; g < kv->n_groups(); ++g) {
        ctxs.push_back(kv->group_cache(g)->init_full());
    }
    status = combine_all(ctxs);
}

llama_kv_cache_mixed_context::llama_kv_cache_mixed_context(llama_kv_cache_mixed * kv, llama_context * lctx, bool optimize) : kv(kv) {
    for (size_t g = 0; g < kv->n_groups(); ++g) {
        ctxs.push_back(kv->group_cache(g)->init_update(lctx, optimize));
    }
    status = combine_all(ctxs);
}

llama_kv_cache_mixed_context::llama_kv_cache_mixed_context(
        llama_kv_cache_mixed * kv,
        std::vector<slot_info_vec_t> sinfos,
        std::vector<llama_ubatch> ubatches) : kv(kv), ubatches(std::move(ubatches)) {
    for (size_t g = 0; g < kv->n_groups(); ++g) {
        ctxs.push_back(std::make_unique<llama_kv_cache_context>(kv->group_cache(g), std::move(sinfos[g]), this->ubatches));
    }
    status = combine_all(ctxs);
}

llama_kv_cache_mixed_context::~llama_kv_cache_mixed_context() = default;

bool llama_kv_cache_mixed_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    for (auto & c : ctxs) {
        c->next();
    }

    return ++i_next < ubatches.size();
}

bool llama_kv_cache_mixed_context::apply() {
    assert(!llama_memory_status_is_fail(status));

    bool res = true;
    for (auto & c : ctxs) {
        res = c->apply() && res;
    }
    return res;
}

llama_memory_status llama_kv_cache_mixed_context::get_status() const {
    return status;
}

const llama_ubatch & llama_kv_cache_mixed_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

const llama_kv_cache_context * llama_kv_cache_mixed_context::get_group(size_t g) const {
    return static_cast<const llama_kv_cache_context *>(ctxs[g].get());
}

const llama_kv_cache_mixed_context * kvtool_as_mixed(const llama_memory_context_i * mctx) {
    return dynamic_cast<const llama_kv_cache_mixed_context *>(mctx);
}

//
// creation
//

// why a model cannot take a mixed cache, or nullptr
static const char * kvtool_mixed_refusal(const llama_model & model, const llama_memory_params & params,
                                         const llama_cparams & cparams, bool has_filter) {
    const auto & hp = model.hparams;
    const char * why = nullptr;
    if (has_filter) {
        why = "the model filters or shares its KV layers (MTP/NextN, Gemma-3n/4)";
    } else if (hp.is_mla()) {
        why = "the model uses MLA attention";
    } else if (cparams.training) {
        why = "training contexts are not supported";
    } else if (hp.n_embd_head_k() % ggml_blck_size(params.type_k) != 0 ||
               hp.n_embd_head_v() % ggml_blck_size(params.type_v) != 0) {
        // a group may hold a single head, so one head's row must be whole quantization blocks
        why = "the head size is not a multiple of the KV cache type's block size";
    }
    return why;
}

llama_memory_i * kvtool_create_memory(const llama_model & model, const llama_memory_params & params,
                                      const llama_cparams & cparams, bool has_filter) {
    const auto & cfg = model.kvtool_cfg;
    if (!cfg || !cfg->present || !cfg->enabled) {
        return nullptr;
    }

    const char * why = kvtool_mixed_refusal(model, params, cparams, has_filter);
    if (why) {
        LLAMA_LOG_WARN("%s: kvtool: mixed KV refused for %s: %s; running with a full cache\n", __func__,
                llm_arch_name(model.arch), why);
        return nullptr;
    }

    bool any_compressed = false;
    for (int32_t w : cfg->head_window) {
        any_compressed = any_compressed || (w > 0 && (uint32_t) w < cparams.n_ctx_seq);
    }
    if (!any_compressed) {
        // every head is full: the stock cache is the same thing, bit for bit
        LLAMA_LOG_INFO("%s: kvtool: no head is compressed at n_ctx_seq = %u; using the stock cache\n", __func__, cparams.n_ctx_seq);
        return nullptr;
    }

    return new llama_kv_cache_mixed(model, *cfg, params.type_k, params.type_v, !cparams.flash_attn,
            cparams.offload_kqv, cparams.kv_unified, cparams.n_ctx_seq, cparams.n_seq_max, cparams.n_ubatch);
}

llama_memory_i * kvtool_create_memory_iswa(const llama_model & model, const llama_memory_params & params,
                                           const llama_cparams & cparams, bool has_filter) {
    const auto & cfg = model.kvtool_cfg;
    if (!cfg || !cfg->present || !cfg->enabled) {
        return nullptr;
    }
    if (const char * why = kvtool_mixed_refusal(model, params, cparams, has_filter)) {
        LLAMA_LOG_WARN("%s: kvtool: mixed KV refused for %s: %s; running with the stock sliding-window cache\n",
                __func__, llm_arch_name(model.arch), why);
        return nullptr;
    }

    const auto & hp = model.hparams;
    bool any_compressed = false;
    for (uint32_t il = 0; il < hp.n_layer_all; ++il) {
        if (hp.is_swa(il)) {
            continue; // the SWA layers keep the model's window
        }
        for (uint32_t h = 0; h < hp.n_head_kv(il); ++h) {
            const int32_t w = cfg->window(il, h);
            any_compressed = any_compressed || (w > 0 && (uint32_t) w < cparams.n_ctx_seq);
        }
    }
    if (!any_compressed) {
        LLAMA_LOG_INFO("%s: kvtool: no head of a global layer is compressed at n_ctx_seq = %u; using the stock "
                "sliding-window cache\n", __func__, cparams.n_ctx_seq);
        return nullptr;
    }

    return new llama_kv_cache_mixed(model, *cfg, params.type_k, params.type_v, !cparams.flash_attn,
            cparams.offload_kqv, cparams.kv_unified, cparams.n_ctx_seq, cparams.n_seq_max, cparams.n_ubatch,
            params.swa_full);
}

void kvtool_note_memory(const llama_model & model, const llama_memory_i * mem) {
    const auto & cfg = model.kvtool_cfg;
    if (!cfg || !cfg->present || !cfg->enabled) {
        return;
    }
    if (mem != nullptr && dynamic_cast<const llama_kv_cache_mixed *>(mem) == nullptr &&
        dynamic_cast<const llama_kv_cache *>(mem) == nullptr &&
        dynamic_cast<const llama_kv_cache_iswa *>(mem) == nullptr) { // the iSWA path logs its own reasons
        LLAMA_LOG_WARN("%s: kvtool: %s uses special memory (recurrent or hybrid); "
                "mixed KV refused, running with a full cache\n", __func__, llm_arch_name(model.arch));
    }
}
