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
The first ``CHECK_CHARS`` characters are also encoded both ways and compared; a difference (a regex engine
disagreeing on some character class) turns the fast path off for that encoder, with a warning. Byte and
char tokenizers (a BPE without merges that encodes every character on its own) have an exact fast path
too: a lookup table, vectorized (checked the same way).

Long texts, in pieces (bounded memory). The `tokenizers` library needs about 200 bytes of memory per
character of a text it encodes (offsets, token strings, alignments), so a 100 MB document would need
20 GB. A text longer than ``PIECE_CHARS`` (65,536) characters is therefore tokenized in pieces of at
most that many characters, handed to the tokenizer ``ENCODE_CHARS`` at a time, and the pieces are cut
where the tokenizer itself always cuts, so the ids are those of the whole text, token for token
(:class:`Chunker`; the rule comes from the tokenizer's own description, :func:`cut_rule`):

* byte, char (any BPE without merges, without normalizer, with no pre-tokenizer or a ByteLevel one
  without its regex): anywhere — every character is encoded on its own.
* byte-level BPE (``bpe``; GPT-2 / RoBERTa-style tokenizer.json files: a ByteLevel pre-tokenizer with its
  regex): before a space that has a non-space character on each side. The GPT-2 pattern always starts a
  piece there (" word", " 42", " ...") and no piece reaches across it, nor looks past it. With a
  character-by-character normalizer (NFC/NFKC/..., Lowercase, BertNormalizer, StripAccents, Nmt), both
  neighbours must still be non-space once normalised.
* wordpiece (BertPreTokenizer, Whitespace, WhitespaceSplit): before a space, tab or newline, which ends
  a word and is dropped.
* unigram (a Metaspace pre-tokenizer that splits): before a space. Metaspace turns it into '▁' and starts
  a new pre-token there, and a text that starts with '▁' gets no extra prefix (whatever the
  prepend_scheme), so the pieces give the same pre-tokens, and the Unigram model segments each on its own.
* never inside the text of an added token.

Where it cannot hold — the documented rule: a piece that has no such point within its ``PIECE_CHARS``
characters (a run of 64K characters without a space: a base64 blob, text in a script written without
spaces) is cut at the last point within them that is safe for Unicode normalisation (before an ASCII,
CJK ideograph, kana or Hangul syllable character, else before any character that neither decomposes nor
composes with the one before it), or failing that after exactly ``PIECE_CHARS`` characters. Only at
such a cut can the ids differ from whole-text tokenization (a word cut in two is encoded as two words;
byte and char ids never differ). A tokenizer.json whose pipeline is none of the
above (another pre-tokenizer or a Sequence of them, a Strip/Prepend/Replace/Precompiled normalizer,
added tokens with lstrip/rstrip/single_word) is cut by the byte-level rule, which is what most
pre-tokenizers split at, but without the guarantee.
"""

from __future__ import annotations

import bisect
import json
import unicodedata
import warnings
from collections.abc import Iterator
from functools import lru_cache
from itertools import chain
from typing import Any

import numpy as np
import regex

# GPT-2's pre-tokenization pattern, as in tokenizers' ByteLevel pre-tokenizer (use_regex=True).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# pieces whose ids one encoder remembers (~40 MB); beyond that, new pieces are not memoized
MEMO_PIECES = 262_144
MEMO_PIECE_CHARS = 64  # longer pieces are encoded for their batch but not remembered
CHECK_CHARS = 1 << 20  # characters of the first batches encoded both ways to confirm the fast path
PIECE_CHARS = 1 << 16  # a longer text is tokenized in pieces of at most this many characters
ENCODE_CHARS = 1 << 18  # characters handed to the tokenizer at once (the memory it needs: ~200 bytes each)

# where a long text may be cut (see the module docstring)
ANY, BYTELEVEL, WHITESPACE, METASPACE, GUESS = "any", "bytelevel", "whitespace", "metaspace", "guess"
KIND_RULES = {"byte": ANY, "char": ANY, "bpe": BYTELEVEL, "wordpiece": WHITESPACE, "unigram": METASPACE}
_CUT_CHARS = {ANY: "", BYTELEVEL: " ", GUESS: " ", METASPACE: " ", WHITESPACE: " \t\n"}
# normalizers that work character by character, so that a cut before an ASCII space changes nothing
_PER_CHAR_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "BertNormalizer", "StripAccents", "Nmt"}
# characters before which a text can be cut without changing its Unicode normalisation (NFC, NFKC, NFD,
# NFKD): starters that never combine with what precedes them
NORM_SAFE = regex.compile(r"[\x00-\x7f\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff\uac00-\ud7a3]", regex.REVERSE)


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


def _spec(tk: Any) -> dict:
    try:
        return json.loads(tk.to_str())
    except (ValueError, TypeError):
        return {}


def _per_char(normalizer: dict | None) -> bool:
    if normalizer is None:
        return True
    if normalizer.get("type") == "Sequence":
        return all(_per_char(n) for n in normalizer.get("normalizers") or [])
    return normalizer.get("type") in _PER_CHAR_NORMALIZERS


def cut_rule(tk: Any) -> str:
    """Where a long text may be cut for ``tk`` (a `tokenizers.Tokenizer`) with the ids unchanged: ANY,
    BYTELEVEL, WHITESPACE or METASPACE; GUESS when no rule is known to be exact (see the module docstring)."""
    spec = _spec(tk)
    norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if any(not a.get("special") and (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
           for a in spec.get("added_tokens") or []):
        return GUESS  # such a token reaches into the whitespace around it
    if not _per_char(norm):
        return GUESS
    kind = pre.get("type")
    if (norm is None and model.get("type") == "BPE" and not model.get("merges")
            and not any(model.get(k) for k in ("fuse_unk", "byte_fallback", "continuing_subword_prefix",
                                               "end_of_word_suffix"))
            and (kind is None or (kind == "ByteLevel" and not pre.get("use_regex", True)
                                  and not pre.get("add_prefix_space")))):
        return ANY  # one token per character (char) or per byte (byte)
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return BYTELEVEL
    if kind == "Metaspace" and pre.get("split", True):
        return METASPACE
    if kind in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit"):
        return WHITESPACE
    return GUESS


@lru_cache(maxsize=1)
def _composes_after() -> frozenset[str]:
    """Characters that canonical composition can join to the character before them: the second character of
    every two-character canonical decomposition, and Hangul vowel and trailing jamo."""
    out = {chr(c) for c in (*range(0x1161, 0x1176), *range(0x11A8, 0x11C3))}
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            out.add(chr(int(d.split()[1], 16)))
    return frozenset(out)


def norm_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last position in (lo, hi] before which ``text`` can be cut without changing its Unicode
    normalisation (NFC, NFKC, NFD, NFKD), or ``hi`` if there is none: before a character of NORM_SAFE or,
    failing that, any starter that has no decomposition and never composes with what precedes it."""
    m = NORM_SAFE.search(text, lo + 1, hi + 1)
    if m:
        return m.start()
    after = _composes_after()
    for i in range(hi, lo, -1):
        c = text[i]
        if not unicodedata.combining(c) and c not in after and not unicodedata.decomposition(c):
            return i
    return hi


class Chunker:
    """Cuts a long text into pieces that tokenize, one after the other, to the ids of the whole text (the rule
    in the module docstring). ``added``: the texts of added tokens (never cut inside); ``normalize``: the
    tokenizer's normalizer (``normalize_str``), for the byte-level rule's check of a cut's neighbours."""

    def __init__(self, rule: str, added: Any = (), normalize: Any = None):
        self.rule = rule
        self.chars = _CUT_CHARS[rule]
        # an added token can only straddle a cut before one of these characters if it holds one
        self.added = [a for a in added if len(a) > 1 and (rule == ANY or any(c in a for c in self.chars))]
        self.normalize = normalize if rule in (BYTELEVEL, GUESS) else None

    @classmethod
    def for_tokenizer(cls, tk: Any) -> Chunker:
        added = [t.content for t in tk.get_added_tokens_decoder().values() if t.content]
        return cls(cut_rule(tk), added, tk.normalizer.normalize_str if tk.normalizer is not None else None)

    @classmethod
    def for_kind(cls, kind: str) -> Chunker:
        """For the text a tokenizer of ``kind`` learns from (trainers match no added tokens)."""
        return cls(KIND_RULES.get(kind, GUESS))

    def spans(self, text: str, start: int = 0, end: int | None = None,
              max_chars: int | None = None) -> Iterator[tuple[int, int]]:
        """(lo, hi) of every piece of ``text[start:end]`` (taken as a whole document: nothing outside it is
        looked at), each of at most ``max_chars`` (default PIECE_CHARS) characters; one empty piece for an
        empty text."""
        end = len(text) if end is None else end
        max_chars = max_chars or PIECE_CHARS
        lo = start
        while end - lo > max_chars:
            hi = self.cut(text, lo, lo + max_chars, start, end)
            yield lo, hi
            lo = hi
        yield lo, end

    def pieces(self, text: str, max_chars: int | None = None) -> Iterator[str]:
        for lo, hi in self.spans(text, max_chars=max_chars):
            yield text if hi - lo == len(text) else text[lo:hi]

    def cut(self, text: str, lo: int, hi: int, start: int, end: int) -> int:
        """Where the piece that starts at ``lo`` ends: a position in (lo, hi] (``hi < end``)."""
        if self.rule != ANY:
            for i in self._candidates(text, lo, hi):
                if self._ok(text, i, start, end):
                    return i
            i = norm_safe_cut(text, lo, hi)  # no exact cut within max_chars: the documented fallback
        else:
            i = hi
        while i > lo + 1 and self._straddles(text, i, start, end):
            i -= 1
        return i

    def _candidates(self, text: str, lo: int, hi: int) -> Iterator[int]:
        """Positions i in (lo, hi] with text[i] one of the rule's characters, last first."""
        last = {c: text.rfind(c, lo + 1, hi + 1) for c in self.chars}
        while True:
            c = max(last, key=last.__getitem__)
            i = last[c]
            if i < 0:
                return
            yield i
            last[c] = text.rfind(c, lo + 1, i)

    def _ok(self, text: str, i: int, start: int, end: int) -> bool:
        if self.rule in (BYTELEVEL, GUESS):  # a space with a non-space character on each side
            if i + 1 >= end or i - 1 < start:
                return False
            before, after = text[i - 1], text[i + 1]
            if before.isspace() or after.isspace():
                return False
            if self.normalize is not None:
                before, after = self.normalize(before), self.normalize(after)
                if not before or not after or before[-1].isspace() or after[0].isspace():
                    return False
        return not self._straddles(text, i, start, end)

    def _straddles(self, text: str, i: int, start: int, end: int) -> bool:
        """Whether an added token's text occurs across position i."""
        return any(text.find(a, max(start, i - len(a) + 1), min(end, i + len(a) - 1)) >= 0
                   for a in self.added)


def table_path(tk: Any) -> tuple[str, Any] | None:
    """For a tokenizer that encodes every character on its own (cut rule ANY: byte, char), what a lookup
    table needs: ("byte", id of each byte value) or ("char", (code points, their ids, unknown id)); None
    otherwise."""
    if cut_rule(tk) != ANY:
        return None
    spec = _spec(tk)
    if any(not a.get("special") for a in spec.get("added_tokens") or []):
        return None  # matched before the model: not per character
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    if spec.get("pre_tokenizer") is not None:  # ByteLevel without its regex: one token per UTF-8 byte
        from pretrain.data.tokenizer import bytes_to_unicode

        ids = [vocab.get(ch) for _, ch in sorted(bytes_to_unicode().items())]
        return None if None in ids else ("byte", np.array(ids, np.int64))
    unk = model.get("unk_token")
    if unk is None or unk not in vocab:
        return None  # an unknown character is dropped: leave that to the tokenizer
    single = sorted((ord(k), v) for k, v in vocab.items() if len(k) == 1)
    if not single:
        return None
    keys = np.array([k for k, _ in single], np.int64)
    return "char", (keys, np.array([v for _, v in single], np.int64), vocab[unk])


class IdsEncoder:
    """``encode(texts) -> (ids of every text back to back, length of each)``, without special tokens (it
    sets ``tk.encode_special_tokens``: give it a tokenizer of its own)."""

    def __init__(self, tk: Any, dtype: Any = np.int64, fast: bool = True):
        # a document that spells out <|endoftext|> or [SEP] is text, not a boundary
        tk.encode_special_tokens = True
        self.tk = tk
        self.dtype = np.dtype(dtype)
        self.memo: dict[str, tuple[int, ...]] = {}
        self.checked = 0  # characters encoded both ways so far (the fast path's self-check)
        pattern = fast_path_pattern(tk) if fast else None
        self.split = regex.compile(pattern).findall if pattern is not None else None
        self.table = table_path(tk) if fast else None
        self.added = [t.content for t in tk.get_added_tokens_decoder().values() if t.content]
        self.chunker = Chunker.for_tokenizer(tk)

    @property
    def fast(self) -> bool:
        return self.split is not None or self.table is not None

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
        """Texts longer than PIECE_CHARS are encoded in pieces (see the module docstring), at most
        ENCODE_CHARS characters at a time: the memory needed does not grow with a text's length."""
        if not texts:
            return self.reference(texts)
        batches = self._sub_batches(texts)
        first = next(batches)
        second = next(batches, None)
        if second is None and len(first[0]) == len(texts):  # one sub-batch of whole texts
            return self._encode(first[1])
        doc_lens = np.zeros(len(texts), np.int64)
        parts = []
        for owner, pieces in chain([first], [second] if second is not None else [], batches):
            ids, lens = self._encode(pieces)
            np.add.at(doc_lens, owner, lens)
            parts.append(ids)
        return np.concatenate(parts), doc_lens

    def _sub_batches(self, texts: list[str]) -> Iterator[tuple[list[int], list[str]]]:
        """(index of the text of each piece, pieces) of about ENCODE_CHARS characters at most."""
        owner: list[int] = []
        pieces: list[str] = []
        size = 0
        for i, t in enumerate(texts):
            for piece in ([t] if len(t) <= PIECE_CHARS else self.chunker.pieces(t)):
                if pieces and size + len(piece) > ENCODE_CHARS:
                    yield owner, pieces
                    owner, pieces, size = [], [], 0
                owner.append(i)
                pieces.append(piece)
                size += len(piece)
        yield owner, pieces

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.fast:
            return self.reference(texts)
        if self.checked < CHECK_CHARS:
            probe, size = [], 0
            for t in texts:
                probe.append(t)
                size += len(t)
                if self.checked + size >= CHECK_CHARS:
                    break
            self.checked += size
            want, got = self.reference(probe), self._fast(probe)
            if not (np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])):
                warnings.warn(f"fast {'byte-level BPE' if self.split is not None else 'per-character'} "
                              "encoding disagrees with the tokenizer on this text; using encode_batch",
                              RuntimeWarning, stacklevel=3)
                self.split = self.table = None
                return self.reference(texts)
        return self._fast(texts)

    def _by_table(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        kind, data = self.table  # type: ignore[misc]
        out = []
        try:
            for t in texts:
                if kind == "byte":
                    out.append(data[np.frombuffer(t.encode("utf-8"), np.uint8)].astype(self.dtype))
                else:
                    keys, vals, unk = data
                    cps = np.frombuffer(t.encode("utf-32-le"), np.uint32)
                    at = np.minimum(np.searchsorted(keys, cps), len(keys) - 1)
                    out.append(np.where(keys[at] == cps, vals[at], unk).astype(self.dtype))
        except UnicodeEncodeError:  # a lone surrogate: the tokenizer's own error
            return self.reference(texts)
        lens = np.fromiter(map(len, out), np.int64, len(out))
        return (np.concatenate(out) if out else np.zeros(0, self.dtype)), lens

    def _fast(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.table is not None:
            return self._by_table(texts)
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
