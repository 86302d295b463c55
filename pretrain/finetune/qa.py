"""Extractive question answering: the answer is a span of the context (SQuAD).

Data (``read_qa``): SQuAD v1.1 / v2.0 JSON (data → paragraphs → context, qas → question, id, answers{text,
answer_start}, is_impossible) or a table (CSV/TSV/JSONL/Parquet) with question, context, answer_text and
answer_start columns (names in FinetuneConfig). Every answer is checked to be at its ``answer_start``.

Windows (``encode_qa``): ``[CLS] question [SEP] context [SEP]`` for encoders, ``question <eot> context <eot>``
for decoders (the context sees the question). A context longer than fits is cut into windows that share
``doc_stride`` tokens (Hugging Face's ``stride``: windows start every ``room - doc_stride`` tokens until one
reaches the end), and each context token keeps its character offsets, so a span maps back to the exact
characters of the context. A training window holds the answer whole or points at the null position.

The null position ("no answer", SQuAD 2.0) is the first token for an encoder ([CLS]) and the last for a
decoder (the only one that has seen everything). An encoder's null position always takes part in the
softmax (as transformers' question-answering pipeline); a decoder's only when it was trained with
unanswerable questions.

Decoding (``decode``): per window, softmax of the start and of the end logits over the context tokens (and
the null position), every span of at most ``max_answer_length`` tokens scored p(start) x p(end), the
window's ``n_best`` kept; the same answer text found more than once (in overlapping windows, above all)
adds up its scores, the highest total wins — transformers' question-answering pipeline's rule (4.x, with
top_k = ``n_best``, align_to_words False), so an export answers the same. With unanswerable questions in
training, the answer is empty when the smallest null score over the windows beats the best span's by more
than ``null_threshold``.

Metrics (``squad_em_f1``): exact match and token F1 after the official SQuAD normalisation (lower case,
no punctuation, no articles, single spaces), the maximum over the gold answers.
"""

from __future__ import annotations

import collections
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.config import ConfigError, FinetuneConfig
from pretrain.finetune.data import TaskDataError, _column, _rows
from pretrain.finetune.encode import length_batches

NEG = -1e4
"""Logit given to positions that cannot start or end an answer (as the pipeline's mask)."""


@dataclass
class QAExamples:
    """Questions over contexts: ``answers[i]`` the gold (text, character start) pairs, [] when the question
    has no answer in its context, None without answers (prediction)."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]] | None
    source: str
    skipped: int = 0
    """Rows left out by ``bad_rows`` 'skip'."""

    labels = None  # (no classes: budgets and carved splits sample questions uniformly)

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: list[int]) -> QAExamples:
        return QAExamples([self.ids[i] for i in idx], [self.questions[i] for i in idx],
                          [self.contexts[i] for i in idx],
                          None if self.answers is None else [self.answers[i] for i in idx], self.source,
                          self.skipped)

    @property
    def texts(self) -> list[str]:
        """The distinct contexts, then the questions (what the tokenizer reads; for transfer's checks)."""
        return list(dict.fromkeys(self.contexts)) + self.questions

    @property
    def unanswerable(self) -> int:
        return 0 if self.answers is None else sum(not a for a in self.answers)


# ---------------------------------------------------------------------------------------------------- reading
def _squad(path: Path) -> dict[str, Any] | None:
    """The SQuAD document in ``path`` (a .json whose top level is an object with a 'data' list), else None."""
    if path.suffix.lower() != ".json":
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg})") from None
    if isinstance(doc, dict):
        if not isinstance(doc.get("data"), list):
            raise TaskDataError(f"{path}: a SQuAD file has a top-level 'data' list (data → paragraphs → "
                                f"context, qas); this one's keys are {', '.join(map(str, doc)) or '(none)'}")
        return doc
    return None


