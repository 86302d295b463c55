"""Did pre-training pay off? The transfer report's first line, and the reasons it can check when it did not.

A pre-trained arm *paid off* at a budget when the 95% interval of its gain over the from-scratch arm (paired
by seed) lies above zero; with one seed there is no interval and a positive gain is reported as such. When it
did not pay off anywhere (or at some budgets), the verdict says so first and names the likely reasons among
those it can measure:

- the backbone's loss was still falling over the last fifth of pre-training (more pre-training helps);
- the task's text is far from the pre-training text: the tokenizer cuts it into more pieces per byte than
  the pre-training text, or maps characters of it to the unknown token;
- few labels per class;
- TF-IDF + logistic regression beats the pre-trained model (the task is solved by surface words, which a
  small backbone's features do not beat at that budget); for images, a logistic regression on the raw
  pixels does.

The text distance is measured for text runs only (``report['modality']``); image runs get the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain import PretrainError

STILL_FALLING = 0.01
"""Relative drop of the loss over the last fifth of pre-training that counts as 'still falling'."""
FAR_TEXT = 1.15
"""Tokens per byte of the task's text over the pre-training text's that counts as 'far'."""
FEW_PER_CLASS = 20
"""Labelled examples per class below which labels count as few."""


def verdict(report: dict[str, Any], arms: list[Any], examples: Any, cfg: Any) -> dict[str, Any]:
    """{'line': the one-line verdict, 'arms': per pre-trained arm the budgets where it paid off or not,
    'reasons': the checks that fired, 'checks': every measured figure}."""
    per_arm, failed = [], []
    for arm in (a for a in arms if a.kind == "pretrained"):
        good, bad = [], []
        for row in report["summary"]:
            g = row["gain"][arm.name]
            ci = g["ci95"]
            ok = g["mean"] > 0 if ci is None else ci[0] > 0
            (good if ok else bad).append({"n": row["n"], "gain": g["mean"], "ci95": ci})
        per_arm.append({"arm": arm.name, "paid_off": good, "not": bad})
        failed += [(arm, b) for b in bad]
    checks = measure(report, arms, examples, cfg)
    reasons = _reasons(checks, report, failed) if failed else []
    return {"line": _line(per_arm, report), "paid_off": not failed, "arms": per_arm, "reasons": reasons,
            "checks": checks}


def _fmt(b: dict[str, Any]) -> str:
    ci = b["ci95"]
    where = "1 seed, no interval" if ci is None else f"95% interval {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
    return f"{b['n']:,} labels: {100 * b['gain']:+.1f} points ({where})"


def _reading(b: dict[str, Any]) -> str:
    """What a gain that did not pay off means: scratch better (the whole interval below zero), or noise."""
    ci = b["ci95"]
    if (ci is not None and ci[1] < 0) or (ci is None and b["gain"] < 0):
        return " — from scratch is better"
    return " — within the noise of the seeds" if ci is not None else ""


def _line(per_arm: list[dict[str, Any]], report: dict[str, Any]) -> str:
    parts = []
    for a in per_arm:
        name = "" if a["arm"] == "pretrained" else f"{a['arm']}: "
        if not a["not"]:
            best = max(a["paid_off"], key=lambda b: b["gain"])
            parts.append(f"{name}pre-training paid off at every budget (best {_fmt(best)})")
        elif not a["paid_off"]:
            worst = min(a["not"], key=lambda b: b["gain"])
            parts.append(f"{name}pre-training did NOT pay off at any budget ({_fmt(worst)}{_reading(worst)})")
        else:
            parts.append(f"{name}pre-training did NOT pay off at "
                         + ", ".join(_fmt(b) + _reading(b) for b in a["not"])
                         + "; it did at " + ", ".join(f"{b['n']:,}" for b in a["paid_off"]) + " labels")
    return "verdict: " + "; ".join(parts)


def measure(report: dict[str, Any], arms: list[Any], examples: Any, cfg: Any) -> dict[str, Any]:
    """The figures the reasons are read from: per pre-trained run its last validation losses and (text) the
    tokenizer's pieces per byte on the task and on the pre-training text; labels per class."""
    out: dict[str, Any] = {"runs": {}}
    text = report.get("modality", "text") == "text"
    from pretrain.finetune.model import origin

    for arm in (a for a in arms if a.kind == "pretrained"):
        run = origin(arm.run)  # (a fine-tuned model going on to another task: the run it came from)
        try:
            out["runs"][arm.name] = {"loss_trend": loss_trend(run),
                                     **(text_distance(run, examples) if text else {})}
        except PretrainError:  # (no pre-trained run behind it, or it is gone: no figures to read)
            out["runs"][arm.name] = {"loss_trend": None}
    if cfg.task == "classification" and examples.labels is not None:
        n_classes = len({str(v) for v in examples.labels})
        out["classes"] = n_classes
        out["per_class"] = {str(row["n"]): row["n"] / n_classes for row in report["summary"]}
    return out


