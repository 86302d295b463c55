"""The prepared-dataset format: ``meta.json`` (what the shards hold, from where, under which licence), its
version, the token dtype of the shards, and the fingerprint that identifies a dataset's content. Written by
prepare.py (text), images.py (images, ``"kind": "images"``) and interactions.py (item sequences, ``"kind":
"interactions"``), read by loader.py, train and eval; neither of those imports the other."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.sources import DataError
from pretrain.io import exclusive_lock, fsync_dir, write_failed

META = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
KINDS = {"text": ("tokenizer", "dtype", "splits"), "images": ("image", "dtype", "splits"),
         "interactions": ("tokenizer", "dtype", "splits", "interactions")}
"""Kinds of prepared directory (meta.json "kind"; text has none) and the keys each manifest must have."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def load_meta(data_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """A prepared directory's manifest, checked: a clear error for a missing, corrupt or foreign one. Text
    data (token shards; no "kind" key, or "text") needs the keys tokenizer, dtype, splits; image data
    (``"kind": "images"``, see data/images.py) image, dtype, splits. With ``kind`` ("text" or "images") a
    directory of the other kind is an error too."""
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
    if not isinstance(meta, dict):
        raise DataError(f"{p} is not a pretrain data manifest (expected a JSON object)")
    have = meta.get("kind") or "text"
    if have not in KINDS:
        raise DataError(f"{p}: unknown data kind {have!r} (expected {' or '.join(KINDS)})")
    required = KINDS[have]
    if not all(k in meta for k in required):
        raise DataError(f"{p} is not a pretrain data manifest (expected keys {', '.join(required)})")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{p}: unsupported data format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    if kind is not None and have != kind:
        what = {"images": "images", "text": "text (token shards)", "interactions": "user-item interactions"}
        raise DataError(f"{d} holds {what[have]}, not {what[kind].split(' (')[0]}: prepare "
                        f"{'image' if kind == 'images' else kind} data for this")
    return meta


def data_fingerprint(meta: dict[str, Any]) -> str:
    """What identifies a prepared dataset's content, for resume: its splits (shards and their token counts)
    and each input's content hash and mixture weight — not paths, so moved folders still match."""
    ident = {"splits": meta.get("splits"), "mixture": meta.get("mixture"),
             "sources": [(s.get("sha256"), s.get("weight")) for s in meta.get("sources", [])]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardWriter:
    """Appends arrays of ``dtype`` rows — token ids (1-D), or images (n, H, W, C) — to ``{split}_{k:06d}`` +
    ``suffix`` files (``{split}_g{group:03d}_{k:06d}`` for a mixture component), starting a new shard every
    ``shard_rows`` rows. A shard is written as ``NAME.partial``, fsync'ed and renamed to NAME once full (or
    at :meth:`close`). ``shards`` lists ``{"file", unit: rows}``; ``documents`` and ``bytes`` are counters
    the caller keeps (text)."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_rows: int, group: int | None = None,
                 unit: str = "tokens", suffix: str = ".bin"):
        self.out_dir, self.split, self.dtype, self.shard_rows = out_dir, split, dtype, shard_rows
        self.group, self.unit, self.suffix = group, unit, suffix
        self.prefix = split if group is None else f"{split}_g{group:03d}"
        self.shards: list[dict[str, Any]] = []
        self._f = None
        self._n = 0
        self.count = 0
        self.documents = 0
        self.bytes = 0

    @property
    def tokens(self) -> int:
        return self.count

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}{self.suffix}"
        self._f = open(self.out_dir / f"{name}.partial", "wb")
        self._n = 0
        self.shards.append({"file": name, self.unit: 0,
                            **({} if self.group is None else {"group": self.group})})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        while len(rows):
            if self._f is None or self._n >= self.shard_rows:
                self._seal()
                self._open()
            take = min(len(rows), self.shard_rows - self._n)
            self._f.write(rows[:take].data)  # type: ignore[union-attr]
            self._n += take
            self.shards[-1][self.unit] += take
            self.count += take
            rows = rows[take:]

    def _seal(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            name = self.shards[-1]["file"]
            os.replace(self.out_dir / f"{name}.partial", self.out_dir / name)

    def close(self) -> dict[str, Any]:
        self._seal()
        return {self.unit: self.count, "documents": self.documents, "bytes": self.bytes,
                "shards": self.shards}


# ----------------------------------------------------------------------------------------------------------
# writing a prepared directory (text and images alike)


def check_prepared_out(out: Path, overwrite: bool) -> None:
    """``out`` may receive a prepared directory: new, empty, or (with ``overwrite``) an earlier one."""
    if (out / META).exists() and not overwrite:
        raise DataError(f"{out} already holds prepared data; pass --overwrite to replace it")
    if out.exists() and not (out / META).exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a prepared data directory; refusing to replace it "
                        "(choose an empty or new --out)")


def swap_into_place(partial: Path, out: Path) -> None:
    """The finished directory replaces ``out`` (an earlier one is moved aside first, then removed)."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    fsync_dir(out.parent)


@contextmanager
def writing_prepared(out: Path, overwrite: bool, log: Callable[[str], None]) -> Iterator[Path]:
    """The lock on ``out``, a fresh ``.NAME.partial`` directory to write in (removed on any error or Ctrl-C),
    and the swap into place at the end; an interrupted earlier swap is completed or undone first. A write
    that fails for want of space (or on the partial directory itself) is one clear error that says the
    earlier directory, if any, is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    partial, stale = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    with exclusive_lock(lock, f"another prepare is writing {out} (lock file {lock})", DataError):
        if stale.exists() and not out.exists():  # a crash inside the final swap (between its two renames)
            if (partial / META).is_file():  # the new directory was complete: finish the swap
                log(f"completing the interrupted swap of {partial} into {out}")
                os.replace(partial, out)
                shutil.rmtree(stale, ignore_errors=True)
            else:  # put the previous directory back
                log(f"restoring {out} from {stale}, left by an interrupted prepare")
                os.replace(stale, out)
            fsync_dir(out.parent)
            if not overwrite:
                raise DataError(f"{out} already holds prepared data (recovered from an interrupted prepare); "
                                "pass --overwrite to replace it")
        if partial.exists():
            log(f"removing {partial}, left by an interrupted prepare: starting again")
            shutil.rmtree(partial)
        if stale.exists():
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
                                           or str(e.filename or "").startswith(str(partial))):
                raise write_failed(e, "the prepared data", out, None,
                                   "an earlier prepared directory there, if any, is as it was") from None
            raise
        swap_into_place(partial, out)
