"""`pretrain demo`: the whole pipeline on a corpus every machine has, offline, in a few minutes on a CPU.

The corpus is the Python standard library's own top-level modules (the ``.py`` files that ship with the
interpreter running this code): a few MB of real, varied text — code, docstrings and comments.
prepare (byte-level BPE) → pre-train a small GPT → evaluate → generate → embed (nearest neighbours).
"""

from __future__ import annotations

import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain import PretrainError
from pretrain.config import load_config
from pretrain.data.prepare import prepare
from pretrain.inference import evaluate_run, generate_text
from pretrain.train import train

DEMO_CONFIG = {
    "data": {"seq_len": 128},
    "model": {"n_layer": 4, "n_head": 4, "d_model": 192},
    "train": {"batch_size": 16, "max_steps": 600, "lr": 2e-3, "warmup_steps": 50, "schedule": "wsd",
              "eval_interval": 200, "eval_batches": 16, "log_interval": 25, "ckpt_interval": 200},
}


def demo_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    if not files:
        raise PretrainError(f"no Python sources found in {stdlib}: cannot build the demo corpus")
    return files


def run_demo(out: str | Path = "demo_out", max_steps: int | None = None, quiet: bool = False,
             budget_s: float = 300.0) -> dict[str, Any]:
    """Run the demo in ``out`` and return its results; prints a summary unless ``quiet``."""
    out = Path(out)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    files = demo_corpus()
    say(f"== 1/5 prepare: {len(files)} Python standard-library modules from {Path(files[0]).parent}")
    meta = prepare(files, out / "data", tokenizer="bpe", vocab_size=4096, val_fraction=0.1, overwrite=True, log=log)
    t_prep = time.time() - t0

    say("== 2/5 pre-train a small GPT (causal LM)")
    overrides = {"data": {"path": str(out / "data")}, "train": {"max_time_s": budget_s}}
    if max_steps:
        overrides["train"]["max_steps"] = max_steps
    cfg = load_config(None, overrides, base=DEMO_CONFIG)
    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    summary = train(cfg, run, quiet=quiet)

    say("== 3/5 evaluate on the held-out split")
    ev = evaluate_run(run)

    say("== 4/5 generate")
    prompt = "def "
    sample = generate_text(run, prompt, max_new_tokens=120, temperature=0.8, top_k=50, seed=0)[0]

    say("== 5/5 embed: nearest neighbours among a few snippets (mean-pooled, centred hidden states, cosine)")
    neighbours = _neighbours(run)

    result = {
        "corpus_files": len(files), "corpus_bytes": sum(s["bytes"] for s in meta["sources"]),
        "vocab_size": meta["tokenizer"]["vocab_size"],
        "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
        "prepare_s": round(t_prep, 1), "n_params": summary["n_params"], "steps": summary["step"],
        "train_s": summary["elapsed_s"], "tokens_seen": summary["tokens_seen"],
        "val_loss": ev["loss"], "val_perplexity": ev["perplexity"], "val_bits_per_byte": ev["bits_per_byte"],
        "sample_prompt": prompt, "sample": sample, "neighbours": neighbours, "run_dir": str(run),
        "total_s": round(time.time() - t0, 1),
    }
    say("\n== summary")
    say(f"corpus      {result['corpus_files']} files, {result['corpus_bytes'] / 1e6:.1f} MB → "
        f"{result['train_tokens']:,} train / {result['val_tokens']:,} val tokens (BPE vocab {result['vocab_size']:,})")
    say(f"model       GPT, {result['n_params'] / 1e6:.2f}M parameters, {result['steps']} steps, "
        f"{result['tokens_seen']:,} tokens in {result['train_s']:.0f}s")
    say(f"held-out    loss {ev['loss']:.3f} nats/token, perplexity {ev['perplexity']:.1f}, "
        f"{ev['bits_per_byte']:.3f} bits/byte (uniform guess: {_uniform_bpb(meta):.2f} bits/byte)")
    say(f"sample      {prompt!r} →\n{sample}")
    say("neighbours  " + "\n            ".join(f"{a!r} ~ {b!r} ({s:.2f})" for a, b, s in neighbours))
    say(f"\nrun directory: {run} (config.yaml, metrics.jsonl, loss_curve.png, checkpoints/); "
        f"total {result['total_s']:.0f}s")
    return result


def _uniform_bpb(meta: dict[str, Any]) -> float:
    import math

    val = meta["splits"]["val"]
    return math.log2(meta["tokenizer"]["vocab_size"]) * val["tokens"] / max(val["bytes"], 1)


SNIPPETS = ["import os", "import sys", "def __init__(self):", "def __repr__(self):", "raise ValueError(msg)",
            "raise TypeError(msg)", "for i in range(n):", "while True:"]


def _neighbours(run: Path) -> list[tuple[str, str, float]]:
    """For each snippet, its most similar other snippet by the model's embeddings."""
    from pretrain.checkpoint import load_pretrained
    from pretrain.features import embed_texts

    model, cfg, tok, _ = load_pretrained(run)
    vecs, _ = embed_texts(model, tok, cfg, SNIPPETS, pooling="mean")
    vecs = vecs - vecs.mean(0)  # centre: raw LM features share one dominant direction
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-8
    sims = vecs @ vecs.T
    out = []
    for i, text in enumerate(SNIPPETS):
        sims[i, i] = -1.0
        j = int(sims[i].argmax())
        out.append((text, SNIPPETS[j], round(float(sims[i, j]), 3)))
    return out