def loss_trend(run: str | Path) -> dict[str, Any] | None:
    """How the run's loss moved over the last fifth of its steps (its metrics.jsonl): the last validation
    loss against the latest one at or before 80% of the run; with fewer than two such evaluations, the mean
    logged training loss of the last fifth against the fifth before. {kind, from, to, drop (relative)};
    kind None when the run logged too little to tell (with its last step and tokens, or images, seen)."""
    from pretrain.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    val, tr = [], []
    last_seen: dict[str, Any] = {}
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                    continue
                last_seen = {"step": r["step"], "tokens": r.get("tokens")}
                if isinstance(r.get("images"), int):  # an image run counts images
                    last_seen["images"] = r["images"]
                if isinstance(r.get("val_loss"), (int, float)):
                    val.append((r["step"], float(r["val_loss"])))
                elif isinstance(r.get("train_loss"), (int, float)):
                    tr.append((r["step"], float(r["train_loss"])))
    except OSError:
        return None
    if val:
        last = val[-1]
        before = [v for v in val if v[0] <= 0.8 * last[0]]
        if before:
            return _trend("val_loss", before[-1], last)
    if tr:
        end = tr[-1][0]
        late = [v for s, v in tr if s > 0.8 * end]
        mid = [v for s, v in tr if 0.6 * end < s <= 0.8 * end]
        if late and mid:
            return _trend("train_loss", (round(0.7 * end), sum(mid) / len(mid)),
                          (round(0.9 * end), sum(late) / len(late)))
    return {"kind": None, **last_seen} if last_seen else None


def _trend(kind: str, a: tuple[int, float], b: tuple[int, float]) -> dict[str, Any]:
    return {"kind": kind, "from": {"step": a[0], "loss": a[1]}, "to": {"step": b[0], "loss": b[1]},
            "drop": (a[1] - b[1]) / a[1] if a[1] > 0 else 0.0}


def text_distance(run: str | Path, examples: Any, max_texts: int = 2000) -> dict[str, Any]:
    """Tokens per byte of the task's texts and of the pre-training text (its prepared data's validation
    split, from meta.json), and the share of task tokens that are unknown or word continuations."""
    from pretrain.checkpoint import load_pretrained

    model, pcfg, tok, _ = load_pretrained(run)
    del model
    texts = list(getattr(examples, "texts", None) or [" ".join(w) for w in examples.words])[:max_texts]
    ids = tok.encode_batch(texts, text_only=True)
    n_tok = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    cont = tok.continuation_mask()
    res: dict[str, Any] = {
        "task_tokens_per_byte": n_tok / max(n_bytes, 1),
        "task_unknown": (sum(x.count(tok.unk_id) for x in ids) / max(n_tok, 1)) if tok.unk_id is not None
        else 0.0,
        "task_continuation": sum(cont[i] for x in ids for i in x) / max(n_tok, 1) if any(cont) else None}
    try:
        meta = json.loads((Path(pcfg.data.path) / "meta.json").read_text(encoding="utf-8"))
        split = meta["splits"].get("val") or meta["splits"]["train"]
        res["pretrain_tokens_per_byte"] = split["tokens"] / max(split["bytes"], 1)
    except (OSError, ValueError, KeyError, TypeError):
        res["pretrain_tokens_per_byte"] = None  # the prepared data is gone: no comparison
    return res


