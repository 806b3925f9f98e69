"""Splits that respect patients and official splits, folds that hold every class, imbalanced classification
(class weights, balanced sampler, balanced accuracy, per-class and never-silently-NaN macro AUC)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medpmoe.bundle import MacroAUC, balanced_sampler, class_weights, classification_loss, run_bundle, split_items
from medpmoe.bundle.metrics import ClassificationMetrics, macro_auc
from medpmoe.cv import make_folds
from medpmoe.data import DataError, write_datalist
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    """The HAM10000 dev set as a classification datalist (patient_id = lesion_id)."""
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    from medpmoe.data.converters import ham10000

    out = tmp_path_factory.mktemp("ham") / "ham.json"
    ham10000(SHARED_DATA / "ham10000_dev", out)
    return out


def test_default_split_groups_patients_and_holds_every_class(ham):
    train, val = split_items(str(ham), "train"), split_items(str(ham), "val")
    assert len(train) + len(val) == 990 and 0.15 < len(val) / 990 < 0.25
    assert not {it["patient_id"] for it in train} & {it["patient_id"] for it in val}  # no lesion on both sides
    assert set(Counter(it["label"] for it in val)) == set(range(7))
    assert split_items(str(ham), "val") == val  # seeded: the same split every time
    assert split_items(str(ham), "val", seed=1) != val


def test_cv_refuses_folds_without_every_class_and_names_the_largest_k(ham, tmp_path):
    doc = json.loads(ham.read_text())
    first = [dict(it, image=str(ham.parent / it["image"])) for it in doc["training"][:100]]
    small = write_datalist(tmp_path / "ham100.json", first, doc["classes"], "classification")
    with pytest.raises(DataError) as info:
        make_folds(small, k=5, seed=0)
    msg = str(info.value)
    assert "cannot make 5 folds whose validation folds each hold every class" in msg
    assert "Class counts (images/patients): akiec=" in msg and "df=" in msg
    k = int(msg.rsplit("Largest feasible k: ", 1)[1].split()[0]) if "feasible k: none" not in msg else None
    if k:  # the k it names works: every validation fold holds every class
        folds = make_folds(small, k=k, seed=0)
        labels = {it["label"] for it in json.loads(small.read_text())["training"]}
        assert all({it["label"] for it in f["val"]} == labels for f in folds["folds"])


def test_official_splits_are_honoured(shared_data, tmp_path, caplog):
    from medpmoe.data.convert import main

    real = np.load(shared_data / "pneumoniamnist_dev" / "pneumoniamnist_trainval.npz")
    labels = real["train_labels"][:, 0]
    both = np.r_[np.flatnonzero(labels == 0)[:6], np.flatnonzero(labels == 1)[:6]]
    np.savez(tmp_path / "pm.npz", train_images=real["train_images"][both], train_labels=real["train_labels"][both],
             val_images=np.r_[real["train_images"][both[:1]], real["val_images"][1:6]],  # val 0 repeats train 0
             val_labels=np.r_[real["train_labels"][both[:1]], real["val_labels"][1:6]],
             test_images=real["val_images"][6:14], test_labels=real["val_labels"][6:14])
    assert main(["pneumoniamnist", str(tmp_path / "pm.npz"), str(tmp_path / "pm.json")]) == 0  # task name -> layout
    doc = json.loads((tmp_path / "pm.json").read_text())
    assert doc["classes"] == ["normal", "pneumonia"]
    assert Counter(it["split"] for it in doc["training"]) == {"train": 12, "val": 6, "test": 8}
    dl = str(tmp_path / "pm.json")
    assert doc["training"][0]["patient_id"] == doc["training"][12]["patient_id"]  # identical images: one patient
    with caplog.at_level(logging.WARNING):
        val, test, train = split_items(dl, "val"), split_items(dl, "test"), split_items(dl, "train")
    assert "1 patient(s) in both the training and the validation items" in caplog.text  # official split: said
    assert caplog.text.count("in both") == 1 and doc["training"][0]["patient_id"] not in caplog.text  # once, no id
    assert [it["label"] for it in val] == [int(real["train_labels"][both[0], 0])] + real["val_labels"][1:6, 0].tolist()
    assert len(test) == 8 and len(train) == 12 and all(it["split"] == "train" for it in train)
    assert main(["medmnist", str(tmp_path / "pm.npz"), str(tmp_path / "t.json"), "--splits", "test"]) == 0
    assert {it["split"] for it in json.loads((tmp_path / "t.json").read_text())["training"]} == {"test"}
    one_class = [it for it in doc["training"] if it["split"] != "val" or it["label"] == 1]
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "training": one_class}))
    with pytest.raises(DataError, match="validation split has no image of normal, so its AUC would be undefined"):
        split_items(str(tmp_path / "bad.json"), "val")


def test_items_with_and_without_metadata_batch_together(tmp_path):
    from monai.data import list_data_collate
    from PIL import Image

    from medpmoe.data import classification_transforms

    rng = np.random.default_rng(0)
    for n in "ab":
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
    items = [{"image": str(tmp_path / "a.png"), "label": 0, "patient_id": "dup_a", "split": "train"},
             {"image": str(tmp_path / "b.png"), "label": 1}]  # patient_id on some items only (grouped duplicates)
    batch = list_data_collate([classification_transforms(8, True, 2)(it) for it in items])
    assert set(batch) == {"image", "label"} and batch["image"].shape == (2, 3, 8, 8)  # no identifier in batches


def test_class_weights_sampler_and_loss():
    items = [{"image": f"{i}.png", "label": int(i < 8)} for i in range(10)]  # 2 of class 0, 8 of class 1
    w = class_weights(items, 3)
    assert torch.allclose(w, torch.tensor([10 / (2 * 2), 10 / (2 * 8), 0.0]))  # absent class 2: weight 0
    loss = classification_loss(items, 3, class_balance="loss")
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and torch.equal(loss.weight, w)
    assert classification_loss(items, 3).weight is None
    sampler = balanced_sampler(items, 3, "sampler", seed=0)
    drawn = Counter(items[i]["label"] for _ in range(20) for i in sampler)
    assert 0.4 < drawn[0] / sum(drawn.values()) < 0.6  # both classes drawn about equally often
    assert balanced_sampler(items, 3, "none") is None
    multi = [{"image": "x", "label": [1, 0]}, {"image": "y", "label": [1, 1]}, {"image": "z", "label": [1, 0]}]
    assert torch.allclose(class_weights(multi, 2), torch.tensor([1.0, 2.0]))  # label 0 never negative: 1
    assert torch.equal(classification_loss(multi, 2, True, "loss").pos_weight, class_weights(multi, 2))
    with pytest.raises(ValueError, match="'class_balance'"):
        classification_loss(items, 3, class_balance="oversample")


def test_metrics_balanced_accuracy_per_class_auc_and_no_silent_nan(caplog):
    prob = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    truth = torch.tensor([0, 0, 0, 1, 1])  # class 2 absent from the labels
    onehot = torch.nn.functional.one_hot(truth, 3).float()
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, output=[{"pred": p, "label": y}
                                                                       for p, y in zip(prob, onehot)]))
    m = ClassificationMetrics(["a", "b", "c"])
    m.reset(), m.update(engine)
    with caplog.at_level(logging.WARNING):
        out = m.compute(engine)
    assert out["val_acc"] == pytest.approx(4 / 5) and out["val_balanced_acc"] == pytest.approx((1 + 0.5) / 2)
    assert out["val_auc_a"] == pytest.approx(1.0) and out["val_auc_b"] == pytest.approx(1.0)
    assert np.isnan(out["val_auc_c"]) and "undefined" in caplog.text and "'c'" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert macro_auc(prob.numpy(), onehot.numpy(), ["a", "b", "c"]) == pytest.approx(1.0)
    assert "macro average over 2 of 3 classes" in caplog.text
    with pytest.raises(DataError, match="holds a single class"):
        macro_auc(prob.numpy(), torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), 3).float().numpy())
    handler = MacroAUC(["a", "b", "c"])
    handler.reset()
    handler.update((list(prob), list(onehot)))
    assert handler.compute() == pytest.approx(1.0)


@pytest.mark.slow
def test_bundle_with_class_balance_and_the_new_metrics(tmp_path, monkeypatch):
    """The recipe's classification defaults (docs/data.md): class-weighted loss, MacroAUC key metric, balanced
    accuracy and per-class AUC."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("MEDPMOE_CACHE_DIR", str(tmp_path / "cache"))
    experts = [{"name": "tiny_a", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "seed": 0}]
    wf = run_bundle(str(REPO_ROOT / "bundles" / "medvtab_cls" / "train.json"), tracking=False,
                    output_dir=str(tmp_path / "out"), demo_root=str(tmp_path / "data"), demo_images=12, demo_size=32,
                    image_size=32, batch_size=4, num_epochs=1, moe=False, experts=experts)
    assert wf.parser.get_parsed_content("class_balance") == "loss"
    assert wf.parser.get_parsed_content("train#dataloader").sampler.__class__.__name__ != "WeightedRandomSampler"
    loss = wf.parser.get_parsed_content("loss")
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.weight is not None
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_auc", "val_acc", "val_balanced_acc", "val_auc_regular", "val_auc_irregular"} <= set(metrics)
    assert 0.0 <= metrics["val_auc"] <= 1.0
    assert (tmp_path / "out" / "checkpoints" / "best.pt").exists()
    split = json.loads((tmp_path / "out" / "split.json").read_text())  # the split, recorded for audits
    datalist = tmp_path / "data" / "classification_12x32px_seed0" / "datalist.json"  # the demo settings folder
    val = [os.path.relpath(it["image"], datalist.parent) for it in wf.parser.get_parsed_content("val_items")]
    assert split["val"] == val and len(val) > 0 and sorted(split["train"] + val) == sorted(
        it["image"] for it in json.loads(datalist.read_text())["training"])
