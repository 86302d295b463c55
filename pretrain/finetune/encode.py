"""Task data → model inputs: texts and text pairs with the specials of the architecture, prompts with a slot
for the label word, CoNLL words with one labelled sub-token each; truncation; batches of similar lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.config import PROMPT_FIELDS, ConfigError, FinetuneConfig, parse_template, parse_verbalizer
from pretrain.finetune.data import TaskDataError, read_conll, read_examples

IGNORE = -100




def _truncate(a: list[int], b: list[int] | None, room: int, mode: str,
              what: str) -> tuple[list[int], list[int] | None]:
    if mode == "error":
        raise TaskDataError(f"{what} is {len(a) + len(b or [])} tokens, more than the {room} that fit with "
                            "the special tokens (use --truncation end|start or a larger --max-length)")
    while len(a) + len(b or []) > room:
        if b is not None and len(b) > len(a):
            b = b[:-1] if mode == "end" else b[1:]
        else:
            a = a[:-1] if mode == "end" else a[1:]
    return a, b


def encode_inputs(tok, texts: list[str], pairs: list[str] | None, encoder: bool, max_len: int,
                  truncation: str, source: str = "") -> tuple[list[list[int]], int]:
    """Token ids with the specials of the architecture, and how many inputs were truncated.

    Encoders: ``[CLS] a [SEP] (b [SEP])``; decoders: ``a <eot> (b <eot>)`` (the last token sees
    everything)."""
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


def verbalizer_ids(tok, spec: str, names: list[Any], encoder: bool) -> list[int]:
    """The vocabulary id of each label's word, in the order of ``names``; each word must be one token
    (decoders: the word as it follows a space, as it comes after the prompt)."""
    words = parse_verbalizer(spec)
    unknown = sorted(set(words) - {str(n) for n in names})
    missing = [str(n) for n in names if str(n) not in words]
    if unknown or missing:
        raise ConfigError(f"verbalizer {spec!r} does not match the labels {[str(n) for n in names]}"
                          + (f"; no word for {missing}" if missing else "")
                          + (f"; not a label: {unknown}" if unknown else ""))
    ids = []
    for n in names:
        word = words[str(n)]
        pieces = tok.encode(word if encoder else " " + word)
        if len(pieces) != 1:
            raise ConfigError(f"verbalizer word {word!r} is {len(pieces)} tokens in this vocabulary "
                              f"({[tok.decode([p]) for p in pieces]}); "
                              "prompt-based classification needs one-token words")
        if tok.unk_id is not None and pieces[0] == tok.unk_id:
            raise ConfigError(f"verbalizer word {word!r} is not in this vocabulary (it encodes to the "
                              "unknown token); choose a word the tokenizer knows")
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
        raise ConfigError(f"prompt {template!r}: a decoder predicts the next token, so {{mask}} "
                          "must end the template")
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
            x += (a if p == "{text}" else (b or []) if p == "{text_pair}"
                  else [tok.mask_id] if p == "{mask}" else literal[j])
        out.append(x + tail)
    return out, truncated


def encode_words(tok, words: list[list[str]], tags: list[list[int]] | None, encoder: bool, max_len: int,
                 truncation: str = "end", source: str = "", label_at: str | None = None,
                 ) -> tuple[list[list[int]], list[list[int]], list[list[int]], int]:
    """CoNLL sentences → ids, per-token labels (the word's tag on one sub-token, IGNORE elsewhere), the index
    of that sub-token for each word (-1 when truncated away), and the number of sentences truncated.

    The labelled sub-token is the word's last for a decoder (the first position that has seen the whole word:
    with a char or byte tokenizer the first is the space before it) and its first that is not just whitespace
    for an encoder (``label_at`` None, or 'last' / 'first'; 'first_piece', the first whatever it is, is how
    models fine-tuned before finetune.json recorded ``token_label`` were trained). Over-long sentences lose
    whole words at the end (``truncation`` 'end') or start ('start')."""
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
                raise TaskDataError((f"{source}: " if source else "")
                                    + f"sentence {s + 1} is {sum(lens)} tokens, more than the {room} that "
                                    f"fit in --max-length {max_len} with the special tokens "
                                    "(use --truncation end|start or a larger --max-length)")
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
            labels += ([IGNORE] * j + [tags[s][w] if tags is not None else IGNORE]
                       + [IGNORE] * (len(p) - 1 - j))
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
        ids, labels, first, n = encode_words(tok, ex.words, tag_ids, encoder, max_len, cfg.truncation,
                                             ex.source, token_label)
        return Encoded(ids, labels, first, n)
    if cfg.prompt:
        ids, n = encode_prompts(tok, cfg.prompt, ex.texts, ex.pairs, encoder, max_len, cfg.truncation,
                                ex.source)
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
    if cfg.task == "qa":
        from pretrain.finetune.qa import read_qa

        return read_qa(path, cfg, with_answers=with_labels)
    if cfg.task == "token":
        return read_conll(path, with_tags=with_labels)
    return read_examples(path, cfg.text_column, cfg.label_column if with_labels else None,
                         cfg.text_pair_column, task=cfg.task)


def _labels_of(cfg: FinetuneConfig, ex) -> list[Any]:
    if cfg.task == "qa":  # the gold answers' texts ([] : none)
        return [[t for t, _ in a] for a in ex.answers]
    if cfg.task == "token":
        return [t for s in ex.tags for t in s]
    return ex.labels
