"""Was pre-training worth it? Linear probes, and pre-trained vs from-scratch fine-tuning across label budgets.

``transfer(run, train, valid, out)`` fine-tunes the run and a random init of the same architecture on
random subsets of the training data (each budget, each seed), and writes ``report.json``,
``report.md`` (a table: mean ± standard deviation over seeds) and ``report.png`` (the validation metric
against the number of labelled examples, log scale).

Image runs compare the same way on prepared image directories (``DIR@SPLIT``; a bare DIR is its train split
for --train, its val split for --valid); their shallow arm is a logistic regression on the raw pixels
(``pixels``) where text has TF-IDF + logistic regression (``tfidf``), and their report adds balanced accuracy
(and ROC-AUC for two classes) beside the selected metric (FinetuneConfig.metric).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain import PretrainError
from pretrain.config import FinetuneConfig
from pretrain.finetune.encode import _labels_of, read_task
from pretrain.finetune.metrics import compute_metrics
from pretrain.finetune.recipe import (
    cached_finetune,
    carve,
    epochs_for,
    inputs_identity,
    pooling_space,
    read_labelled,
    search,
    task_paths,
)
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


SCRATCH, TFIDF, PIXELS, WINDOW = "scratch", "tfidf", "pixels", "sliding_window"
SHALLOW = {TFIDF: "TF-IDF + logistic regression", PIXELS: "logistic regression on raw pixels",
           WINDOW: "the sliding-window lexical baseline (Rajpurkar et al. 2016)"}
"""The shallow arms (no learned features), by kind: what the report calls them."""


@dataclasses.dataclass
class Arm:
    """One column of the comparison: a pre-trained run, its architecture from a random init, or a shallow
    baseline (TF-IDF for text, raw pixels for images)."""

    name: str
    run: str | Path | None
    """The run fine-tuned (the scratch arm: the run whose architecture and tokenizer it re-initialises)."""
    kind: str
    """'pretrained', 'scratch', or a shallow arm: 'tfidf', 'pixels' or 'sliding_window' (qa)."""


def arms_for(runs: list[str | Path], tfidf: bool, modality: str = "text", task: str = "classification",
             ) -> list[Arm]:
    """A pre-trained arm per run (named 'pretrained' when there is one, else by the run folder's name), one
    from-scratch arm — which needs every run to share the encoder's architecture and tokenizer, so that
    one random init is the baseline of all — and the shallow arm (``tfidf``): TF-IDF + logistic regression
    for text, logistic regression on the raw pixels for images."""
    from pretrain.finetune.model import load_backbone

    names: list[str] = []
    if len(runs) == 1:
        names = ["pretrained"]
    else:
        for r in runs:
            p = Path(r).resolve()
            base = p.parent.parent.name if p.parent.name == "checkpoints" else p.name
            name = re.sub(r"[^\w.-]", "_", base) or "run"
            while name in names or name in (SCRATCH, *SHALLOW):
                name += "_"
            names.append(name)
    if len(runs) > 1:
        seen = []
        for r in runs:
            _, pcfg, tok, _ = load_backbone(r, 0.0, True, 0)
            # (image runs pre-trained on other images normalise pixels with their own statistics: input
            # preprocessing, not architecture; the from-scratch arm takes the first run's)
            arch = {k: v for k, v in dataclasses.asdict(pcfg.model).items()
                    if k not in ("image_mean", "image_std")}
            seen.append((arch, tok and tok.sha256()))
        if any(s != seen[0] for s in seen[1:]):
            raise PretrainError("the runs compared in one transfer must share the fine-tuned model's "
                                "architecture and the tokenizer (one from-scratch baseline for all); "
                                "compare the others in separate transfers")
    arms = [Arm(n, r, "pretrained") for n, r in zip(names, runs)] + [Arm(SCRATCH, runs[0], "scratch")]
    shallow = PIXELS if modality == "images" else WINDOW if task == "qa" else TFIDF
    return arms + ([Arm(shallow, None, shallow)] if tfidf else [])


def transfer(run: str | Path | list[str | Path], train: str | Path, valid: str | Path, out: str | Path,
             cfg: FinetuneConfig | None = None, budgets: str | list = "100,1000,10000,all", seeds: int = 3,
             recipe: str = "auto", scratch_lr: float = 1e-3, min_steps: int = 300, max_epochs: int = 20,
             all_seeds: int | None = 1, search_max: int = 2000, search_carves: int = 0, tfidf: bool = True,
             text_column: str | None = None, label_column: str | None = None,
             quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Pre-trained run(s) vs the same architecture from scratch (and a shallow baseline: TF-IDF + logistic
    regression for text, logistic regression on raw pixels for images) at each label budget; the report goes
    to ``out``. Image runs take prepared image directories, ``DIR`` or ``DIR@SPLIT``.

    ``recipe="auto"`` (the default): learning rate, pooling and epochs chosen for each arm and budget on a
    split carved from the budget's training labels (finetune/recipe.py), then every seed trains on the whole
    budget with that recipe and is scored once, at its end, on ``valid``. ``recipe="fixed"``: ``cfg.lr`` for
    the pre-trained arms and ``scratch_lr`` from scratch, ``cfg.epochs`` at least and up to ``max_epochs``
    (so each budget trains ``min_steps`` steps), the best evaluation on ``valid`` reported (early stopping
    on the evaluation data: optimistic, for both arms alike). The full training set runs ``all_seeds`` seeds.
    ``search_carves`` > 1 scores each candidate recipe on that many carves (less noise, that many times the
    search's cost); 0 (the default): three for budgets of up to ``search_max``, else one (recipe.auto_carves).
    ``out`` is a new or empty folder or an earlier transfer's (whose finished runs are reused), or with
    ``overwrite`` any other folder but the inputs' own."""
    cfg = cfg or FinetuneConfig()
    if text_column:
        cfg = dataclasses.replace(cfg, text_column=text_column)
    if label_column:
        cfg = dataclasses.replace(cfg, label_column=label_column)
    if seeds < 1:
        raise PretrainError("seeds must be >= 1")
    if cfg.max_train:
        raise PretrainError("max_train does not apply to transfer: its budgets choose the training subsets")
    if search_carves < 0:
        raise PretrainError("search_carves must be >= 0 (0: automatic)")
    if recipe not in ("auto", "fixed"):
        raise PretrainError(f"recipe must be auto or fixed, got {recipe!r}")
    runs = list(run) if isinstance(run, (list, tuple)) else [run]
    out = Path(out)
    from pretrain.finetune.model import run_modality

    modality = run_modality(runs[0])
    train, valid, inputs = task_paths(runs[0], train, valid)
    check_output_dir(out, "transfer", [*runs, *inputs], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    full = read_labelled(cfg, runs[0], train)
    n_total = len(full)
    labels = full.labels if cfg.task == "classification" else None
    sizes = parse_budgets(budgets, n_total)
    arms = arms_for(runs, tfidf and cfg.task in ("classification", "qa"), modality, cfg.task)
    encoder = pooling_space(runs[0])
    # what each arm's results depend on (checkpoint or architecture, data checksums): once per arm
    idents = {a.name: inputs_identity(a.run, train, valid, weights=a.kind != "scratch")
              for a in arms if a.kind not in SHALLOW}
    valid_ex = read_labelled(cfg, runs[0], valid) if any(a.kind in SHALLOW for a in arms) else None
    results: list[dict[str, Any]] = []
    window_res: dict[str, Any] | None = None
    recipes: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    for n in sizes:
        n_seeds = all_seeds if (n == n_total and all_seeds) else seeds
        subsets = [sample_budget(labels, n, s, n_total) if n < n_total else None for s in range(n_seeds)]
        for arm in arms:
            if arm.kind in SHALLOW:
                for seed, subset in enumerate(subsets):
                    if arm.kind == PIXELS:
                        from pretrain.finetune.images import pixel_baseline

                        res = pixel_baseline(full, subset, valid_ex, seed, cfg.metric)
                    elif arm.kind == WINDOW:  # (trains on nothing: the same answers at every budget)
                        window_res = window_res or sliding_baseline(valid_ex)
                        res = window_res
                    else:
                        res = tfidf_baseline(full, subset, valid_ex, seed, cfg.metric)
                    results.append({"arm": arm.name, "n": n, "seed": seed, **res})
                    log(f"transfer: {arm.name:10s} n={n:<7,} seed {seed}: val metric {res['metric']:.4f}"
                        + (f" (C {res['C']:g})" if res.get("C") is not None else ""))
                continue
            ident = idents[arm.name]
            arm_cfg = dataclasses.replace(cfg, from_scratch=arm.kind == "scratch")
            chosen = None
            if recipe == "auto":
                idx0 = subsets[0] if subsets[0] is not None else list(range(n_total))
                chosen = search(arm.run, train, idx0, labels, out / "search" / f"{arm.name}_n{n}", arm_cfg,
                                encoder, ident, max_epochs, min_steps, 0, search_max, log, search_carves)
                recipes[f"{arm.name}_n{n}"] = dataclasses.asdict(chosen)
                log(f"transfer: {arm.name} n={n:,}: recipe {chosen.describe()} ({chosen.judged()})")
            for seed, subset in enumerate(subsets):
                if chosen is not None:
                    run_cfg = dataclasses.replace(chosen.apply(arm_cfg), seed=seed)
                else:
                    epochs = epochs_for(n, cfg.batch_size, min_steps, cfg.epochs, max_epochs)
                    run_cfg = dataclasses.replace(arm_cfg, seed=seed, epochs=epochs,
                                                  lr=scratch_lr if arm.kind == "scratch" else cfg.lr)
                work = out / "runs" / f"{arm.name}_n{n}_s{seed}"
                res = cached_finetune(arm.run, train, valid, work, run_cfg, ident, subset)
                scored = res["final"] if chosen is not None else res["best"]
                results.append({"arm": arm.name, "n": n, "seed": seed, "epochs": run_cfg.epochs,
                                "lr": run_cfg.lr, "pooling": run_cfg.pooling, "metric": scored["val_metric"],
                                "steps": res["steps"], "elapsed_s": res["elapsed_s"],
                                **{k: v for k, v in scored.items()
                                   if k.startswith("val_") and k != "val_metric"}})
                log(f"transfer: {arm.name:10s} n={n:<7,} seed {seed}: val metric {scored['val_metric']:.4f} "
                    f"({res['steps']} steps, {res['elapsed_s']:.0f}s)")
    summary = summarise(results, sizes, arms)
    if valid_ex is None and modality == "images":
        valid_ex = read_labelled(cfg, runs[0], valid)
    baseline = majority_baseline(cfg, labels, valid, valid_ex)
    report = {"runs": [str(r) for r in runs], "modality": modality,
              "arms": [dataclasses.asdict(a) | {"run": str(a.run)} for a in arms],
              "train": str(train), "valid": str(valid), "task": cfg.task,
              "metric": _metric_name(cfg.task, cfg.metric),
              "train_examples": n_total, "budgets": sizes, "seeds": seeds, "recipe": recipe,
              "recipes": recipes, "config": dataclasses.asdict(cfg), "scratch_lr": scratch_lr,
              "majority_baseline": baseline, "summary": summary, "results": results,
              "elapsed_s": round(time.time() - t0, 1)}
    from pretrain.finetune.verdict import verdict

    report["verdict"] = verdict(report, arms, full, cfg)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    plot(report, out / "report.png")
    log(markdown(report))
    return {"verdict": report["verdict"]["line"], "out": str(out), "summary": summary,
            "majority_baseline": baseline, "elapsed_s": report["elapsed_s"]}


TFIDF_C = (1.0, 10.0, 0.1, 100.0)
"""Inverse regularisation strengths tried for TF-IDF + logistic regression (a tie goes to the first)."""


def tfidf_baseline(full: Any, subset: list[int] | None, va: Any, seed: int,
                   metric: str = "auto") -> dict[str, Any]:
    """TF-IDF (word 1–2-grams, sublinear tf) + logistic regression on the same rows as the fine-tunes, C
    chosen on the same kind of carved split, then refit on all the rows; scored on the examples ``va`` (by
    the metric ``metric`` names: FinetuneConfig.metric; C is chosen by accuracy)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    idx = subset if subset is not None else list(range(len(full)))
    texts = [t if full.pairs is None else f"{t} [SEP] {p}" for t, p in
             zip(full.texts, full.pairs or [None] * len(full))]
    y = [str(v) for v in full.labels]

    def fit(rows: list[int], c: float):
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x = vec.fit_transform([texts[i] for i in rows])
        clf = LogisticRegression(C=c, max_iter=2000).fit(x, [y[i] for i in rows])
        return vec, clf

    fit_rows, select = carve(full.labels, idx, seed)
    scores = {}
    for c in TFIDF_C:
        vec, clf = fit(fit_rows, c)
        scores[c] = float(np.mean(clf.predict(vec.transform([texts[i] for i in select])) ==
                                  np.array([y[i] for i in select])))
    best_c = max(TFIDF_C, key=lambda c: scores[c])
    vec, clf = fit(idx, best_c)
    vtexts = va.texts if va.pairs is None else [f"{t} [SEP] {p}" for t, p in zip(va.texts, va.pairs)]
    pred = list(clf.predict(vec.transform(vtexts)))
    probs = names = None
    if metric in ("balanced_accuracy", "roc_auc"):
        names = [str(c) for c in clf.classes_]
        probs = clf.predict_proba(vec.transform(vtexts))
    m = compute_metrics("classification", pred, [str(v) for v in va.labels], probs, names, metric)
    return {"metric": m["metric"], "C": best_c, **{f"val_{k}": v for k, v in m.items() if k != "metric"}}


def sliding_baseline(va: Any) -> dict[str, Any]:
    """The sliding-window lexical baseline of Rajpurkar et al. (2016) on the questions ``va``: no training;
    SQuAD exact match and F1."""
    from pretrain.finetune.qa_baseline import sliding_window_predict

    pred = [t for t, _ in sliding_window_predict(va.questions, va.contexts)]
    m = compute_metrics("qa", pred, [[t for t, _ in a] for a in va.answers])
    return {"metric": m["metric"], "C": None, **{f"val_{k}": v for k, v in m.items() if k != "metric"}}


def _metric_name(task: str, metric: str = "auto") -> str:
    if metric != "auto":
        return {"balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
                "roc_auc": "ROC-AUC"}.get(metric, metric)
    return {"classification": "accuracy", "regression": "pearson", "token": "f1 (or accuracy)",
            "qa": "F1 (SQuAD)"}[task]


def majority_baseline(cfg: FinetuneConfig, labels: list[Any] | None, valid: str | Path,
                      valid_ex: Any = None) -> float | None:
    """The selected metric of always predicting the most frequent training label (classification): its
    accuracy, 1 / classes for balanced accuracy, 0.5 for ROC-AUC (constant scores). ``valid_ex``: the
    validation examples, if read already."""
    if cfg.task != "classification" or labels is None:
        return None
    from collections import Counter

    top = Counter(str(v) for v in labels).most_common(1)[0][0]
    gold = _labels_of(cfg, valid_ex if valid_ex is not None else read_task(cfg, valid))
    names = sorted({str(v) for v in (*labels, *gold)})
    probs = None
    if cfg.metric in ("balanced_accuracy", "roc_auc"):
        probs = np.tile([float(n == top) for n in names], (len(gold), 1))
    return compute_metrics("classification", [top] * len(gold), gold, probs,
                           names if len(names) == 2 else None, cfg.metric)["metric"]


def interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``values`` (None for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    m, se = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    h = float(t.ppf(0.975, len(values) - 1)) * se
    return (m - h, m + h)


def summarise(results: list[dict[str, Any]], sizes: list[int], arms: list[Arm]) -> list[dict[str, Any]]:
    """Per budget: each arm's mean, std and 95% interval over seeds; each pre-trained arm's gain over scratch,
    paired by seed (the same label subset), with its interval."""
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n": n, "arms": {}, "gain": {}}
        by_arm = {a.name: {r["seed"]: r["metric"] for r in results if r["n"] == n and r["arm"] == a.name}
                  for a in arms}
        for a in arms:
            vals = [by_arm[a.name][s] for s in sorted(by_arm[a.name])]
            row["arms"][a.name] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                   "ci95": interval(vals), "seeds": len(vals), "values": vals}
        for a in arms:
            if a.kind != "pretrained":
                continue
            diffs = [by_arm[a.name][s] - by_arm[SCRATCH][s] for s in sorted(by_arm[a.name])
                     if s in by_arm[SCRATCH]]
            row["gain"][a.name] = {"mean": float(np.mean(diffs)), "ci95": interval(diffs), "values": diffs}
        rows.append(row)
    return rows


def _metric_key(report: dict[str, Any]) -> str:
    """The results' key that holds the same figure as ``metric``."""
    chosen = report.get("config", {}).get("metric", "auto")
    return f"val_{chosen}" if chosen != "auto" else "val_accuracy"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci: tuple[float, float] | list[float] | None, signed: bool = False) -> str:
    if ci is None:
        return "(1 seed)"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"[{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    arms = [a["name"] for a in report["arms"]]
    pre = [a["name"] for a in report["arms"] if a["kind"] == "pretrained"]
    images = report.get("modality") == "images"
    task = "image classification" if images else report["task"]
    lines = [f"**{report['verdict']['line']}**", "",
             f"# Transfer report: {task} ({metric}, validation)", "",
             f"Pre-trained run(s): {', '.join(f'`{r}`' for r in report['runs'])}; train `{report['train']}` "
             f"({report['train_examples']:,} examples); valid `{report['valid']}`.", "",
             "| labelled examples | " + " | ".join(arms) + " | "
             + " | ".join(f"gain {p}" for p in pre) + " | seeds |",
             "|---:|" + "---:|" * (len(arms) + len(pre) + 1)]
    for row in report["summary"]:
        cells = [f"{_pct(row['arms'][a]['mean'])} {_ci(row['arms'][a]['ci95'])}" for a in arms]
        gains = [f"{100 * row['gain'][p]['mean']:+.1f} {_ci(row['gain'][p]['ci95'], True)}" for p in pre]
        seeds = row["arms"][arms[0]]["seeds"]
        lines.append(f"| {row['n']:,} | " + " | ".join(cells + gains) + f" | {seeds} |")
    others = [k for k in ("val_accuracy", "val_balanced_accuracy", "val_roc_auc", "val_exact_match")
              if any(k in r for r in report["results"]) and _metric_key(report) != k]
    if others:  # the figures beside the selected metric (images: balanced accuracy, ROC-AUC)
        lines += ["", "Other metrics (mean over seeds): "
                  + " / ".join(k[4:].replace("_", " ") for k in others) + ".", "",
                  "| labelled examples | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
        for n in report["budgets"]:
            cells = []
            for a in arms:
                got = [r for r in report["results"] if r["n"] == n and r["arm"] == a]
                means = [[r[k] for r in got if k in r] for k in others]
                cells.append(" / ".join(_pct(float(np.mean(v))) if v else "–" for v in means))
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    if report.get("majority_baseline") is not None:
        lines += ["", f"Majority-class baseline: {100 * report['majority_baseline']:.1f}."]
    shallow = [f"`{a['name']}` is {SHALLOW[a['kind']]}" for a in report["arms"] if a["kind"] in SHALLOW]
    lines += ["", "Values are percentages: mean over seeds (different label subsets and initialisations of "
              "the head) with a 95% t-interval; gains are paired by seed (the same labels on both sides). "
              "From-scratch runs use the same architecture" + ("" if images else " and tokenizer") + "."
              + (f" {'; '.join(shallow)} on the same labels and seeds." if shallow else "")]
    if report["recipe"] == "auto":
        lines += ["", "Recipes chosen on a split carved from each budget's training labels (the evaluation "
                  "data never picks anything; each seed is scored once, after its last epoch):", "",
                  "| arm | labelled examples | lr | pooling | epochs | carved-split metric |",
                  "|---|---:|---:|---|---:|---:|"]
        for key, r in report["recipes"].items():
            arm, n = key.rsplit("_n", 1)
            lines.append(f"| {arm} | {int(n):,} | {r['lr']:g} | {r['pooling']} | {r['epochs']} | "
                         f"{100 * r['score']:.1f} |")
    else:
        lines += ["", f"One fixed recipe: lr {report['config']['lr']:g} pre-trained, "
                  f"{report['scratch_lr']:g} from scratch; the best evaluation on the validation data is "
                  "reported (optimistic, both sides alike)."]
    reasons = report["verdict"].get("reasons") or []
    if reasons:
        lines += ["", "Likely reasons where pre-training did not pay off:", ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row["n"] for row in report["summary"]]
    for a, style in zip(report["arms"], ("o-", "^-", "v-", "D-", "s--", "x:")):
        name = a["name"]
        style = {"scratch": "s--", "tfidf": "x:", "pixels": "x:", WINDOW: "x:"}.get(a["kind"], style)
        ys = [100 * row["arms"][name]["mean"] for row in report["summary"]]
        es = [100 * row["arms"][name]["std"] for row in report["summary"]]
        label = {"scratch": "from scratch", "tfidf": "TF-IDF + LR", "pixels": "LR on raw pixels",
                 WINDOW: "sliding window"}.get(a["kind"], name)
        ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label)
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
                 batch_size: int = 64, device: str = "auto", random_init: bool = False) -> dict[str, Any]:
    """Frozen features + logistic regression (scikit-learn): a quick read of feature quality. An image run
    reads prepared image directories (``DIR`` / ``DIR@SPLIT``: train and val splits by default) and also
    reports balanced accuracy (and ROC-AUC for two classes). A run pre-trained on item sequences probes its
    item embeddings: ``text_column`` holds item ids. ``random_init``: the same architecture freshly
    initialised (seed ``seed``) instead of the run's weights — the control that says what pre-training
    added."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.checkpoint import CheckpointError, load_pretrained
    from pretrain.features import embed_texts, is_image_data
    from pretrain.finetune.data import check_known, read_examples
    from pretrain.hardware import resolve_device

    if batch_size < 1 or max_train < 0:
        raise PretrainError("--batch-size must be >= 1 and --max-train >= 0 (0: every row)")
    dev = resolve_device(device)
    try:
        model, cfg, tok, _ = load_pretrained(run, dev)
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    if random_init:
        import torch

        from pretrain.models import build_model

        torch.manual_seed(seed)
        model = build_model(cfg.model).to(dev).eval()
    from pretrain.recommend import is_item_vocabulary

    if tok is not None and is_item_vocabulary(tok):
        return _item_probe(model, tok, train, valid, text_column, label_column, max_train, seed)
    if spec_of(model).modality == "images":
        return _image_probe(model, cfg, run, train, valid, pooling, max_train, seed, batch_size, dev)
    for p in (train, valid):
        if is_image_data(p):
            raise PretrainError(f"{p} is a prepared image directory, but {run} is a text run: probe it with "
                                "text, or the images with an image run")
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


def _item_probe(model, tok, train: str | Path, valid: str | Path, text_column: str, label_column: str,
                max_train: int, seed: int) -> dict[str, Any]:
    """linear_probe of an item-sequence run: each row's item (its id in ``text_column``) is its embedding
    (recommend.item_embeddings)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.finetune.data import check_known, read_examples
    from pretrain.recommend import item_embeddings

    ids, vectors = item_embeddings(model, tok)
    row_of = {item: i for i, item in enumerate(ids)}
    tr = read_examples(train, text_column, label_column)
    va = read_examples(valid, text_column, label_column)
    for ex, path in ((tr, train), (va, valid)):
        unknown = sorted({t.strip() for t in ex.texts} - set(row_of))
        if unknown:
            raise PretrainError(f"{path}: {len(unknown):,} item id(s) in column {text_column!r} are not in "
                                f"the run's vocabulary, e.g. {', '.join(unknown[:5])}")
    if max_train and max_train < len(tr):
        tr = tr.subset(sample_budget(tr.labels, max_train, seed, len(tr)))
    names = sorted({str(v) for v in tr.labels})
    check_known(va.labels, names, str(valid))
    if len(names) < 2:
        raise PretrainError(f"{train}: a linear probe needs at least two labels, found {names}")
    t0 = time.time()
    xtr = vectors[[row_of[t.strip()] for t in tr.texts]]
    xva = vectors[[row_of[t.strip()] for t in va.texts]]
    scaler = StandardScaler().fit(xtr)
    y = [str(v) for v in tr.labels]
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(scaler.transform(xtr), y)
    proba = clf.predict_proba(scaler.transform(xva))
    probs = np.zeros((len(va), len(names)))
    for j, c in enumerate(clf.classes_):
        probs[:, names.index(str(c))] = proba[:, j]
    pred = [names[i] for i in probs.argmax(-1)]
    m = compute_metrics("classification", pred, [str(v) for v in va.labels], probs, names)
    return {"accuracy": m["accuracy"], **{k: m[k] for k in ("balanced_accuracy", "roc_auc") if k in m},
            "train_examples": len(tr), "valid_examples": len(va), "pooling": "item embedding",
            "dim": int(xtr.shape[1]), "truncated": {"train": 0, "valid": 0},
            "elapsed_s": round(time.time() - t0, 2)}


