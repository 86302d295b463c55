"""`pretrain demo`: the whole pipeline on a corpus every machine has, offline, in a few minutes on a CPU.

The corpus is the Python standard library's own top-level modules (the ``.py`` files that ship with the
interpreter running this code): a few MB of real, varied text — code, docstrings and comments.
prepare (byte-level BPE) → pre-train a small GPT → evaluate → generate → fine-tune (which module does a
line of code come from? pre-trained vs from scratch) → embed (nearest neighbours).

Then images, on scikit-learn's bundled 8x8 handwritten digits (1,797 images): masked autoencoding of a small
ViT on the training images (labels unused) → fine-tune on 10 labels per digit → test accuracy, pre-trained
vs from scratch.
"""

from __future__ import annotations

import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain import PretrainError
from pretrain.config import FinetuneConfig, load_config
from pretrain.data.prepare import prepare
from pretrain.finetune.loop import finetune
from pretrain.inference import evaluate_run, generate_text
from pretrain.io import check_output_dir, output_kinds
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


IMAGE_CONFIG = {
    "objective": "mae",
    "model": {"arch": "vit", "patch_size": 2, "d_model": 96, "n_layer": 4, "n_head": 4, "decoder_layers": 1,
              "decoder_dim": 64, "decoder_heads": 4, "norm_eps": 1e-6},
    "image": {"mask_ratio": 0.5, "crop_scale": 0.6},
    "train": {"batch_size": 64, "max_steps": 1500, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.05,
              "eval_interval": 250, "eval_batches": 8, "log_interval": 25, "ckpt_interval": 500},
}
DIGITS_PER_CLASS = 10  # labels per digit for the fine-tuning step


