"""A small deterministic English-like corpus for end-to-end tests (no external data)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the a an of to and in is was for on that with as by at from it this be are his her they "
         "king queen lord castle river stone light night day sword crown field wind rain summer winter "
         "spoke walked found gave held ran saw made came went took kept said told old young "
         "green dark").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def write_corpus(root: Path, n_docs: int = 12, sents_per_doc: int = 40, seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        p = root / f"doc_{i:03d}.txt"
        p.write_text(" ".join(sentences(sents_per_doc, seed * 1000 + i)) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def prepared_wordpiece(root: Path, n_docs: int = 12, val_fraction: float = 0.2) -> Path:
    """``write_corpus`` into root/corpus, prepared with a 300-piece WordPiece vocabulary into root/data."""
    from pretrain.cli import main

    write_corpus(root / "corpus", n_docs=n_docs)
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "wordpiece",
                 "--vocab-size", "300", "--val-fraction", str(val_fraction)]) == 0
    return root / "data"


def _docs(n: int, seed: int = 0, sents: int = 6) -> list[str]:
    """``n`` distinct documents of ``sents`` sentences each."""
    return [" ".join(sentences(sents, seed=seed * 10_000 + i)) for i in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    """Write ``docs`` to a JSONL file (field "text"), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


TINY_TRAIN = {
    "data": {"seq_len": 32},
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
    "train": {"batch_size": 4, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5, "eval_interval": 10,
              "eval_batches": 4, "log_interval": 1, "ckpt_interval": 10, "plot": False, "threads": 1},
}


def overrides(cfg: dict, prefix: str = "") -> list[str]:
    """A nested dict → ['--section.key', 'value', ...] CLI overrides."""
    out: list[str] = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += overrides(v, f"{prefix}{k}.")
        else:
            out += [f"--{prefix}{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def kill_after(script: str, marker: Path, after_s: float, env: dict[str, str] | None = None,
               timeout: float = 120) -> None:
    """Run ``python -c script`` and SIGKILL it ``after_s`` seconds after ``marker`` appears (a checkpoint's
    meta.json: mid-run, past that checkpoint); it must not have finished before."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), env=env)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, "training finished or failed before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.01)
    time.sleep(after_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
