"""Documents → tokenizer → train/val token shards (flat np.memmap files) + meta.json, streaming.

Layout of a prepared data directory::

    DATA_DIR/
      meta.json            tokenizer, vocab size, dtype, per-split token/document/byte counts, sources (hash,
                           licence, tokens per split), cleaning report and settings
      tokenizer.json
      train_000000.bin     uint16 (vocab <= 65536) or uint32 token ids; EOT between documents
      val_000000.bin       (with mixture weights: train_g000_000000.bin, ... one series per input)

The pipeline never holds the corpus in memory. Documents stream from the sources in batches of about
``batch_chars`` characters; at most ``2 × workers`` batches are in flight, so peak memory is set by
``workers`` and ``batch_chars``, not by the corpus size. A single huge document (one 100 MB line) costs
a few times its own size, not hundreds: a document longer than ``LONG_DOC_CHARS`` (4 Mi characters) is
normalised and analysed by the main process slice by slice (``SLICE_CHARS``; cut where neither Unicode
normalisation, nor a word, nor a line's hash can change: the results are those of the whole text) and
only its tokenizer pieces go to the workers, cut by the rule of encode.py's docstring (exact for byte,
char, bpe, wordpiece and unigram wherever the text has an ordinary space or, for byte and char, anywhere;
elsewhere a piece with no safe point within 65,536 characters is cut there, and only there may its ids
differ). The tokenizer trainers get their sample in such pieces too, and every tokenizer encodes at most
``encode.ENCODE_CHARS`` characters at a time:

1. scan — read every source once; worker processes normalise each document and run the stateless
   cleaning checks (filters, hashes, MinHash signatures, n-gram lookups); the main process makes the
   stateful decisions (exact / near-duplicates) in corpus order and picks each kept document's split by a
   hash of its text. What survives is one byte per document (the "plan"); the duplicate indexes hold
   hashes only (see clean.py).
2. tokenizer — loaded, or trained on an evenly spread sample of the train split of bounded size (a
   second read; the trainer gets the sample as a stream).
3. encode — read again; worker processes normalise and tokenize batches (encode.IdsEncoder, one thread
   each); the main process appends the ids, in corpus order, to shards that are written incrementally.

A tokenizer known before the scan (a tokenizer.json, ``byte``) is applied in pass 1 already, so the input
is read once; only tiny corpora whose split needs a fix-up afterwards (a single document, or no document
hashed into one split) are encoded again.

Crash safety: everything is written inside a hidden ``.NAME.partial`` directory next to ``out`` (a shard
is written as ``*.bin.partial`` and renamed when complete); meta.json is written last and the directory
is renamed to ``out`` at the very end, so a directory without meta.json is never read. An interrupted
prepare is *restarted*, not resumed: the next prepare into the same ``out`` removes the leftover
``.NAME.partial`` and begins again. A lock file stops two prepares writing the same ``out`` at once.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import signal
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import regex

from pretrain.data.clean import _STEP_INDEX, NUM_PERM, CleanConfig, Cleaner, _h, _words, text_filter
from pretrain.data.encode import Chunker, IdsEncoder, norm_safe_cut
from pretrain.data.manifest import (
    FORMAT_VERSION,
    META,
    SPLITS,
    ShardWriter,
    check_prepared_out,
    token_dtype,
    writing_prepared,
)
from pretrain.data.pii import TYPES as PII_TYPES
from pretrain.data.pii import redact
from pretrain.data.pii import safe_cut as pii_safe_cut
from pretrain.data.sources import (
    DataError,
    HubSpec,
    expand_inputs,
    iter_documents,
    parse_weight,
)
from pretrain.data.tokenizer import TRAINED, Tokenizer, build_tokenizer
from pretrain.io import write_json_atomic

DROP, TRAIN, VAL, TAIL = 0, 1, 2, 3  # plan codes; TAIL: the single document, cut at its text tail
BPE_CACHE_WORDS = 100_000  # words whose BPE pieces a tokenizing process remembers (~10 MB)
AUTO_INPROCESS_BYTES = 32 << 20  # below this much input, workers=None runs in-process (no pool start-up)
LONG_DOC_CHARS = 1 << 22  # a longer document: cleaned by the main process, tokenized in pieces by workers
SLICE_CHARS = 1 << 17  # a longer text is normalised, analysed and hashed in slices of about this size
MINHASH_BATCH = 8192  # shingles hashed at once (datasketch holds 128 × 8 bytes per shingle while it does)
EXAMPLE_CHARS = 1000  # of a long document kept for the cleaning report's examples
_MORE = "more"  # scan metadata of a long document's pieces after its first
# str.isspace as a character class: a cut before one of these splits no word (\w), line or lower() context
_SPACE = "[\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_SPACE_FWD, _SPACE_REV = regex.compile(_SPACE), regex.compile(_SPACE, regex.REVERSE)
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines splits




def _digest(text: str, prefix: str = "") -> bytes:
    """blake2b-64 of ``prefix + text`` in UTF-8 (clean._h's hash), slice by slice: no copy of a long text."""
    h = hashlib.blake2b(prefix.encode("utf-8", "surrogatepass"), digest_size=8)
    for lo in range(0, len(text), SLICE_CHARS):
        h.update(text[lo:lo + SLICE_CHARS].encode("utf-8", "surrogatepass"))
    return h.digest()


def _is_val(doc: str, val_fraction: float, prefix: str = "") -> bool:
    return (int.from_bytes(_digest(doc, prefix), "little") / 2**64) < val_fraction


# ------------------------------------------------------------------------------------------- long documents


def _transform_long(c: Cleaner, d: str) -> str:
    """``c.transform(d)`` slice by slice (cut where normalisation cannot change); ``d`` itself when nothing
    changes, so an already clean document is not copied. Personal data is redacted in pieces cut where no
    match can be (pii.safe_cut); a text without such a place is redacted whole."""
    if c.cfg.pii == "redact":
        return _redact_long(c, d)
    out: list[str] | None = None
    lo = 0
    while lo < len(d):
        hi = len(d) if len(d) - lo <= SLICE_CHARS else norm_safe_cut(d, lo, lo + SLICE_CHARS)
        piece = d[lo:hi]
        done = c.normalized(piece)
        if out is None and done != piece:
            out = [d[:lo]]
        if out is not None:
            out.append(done)
        lo = hi
    return d if out is None else "".join(out)


def _redact_long(c: Cleaner, d: str) -> str:
    """_transform_long with ``pii="redact"``: each normalised slice is cut again at its last place where no
    match can be (pii.safe_cut), and what follows that place waits for the next slice."""
    out: list[str] = []
    pending: list[str] = []  # normalised text not yet redacted (no safe cut in it)
    lo = 0
    while lo < len(d):
        hi = len(d) if len(d) - lo <= SLICE_CHARS else norm_safe_cut(d, lo, lo + SLICE_CHARS)
        done = c.normalized(d[lo:hi])
        lo = hi
        cut = pii_safe_cut(done, 1, len(done)) if lo < len(d) else -1
        if cut < 0:
            pending.append(done)
            continue
        out.append(redact("".join(pending) + done[:cut])[0])
        pending = [done[cut:]]
    out.append(redact("".join(pending))[0])
    return "".join(out)


def _word_spans(t: str, size: int = SLICE_CHARS) -> Iterator[tuple[int, int]]:
    """Slices of ``t`` of about ``size`` characters, each cut before a whitespace character: no word is cut,
    and str.lower() sees the same context (whitespace is neither cased nor case-ignorable)."""
    lo = 0
    while len(t) - lo > size:
        m = _SPACE_REV.search(t, lo + 1, lo + size + 1) or _SPACE_FWD.search(t, lo + size + 1)
        if m is None:
            break
        yield lo, m.start()
        lo = m.start()
    yield lo, len(t)


def _analyze(c: Cleaner, t: str) -> tuple[int, int, bool, Any, int, tuple[int, ...] | None]:
    """``c.analyze(t)``; for a text over SLICE_CHARS the same result, computed slice by slice (personal data:
    one scan of the whole text, which copies nothing)."""
    if len(t) <= SLICE_CHARS:
        return c.analyze(t)
    cfg = c.cfg
    spans = list(_word_spans(t))
    nbytes = sum(len(t[a:b].encode("utf-8", "surrogatepass")) for a, b in spans)
    reason = _filter_long(c, t, spans)
    if reason:
        return _STEP_INDEX[reason], 0, False, None, nbytes, None
    found = c.pii_counts(t)
    if cfg.pii == "drop" and any(found):  # type: ignore[arg-type]
        return _STEP_INDEX["pii"], 0, False, None, nbytes, found
    exact = int.from_bytes(_digest(t), "little") if cfg.dedup_exact else 0
    contaminated = bool(c._contam) and _contaminated_long(c, t, spans)
    minhash = _minhash_long(c, t, spans) if c._lsh is not None else None
    return 0, exact, contaminated, minhash, nbytes, found


def _filter_long(c: Cleaner, t: str, spans: list[tuple[int, int]]) -> str | None:
    """Cleaner._filter without a whole-text list of lines (the repeated lines by hash, slice by slice)."""
    cfg = c.cfg
    reason = text_filter(cfg, t)
    if reason:
        return reason
    if cfg.max_repeated_line_ratio:
        lines = np.frombuffer(_line_hashes(t, spans), np.uint64)
        if len(lines) > 1 and 1 - len(np.unique(lines)) / len(lines) > cfg.max_repeated_line_ratio:
            return "repeated_lines"
    return None


def _line_hashes(t: str, spans: list[tuple[int, int]]) -> array:
    """A 64-bit hash of every non-empty ``line.strip()`` of ``t.splitlines()``, a line at a time (a line may
    run across slices; equal lines, equal hashes)."""
    out = array("Q")
    h: Any = None  # the hash of the current line's stripped text so far
    pending: list[str] = []  # its whitespace not yet known to be inside the line (not trailing)

    def feed(part: str) -> None:
        nonlocal h, pending
        body = part.rstrip()
        if h is None:
            if not body.lstrip():
                return
            h = hashlib.blake2b(body.lstrip().encode("utf-8", "surrogatepass"), digest_size=8)
        elif body:
            h.update(("".join(pending) + body).encode("utf-8", "surrogatepass"))
        else:
            pending.append(part)
            return
        pending = [part[len(body):]]

    def end_line() -> None:
        nonlocal h, pending
        if h is not None:
            out.append(int.from_bytes(h.digest(), "little"))
        h, pending = None, []

    for a, b in spans:
        s = t[a:b]
        lines = s.splitlines()
        for k, line in enumerate(lines):
            feed(line)
            if k < len(lines) - 1 or s[-1] in _LINE_BREAKS:
                end_line()
    end_line()
    return out


def _contaminated_long(c: Cleaner, t: str, spans: list[tuple[int, int]]) -> bool:
    """Cleaner.analyze's n-gram lookup, slice by slice; the last words of a slice carry over to the next."""
    lengths = [c.cfg.ngram, *sorted(c._short_lens)]
    keep = max(lengths) - 1
    carry: list[str] = []
    for a, b in spans:
        w = carry + _words(t[a:b])
        for k in lengths:  # the n-grams that end in this slice's words
            for i in range(max(0, len(carry) - k + 1), len(w) - k + 1):
                if _h(" ".join(w[i:i + k])) in c._contam:
                    return True
        carry = w[max(0, len(w) - keep):] if keep else []
    return False


def _minhash_long(c: Cleaner, t: str, spans: list[tuple[int, int]]) -> Any:
    """Cleaner.analyze's MinHash signature (word 5-gram shingles), slice by slice: the signature of a union is
    the element-wise minimum, which MinHash.update_batch keeps."""
    from datasketch import MinHash

    proto = c._proto()
    m = MinHash(num_perm=NUM_PERM, seed=1, permutations=proto.permutations, scheme=proto.scheme)
    carry: list[str] = []
    first: list[str] = []
    total = 0
    for a, b in spans:
        new = _words(t[a:b])
        first += new[:5 - len(first)]
        total += len(new)
        w = carry + new
        shingles = list({" ".join(w[i:i + 5]).encode() for i in range(max(0, len(carry) - 4), len(w) - 4)})
        for k in range(0, len(shingles), MINHASH_BATCH):
            m.update_batch(shingles[k:k + MINHASH_BATCH])
        carry = w[max(0, len(w) - 4):]
    if not total:
        return None
    if total < 5:  # fewer than five words: one shingle of them all
        m.update_batch([" ".join(first).encode()])
    return m.hashvalues


# ------------------------------------------------------------------------------------------------ workers

_W: dict[str, Any] = {}  # per-process worker state (set by _init_worker)


def _init_worker(cleaner: Cleaner, tok_json: str | None, val_fraction: float, dtype: str,
                 child: bool) -> None:
    if child:  # Ctrl-C and SIGTERM are handled by the main process, which stops the pool (SIGTERM: terminate)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from tokenizers import Tokenizer as HFTokenizer

    _W.clear()
    tok = HFTokenizer.from_str(tok_json) if tok_json else None
    if tok is not None and hasattr(tok.model, "_resize_cache"):
        try:  # BPE's word cache (10k words by default) thrashes on a large corpus
            tok.model._resize_cache(BPE_CACHE_WORDS)
        except Exception:
            pass
    # (its own copy)
    _W.update(cleaner=cleaner, vf=val_fraction, enc=IdsEncoder(tok, dtype) if tok is not None else None)


def _scan_batch(texts: list) -> tuple:
    """Normalise and analyse a batch of raw documents (stateless; runs in a worker). With a tokenizer (known
    before the scan), also tokenize the documents that passed the filters, so one read does everything.
    An item ``(piece,)`` is a piece of a long document that the main process normalised and analysed: it is
    tokenized only (its UTF-8 size in ``nbytes``); None stands for such a document, not to be encoded."""
    c: Cleaner = _W["cleaner"]
    vf = _W["vf"]
    n = len(texts)
    codes = np.zeros(n, np.int8)
    exact = np.zeros(n, np.uint64)
    contam = np.zeros(n, np.bool_)
    val = np.zeros(n, np.bool_)
    nbytes = np.zeros(n, np.int64)
    chars = np.zeros(n, np.int64)
    minhash = np.zeros((n, NUM_PERM), c.minhash_dtype) if c.cfg.near_dup_threshold else None
    signed = np.zeros(n, np.bool_)  # has a MinHash signature (a document without words has none)
    pii = np.zeros((n, len(PII_TYPES)), np.int64) if c.cfg.pii else None  # personal data found, per type
    passed: list[str] = []
    for i, raw in enumerate(texts):
        if raw is None:  # a long document analysed by the main process, not encoded here
            continue
        if isinstance(raw, tuple):
            nbytes[i] = len(raw[0].encode("utf-8", "surrogatepass"))
            passed.append(raw[0])
            continue
        t = c.transform(raw)
        code, ex, ct, mh, nb, found = _analyze(c, t)
        codes[i], exact[i], contam[i], nbytes[i], chars[i] = code, ex, ct, nb, len(t)
        if mh is not None:
            minhash[i], signed[i] = mh, True  # type: ignore[index]
        if found is not None:
            pii[i] = found  # type: ignore[index]
        if not code:
            passed.append(t)
            if vf > 0:
                val[i] = _is_val(t, vf)
    encoded = _encode_texts(passed) if _W["enc"] is not None else None
    return codes, exact, contam, minhash, signed, nbytes, val, chars, encoded, pii


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of every text back to back, length of each)."""
    return _W["enc"].encode(texts)


def _encode_batch(items: list[tuple]) -> tuple:
    """Normalise and tokenize a batch of kept documents (runs in a worker). Returns the ids of every piece
    back to back, and per piece: its length, split code, UTF-8 size, the index of its document and whether
    it continues the text before it. An item ``(piece, code, continues)`` is a piece of a long document,
    normalised and cut by the main process (_encode_items): tokenized only."""
    c: Cleaner = _W["cleaner"]
    vf = _W["vf"]
    texts: list[str] = []
    meta: list[tuple[int, int, bool]] = []  # per text: split code, index of its document, continues
    for j, item in enumerate(items):
        if len(item) == 3:
            texts.append(item[0]), meta.append((item[1], j, item[2]))
            continue
        raw, code = item
        t = c.transform(raw)
        if code == TAIL:  # one document: the last val_fraction of its text is the validation split
            cut = int(len(t) * (1.0 - vf))
            texts.append(t[:cut]), meta.append((TRAIN, j, False))
            if cut < len(t):
                texts.append(t[cut:]), meta.append((VAL, j, False))
        else:
            texts.append(t), meta.append((code, j, False))
    ids, lens = _encode_texts(texts)
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), np.int64, len(texts))
    codes, owner, cont = zip(*meta) if meta else ((), (), ())
    return (ids, lens, np.array(codes, np.int8), nbytes, np.array(owner, np.int64),
            np.array(cont, np.bool_))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Workers:
    """``workers`` processes (0: this process) running one worker function over a stream of batches, with
    results in order and at most ``2 × workers`` batches in flight (bounded memory)."""

    def __init__(self, workers: int, initargs: tuple, start_method: str | None = None):
        self.workers = workers
        self.pool = None
        if workers <= 0:
            _init_worker(*initargs, False)
            return
        if start_method is None:
            linux_fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux"
            start_method = "fork" if linux_fork else "spawn"
        ctx = multiprocessing.get_context(start_method)
        # children tokenize one batch each on one thread (no rayon pool per child; no fork warning)
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        gc.freeze()  # forked children share the parent's objects without copying them on the next GC
        try:
            self.pool = ctx.Pool(workers, _init_worker, (*initargs, True))
        finally:
            gc.unfreeze()
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before

    def map(self, fn: Callable, batches: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """(meta, payload) batches → (meta, fn(payload)), in order."""
        if self.pool is None:
            for meta, payload in batches:
                yield meta, fn(payload)
            return
        pending: deque = deque()
        for meta, payload in batches:
            pending.append((meta, self.pool.apply_async(fn, (payload,))))
            if len(pending) >= 2 * self.workers:
                m, r = pending.popleft()
                yield m, r.get()
        while pending:
            m, r = pending.popleft()
            yield m, r.get()

    def close(self, ok: bool = True) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None
        _W.clear()


def _batched(items: Iterator[tuple[Any, str, Any]], batch_chars: int) -> Iterator[tuple[list, list]]:
    """(meta, text, payload item) → (metas, payload items) batches of about ``batch_chars`` characters."""
    metas: list = []
    payload: list = []
    size = 0
    for meta, text, item in items:
        metas.append(meta)
        payload.append(item)
        size += len(text)
        if size >= batch_chars:
            yield metas, payload
            metas, payload, size = [], [], 0
    if payload:
        yield metas, payload


# ------------------------------------------------------------------------------------------------ locking


def _input_labels(inputs: list) -> list[str]:
    out = []
    for item in inputs:
        if isinstance(item, HubSpec):
            out.append("hf:" + item.name + (f":{item.config}" if item.config else ""))
        else:
            out.append(parse_weight(str(item))[0])
    return out


# ------------------------------------------------------------------------------------------------ prepare


def prepare(inputs: list, out: str | Path, tokenizer: str = "bpe", vocab_size: int = 8192,
            val_fraction: float = 0.1, text_field: str = "text", bad_files: str = "error",
            shard_tokens: int = 100_000_000, overwrite: bool = False, clean: CleanConfig | None = None,
            licence: str = "", tokenizer_sample_chars: int = 1_000_000_000, log=print, *,
            workers: int | None = None, batch_chars: int = 1_000_000, text_unit: str = "file",
            hf_split: str = "train", hf_revision: str | None = None, hf_data_files: Any = None,
            progress_s: float = 30.0, start_method: str | None = None) -> dict[str, Any]:
    """Read ``inputs``, build or load the tokenizer, write token shards and meta.json to ``out``.

    ``inputs``: files, folders, globs, ``hf:NAME[:CONFIG]`` (Hugging Face datasets, with ``hf_split``,
    ``hf_revision``, ``hf_data_files``) or :class:`HubSpec` objects; any of them may carry a mixture weight
    (``PATH::WEIGHT``), recorded in meta.json and honoured by the training loader.

    Split rule: with a single document (e.g. one .txt file) the last ``val_fraction`` of its text is the
    validation split (nanoGPT's rule); with several documents, each goes to validation with probability
    ``val_fraction`` by a hash of its content (stable across runs and machines), with at least one document
    in each split. With mixture weights the rule holds for each input: a one-document input is cut at its
    text tail, so it trains whatever its hash.

    ``workers``: tokenizer/cleaning processes (0: in this process, the tokenizers library using its own
    threads; None: one per CPU, or in-process for inputs under 32 MB). ``batch_chars``: characters of text
    per batch; with ``workers`` they bound peak memory. ``start_method``: how worker processes start
    (default "fork" on Linux, no ``if __name__ == "__main__"`` guard needed; "spawn" starts them clean,
    without the parent's memory — what the CLI uses). Returns the meta dict.
    """
    t0 = time.time()
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if batch_chars < 1 or shard_tokens < 1:
        raise DataError("batch_chars and shard_tokens must be >= 1")
    if workers is not None and workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    check_prepared_out(out, overwrite)
    sources = expand_inputs(inputs, hf_split=hf_split, hf_revision=hf_revision, hf_data_files=hf_data_files)
    # an --out inside an input folder: its own files (and the hidden work folders beside it) are not input
    own = [p.resolve() for p in (out, out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old")]
    sources = [s for s in sources if s.path is None or not any(o in s.path.resolve().parents for o in own)]
    if not sources:
        raise DataError(f"no input files outside the output directory {out}")
    weighted = any(s.weight is not None for s in sources)
    if workers is None:
        size = sum(s.path.stat().st_size if s.path is not None else AUTO_INPROCESS_BYTES for s in sources)
        workers = usable_cpus() if usable_cpus() > 1 and size >= AUTO_INPROCESS_BYTES else 0
    with writing_prepared(out, overwrite, log) as partial:
        meta, tok, dtype = _prepare(sources, partial, tokenizer, vocab_size, val_fraction, text_field,
                                    bad_files, shard_tokens, clean, licence, tokenizer_sample_chars, log,
                                    workers, batch_chars, text_unit, weighted, _input_labels(inputs),
                                    progress_s, t0, start_method)
    for sp in SPLITS:
        info = meta["splits"][sp]
        log(f"{sp}: {info['tokens']:,} tokens, {info['documents']:,} documents, {info['bytes']:,} bytes")
    if tok.kind == "file" and tok.unk_id is not None:  # a reused tokenizer may not cover this corpus
        _warn_unknown(out, meta, tok.unk_id, dtype, log)
    return meta


class _Output:
    """The shard writers of one prepare: a train and a val series per mixture component."""

    def __init__(self, partial: Path, dtype: np.dtype, shard_tokens: int, groups: list[int], weighted: bool,
                 eot_id: int, group_of: list[int]):
        self.args = (partial, dtype, shard_tokens, groups, weighted)
        self.eot = np.array([eot_id], dtype=dtype)
        self.groups = groups
        self.group_of = group_of
        # tokens each source contributed to each split (an EOT separator counts for the document after it,
        # so the sources' counts add up to the split's)
        self.source_tokens = [[0] * len(SPLITS) for _ in group_of]
        self.writers = {(sp, g): ShardWriter(partial, sp, dtype, shard_tokens, g if weighted else None)
                        for sp in SPLITS for g in groups}
        self.bytes = 0
        self._buf: dict[tuple[str, int], list[np.ndarray]] = {}

    def add(self, code: int, source: int, ids: np.ndarray, nbytes: int, cont: bool = False) -> None:
        """Queue one document's ids (written, with EOT separators, at the next :meth:`flush`); ``source``: the
        index of its source; ``cont``: the ids continue the document before (a long document's next
        piece)."""
        key = (SPLITS[code - 1], self.group_of[source])
        w = self.writers[key]
        buf = self._buf.setdefault(key, [])
        counts = self.source_tokens[source]
        if not cont:
            if w.documents:  # end-of-document token *between* documents
                buf.append(self.eot)
                counts[code - 1] += 1
            w.documents += 1
        buf.append(ids)
        counts[code - 1] += len(ids)
        w.bytes += nbytes
        self.bytes += nbytes

    def flush(self) -> None:
        for key, parts in self._buf.items():
            self.writers[key].write(np.concatenate(parts))
        self._buf.clear()

    def close(self) -> dict[str, dict[str, Any]]:
        self.flush()
        info: dict[str, dict[str, Any]] = {}
        for sp in SPLITS:
            parts = [self.writers[(sp, g)].close() for g in self.groups]
            info[sp] = {"tokens": sum(p["tokens"] for p in parts),
                        "documents": sum(p["documents"] for p in parts),
                        "bytes": sum(p["bytes"] for p in parts),
                        "shards": [sh for p in parts for sh in p["shards"]]}
        return info

    def discard(self) -> None:
        self._buf.clear()
        for w in self.writers.values():
            w.close()
            for sh in w.shards:
                (w.out_dir / sh["file"]).unlink()


def _prepare(sources, partial, tokenizer, vocab_size, val_fraction, text_field, bad_files, shard_tokens,
             clean, licence, tokenizer_sample_chars, log, workers, batch_chars, text_unit, weighted, labels,
             progress_s, t0, start_method) -> tuple[dict[str, Any], Tokenizer, np.dtype]:
    """Everything written into ``partial`` (created, removed on failure and swapped into place by
    manifest.writing_prepared) → (meta, the tokenizer, the token dtype)."""
    def docs(record: bool = False) -> Iterator[tuple[int, str]]:
        return iter_documents(sources, text_field, bad_files, record=record, with_source=True,
                              text_unit=text_unit)

    groups = sorted({s.group for s in sources}) if weighted else [0]
    group_of = [s.group if weighted else 0 for s in sources]
    cleaner = Cleaner(clean or CleanConfig(), [s.label for s in sources])
    # A tokenizer known upfront (a tokenizer.json, byte) is applied during the scan: one read of the input.
    tok: Tokenizer | None = (None if tokenizer == "char" or tokenizer in TRAINED
                             else build_tokenizer(tokenizer))
    output: _Output | None = None
    pool: _Workers | None = None
    t_log = time.time()

    def progress(done: int, what: str, t_start: float) -> None:
        nonlocal t_log
        if progress_s and time.time() - t_log >= progress_s:
            t_log = time.time()
            log(f"{what} {done / 1e6:,.0f} MB ({done / 1e6 / (t_log - t_start):.1f} MB/s)")

    try:
        # Pass 1: scan — read, clean and choose splits; one plan byte per document. (A long document is not
        # encoded here when every input is one text file: it is one document, to be cut at its text tail and
        # encoded again below.)
        lone = (val_fraction > 0 and text_unit == "file" and all(s.kind == "text" for s in sources)
                and len({s.group for s in sources}) == len(sources))
        if tok is not None:
            dtype = token_dtype(tok.vocab_size)
            output = _Output(partial, dtype, shard_tokens, groups, weighted, tok.eot_id, group_of)
        pool = _Workers(workers, (cleaner, tok.to_str() if tok else None, val_fraction,
                                  dtype.name if tok else "uint32"), start_method)
        plan, per_group, n_docs, total_chars = _scan(
            pool, cleaner, _scan_items(docs(record=True), cleaner, val_fraction,
                                       Chunker.for_tokenizer(tok.tk) if tok and not lone else None),
            group_of, output, batch_chars, lambda done: progress(done, "tokenized", t0))
        pool.close()
        if not plan:
            raise DataError("no text found in the input: every file was empty or skipped")
        n_read = sum(1 for s in sources if not s.skipped)
        log(f"read {len(plan):,} documents from {n_read} {'source' if n_read == 1 else 'sources'} in "
            f"{time.time() - t0:.1f} s" + (f" ({workers} worker processes)" if workers else ""))
        if cleaner.cfg.active():
            log("cleaning:\n" + cleaner.table())
        if n_docs == 0:
            raise DataError(f"no documents left after cleaning ({len(plan):,} read): loosen the filters")
        # each mixture component (or the whole corpus) trains (see _fix_splits)
        tails, fixed = _fix_splits(plan, per_group, val_fraction)
        single = tails == len(per_group)
        if output is not None and fixed:
            output.discard()  # the splits changed after the fact (tiny corpora or inputs): encode again below
            output = None

        def planned() -> Iterator[tuple[int, int, str]]:
            return _planned(docs(), plan)

        # Pass 2: the tokenizer, unless known upfront. A char vocabulary is the set of characters of the whole
        # corpus (as nanoGPT's), so validation text is always representable; trained vocabularies learn from
        # an evenly spread sample (by a content hash) of about tokenizer_sample_chars of the train split,
        # streamed to the trainer.
        if tok is None:
            rate = min(1.0, tokenizer_sample_chars / max(total_chars, 1))
            tok = build_tokenizer(tokenizer, _tokenizer_texts(tokenizer, planned(), cleaner, rate,
                                                              val_fraction),
                                  vocab_size)
        dtype = token_dtype(tok.vocab_size)
        log(f"tokenizer: {tok.kind}, vocab {tok.vocab_size:,} ({dtype.name} shards)")
        if tok.kind in ("bpe", "wordpiece", "unigram") and tok.vocab_size < vocab_size:
            log(f"warning: the {tok.kind} vocabulary has {tok.vocab_size:,} tokens, fewer than the "
                f"{vocab_size:,} asked for: the corpus (or its tokenizer sample) is too small for more")

        # Pass 3 (unless done during the scan): encode in the workers; write shards in corpus order.
        if output is None:
            output = _Output(partial, dtype, shard_tokens, groups, weighted, tok.eot_id, group_of)
            pool = _Workers(workers, (cleaner.transformer(), tok.to_str(), val_fraction, dtype.name),
                            start_method)
            items = _encode_items(planned(), cleaner, val_fraction, Chunker.for_tokenizer(tok.tk))
            _encode_pass(pool, output, items, batch_chars, progress)
        log(f"tokenized {output.bytes / 1e6:,.1f} MB ({time.time() - t0:.1f} s since the start)")
        split_info = output.close()
        if split_info["train"]["tokens"] < 2:
            raise DataError("the training split is empty after tokenization")
        tok.save(partial / "tokenizer.json")
        with open(partial / "tokenizer.json", "rb+") as f:
            os.fsync(f.fileno())
        meta = _manifest(tok, dtype, val_fraction, tails, single, split_info, sources, output.source_tokens,
                         licence, cleaner,
                         {"text_field": text_field, "text_unit": text_unit, "workers": workers,
                          "start_method": (start_method or "default") if workers else None,
                          "batch_chars": batch_chars, "shard_tokens": shard_tokens}, t0)
        if weighted:
            meta["mixture"] = _mixture(sources, labels, groups, output.writers, log)
        write_json_atomic(partial / META, meta)
    except BaseException:  # an error or Ctrl-C: stop the workers (writing_prepared removes the partial)
        if pool is not None:
            pool.close(ok=False)
        raise
    return meta, tok, dtype


def _scan_items(docs: Iterator[tuple[int, str]], cleaner: Cleaner, val_fraction: float,
               chunker: Chunker | None) -> Iterator[tuple[tuple, str, Any]]:
    """(metadata, text, worker item) of every document for the scan. An ordinary document goes to a worker
    whole (metadata: source index, raw text, None). A long one (over LONG_DOC_CHARS) is normalised and
    analysed here, slice by slice, and the workers get only its tokenizer pieces (``chunker``; None, a
    placeholder, when it is not encoded): metadata (source index, its first characters, (analysis, validation,
    characters, encoded)) for the first piece, _MORE for the others."""
    for src_index, d in docs:
        if len(d) <= LONG_DOC_CHARS:
            yield (src_index, d, None), d, d
            continue
        t = _transform_long(cleaner, d)
        a = _analyze(cleaner, t)
        is_val = bool(val_fraction > 0 and not a[0] and _is_val(t, val_fraction))
        head = d[:EXAMPLE_CHARS]
        del d
        if chunker is None or a[0]:
            yield (src_index, head, (a, is_val, len(t), False)), "", None
            continue
        info = (a, is_val, len(t), True)
        for lo, hi in chunker.spans(t):
            piece = t[lo:hi]
            yield (src_index, head, info if lo == 0 else _MORE), piece, (piece,)


def _planned(docs: Iterator[tuple[int, str]], plan: bytearray) -> Iterator[tuple[int, int, str]]:
    """(source index, plan code, raw text) of every kept document of a second read, checking that the input
    did not change since the first."""
    changed = DataError("the input changed while it was being prepared (a different number of documents "
                        "on a second read); run prepare again")
    i = 0
    for src_index, doc in docs:
        if i >= len(plan):
            raise changed
        code = plan[i]
        i += 1
        if code != DROP:
            yield src_index, code, doc
    if i != len(plan):
        raise changed


def _scan(pool: _Workers, cleaner: Cleaner, items: Iterator[tuple[tuple, str, Any]], group_of: list[int],
          output: _Output | None, batch_chars: int, progress: Callable[[int], None],
          ) -> tuple[bytearray, dict[int, list[int]], int, int]:
    """Pass 1: read, clean and choose splits, one plan byte per document (and encode, when the tokenizer is
    known upfront). Returns the plan, per mixture component (one for an unweighted corpus) [kept documents,
    validation ones, first and last plan index], the number kept and their characters."""
    plan = bytearray()
    n_docs = total_chars = 0
    per_group: dict[int, list[int]] = {}
    kept = False
    for metas, res in pool.map(_scan_batch, _batched(items, batch_chars)):
        codes, exact, contam, minhash, signed, nbytes, val, chars, encoded, pii = res
        if encoded is not None:
            ids, lens = encoded
            ends = np.cumsum(lens)
            k = 0  # index among the encoded texts (documents that passed the filters, long documents' pieces)
        for j, (src_index, text, long) in enumerate(metas):
            if long is None:
                a = (int(codes[j]), int(exact[j]), bool(contam[j]), minhash[j] if signed[j] else None,
                     int(nbytes[j]), tuple(pii[j]) if pii is not None else None)
                is_val, n_chars = bool(val[j]), int(chars[j])
            elif long is not _MORE:  # a long document: analysed by the main process
                a, is_val, n_chars, _ = long
            if long is not _MORE:
                kept = cleaner.decide(a, src_index, lambda t=text: cleaner.transform(t),
                                      lambda t=text: cleaner.normalized(t))
                if kept:
                    g = per_group.setdefault(group_of[src_index], [0, 0, len(plan), 0])
                    g[0], g[1], g[3] = g[0] + 1, g[1] + is_val, len(plan)
                    n_docs += 1
                    total_chars += n_chars
                    plan.append(VAL if is_val else TRAIN)
                else:
                    plan.append(DROP)
            if encoded is not None and (not codes[j] if long is None else long is _MORE or long[3]):
                if kept:
                    output.add(plan[-1], src_index, ids[ends[k] - lens[k]:ends[k]], int(nbytes[j]),
                               cont=long is _MORE)
                k += 1
        if output is not None:
            output.flush()
            progress(output.bytes)
    return plan, per_group, n_docs, total_chars


def _manifest(tok: Tokenizer, dtype: np.dtype, val_fraction: float, tails: int, single: bool,
              split_info: dict[str, Any], sources: list, source_tokens: list[list[int]], licence: str,
              cleaner: Cleaner, settings: dict[str, Any], t0: float) -> dict[str, Any]:
    """meta.json: the format, tokenizer, splits, every source (with its hash, licence and tokens per split),
    the cleaning report with the cleaning settings, and the settings (see data/manifest.py)."""
    return {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id, "mask_id": tok.mask_id, "sha256": tok.sha256()},
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "split_rule": "text-tail" if single else "document-hash" + (", text-tail for single-document inputs"
                                                                  if tails else ""),
        "splits": split_info,
        "sources": [{**s.manifest(), **({"licence": licence} if licence else {}),
                     "tokens": dict(zip(SPLITS, counts))} for s, counts in zip(sources, source_tokens)],
        "cleaning": {"settings": cleaner.cfg.settings(), **cleaner.report()},
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - t0, 3),
    }


def _fix_splits(plan: bytearray, per_group: dict[int, list[int]], val_fraction: float) -> tuple[int, int]:
    """Each mixture component (or the whole corpus) trains: a lone document is cut at its text tail, and if
    every document hashed into validation the first trains; if none of the corpus did, its last goes there.
    Returns (tails, documents whose split changed)."""
    tails = fixed = 0
    for n_g, val_g, first_g, _ in per_group.values():
        if n_g == 1:
            plan[first_g], tails = TAIL, tails + 1
            fixed += val_fraction > 0  # (with no validation a tail is the whole text: encoded as it was)
        elif val_g == n_g:
            plan[first_g], fixed = TRAIN, fixed + 1
    if val_fraction > 0 and VAL not in plan and TAIL not in plan:
        plan[max(g[3] for g in per_group.values())], fixed = VAL, fixed + 1
    return tails, fixed


def _tokenizer_texts(tokenizer: str, planned: Iterator[tuple[int, int, str]], cleaner: Cleaner, rate: float,
                     val_fraction: float) -> Iterator[str]:
    """What a tokenizer learns from: a char vocabulary every kept document (so validation text is always
    representable, as nanoGPT's), a trained one an evenly spread sample (by content hash, at ``rate``) of the
    train split. A document over encode.PIECE_CHARS goes in pieces, cut where the tokenizer's pre-tokenizer
    cuts anyway (encode.Chunker): the trainer counts the same words, in bounded memory."""
    chunker = Chunker.for_kind(tokenizer)
    for _, code, d in planned:
        if tokenizer == "char" or (code in (TRAIN, TAIL) and (rate >= 1.0 or _is_val(d, rate, "sample:"))):
            t = cleaner.transform(d) if len(d) <= LONG_DOC_CHARS else _transform_long(cleaner, d)
            del d
            end = int(len(t) * (1.0 - val_fraction)) if code == TAIL and tokenizer != "char" else len(t)
            for lo, hi in chunker.spans(t, 0, end):
                yield t if hi - lo == len(t) else t[lo:hi]


def _encode_items(planned: Iterator[tuple[int, int, str]], cleaner: Cleaner, val_fraction: float,
                  chunker: Chunker) -> Iterator[tuple[int, str, tuple]]:
    """(source index, text, worker item) of every kept document for pass 3: an ordinary one goes to a
    worker whole, a long one (over LONG_DOC_CHARS) is normalised here and goes in tokenizer pieces
    (``(piece, split code, continues the text before)``; a text-tail document as its two texts)."""
    for i, code, d in planned:
        if len(d) <= LONG_DOC_CHARS:
            yield i, d, (d, code)
            continue
        t = _transform_long(cleaner, d)
        del d
        cut = int(len(t) * (1.0 - val_fraction)) if code == TAIL else len(t)
        parts = [(0, cut, TRAIN if code == TAIL else code)] + ([(cut, len(t), VAL)] if cut < len(t) else [])
        for start, end, split in parts:
            for lo, hi in chunker.spans(t, start, end):
                piece = t[lo:hi]
                yield i, piece, (piece, split, lo > start)


def _encode_pass(pool: _Workers, output: _Output, items: Iterator[tuple[int, str, Any]], batch_chars: int,
                 progress: Callable[[int, str, float], None]) -> None:
    """Encode the kept documents in the workers; write them to the shards in corpus order."""
    t_enc = time.time()
    for src, res in pool.map(_encode_batch, _batched(items, batch_chars)):
        ids, lens, codes, nbytes, owner, cont = res
        ends = np.cumsum(lens)
        for k in range(len(lens)):
            output.add(int(codes[k]), src[owner[k]], ids[ends[k] - lens[k]:ends[k]], int(nbytes[k]),
                       cont=bool(cont[k]))
        output.flush()
        progress(output.bytes, "tokenized", t_enc)
    pool.close()


def _warn_unknown(out: Path, meta: dict[str, Any], unk_id: int, dtype: np.dtype,
                  log: Callable[[str], None]) -> None:
    unk = total = 0
    for sp in SPLITS:
        for shard in (x for x in meta["splits"][sp]["shards"] if x["tokens"]):
            ids = np.memmap(out / shard["file"], dtype=dtype, mode="r")
            unk += int(np.count_nonzero(ids == unk_id))
            total += ids.size
    if total and unk / total > 0.001:
        log(f"warning: {unk:,} of {total:,} tokens ({unk / total:.1%}) are the unknown token: the reused "
            "tokenizer does not cover this corpus's characters (train one with --tokenizer bpe, or reuse "
            "one with a byte-level alphabet)")


def _mixture(sources, labels, groups, writers, log) -> list[dict[str, Any]]:
    """Per input: its weight, files and tokens per split (the loader samples train sequences ∝ weight)."""
    out = []
    for g in groups:
        members = [s for s in sources if s.group == g]
        weight = members[0].weight
        entry = {"group": g, "input": labels[g], "weight": weight, "sources": len(members),
                 "documents": {sp: writers[(sp, g)].documents for sp in SPLITS},
                 "tokens": {sp: writers[(sp, g)].tokens for sp in SPLITS}}
        if weight and entry["tokens"]["train"] == 0:
            log(f"warning: input {labels[g]!r} (weight {weight}) has no training tokens")
        out.append(entry)
    total = sum(e["weight"] for e in out)
    if total <= 0:
        raise DataError("every mixture weight is 0: give at least one input a positive weight")
    for e in out:
        e["share"] = e["weight"] / total
    return out
