"""hybrid-lora: rank-flexible, continual LoRA fine-tuning of causal LMs (DyLoRA ordering + DC loss)."""
from .adapters import (build_model, count_trainable_params, flatten_lora_params, load_adapter,
                       lora_factors, rebuild_model_for_new_rank)
from .cl_results import cl_table, markdown_table, matched_gain_table, r_matrix
from .config import SEQUENCES, ExperimentConfig, from_preset
from .evaluate import evaluate_loss_and_token_acc
from .losses import domain_correlation_loss, ordering_regularizer
from .methods import METHODS
from .results import load_history, load_run_history, load_summary, method_table, metrics_table, run_dir
from .sweep_results import load_sweeps, rank_flex_table, rank_table
from .train import device_report, run_all, run_experiment, run_lambda_sweep

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "METHODS", "SEQUENCES", "build_model", "cl_table", "markdown_table",
           "matched_gain_table", "r_matrix",
           "run_lambda_sweep", "count_trainable_params", "device_report",
           "domain_correlation_loss", "evaluate_loss_and_token_acc", "flatten_lora_params",
           "from_preset", "load_adapter", "load_history", "load_run_history", "load_summary",
           "load_sweeps", "lora_factors", "method_table", "metrics_table", "ordering_regularizer",
           "rank_flex_table", "rank_table",
           "rebuild_model_for_new_rank", "run_all", "run_dir", "run_experiment"]
