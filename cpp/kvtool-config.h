// kvtool budgets read from the GGUF (docs/architecture.md §2, keys in docs/gguf-keys.md).
//
// Why a struct on llama_model: the budgets are a property of the file (plus kv_overrides), known at load time,
// and needed later when a context creates its memory. Tensors are never touched: heads are gathered at run time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct llama_model;
struct llama_model_loader;

struct kvtool_kv_config {
    bool     present  = false; // the file carries kvtool.kv.head_window
    bool     enabled  = false; // kvtool.kv.enabled, after kv_overrides
    uint32_t n_sink   = 0;     // kvtool.kv.sink: sequence positions 0..S-1 stay visible to compressed heads

    std::vector<int32_t>  head_window;  // layer-major, 0 = full head, W > 0 = window of W tokens
    std::vector<uint32_t> layer_offset; // index of layer il's first head in head_window

    int32_t window(uint32_t il, uint32_t h) const { return head_window[layer_offset[il] + h]; }
};

// Read and validate the kvtool.* keys. Throws std::runtime_error naming the key and the expected shape.
void kvtool_load_config(llama_model_loader & ml, llama_model & model);