def _rows_of_squad(path: Path, doc: dict[str, Any], with_answers: bool) -> list[dict[str, Any]]:
    rows = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs") or []) if isinstance(article, dict) else []:
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                raise TaskDataError(f"{path}: data[{a}].paragraphs[{p}] has no 'qas' list")
            context = para.get("context")
            for q, qa in enumerate(para["qas"]):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise TaskDataError(f"{path}: {where} is not an object")
                answers = qa.get("answers") or []
                if with_answers and not isinstance(answers, list):
                    raise TaskDataError(f"{path}: {where}: 'answers' is not a list")
                gold = []
                if with_answers and not qa.get("is_impossible", False):
                    for an in answers:
                        if not isinstance(an, dict) or "text" not in an or "answer_start" not in an:
                            raise TaskDataError(f"{path}: {where}: an answer needs 'text' and 'answer_start' "
                                                f"(got {an!r})")
                        gold.append((an["text"], an["answer_start"]))
                    if not gold:
                        raise TaskDataError(f"{path}: {where} has no answers and is not marked "
                                            "'is_impossible' (SQuAD 2.0 marks unanswerable questions)")
                rows.append({"id": str(qa.get("id", where)), "question": qa.get("question"),
                             "context": context, "answers": gold, "where": where})
    return rows


def _rows_of_table(path: Path, cfg: FinetuneConfig, with_answers: bool) -> list[dict[str, Any]]:
    rows, columns = _rows(path)
    qs = _column(rows, columns, cfg.question_column, path, "--question-column")
    cs = _column(rows, columns, cfg.context_column, path, "--context-column")
    ids = [r.get(cfg.id_column) for r in rows] if cfg.id_column in columns else [None] * len(rows)
    texts = starts = [None] * len(rows)
    if with_answers:
        texts = _column(rows, columns, cfg.answer_column, path, "--answer-column")
        starts = _column(rows, columns, cfg.answer_start_column, path, "--answer-start-column")
    out = []
    for i, (q, c, t, s, rid) in enumerate(zip(qs, cs, texts, starts, ids)):
        where = f"row {i + 1}"
        gold = []
        if with_answers and isinstance(t, str) and t != "":
            try:
                start = int(s)
                if start != float(s):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise TaskDataError(f"{path}: {where}: {cfg.answer_start_column!r} is {s!r}, not a character "
                                    "offset") from None
            gold.append((t, start))
        elif with_answers and t is not None and not isinstance(t, str) and not (
                isinstance(t, float) and t != t):  # (a NaN: an empty cell of a numeric column)
            raise TaskDataError(f"{path}: {where}: {cfg.answer_column!r} is {t!r}, not text")
        out.append({"id": str(rid) if rid is not None else str(i), "question": q, "context": c,
                    "answers": gold, "where": where})
    return out


