"""The embedded demo sets: one folder per generation settings under `demo_root`, so a run's demo data is never
rewritten by a command with other demo settings (not even one that is then refused)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medpmoe.bundle import datalist_or_demo, run_bundle
from medpmoe.training import RunMismatchError
from tests.conftest import REPO_ROOT
from tests.test_bundle_common import TINY

KVASIR = str(REPO_ROOT / "bundles" / "kvasir_seg" / "train.json")


def _digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_setting_has_its_own_folder_and_the_same_settings_reuse_it(tmp_path):
    a = datalist_or_demo(None, str(tmp_path), "polyp", demo_images=4, demo_size=16)
    before = _digests(tmp_path)
    b = datalist_or_demo(None, str(tmp_path), "polyp", demo_images=2, demo_size=16)
    c = datalist_or_demo(None, str(tmp_path), "lesion", demo_images=4, demo_size=16)
    assert a == str(tmp_path / "polyp_4x16px_seed0" / "datalist.json")
    assert len({a, b, c}) == 3 and len(json.loads(open(b).read())["training"]) == 2
    mtime = (tmp_path / "polyp_4x16px_seed0" / "images" / "synthetic_0000.png").stat().st_mtime_ns
    assert datalist_or_demo(None, str(tmp_path), "polyp", demo_images=4, demo_size=16) == a
    assert (tmp_path / "polyp_4x16px_seed0" / "images" / "synthetic_0000.png").stat().st_mtime_ns == mtime  # reused
    assert {k: v for k, v in _digests(tmp_path).items() if k in before} == before


def test_a_refused_rerun_with_other_demo_settings_leaves_the_finished_runs_data_as_it_was(tmp_path, monkeypatch,
                                                                                           capsys):
    """The user's case: the default demo_root (`<output_dir>/synthetic_data`), a finished run, then the same command
    with --demo_images 8: refused, and the finished run's datalist and images are byte-identical afterwards."""
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    kw = {**TINY, "output_dir": str(out)}
    run_bundle(KVASIR, tracking=False, **kw)
    split = json.loads((out / "split.json").read_text())
    data = Path(split["datalist"]).parent
    assert len(split["train"]) + len(split["val"]) == 12
    before = _digests(data)
    with pytest.raises(Exception) as err:
        run_bundle(KVASIR, tracking=False, **{**kw, "demo_images": 8})
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, RunMismatchError) and "data.datalist_sha256" in str(cause)
    assert _digests(data) == before
    capsys.readouterr()
    run_bundle(KVASIR, tracking=False, **kw)
    assert "already holds this run, finished with the same configuration" in capsys.readouterr().out
    assert _digests(data) == before
    assert data == out / "synthetic_data" / "polyp_12x32px_seed0"  # the documented place
