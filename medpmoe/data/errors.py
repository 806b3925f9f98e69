"""The data error type, the report of skipped items, and the last line a user sees when data is bad."""

from __future__ import annotations

from dataclasses import dataclass, field

from medpmoe.files import shown


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


ON_ERROR = ("raise", "skip")
LISTED = 10  # problems spelled out in one message; the rest are counted


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The DataError inside an exception chain (monai wraps transform errors in RuntimeError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def reraise_data_error(exc: BaseException) -> None:
    """Raise the DataError found in exc's chain (so users see the file and problem), else re-raise exc."""
    err = find_data_error(exc)
    if err is not None and err is not exc:
        raise DataError(str(err)) from exc
    raise exc


def check_on_error(on_error: str) -> None:
    """Raise ValueError unless on_error is 'raise' or 'skip'."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def problems_message(problems: list[tuple[str, str]], what: str = "bad files", hint: str = "") -> str:
    """One line: 'file: problem' for a single problem, else 'N <what>: f1: p1; f2: p2; ... and M more'."""
    if len(problems) == 1 and not hint:
        return shown(f"{problems[0][0]}: {problems[0][1]}")
    listed = shown("; ".join(f"{f}: {p}" for f, p in problems[:LISTED]))
    more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
    return f"{len(problems)} {what}: {listed}{more}{hint}"


@dataclass
class DataReport:
    """Items kept and problems found (file, problem); `skipped` lists the files dropped; `notes` what is worth
    knowing about kept items."""

    items: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # kept items worth knowing about (e.g. grouped duplicates)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def add(self, file: str, problem: str, on_error: str | None = None) -> None:
        """Record a problem (the file is dropped); `raise_if_problems` turns them into one DataError."""
        self.problems.append((str(file), problem))
        self.skipped.append(str(file))

    def raise_if_problems(self, on_error: str = "raise", what: str = "problems") -> DataReport:
        """With on_error='raise', one DataError listing every problem (when there are any); returns self."""
        if on_error == "raise" and self.problems:
            raise DataError(problems_message(self.problems, what))
        return self

    def summary(self) -> str:
        """A human-readable summary listing every problem."""
        lines = [f"{len(self.items)} items kept, {len(self.problems)} problems"
                 + (f", {len(self.notes)} notes" if self.notes else "")]
        lines += [f"  {f}: {p}" for f, p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return shown("\n".join(lines))


def join_pool_workers(timeout: float = 60.0) -> None:
    """Wait for the worker threads of closed or terminated multiprocessing pools, which finish their running task
    before they stop. monai's CacheDataset fills its cache on a ThreadPool and re-raises the first error while the
    other workers still decode; an interpreter exiting under them aborts the process ("terminate called without an
    active exception", exit code 134)."""
    import gc
    import multiprocessing.pool as mpp
    import threading

    for obj in gc.get_objects():
        if issubclass(type(obj), mpp.Pool) and getattr(obj, "_state", mpp.RUN) != mpp.RUN:  # type(): no proxies
            for worker in getattr(obj, "_pool", []):
                if isinstance(worker, threading.Thread) and worker is not threading.current_thread():
                    worker.join(timeout)
