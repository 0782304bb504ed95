"""``kvtool eval``: task accuracy against KV memory through the runtime (``run``), perplexity and KL fidelity
(``ppl``), their statistics (``stats``), resumable records (``records``) and the report (``report``).

Eval sits beside the runtime: it loads models through :mod:`toolchain.runtime` and problems from
:mod:`toolchain.tasks`; the runtime never imports it.
"""
from ..tasks import register_metrics
from .ppl import default_ppl_text, ppl_markdown, run_ppl
from .records import jsonl_path
from .report import markdown, plot_pareto
from .run import VARIANTS, Variant, machine_info, resolve_variants, run_eval, summarize
from .stats import REPEAT_MAX_PERIOD, REPEAT_TAIL, is_repetitive, wilson

__all__ = ["REPEAT_MAX_PERIOD", "REPEAT_TAIL", "VARIANTS", "Variant", "default_ppl_text", "is_repetitive",
           "jsonl_path", "machine_info", "markdown", "plot_pareto", "ppl_markdown", "register_metrics",
           "resolve_variants", "run_eval", "run_ppl", "summarize", "wilson"]
