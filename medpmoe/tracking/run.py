"""MLflow runs whose state is true: `RunMLFlowHandler`, MONAI's MLFlowHandler with a run recorded in the output
folder.

- A training records its run in `<output_dir>/mlflow_run.json`; a resumed training (killed, or re-run with
  `--resume_changed`) continues that run: status RUNNING again, then FINISHED, one metric history (a step already
  logged is not logged again).
- The handler that closes the run (`close_on_complete=True`) ends it FINISHED after every other COMPLETED handler,
  FAILED when the engine raises (KILLED on KeyboardInterrupt); runs of this host whose process died (SIGKILL, power
  loss) and runs moved aside by `--fresh_start` are ended KILLED at the next start.
- Tags: the git commit as MLflow's source (`mlflow.source.git.commit`), the command as `mlflow.source.name`, the
  experiment as a model-training experiment (`mlflow.experimentKind`, so MLflow 3 opens its machine-learning view);
  an evaluation is linked to the training run it evaluated (`mlflow.parentRunId`: nested under it in the UI) and
  carries its parameters. The executed config is logged as `config/config.json`, the data as a dataset input.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from medpmoe.files import shown
from medpmoe.tracking.scrub import scrub_params

RUN_FILE = "mlflow_run.json"
#: MLflow 3's experiment kind for model training (the UI's "Machine learning" view, not GenAI's "Evaluations").
EXPERIMENT_KIND = "custom_model_development"
KIND_TAG = "mlflow.experimentKind"
PARENT_TAG = "mlflow.parentRunId"
_REPO = Path(__file__).resolve().parents[2]


def git_commit(path: str | Path = _REPO) -> str | None:
    """The full commit hash of the git checkout holding `path` (None outside one)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=path, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The running command as a user typed it (`python -m monai.bundle run training --config_file ...`)."""
    argv = list(sys.argv) or ["python"]
    head = argv[0]
    for module in ("monai.bundle", "medpmoe.crossval"):
        if head.endswith(module.replace(".", "/") + "/__main__.py"):
            head = f"python -m {module}"
    return shown(" ".join([head, *argv[1:]]))[:5000]


def source_tags() -> dict[str, str]:
    """MLflow's source tags: the program (the UI shows its last path part beside the git commit), LOCAL, the user
    and the git commit; the full command line as `medpmoe.command`."""
    import getpass

    command = command_line()
    words = command.split()
    if command.startswith("python -m "):  # `python -m monai.bundle run training`, `python -m medpmoe.crossval`
        program = " ".join(words[:5] if words[2] == "monai.bundle" else words[:3])
    else:
        program = Path(words[0]).name
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": program, "medpmoe.command": command}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def process_tags() -> dict[str, str]:
    """Where the run's process lives (host and pid), so a later start can tell a dead run from a live one."""
    return {"medpmoe.host": socket.gethostname(), "medpmoe.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def end_abandoned_runs(client, experiment_id: str, keep=(), run_files=()) -> list[str]:
    """End KILLED the RUNNING runs of this experiment that nothing will continue: those recorded in `run_files`
    (e.g. moved aside by a fresh start) and those whose process, on this host, is gone. Returns their ids."""
    ended = []
    recorded = {r["run_id"] for r in (read_run_file(f) for f in run_files) if r}
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        rid, tags = run.info.run_id, run.data.tags
        dead = tags.get("medpmoe.host") == host and tags.get("medpmoe.pid", "").isdigit() and \
            not _alive(int(tags["medpmoe.pid"]))
        if rid not in keep and (rid in recorded or dead):
            client.set_terminated(rid, "KILLED")
            ended.append(rid)
    return ended


def read_run_file(path: str | Path | None) -> dict | None:
    """{"run_id", "experiment_id", "tracking_uri"} recorded in a run file, or None."""
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_run_file(path: str | Path, run, tracking_uri: str | None) -> None:
    """Record `run` (an MLflow Run) in `path` atomically."""
    from medpmoe.files import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                        "run_name": run.info.run_name, "tracking_uri": tracking_uri}, indent=1))


def training_run_of(checkpoint: str | Path) -> str | None:
    """The MLflow run id of the training that wrote `checkpoint` (`<output_dir>/checkpoints/x.pt` beside
    `<output_dir>/mlflow_run.json`), or None."""
    rec = read_run_file(Path(checkpoint).expanduser().resolve().parent.parent / RUN_FILE)
    return rec["run_id"] if rec else None


def running_config() -> dict:
    """The config of the running bundle (files merged, `--key value` overrides and recipe macros applied), for
    `config/config.json`; call it from a `$` expression of that config. Empty outside a bundle."""
    from medpmoe.bundle.config_check import _running_parser

    parser = _running_parser()
    return json.loads(json.dumps(parser.get(), default=str)) if parser is not None else {}


def mark_experiment_kind(client, experiment) -> None:
    """Tag the experiment as model training (MLflow 3's machine-learning view) unless it has a kind already."""
    if KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, EXPERIMENT_KIND)


def last_steps(client, run_id: str) -> dict[str, int]:
    """{metric key: the highest step logged} of a run."""
    run = client.get_run(run_id)
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


