"""Model-file converters: kvtool keys into GGUF files (``gguf_budgets``) and Hugging Face dirs to GGUF (``hf_to_gguf``)."""
