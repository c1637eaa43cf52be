"""hybrid-lora: rank-flexible, continual LoRA fine-tuning of causal LMs (DyLoRA ordering + DC loss).

Names are imported on first use (PEP 562 `__getattr__`): `import hybrid_lora` and the command
line (`python -m hybrid_lora --help`) do not pay for torch and transformers until a name that
needs them is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "adapters": ("build_model", "count_trainable_params", "flatten_lora_params", "load_adapter",
                 "lora_factors", "rebuild_model_for_new_rank"),
    "allocation": ("save_allocated",),
    "analysis.allocation_results": ("allocation_markdown", "allocation_table", "per_input_table", "rank_maps"),
    "per_input": ("per_input_run",),
    "analysis.cl_results": ("cl_table", "matched_gain_table", "matched_per_seed", "r_matrix"),
    "analysis.markdown": ("markdown_table",),
    "config": ("SEQUENCES", "ExperimentConfig", "from_preset"),
    "evaluate": ("evaluate_loss_and_token_acc",),
    "losses": ("domain_correlation_loss", "ordering_regularizer"),
    "methods": ("METHODS",),
    "results": ("load_history", "load_run_history", "load_summary", "method_table", "metrics_table",
                "run_dir"),
    "analysis.sweep_results": ("load_sweeps", "rank_flex_table", "rank_sweep_table", "rank_table"),
    "analysis.rank_flex": ("rank_flex_benchmark",),
    "analysis.paper_results": ("paper_claims", "paper_table", "stage2_curve"),
    "train": ("device_report",),
    "runs": ("resweep", "run_experiment"),
    "grid": ("run_all", "run_lambda_sweep"),
    "export": ("export_run",),
    "hf_trainer": ("LossTerms", "reference_after", "regularized"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hybrid_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
