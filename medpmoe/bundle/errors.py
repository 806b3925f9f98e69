"""Errors that name the config key, and the last line of a failed bundle run: medpmoe's own error, not MONAI's wrapper.

MONAI wraps every error raised while a config is evaluated in `RuntimeError("Failed to evaluate ...")`, so the
traceback of a bad config would end with MONAI's line. `summary_note` adds the inner medpmoe error as a note on the
outer exception: Python prints notes after the exception line, so ours is the last line and nothing is dropped.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A bundle config value is unknown, of the wrong type or pointing nowhere; the message names the config key."""


def _raised_by_medpmoe(exc: BaseException) -> bool:
    if type(exc).__module__.split(".")[0] == "medpmoe":
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def medpmoe_cause(exc: BaseException) -> BaseException | None:
    """The innermost exception in `exc`'s chain, followed as Python prints it, that medpmoe code raised, or None."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _raised_by_medpmoe(exc):
            found = exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return found


def user_error(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the user's input is wrong (data, config, expert or checkpoint file, an
    output folder holding another run or in use, a learning rate that diverged), or None for anything else (a bug:
    keep its traceback)."""
    from medpmoe.data.errors import DataError
    from medpmoe.experts.checkpoints import ExpertCheckpointError
    from medpmoe.models.loading import ModelLoadError
    from medpmoe.training.checkpoint import CheckpointMismatchError
    from medpmoe.training.guards import NonFiniteLossError
    from medpmoe.training.run_identity import RunInProgressError, RunMismatchError

    cause = medpmoe_cause(exc) or exc
    kinds = (DataError, ConfigError, ExpertCheckpointError, ModelLoadError, CheckpointMismatchError, RunMismatchError,
             RunInProgressError, NonFiniteLossError)
    return cause if isinstance(cause, kinds) else None


def exit_on_user_error(exc: BaseException) -> None:
    """For command lines: a user error ends the process with its message alone (exit code 1, no traceback);
    return otherwise (the caller re-raises)."""
    cause = user_error(exc)
    if cause is not None:
        close_progress_bars()
        raise SystemExit(f"error: {_describe(cause)}") from None


def _describe(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
    from medpmoe.files import shown

    return shown(f"{type(exc).__qualname__}: {message}")


def summary_note(exc: BaseException) -> BaseException:
    """Add the wrapped medpmoe error of `exc` as its last note (once); return `exc`."""
    cause = medpmoe_cause(exc)
    if cause is not None and cause is not exc:
        note = _describe(cause)
        if note not in getattr(exc, "__notes__", []):
            exc.add_note(note)
    return exc


_previous_hook = sys.__excepthook__


def _excepthook(kind, exc, tb) -> None:
    from medpmoe.data.errors import join_pool_workers

    join_pool_workers()  # an interpreter exiting under MONAI's cache threads aborts (exit code 134)
    close_progress_bars()  # else a bar closed at exit prints below the error
    cause = user_error(exc)
    if cause is None or os.environ.get("MEDPMOE_TRACEBACK"):
        _previous_hook(kind, summary_note(exc), tb)
        return
    # a mistake in the user's input: its message alone on the console, the whole traceback kept in a file
    path = save_traceback("".join(traceback.format_exception(kind, summary_note(exc), tb)))
    where = f"the full traceback is in {path}" if path else "the traceback could not be saved"
    print(f"({where}; MEDPMOE_TRACEBACK=1 prints it here)", file=sys.stderr)
    print(_describe(cause), file=sys.stderr, flush=True)


#: how many traceback files `save_traceback` keeps (the newest)
KEPT_TRACEBACKS = 10


def traceback_dir() -> Path:
    """Where traceback files go: `errors/` in medpmoe's cache folder (`$MEDPMOE_CACHE_DIR`, else ~/.cache/medpmoe)."""
    from medpmoe.data.validation import default_cache_dir

    return default_cache_dir() / "errors"


def save_traceback(text: str) -> Path | None:
    """Write `text` to a new file in `traceback_dir()` and delete all but the newest `KEPT_TRACEBACKS` there (one
    bounded place, never the temp folder); its path, or None when it cannot be written."""
    folder = traceback_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=time.strftime("error-%Y%m%d-%H%M%S-"), suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        old = sorted(folder.glob("error-*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))[:-KEPT_TRACEBACKS]
        for p in old:
            p.unlink(missing_ok=True)
    except OSError:
        return None
    return Path(name)


def close_progress_bars() -> None:
    """Close every open tqdm bar (ignite's ProgressBar, CacheDataset's) so it prints now, above the traceback."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def install_excepthook() -> None:
    """Make uncaught exceptions of this process end with the wrapped medpmoe error (a DataError, a ConfigError, ...)
    as the last line, after the full traceback, and let cache worker threads finish first (exit code 1, never an
    abort). Idempotent; installed when `medpmoe.bundle` is imported."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook, sys.excepthook = sys.excepthook, _excepthook
