"""Documents → tokenizer → train/val token shards (flat np.memmap files) + meta.json.

Layout of a prepared data directory::

    DATA_DIR/
      meta.json            tokenizer, vocab size, dtype, per-split token/document/byte counts, sources
      tokenizer.json
      train_000000.bin     uint16 (vocab <= 65536) or uint32 token ids; EOT between documents
      val_000000.bin

meta.json is written last: a directory without it is an unfinished prepare and is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.clean import CleanConfig, Cleaner
from pretrain.data.sources import DataError, Source, expand_inputs, iter_documents
from pretrain.data.tokenizer import Tokenizer, build_tokenizer

META = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, rename it over ``path``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class ShardWriter:
    """Appends token arrays to ``{split}_{k:06d}.bin`` files, starting a new shard every ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f = None
        self._n = 0
        self.tokens = 0
        self.documents = 0
        self.bytes = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self._n = 0
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while ids.size:
            if self._f is None or self._n >= self.shard_tokens:
                self._close_current()
                self._open()
            take = min(ids.size, self.shard_tokens - self._n)
            self._f.write(ids[:take].tobytes())  # type: ignore[union-attr]
            self._n += take
            self.shards[-1]["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def close(self) -> dict[str, Any]:
        self._close_current()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def _is_val(doc: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h / 2**64) < val_fraction


def _batches(docs: Iterator[tuple[str, str]], max_chars: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "bpe", vocab_size: int = 8192,
            val_fraction: float = 0.1, text_field: str = "text", bad_files: str = "error",
            shard_tokens: int = 100_000_000, overwrite: bool = False, clean: CleanConfig | None = None,
            licence: str = "", tokenizer_sample_chars: int = 1_000_000_000, log=print) -> dict[str, Any]:
    """Read ``inputs``, build or load the tokenizer, write token shards and meta.json to ``out``.

    Split rule: with a single document (e.g. one .txt file) the last ``val_fraction`` of its text is the
    validation split (nanoGPT's rule); with several documents, each goes to validation with probability
    ``val_fraction`` by a hash of its content (stable across runs and machines), with at least one document
    in each split.
    Returns the meta dict.
    """
    t0 = time.time()
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if (out / META).exists() and not overwrite:
        raise DataError(f"{out} already holds prepared data; pass --overwrite to replace it")
    if out.exists() and not (out / META).exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a prepared data directory; refusing to replace it "
                        "(choose an empty or new --out)")
    sources: list[Source] = expand_inputs(inputs)

    # Pass 1: read everything once (validates files, fills in the manifest), clean, count documents.
    cleaner = Cleaner(clean or CleanConfig(), [str(s.path) for s in sources])
    kept: list[bool] = []
    n_docs = 0
    n_val_hash = 0
    total_chars = 0
    for src_index, doc in iter_documents(sources, text_field, bad_files, record=True, with_source=True):
        doc = cleaner.transform(doc)
        kept.append(cleaner.keep(doc, src_index))
        if kept[-1]:
            n_docs += 1
            n_val_hash += _is_val(doc, val_fraction)
            total_chars += len(doc)
    if not kept:
        raise DataError("no text found in the input: every file was empty or skipped")
    log(f"read {len(kept):,} documents from {sum(1 for s in sources if not s.skipped)} files")
    if cleaner.cfg.active():
        log("cleaning:\n" + cleaner.table())
    if n_docs == 0:
        raise DataError(f"no documents left after cleaning ({len(kept):,} read): loosen the filters")

    single = n_docs == 1
    force_last_val = not single and val_fraction > 0 and n_val_hash == 0
    force_first_train = not single and n_val_hash == n_docs  # every document hashed into validation

    def split_docs() -> Iterator[tuple[str, str]]:
        """(split, text) for every document, in corpus order."""
        i = 0
        for j, doc in enumerate(iter_documents(sources, text_field, bad_files)):
            if not kept[j]:
                continue
            doc = cleaner.transform(doc)
            i += 1
            if single:
                cut = int(len(doc) * (1.0 - val_fraction))
                yield "train", doc[:cut]
                if cut < len(doc):
                    yield "val", doc[cut:]
            elif force_first_train and i == 1:
                yield "train", doc
            elif (force_last_val and i == n_docs) or (not force_last_val and _is_val(doc, val_fraction)):
                yield "val", doc
            else:
                yield "train", doc

    # Pass 2: the tokenizer (trained on the train split only, so validation stays held out).
    # Tokenizer training reads a bounded, evenly spread sample (by a content hash) of the train split, so
    # its memory does not grow with the corpus.
    sample_rate = min(1.0, tokenizer_sample_chars / max(total_chars, 1))

    def train_texts() -> Iterator[str]:
        for split, text in split_docs():
            if split == "train" and (sample_rate >= 1.0 or _is_val("sample:" + text, sample_rate)):
                yield text

    # A char vocabulary is the set of characters of the whole corpus (as nanoGPT's), so validation text
    # is always representable; BPE merges are learned from the train split only.
    texts = {"char": (text for _, text in split_docs()), "bpe": train_texts(),
             "wordpiece": train_texts()}.get(tokenizer)
    tok: Tokenizer = build_tokenizer(tokenizer, texts, vocab_size)
    dtype = token_dtype(tok.vocab_size)
    log(f"tokenizer: {tok.kind}, vocab {tok.vocab_size:,} ({dtype.name} shards)")

    # Pass 3: tokenize in batches (the tokenizers library encodes a batch on all cores) into shards.
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        eot = np.array([tok.eot_id], dtype=dtype)
        for batch in _batches(split_docs(), max_chars=8 << 20):
            encoded = tok.encode_batch([text for _, text in batch])
            for (split, text), ids in zip(batch, encoded):
                w = writers[split]
                if w.documents:  # end-of-document token *between* documents
                    w.write(eot)
                w.write(np.asarray(ids, dtype=dtype))
                w.documents += 1
                w.bytes += len(text.encode("utf-8"))
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["tokens"] < 2:
            raise DataError("the training split is empty after tokenization")
        tok.save(tmp / "tokenizer.json")
        with open(tmp / "tokenizer.json", "rb+") as f:
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size,
                          "eot_id": tok.eot_id, "mask_id": tok.mask_id, "sha256": tok.sha256()},
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "split_rule": "text-tail" if single else "document-hash",
            "splits": splits,
            "sources": [{**s.manifest(), **({"licence": licence} if licence else {})} for s in sources],
            "cleaning": cleaner.report(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 3),
        }
        write_json_atomic(tmp / META, meta)
    except BaseException:  # an error or Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap the finished directory into place.
    if out.exists():
        old = out.parent / f".{out.name}.old{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    fsync_dir(out.parent)
    for s in SPLITS:
        log(f"{s}: {splits[s]['tokens']:,} tokens, {splits[s]['documents']:,} documents, {splits[s]['bytes']:,} bytes")
    return meta


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d} (create one with `pretrain prepare`)")
    p = d / META
    if not p.is_file():
        raise DataError(f"{d} has no {META}: not a prepared data directory, or its prepare did not finish")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is corrupt: {e}") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("tokenizer", "dtype", "splits")):
        raise DataError(f"{p} is not a pretrain data manifest (expected keys tokenizer, dtype, splits)")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{p}: unsupported data format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    return meta


