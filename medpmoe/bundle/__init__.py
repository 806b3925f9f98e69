"""Glue that MONAI bundle configs call through `_target_` / `$` expressions."""

from medpmoe.bundle.config_check import bundle_root, check_config, check_parser
from medpmoe.bundle.data import (
    balanced_sampler, chain, check_data, class_weights, classification_loss, datalist_or_demo, eval_items, split_items,
    task_info, write_split,
)
from medpmoe.bundle.distributed import (
    distributed_sampler, init_distributed, is_main_process, rank_zero_first, shutdown_distributed,
)
from medpmoe.bundle.errors import ConfigError
from medpmoe.bundle.metrics import ClassificationMetrics, MacroAUC, prefixed, write_metrics
from medpmoe.bundle.progress import LossProgressBar
from medpmoe.bundle.reporting import final_report, run_params, start_report, tracking_uri
from medpmoe.bundle.workflow import (drop_tracking, load_checkpoint, model_from_checkpoint, output_state,
                                     run_bundle)

__all__ = [
    "ClassificationMetrics", "ConfigError", "LossProgressBar", "MacroAUC", "balanced_sampler", "bundle_root", "chain",
    "check_config", "check_data", "check_parser", "class_weights", "classification_loss", "datalist_or_demo",
    "distributed_sampler", "drop_tracking", "eval_items", "final_report", "init_distributed", "is_main_process",
    "load_checkpoint", "model_from_checkpoint", "output_state", "prefixed", "rank_zero_first", "run_bundle",
    "run_params", "shutdown_distributed", "split_items", "start_report", "task_info", "tracking_uri", "write_metrics",
    "write_split",
]
