"""Cleaning: normalisation, filters, exact and near-duplicate removal, decontamination — each step
optional and counted (documents and bytes removed, per source, with a few examples).

Transforms (``transform``) change a document's text the same way in every pass; filters decide once, in
corpus order, whether a document stays: the first copy of a duplicate is kept. The decision is split in
two so that the costly part runs in parallel: ``analyze`` (stateless: filters, hashes, MinHash
signatures, n-gram lookups; run in worker processes) and ``decide`` (stateful, in corpus order in the
main process: exact-duplicate set and LSH index). ``keep`` does both.

Memory: the exact-duplicate set holds one 64-bit hash per kept document (~70 bytes each in Python) and
the LSH index the band hashes of every kept document (~1-2 KB each): they grow with the corpus, which
is what deduplication needs; every other step is bounded.
Near-duplicates use MinHash over word 5-gram shingles with LSH (the `datasketch` library);
decontamination drops documents that share a word n-gram (default 13) with the evaluation texts given.

Personal data (``pii``: e-mail addresses, phone numbers, IP addresses, payment-card numbers; the patterns are
in pii.py): ``report`` counts the matches per type in the kept documents (and the documents with any), per
source, with a few matched strings as examples; ``redact`` is a transform (each match replaced by its typed
placeholder, ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CARD>``; the report counts the placeholders in the
kept documents, so one already in the input counts too); ``drop`` is a filter (step ``pii``: the documents
with any match, counted and reported like the other filters, with the matches per type).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pretrain.data import pii as _pii
from pretrain.data.sources import DataError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_WORD = re.compile(r"\w+", re.UNICODE)
STEPS = ("empty", "min_chars", "max_chars", "symbol_ratio", "alpha_ratio", "repeated_lines", "pii",
         "exact_duplicate", "near_duplicate", "contaminated")
PII_MODES = ("", "report", "redact", "drop")
_STEP_INDEX = {s: i + 1 for i, s in enumerate(STEPS)}
NUM_PERM = 128


@dataclass
class CleanConfig:
    normalize: str = "NFC"
    """Unicode normalisation form (NFC, NFKC, ...), or '' for none."""
    strip_control: bool = True
    """Remove control characters (except tab/newline/carriage return) and zero-width spaces."""
    min_chars: int = 0
    """Drop documents shorter than this many characters (0: off)."""
    max_chars: int = 0
    """Drop documents longer than this many characters (0: off)."""
    max_symbol_ratio: float = 0.0
    """Drop documents whose share of characters that are neither letters, digits nor space exceeds this
    (0: off)."""
    min_alpha_ratio: float = 0.0
    """Drop documents whose share of letters is below this (0: off)."""
    max_repeated_line_ratio: float = 0.0
    """Drop documents where more than this share of non-empty lines repeat an earlier line (0: off)."""
    dedup_exact: bool = False
    """Drop exact duplicates (same text after the transforms; the first copy stays)."""
    near_dup_threshold: float = 0.0
    """Drop near-duplicates whose estimated Jaccard similarity (word 5-grams) to an earlier document reaches
    this (e.g. 0.7; 0: off)."""
    decontaminate: list[str] = field(default_factory=list)
    """Evaluation files/folders: drop documents sharing a word n-gram with them."""
    decontaminate_fields: list[str] = field(default_factory=lambda: ["text"])
    """Fields (columns) of JSONL/JSON/CSV/TSV/Parquet evaluation files whose text is matched (each of them:
    e.g. question and answer); plain text files are read whole."""
    ngram: int = 13
    """n for decontamination (evaluation texts shorter than n words are matched whole)."""
    pii: str = ""
    """Personal data (e-mail addresses, phone numbers, IP addresses, card numbers; see pii.py): 'report'
    (count them, documents unchanged), 'redact' (replace each by a typed placeholder), 'drop' (drop the
    documents with any), or '' (off)."""

    def __post_init__(self) -> None:
        forms = ("NFC", "NFKC", "NFD", "NFKD")
        if self.normalize and self.normalize.upper() not in forms:
            raise DataError(f"unknown Unicode normalisation form {self.normalize!r}: use one of "
                            f"{', '.join(forms)}, or '' for none")
        self.normalize = self.normalize.upper()
        if self.ngram < 1:
            raise DataError(f"the decontamination n-gram length must be >= 1, got {self.ngram}")
        for name in ("max_symbol_ratio", "min_alpha_ratio", "max_repeated_line_ratio", "near_dup_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.min_chars < 0 or self.max_chars < 0:
            raise DataError("min_chars / max_chars must be >= 0 (0: off)")
        if self.pii not in PII_MODES:
            raise DataError(f"unknown personal-data mode {self.pii!r}: use report, redact, drop, or '' "
                            "for off")

    def settings(self) -> dict[str, Any]:
        """The settings, JSON-able, for meta.json (what `pretrain data audit` reports)."""
        return {f.name: (list(map(str, v)) if isinstance(v, list) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    def active(self) -> bool:
        return any([self.min_chars, self.max_chars, self.max_symbol_ratio, self.min_alpha_ratio,
                    self.max_repeated_line_ratio, self.dedup_exact, self.near_dup_threshold,
                    self.decontaminate, self.pii])


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _h(x: str) -> bytes:
    return hashlib.blake2b(x.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def text_filter(c: CleanConfig, text: str) -> str | None:
    """The filters that look at a document's characters: empty, too short or long, too many symbols, too few
    letters (counted, not listed: memory stays flat for a document of any length)."""
    if not text or text.isspace():
        return "empty"
    if c.min_chars and len(text) < c.min_chars:
        return "min_chars"
    if c.max_chars and len(text) > c.max_chars:
        return "max_chars"
    if c.max_symbol_ratio or c.min_alpha_ratio:
        non_space = len(text) - sum(map(str.isspace, text))  # (no whitespace character is alphanumeric)
        if c.max_symbol_ratio and (non_space - sum(map(str.isalnum, text))) / non_space > c.max_symbol_ratio:
            return "symbol_ratio"
        if c.min_alpha_ratio and sum(map(str.isalpha, text)) / non_space < c.min_alpha_ratio:
            return "alpha_ratio"
    return None


class Cleaner:
    def __init__(self, cfg: CleanConfig, source_names: list[str] | None = None, examples: int = 3):
        self.cfg = cfg
        self.source_names = source_names or []
        self.n_examples = examples
        self.stats: dict[str, dict[str, Any]] = {s: {"documents": 0, "bytes": 0, "examples": []}
                                                 for s in STEPS}
        self.per_source: dict[int, dict[str, Any]] = {}
        self.kept = {"documents": 0, "bytes": 0}
        # personal data (cfg.pii): matches per type and documents with any, in total and per source
        self.pii = {"documents": 0, **dict.fromkeys(_pii.TYPES, 0)}
        self.pii_per_source: dict[int, dict[str, int]] = {}
        self.pii_examples: dict[str, list[str]] = {t: [] for t in _pii.TYPES}
        self._exact: set[int] = set()
        self._lsh = None
        self._perms = None
        self._n = 0
        if cfg.near_dup_threshold:
            from datasketch import MinHashLSH

            if not 0.0 < cfg.near_dup_threshold < 1.0:
                raise DataError("near-duplicate threshold must be in (0, 1)")
            self._lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=NUM_PERM)
        self._contam: set[bytes] = set()
        self._short_lens: set[int] = set()
        if cfg.decontaminate:
            self._load_eval(cfg.decontaminate)

    def _load_eval(self, inputs: list[str]) -> None:
        from pretrain.data.sources import expand_inputs, read_documents

        n = self.cfg.ngram
        texts: list[str] = []
        for src in expand_inputs(inputs):
            for name in self.cfg.decontaminate_fields if src.kind != "text" else ["text"]:
                try:
                    texts += read_documents(src, name)
                except DataError as e:
                    raise DataError(str(e).replace("--text-column", "--decontaminate-field")) from None
        for doc in texts:
            for line in doc.splitlines() or [doc]:  # evaluation sets are usually one example per line
                w = _words(self.transform(line))
                if len(w) >= n:
                    self._contam.update(_h(" ".join(w[i:i + n])) for i in range(len(w) - n + 1))
                elif len(w) >= 3:
                    self._contam.add(_h(" ".join(w)))
                    self._short_lens.add(len(w))
        if not self._contam:
            raise DataError(f"no evaluation text of 3+ words found in {', '.join(inputs)} to decontaminate "
                            "against")

    def transformer(self) -> Cleaner:
        """A cleaner that only transforms, for the encoding workers: none of this one's duplicate index or
        evaluation n-grams to copy into each of them."""
        return Cleaner(dataclasses.replace(self.cfg, dedup_exact=False, near_dup_threshold=0.0,
                                           decontaminate=[]))

    def transform(self, text: str) -> str:
        text = self.normalized(text)
        if self.cfg.pii == "redact":
            text = _pii.redact(text)[0]
        return text

    def normalized(self, text: str) -> str:
        """:meth:`transform` but for the redaction of personal data."""
        if self.cfg.normalize:
            text = unicodedata.normalize(self.cfg.normalize, text)
        if self.cfg.strip_control:
            text = _CONTROL.sub("", text)
        return text

    def pii_counts(self, text: str) -> tuple[int, ...] | None:
        """Personal data in a (transformed) document: matches per type of pii.TYPES (with ``redact``: the
        placeholders), or None when the step is off. Runs over the whole text without copying it."""
        if not self.cfg.pii:
            return None
        counts = _pii.count_placeholders(text) if self.cfg.pii == "redact" else _pii.count(text)
        return tuple(counts[t] for t in _pii.TYPES)

    def analyze(self, text: str) -> tuple[int, int, bool, Any, int, tuple[int, ...] | None]:
        """The stateless part of the decision for one (transformed) document, safe to run in worker
        processes: (index in STEPS + 1 of the first failed filter, or 0; exact-duplicate hash (0 if off);
        contaminated; MinHash values (None if off); UTF-8 size in bytes; personal data found, per type
        (:meth:`pii_counts`; None if off or a filter before it failed))."""
        c = self.cfg
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        reason = self._filter(text)
        if reason:
            return _STEP_INDEX[reason], 0, False, None, nbytes, None
        found = self.pii_counts(text)
        if c.pii == "drop" and any(found):  # type: ignore[arg-type]
            return _STEP_INDEX["pii"], 0, False, None, nbytes, found
        exact = int.from_bytes(_h(text), "little") if c.dedup_exact else 0
        contaminated = False
        if self._contam:
            w = _words(text)
            n = c.ngram
            contaminated = any(_h(" ".join(w[i:i + n])) in self._contam
                               for i in range(len(w) - n + 1)) or any(
                _h(" ".join(w[i:i + k])) in self._contam
                for k in self._short_lens for i in range(len(w) - k + 1))
        minhash = None
        w = _words(text) if self._lsh is not None else []
        if w:  # a document without words (punctuation, emoji) has no shingles: exact dedup only
            from datasketch import MinHash

            shingles = {" ".join(w[i:i + 5]).encode() for i in range(max(1, len(w) - 4))}
            proto = self._proto()
            m = MinHash(num_perm=NUM_PERM, seed=1, permutations=proto.permutations, scheme=proto.scheme)
            m.update_batch(list(shingles))
            minhash = m.hashvalues
        return 0, exact, contaminated, minhash, nbytes, found

    def _proto(self):
        """A MinHash whose permutations, scheme and dtype every signature shares (made once)."""
        if self._perms is None:
            from datasketch import MinHash

            self._perms = MinHash(num_perm=NUM_PERM, seed=1)
        return self._perms

    @property
    def minhash_dtype(self):
        return self._proto().hashvalues.dtype

    def _filter(self, text: str) -> str | None:
        c = self.cfg
        reason = text_filter(c, text)
        if reason:
            return reason
        if c.max_repeated_line_ratio:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > c.max_repeated_line_ratio:
                return "repeated_lines"
        return None

    def decide(self, analysis: tuple, source: int = 0, example: Callable[[], str] | str = "",
               original: Callable[[], str] | str | None = None) -> bool:
        """Keep or drop one document, in corpus order, from its :meth:`analyze` result: applies the stateful
        steps (exact and near-duplicates: the first copy stays) and counts what is removed. ``example``: the
        (transformed) document, or a function giving it, for the report's examples; ``original``: the same
        before redaction (:meth:`normalized`), for the examples of personal data with ``pii="redact"``."""
        code, exact, contaminated, minhash, nbytes = analysis[:5]
        found = analysis[5] if len(analysis) > 5 else None
        self._n += 1
        reason = STEPS[code - 1] if code else None
        if reason is None and exact:
            if exact in self._exact:
                reason = "exact_duplicate"
            else:
                self._exact.add(exact)
        if reason is None and contaminated:
            reason = "contaminated"
        if reason is None and minhash is not None:
            from datasketch import MinHash

            proto = self._proto()
            m = MinHash(num_perm=NUM_PERM, seed=1, hashvalues=minhash, permutations=proto.permutations,
                        scheme=proto.scheme)
            if self._lsh.query(m):
                reason = "near_duplicate"
            else:
                self._lsh.insert(str(self._n), m)
        per = self.per_source.get(source)
        if per is None:
            per = self.per_source[source] = {"kept": 0, **{s: 0 for s in STEPS}}
        if found is not None and any(found) and reason in (None, "pii"):  # kept (or dropped for it)
            self._count_pii(found, source, original if self.cfg.pii == "redact" else example)
        if reason is None:
            self.kept["documents"] += 1
            self.kept["bytes"] += nbytes
            per["kept"] += 1
            return True
        st = self.stats[reason]
        st["documents"] += 1
        st["bytes"] += nbytes
        per[reason] += 1
        if len(st["examples"]) < self.n_examples:
            st["examples"].append((example() if callable(example) else example)[:200])
        return False

    def _count_pii(self, found: tuple[int, ...], source: int, text: Callable[[], str] | str | None) -> None:
        per = self.pii_per_source.get(source)
        if per is None:
            per = self.pii_per_source[source] = {"documents": 0, **dict.fromkeys(_pii.TYPES, 0)}
        for d in (self.pii, per):
            d["documents"] += 1
            for t, n in zip(_pii.TYPES, found):
                d[t] += int(n)
        if text is not None and any(n and len(self.pii_examples[t]) < self.n_examples
                                    for t, n in zip(_pii.TYPES, found)):
            for t, got in _pii.examples(text() if callable(text) else text, self.n_examples).items():
                have = self.pii_examples[t]
                have += [g for g in got if g not in have][:self.n_examples - len(have)]

    def keep(self, text: str, source: int = 0) -> bool:
        """Decide for one (transformed) document, in corpus order; counts what is removed."""
        return self.decide(self.analyze(text), source, text)

    def _name(self, i: int) -> str:
        return self.source_names[i] if i < len(self.source_names) else str(i)

    def report(self) -> dict[str, Any]:
        rep = {"kept": self.kept, "removed": {s: v for s, v in self.stats.items() if v["documents"]},
               "per_source": {self._name(i): v for i, v in sorted(self.per_source.items())}}
        if self.cfg.pii:
            rep["pii"] = {"mode": self.cfg.pii,
                          "documents": self.pii["documents"],
                          "matches": {t: self.pii[t] for t in _pii.TYPES},
                          "examples": {t: v for t, v in self.pii_examples.items() if v},
                          "per_source": {self._name(i): {"documents": v["documents"],
                                                         "matches": {t: v[t] for t in _pii.TYPES}}
                                         for i, v in sorted(self.pii_per_source.items())}}
        return rep

    def table(self) -> str:
        rows = [f"{'step':<18}{'documents':>12}{'bytes':>14}"]
        for s in STEPS:
            v = self.stats[s]
            if v["documents"]:
                rows.append(f"{s:<18}{v['documents']:>12,}{v['bytes']:>14,}")
        rows.append(f"{'kept':<18}{self.kept['documents']:>12,}{self.kept['bytes']:>14,}")
        if self.cfg.pii:
            what = {"report": "found in kept documents", "redact": "redacted",
                    "drop": "found in dropped documents"}[self.cfg.pii]
            rows.append(f"personal data {what}: {self.pii['documents']:,} documents; "
                        + ", ".join(f"{t} {self.pii[t]:,}" for t in _pii.TYPES))
        return "\n".join(rows)
