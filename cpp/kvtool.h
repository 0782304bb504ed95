// kvtool: a tiny C API on top of libllama for the mixed per-head KV cache.
//
// Why a separate header: llama-cpp-python mirrors llama.h's structs with ctypes, so kvtool never adds
// fields to them. Everything kvtool exposes goes through these plain functions instead, and any C/C++ app
// linking the patched libllama can call them (budgets themselves are read from the GGUF automatically).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && !defined(__MINGW32__)
#    ifdef LLAMA_BUILD
#        define KVTOOL_API __declspec(dllexport)
#    else
#        define KVTOOL_API __declspec(dllimport)
#    endif
#else
#    define KVTOOL_API __attribute__((visibility("default")))
#endif

// Version of the kvtool runtime ABI (bumped when these functions change).
#define KVTOOL_RUNTIME_VERSION 1

struct llama_context;
struct llama_model;

// Returns KVTOOL_RUNTIME_VERSION of the library actually loaded.
KVTOOL_API int kvtool_runtime_version(void);

// Hash of patches/ + cpp/ this library was built from (a short hex string, static storage).
KVTOOL_API const char * kvtool_patch_hash(void);

// Backend the library was configured for ("cpu", "cuda", "metal", "vulkan").
KVTOOL_API const char * kvtool_backend(void);

// Exact bytes allocated by the context's KV memory: *full_bytes for full heads, *ring_bytes for the windowed
// (sink + window) rings. Returns 1 when the mixed cache is active, 0 when the context runs a stock cache
// (then everything is reported in *full_bytes), -1 when the context has no KV memory.
KVTOOL_API int kvtool_kv_bytes(const struct llama_context * ctx, size_t * full_bytes, size_t * ring_bytes);

// The budgets the model loaded with, after kv_overrides (kvtool.kv.sparsity, .window, .sink): copies up to n
// layer-major head windows (0 = full head) into head_window and the sink into *n_sink. Returns the model's total
// KV head count, or -1 when the file has no kvtool budgets.
KVTOOL_API int kvtool_model_budgets(const struct llama_model * model, int32_t * head_window, int n, uint32_t * n_sink);

// Cells in use right now (all sequences): full-head cache and rings. Same return convention as kvtool_kv_bytes.
KVTOOL_API int kvtool_kv_used_cells(const struct llama_context * ctx, uint32_t * full_cells, uint32_t * ring_cells);

// Number of head groups of the mixed cache (0 if not mixed), and the window and cell count of group g.
KVTOOL_API int kvtool_kv_n_groups(const struct llama_context * ctx);
KVTOOL_API int kvtool_kv_group_info(const struct llama_context * ctx, int g, uint32_t * window, uint32_t * n_cells);

// Where the KV cache lives, measured from the buffers actually allocated (one entry per cache group and ggml buffer
// type, so a layer split across CPU and a GPU gives one entry for each). A stock cache reports its buffers as group
// 0. kvtool_kv_n_buffers returns the entry count (0 when the context has no KV memory); kvtool_kv_buffer_info fills
// entry i: *group 0 = full heads (or the stock cache), 1 = rings; *buft_name the buffer type's name ("CPU",
// "CUDA0", "Vulkan0", ...; static storage); *bytes its size. Returns 0, or -1 when i is out of range.
KVTOOL_API int kvtool_kv_n_buffers(const struct llama_context * ctx);
KVTOOL_API int kvtool_kv_buffer_info(const struct llama_context * ctx, int i, int * group, const char ** buft_name,
                                     size_t * bytes);

// Whether llama_memory_seq_rm(mem, seq_id, p0, p1) on the context's memory would succeed, asked without changing
// anything. A mixed cache refuses a tail cut when a window ring no longer holds the positions a token at p0 must see
// (overwritten by a longer earlier run, or never restored from a sequence state, which keeps only the window cells).
// Returns 1 (the cut would be honoured), 0 (the mixed cache would refuse it), or 1 for any other memory, which
// kvtool does not second-guess; -1 when the context has no KV memory. llama-server's prompt reuse (patch 0007)
// asks this before cutting a slot back and re-processes the prompt when the answer is 0.
KVTOOL_API int kvtool_can_seq_rm(const struct llama_context * ctx, int32_t seq_id, int32_t p0, int32_t p1);

// The devices ggml sees (the CPU included), so doctor can report them without llama-cpp-python's bindings, which
// do not expose ggml's device API. *type is "cpu", "gpu", "igpu", "accel" or "meta"; free/total in bytes.
// Returns 0, or -1 when i is out of range.
KVTOOL_API int kvtool_n_devices(void);
KVTOOL_API int kvtool_device_info(int i, const char ** name, const char ** description, const char ** type,
                                  size_t * free_bytes, size_t * total_bytes);

#ifdef __cplusplus
}
#endif
