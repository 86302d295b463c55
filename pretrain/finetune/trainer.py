"""Fine-tune a pre-trained run on labelled data; load the result; predict.

``finetune(run, train, valid, out, cfg)`` adapts the run's backbone (or a random init of the same
architecture with ``from_scratch``) to sequence classification, regression, or token classification;
full fine-tuning, head-only, or LoRA adapters (peft); layer-wise learning-rate decay; early stopping on
the validation metric; the best model kept in OUT (model.safetensors + finetune.json + tokenizer.json)
and one metrics.jsonl line per epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain import PretrainError
from pretrain.config import ConfigError, _check, dump_yaml, from_dict
from pretrain.finetune.data import (
    Examples,
    TaskDataError,
    TokenExamples,
    check_known,
    label_names,
    read_conll,
    read_examples,
)
from pretrain.finetune.model import TaskModel
from pretrain.models import spec_of

TASKS = ("classification", "regression", "token")
IGNORE = -100
FT_FILE = "finetune.json"
WEIGHTS = "model.safetensors"


@dataclass
class FinetuneConfig:
    task: str = "classification"
    """'classification' (one label per text or text pair), 'regression' (a number per text or pair) or
    'token' (one tag per word, CoNLL files)."""
    text_column: str = "text"
    """Column (CSV/TSV/Parquet) or field (JSONL) holding the text."""
    text_pair_column: str | None = None
    """Second text column for sentence-pair tasks (entailment, paraphrase, similarity)."""
    label_column: str = "label"
    """Column holding the label (a class name or number; a float for regression)."""
    epochs: int = 3
    """Passes over the training data (early stopping may end sooner)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (of the top layer when layer_decay < 1)."""
    head_lr: float = 0.0
    """Learning rate of the task head (0 = same as lr)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: the top block gets lr, each block below a factor layer_decay less, the
    embeddings lr × layer_decay^n_layer (1 = off)."""
    head_only: bool = False
    """Freeze the backbone; train the task head only."""
    lora: bool = False
    """Train LoRA adapters on the blocks' linear layers (and the head) instead of all weights (needs peft)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    warmup_frac: float = 0.06
    """Fraction of the steps spent warming the LR up linearly; it then decays linearly to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    dropout: float = 0.1
    """Dropout in the backbone and before the head while fine-tuning."""
    pooling: str = "auto"
    """Sequence representation: 'cls' (encoders), 'last' (decoders), 'mean', or 'auto' (cls / last)."""
    max_length: int = 0
    """Longest input in tokens, specials included (0 = the model's context)."""
    truncation: str = "end"
    """Over-long inputs: 'end' (cut the end; the longer text of a pair first), 'start' (keep the end)
    or 'error'. The number truncated is reported."""
    patience: int = 3
    """Early stopping: stop after this many evaluations without a better validation metric (0 = never)."""
    evals_per_epoch: int = 1
    """Validation passes per epoch (early stopping counts them)."""
    prompt: str = ""
    """Prompt-based classification (PET / LM-BFF): a template with {text} (and {text_pair} for pairs) and
    {mask}, e.g. '{text} It was {mask}.' The backbone's own LM head scores the --verbalizer words at {mask}
    (encoders: a [MASK] token; decoders: the next token, so {mask} must end the template), so no head
    starts from random. '' = a linear head on pooled features."""
    verbalizer: str = ""
    """With --prompt: one word per label, 'label=word,...' (e.g. '0=terrible,1=great'); each word must be a
    single token of the run's vocabulary."""
    from_scratch: bool = False
    """Start from a random init of the run's architecture instead of its weights (the baseline)."""
    seed: int = 0
    """Seed of the head init, dropout, shuffling (and the scratch init)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bf16 on CUDA and on CPUs with native bf16 instructions, fp32 elsewhere), 'bf16' or
    'fp32'."""

    def __post_init__(self) -> None:
        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.max_steps >= 0, "max_steps must be >= 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0 and self.head_lr >= 0, "lr must be > 0 and head_lr >= 0")
        _check(0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]")
        _check(not (self.head_only and self.lora), "head_only and lora exclude each other")
        _check(self.lora_r >= 1, "lora_r must be >= 1")
        _check(self.lora_alpha > 0, "lora_alpha must be > 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        _check(0 <= self.warmup_frac < 1, "warmup_frac must be in [0, 1)")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(self.pooling in ("auto", "cls", "last", "mean"), f"pooling must be auto, cls, last or mean, got {self.pooling!r}")
        _check(self.max_length >= 0, "max_length must be >= 0")
        _check(self.truncation in ("end", "start", "error"), f"truncation must be end, start or error, got {self.truncation!r}")
        _check(self.patience >= 0 and self.evals_per_epoch >= 1, "patience must be >= 0, evals_per_epoch >= 1")
        _check(self.dtype in ("auto", "bf16", "fp32"), f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.prompt or self.verbalizer:
            _check(self.task == "classification", "prompt/verbalizer are for task classification only")
            _check(bool(self.prompt and self.verbalizer), "prompt-based classification needs both prompt and verbalizer")
            parse_template(self.prompt, self.text_pair_column is not None)
            parse_verbalizer(self.verbalizer)


# ---------------------------------------------------------------------------------------- backbone


def load_backbone(run: str | Path, dropout: float, from_scratch: bool, seed: int):
    """The run's model rebuilt with fine-tuning dropout → (backbone, Config, Tokenizer, checkpoint path)."""
    from pretrain.checkpoint import CheckpointError, load_pretrained, resolve_checkpoint
    from pretrain.models import build_model

    try:
        ckpt = resolve_checkpoint(run)
        pre, cfg, tok, _ = load_pretrained(ckpt)
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    cfg.model = dataclasses.replace(cfg.model, dropout=dropout)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if not from_scratch:
        model.load_state_dict(pre.state_dict())
    return model, cfg, tok, ckpt


# ---------------------------------------------------------------------------------------- encoding


def _truncate(a: list[int], b: list[int] | None, room: int, mode: str, what: str) -> tuple[list[int], list[int] | None]:
    if mode == "error":
        raise TaskDataError(f"{what} is {len(a) + len(b or [])} tokens, more than the {room} that fit with the special "
                            "tokens (use --truncation end|start or a larger --max-length)")
    while len(a) + len(b or []) > room:
        if b is not None and len(b) > len(a):
            b = b[:-1] if mode == "end" else b[1:]
        else:
            a = a[:-1] if mode == "end" else a[1:]
    return a, b


def encode_inputs(tok, texts: list[str], pairs: list[str] | None, encoder: bool, max_len: int,
                  truncation: str, source: str = "") -> tuple[list[list[int]], int]:
    """Token ids with the specials of the architecture, and how many inputs were truncated.

    Encoders: ``[CLS] a [SEP] (b [SEP])``; decoders: ``a <eot> (b <eot>)`` (the last token sees everything)."""
    eot = tok.eot_id
    lead = [tok.cls_id] if encoder and tok.cls_id is not None else []
    ids_a = tok.encode_batch(texts, text_only=True)
    ids_b = tok.encode_batch(pairs, text_only=True) if pairs is not None else [None] * len(texts)
    out, truncated = [], 0
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        room = max_len - len(lead) - (2 if b is not None else 1)
        if room < (2 if b is not None else 1):  # (checked per row: whether there is a pair can differ)
            raise ConfigError(f"max_length {max_len} leaves no room for the text once the special tokens "
                              f"({max_len - room}) are added; raise --max-length")
        if len(a) + len(b or []) > room:
            truncated += 1
            a, b = _truncate(a, b, room, truncation, (f"{source}: " if source else "") + f"row {i + 1}")
        x = [*lead, *a, eot] + ([*b, eot] if b is not None else [])
        out.append(x)
    return out, truncated


PROMPT_FIELDS = ("{text}", "{text_pair}", "{mask}")


def parse_template(template: str, pair: bool) -> list[str]:
    """``'{text} It was {mask}.'`` → ``['{text}', ' It was ', '{mask}', '.']`` (fields and literal text)."""
    import re

    parts = [p for p in re.split(r"(\{text\}|\{text_pair\}|\{mask\})", template) if p]
    for field in PROMPT_FIELDS:
        want = 0 if field == "{text_pair}" and not pair else 1
        if parts.count(field) != want:
            raise ConfigError(f"prompt {template!r} must hold {field} {'exactly once' if want else 'only with --text-pair-column'}"
                              f" (fields: {', '.join(PROMPT_FIELDS)}; other braces are not allowed)")
    if any("{" in p or "}" in p for p in parts if p not in PROMPT_FIELDS):
        raise ConfigError(f"prompt {template!r} has an unknown field; the fields are {', '.join(PROMPT_FIELDS)}")
    return parts


def parse_verbalizer(spec: str) -> dict[str, str]:
    """``'0=terrible,1=great'`` → ``{'0': 'terrible', '1': 'great'}``."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise ConfigError(f"verbalizer {spec!r}: each item is label=word, got {item!r}")
        if label.strip() in out:
            raise ConfigError(f"verbalizer {spec!r} names label {label.strip()!r} twice")
        out[label.strip()] = word.strip()
    if len(set(out.values())) < len(out):
        raise ConfigError(f"verbalizer {spec!r}: every label needs its own word")
    return out


def verbalizer_ids(tok, spec: str, names: list[Any], encoder: bool) -> list[int]:
    """The vocabulary id of each label's word, in the order of ``names``; each word must be one token
    (decoders: the word as it follows a space, as it comes after the prompt)."""
    words = parse_verbalizer(spec)
    unknown = sorted(set(words) - {str(n) for n in names})
    missing = [str(n) for n in names if str(n) not in words]
    if unknown or missing:
        raise ConfigError(f"verbalizer {spec!r} does not match the labels {[str(n) for n in names]}"
                          + (f"; no word for {missing}" if missing else "") + (f"; not a label: {unknown}" if unknown else ""))
    ids = []
    for n in names:
        word = words[str(n)]
        pieces = tok.encode(word if encoder else " " + word)
        if len(pieces) != 1:
            raise ConfigError(f"verbalizer word {word!r} is {len(pieces)} tokens in this vocabulary "
                              f"({[tok.decode([p]) for p in pieces]}); prompt-based classification needs one-token words")
        if tok.unk_id is not None and pieces[0] == tok.unk_id:
            raise ConfigError(f"verbalizer word {word!r} is not in this vocabulary (it encodes to the unknown "
                              "token); choose a word the tokenizer knows")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"verbalizer {spec!r}: two labels map to the same token")
    return ids


def encode_prompts(tok, template: str, texts: list[str], pairs: list[str] | None, encoder: bool, max_len: int,
                   truncation: str, source: str = "") -> tuple[list[list[int]], int]:
    """Ids of every text set into ``template``, and how many were truncated (the texts are cut, never the
    template). Encoders: ``[CLS] ... [MASK] ... [SEP]``; decoders end right before the slot."""
    parts = parse_template(template, pairs is not None)
    if encoder and tok.mask_id is None:
        raise ConfigError("prompt-based classification on an encoder needs a tokenizer with a mask token")
    if not encoder and parts[-1] != "{mask}" and parts[-1].strip():
        raise ConfigError(f"prompt {template!r}: a decoder predicts the next token, so {{mask}} must end the template")
    if not encoder:
        parts = parts[:parts.index("{mask}")]
        if parts and parts[-1] not in PROMPT_FIELDS:
            parts[-1] = parts[-1].rstrip()  # the label word carries its own leading space
    lead = [tok.cls_id] if encoder and tok.cls_id is not None else []
    tail = [tok.eot_id] if encoder else []
    literal = {i: tok.encode(p) for i, p in enumerate(parts) if p not in PROMPT_FIELDS}
    fixed = len(lead) + len(tail) + sum(len(v) for v in literal.values()) + (1 if encoder else 0)
    room = max_len - fixed
    if room < (2 if pairs is not None else 1):
        raise ConfigError(f"prompt {template!r} leaves no room for the text in {max_len} tokens")
    clean = lambda ids: [t for t in ids if t != tok.mask_id] if encoder else ids  # noqa: E731 (one slot per row)
    ids_a = tok.encode_batch(texts, text_only=True)
    ids_b = tok.encode_batch(pairs, text_only=True) if pairs is not None else [None] * len(texts)
    out, truncated = [], 0
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        a, b = clean(a), (clean(b) if b is not None else None)
        if len(a) + len(b or []) > room:
            truncated += 1
            a, b = _truncate(a, b, room, truncation, (f"{source}: " if source else "") + f"row {i + 1}")
        x = list(lead)
        for j, p in enumerate(parts):
            x += a if p == "{text}" else (b or []) if p == "{text_pair}" else [tok.mask_id] if p == "{mask}" else literal[j]
        out.append(x + tail)
    return out, truncated


def encode_words(tok, words: list[list[str]], tags: list[list[int]] | None, encoder: bool, max_len: int,
                 truncation: str = "end", source: str = "", label_at: str | None = None,
                 ) -> tuple[list[list[int]], list[list[int]], list[list[int]], int]:
    """CoNLL sentences → ids, per-token labels (the word's tag on one sub-token, IGNORE elsewhere), the index
    of that sub-token for each word (-1 when truncated away), and the number of sentences truncated.

    The labelled sub-token is the word's last for a decoder (the first position that has seen the whole word:
    with a char or byte tokenizer the first is the space before it) and its first that is not just whitespace
    for an encoder (``label_at`` None, or 'last' / 'first'; 'first_piece', the first whatever it is, is how models
    fine-tuned before finetune.json recorded ``token_label`` were trained). Over-long sentences lose whole words
    at the end (``truncation`` 'end') or start ('start')."""
    label_at = label_at or ("first" if encoder else "last")
    lead = [tok.cls_id] if encoder and tok.cls_id is not None else []
    room = max_len - len(lead) - 1
    out_ids, out_labels, out_at, truncated = [], [], [], 0
    for s, sent in enumerate(words):
        pieces = [tok.encode(word if w == 0 else " " + word, text_only=True) or [tok.eot_id]
                  for w, word in enumerate(sent)]
        lens = [len(p) for p in pieces]
        keep = range(len(sent))
        if sum(lens) > room:
            if truncation == "error":
                raise TaskDataError((f"{source}: " if source else "") + f"sentence {s + 1} is {sum(lens)} tokens, more than the {room} that "
                                    f"fit in --max-length {max_len} with the special tokens (use --truncation "
                                    "end|start or a larger --max-length)")
            truncated += 1
            total, k = 0, 0  # the most whole words that fit, from the end or the start
            order = range(len(sent) - 1, -1, -1) if truncation == "start" else range(len(sent))
            for w in order:
                if total + lens[w] > room:
                    break
                total, k = total + lens[w], k + 1
            keep = range(len(sent) - k, len(sent)) if truncation == "start" else range(k)
        ids, labels, at = list(lead), [IGNORE] * len(lead), [-1] * len(sent)
        for w in keep:
            p = pieces[w]
            j = len(p) - 1 if label_at == "last" else 0 if label_at == "first_piece" else \
                next((i for i, t in enumerate(p) if tok.decode([t]).strip()), 0)
            at[w] = len(ids) + j
            labels += [IGNORE] * j + [tags[s][w] if tags is not None else IGNORE] + [IGNORE] * (len(p) - 1 - j)
            ids += p
        ids.append(tok.eot_id)
        labels.append(IGNORE)
        out_ids.append(ids)
        out_labels.append(labels)
        out_at.append(at)
    return out_ids, out_labels, out_at, truncated


def _batch(rows: list[list[int]], pad: int, labels: list[list[int]] | None = None):
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long) if labels is not None else None
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        if y is not None:
            y[i, :len(r)] = torch.tensor(labels[i])
    return x, mask, y


def length_batches(lengths: list[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Batches of similar lengths (less padding). Shuffled by ``rng`` (training) or in order (evaluation)."""
    idx = list(range(len(lengths)))
    if rng is None:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------- metrics


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


def compute_metrics(task: str, pred: list[Any], gold: list[Any]) -> dict[str, float]:
    """Validation metrics; ``metric`` is the one early stopping and reports use (higher is better)."""
    if task == "regression":
        p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        pearson = float(np.corrcoef(p, g)[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
        spearman = float(np.corrcoef(_ranks(p), _ranks(g))[0, 1]) if p.std() > 0 and g.std() > 0 else 0.0
        return {"metric": pearson, "pearson": pearson, "spearman": spearman, "mse": float(((p - g) ** 2).mean())}
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
    return {"metric": acc, "accuracy": acc, "macro_f1": float(np.mean(f1s))}


# ---------------------------------------------------------------------------------------- task data


@dataclass
class Encoded:
    ids: list[list[int]]
    targets: list[Any]  # class index / float / per-token label list
    first: list[list[int]] | None  # token tasks: the labelled sub-token of each word (see encode_words)
    truncated: int


def _encode_task(cfg: FinetuneConfig, tok, encoder: bool, max_len: int, ex, names: list[Any],
                 token_label: str | None = None) -> Encoded:
    if cfg.task == "token":
        tag_ids = None if ex.tags is None else [[names.index(t) for t in s] for s in ex.tags]
        ids, labels, first, n = encode_words(tok, ex.words, tag_ids, encoder, max_len, cfg.truncation, ex.source,
                                             token_label)
        return Encoded(ids, labels, first, n)
    if cfg.prompt:
        ids, n = encode_prompts(tok, cfg.prompt, ex.texts, ex.pairs, encoder, max_len, cfg.truncation, ex.source)
    else:
        ids, n = encode_inputs(tok, ex.texts, ex.pairs, encoder, max_len, cfg.truncation, ex.source)
    if ex.labels is None:
        targets = [None] * len(ids)
    elif cfg.task == "regression":
        targets = [float(v) for v in ex.labels]
    else:
        index = {str(v): i for i, v in enumerate(names)}
        targets = [index[str(v)] for v in ex.labels]
    return Encoded(ids, targets, None, n)


def read_task(cfg: FinetuneConfig, path: str | Path, with_labels: bool = True):
    if cfg.task == "token":
        return read_conll(path, with_tags=with_labels)
    return read_examples(path, cfg.text_column, cfg.label_column if with_labels else None, cfg.text_pair_column)


def _labels_of(cfg: FinetuneConfig, ex) -> list[Any]:
    if cfg.task == "token":
        return [t for s in ex.tags for t in s]
    return ex.labels


@torch.no_grad()
def run_model(model: TaskModel, enc: Encoded, task: str, names: list[Any], pad: int, batch_size: int,
              device: torch.device, dtype: str = "auto") -> tuple[list[Any], np.ndarray | list]:
    """Predictions (label names / floats / per-word tags) and scores (class probabilities / floats)."""
    from pretrain.hardware import autocast_context

    model.eval()
    n = len(enc.ids)
    preds: list[Any] = [None] * n
    scores: list[Any] = [None] * n
    for idx in length_batches([len(r) for r in enc.ids], batch_size, None):
        x, mask, _ = _batch([enc.ids[i] for i in idx], pad)
        with autocast_context(device, dtype):
            out = model(x.to(device), mask.to(device)).float().cpu()
        for r, i in enumerate(idx):
            if task == "regression":
                preds[i] = scores[i] = float(out[r, 0])
            elif task == "token":
                tag_idx = out[r].argmax(-1).tolist()
                default = names.index("O") if "O" in names else 0
                preds[i] = [names[tag_idx[t]] if t >= 0 else names[default] for t in enc.first[i]]
                scores[i] = None
            else:
                p = torch.softmax(out[r], -1)
                preds[i] = names[int(p.argmax())]
                scores[i] = p.numpy()
    return preds, scores


# ---------------------------------------------------------------------------------------- training


def _param_groups(model: nn.Module, cfg: FinetuneConfig, n_layers: int) -> list[dict[str, Any]]:
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = inner.layer_of(name.removeprefix("base_model.model."))
        is_head = depth == n_layers + 1
        lr = (cfg.head_lr or cfg.lr) if is_head else cfg.lr * cfg.layer_decay ** (n_layers - depth)
        wd = cfg.weight_decay if p.ndim >= 2 and not inner.is_embedding(name) and not is_head else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd, "base_lr": lr} for (lr, wd), ps in groups.items()]


def _apply_lora(model: TaskModel, cfg: FinetuneConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PretrainError("LoRA needs the peft library: pip install 'pretrain[lora]' (or pip install peft)") from None
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=list(spec_of(model.backbone).lora_targets), modules_to_save=None if model.prompt else ["classifier"])
    return get_peft_model(model, lc)


def merged(model: nn.Module) -> TaskModel:
    """A plain TaskModel: LoRA adapters folded into the weights (a copy; training goes on untouched)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _save(out: Path, model: nn.Module, info: dict[str, Any], tok) -> None:
    """The model, its tokenizer and finetune.json. finetune.json goes first and comes back last, so one always
    describes the weights and tokenizer beside it (after a crash in between, the folder is no model at all)."""
    from safetensors.torch import save_model

    from pretrain.io import atomic_path, write_json_atomic

    (out / FT_FILE).unlink(missing_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_model(merged(model), str(tmp))  # tied embeddings are stored once
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(tmp)
    write_json_atomic(out / FT_FILE, info)


def finetune(run: str | Path, train_path: str | Path, valid_path: str | Path, out: str | Path,
             cfg: FinetuneConfig | None = None, train_subset: list[int] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Fine-tune ``run`` on ``train_path``, select on ``valid_path``; the best model goes to ``out``."""
    from pretrain.hardware import autocast_context, resolve_device, tune_cpu_allocator
    from pretrain.io import write_text_atomic

    cfg = cfg or FinetuneConfig()
    out = Path(out)
    if (out / "checkpoints").is_dir():
        raise ConfigError(f"{out} is a pre-training run (it holds checkpoints/); fine-tuning would overwrite its "
                          "files: choose another --out")
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    train_ex = read_task(cfg, train_path)
    if train_subset is not None:
        train_ex = train_ex.subset(train_subset)
    valid_ex = read_task(cfg, valid_path)
    if cfg.task == "regression":
        for ex, where in ((train_ex, train_path), (valid_ex, valid_path)):
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ex.labels):
                raise TaskDataError(f"{where}: regression needs finite numeric labels in {cfg.label_column!r}")
        names: list[Any] = []
    else:
        names = label_names(_labels_of(cfg, train_ex))
        if len(names) < 2 and cfg.task == "classification":
            raise TaskDataError(f"{train_path}: classification needs at least two labels, found {names}")
        check_known(_labels_of(cfg, valid_ex), names, str(valid_path))

    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    backbone, pcfg, tok, ckpt = load_backbone(run, cfg.dropout, cfg.from_scratch, cfg.seed)
    encoder = pcfg.objective == "mlm"
    ctx = pcfg.model.max_seq_len
    if cfg.max_length > ctx:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's context of {ctx} tokens")
    max_len = cfg.max_length or ctx
    pooling = cfg.pooling if cfg.pooling != "auto" else ("cls" if encoder else "last")
    if pooling == "cls" and not encoder:
        raise ConfigError("cls pooling needs an encoder (masked-LM) run; use last or mean for a decoder")
    n_out = 1 if cfg.task == "regression" else len(names)
    label_ids = verbalizer_ids(tok, cfg.verbalizer, names, encoder) if cfg.prompt else None
    if cfg.prompt and cfg.head_only:
        raise ConfigError("head_only has no head to train with a prompt (the LM head is the backbone's); use lora")
    torch.manual_seed(cfg.seed)
    model: nn.Module = TaskModel(backbone, pcfg.model.d_model, n_out, pooling, encoder, cfg.dropout,
                                 token_level=cfg.task == "token", label_ids=label_ids, mask_id=tok.mask_id)
    n_layers = pcfg.model.n_layer
    if cfg.head_only:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if cfg.lora:
        model = _apply_lora(model, cfg)
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    tr = _encode_task(cfg, tok, encoder, max_len, train_ex, names)
    va = _encode_task(cfg, tok, encoder, max_len, valid_ex, names)
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    steps_per_epoch = math.ceil(len(tr.ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = int(cfg.warmup_frac * total)
    eval_at = {round(steps_per_epoch * (k + 1) / cfg.evals_per_epoch) for k in range(cfg.evals_per_epoch)}
    opt = torch.optim.AdamW(_param_groups(model, cfg, n_layers), betas=(0.9, 0.98), eps=1e-6,
                            fused=device.type == "cuda")
    loss_fn = nn.MSELoss() if cfg.task == "regression" else nn.CrossEntropyLoss(ignore_index=IGNORE)

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", FT_FILE):  # a folder used before: no finetune.json until this run saves a model
        (out / stale).unlink(missing_ok=True)
    write_text_atomic(out / "finetune.yaml", dump_yaml(dataclasses.asdict(cfg)))
    info_base = {"format": 1, "task": cfg.task, "labels": names, "pooling": pooling, "encoder": encoder,
                 "token_label": ("first" if encoder else "last") if cfg.task == "token" else None,
                 "prompt": None if label_ids is None else {"label_ids": label_ids, "mask_id": tok.mask_id},
                 "max_length": max_len, "config": dataclasses.asdict(cfg), "backbone": pcfg.to_dict(),
                 "pretrained_from": None if cfg.from_scratch else str(ckpt), "train_examples": len(tr.ids),
                 "valid_examples": len(va.ids), "truncated": {"train": tr.truncated, "valid": va.truncated}}
    log(f"fine-tuning {'a random init of ' if cfg.from_scratch else ''}{ckpt} for {cfg.task}: "
        f"{len(tr.ids):,} train / {len(va.ids):,} valid examples, {n_out} output(s), "
        f"{n_train:,} of {n_total:,} parameters trained" + (" (LoRA)" if cfg.lora else "")
        + (f"; truncated to {max_len} tokens: {tr.truncated} train, {va.truncated} valid" if tr.truncated or va.truncated else ""))

    rng = random.Random(cfg.seed)
    best: dict[str, Any] | None = None
    bad_evals, step, t0 = 0, 0, time.time()
    best_trained: float | None = None
    stop = "epochs"
    metrics_f = open(out / "metrics.jsonl", "a", encoding="utf-8")
    history = []

    def evaluate(epoch_at: float, train_loss: float | None) -> float:
        """One validation pass: a metrics.jsonl line, the model saved when best; returns the metric."""
        nonlocal best
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # never evaluated, nor saved
            raise PretrainError(f"fine-tuning diverged at step {step} (the weights are no longer finite); lower --lr")
        preds, _ = run_model(model, va, cfg.task, names, pad, cfg.batch_size * 2, device, cfg.dtype)
        m = compute_metrics(cfg.task, preds, _labels_of(cfg, valid_ex) if cfg.task != "token" else valid_ex.tags)
        rec = {"epoch": round(epoch_at, 3), "step": step,
               "train_loss": None if train_loss is None else round(train_loss, 6), "elapsed_s": round(time.time() - t0, 2),
               **{f"val_{k}": round(v, 6) for k, v in m.items()}}
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        history.append(rec)
        improved = best is None or m["metric"] > best["val_metric"]
        log(f"epoch {rec['epoch']:g} step {step}: "
            + ("before training" if train_loss is None else f"train loss {train_loss:.4f}")
            + f", val {' '.join(f'{k} {v:.4f}' for k, v in m.items() if k != 'metric')}" + (" *" if improved else ""))
        if improved:
            best = rec
            _save(out, model, {**info_base, "best": rec}, tok)
        model.train()
        return m["metric"]

    try:
        if cfg.prompt:  # the prompt works before any training: that zero-shot figure is the first evaluation
            evaluate(0.0, None)
        for epoch in range(cfg.epochs):
            model.train()
            loss_sum, loss_n = 0.0, 0
            for b, idx in enumerate(length_batches([len(r) for r in tr.ids], cfg.batch_size, rng)):
                frac = (step + 1) / max(warmup, 1) if step < warmup else max(0.0, (total - step) / max(total - warmup, 1))
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * frac
                if cfg.task == "token":
                    x, mask, y = _batch([tr.ids[i] for i in idx], pad, [tr.targets[i] for i in idx])
                else:
                    x, mask, _ = _batch([tr.ids[i] for i in idx], pad)
                    y = torch.tensor([tr.targets[i] for i in idx],
                                     dtype=torch.float32 if cfg.task == "regression" else torch.long)
                x, mask, y = x.to(device), mask.to(device), y.to(device)
                with autocast_context(device, cfg.dtype):
                    logits = model(x, mask)
                loss = loss_fn(logits.squeeze(-1), y) if cfg.task == "regression" else \
                    loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
                if not math.isfinite(loss_sum):
                    raise PretrainError(f"fine-tuning diverged at step {step}; lower --lr")
                last = step >= total
                if (b + 1) in eval_at or last:
                    metric = evaluate(epoch + (b + 1) / steps_per_epoch, loss_sum / max(loss_n, 1))
                    loss_sum, loss_n = 0.0, 0
                    # patience counts from the first trained evaluation: a zero-shot start may beat the first epochs
                    bad_evals = 0 if best_trained is None or metric > best_trained else bad_evals + 1
                    best_trained = metric if best_trained is None else max(best_trained, metric)
                    if cfg.patience and bad_evals >= cfg.patience:
                        stop = "early_stopping"
                        break
                if last:
                    stop = "max_steps" if cfg.max_steps and step >= cfg.max_steps else stop
                    break
            if stop != "epochs" or step >= total:
                break
    finally:
        metrics_f.close()
    assert best is not None
    return {"out": str(out), "task": cfg.task, "best": best, "steps": step, "stop_reason": stop,
            "elapsed_s": round(time.time() - t0, 2), "trained_params": n_train, "total_params": n_total,
            "truncated": info_base["truncated"], "from_scratch": cfg.from_scratch, "history": history}


# ---------------------------------------------------------------------------------------- load / predict


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """A fine-tuning output directory → (TaskModel in eval mode, its finetune.json dict, Tokenizer)."""
    from safetensors.torch import load_model

    from pretrain.config import Config
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models import build_model

    path = Path(path)
    if not (path / FT_FILE).is_file() or not (path / WEIGHTS).is_file():
        raise PretrainError(f"{path} is not a fine-tuned model (expected {FT_FILE} and {WEIGHTS}; "
                            "make one with `pretrain finetune`)")
    try:
        info = json.loads((path / FT_FILE).read_text(encoding="utf-8"))
        missing = [k for k in ("backbone", "task", "labels", "pooling", "encoder", "config", "max_length")
                   if k not in info]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise PretrainError(f"{path / FT_FILE} is corrupt ({e})") from None
    if missing:
        raise PretrainError(f"{path / FT_FILE} is incomplete: no {', '.join(missing)}")
    pcfg = from_dict(Config, info["backbone"])
    backbone = build_model(pcfg.model)
    n_out = 1 if info["task"] == "regression" else len(info["labels"])
    prompt = info.get("prompt") or {}
    model = TaskModel(backbone, pcfg.model.d_model, n_out, info["pooling"], info["encoder"], 0.0,
                      token_level=info["task"] == "token", label_ids=prompt.get("label_ids"),
                      mask_id=prompt.get("mask_id"))
    try:
        load_model(model, str(path / WEIGHTS))
    except Exception as e:
        raise PretrainError(f"{path / WEIGHTS} is corrupt or does not match {FT_FILE}: {str(e).splitlines()[0][:200]}") from None
    tok = Tokenizer.load(path / "tokenizer.json")
    if tok.vocab_size > pcfg.model.vocab_size:
        raise PretrainError(f"{path / 'tokenizer.json'} has {tok.vocab_size:,} tokens but the model {pcfg.model.vocab_size:,}: "
                            "the tokenizer is not the one this model was fine-tuned with")
    return model.to(device).eval(), info, tok


def predict(ft_dir: str | Path, input_path: str | Path, out: str | Path, batch_size: int = 64,
            device: str = "auto") -> dict[str, Any]:
    """Predict every row of ``input_path`` (same columns as training; labels not needed) into ``out``
    (.jsonl, .csv or .parquet; CoNLL .txt/.conll for token tasks)."""
    from pretrain.hardware import resolve_device
    from pretrain.io import write_text_atomic

    if batch_size < 1:
        raise PretrainError("--batch-size must be >= 1")
    dev = resolve_device(device)
    model, info, tok = load_finetuned(ft_dir, dev)
    cfg = from_dict(FinetuneConfig, info["config"])
    if cfg.task == "token" and Path(out).suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        raise PretrainError(f"token predictions are written as CoNLL text (one 'word tag' per line): --out "
                            f"{Path(out).name} should end in .conll or .txt")
    ex = read_task(cfg, input_path, with_labels=False)
    enc = _encode_task(cfg, tok, info["encoder"], info["max_length"], ex, info["labels"],
                       info.get("token_label", "first_piece"))  # (absent: fine-tuned before it was recorded)
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    preds, scores = run_model(model, enc, cfg.task, info["labels"], pad, batch_size, dev)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.task == "token":
        assert isinstance(ex, TokenExamples)
        lines = []
        for words, tags in zip(ex.words, preds):
            lines += [f"{w} {t}" for w, t in zip(words, tags)] + [""]
        write_text_atomic(out, "\n".join(lines))
    else:
        assert isinstance(ex, Examples)
        rows = []
        for i, (p, s) in enumerate(zip(preds, scores)):
            row: dict[str, Any] = {"row": i, "prediction": p}
            if cfg.task == "classification":
                row.update({f"p_{name}": round(float(v), 6) for name, v in zip(info["labels"], s)})
            rows.append(row)
        _write_rows(out, rows)
    return {"out": str(out), "rows": len(preds), "task": cfg.task, "truncated": enc.truncated,
            "max_length": info["max_length"]}


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """One row per prediction, written atomically (a failed write keeps the previous file)."""
    import csv

    from pretrain.io import atomic_path

    if out.suffix not in (".jsonl", ".csv", ".tsv", ".parquet"):
        raise PretrainError(f"--out must end in .jsonl, .csv, .tsv or .parquet, got {out.name}")
    with atomic_path(out) as tmp:
        if out.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows), encoding="utf-8")
        elif out.suffix in (".csv", ".tsv"):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if out.suffix == ".tsv" else ",")
                w.writeheader()
                w.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