def read_qa(path: str | Path, cfg: FinetuneConfig, with_answers: bool = True) -> QAExamples:
    """Questions, contexts and (``with_answers``) answers from SQuAD JSON or a table. A row that cannot be
    used — no question, an empty context, an answer whose text is not at its ``answer_start`` — stops with
    an error that says how many there are and shows the first, or (``cfg.bad_rows`` 'skip') is left out
    with a warning that counts them."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"file not found: {path}")
    doc = _squad(path)
    rows = (_rows_of_squad(path, doc, with_answers) if doc is not None
            else _rows_of_table(path, cfg, with_answers))
    if not rows:
        raise TaskDataError(f"{path} has no questions")
    problems: dict[str, list[str]] = collections.defaultdict(list)
    keep = []
    for r in rows:
        q, c, where = r["question"], r["context"], f"{r['where']} (id {r['id']})"
        if not isinstance(q, str) or not q.strip():
            problems["have no question"].append(f"{where}: the question is {q!r}")
        elif not isinstance(c, str) or not c.strip():
            problems["have an empty context"].append(f"{where}: the context is {c!r}")
        else:
            wrong = [(t, s) for t, s in r["answers"] if not isinstance(t, str) or not isinstance(s, int)
                     or s < 0 or c[s:s + len(t)] != t]
            if wrong:
                t, s = wrong[0]
                at = c[s:s + len(t)] if isinstance(s, int) and isinstance(t, str) and s >= 0 else None
                problems["have an answer that is not at its answer_start in the context"].append(
                    f"{where}: the answer is {t!r}, the context at {s} reads {at!r}"
                    + (f" (the text is at {c.find(t)})" if isinstance(t, str) and t and t in c else ""))
                continue
            keep.append(r)
    skipped = len(rows) - len(keep)
    for what, cases in problems.items():
        if cfg.bad_rows == "error":
            raise TaskDataError(f"{path}: {len(cases)} question(s) {what}; the first: {cases[0]} "
                                "(fix them, or leave them out with --bad-rows skip)")
        print(f"warning: {path}: skipped {len(cases)} question(s) that {what}; the first: {cases[0]}",
              file=sys.stderr)
    if not keep:
        raise TaskDataError(f"{path}: no usable questions (all {len(rows)} skipped)")
    return QAExamples([r["id"] for r in keep], [r["question"] for r in keep], [r["context"] for r in keep],
                      [r["answers"] for r in keep] if with_answers else None, str(path), skipped)


# --------------------------------------------------------------------------------------------------- encoding
@dataclass
class Windows:
    """Model inputs, one per window of a (question, context) pair."""

    ids: list[list[int]] = field(default_factory=list)
    example: list[int] = field(default_factory=list)
    """The example (question) each window belongs to."""
    ctx_at: list[int] = field(default_factory=list)
    """Position in ``ids`` of the window's first context token."""
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)
    """Character offsets in the context of the window's context tokens."""
    null_at: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    """Training targets: the answer's first and last token positions (the null position without one)."""
    end: list[int] = field(default_factory=list)
    skipped: int = 0
    """Questions left out for being longer than max_length (bad_rows 'skip': no window, decoded as no
    answer)."""

    @property
    def targets(self) -> list[tuple[int, int]]:
        return list(zip(self.start, self.end))


def answer_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and last token (indices into ``offsets``) covering characters [start, end) of the context,
    or None when no token does."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def window_starts(n: int, room: int, stride: int) -> list[int]:
    """Where each window of ``room`` tokens starts in a context of ``n`` tokens, consecutive windows sharing
    ``stride`` tokens; the last reaches the end (as `tokenizers`' overflowing truncation)."""
    starts, s = [], 0
    while True:
        starts.append(s)
        if s + room >= n:
            return starts
        s += room - stride


def null_in_softmax(encoder: bool, null: bool) -> bool:
    """Whether the null position takes part in the softmax (see the module's docstring)."""
    return encoder or null


def encode_qa(tok, ex: QAExamples, encoder: bool, max_len: int, cfg: FinetuneConfig, null: bool,
              train: bool) -> Windows:
    """Windows of every (question, context) pair. ``null``: the model answers 'no answer' (it was, or is
    being, trained with unanswerable questions). ``train``: targets set; a window that does not hold its
    answer whole points at the null position, or, when the null position is not in the softmax, is left
    out."""
    lead = [tok.cls_id] if encoder and tok.cls_id is not None else []
    eot = tok.eot_id
    q_ids = tok.encode_batch(ex.questions, text_only=True)
    ctx = tok.encode_offsets(ex.contexts, text_only=True)
    with_null = null_in_softmax(encoder, null)
    w = Windows()
    too_long: list[str] = []
    for i, (q, (c_ids, c_off)) in enumerate(zip(q_ids, ctx)):
        room = max_len - len(lead) - len(q) - 2
        if room < 1:
            too_long.append(f"id {ex.ids[i]} ({len(q)} tokens)")
            continue
        if cfg.doc_stride >= room and len(c_ids) > room:
            raise ConfigError(f"--doc-stride {cfg.doc_stride} is too large: with --max-length {max_len} "
                              f"and the {len(q)} tokens of question id {ex.ids[i]}, a window holds {room} "
                              "context tokens, and consecutive windows must share fewer than that (lower "
                              "--doc-stride, or raise --max-length)")
        span = None
        if train and ex.answers is not None and ex.answers[i]:
            text, s = ex.answers[i][0]
            span = answer_tokens(c_off, s, s + len(text))
        for ws in window_starts(len(c_ids), room, cfg.doc_stride):
            we = min(ws + room, len(c_ids))
            ids = [*lead, *q, eot, *c_ids[ws:we], eot]
            at = len(lead) + len(q) + 1
            null_at = 0 if encoder else len(ids) - 1
            if train:
                if span is not None and ws <= span[0] and span[1] < we:
                    st, en = at + span[0] - ws, at + span[1] - ws
                elif with_null:
                    st = en = null_at
                else:
                    continue
                w.start.append(st)
                w.end.append(en)
            w.ids.append(ids)
            w.example.append(i)
            w.ctx_at.append(at)
            w.offsets.append(c_off[ws:we])
            w.null_at.append(null_at)
    if too_long:
        what = (f"{ex.source}: {len(too_long)} question(s) are longer than --max-length {max_len} leaves "
                "room for (with the special tokens and at least one context token); the first: "
                f"{too_long[0]}")
        if cfg.bad_rows == "error":
            raise TaskDataError(what + " (raise --max-length, or leave them out with --bad-rows skip)")
        print(f"warning: skipped {what}", file=sys.stderr)
        w.skipped = len(too_long)
    return w


