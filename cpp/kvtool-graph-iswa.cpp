// The iSWA wrapper of the mixed graph input (see kvtool-graph-iswa.h).
#include "kvtool-graph-iswa.h"

llm_graph_input_attn_kv_iswa_mixed::llm_graph_input_attn_kv_iswa_mixed(
        const llama_hparams & hparams, const llama_cparams & cparams,
        std::unique_ptr<llm_graph_input_attn_kv_mixed> inner) :
    llm_graph_input_attn_kv_iswa(hparams, cparams, nullptr),
    inner(std::move(inner)) {
}

void llm_graph_input_attn_kv_iswa_mixed::set_input(const llama_ubatch * ubatch) {
    inner->set_input(ubatch);
}

bool llm_graph_input_attn_kv_iswa_mixed::can_reuse(const llm_graph_params & params) {
    return inner->can_reuse(params);
}

llm_graph_input_attn_kv_mixed * kvtool_iswa_mixed(llm_graph_input_attn_kv_iswa * inp) {
    auto * w = dynamic_cast<llm_graph_input_attn_kv_iswa_mixed *>(inp);
    return w ? w->inner.get() : nullptr;
}

llama_hparams kvtool_group_hparams(const llama_hparams & hparams) {
    llama_hparams hp = hparams;
    hp.swa_type = LLAMA_SWA_TYPE_NONE;
    return hp;
}