def run_demo(out: str | Path = "demo_out", max_steps: int | None = None, quiet: bool = False,
             budget_s: float = 300.0, finetune_epochs: int = 10, overwrite: bool = False,
             image_budget_s: float = 60.0, image_epochs: int = 30) -> dict[str, Any]:
    """Run the demo in ``out`` and return its results; prints a summary unless ``quiet``. ``out`` is a new or
    empty folder or an earlier demo's, whose results it replaces; ``overwrite`` lets it write into another
    folder (a prepared data/ in it is replaced; in run/, task/ and finetune_*/ the files of the names the
    demo writes, nothing else)."""
    out = Path(out)
    check_output_dir(out, "demo", overwrite=overwrite)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    files = demo_corpus()
    say(f"== 1/7 prepare: {len(files)} Python standard-library modules from {Path(files[0]).parent}")
    meta = prepare(files, out / "data", tokenizer="bpe", vocab_size=4096, val_fraction=0.1, overwrite=True,
                   log=log)
    t_prep = time.time() - t0

    say("== 2/7 pre-train a small GPT (causal LM)")
    # a time budget: the schedule decays over it too, so a slower machine still ends with a decayed LR
    overrides = {"data": {"path": str(out / "data")},
                 "train": {"max_time_s": budget_s, "time_schedule": budget_s > 0}}
    if max_steps:
        overrides["train"]["max_steps"] = max_steps
    cfg = load_config(None, overrides, base=DEMO_CONFIG)
    run = out / "run"
    summary = _train_afresh(cfg, out, run, quiet, overwrite)

    say("== 3/7 evaluate on the held-out split")
    ev = evaluate_run(run)

    say("== 4/7 generate")
    prompt = "def "
    sample = generate_text(run, prompt, max_new_tokens=120, temperature=0.8, top_k=50, seed=0)[0]

    say("== 5/7 fine-tune: which of 4 modules does a line of code come from? (400 labelled lines; "
        "the pre-trained GPT vs the same architecture from scratch)")
    task = _module_task(files, out / "task")
    ft = {}
    for init in ("pretrained", "scratch"):
        fcfg = FinetuneConfig(text_column="text", label_column="module", epochs=finetune_epochs,
                              batch_size=32, patience=3, lr=1e-3 if init == "pretrained" else 2e-3,
                              from_scratch=init == "scratch")
        res = finetune(run, task["train"], task["valid"], out / f"finetune_{init}", fcfg, quiet=True,
                       overwrite=overwrite)
        ft[init] = res["best"]["val_accuracy"]
        say(f"   {init:10s}: validation accuracy {100 * ft[init]:.1f}% (best of {res['steps']} steps)")

    say("== 6/7 embed: nearest neighbours among a few snippets (mean-pooled, centred hidden states, cosine)")
    neighbours = _neighbours(run)

    say(f"== 7/7 images: masked autoencoding of a small ViT on 8x8 digits (labels unused), then fine-tuning "
        f"on {DIGITS_PER_CLASS} labels per digit (pre-trained vs from scratch)")
    images = _image_demo(out, max_steps, quiet, image_budget_s, image_epochs, overwrite)

    result = {
        "corpus_files": len(files), "corpus_bytes": sum(s["bytes"] for s in meta["sources"]),
        "vocab_size": meta["tokenizer"]["vocab_size"],
        "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
        "prepare_s": round(t_prep, 1), "n_params": summary["n_params"], "steps": summary["step"],
        "train_s": summary["elapsed_s"], "tokens_seen": summary["tokens_seen"],
        "val_loss": ev["loss"], "val_perplexity": ev["perplexity"], "val_bits_per_byte": ev["bits_per_byte"],
        "sample_prompt": prompt, "sample": sample, "neighbours": neighbours, "run_dir": str(run),
        "finetune_modules": task["modules"], "finetune_accuracy": ft, "images": images,
        "total_s": round(time.time() - t0, 1),
    }
    say("\n== summary")
    say(f"corpus      {result['corpus_files']} files, {result['corpus_bytes'] / 1e6:.1f} MB → "
        f"{result['train_tokens']:,} train / {result['val_tokens']:,} val tokens "
        f"(BPE vocab {result['vocab_size']:,})")
    say(f"model       GPT, {result['n_params'] / 1e6:.2f}M parameters, {result['steps']} steps, "
        f"{result['tokens_seen']:,} tokens in {result['train_s']:.0f}s")
    say(f"held-out    loss {ev['loss']:.3f} nats/token, perplexity {ev['perplexity']:.1f}, "
        f"{ev['bits_per_byte']:.3f} bits/byte (uniform guess: {_uniform_bpb(meta):.2f} bits/byte)")
    say(f"sample      {prompt!r} →\n{sample}")
    say(f"fine-tune   module of a line ({', '.join(task['modules'])}; chance 25%): pre-trained "
        f"{100 * ft['pretrained']:.1f}% vs from scratch {100 * ft['scratch']:.1f}%")
    say("neighbours  " + "\n            ".join(f"{a!r} ~ {b!r} ({s:.2f})" for a, b, s in neighbours))
    say(f"images      ViT {images['n_params'] / 1e6:.2f}M, MAE on {images['train_images']:,} digits for "
        f"{images['steps']} steps ({images['train_s']:.0f}s, k-NN accuracy of its features "
        f"{100 * images['knn_accuracy']:.1f}%); {images['labels']} labels → test accuracy pre-trained "
        f"{100 * images['test_accuracy']['pretrained']:.1f}% vs from scratch "
        f"{100 * images['test_accuracy']['scratch']:.1f}% (chance 10%)")
    say(f"\nrun directory: {run} (config.yaml, metrics.jsonl, loss_curve.png, checkpoints/); "
        f"total {result['total_s']:.0f}s")
    return result


def _train_afresh(cfg, out: Path, run: Path, quiet: bool, overwrite: bool) -> dict[str, Any]:
    """Train ``run`` from scratch (an earlier demo's run in it is removed first, not resumed)."""
    if run.exists() and output_kinds(out) == ["demo"]:
        import shutil

        shutil.rmtree(run)
    return train(cfg, run, quiet=quiet, overwrite=overwrite)