def _reasons(checks: dict[str, Any], report: dict[str, Any],
             failed: list[tuple[Any, dict[str, Any]]]) -> list[str]:
    reasons = []
    for name, c in checks["runs"].items():
        who = "" if name == "pretrained" else f"{name}: "
        t = c["loss_trend"]
        if t and t["kind"] is None:
            seen = (f" ({t['tokens']:,} tokens)" if isinstance(t.get("tokens"), int)
                    else f" ({t['images']:,} images)" if isinstance(t.get("images"), int) else "")
            reasons.append(f"{who}the backbone was pre-trained for only {t['step']:,} steps{seen}, too few "
                           "to log a loss curve: pre-train longer")
        elif t and t["drop"] > STILL_FALLING:
            what = "validation loss" if t["kind"] == "val_loss" else "training loss (no two evaluations)"
            reasons.append(f"{who}the backbone's {what} was still falling when pre-training ended "
                           f"({t['from']['loss']:.3f} at step {t['from']['step']} → {t['to']['loss']:.3f} at "
                           f"step {t['to']['step']}, -{100 * t['drop']:.1f}%): pre-train longer")
        tpb, ref = c.get("task_tokens_per_byte"), c.get("pretrain_tokens_per_byte")
        if ref and tpb and tpb > FAR_TEXT * ref:
            reasons.append(f"{who}the task's text is far from the pre-training text: {tpb:.3f} tokens per "
                           f"byte against {ref:.3f} ({tpb / ref:.2f}×)"
                           + (f", {100 * c['task_continuation']:.0f}% of its tokens are word pieces"
                              if c.get("task_continuation") is not None else ""))
        if c.get("task_unknown", 0.0) > 0.01:
            reasons.append(f"{who}{100 * c['task_unknown']:.1f}% of the task's tokens are unknown to the "
                           "tokenizer")
    per_class = checks.get("per_class") or {}
    few = sorted({b["n"] for _, b in failed if per_class.get(str(b["n"]), FEW_PER_CLASS) < FEW_PER_CLASS})
    if few:
        reasons.append("few labels: " + ", ".join(f"{per_class[str(n)]:.1f} per class at {n:,}" for n in few))
    shallow = {a["name"]: a["kind"] for a in report.get("arms", [])
               if a["kind"] in ("tfidf", "pixels", "sliding_window")}
    for _, b in failed:
        row = next(r for r in report["summary"] if r["n"] == b["n"])
        pre = [v for k, v in row["arms"].items() if k in row["gain"]]
        for name, kind in (shallow or {"tfidf": "tfidf"}).items():
            sh = row["arms"].get(name)
            if not (sh and pre and sh["mean"] > max(p["mean"] for p in pre)):
                continue
            if kind == "sliding_window":
                reasons.append(f"the sliding-window lexical baseline beats the pre-trained model at "
                               f"{b['n']:,} labelled questions (F1 {100 * sh['mean']:.1f}): word overlap "
                               "with the question finds the answer better than the fine-tuned backbone at "
                               "that budget")
            elif kind == "pixels":
                reasons.append(f"a logistic regression on the raw pixels beats the pre-trained model at "
                               f"{b['n']:,} labels ({100 * sh['mean']:.1f}): the classes are told apart by "
                               "the pixels themselves, which the backbone's features do not beat at that "
                               "budget")
            else:
                reasons.append(f"TF-IDF + logistic regression beats the pre-trained model at {b['n']:,} "
                               f"labels ({100 * sh['mean']:.1f}): surface words solve much of this task")
    if not reasons:
        close = "" if report.get("modality", "text") != "text" else "the text is close, "
        reasons.append(f"none of the checks fired (pre-training had converged, {close}labels are not few): "
                       "the backbone's features may not suit this task")
    return list(dict.fromkeys(reasons))
