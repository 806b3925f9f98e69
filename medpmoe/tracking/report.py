"""What a training run shows at its end, all from its best checkpoint: `best_<metric>` and `best_epoch`, the figures,
the routing heatmap, the checkpoint itself and the servable MLflow model."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from medpmoe.report_step import reporting_step
from medpmoe.tracking.artifacts import checkpoint_title, log_figures, log_routing_heatmap, predict_items
from medpmoe.training.checkpoint import best_metrics

logger = logging.getLogger(__name__)


class BestCheckpointReport:
    """Called by `RunMLFlowHandler` (`report=`) when training completes, before the run is closed: loads the best
    checkpoint into `model` for the figures (the model's trained state is restored afterwards) and logs

    - metrics `best_epoch` and `best_<name>` for every validation metric of the best epoch (from the checkpoint's
      metadata, so right after a resume too), first: every later step that fails is a warning and is skipped;
    - `plots/`: overlays with per-image Dice, or confusion matrix and ROC; the pMoE routing heatmap and table;
    - `checkpoint/best.pt` and the files in `artifacts` (e.g. `parameters.json`);
    - the MLflow model (`log_model`): a pyfunc holding the checkpoint, see `medpmoe.tracking.pyfunc`.
    """

    def __init__(self, checkpoint: str | os.PathLike, model, loader: Iterable, metric_name: str, device="cpu",
                 amp: bool = False, artifacts: Sequence[str | os.PathLike] = (), log_model: bool = True,
                 num_examples: int = 4) -> None:
        self.checkpoint, self.model, self.loader, self.metric_name = Path(checkpoint), model, loader, metric_name
        self.device, self.amp, self.artifacts = device, amp, [Path(a) for a in artifacts]
        self.log_model, self.num_examples = log_model, num_examples

    def __call__(self, client, run_id: str) -> None:
        """Log everything listed in the class docstring to run `run_id`."""
        from mlflow.entities import Metric

        from medpmoe.tracking.pyfunc import log_prompt_model
        from medpmoe.training.checkpoint import read_prompt_checkpoint

        for path in self.artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        if not self.checkpoint.is_file():
            logger.warning("%s: no best checkpoint (no validation improved the key metric); nothing to report",
                           self.checkpoint)
            client.set_tag(run_id, "medpmoe.best_checkpoint", "none")
            return
        meta = read_prompt_checkpoint(self.checkpoint)["metadata"]
        epoch = int(meta.get("epoch") or 0)
        best = best_metrics(meta, self.metric_name)
        title = checkpoint_title(self.checkpoint, self.metric_name)
        model_id = None
        if self.log_model:  # the model carries the best metrics into the run (logged once, with the model's id)
            model_id = reporting_step("MLflow model", log_prompt_model, client, run_id, self.checkpoint, step=epoch,
                                      metrics=best)
        if model_id is None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in best.items()])
        client.set_tag(run_id, "medpmoe.best_checkpoint", title)
        reporting_step("upload of the best checkpoint", client.log_artifact, run_id, str(self.checkpoint),
                       "checkpoint")
        reporting_step("figures of the best checkpoint", self._figures, client, run_id, meta, title)
        if model_id is not None:
            client.set_tag(run_id, "medpmoe.model_uri", f"models:/{model_id}")
            print(f"MLflow model: models:/{model_id} ({title}; serve it with `mlflow models serve -m "
                  f"models:/{model_id} --env-manager local -h 127.0.0.1`, see docs/tracking.md)", flush=True)

    def _figures(self, client, run_id: str, meta: dict, title: str) -> None:
        """The best checkpoint's figures and routing heatmap (the model's trained state is restored afterwards)."""
        from medpmoe.training.checkpoint import load_prompt_checkpoint

        task, multi_label = meta.get("task", "segmentation"), bool(meta.get("multi_label"))
        trained = {k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()}
        try:
            load_prompt_checkpoint(self.checkpoint, self.model)
            limit = None if task == "classification" else self.num_examples
            items = predict_items(self.model, self.loader, self.device, self.amp, multi_label, limit)
            log_figures(client, run_id, items, task, meta.get("class_names"), multi_label, title, self.num_examples)
            if getattr(self.model, "dispatcher", None) is not None:
                reporting_step("routing heatmap", log_routing_heatmap, self.model, self.loader, run_id, self.device,
                               title=title, client=client)
        finally:
            self.model.load_state_dict(trained, strict=False)
