"""Files written whole or not at all, and content hashes: the one writer and the one hash every module uses.

A reader (a resumed run, MLflow, a viewer, another rank) never sees a half-written checkpoint, result, datalist,
figure or mask: `atomic_write` writes a temporary file in the target's folder, flushes it to disk and moves it into
place with `os.replace`; on any failure the temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object] | Callable[[str], object],
                 to_path: bool = False) -> Path:
    """Create `path` atomically: `write(file)` fills an open binary file, or with `to_path=True`
    `write(temporary_path)` writes one itself (matplotlib, MONAI writers, torch.export); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    try:
        if to_path:
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` to `path` atomically (checkpoints: a killed run never leaves a truncated file)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, or of a folder's files' bytes in name order (a DICOM series)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def shown(text: object) -> str:
    """`text` (a path or a message naming one) safe to print, write or draw: bytes of a file name that are not valid
    UTF-8 (`caf\\xe9_1.jpg`, as older Windows and scanner exports write; Python holds them as lone surrogates) are
    spelled as `\\xe9` escapes, so no stream, font or database rejects the text."""
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (a hand-written datalist)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
