"""Transfer for image runs with the existing commands: finetune (full / head-only / LoRA, class weights, a
test split), predict (class probabilities), embed, probe and transfer on prepared image directories
(``DIR`` / ``DIR@SPLIT``); the clinical metrics against scikit-learn; clear errors for images of another size
and for text given to an image run or images to a text run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import TINY_TRAIN, overrides, write_corpus

from pretrain.cli import main
from pretrain.data.images import write_prepared

pytest.importorskip("pretrain.models.vit", reason="the image architectures have not landed")

SIZE = 8
CLASSES = ["h0", "h1", "v0", "v1"]


def synthetic(n: int, seed: int, size: int = SIZE, classes: int = 4, p: list[float] | None = None):
    """(n, size, size, 1) uint8 images over noise, a bright bar in one of two rows (classes 0, 1) or columns
    (2, 3); ``p``: class frequencies."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, n, p=p)
    images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        if c < 2:
            images[i, 1 + h * c:3 + h * c, :, 0] = 230
        else:
            images[i, :, 1 + h * (c - 2):3 + h * (c - 2), 0] = 230
    return images, labels.astype(np.int64)


FAST = ["--epochs", "6", "--lr", "3e-3", "--batch-size", "16", "--patience", "0", "--dropout", "0",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny ViT pre-trained (MAE, a few steps) on 8x8 images; data with train / val / test splits."""
    root = tmp_path_factory.mktemp("ft_img")
    write_prepared(root / "data", {"train": synthetic(160, 0), "val": synthetic(48, 1),
                                   "test": synthetic(40, 2)}, CLASSES)
    train = {"train": {"batch_size": 16, "max_steps": 10, "lr": 2e-3, "warmup_steps": 2, "eval_interval": 0,
                       "plot": False, "threads": 1, "device": "cpu", "dtype": "fp32", "compile": False},
             "model": {"arch": "vit", "patch_size": 4, "d_model": 32, "n_layer": 2, "n_head": 2,
                       "decoder_layers": 1, "decoder_dim": 32, "decoder_heads": 2}}
    assert main(["train", "--out", str(root / "run"), "--objective", "mae", *overrides(train),
                 "--data.path", str(root / "data"), "--quiet"]) == 0
    return root


@pytest.mark.parametrize("mode", ["full", "head_only", "lora"])
def test_finetune_learns_and_predicts(images, tmp_path, mode, capsys):
    if mode == "lora":
        pytest.importorskip("peft")
    root = images
    extra = {"full": ["--layer-decay", "0.8"], "head_only": ["--head-only", "--lr", "1e-2", "--epochs", "15"],
             "lora": ["--lora", "--lora-r", "4", "--lr", "1e-2", "--epochs", "10"]}[mode]
    out = tmp_path / "ft"
    capsys.readouterr()
    assert main(["finetune", str(root / "run"), "--train", str(root / "data"), "--valid", str(root / "data"),
                 "--test", str(root / "data"), "--out", str(out), *FAST, *extra, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["best"]["val_accuracy"] >= 0.7, res["best"]  # 4 classes: chance is ~0.25
    assert {"val_accuracy", "val_balanced_accuracy", "val_macro_f1"} <= set(res["best"])
    assert "val_roc_auc" not in res["best"]  # four classes: no ROC-AUC
    head = 32 * 4 + 4
    if mode == "head_only":
        assert res["trained_params"] == head
    elif mode == "lora":
        assert head < res["trained_params"] < res["total_params"] / 2
    else:
        assert res["trained_params"] == res["total_params"]
    info = json.loads((out / "finetune.json").read_text())
    assert info["modality"] == "images" and info["labels"] == CLASSES and info["pooling"] == "cls"
    assert info["data"] == {"train": f"{root / 'data'}@train", "valid": f"{root / 'data'}@val"}
    assert info["valid_examples"] == 48 and info["test"] == res["test"] and "test_accuracy" in res["test"]
    assert not (out / "tokenizer.json").exists()
    # predict: class probabilities summing to 1, the true label when known; the saved model is the best one
    assert main(["predict", str(out), "--input", f"{root / 'data'}@val", "--out", str(tmp_path / "p.jsonl"),
                 "--json"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and [r["row"] for r in rows] == list(range(48))
    assert all(abs(sum(r[f"p_{c}"] for c in CLASSES) - 1) < 1e-4 for r in rows)
    acc = np.mean([r["prediction"] == r["label"] for r in rows])
    assert acc == pytest.approx(res["best"]["val_accuracy"], abs=1e-6)
    # a bare DIR is its test split for predict
    assert main(["predict", str(out), "--input", str(root / "data"), "--out", str(tmp_path / "t.csv"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 40


def test_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    from pretrain.finetune.metrics import compute_metrics, roc_auc

    rng = np.random.default_rng(0)
    gold = ["sick" if v else "well" for v in rng.random(200) < 0.15]  # imbalanced
    p_sick = np.clip(rng.random(200) * 0.6 + 0.4 * np.array([g == "sick" for g in gold]), 0, 1)
    p_sick = np.round(p_sick, 1)  # ties, as scores of small models have
    names = ["well", "sick"]  # the second class is the positive one
    probs = np.stack([1 - p_sick, p_sick], 1)
    pred = [names[i] for i in probs.argmax(1)]
    m = compute_metrics("classification", pred, gold, probs, names, "roc_auc")
    assert m["roc_auc"] == pytest.approx(roc_auc_score([g == "sick" for g in gold], p_sick))
    assert m["metric"] == m["roc_auc"]
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    # always the majority class: accuracy high, balanced accuracy 1/2
    m = compute_metrics("classification", ["well"] * 200, gold, np.tile([1.0, 0.0], (200, 1)), names,
                        "balanced_accuracy")
    assert m["accuracy"] > 0.8 and m["metric"] == m["balanced_accuracy"] == 0.5 and m["roc_auc"] == 0.5
    # one class only: ROC-AUC undefined (left out), selected it counts as chance
    assert roc_auc(np.array([0.1, 0.9]), np.array([True, True])) is None
    m = compute_metrics("classification", ["sick", "well"], ["sick", "sick"], [[0.2, 0.8], [0.6, 0.4]], names,
                        "roc_auc")
    assert "roc_auc" not in m and m["metric"] == 0.5
    # text stays as it was: no probabilities, no new keys
    assert set(compute_metrics("classification", pred, gold)) == {"metric", "accuracy", "macro_f1"}


def test_class_weights_change_the_loss(images, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import class_weights, finetune

    y = np.array([0] * 90 + [1] * 10)
    want = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    np.testing.assert_allclose(class_weights(y, 2).numpy(), want, rtol=1e-6)
    assert class_weights(np.array([0, 0, 2]), 3).tolist() == [0.75, 0.0, 1.5]  # a class absent: weight 0
    root = tmp_path
    write_prepared(root / "imb", {"train": synthetic(100, 5, classes=2, p=[0.9, 0.1]),
                                  "val": synthetic(40, 6, classes=2)}, ["a", "b"])
    base = FinetuneConfig(epochs=1, batch_size=20, device="cpu", dropout=0.0, lr=1e-3)
    args = (images / "run", root / "imb", root / "imb")
    plain = finetune(*args, root / "plain", base, quiet=True)
    weighted = finetune(*args, root / "weighted", dataclasses.replace(base, class_weights="auto"), quiet=True)
    assert plain["history"][0]["train_loss"] != pytest.approx(weighted["history"][0]["train_loss"], abs=1e-4)
    assert "val_roc_auc" in weighted["best"]  # two classes
    assert json.loads((root / "weighted" / "finetune.json").read_text())["config"]["class_weights"] == "auto"


def test_layer_decay_and_pooling(images):
    from pretrain.config import ConfigError, FinetuneConfig
    from pretrain.finetune.loop import param_groups
    from pretrain.finetune.model import ImageTaskModel, load_backbone

    backbone, pcfg, tok, _ = load_backbone(images / "run", 0.0, False, 0)
    assert tok is None and pcfg.model.decoder_layers == 0  # the encoder transfers, no MAE decoder
    model = ImageTaskModel(backbone, 4, "mean")
    groups = param_groups(model, FinetuneConfig(lr=1e-3, layer_decay=0.5, head_lr=5e-3), 2)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(model.classifier.weight)] == 5e-3
    assert lr_of[id(named["backbone.layers.1.mlp.fc1.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.layers.0.mlp.fc1.weight"])] == pytest.approx(5e-4)
    emb = next(p for n, p in named.items() if "embeddings" in n)
    assert lr_of[id(emb)] == pytest.approx(2.5e-4)
    x = torch.randn(3, 1, SIZE, SIZE)
    assert model(x).shape == (3, 4)
    with pytest.raises(ConfigError, match="roc_auc is for two classes"):
        from pretrain.finetune.loop import finetune

        finetune(images / "run", images / "data", images / "data", images / "x",
                 FinetuneConfig(metric="roc_auc"), quiet=True)


def test_embed_and_probe(images, tmp_path, capsys):
    root = images
    capsys.readouterr()
    for split, n in (("train", 160), ("test", 40)):
        assert main(["embed", str(root / "run"), "--input", f"{root / 'data'}@{split}", "--out",
                     str(tmp_path / f"{split}.npy"), "--pooling", "cls", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["rows"] == n and res["dim"] == 32 and np.load(tmp_path / f"{split}.npy").shape == (n, 32)
    # batch-invariant and row-aligned
    assert main(["embed", str(root / "run"), "--input", f"{root / 'data'}@test", "--out",
                 str(tmp_path / "b1.npy"), "--pooling", "cls", "--batch-size", "1"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b1.npy"), np.load(tmp_path / "test.npy"), atol=1e-5)
    assert main(["embed", str(root / "run"), "--input", str(root / "data"), "--out",
                 str(tmp_path / "e.parquet")]) == 0
    capsys.readouterr()
    assert main(["probe", str(root / "run"), "--train", str(root / "data"), "--valid", str(root / "data"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train_examples"] == 160 and res["valid_examples"] == 48 and res["valid"].endswith("@val")
    assert 0.25 < res["accuracy"] <= 1.0 and "balanced_accuracy" in res


def test_transfer_report_for_images(images, tmp_path, capsys):
    root = images
    capsys.readouterr()
    assert main(["transfer", str(root / "run"), "--train", str(root / "data"), "--valid",
                 f"{root / 'data'}@test", "--out", str(tmp_path / "rep"), "--budgets", "16,all", "--seeds",
                 "2", "--min-steps", "6", "--max-epochs", "2", "--batch-size", "16", "--metric",
                 "balanced_accuracy", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["verdict"].startswith("verdict: pre-training ")
    first, full = res["summary"]
    assert first["n"] == 16 and full["n"] == 160
    assert set(first["arms"]) == {"pretrained", "scratch", "pixels"} and set(first["gain"]) == {"pretrained"}
    assert first["arms"]["pretrained"]["seeds"] == 2 and full["arms"]["scratch"]["seeds"] == 1
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["modality"] == "images" and report["metric"] == "balanced accuracy"
    assert report["train"].endswith("@train") and report["valid"].endswith("@test")
    assert report["majority_baseline"] == pytest.approx(0.25)  # balanced accuracy of one class of four
    pixels = [r for r in report["results"] if r["arm"] == "pixels"]
    assert len(pixels) == 3 and all(r["C"] > 0 and "val_balanced_accuracy" in r for r in pixels)
    assert all(r["metric"] == r["val_balanced_accuracy"] for r in report["results"])
    assert set(report["recipes"]) == {"pretrained_n16", "scratch_n16", "pretrained_n160", "scratch_n160"}
    assert {t["pooling"] for t in report["recipes"]["pretrained_n16"]["trials"]} == {"cls", "mean"}
    # the text-only checks (tokens per byte, unknown tokens) do not run for images
    checks = report["verdict"]["checks"]["runs"]["pretrained"]
    assert set(checks) == {"loss_trend"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "image classification (balanced accuracy" in md and "logistic regression on raw pixels" in md
    assert "tokenizer" not in md and "tokens per byte" not in md and "Other metrics" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000


def test_size_mismatch_and_splits(images, tmp_path, capsys):
    root = images
    write_prepared(tmp_path / "big", {"train": synthetic(20, 3, size=16), "val": synthetic(8, 4, size=16)},
                   CLASSES)

    def err(*args) -> str:
        capsys.readouterr()
        assert main(list(args)) == 2
        return capsys.readouterr().err

    e = err("finetune", str(root / "run"), "--train", str(tmp_path / "big"), "--valid", str(tmp_path / "big"),
            "--out", str(tmp_path / "o"))
    assert "16x16" in e and "8x8" in e and "--image-size 8" in e
    e = err("embed", str(root / "run"), "--input", str(tmp_path / "big"), "--out", str(tmp_path / "e.npy"))
    assert "--image-size 8" in e
    e = err("finetune", str(root / "run"), "--train", str(root / "data"), "--valid", f"{root / 'data'}@dev",
            "--out", str(tmp_path / "o"))
    assert "no split 'dev'" in e and "test, train, val" in e
    # unlabelled images cannot be fine-tuned on
    write_prepared(tmp_path / "unl", {"train": (synthetic(20, 3)[0], None),
                                      "val": (synthetic(8, 4)[0], None)}, [])
    assert "has no labels" in err("finetune", str(root / "run"), "--train", str(tmp_path / "unl"), "--valid",
                                  str(tmp_path / "unl"), "--out", str(tmp_path / "o"))
    assert "task classification" in err("finetune", str(root / "run"), "--train", str(root / "data"),
                                        "--valid", str(root / "data"), "--out", str(tmp_path / "o"),
                                        "--task", "regression")

    from pretrain.features import image_data

    assert image_data(root / "data", "valid") == (root / "data", "val")
    assert image_data(f"{root / 'data'}@train", "test") == (root / "data", "train")
    assert image_data(root / "data", "input") == (root / "data", "test")  # it has a test split
    odd = tmp_path / "a@b"
    odd.mkdir()
    assert image_data(odd, "train") == (odd, "train")  # an existing folder with '@' in its name


def test_text_and_images_do_not_mix(images, tmp_path, capsys):
    """A text run refuses image directories, an image run text files: one clear error each."""
    root = images
    write_corpus(tmp_path / "corpus", n_docs=4)
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "tdata"), "--tokenizer", "char",
                 "--val-fraction", "0.3"]) == 0
    assert main(["train", "--out", str(tmp_path / "trun"), *overrides(TINY_TRAIN), "--data.path",
                 str(tmp_path / "tdata"), "--train.max_steps", "2", "--quiet"]) == 0
    rows = [{"text": f"some text {i}", "label": "ab"[i % 2]} for i in range(8)]
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def err(*args) -> str:
        capsys.readouterr()
        assert main(list(args)) == 2
        return capsys.readouterr().err

    data = str(root / "data")
    for cmd in (["finetune", str(tmp_path / "trun"), "--train", data, "--valid", data, "--out",
                 str(tmp_path / "o")],
                ["probe", str(tmp_path / "trun"), "--train", data, "--valid", data],
                ["embed", str(tmp_path / "trun"), "--input", data, "--out", str(tmp_path / "e.npy")]):
        assert "is a prepared image directory, but" in err(*cmd) and "is a text run" in err(*cmd)
    for cmd in (["finetune", str(root / "run"), "--train", str(text), "--valid", str(text), "--out",
                 str(tmp_path / "o")],
                ["probe", str(root / "run"), "--train", str(text), "--valid", str(text)],
                ["embed", str(root / "run"), "--input", str(text), "--out", str(tmp_path / "e.npy")],
                ["transfer", str(root / "run"), "--train", str(text), "--valid", str(text), "--out",
                 str(tmp_path / "r")]):
        e = err(*cmd)
        assert "is an image run" in e and "prepared image director" in e, e
    # a fine-tuned image model predicts images, not text
    assert main(["finetune", str(root / "run"), "--train", data, "--valid", data, "--out",
                 str(tmp_path / "ft"), "--epochs", "1", "--quiet"]) == 0
    assert "is an image model" in err("predict", str(tmp_path / "ft"), "--input", str(text), "--out",
                                      str(tmp_path / "p.jsonl"))


def test_resnet_backbone_fine_tunes(images, tmp_path, capsys):
    """A ResNet pre-trained with supervision: its classifier does not transfer; a new head on its globally
    pooled features learns the task (LoRA on its convolutions too)."""
    pytest.importorskip("pretrain.models.resnet", reason="the ResNet has not landed")
    root = images
    train = {"train": {"batch_size": 16, "max_steps": 6, "lr": 2e-3, "warmup_steps": 1, "eval_interval": 0,
                       "plot": False, "threads": 1, "device": "cpu", "dtype": "fp32", "compile": False},
             "model": {"arch": "resnet", "depths": "1,1", "widths": "8,16", "stem_width": 8}}
    assert main(["train", "--out", str(tmp_path / "run"), "--objective", "supervised", *overrides(train),
                 "--data.path", str(root / "data"), "--quiet"]) == 0
    from pretrain.finetune.model import load_backbone

    backbone, pcfg, _, _ = load_backbone(tmp_path / "run", 0.0, False, 0)
    assert pcfg.model.num_classes == 0 and backbone.feature_dim == 16
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "run"), "--train", str(root / "data"), "--valid",
                 str(root / "data"), "--out", str(tmp_path / "ft"), *FAST, "--lr", "1e-2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["best"]["val_accuracy"] >= 0.7, res["best"]
    pytest.importorskip("peft")
    assert main(["finetune", str(tmp_path / "run"), "--train", str(root / "data"), "--valid",
                 str(root / "data"), "--out", str(tmp_path / "lora"), *FAST, "--lora", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["trained_params"] < res["total_params"]
    assert main(["predict", str(tmp_path / "lora"), "--input", str(root / "data"), "--out",
                 str(tmp_path / "p.jsonl")]) == 0
