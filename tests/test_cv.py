"""Cross-validation splits: deterministic (also across processes), stratified, patient-grouped, duplicate-safe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medpmoe.cv import get_fold, load_folds, make_folds, save_folds
from medpmoe.data.datalist import write_datalist
from medpmoe.data.errors import DataError


def _items(n=103, classes=(0, 0, 0, 1, 1, 2), groups=None):
    rng = np.random.default_rng(0)
    labels = rng.choice(classes, n)
    items = [{"image": f"img/{i:04d}.png", "label": int(labels[i])} for i in range(n)]
    if groups:
        for i, it in enumerate(items):
            it["patient_id"] = f"p{i // groups}"
    return items


def _check_partition(folds, n):
    vals = [set(f["val_indices"]) for f in folds["folds"]]
    assert sorted(i for v in vals for i in v) == list(range(n))  # every item validated exactly once
    for f in folds["folds"]:
        assert set(f["train_indices"]).isdisjoint(f["val_indices"])
        assert len(f["train_indices"]) + len(f["val_indices"]) == n


def test_stratified_folds_deterministic_and_balanced():
    items = _items()
    a, b = make_folds(items, k=5, seed=7), make_folds(items, k=5, seed=7)
    assert a == b and a["method"] == "StratifiedKFold" and a["stratify"] == "label" and a["seed"] == 7
    _check_partition(a, len(items))
    for cls in {it["label"] for it in items}:
        counts = [sum(items[i]["label"] == cls for i in f["val_indices"]) for f in a["folds"]]
        assert max(counts) - min(counts) <= 1, (cls, counts)
    assert make_folds(items, k=5, seed=8)["folds"] != a["folds"]
    train, val = get_fold(a, 2)
    assert val == [items[i] for i in a["folds"][2]["val_indices"]] and len(train) + len(val) == len(items)
    with pytest.raises(IndexError):
        get_fold(a, 5)


def test_folds_identical_in_another_process(tmp_path):
    dl = write_datalist(tmp_path / "dl.json", _items(groups=3), ["a", "b", "c"], "classification")
    here = save_folds(make_folds(dl, k=5, seed=11), tmp_path / "here.json")
    code = ("import sys; from medpmoe.cv import make_folds, save_folds; "
            "save_folds(make_folds(sys.argv[1], k=5, seed=11), sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, str(dl), str(tmp_path / "there.json")], capture_output=True,
                       text=True, timeout=120, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert json.loads(here.read_text()) == json.loads((tmp_path / "there.json").read_text())


def test_patient_groups_never_in_two_folds():
    items = _items(n=120, groups=4)
    folds = make_folds(items, k=5, seed=0)
    assert folds["method"] == "StratifiedGroupKFold" and folds["group_key"] == "patient_id"
    _check_partition(folds, len(items))
    owner = {}
    for f in folds["folds"]:
        for it in f["val"]:
            assert owner.setdefault(it["patient_id"], f["fold"]) == f["fold"]
    plain = make_folds([{k: v for k, v in it.items() if k != "label"} for it in items], k=5)
    assert plain["method"] == "GroupKFold" and plain["stratify"] == "none"


def test_ham10000_lesions_grouped(shared_data, tmp_path):
    from medpmoe.data.converters import ham10000

    ham10000(shared_data / "ham10000_dev", tmp_path / "ham.json")
    folds = make_folds(tmp_path / "ham.json", k=5, seed=0)
    assert folds["n_items"] == 990 and folds["method"] == "StratifiedGroupKFold"
    lesions = [{it["patient_id"] for it in f["val"]} for f in folds["folds"]]
    assert sum(len(s) for s in lesions) == len(set().union(*lesions)) == 747
    # bundle contract: items stored as written in the datalist (paths relative to its folder)
    raw = json.loads((tmp_path / "ham.json").read_text())["training"]
    assert folds["folds"][0]["val"][0] in raw


def test_multilabel_stratification():
    rng = np.random.default_rng(1)
    items = [{"image": f"{i}.png", "label": [int(v) for v in rng.integers(0, 2, 14)]} for i in range(40)]
    with pytest.raises(DataError, match="fold 4 has no positive or no negative of 7 .* Largest feasible k: 4"):
        make_folds(items, k=5)  # some fold would hold no positive of label 7: its AUC would be undefined
    folds = make_folds(items, k=4)
    assert folds["stratify"] == "first_positive_label"  # 40 items cannot fill every combination 4 times
    _check_partition(folds, 40)
    combo = [{"image": f"{i}.png", "label": [i % 2, 1 - i % 2]} for i in range(40)]
    assert make_folds(combo, k=5)["stratify"] == "label_combination"


def _seg_set(root, n=30):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "msk").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        m = np.zeros((16, 16), np.uint8)
        if i % 3:  # every third mask empty, others of growing area
            m[: 1 + i % 8, : 1 + i % 5] = 255
        Image.fromarray(m).save(root / "msk" / f"{i}.png")
        items.append({"image": str(root / "img" / f"{i}.png"), "label": str(root / "msk" / f"{i}.png")})
    return write_datalist(root / "seg.json", items, ["background", "fg"], "segmentation")


def test_segmentation_stratified_on_mask_area(tmp_path):
    dl = _seg_set(tmp_path)
    folds = make_folds(dl, k=5, seed=0)
    assert folds["stratify"] == "mask_area" and folds == make_folds(dl, k=5, seed=0)
    empties = [sum(int(it["label"].split("/")[-1][:-4]) % 3 == 0 for it in f["val"]) for f in folds["folds"]]
    assert max(empties) - min(empties) <= 1 and sum(empties) == 10


def test_kvasir_folds(shared_data, tmp_path):
    from medpmoe.data.converters import kvasir_seg

    report = kvasir_seg(shared_data / "kvasir_seg_dev", tmp_path / "all.json")
    dl = write_datalist(tmp_path / "k.json", report.items[:40], ["background", "polyp"], "segmentation")
    folds = make_folds(dl, k=5, seed=0)
    assert [len(f["val"]) for f in folds["folds"]] == [8] * 5 and folds["stratify"] == "mask_area"


def test_duplicates_across_folds_rejected(tmp_path):
    dl = _seg_set(tmp_path, n=10)
    doc = json.loads(dl.read_text())
    shutil.copy(tmp_path / "img" / "0.png", tmp_path / "img" / "dup.png")
    doc["training"].append({"image": "img/dup.png", "label": "msk/0.png"})
    dl.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="dup.png: duplicate of .*0.png \\(same content\\) in folds"):
        make_folds(dl, k=5, seed=0)
    same_path = _items(n=10) + [_items(n=10)[0]]
    same_path[-1]["image"] = same_path[0]["image"]
    with pytest.raises(DataError, match="same path"):
        make_folds(same_path, k=5)
    for i, it in enumerate(doc["training"]):  # duplicates sharing a patient stay in one fold: accepted
        it["patient_id"] = "p0" if it["image"] in ("img/0.png", "img/dup.png") else f"p{i}"
    dl.write_text(json.dumps(doc))
    make_folds(dl, k=5, seed=0)


def test_save_load_atomic_and_checked(tmp_path):
    dl = write_datalist(tmp_path / "dl.json", _items(n=20), ["a", "b", "c"], "classification")
    folds = make_folds(dl, k=4, seed=2)
    path = save_folds(folds, tmp_path / "out" / "folds.json")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["folds.json"]
    loaded = load_folds(path, datalist=dl)
    assert loaded == json.loads(json.dumps(folds)) and len(loaded["datalist_hash"]) == 64
    assert {"seed", "k", "method", "datalist_hash", "folds"} <= set(loaded)
    write_datalist(tmp_path / "other.json", _items(n=21), ["a", "b", "c"], "classification")
    with pytest.raises(DataError, match="different datalist"):
        load_folds(path, datalist=tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"k": 5')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_folds(tmp_path / "broken.json")
    with pytest.raises(DataError, match="3 items cannot make 5 folds"):
        make_folds(_items(n=3), k=5)
    with pytest.raises(DataError, match="cannot make 5 folds"):  # 2 patients cannot fill 5 folds
        make_folds(_items(n=10, groups=5), k=5)
    with pytest.raises(DataError, match=r"Class counts: 0=1, 1=1, .* Largest feasible k: none"):
        make_folds([{"image": f"{i}.png", "label": i} for i in range(10)], k=5)  # every class smaller than k
    tiny = make_folds([{"image": f"{i}.png"} for i in range(10)], k=5)  # no labels: plain KFold
    assert tiny["method"] == "KFold" and tiny["stratify"] == "none"


def test_a_single_class_datalist_is_refused_before_training(tmp_path):
    items = [{"image": f"i{i}.png", "label": 1} for i in range(12)]
    with pytest.raises(DataError, match="every item is of class 1, so no fold's AUC is defined"):
        make_folds(items, k=2, seed=0)
