"""k-fold cross-validation of a MONAI bundle: one in-process training run per fold, one MLflow run per fold under a
parent run, resume at fold granularity, mean ± std per metric.

CLI: `python -m medpmoe.crossval --config_file bundles/kvasir_seg/train.json --datalist D --output_dir O --k 5
[--key value ...]` (extra `--key value` pairs override bundle config keys, as with `monai.bundle run`).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from medpmoe.crossval.folds import load_folds, make_folds, save_folds
from medpmoe.files import atomic_write_text

STATE_FILE = "cv_state.json"
RESULTS_FILE = "cv_results.json"


def cv_tracking_uri(output_dir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else one sqlite store shared by every fold at `output_dir/mlruns.db`."""
    from medpmoe.bundle.reporting import tracking_uri

    return tracking_uri(output_dir)


def folds_for(datalist: str | Path, output_dir: str | Path, k: int = 5, seed: int = 0) -> Path:
    """Make (or reuse, after checking it matches the datalist, k and seed) `output_dir/folds.json`."""
    path = Path(output_dir) / "folds.json"
    if path.is_file():
        folds = load_folds(path, datalist)
        if folds["k"] != k or folds["seed"] != seed:
            raise ValueError(f"{path}: made with k={folds['k']}, seed={folds['seed']}; asked for k={k}, seed={seed} "
                             "(use another output_dir or delete the folds file)")
        return path
    return save_folds(make_folds(datalist, k=k, seed=seed), path)


def _config_value(config_file, key: str, overrides: dict, default=None):
    """A plain config value after overrides (parsed without instantiating anything)."""
    if key in overrides:
        return overrides[key]
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides)  # e.g. an experiment name made from --task_name
    return parser.get_parsed_content(key) if key in parser else default


#: Fold results that are bookkeeping, not validation metrics: kept in the per-fold table, not in the parent's metrics.
BOOKKEEPING = ("epochs", "iterations", "best_epoch")


class _Tracker:
    """The parent MLflow run of one cross-validation (kept in `cv_state.json` so a resumed CV with the same
    settings reuses it; other settings or `new_parent` start another) and its fold runs (each recorded in
    `fold_<i>/mlflow_run.json`, which the fold's training continues)."""

    def __init__(self, output_dir: Path, experiment_name: str, params: dict, new_parent: bool = False) -> None:
        import mlflow

        from medpmoe.tracking.run import end_abandoned_runs, mark_experiment_kind, process_tags, source_tags

        self.uri = cv_tracking_uri(output_dir)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        art = None
        if self.uri.startswith("sqlite:///"):
            art = (Path(unquote(self.uri[len("sqlite:///"):])).parent / "mlruns").resolve().as_uri()
        self.exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment_name,
                                                                                  artifact_location=art)
        mark_experiment_kind(self.client, self.client.get_experiment(self.exp_id))
        state_path = output_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        params = json.loads(json.dumps(params, default=str))
        run = None
        if state.get("parent_run_id") and not new_parent and state.get("params", params) == params:
            try:
                run = self.client.get_run(state["parent_run_id"])
                run = None if run.info.lifecycle_stage != "active" else run
            except Exception:  # the store was deleted or moved: start a new parent
                run = None
        tags = {**source_tags(), **process_tags()}
        if run is None:
            name = f"cv_{time.strftime('%Y%m%d_%H%M%S')}"
            run = self.client.create_run(self.exp_id, run_name=name, tags={"medpmoe.cv": "parent", **tags})
            from medpmoe.tracking.scrub import scrub_params  # here: fold splitting must not need MLflow

            self.client.log_batch(run.info.run_id, params=_mlflow_params(scrub_params(params)))
            atomic_write_text(state_path, json.dumps({"parent_run_id": run.info.run_id, "tracking_uri": self.uri,
                                                      "params": params}))
        else:  # a resumed cross-validation continues its parent run
            self.client.update_run(run.info.run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run.info.run_id, k, v)
        self.parent_id, self.parent_name = run.info.run_id, run.info.run_name
        end_abandoned_runs(self.client, self.exp_id, keep={self.parent_id})

    def fold_run(self, fold: int, fold_dir: Path):
        """The fold's run, nested under the parent: the one recorded in `fold_dir/mlflow_run.json` (a fold killed
        earlier is continued), else a new one recorded there; the fold's training logs into it."""
        from medpmoe.tracking.run import RUN_FILE, process_tags, read_run_file, write_run_file

        recorded = read_run_file(fold_dir / RUN_FILE)
        if recorded:
            try:
                run = self.client.get_run(recorded["run_id"])
                if run.info.lifecycle_stage == "active" and run.data.tags.get("mlflow.parentRunId") == self.parent_id:
                    return run
            except Exception:  # recorded in another store: a new run
                pass
        tags = {"mlflow.parentRunId": self.parent_id, "medpmoe.cv": "fold", "fold": str(fold), **process_tags()}
        run = self.client.create_run(self.exp_id, run_name=f"{self.parent_name}_fold_{fold}", tags=tags)
        write_run_file(fold_dir / RUN_FILE, run, self.uri)
        return run

    def ended(self, run_id: str, error: BaseException) -> None:
        """A fold raised: end its run and the parent FAILED (KILLED on KeyboardInterrupt)."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for rid in (run_id, self.parent_id):
            if self.client.get_run(rid).info.status == "RUNNING":
                self.client.set_terminated(rid, status)

    def dataset(self, datalist, folds_file: Path, fold_of_items: list[list[dict]]) -> None:
        """The datalist as the parent's dataset input, with the validation items per fold."""
        from medpmoe.tracking.dataset import datalist_dataset, log_dataset

        splits = {f"fold {i} val": items for i, items in enumerate(fold_of_items)}
        log_dataset(self.client, self.parent_id, datalist_dataset(datalist, splits, folds_file=folds_file), "training")

    def summary(self, summary: dict, results: dict, folds: dict, fold_results: list[dict], run_ids: list) -> None:
        """Log `<metric>_mean` / `<metric>_std` of every validation metric to the parent run, attach the folds
        file (patient identifiers removed), the per-fold results and cv_results.json, and close it."""
        from mlflow.entities import Metric

        from medpmoe.tracking.scrub import scrub

        now = int(time.time() * 1000)
        metrics = [Metric(f"{m}_{s}", v[s], now, 0) for m, v in summary.items() for s in ("mean", "std")
                   if m not in BOOKKEEPING and math.isfinite(v[s])]
        self.client.log_batch(self.parent_id, metrics=metrics)
        self.client.log_dict(self.parent_id, scrub(folds), "cv/folds.json")
        self.client.log_dict(self.parent_id, scrub(results), "cv/cv_results.json")
        keys = list(dict.fromkeys(k for r in fold_results for k in r))
        rows = ["fold,run_id," + ",".join(keys)]
        for i, (r, rid) in enumerate(zip(fold_results, run_ids)):
            rows.append(f"{i},{rid or ''}," + ",".join(str(r.get(k, "")) for k in keys))
        self.client.log_text(self.parent_id, "\n".join(rows) + "\n", "cv/fold_results.csv")
        self.client.log_text(self.parent_id, format_table(summary) + "\n", "cv/summary.txt")
        self.client.set_terminated(self.parent_id)


