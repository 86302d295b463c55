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


def tiny_text_run(root: Path, kind: str, seq_len: int = 32, steps: int = 20) -> Path:
    """A tiny pre-trained run in root/run on ``write_corpus`` text: ``kind`` 'mlm' (a bert encoder, WordPiece)
    or 'clm' (the default decoder, byte-level BPE); 2 x 32, ``steps`` steps of 4 sequences of ``seq_len``."""
    from pretrain.cli import main

    write_corpus(root / "corpus", n_docs=6)
    tok = "wordpiece" if kind == "mlm" else "bpe"
    extra = ["--objective", "mlm", "--model.arch", "bert"] if kind == "mlm" else []
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", tok,
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    assert main(["train", "--out", str(root / "run"), *extra, "--data.path", str(root / "data"),
                 "--data.seq_len", str(seq_len), "--model.n_layer", "2", "--model.n_head", "2",
                 "--model.d_model", "32", "--train.max_steps", str(steps), "--train.batch_size", "4",
                 "--train.eval_interval", "0", "--train.plot", "false", "--train.threads", "1",
                 "--quiet"]) == 0
    return root / "run"


QA_NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Eve", "Frank", "Grace", "Heidi"]
QA_THINGS = ["sword", "crown", "stone", "light"]


def synthetic_squad(path: Path, n_articles: int, seed: int, filler: tuple[int, int] = (2, 6)) -> Path:
    """SQuAD v1.1: 'Who held the X?' over contexts of ``filler`` (min, max) filler sentences and four
    'NAME held the X.' facts (several windows long at --max-length 64)."""
    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(3):
            owner = {t: rng.choice(QA_NAMES) for t in QA_THINGS}
            parts = (sentences(rng.randint(*filler), seed * 100 + a * 10 + p)
                     + [f"{owner[t]} held the {t}." for t in QA_THINGS])
            rng.shuffle(parts)
            ctx = "  ".join(parts)
            qas = [{"id": f"{seed}-{a}-{p}-{k}", "question": f"Who held the {t}?",
                    "answers": [{"text": owner[t], "answer_start": ctx.index(f"{owner[t]} held the {t}")}]}
                   for k, t in enumerate(QA_THINGS)]
            paras.append({"context": ctx, "qas": qas})
        data.append({"title": f"a{a}", "paragraphs": paras})
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


def shift_log(path: Path, n_users: int = 60, n_items: int = 30, seed: int = 0) -> Path:
    """An interaction log (CSV: user_id, item_id, timestamp, rating) in which each user walks the items in
    order — s, s+1, s+2, ... (mod ``n_items``) from a random start, 6 to 15 steps: the next item is
    learnable from the last one, while every item is about equally popular. Rows shuffled."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        s, n = rng.randrange(n_items), rng.randint(6, 15)
        rows += [(f"u{u}", f"i{(s + t) % n_items}", 1000 * u + t, 1 + (t % 5)) for t in range(n)]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in rows)
    path.write_text("user_id,item_id,timestamp,rating\n" + body)
    return path
