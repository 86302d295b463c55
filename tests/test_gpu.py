"""On a CUDA device (marked ``gpu``, skipped without one): the defaults there — bf16 autocast, torch.compile,
fused optimizers, pinned-memory prefetch — train, log MFU, resume exactly, and every downstream command
(eval, generate, fill-mask, finetune, predict, embed, export) runs on the GPU and agrees with the CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import TINY_TRAIN, overrides, write_corpus

from pretrain.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# device/dtype/compile left at their defaults (auto: cuda, bf16, compiled)
TRAIN = overrides({**TINY_TRAIN, "train": {**TINY_TRAIN["train"], "max_steps": 40, "log_interval": 5}})
MLM = ["--objective", "mlm", "--model.arch", "bert"]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def out_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module", params=["clm", "mlm"])
def gpu_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gpu_{request.param}")
    write_corpus(root / "corpus", n_docs=8)
    tok = (["--tokenizer", "char"] if request.param == "clm"
           else ["--tokenizer", "wordpiece", "--vocab-size", "300"])
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), *tok,
                 "--val-fraction", "0.2"]) == 0
    extra = MLM if request.param == "mlm" else []
    args = [*TRAIN, *extra, "--data.path", str(root / "data"), "--quiet"]
    assert main(["train", "--out", str(root / "run"), *args]) == 0
    return request.param, root, args


def test_defaults_train_in_bf16_compiled_and_log_mfu(gpu_run):
    objective, root, _ = gpu_run
    cfg = (root / "run" / "config.yaml").read_text()
    assert "compile: auto" in cfg and "dtype: auto" in cfg
    log = rows(root / "run")
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 4 and all(math.isfinite(v) for v in vals) and vals[-1] < vals[0], vals
    train = [r for r in log if "train_loss" in r]
    from pretrain.hardware import peak_flops

    if peak_flops(torch.device("cuda")):
        assert all(0 < r["mfu"] < 1 for r in train), [r.get("mfu") for r in train]


def test_resume_continues_the_same_curve(gpu_run, tmp_path):
    _, root, args = gpu_run
    part = tmp_path / "part"
    assert main(["train", "--out", str(part), *args, "--train.stop_at_step", "20"]) == 0
    assert main(["train", "--out", str(part), *args]) == 0
    a = {r["step"]: r for r in rows(root / "run")}
    b = {r["step"]: r for r in rows(part)}
    assert sorted(a) == sorted(b)
    for step in a:  # compiled bf16 kernels: the same math, not bit-identical across processes
        if "val_loss" in a[step]:
            assert b[step]["val_loss"] == pytest.approx(a[step]["val_loss"], abs=0.05), step


def test_eval_on_gpu_matches_cpu(gpu_run, capsys):
    _, root, _ = gpu_run
    capsys.readouterr()
    res = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", str(root / "run"), "--device", device, "--json"]) == 0
        res[device] = out_json(capsys)
    assert res["cuda"]["loss"] == pytest.approx(res["cpu"]["loss"], abs=0.05)  # bf16 vs fp32


def test_use_the_model_on_gpu(gpu_run, tmp_path, capsys):
    objective, root, _ = gpu_run
    run = root / "run"
    capsys.readouterr()
    if objective == "clm":
        assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "20", "--device", "cuda",
                     "--json"]) == 0
    else:
        assert main(["fill-mask", str(run), "the [MASK] king", "--device", "cuda", "--json"]) == 0
    assert out_json(capsys)
    texts = tmp_path / "texts.txt"
    texts.write_text("the king spoke\nthe river ran\n", encoding="utf-8")
    emb = {}
    for device in ("cuda", "cpu"):
        assert main(["embed", str(run), "--input", str(texts), "--out", str(tmp_path / f"{device}.npy"),
                     "--device", device, "--json"]) == 0
        capsys.readouterr()
        emb[device] = np.load(tmp_path / f"{device}.npy")
    assert emb["cuda"].shape == emb["cpu"].shape == (2, 32)
    cos = ((emb["cuda"] * emb["cpu"]).sum(1) / np.linalg.norm(emb["cuda"], axis=1)
           / np.linalg.norm(emb["cpu"], axis=1))
    assert (cos > 0.99).all(), cos
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--json"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_finetune_and_predict_on_gpu(gpu_run, tmp_path, capsys):
    _, root, _ = gpu_run
    lines = []
    for i in range(160):
        pos = i % 2 == 0
        lines.append(json.dumps({"text": f"{i % 7} the {'light summer day' if pos else 'dark winter night'}",
                                 "label": "pos" if pos else "neg"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[120:]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["finetune", str(root / "run"), "--train", str(tmp_path / "train.jsonl"), "--valid",
                 str(tmp_path / "valid.jsonl"), "--out", str(tmp_path / "ft"), "--epochs", "8",
                 "--lr", "3e-3", "--batch-size", "16", "--patience", "0", "--quiet", "--json"]) == 0
    res = out_json(capsys)
    assert res["best"]["val_accuracy"] >= 0.9, res["best"]
    assert main(["predict", str(tmp_path / "ft"), "--input", str(tmp_path / "valid.jsonl"), "--out",
                 str(tmp_path / "pred.jsonl"), "--device", "cuda", "--json"]) == 0
    assert len((tmp_path / "pred.jsonl").read_text().splitlines()) == 40
    shutil.rmtree(tmp_path / "ft")
