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

// Returns KVTOOL_RUNTIME_VERSION of the library actually loaded.
KVTOOL_API int kvtool_runtime_version(void);

// Hash of patches/ + cpp/ this library was built from (a short hex string, static storage).
KVTOOL_API const char * kvtool_patch_hash(void);

// Backend the library was configured for ("cpu", "cuda", "metal", "vulkan").
KVTOOL_API const char * kvtool_backend(void);

#ifdef __cplusplus
}
#endif