def _mlflow_params(params: dict) -> list:
    from mlflow.entities import Param

    return [Param(str(k).replace("::", ".").replace("#", "."), str(v)[:6000]) for k, v in params.items()]  # nested ids


def summarise(fold_results: list[dict]) -> dict:
    """{metric: {"mean", "std", "values"}} over folds for every numeric metric (std with ddof=1)."""
    keys = [k for k, v in fold_results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in fold_results if k in r])
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                  "values": vals.tolist()}
    return out


def format_table(summary: dict) -> str:
    """A plain-text table: metric, mean ± std, per-fold values."""
    lines = [f"{'metric':<24} {'mean ± std':<20} per fold"]
    for k, v in summary.items():
        lines.append(f"{k:<24} {v['mean']:.4f} ± {v['std']:.4f}    " + ", ".join(f"{x:.4f}" for x in v["values"]))
    return "\n".join(lines)


def _fold_finished(config_file, overrides: dict, resume: bool) -> bool:
    """Whether the fold's folder holds a finished run of exactly this configuration, by the bundle's own check
    (`medpmoe.bundle.output_state`): another configuration raises RunMismatchError naming the keys; `fresh_start`
    (or no `resume`, for a finished fold) moves the earlier run's files to `previous_runs/` first."""
    from medpmoe.bundle.workflow import output_state
    from medpmoe.training.run_identity import IDENTITY_FILE

    out = Path(overrides["output_dir"])
    if not (out / IDENTITY_FILE).is_file():  # never started
        return False
    if not resume and (out / "results.json").is_file():
        overrides = {**overrides, "fresh_start": True}
    return output_state(config_file, **overrides).finished


def run_fold(config_file, overrides: dict) -> None:
    """Run one bundle training workflow in-process (initialize, run, finalize) with config overrides."""
    from medpmoe.bundle.workflow import run_bundle

    run_bundle(config_file, **overrides)  # finalize (only after a complete run) writes results.json: the fold is done