def _image_probe(model, cfg, run: str | Path, train: str | Path, valid: str | Path, pooling: str,
                 max_train: int, seed: int, batch_size: int, dev) -> dict[str, Any]:
    """linear_probe for an image run: features of the train and validation splits' images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.features import check_image_size, embed_images, image_pooling, is_image_data
    from pretrain.finetune.data import check_known
    from pretrain.finetune.images import read_images

    for p in (train, valid):
        if not is_image_data(p):
            raise PretrainError(f"{run} is an image run: probe it on prepared image directories, DIR or "
                                f"DIR@SPLIT (`pretrain prepare IMAGES --out DIR`), not {p}")
    pool = image_pooling(model, pooling)
    tr, va = read_images(train, "train"), read_images(valid, "valid")
    for ex in (tr, va):
        check_image_size(ex.source, ex.split, cfg.model, run)
    if max_train and max_train < len(tr):
        tr = tr.subset(sample_budget(tr.labels, max_train, seed, len(tr)))
    names = [str(c) for c in tr.split.classes]
    check_known(va.labels, names, va.source)
    if len(set(tr.labels)) < 2:
        raise PretrainError(f"{tr.source}: a linear probe needs at least two labels, "
                            f"found {sorted(set(tr.labels))}")
    t0 = time.time()
    xtr = embed_images(model, cfg.model, tr, pool, False, batch_size, dev)
    xva = embed_images(model, cfg.model, va, pool, False, batch_size, dev)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(scaler.transform(xtr), tr.labels)
    proba = clf.predict_proba(scaler.transform(xva))
    probs = np.zeros((len(va), len(names)))
    for j, c in enumerate(clf.classes_):
        probs[:, names.index(str(c))] = proba[:, j]
    pred = [names[i] for i in probs.argmax(-1)]
    m = compute_metrics("classification", pred, va.labels, probs, names)
    return {"accuracy": m["accuracy"], **{k: m[k] for k in ("balanced_accuracy", "roc_auc") if k in m},
            "train_examples": len(tr), "valid_examples": len(va), "pooling": pool, "dim": int(xtr.shape[1]),
            "truncated": {"train": 0, "valid": 0}, "train": tr.source, "valid": va.source,
            "elapsed_s": round(time.time() - t0, 2)}