def inspect(data_dir: str | Path, samples: int = 3, sample_tokens: int = 64, top: int = 20) -> dict[str, Any]:
    """What a prepared directory holds: counts per split, the most frequent tokens, decoded samples and
    the manifest (sources, cleaning report)."""
    from pretrain.data.loader import TokenSplit

    meta = load_meta(data_dir)
    tok = Tokenizer.load(Path(data_dir) / meta["tokenizer"]["file"])
    out: dict[str, Any] = {"data_dir": str(data_dir), "tokenizer": meta["tokenizer"], "dtype": meta["dtype"],
                           "splits": {}, "sources": meta["sources"], "cleaning": meta.get("cleaning")}
    for split in meta["splits"]:
        sp = TokenSplit(data_dir, split)
        info = {k: meta["splits"][split][k] for k in ("tokens", "documents", "bytes")}
        if sp.tokens:
            counts = np.zeros(max(tok.vocab_size, 1), dtype=np.int64)
            for shard in sp.shards:
                for i in range(0, len(shard), 1 << 24):  # bounded memory on large shards
                    counts += np.bincount(np.asarray(shard[i:i + (1 << 24)]), minlength=len(counts))[:len(counts)]
            order = np.argsort(-counts)[:top]
            info["top_tokens"] = [{"id": int(i), "token": tok.tk.id_to_token(int(i)), "count": int(counts[i])}
                                  for i in order if counts[i]]
            info["distinct_tokens"] = int((counts > 0).sum())
            rng = np.random.default_rng(0)
            first = sp.shards[0]
            starts = rng.integers(0, max(1, len(first) - sample_tokens), size=samples)
            info["samples"] = [tok.decode(np.asarray(first[s:s + sample_tokens]).tolist()) for s in starts]
        out["splits"][split] = info
    return out