def run_cross_validation(config_file, datalist: str | Path, output_dir: str | Path, k: int = 5, seed: int = 0,
                         overrides: dict | None = None, resume: bool = True) -> dict:
    """Train the bundle on each of k folds, track one MLflow run per fold under a parent run, and write
    `output_dir/cv_results.json` with mean ± std per metric.

    A fold that already holds a finished run of exactly this configuration is skipped (with `resume`; else it is
    trained again, its earlier files moved to `previous_runs/`); one holding a run of other settings stops the
    cross-validation with the differing keys (`fresh_start=True` in `overrides` retrains every fold)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    folds_file = folds_for(datalist, output_dir, k, seed)
    experiment = _config_value(config_file, "experiment_name", overrides, "medpmoe_cv")
    params = {"config_file": str(config_file), "datalist": str(datalist), "k": k, "seed": seed,
              **{key: v for key, v in overrides.items() if key not in ("fresh_start", "resume_changed")}}
    from medpmoe.tracking.run import RUN_FILE, read_run_file

    fold_dirs = [output_dir / f"fold_{i}" for i in range(k)]
    fold_overrides = [{**overrides, "datalist": str(datalist), "folds_file": str(folds_file), "fold": i,
                       "output_dir": str(fold_dir)} for i, fold_dir in enumerate(fold_dirs)]
    finished = [_fold_finished(config_file, o, resume) for o in fold_overrides]  # all decided before any tracking
    tracker = _Tracker(output_dir, experiment, params, new_parent=bool(overrides.get("fresh_start")) or not resume)
    folds = load_folds(folds_file)
    tracker.dataset(datalist, folds_file, [f["val"] for f in folds["folds"]])
    fold_results, run_ids = [], []
    for i, fold_dir in enumerate(fold_dirs):
        res_path = fold_dir / "results.json"
        if finished[i]:
            print(f"[fold {i + 1}/{k}] done already with these settings, skipped ({res_path})", flush=True)
            fold_results.append(json.loads(res_path.read_text()))
            run_ids.append((read_run_file(fold_dir / RUN_FILE) or {}).get("run_id"))
            continue
        print(f"[fold {i + 1}/{k}] training -> {fold_dir}", flush=True)
        t0 = time.time()
        run = tracker.fold_run(i, fold_dir)
        try:
            run_fold(config_file, {**fold_overrides[i], "fresh_start": False, "run_name": run.info.run_name,
                                   "tracking_uri": tracker.uri})
        except BaseException as err:
            tracker.ended(run.info.run_id, err)
            raise
        if not res_path.is_file():
            raise RuntimeError(f"fold {i}: the bundle wrote no {res_path} (does its finalize call final_report?)")
        fold_results.append(json.loads(res_path.read_text()))
        run_ids.append(run.info.run_id)
        brief = ", ".join(f"{m}={v:.4f}" for m, v in fold_results[-1].items() if isinstance(v, float))
        print(f"[fold {i + 1}/{k}] finished in {time.time() - t0:.0f} s: {brief}", flush=True)
    summary = summarise(fold_results)
    results = {"k": k, "seed": seed, "folds_file": str(folds_file), "parent_run_id": tracker.parent_id,
               "tracking_uri": tracker.uri, "folds": fold_results, "fold_run_ids": run_ids, "summary": summary}
    atomic_write_text(output_dir / RESULTS_FILE, json.dumps(results, indent=1))
    tracker.summary(summary, results, folds, fold_results, run_ids)
    print(format_table(summary), flush=True)
    return results


def all_background_miou(datalist, folds_file, fold: int, image_size: int = 64, threshold: float = 128) -> float:
    """mIoU (background included, as the kvasir_seg bundle reports it) of predicting all background on a fold's
    val items, with the bundle's own preprocessing (threshold, nearest resize): the floor a model must beat."""
    import torch
    from monai.metrics import MeanIoU

    from medpmoe.bundle import split_items
    from medpmoe.data import segmentation_transforms

    load = segmentation_transforms(image_size, train=False, num_classes=2, mask_threshold=threshold)
    metric = MeanIoU(include_background=True)
    for item in split_items(str(datalist), "val", folds_file=str(folds_file), fold=fold):
        y = load(item)["label"].long()
        y1h = torch.cat([1 - y, y]).unsqueeze(0).float()
        pred = torch.zeros_like(y1h)
        pred[:, 0] = 1
        metric(pred, y1h)
    return float(metric.aggregate())


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config_files(text: str) -> str | list[str]:
    """One config path, or several as `monai.bundle run` takes them ("['a.json','b.json']" or "a.json,b.json")."""
    value = _value(text)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return text.split(",") if "," in text and not Path(text).is_file() else text


def main(argv: list[str] | None = None) -> dict:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m medpmoe.crossval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_resume", action="store_true",
                   help="retrain folds that already have results.json (their files are moved to previous_runs/)")
    args, extra = p.parse_known_args(argv)
    if len(extra) % 2 or not all(a.startswith("--") for a in extra[::2]):
        p.error(f"overrides must be '--key value' pairs, got {extra}")
    overrides = {a[2:]: _value(v) for a, v in zip(extra[::2], extra[1::2])}
    try:
        return run_cross_validation(_config_files(args.config_file), args.datalist, args.output_dir, args.k,
                                    args.seed, overrides, resume=not args.no_resume)
    except Exception as err:
        from medpmoe.bundle.errors import exit_on_user_error

        exit_on_user_error(err)
        raise


if __name__ == "__main__":
    main()
