// Graph input of a mixed cache on a sliding-window model (gemma2/3, gpt-oss): the model builders ask for
// build_attn_inp_kv_iswa() and call the iSWA build_attn(), so the mixed input has to be an iSWA input.
//
// Why a wrapper and not a second mixed input: the mixed cache already holds the SWA layers as its "native" group,
// so the per-group input (llm_graph_input_attn_kv_mixed) and kvtool_build_attn_mixed() serve both paths; this class
// only carries it through the iSWA types. Its own iSWA tensors stay null and its iSWA context is never used.
#pragma once

#include "kvtool-graph.h"

#include <memory>

class llm_graph_input_attn_kv_iswa_mixed : public llm_graph_input_attn_kv_iswa {
public:
    llm_graph_input_attn_kv_iswa_mixed(const llama_hparams & hparams, const llama_cparams & cparams,
                                       std::unique_ptr<llm_graph_input_attn_kv_mixed> inner);

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    std::unique_ptr<llm_graph_input_attn_kv_mixed> inner;
};

// the mixed input inside an iSWA input, or nullptr for a stock one
llm_graph_input_attn_kv_mixed * kvtool_iswa_mixed(llm_graph_input_attn_kv_iswa * inp);

// hparams for the per-group inputs: each group's cache masks by its own window, so the group inputs are built as
// for a model without SWA (build_attn_inp_kv_impl asserts that)
llama_hparams kvtool_group_hparams(const llama_hparams & hparams);
