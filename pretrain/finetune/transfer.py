"""Was pre-training worth it? Linear probes, and pre-trained vs from-scratch fine-tuning across label budgets.

``transfer(run, train, valid, out)`` fine-tunes the run and a random init of the same architecture on
random subsets of the training data (each budget, each seed), and writes ``report.json``,
``report.md`` (a table: mean ± standard deviation over seeds) and ``report.png`` (the validation metric
against the number of labelled examples, log scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain import PretrainError
from pretrain.config import FinetuneConfig
from pretrain.finetune.encode import _labels_of, read_task
from pretrain.finetune.loop import finetune
from pretrain.finetune.metrics import compute_metrics
from pretrain.io import check_output_dir, write_json_atomic, write_text_atomic
from pretrain.models import spec_of


def parse_budgets(spec: str | list, n_train: int) -> list[int]:
    """``"100,1k,10000,all"`` → sorted distinct example counts (capped at the training set's size)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        s = str(item).strip().lower()
        if s == "all":
            out.add(n_train)
            continue
        try:
            n = int(float(s[:-1]) * 1000) if s.endswith("k") else int(s)
        except ValueError:
            raise PretrainError(f"label budget {item!r} is not a number, '10k' or 'all'") from None
        if n < 2:
            raise PretrainError(f"label budget {n} is too small (at least 2 examples)")
        out.add(min(n, n_train))
    return sorted(out)


def sample_budget(labels: list[Any] | None, n: int, seed: int, total: int) -> list[int]:
    """A random subset of ``n`` training rows; for classification every class keeps at least one example."""
    from collections import Counter

    rng = random.Random(seed * 1_000_003 + n)
    idx = list(range(total))
    rng.shuffle(idx)
    chosen = idx[:n]
    if labels is not None and n < total:
        counts = Counter(str(labels[i]) for i in chosen)
        for i in idx[n:]:
            c = str(labels[i])
            if c in counts:
                continue
            for j in range(len(chosen) - 1, -1, -1):  # swap out an example of a class that has several
                cj = str(labels[chosen[j]])
                if counts[cj] > 1:
                    counts[cj] -= 1
                    chosen[j], counts[c] = i, 1
                    break
    return sorted(chosen)


def epochs_for(n: int, batch_size: int, min_steps: int, base_epochs: int, max_epochs: int) -> int:
    """Small budgets get more epochs so that every budget trains for at least ``min_steps`` steps."""
    return int(min(max_epochs, max(base_epochs, math.ceil(min_steps * batch_size / n))))


def transfer(run: str | Path, train: str | Path, valid: str | Path, out: str | Path,
             cfg: FinetuneConfig | None = None, budgets: str | list = "100,1000,10000,all", seeds: int = 3,
             scratch_lr: float = 1e-3, min_steps: int = 300, max_epochs: int = 20, all_seeds: int | None = 1,
             text_column: str | None = None, label_column: str | None = None,
             quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Pre-trained vs from-scratch fine-tuning at each label budget; the report goes to ``out``.

    ``cfg.epochs`` is the minimum number of epochs; smaller budgets get up to ``max_epochs`` so each trains
    ``min_steps`` steps. From-scratch runs use ``scratch_lr`` (a random init wants a larger step than a
    pre-trained one). The full training set is run with ``all_seeds`` seeds (it varies least). ``out`` is a
    new or empty folder or an earlier transfer's (whose finished runs are reused), or with ``overwrite`` any
    other folder but the inputs' own."""
    cfg = cfg or FinetuneConfig()
    if text_column:
        cfg = dataclasses.replace(cfg, text_column=text_column)
    if label_column:
        cfg = dataclasses.replace(cfg, label_column=label_column)
    if seeds < 1:
        raise PretrainError("seeds must be >= 1")
    out = Path(out)
    check_output_dir(out, "transfer", [run, train, valid], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    full = read_task(cfg, train)
    n_total = len(full)
    labels = full.labels if cfg.task == "classification" else None
    sizes = parse_budgets(budgets, n_total)
    ident = _inputs_identity(run, train, valid)  # a finished run is reused only for the same inputs
    results: list[dict[str, Any]] = []
    t0 = time.time()
    for n in sizes:
        n_seeds = all_seeds if (n == n_total and all_seeds) else seeds
        epochs = epochs_for(n, cfg.batch_size, min_steps, cfg.epochs, max_epochs)
        for seed in range(n_seeds):
            subset = sample_budget(labels, n, seed, n_total) if n < n_total else None
            for init in ("pretrained", "scratch"):
                run_cfg = dataclasses.replace(cfg, seed=seed, epochs=epochs, from_scratch=init == "scratch",
                                              lr=scratch_lr if init == "scratch" else cfg.lr)
                work = out / "runs" / f"{init}_n{n}_s{seed}"
                res = _finished(work, run_cfg, n, ident)
                if res is None:
                    res = finetune(run, train, valid, work, run_cfg, train_subset=subset, quiet=True,
                                   overwrite=overwrite)
                    # keep metrics and configs, not every model
                    (work / "model.safetensors").unlink(missing_ok=True)
                    _write_done(work, res, ident)
                best = res["best"]
                results.append({"init": init, "n": n, "seed": seed, "epochs": epochs, "lr": run_cfg.lr,
                                "metric": best["val_metric"], "best_epoch": best["epoch"],
                                "steps": res["steps"], "elapsed_s": res["elapsed_s"],
                                **{k: v for k, v in best.items()
                                   if k.startswith("val_") and k != "val_metric"}})
                log(f"transfer: {init:10s} n={n:<7,} seed {seed}: val metric {best['val_metric']:.4f} "
                    f"({res['steps']} steps, {res['elapsed_s']:.0f}s)")
    summary = summarise(results, sizes)
    baseline = majority_baseline(cfg, labels, valid)
    report = {"run": str(run), "train": str(train), "valid": str(valid), "task": cfg.task,
              "metric": _metric_name(cfg.task), "train_examples": n_total, "budgets": sizes, "seeds": seeds,
              "config": dataclasses.asdict(cfg), "scratch_lr": scratch_lr, "majority_baseline": baseline,
              "summary": summary, "runs": results, "elapsed_s": round(time.time() - t0, 1)}
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    plot(report, out / "report.png")
    log(markdown(report))
    return {"out": str(out), "summary": summary, "majority_baseline": baseline,
            "elapsed_s": report["elapsed_s"]}


def _inputs_identity(run: str | Path, train: str | Path, valid: str | Path) -> dict[str, Any]:
    """What a fine-tuning result depends on besides its config: the pre-trained checkpoint and the data."""
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.data.sources import sha256_file

    return {"checkpoint": str(resolve_checkpoint(run).resolve()), "train_sha256": sha256_file(Path(train)),
            "valid_sha256": sha256_file(Path(valid))}


def _finished(work: Path, cfg: FinetuneConfig, n: int, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The result of an earlier, completed fine-tuning run with the same settings, checkpoint and data (so an
    interrupted transfer resumes where it stopped), or None."""
    try:
        done = json.loads((work / "done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (done.get("config") != dataclasses.asdict(cfg) or done.get("train_examples") != n
            or done.get("inputs") != ident):
        return None
    return done["result"]


def _write_done(work: Path, res: dict[str, Any], ident: dict[str, Any]) -> None:
    info = json.loads((work / "finetune.json").read_text(encoding="utf-8"))
    write_json_atomic(work / "done.json", {"config": info["config"], "train_examples": info["train_examples"],
                                           "inputs": ident,
                                           "result": {k: v for k, v in res.items() if k != "history"}})


def _metric_name(task: str) -> str:
    return {"classification": "accuracy", "regression": "pearson", "token": "f1 (or accuracy)"}[task]


def majority_baseline(cfg: FinetuneConfig, labels: list[Any] | None, valid: str | Path) -> float | None:
    """Validation accuracy of always predicting the most frequent training label (classification)."""
    if cfg.task != "classification" or labels is None:
        return None
    from collections import Counter

    top = Counter(str(v) for v in labels).most_common(1)[0][0]
    gold = _labels_of(cfg, read_task(cfg, valid))
    return compute_metrics("classification", [top] * len(gold), gold)["metric"]


def summarise(results: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for init in ("pretrained", "scratch"):
            vals = [r["metric"] for r in results if r["n"] == n and r["init"] == init]
            row[init] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": len(vals),
                         "values": vals}
        row["gain"] = row["pretrained"]["mean"] - row["scratch"]["mean"]
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    lines = [f"# Transfer report: {report['task']} ({metric}, validation)", "",
             f"Pre-trained run: `{report['run']}`; train `{report['train']}` ({report['train_examples']:,} "
             f"examples); valid `{report['valid']}`.", "",
             "| labelled examples | pre-trained | from scratch | gain | seeds |",
             "|---:|---:|---:|---:|---:|"]
    for row in report["summary"]:
        p, s = row["pretrained"], row["scratch"]
        lines.append(f"| {row['n']:,} | {100 * p['mean']:.1f} ± {100 * p['std']:.1f} | "
                     f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {100 * row['gain']:+.1f} | "
                     f"{p['seeds']} |")
    if report.get("majority_baseline") is not None:
        lines += ["", f"Majority-class baseline: {100 * report['majority_baseline']:.1f}."]
    lines += ["", "Values are percentages: mean ± standard deviation over seeds (different label subsets and "
              "initialisations of the head). From-scratch runs use the same architecture and tokenizer with "
              f"lr {report['scratch_lr']:g}; pre-trained runs lr {report['config']['lr']:g}.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row["n"] for row in report["summary"]]
    for init, style in (("pretrained", "o-"), ("scratch", "s--")):
        ys = [100 * row[init]["mean"] for row in report["summary"]]
        es = [100 * row[init]["std"] for row in report["summary"]]
        ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3,
                    label="pre-trained" if init == "pretrained" else "from scratch")
    if report.get("majority_baseline") is not None:
        ax.axhline(100 * report["majority_baseline"], color="gray", lw=0.8, ls=":", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel(f"validation {report['metric']} (%)")
    ax.set_title("Fine-tuning: pre-trained vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def linear_probe(run: str | Path, train: str | Path, valid: str | Path, text_column: str = "text",
                 label_column: str = "label", pooling: str = "auto", max_train: int = 0, seed: int = 0,
                 batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Frozen features + logistic regression (scikit-learn): a quick read of feature quality."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.checkpoint import CheckpointError, load_pretrained
    from pretrain.features import embed_texts
    from pretrain.finetune.data import check_known, read_examples
    from pretrain.hardware import resolve_device

    if batch_size < 1 or max_train < 0:
        raise PretrainError("--batch-size must be >= 1 and --max-train >= 0 (0: every row)")
    dev = resolve_device(device)
    try:
        model, cfg, tok, _ = load_pretrained(run, dev)
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    pool = pooling if pooling != "auto" else spec_of(model).pooling
    tr = read_examples(train, text_column, label_column)
    va = read_examples(valid, text_column, label_column)
    if max_train and max_train < len(tr):
        tr = tr.subset(sample_budget(tr.labels, max_train, seed, len(tr)))
    check_known(va.labels, sorted(set(tr.labels)), str(valid))
    if len(set(tr.labels)) < 2:
        raise PretrainError(f"{train}: a linear probe needs at least two labels, "
                            f"found {sorted(set(tr.labels))}")
    t0 = time.time()
    xtr, trunc_tr = embed_texts(model, tok, cfg, tr.texts, pool, False, batch_size, dev)
    xva, trunc_va = embed_texts(model, tok, cfg, va.texts, pool, False, batch_size, dev)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    y = [str(v) for v in tr.labels]
    clf.fit(scaler.transform(xtr), y)
    pred = clf.predict(scaler.transform(xva))
    acc = float(np.mean(pred == np.array([str(v) for v in va.labels])))
    return {"accuracy": acc, "train_examples": len(tr), "valid_examples": len(va), "pooling": pool,
            "dim": int(xtr.shape[1]), "truncated": {"train": trunc_tr, "valid": trunc_va},
            "elapsed_s": round(time.time() - t0, 2)}
