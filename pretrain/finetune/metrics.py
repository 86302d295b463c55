"""Validation metrics of fine-tuned models: accuracy and macro-F1 (classification; with class probabilities
also balanced accuracy and, for two classes, ROC-AUC), entity-span F1 (token tags, BIO/IOB/IOBES), Pearson /
Spearman / MSE (regression); ``metric`` is the one early stopping, the recipe search and reports use.

The figures are scikit-learn's and scipy's (``accuracy_score``, ``f1_score(average="macro")``,
``balanced_accuracy_score``, ``roc_auc_score``, ``pearsonr``, ``spearmanr``, ``mean_squared_error``). Entity
F1 is computed here (seqeval is no dependency) exactly as seqeval's default mode (conlleval's chunking) does,
tag for tag: tests/test_vocab.py compares the two on edge cases and on random tag sequences.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def _prefix_and_type(tag: str) -> tuple[str, str]:
    """('B', 'PER') for 'B-PER', ('O', '_') for 'O', as seqeval (and conlleval) read a tag: its first
    character is the chunk tag, the rest after a '-' its type ('_' when there is none). A tag without a
    prefix ('PER') thus reads as chunk tag 'P' of type 'ER': no B/I/E/S, so consecutive equal ones form one
    chunk (the IO scheme), as in seqeval."""
    return tag[:1], tag[1:].split("-", 1)[-1] or "_"


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entity spans ``(start, end exclusive, type)`` of a tag sequence in the BIO/IOB1/IOB2/IOBES schemes,
    by conlleval's chunk rules (seqeval's default, non-strict mode): an ``I-`` without a ``B-`` starts a
    chunk, a change of type ends one, ``E-`` / ``S-`` end one."""
    spans: set[tuple[int, int, str]] = set()
    start, prev_tag, prev_type = 0, "O", ""
    for i, t in enumerate([*tags, "O"]):
        tag, type_ = _prefix_and_type(t)
        ends = prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O")) or (
            prev_tag not in ("O", ".") and prev_type != type_)
        if ends:
            spans.add((start, i, prev_type))
        if tag in ("B", "S") or (tag in ("E", "I") and prev_tag in ("E", "S", "O")) or (
                tag not in ("O", ".") and prev_type != type_):
            start = i
        prev_tag, prev_type = tag, type_
    return spans


def balanced_accuracy(pred: list[Any], gold: list[Any]) -> float:
    """The mean over the classes of ``gold`` of the share of their examples predicted right (recall):
    sklearn's balanced_accuracy_score. Always predicting the majority class scores 1 / classes."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": they count as errors
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score([str(v) for v in gold], [str(v) for v in pred]))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the examples where ``positive`` is True (sklearn's
    roc_auc_score: the chance that a positive example scores above a negative one, ties counting half).
    None when ``positive`` holds only one class (undefined)."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return None
    return float(roc_auc_score(pos, np.asarray(scores, dtype=np.float64)))


def _correlations(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """Pearson's and Spearman's coefficients (scipy); 0.0 when either side is constant (undefined)."""
    from scipy.stats import pearsonr, spearmanr

    if len(p) < 2 or p.std() == 0 or g.std() == 0:
        return 0.0, 0.0
    return float(pearsonr(p, g)[0]), float(spearmanr(p, g)[0])


def compute_metrics(task: str, pred: list[Any], gold: list[Any], probs: Any = None,
                    names: list[Any] | None = None, select: str = "auto") -> dict[str, float]:
    """Validation metrics; ``metric`` is the one early stopping and reports use (higher is better): the
    task's default (``select`` 'auto') or, for classification, the one ``select`` names. With ``probs``
    ((N, classes) probabilities, columns in the order of ``names``): also ``balanced_accuracy`` and, for two
    classes, ``roc_auc`` of the second class's probability (left out when ``gold`` holds one class only;
    selected, it then counts 0.5, chance)."""
    from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

    if task == "regression":
        p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        pearson, spearman = _correlations(p, g)
        return {"metric": pearson, "pearson": pearson, "spearman": spearman,
                "mse": float(mean_squared_error(g, p))}
    if task == "qa":  # answer texts against the lists of gold answers
        from pretrain.finetune.qa import squad_em_f1

        m = squad_em_f1(pred, gold)
        return {"metric": m["f1"], **m}
    if task == "token":
        flat_p = [t for s in pred for t in s]
        flat_g = [t for s in gold for t in s]
        out = {"accuracy": float(accuracy_score(flat_g, flat_p))}
        if any(t[:2] in ("B-", "I-", "E-", "S-") for t in flat_g):
            tp = fp = fn = 0
            for ps, gs in zip(pred, gold):
                sp, sg = entity_spans(ps), entity_spans(gs)
                tp, fp, fn = tp + len(sp & sg), fp + len(sp - sg), fn + len(sg - sp)
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            out.update(precision=prec, recall=rec, f1=2 * prec * rec / max(prec + rec, 1e-12))
        out["metric"] = out.get("f1", out["accuracy"])
        return out
    p_str, g_str = [str(v) for v in pred], [str(v) for v in gold]
    acc = float(accuracy_score(g_str, p_str))
    # macro average over the classes of both gold and predictions, as sklearn's default labels
    out = {"metric": acc, "accuracy": acc, "macro_f1": float(f1_score(g_str, p_str, average="macro",
                                                                      zero_division=0))}
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
