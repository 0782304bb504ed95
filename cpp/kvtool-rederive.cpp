// Re-deriving head budgets from kvtool.heads.scores at load time (see kvtool-rederive.h).
#include "kvtool-rederive.h"

#include "kvtool-config.h"

#include "llama-impl.h"
#include "llama-model-loader.h"

#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>

static const char * KEY_OV_SPARSITY = "kvtool.kv.sparsity"; // override only, never stored
static const char * KEY_OV_WINDOW   = "kvtool.kv.window";   // override only, never stored
static const char * KEY_SCORES      = "kvtool.heads.scores";
static const char * KEY_PER_LAYER   = "kvtool.heads.per_layer";
static const char * KEY_HEADS_WIN   = "kvtool.heads.window";

// The shortest "%.*e" form of x that reads back as x: the digits Python's repr(x) prints (round-trip shortest).
static std::string shortest_decimal(double x) {
    char buf[64];
    for (int p = 1; p <= 17; ++p) {
        std::snprintf(buf, sizeof(buf), "%.*e", p - 1, x);
        if (std::strtod(buf, nullptr) == x) {
            return buf;
        }
    }
    std::snprintf(buf, sizeof(buf), "%.16e", x);
    return buf;
}

uint32_t kvtool_n_compressed(double s, uint32_t n) {
    if (!(s > 0.0)) {
        return 0;
    }
    if (s >= 1.0) {
        return n;
    }
    // s = D * 10^-q exactly (D the significant digits, q >= 1 since 0 < s < 1); k = floor((2*D*n + 10^q) / (2*10^q))
    // computed on decimal digits, so no width limit and no float rounding enters
    const std::string txt = shortest_decimal(s);
    const size_t epos = txt.find_first_of("eE");
    std::vector<uint64_t> digits; // little-endian decimal digits of D
    for (size_t i = epos; i-- > 0;) {
        if (txt[i] >= '0' && txt[i] <= '9') {
            digits.push_back((uint64_t) (txt[i] - '0'));
        }
    }
    const long exp10 = std::strtol(txt.c_str() + epos + 1, nullptr, 10);
    const long q = (long) digits.size() - 1 - exp10;
    if (q <= 0) { // cannot happen for 0 < s < 1; keep the arithmetic defined anyway
        return n;
    }
    const uint64_t m = 2 * (uint64_t) n;
    uint64_t carry = 0;
    for (auto & d : digits) {
        const uint64_t v = d * m + carry;
        d = v % 10;
        carry = v / 10;
    }
    while (carry) {
        digits.push_back(carry % 10);
        carry /= 10;
    }
    if (digits.size() <= (size_t) q) {
        digits.resize((size_t) q + 1, 0);
    }
    for (size_t i = (size_t) q; ; ++i) { // + 10^q
        if (i == digits.size()) {
            digits.push_back(0);
        }
        if (++digits[i] < 10) {
            break;
        }
        digits[i] = 0;
    }
    uint64_t above = 0; // floor(A / 10^q) <= 2n + 1
    for (size_t i = digits.size(); i-- > (size_t) q;) {
        above = above * 10 + digits[i];
    }
    return (uint32_t) (above / 2);
}

std::vector<bool> kvtool_mask_from_scores(const std::vector<double> & scores, uint32_t n_layer, uint32_t n_head,
                                          double sparsity, bool per_layer) {
    const size_t n = (size_t) n_layer * n_head;
    std::vector<double> c(n);
    for (size_t i = 0; i < n; ++i) {
        c[i] = std::min(1.0, std::max(0.0, scores[i]));
    }
    std::vector<bool> full(n, true);
    // index order is (layer, head) order, so comparing indices breaks ties exactly as heads.py does
    auto by_score = [&](size_t a, size_t b) { return c[a] < c[b] || (c[a] == c[b] && a < b); };
    const uint32_t groups = per_layer ? n_layer : 1;
    const size_t   size   = per_layer ? n_head : n;
    const uint32_t k      = kvtool_n_compressed(sparsity, (uint32_t) size);
    std::vector<size_t> order(size);
    for (uint32_t g = 0; g < groups; ++g) {
        std::iota(order.begin(), order.end(), (size_t) g * size);
        std::sort(order.begin(), order.end(), by_score);
        for (uint32_t i = 0; i < k; ++i) {
            full[order[i]] = false;
        }
    }
    return full;
}

static const llama_model_kv_override * find_override(const llama_model_loader & ml, const char * key) {
    auto it = ml.kv_overrides.find(key);
    return it == ml.kv_overrides.end() ? nullptr : &it->second;
}

static bool kv_int(const gguf_context * ctx, int kid, int64_t & out) {
    switch (gguf_get_kv_type(ctx, kid)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8 (ctx, kid); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(ctx, kid); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ctx, kid); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ctx, kid); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) std::min<uint64_t>(gguf_get_val_u64(ctx, kid), INT64_MAX); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ctx, kid); return true;
        default: return false;
    }
}

