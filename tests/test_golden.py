"""Golden runs: the first 30 training losses of the tiny causal-LM and masked-LM configs and the 20 step
losses of a fine-tune, pinned, so that a refactor that should not change behaviour provably does not.

fp32 on the CPU, one thread. On the kind of CPU the figures were recorded on they must match to 1e-6; another
CPU (another instruction set, so other matmul kernels and summation orders) gets 1e-4, still far below what
any change to the model, the data order, the masking or the schedule moves them by.

Regenerate (only for an intended behaviour change, said so in the commit):
``PRETRAIN_REGOLD=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from _corpus import write_corpus
from test_finetune import sentiment_rows, write_jsonl

from pretrain.cli import main

GOLDEN = Path(__file__).with_name("golden.json")
# a WordPiece vocabulary trained once on the corpus below: training one is not reproducible run to run (the
# tokenizers library numbers the '##' pieces in hash-map order), and the golden runs must not depend on it
WORDPIECE = Path(__file__).with_name("golden_wordpiece.json")
REGOLD = os.environ.get("PRETRAIN_REGOLD") == "1"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIN = ["--train.dtype", "fp32", "--train.device", "cpu", "--train.threads", "1", "--train.compile", "false",
       "--train.max_steps", "30", "--train.log_interval", "1", "--train.eval_interval", "10",
       "--train.eval_batches", "2", "--train.ckpt_interval", "0", "--train.plot", "false", "--quiet"]


def cpu_kind() -> str:
    """What decides the CPU kernels torch picks: the architecture and the vector extensions."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    ext = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    return f"{platform.machine()} torch {torch.__version__.split('+')[0]} {' '.join(ext)}"


def _compare(name: str, got: list[float]) -> None:
    pinned = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if REGOLD:
        pinned.setdefault("cpu_kind", cpu_kind())
        pinned[name] = got
        GOLDEN.write_text(json.dumps(pinned, indent=1) + "\n")
        return
    assert name in pinned, f"no golden figures for {name}: run with PRETRAIN_REGOLD=1 once"
    tol = 1e-6 if pinned.get("cpu_kind") == cpu_kind() else 1e-4
    want = pinned[name]
    assert len(got) == len(want)
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if abs(g - w) > tol * max(1.0, abs(w))]
    assert not bad, f"{name}: {len(bad)} of {len(want)} values moved (index, now, pinned): {bad[:5]}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    write_corpus(root / "corpus", n_docs=8)
    return root


def _losses(path: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if r.get(key) is not None]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_pretraining_losses_are_pinned(corpus, objective, capsys):
    data, run = corpus / f"data_{objective}", corpus / f"run_{objective}"
    tok = ["--tokenizer", "char"] if objective == "clm" else ["--tokenizer", str(WORDPIECE)]
    assert main(["prepare", str(corpus / "corpus"), "--out", str(data), *tok, "--val-fraction", "0.2"]) == 0
    config = CONFIGS / ("tiny.yaml" if objective == "clm" else "bert-tiny.yaml")
    assert main(["train", str(config), "--out", str(run), "--data.path", str(data), *PIN]) == 0
    capsys.readouterr()
    train = _losses(run / "metrics.jsonl", "train_loss")
    val = _losses(run / "metrics.jsonl", "val_loss")
    assert len(train) == 30 and len(val) == 3
    _compare(f"{objective}_train_loss", train)
    _compare(f"{objective}_val_loss", val)


def test_finetune_losses_are_pinned(corpus, capsys):
    root = corpus
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "ft_data"),
                 "--tokenizer", str(WORDPIECE), "--val-fraction", "0.2"]) == 0
    assert main(["train", str(CONFIGS / "bert-tiny.yaml"), "--out", str(root / "ft_run"),
                 "--data.path", str(root / "ft_data"), "--data.seq_len", "32", *PIN,
                 "--train.max_steps", "10", "--train.warmup_steps", "2"]) == 0
    write_jsonl(root / "train.jsonl", sentiment_rows(160, 1))
    write_jsonl(root / "valid.jsonl", sentiment_rows(40, 2))
    # 10 steps an epoch, an evaluation after every step: metrics.jsonl holds each step's loss
    assert main(["finetune", str(root / "ft_run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(root / "ft"), "--epochs", "2", "--batch-size", "16",
                 "--evals-per-epoch", "10", "--patience", "0", "--lr", "1e-3", "--dtype", "fp32",
                 "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (root / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    _compare("finetune_train_loss", [r["train_loss"] for r in rows])
    _compare("finetune_val_metric", [r["val_metric"] for r in rows])