def allowed_positions(w: Windows, idx: list[int], width: int, with_null: bool) -> torch.Tensor:
    """(B, width) bool: the positions of windows ``idx`` an answer may start or end at (context tokens, and
    the null position when ``with_null``)."""
    allowed = torch.zeros((len(idx), width), dtype=torch.bool)
    for r, i in enumerate(idx):
        allowed[r, w.ctx_at[i]:w.ctx_at[i] + len(w.offsets[i])] = True
        if with_null:
            allowed[r, w.null_at[i]] = True
    return allowed


def qa_loss(logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
            allowed: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies over the allowed positions; ``logits`` (B, T, 2)."""
    x = logits.float().masked_fill(~allowed[..., None], NEG)
    ce = nn.functional.cross_entropy
    return (ce(x[..., 0], start) + ce(x[..., 1], end)) / 2


# --------------------------------------------------------------------------------------------------- decoding
@dataclass
class Answer:
    text: str
    start: int
    """Character offsets of ``text`` in the context (-1, -1: no answer)."""
    end: int
    score: float
    """p(start) x p(end) in its window, summed over the windows that found the same text (for no answer: the
    null score)."""


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def window_spans(start_logits: np.ndarray, end_logits: np.ndarray, ctx_at: int,
                 offsets: list[tuple[int, int]], null_at: int, with_null: bool, max_answer_length: int,
                 n_best: int = 1,
                 ) -> tuple[list[tuple[int, int, float]], float | None]:
    """A window's ``n_best`` spans as (first character, end character, p(start) x p(end)), best first (spans
    of no probability left out), and its null score (None without the null position). ``*_logits``: (T,)
    over the window's positions. As the question-answering pipeline's ``select_starts_ends`` /
    ``decode_spans``: float32 softmax over the context tokens (and the null position), the outer product
    banded to ``max_answer_length``, the first maximum in (start, end) order for one span, a partition
    for more."""
    allowed = np.zeros(start_logits.shape[0], dtype=bool)
    allowed[ctx_at:ctx_at + len(offsets)] = True
    if with_null:
        allowed[null_at] = True
    ps = _softmax(np.where(allowed, start_logits.astype(np.float32), np.float32(NEG)))
    pe = _softmax(np.where(allowed, end_logits.astype(np.float32), np.float32(NEG)))
    null = float(ps[null_at] * pe[null_at]) if with_null else None
    n = len(offsets)
    scores = np.tril(np.triu(np.outer(ps[ctx_at:ctx_at + n], pe[ctx_at:ctx_at + n])), max_answer_length - 1)
    flat = scores.ravel()
    if n_best == 1:
        top = [int(np.argmax(flat))]
    elif flat.size <= n_best:
        top = list(np.argsort(-flat))
    else:
        part = np.argpartition(-flat, n_best)[:n_best]
        top = list(part[np.argsort(-flat[part])])
    spans = []
    for f in top:
        a, b = divmod(int(f), n)
        if flat[f] > 0:
            spans.append((offsets[a][0], offsets[b][1], float(flat[f])))
    return spans, null


def decode(ex: QAExamples, w: Windows, logits: list[np.ndarray], with_null: bool, null: bool,
           cfg: FinetuneConfig) -> list[Answer]:
    """The answer to every example from its windows' (T, 2) logits, as transformers' question-answering
    pipeline answers (its top_k = ``n_best``, align_to_words False): each window's ``n_best`` spans; the same
    text (ignoring case) found more than once adds up its scores; the highest total wins (the first found on
    a tie), at the characters where it was first found. With ``null`` (the model may answer nothing): no
    answer when the smallest null score over the windows beats it by more than ``null_threshold``. The
    answer is the span's characters without surrounding whitespace (a byte-level BPE token carries its
    leading space). A question with no window (too long, skipped) gets no answer."""
    found: list[dict[str, list]] = [{} for _ in range(len(ex))]  # text.lower() → [start, end, total score]
    nulls: list[float | None] = [None] * len(ex)
    for i, lg in enumerate(logits):
        j = w.example[i]
        spans, nl = window_spans(lg[:, 0], lg[:, 1], w.ctx_at[i], w.offsets[i], w.null_at[i], with_null,
                                 cfg.max_answer_length, cfg.n_best)
        for cs, ce, score in spans:
            key = ex.contexts[j][cs:ce].lower()
            if key in found[j]:
                found[j][key][2] += score
            else:
                found[j][key] = [cs, ce, score]
        if nl is not None:
            nulls[j] = nl if nulls[j] is None else min(nulls[j], nl)
    out = []
    for j in range(len(ex)):
        best = max(found[j].values(), key=lambda v: v[2], default=None)  # (the first of equals)
        nl = nulls[j]
        if best is None or (null and nl is not None and nl - best[2] > cfg.null_threshold):
            out.append(Answer("", -1, -1, nl if nl is not None else 0.0))
            continue
        cs, ce, score = best
        raw = ex.contexts[j][cs:ce]
        lead = len(raw) - len(raw.lstrip())
        text = raw.strip()
        out.append(Answer(text, cs + lead, cs + lead + len(text), score))
    return out


@torch.no_grad()
def window_logits(model: nn.Module, w: Windows, pad: int, batch_size: int, device: torch.device,
                  dtype: str = "auto") -> list[np.ndarray]:
    """(T_i, 2) start/end logits of every window (its own length, no padding)."""
    from pretrain.finetune.encode import _batch
    from pretrain.hardware import autocast_context

    model.eval()
    out: list[np.ndarray] = [None] * len(w.ids)  # type: ignore[list-item]
    for idx in length_batches([len(r) for r in w.ids], batch_size, None):
        x, mask, _ = _batch([w.ids[i] for i in idx], pad)
        with autocast_context(device, dtype):
            lg = model(x.to(device), mask.to(device)).float().cpu().numpy()
        for r, i in enumerate(idx):
            out[i] = lg[r, :len(w.ids[i])]
    return out


# ---------------------------------------------------------------------------------------------------- metrics
def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower case, punctuation and the articles a/an/the removed,
    whitespace collapsed."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:  # no answer: right only when both are empty
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Exact match and F1 (fractions, 0..1), each the maximum over a question's gold answers; a question
    with no gold answer (SQuAD 2.0) is right only when the prediction is empty. With unanswerable questions
    also ``has_answer_f1`` and ``no_answer_accuracy``."""
    em, f1, has, no = [], [], [], []
    for p, gs in zip(preds, golds):
        gs = list(gs) or [""]
        e = max(float(normalize_answer(p) == normalize_answer(g)) for g in gs)
        f = max(_f1(p, g) for g in gs)
        em.append(e)
        f1.append(f)
        (has if any(g for g in gs) else no).append(f)
    out = {"exact_match": float(np.mean(em)) if em else 0.0, "f1": float(np.mean(f1)) if f1 else 0.0}
    if no:
        out["has_answer_f1"] = float(np.mean(has)) if has else 0.0
        out["no_answer_accuracy"] = float(np.mean(no))
    return out
