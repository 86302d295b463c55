"""Pre-training on images with the one loop: masked autoencoding (ViT) and supervised classification (ViT,
ResNet) learn on a tiny synthetic set, evaluate (loss, accuracy, the k-NN monitor, MAE's reconstruction
grid), resume exactly (after a clean stop and after SIGKILL), and train the same on 2 processes; a clear
error for what does not fit (a text model on images, supervised on unlabelled images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _corpus import kill_after, overrides

from pretrain.cli import main
from pretrain.data.images import write_prepared

SIZE, CLASSES = 8, 4


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8, 1) uint8 images of 4 classes over noise: a horizontal, vertical, diagonal or anti-diagonal
    line (what a crop keeps)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 60, (n, SIZE, SIZE, 1)).astype(np.uint8)
    ar = np.arange(SIZE)
    for i, c in enumerate(labels):
        k = rng.integers(2, SIZE - 2)
        rows, cols = [(np.full(SIZE, k), ar), (ar, np.full(SIZE, k)), (ar, ar), (ar, SIZE - 1 - ar)][c]
        images[i, rows, cols, 0] = 230
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("img") / "data"
    write_prepared(out, {"train": synthetic(96, 0), "val": synthetic(32, 1)}, ["h0", "h1", "v0", "v1"])
    return out


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("img_u") / "data"
    write_prepared(out, {"train": (synthetic(64, 2)[0], None), "val": (synthetic(16, 3)[0], None)}, [])
    return out


TRAIN = {"train": {"batch_size": 8, "max_steps": 20, "lr": 2e-3, "warmup_steps": 2, "eval_interval": 10,
                   "eval_batches": 2, "log_interval": 1, "ckpt_interval": 10, "plot": False, "threads": 1,
                   "device": "cpu", "dtype": "fp32", "compile": False},
         "image": {"knn_bank": 64, "crop_scale": 0.6}}
ARCHS = {
    "vit-mae": {"objective": "mae", "model": {"arch": "vit", "patch_size": 2, "d_model": 32, "n_layer": 2,
                                              "n_head": 2, "decoder_layers": 1, "decoder_dim": 32,
                                              "decoder_heads": 2}},
    "vit-supervised": {"objective": "supervised", "model": {"arch": "vit", "patch_size": 2, "d_model": 32,
                                                            "n_layer": 2, "n_head": 2}},
    "resnet-supervised": {"objective": "supervised", "model": {"arch": "resnet", "depths": "1,1",
                                                               "widths": "8,16", "stem_width": 8},
                          "lr": 3e-2},  # (BatchNorm nets take a higher learning rate)
}


def args_for(kind: str, data: Path, **extra) -> list[str]:
    spec = ARCHS[kind]
    lr = ["--train.lr", str(spec["lr"])] if "lr" in spec else []
    return ["--objective", spec["objective"], *overrides(TRAIN), *overrides({"model": spec["model"]}), *lr,
            "--data.path", str(data), "--quiet", *overrides(extra)]


def curve(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "steps repeated in metrics.jsonl"
    return {r["step"]: r for r in rows}


def losses(run: Path) -> dict[int, float]:
    return {s: r["train_loss"] for s, r in curve(run).items() if "train_loss" in r}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kind, labelled) -> Path:
    run = tmp_path_factory.mktemp(f"ref_{kind}") / "run"
    assert main(["train", "--out", str(run), *args_for(kind, labelled)]) == 0
    return run


def test_image_run_learns_and_evaluates(kind, reference):
    rows = curve(reference)
    first, last = rows[1]["train_loss"], rows[20]["train_loss"]
    assert last < first, (first, last)
    assert rows[20]["images"] == 20 * 8 and rows[20]["images_per_s"] > 0
    assert 0.0 <= rows[20]["val_knn_accuracy"] <= 1.0  # the monitor, on labelled data
    if ARCHS[kind]["objective"] == "supervised":
        assert rows[20]["val_accuracy"] > 1 / CLASSES + 0.1  # above chance after 20 steps
    else:
        grids = sorted(p.name for p in (reference / "reconstructions").iterdir())
        assert grids == ["step_000010.png", "step_000020.png"]  # one per evaluation
    assert not (reference / "tokenizer.json").exists()


def test_stop_and_resume_is_exact(tmp_path, kind, labelled, reference):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args_for(kind, labelled), "--train.stop_at_step", "7"]) == 0
    assert max(losses(run)) == 7
    assert main(["train", "--out", str(run), *args_for(kind, labelled)]) == 0
    assert losses(run) == losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vit-mae", "resnet-supervised"])
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, labelled, which):
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *args_for(which, labelled)]) == 0
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *args_for(which, labelled)]
    script = textwrap.dedent(f"""
        import sys, time
        from pretrain.objectives import image
        for cls in (image.MaskedAutoencoding, image.SupervisedClassification):
            def slow(self, model, prepared, _f=cls.loss_sum):
                time.sleep(0.05)
                return _f(self, model, prepared)
            cls.loss_sum = slow
        from pretrain.cli import main
        sys.exit(main({args!r}))
    """)
    kill_after(script, run / "checkpoints" / "step_000010" / "meta.json", 0.2,
               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert 10 <= max(losses(run)) < 20
    assert main(args) == 0
    assert losses(run) == losses(ref)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, labelled):
    ref, two = tmp_path / "ref", tmp_path / "two"
    common = args_for("vit-mae", labelled, train={"grad_accum": 2, "batch_size": 4})
    assert main(["train", "--out", str(ref), *common]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
           "pretrain", "train", "--out", str(two), *args_for("vit-mae", labelled, train={"batch_size": 4})]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = curve(ref), curve(two)
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("train_loss", "val_loss", "val_knn_accuracy"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], abs=2e-4), (step, key)


def test_mae_on_unlabelled_images_has_no_knn(tmp_path, unlabelled):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args_for("vit-mae", unlabelled, train={"max_steps": 10})]) == 0
    last = curve(run)[10]
    assert "val_loss" in last and "val_knn_accuracy" not in last


def test_pretrained_image_run_transfers_its_encoder(reference, kind):
    from pretrain.checkpoint import load_pretrained

    model, cfg, tok, _ = load_pretrained(reference)
    assert tok is None
    assert cfg.model.num_classes == 0 and cfg.model.decoder_layers == 0  # the part that transfers
    assert cfg.model.image_size == SIZE and cfg.model.channels == 1 and len(cfg.model.image_mean) == 1
    import torch

    feats = model.features(torch.zeros(3, 1, SIZE, SIZE), "cls")
    assert feats.shape == (3, model.feature_dim)


@pytest.mark.parametrize("args, message", [
    (["--model.arch", "gpt"], "reads text"),
    (["--objective", "mlm", "--model.arch", "bert"], "reads text"),
])
def test_text_models_refuse_image_data(tmp_path, labelled, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), "--data.path", str(labelled), *args,
                 "--train.max_steps", "1", "--quiet"]) != 0
    assert message in capsys.readouterr().err


def test_supervised_needs_labels(tmp_path, unlabelled, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *args_for("vit-supervised", unlabelled)]) != 0
    assert "needs labelled images" in capsys.readouterr().err


def test_image_size_must_match_the_data(tmp_path, labelled, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *args_for("vit-mae", labelled),
                 "--model.image_size", "16"]) != 0
    assert "does not match the data's 8" in capsys.readouterr().err


def test_export_then_init_from_continues_with_a_new_objective(tmp_path, labelled):
    """An MAE run exports as ViTMAEForPreTraining; `--init-from` that folder starts a supervised run whose
    encoder is the exported one (a new classification head), and an MAE run that continues with its
    decoder."""
    import torch
    from safetensors.torch import load_file

    mae = tmp_path / "mae"
    assert main(["train", "--out", str(mae), *args_for("vit-mae", labelled, train={"max_steps": 4})]) == 0
    assert main(["export", str(mae), "--out", str(tmp_path / "hf")]) == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["ViTMAEForPreTraining"]
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    for objective, out in (("supervised", "sup"), ("mae", "mae2")):
        assert main(["train", "--out", str(tmp_path / out), "--init-from", str(tmp_path / "hf"),
                     "--objective", objective, "--model.arch", "vit", *overrides(TRAIN), "--data.path",
                     str(labelled), "--quiet", "--train.max_steps", "2"]) == 0
    ours = load_file(str(next((mae / "checkpoints").glob("step_*")) / "model.safetensors"))
    from pretrain.checkpoint import load_pretrained

    sup, cfg, _, _ = load_pretrained(tmp_path / "sup", part="whole")
    assert cfg.model.num_classes == CLASSES and cfg.model.decoder_layers == 0
    mae2, cfg2, _, _ = load_pretrained(tmp_path / "mae2", part="whole")
    assert cfg2.model.decoder_layers == 1 and cfg2.model.image_mean == cfg.model.image_mean
    # 2 steps moved the weights a little from the export, not far: the encoder came from it
    key = "embeddings.patch_embeddings.projection.weight"
    for model in (sup, mae2):
        assert (model.state_dict()[key] - ours[key]).abs().max() < 0.05
    assert not torch.equal(sup.state_dict()[key], ours[key])
