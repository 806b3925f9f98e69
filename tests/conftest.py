"""Shared pytest fixtures: tiny experts, images, and the location of the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `keywords`: a folder named gpu is one
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` beside the repository, or skip when it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def images() -> torch.Tensor:
    """A small batch of [0, 1] RGB images."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=g)
