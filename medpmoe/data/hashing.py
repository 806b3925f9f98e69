"""Content hashes and duplicate detection (no monai import, so fold splitting stays light)."""

from __future__ import annotations

import os
from pathlib import Path

from medpmoe.files import file_sha256


def find_duplicates(items: list[dict], key: str = "image", hasher=None) -> list[tuple[int, int, str]]:
    """(first index, duplicate index, reason) for items whose `key` file has the same path or same content
    (`hasher(path)`, default `medpmoe.files.file_sha256`)."""
    hasher = hasher or file_sha256
    seen_path: dict[str, int] = {}
    seen_hash: dict[str, int] = {}
    dups = []
    for i, it in enumerate(items):
        try:
            p = str(Path(it[key]).resolve())
        except (OSError, RuntimeError, ValueError):  # a symbolic link loop, an unreadable name: the checks say so
            p = os.path.abspath(str(it[key]))
        if p in seen_path:
            dups.append((seen_path[p], i, "same path"))
            continue
        seen_path[p] = i
        try:
            h = hasher(p) if Path(p).exists() else None
        except (OSError, ValueError):  # unreadable: the file checks list it
            h = None
        if h is None:
            continue
        if h in seen_hash:
            dups.append((seen_hash[h], i, "same content"))
        else:
            seen_hash[h] = i
    return dups