def digits_dataset(out: Path) -> dict[str, Any]:
    """scikit-learn's 8x8 digits (0..16 levels scaled to 0..255) as a prepared image folder: a seeded,
    stratified 1,097 train / 200 val / 500 test split."""
    from sklearn.datasets import load_digits

    from pretrain.data.images import write_prepared

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(len(idx) * 500 / len(labels)), round(len(idx) * 200 / len(labels))
        split["test"] += list(idx[:n_test])
        split["val"] += list(idx[n_test:n_test + n_val])
        split["train"] += list(idx[n_test + n_val:])
    parts = {k: (images[np.sort(v)], labels[np.sort(v)]) for k, v in split.items()}
    write_prepared(out, parts, [str(c) for c in range(10)],
                   sources=[{"path": "sklearn.datasets.load_digits",
                             "licence": "CC BY 4.0 (UCI ML hand-written digits)"}], overwrite=True)
    return {k: len(v) for k, v in split.items()}


def _image_demo(out: Path, max_steps: int | None, quiet: bool, budget_s: float, epochs: int,
                overwrite: bool) -> dict[str, Any]:
    from pretrain.data.images import ImageSplit

    counts = digits_dataset(out / "data_images")
    overrides = {"data": {"path": str(out / "data_images")},
                 "train": {"max_time_s": budget_s, "time_schedule": budget_s > 0}}
    if max_steps:
        overrides["train"]["max_steps"] = max_steps
    cfg = load_config(None, overrides, base=IMAGE_CONFIG)
    run = out / "run_images"
    summary = _train_afresh(cfg, out, run, quiet, overwrite)
    ev = evaluate_run(run)
    labels = ImageSplit(out / "data_images", "train").labels
    rng = np.random.default_rng(0)
    few = sorted(int(i) for c in range(10)
                 for i in rng.permutation(np.flatnonzero(labels == c))[:DIGITS_PER_CLASS])
    acc = {}
    for init in ("pretrained", "scratch"):
        fcfg = FinetuneConfig(epochs=epochs, batch_size=16, patience=0, lr=1e-3, pooling="mean",
                              from_scratch=init == "scratch")
        res = finetune(run, out / "data_images", out / "data_images", out / f"finetune_images_{init}", fcfg,
                       train_subset=few, quiet=True, overwrite=overwrite, test_path=out / "data_images")
        acc[init] = res["test"]["test_accuracy"]
    return {"train_images": counts["train"], "n_params": summary["n_params"], "steps": summary["step"],
            "train_s": summary["elapsed_s"], "val_loss": ev["loss"], "knn_accuracy": ev["knn_accuracy"],
            "labels": len(few), "test_accuracy": acc}


def _uniform_bpb(meta: dict[str, Any]) -> float:
    import math

    val = meta["splits"]["val"]
    return math.log2(meta["tokenizer"]["vocab_size"]) * val["tokens"] / max(val["bytes"], 1)


def _module_task(files: list[str], out: Path, n_modules: int = 4, n_train: int = 100,
                 n_valid: int = 50) -> dict[str, Any]:
    """A labelled task from the corpus itself: lines of code (≥ 30 characters, no comments) labelled with the
    module they come from, for the 4 largest modules. Pre-training saw the text, never these labels."""
    import json
    import random

    lines_of: dict[str, list[str]] = {}
    for f in files:
        lines = sorted({ln.strip()
                        for ln in Path(f).read_text(encoding="utf-8", errors="replace").splitlines()
                        if len(ln.strip()) >= 30 and not ln.strip().startswith(("#", '"', "'"))})
        if len(lines) >= n_train + n_valid:
            lines_of[Path(f).stem] = lines
    modules = sorted(sorted(lines_of, key=lambda m: -len(lines_of[m]))[:n_modules])
    if len(modules) < 2:
        raise PretrainError("the demo corpus has too few large modules for the fine-tuning task")
    rng = random.Random(0)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "valid": []}
    for m in modules:
        picked = rng.sample(lines_of[m], n_train + n_valid)
        rows["train"] += [{"text": t, "module": m} for t in picked[:n_train]]
        rows["valid"] += [{"text": t, "module": m} for t in picked[n_train:]]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rs in rows.items():
        rng.shuffle(rs)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8")
    return {**paths, "modules": modules}


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