class RunMLFlowHandler(MLFlowHandler):
    """MONAI's MLFlowHandler with true run states (see the module docstring).

    Args beyond MLFlowHandler's:
        run_file: where the run is recorded (training: `<output_dir>/mlflow_run.json`); the run recorded there is
            continued, else a new run is made and recorded. None: a new run each time (evaluation).
        parent_run_id: a run to nest this one under, whose parameters it also gets (an evaluation's training run;
            ignored when the run is not in this store).
        dataset, dataset_context: an MLflow dataset logged as the run's input (`medpmoe.tracking.datalist_dataset`).
        config: the executed config, logged as `config/config.json` (`medpmoe.tracking.running_config()`).
        report: called as `report(client, run_id)` when the engine completes, before the run is closed
            (`medpmoe.tracking.BestCheckpointReport` for training).
        tags: more run tags.
    Only the handler with `close_on_complete=True` sets the run's status and tags; another handler with the same
    `run_file` (the evaluator's during training) logs its metrics into the same run.
    """

    def __init__(self, *args, run_file: str | Path | None = None, parent_run_id: str | None = None, dataset=None,
                 dataset_context: str = "training", config: dict | None = None, report=None,
                 tags: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_file = Path(run_file) if run_file else None
        self.parent_run_id, self.dataset, self.dataset_context = parent_run_id, dataset, dataset_context
        self.config, self.report, self.tags = config, report, dict(tags or {})
        self.owner = bool(self.close_on_complete)
        self.continued = False
        self._last_step: dict[str, int] = {}

    def attach(self, engine) -> None:
        """Attach like MLFlowHandler; the owner also marks the run FAILED when the engine raises (attach it first
        so that it runs before StatsHandler re-raises) and closes the run after every other COMPLETED handler."""
        from ignite.engine import Events

        if self.owner and not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)
        self.close_on_complete = False  # registered at STARTED instead, after every other handler's
        try:
            super().attach(engine)
        finally:
            self.close_on_complete = self.owner

    def start(self, engine) -> None:
        """Open (continue or create) the run, then log parameters like MLFlowHandler."""
        from ignite.engine import Events

        if self.cur_run is None:
            self._set_experiment()
            self._open_run()
        super().start(engine)
        if self.owner and not engine.has_event_handler(self.close, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.close)

    def _open_run(self) -> None:
        client, exp = self.client, self.experiment
        run = None
        recorded = read_run_file(self.run_file) if self.run_file else None
        if recorded:
            try:
                run = client.get_run(recorded["run_id"])
            except Exception:  # recorded in another store, or deleted: a new run
                run = None
            if run is not None and (run.info.lifecycle_stage != "active" or run.info.experiment_id != exp.experiment_id):
                run = None
        self.continued = run is not None
        if run is None:
            name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
            run = client.create_run(exp.experiment_id, run_name=name)
            if self.run_file is not None and self.owner:
                write_run_file(self.run_file, run, client.tracking_uri)
        rid = run.info.run_id
        self._last_step = last_steps(client, rid) if self.continued else {}
        if self.owner:
            if run.info.status != "RUNNING":
                client.update_run(rid, status="RUNNING")
            mark_experiment_kind(client, exp)
            previous = sorted(self.run_file.parent.glob(f"previous_runs/*/{RUN_FILE}")) if self.run_file else []
            end_abandoned_runs(client, exp.experiment_id, keep={rid}, run_files=previous)
            tags = {**source_tags(), **process_tags(), **self.tags}
            if self._last_step:  # the run has history: this start resumes it
                tags["medpmoe.resumed"] = str(int(run.data.tags.get("medpmoe.resumed", "0")) + 1)
            self._link_parent(rid, tags)
            for k, v in tags.items():
                client.set_tag(rid, k, v)
            if self.dataset is not None:
                from medpmoe.tracking.dataset import log_dataset

                log_dataset(client, rid, self.dataset, self.dataset_context)
            if self.config:
                client.log_dict(rid, self.config, "config/config.json")
        self.cur_run = client.get_run(rid)

    def _link_parent(self, run_id: str, tags: dict) -> None:
        """Nest under `parent_run_id` and take its parameters (when that run is in this store)."""
        if not self.parent_run_id or self.parent_run_id == run_id:
            return
        try:
            parent = self.client.get_run(self.parent_run_id)
        except Exception:
            tags["medpmoe.training_run"] = f"{self.parent_run_id} (not in this store)"
            return
        tags[PARENT_TAG] = self.parent_run_id
        tags["medpmoe.training_run"] = self.parent_run_id
        self.cur_run = self.client.get_run(run_id)
        self._log_params(dict(parent.data.params))

    def _log_params(self, params: dict) -> None:
        """Log PHI-scrubbed parameters; ones already logged are skipped, and a changed value (a resume with
        changed settings) is recorded in the tag `medpmoe.changed_params` instead (MLflow parameters are
        immutable)."""
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        logged = self.client.get_run(self.cur_run.info.run_id).data.params
        values = {k: shown(v)[:6000] for k, v in scrub_params(params).items()}
        changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
        if changed:
            note = ", ".join(f"{k}: {logged[k]} -> {v}" for k, v in changed.items())
            self.client.set_tag(self.cur_run.info.run_id, "medpmoe.changed_params", note[:5000])
        new = {k: v for k, v in values.items() if k not in logged}
        if new:
            super()._log_params(new)

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log metrics, skipping a metric at a step it already has in a continued run (no duplicate steps)."""
        step = step or 0
        fresh = {k: v for k, v in flatten_dict(metrics).items() if step > self._last_step.get(k, -1)}
        if fresh:
            super()._log_metrics(fresh, step)

    def complete(self) -> None:
        """At COMPLETED: the `artifacts`, then the `report` (the run is still RUNNING)."""
        super().complete()
        if self.owner and self.report is not None and self.cur_run is not None:
            from medpmoe.report_step import reporting_step

            reporting_step("end-of-run report", self.report, self.client, self.cur_run.info.run_id)

    def failed(self, engine, e: BaseException) -> None:
        """At EXCEPTION_RAISED: end the run FAILED (KILLED on KeyboardInterrupt), then re-raise."""
        if self.cur_run is not None:
            self.client.set_terminated(self.cur_run.info.run_id,
                                       "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            self.cur_run = None
        raise e
