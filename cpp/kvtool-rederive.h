// kvtool: rebuild a file's head budgets at load time from its stored head scores (docs/gguf-keys.md, "Load-time
// overrides").
//
// Why in the runtime: one GGUF then serves any memory budget. A C app or llama-server picks the compression with
// --override-kv kvtool.kv.sparsity=float:0.6, without a Python toolchain and without a second file. The rule is the
// one of toolchain/heads.py (mask_from_scores), mirrored here bit for bit, ties included: tests compare the mask and
// the logits against files that `kvtool convert` wrote at each sparsity.
#pragma once

#include <cstdint>
#include <vector>

struct kvtool_kv_config;
struct llama_model_loader;

// k = floor(s*n + 1/2), with s read as the shortest decimal that round-trips to the double (as Python's repr does),
// so 0.35 * 10 = 3.5 rounds to 4 as it does in toolchain/heads.py. s must be in [0, 1].
uint32_t kvtool_n_compressed(double sparsity, uint32_t n);

// full[i] for layer-major scores (n_layer x n_head): the k lowest clipped scores are compressed, ties broken by
// (layer, head) ascending; with per_layer the rule runs inside each layer with k from n_head.
std::vector<bool> kvtool_mask_from_scores(const std::vector<double> & scores, uint32_t n_layer, uint32_t n_head,
                                          double sparsity, bool per_layer);

// Apply the kvtool.kv.sparsity and kvtool.kv.window overrides of the loader (if any) to cfg->head_window. Throws
// std::runtime_error naming the key when an override is malformed or out of range, or the file has no scores.
void kvtool_apply_budget_overrides(const llama_model_loader & ml, kvtool_kv_config & cfg, uint32_t n_layer,
                                   uint32_t n_head_kv_uniform);
