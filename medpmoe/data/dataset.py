"""Datasets over datalists with optional in-memory or on-disk caching of the deterministic transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from monai.data import CacheDataset, Dataset, PersistentDataset

from medpmoe.data.errors import DataError, find_data_error, problems_message, reraise_data_error

CACHE_MODES = ("none", "memory", "disk")


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar (when tqdm is installed and `enabled`), else a no-op with the same `update`/`close`."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="item", mininterval=1.0)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Quiet()


class _Surface:
    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as e:
            reraise_data_error(e)


class DataDataset(_Surface, Dataset):
    """monai Dataset raising DataError (file + problem) rather than a wrapped RuntimeError."""


class DataCacheDataset(_Surface, CacheDataset):
    """monai CacheDataset (same arguments) whose cache filling reports every bad item in one DataError, and only
    after its worker threads have stopped.

    monai's own `_fill_cache` re-raises the first error while its ThreadPool workers are still decoding the next
    items; the interpreter then exits under them and the process aborts ("terminate called without an active
    exception", exit code 134) with the real error far up the log.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        problems: list[tuple[str, str]] = []
        out = []
        bar = _progress(len(indices), "caching", bool(self.progress))
        with ThreadPoolExecutor(max(1, int(self.num_workers or 1))) as pool:  # leaving the block joins the workers
            futures = [pool.submit(self._load_cache_item, i) for i in indices]
            for i, fut in zip(indices, futures):
                try:
                    out.append(fut.result())
                except Exception as e:
                    err = find_data_error(e)
                    if err is None:  # not a data problem: stop the queued items, let the running ones finish
                        for f in futures:
                            f.cancel()
                        raise
                    problems.append(_split_problem(str(err), self.data[i]))
                bar.update()
        bar.close()
        if problems:
            raise DataError(problems_message(problems, "bad items while caching the dataset"))
        return out


def _split_problem(message: str, item) -> tuple[str, str]:
    """(file, problem) from a 'file: problem' DataError message (the item's image when it has no file part)."""
    head, sep, rest = message.partition(": ")
    return (head, rest) if sep else (str(item.get("image", "?") if isinstance(item, dict) else item), message)


class DataPersistentDataset(_Surface, PersistentDataset):
    """monai PersistentDataset raising DataError (file + problem) rather than a wrapped RuntimeError."""


def make_dataset(datalist: Sequence[dict], transforms: Callable, cache: str = "none", cache_dir: str | None = None,
                 num_workers: int = 0) -> Dataset:
    """Dataset ('none'), CacheDataset ('memory') or PersistentDataset ('disk', needs cache_dir)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    data = list(datalist)
    if cache == "disk" and not cache_dir:
        raise ValueError("cache='disk' needs cache_dir")
    try:
        if cache == "memory":
            return DataCacheDataset(data, transforms, num_workers=num_workers, progress=False)
        if cache == "disk":
            return DataPersistentDataset(data, transforms, cache_dir=cache_dir)
        return DataDataset(data, transforms)
    except Exception as e:  # CacheDataset runs the transforms while building its cache
        reraise_data_error(e)