void kvtool_apply_budget_overrides(const llama_model_loader & ml, kvtool_kv_config & cfg, uint32_t n_layer,
                                   uint32_t n_head) {
    const auto * ov_s = find_override(ml, KEY_OV_SPARSITY);
    const auto * ov_w = find_override(ml, KEY_OV_WINDOW);
    if (!ov_s && !ov_w) {
        return;
    }
    const char * key = ov_s ? KEY_OV_SPARSITY : KEY_OV_WINDOW;

    double sparsity = 0.0;
    if (ov_s) {
        if (ov_s->tag == LLAMA_KV_OVERRIDE_TYPE_FLOAT) {
            sparsity = ov_s->val_f64;
        } else if (ov_s->tag == LLAMA_KV_OVERRIDE_TYPE_INT) {
            sparsity = (double) ov_s->val_i64;
        } else {
            throw std::runtime_error(format("%s: override must be a float (--override-kv %s=float:0.5)",
                    KEY_OV_SPARSITY, KEY_OV_SPARSITY));
        }
        if (!std::isfinite(sparsity) || sparsity < 0.0 || sparsity > 1.0) {
            throw std::runtime_error(format("%s: must be in [0, 1], got %g", KEY_OV_SPARSITY, sparsity));
        }
    }
    int64_t window = 0;
    if (ov_w) {
        if (ov_w->tag != LLAMA_KV_OVERRIDE_TYPE_INT) {
            throw std::runtime_error(format("%s: override must be an int (--override-kv %s=int:64)",
                    KEY_OV_WINDOW, KEY_OV_WINDOW));
        }
        window = ov_w->val_i64;
        if (window < 1 || window > INT32_MAX) {
            throw std::runtime_error(format("%s: must be in [1, %d], got %lld", KEY_OV_WINDOW, INT32_MAX,
                    (long long) window));
        }
    }

    const gguf_context * ctx = ml.metadata;
    if (!cfg.present) {
        throw std::runtime_error(format("%s: override needs kvtool budgets and scores in the file, which has no "
                "kvtool.kv.head_window", key));
    }
    const int kid = gguf_find_key(ctx, KEY_SCORES);
    if (kid < 0) {
        throw std::runtime_error(format("%s: override needs %s, which this file lacks (convert it again from a "
                "heads.json that has scores)", key, KEY_SCORES));
    }
    const size_t n = cfg.head_window.size();
    if (n_head == 0 || (size_t) n_layer * n_head != n) {
        throw std::runtime_error(format("%s: override needs the same KV head count in every layer", key));
    }
    const gguf_type at = gguf_get_kv_type(ctx, kid) == GGUF_TYPE_ARRAY ? gguf_get_arr_type(ctx, kid) : GGUF_TYPE_COUNT;
    if ((at != GGUF_TYPE_FLOAT32 && at != GGUF_TYPE_FLOAT64) || gguf_get_arr_n(ctx, kid) != n) {
        throw std::runtime_error(format("%s: expected an f32 array of length %zu (n_layer %u x n_head_kv %u)",
                KEY_SCORES, n, n_layer, n_head));
    }
    std::vector<double> scores(n);
    const void * data = gguf_get_arr_data(ctx, kid);
    for (size_t i = 0; i < n; ++i) {
        scores[i] = at == GGUF_TYPE_FLOAT32 ? (double) ((const float *) data)[i] : ((const double *) data)[i];
        if (!std::isfinite(scores[i])) {
            throw std::runtime_error(format("%s: the score of layer %zu head %zu is not finite", KEY_SCORES,
                    i / n_head, i % n_head));
        }
    }
    bool per_layer = false;
    const int kid_pl = gguf_find_key(ctx, KEY_PER_LAYER);
    if (kid_pl >= 0) {
        if (gguf_get_kv_type(ctx, kid_pl) != GGUF_TYPE_BOOL) {
            throw std::runtime_error(format("%s: expected bool", KEY_PER_LAYER));
        }
        per_layer = gguf_get_val_bool(ctx, kid_pl);
    }
    if (!ov_w) { // the window compressed heads get: the file's default
        const int kid_w = gguf_find_key(ctx, KEY_HEADS_WIN);
        if (kid_w < 0) {
            throw std::runtime_error(format("%s: missing (the window that %s gives compressed heads); "
                    "give %s too", KEY_HEADS_WIN, KEY_OV_SPARSITY, KEY_OV_WINDOW));
        }
        if (!kv_int(ctx, kid_w, window) || window < 1 || window > INT32_MAX) {
            throw std::runtime_error(format("%s: expected a u32 in [1, %d]", KEY_HEADS_WIN, INT32_MAX));
        }
    }

    std::vector<bool> full(n);
    if (ov_s) {
        full = kvtool_mask_from_scores(scores, n_layer, n_head, sparsity, per_layer);
    } else { // a window alone keeps the file's choice of heads
        for (size_t i = 0; i < n; ++i) {
            full[i] = cfg.head_window[i] == 0;
        }
    }
    uint32_t n_comp = 0;
    for (size_t i = 0; i < n; ++i) {
        cfg.head_window[i] = full[i] ? 0 : (int32_t) window;
        n_comp += !full[i];
    }
    LLAMA_LOG_INFO("%s: kvtool budgets rebuilt from %s: %u of %zu KV heads compressed, window %lld%s\n", __func__,
            KEY_SCORES, n_comp, n, (long long) window, ov_s ? format(", sparsity %g", sparsity).c_str() : "");
}
