"""Ids-only batch encoding for prepare: `tokenizers`' ``encode_batch``, or a faster exact path for
byte-level BPE.

A byte-level BPE tokenizer (GPT-2 / RoBERTa style, and what ``--tokenizer bpe`` trains) cuts text into
pieces with one regular expression and runs BPE on each piece independently, so a piece's ids never
depend on its neighbours. Natural text repeats the same pieces (" the", " of", "\\n\\n") over and over:
:class:`IdsEncoder` splits the text with the same expression (the ``regex`` module, which has the
``\\p{L}`` classes it needs), looks each piece up in a memo and asks the tokenizer only for pieces it has
not seen — in one ``encode_batch`` call per batch. The result is the tokenizer's own output, token for
token; on one core it is about 3× faster than ``encode_batch``, which also builds offsets, token strings
and masks for every document (see bench/prepare_throughput.py).

The fast path is taken only when it is known to be exact: no normalizer, a ``ByteLevel`` pre-tokenizer
with its regex and no prefix space, a BPE model without dropout. Special tokens written out in a
document (``<|endoftext|>``, ``[SEP]``, ...) are encoded as the text they are (``encode_special_tokens``):
only the writer puts real document boundaries. Documents that contain an added token's text go through
``encode_batch``, which matches (non-special) added tokens first.
The first batch is also encoded both ways and compared; a difference (a regex engine disagreeing on some
character class) turns the fast path off for that encoder, with a warning.
"""

from __future__ import annotations

import bisect
import json
import warnings
from itertools import chain
from typing import Any

import numpy as np
import regex

# GPT-2's pre-tokenization pattern, as in tokenizers' ByteLevel pre-tokenizer (use_regex=True).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# pieces whose ids one encoder remembers (~40 MB); beyond that, new pieces are not memoized
MEMO_PIECES = 262_144
MEMO_PIECE_CHARS = 64  # longer pieces are encoded for their batch but not remembered
CHECK_CHARS = 1 << 20  # characters of the first batch encoded both ways to confirm the fast path


def fast_path_pattern(tk: Any) -> str | None:
    """The piece-splitting regex of ``tk`` (a `tokenizers.Tokenizer`) when per-piece memoized encoding is
    exactly equivalent to ``tk.encode``; None otherwise."""
    try:
        spec = json.loads(tk.to_str())
    except (ValueError, TypeError):
        return None
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return None
    if (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return BYTE_LEVEL_PATTERN
    return None


class IdsEncoder:
    """``encode(texts) -> (ids of every text back to back, length of each)``, without special tokens (it
    sets ``tk.encode_special_tokens``: give it a tokenizer of its own)."""

    def __init__(self, tk: Any, dtype: Any = np.int64, fast: bool = True):
        # a document that spells out <|endoftext|> or [SEP] is text, not a boundary
        tk.encode_special_tokens = True
        self.tk = tk
        self.dtype = np.dtype(dtype)
        self.memo: dict[str, tuple[int, ...]] = {}
        self.checked = False
        pattern = fast_path_pattern(tk) if fast else None
        self.split = regex.compile(pattern).findall if pattern is not None else None
        self.added = [t.content for t in tk.get_added_tokens_decoder().values() if t.content]

    @property
    def fast(self) -> bool:
        return self.split is not None

    def reference(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        try:
            encs = self.tk.encode_batch(texts, add_special_tokens=False)
        except Exception as e:
            # tokenizers raises bare Exceptions (e.g. a WordLevel model without an unk token)
            from pretrain.data.tokenizer import TokenizerError

            raise TokenizerError(f"the tokenizer cannot encode this text: {str(e).splitlines()[0][:200]} "
                                 "(a tokenizer.json that is reused needs an unknown token or a byte alphabet "
                                 "for characters it has never seen)") from None
        lens = np.fromiter((len(e) for e in encs), np.int64, len(encs))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), self.dtype, int(lens.sum()))
        return ids, lens

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.split is None or not texts:
            return self.reference(texts)
        if not self.checked:
            self.checked = True
            probe, size = [], 0
            for t in texts:
                probe.append(t)
                size += len(t)
                if size >= CHECK_CHARS:
                    break
            want, got = self.reference(probe), self._fast(probe)
            if not (np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])):
                warnings.warn("fast byte-level BPE encoding disagrees with the tokenizer on this text; "
                              "using encode_batch", RuntimeWarning, stacklevel=2)
                self.split = None
                return self.reference(texts)
        return self._fast(texts)

    def _fast(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        added = self.added
        special = {i for i, t in enumerate(texts) if any(a in t for a in added)} if added else set()
        plain = [t for i, t in enumerate(texts) if i not in special] if special else texts
        split, memo = self.split, self.memo
        pieces = [split(t) for t in plain]  # type: ignore[misc]
        new = list(set(chain.from_iterable(pieces)).difference(memo))
        transient: list[str] = []
        if new:
            new.sort(key=len)  # short pieces first: they recur; a long one (a run of symbols) rarely does
            found = [tuple(e.ids) for e in self.tk.encode_batch(new, add_special_tokens=False)]
            room = max(MEMO_PIECES - len(memo), 0)
            keep = min(room, bisect.bisect_right(new, MEMO_PIECE_CHARS, key=len))
            memo.update(zip(new, found))
            transient = new[keep:]  # memo full, or too long to keep: these serve this batch only
        vals = list(map(memo.__getitem__, chain.from_iterable(pieces)))
        for w in transient:
            del memo[w]
        piece_lens = np.fromiter(map(len, vals), np.int64, len(vals))
        ids = np.fromiter(chain.from_iterable(vals), self.dtype, int(piece_lens.sum()))
        doc_ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))  # in pieces
        token_cum = np.concatenate([[0], np.cumsum(piece_lens)])
        lens = np.diff(token_cum[np.concatenate([[0], doc_ends])])
        if not special:
            return ids, lens
        # documents holding an added token's text: the tokenizer's own encode, put back in their places
        s_ids, s_lens = self.reference([texts[i] for i in sorted(special)])
        plain_docs = iter(np.split(ids, np.cumsum(lens)[:-1]))
        special_docs = iter(np.split(s_ids, np.cumsum(s_lens)[:-1]))
        docs = [next(special_docs) if i in special else next(plain_docs) for i in range(len(texts))]
        return np.concatenate(docs), np.fromiter(map(len, docs), np.int64, len(docs))
