"""Validation metrics of fine-tuned models: accuracy and macro-F1 (classification; with class probabilities
also balanced accuracy and, for two classes, ROC-AUC), entity-span F1 (token tags, BIO/IOB), Pearson /
Spearman / MSE (regression); ``metric`` is the one early stopping, the recipe search and reports use."""

from __future__ import annotations

from typing import Any

import numpy as np


def _spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entity spans of a BIO/IOB tag sequence."""
    spans, start, kind = set(), None, None
    for i, t in enumerate([*tags, "O"]):
        prefix, _, label = t.partition("-")
        if start is not None and (prefix in ("B", "O") or t == "O" or label != kind):
            spans.add((start, i, kind))
            start = None
        if prefix in ("B", "I") and label and start is None:
            start, kind = i, label
    return spans


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank (as Spearman's coefficient needs)."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def balanced_accuracy(pred: list[Any], gold: list[Any]) -> float:
    """The mean over the classes of ``gold`` of the share of their examples predicted right (recall), as
    sklearn's balanced_accuracy_score: always predicting the majority class scores 1 / classes."""
    p, g = np.asarray([str(v) for v in pred]), np.asarray([str(v) for v in gold])
    return float(np.mean([np.mean(p[g == c] == c) for c in np.unique(g)]))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the examples where ``positive`` is True: the chance that a
    positive example scores above a negative one (ties count half; Mann-Whitney U from average ranks).
    None when ``positive`` holds only one class (undefined)."""
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    r = _ranks(np.asarray(scores, dtype=np.float64)) + 1.0
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compute_metrics(task: str, pred: list[Any], gold: list[Any], probs: Any = None,
                    names: list[Any] | None = None, select: str = "auto") -> dict[str, float]:
    """Validation metrics; ``metric`` is the one early stopping and reports use (higher is better): the
    task's default (``select`` 'auto') or, for classification, the one ``select`` names. With ``probs``
    ((N, classes) probabilities, columns in the order of ``names``): also ``balanced_accuracy`` and, for two
    classes, ``roc_auc`` of the second class's probability (left out when ``gold`` holds one class only;
    selected, it then counts 0.5, chance)."""
    if task == "regression":
        p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        pearson = float(np.corrcoef(p, g)[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
        spearman = float(np.corrcoef(_ranks(p), _ranks(g))[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
        return {"metric": pearson, "pearson": pearson, "spearman": spearman,
                "mse": float(((p - g) ** 2).mean())}
    if task == "qa":  # answer texts against the lists of gold answers
        from pretrain.finetune.qa import squad_em_f1

        m = squad_em_f1(pred, gold)
        return {"metric": m["f1"], **m}
    if task == "token":
        flat_p = [t for s in pred for t in s]
        flat_g = [t for s in gold for t in s]
        acc = float(np.mean([a == b for a, b in zip(flat_p, flat_g)]))
        out = {"accuracy": acc}
        if any(t[:2] in ("B-", "I-") for t in flat_g):
            tp = fp = fn = 0
            for ps, gs in zip(pred, gold):
                sp, sg = _spans(ps), _spans(gs)
                tp, fp, fn = tp + len(sp & sg), fp + len(sp - sg), fn + len(sg - sp)
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            out.update(precision=prec, recall=rec, f1=2 * prec * rec / max(prec + rec, 1e-12))
        out["metric"] = out.get("f1", acc)
        return out
    acc = float(np.mean([str(a) == str(b) for a, b in zip(pred, gold)]))
    f1s = []
    for c in {str(v) for v in (*gold, *pred)}:  # as sklearn's macro average: the classes of both
        tp = sum(str(p) == c and str(g) == c for p, g in zip(pred, gold))
        fp = sum(str(p) == c and str(g) != c for p, g in zip(pred, gold))
        fn = sum(str(p) != c and str(g) == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    out = {"metric": acc, "accuracy": acc, "macro_f1": float(np.mean(f1s))}
    if probs is not None:
        out["balanced_accuracy"] = balanced_accuracy(pred, gold)
        if names is not None and len(names) == 2:
            auc = roc_auc(np.asarray(probs, dtype=np.float64).reshape(len(gold), 2)[:, 1],
                          np.asarray([str(g) == str(names[1]) for g in gold]))
            if auc is not None:
                out["roc_auc"] = auc
    if select != "auto":
        if select not in out and select != "roc_auc":
            raise ValueError(f"metric {select!r} needs class probabilities")
        out["metric"] = out.get(select, 0.5)
    return out
