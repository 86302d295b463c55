"""The prepared-dataset format: ``meta.json`` (what the shards hold, from where, under which licence), its
version, the token dtype of the shards, and the fingerprint that identifies a dataset's content. Written by
prepare.py, read by loader.py, train and eval; neither of those imports the other."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.sources import DataError

META = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """A prepared directory's manifest, checked: a clear error for a missing, corrupt or foreign one."""
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


def data_fingerprint(meta: dict[str, Any]) -> str:
    """What identifies a prepared dataset's content, for resume: its splits (shards and their token counts)
    and each input's content hash and mixture weight — not paths, so moved folders still match."""
    ident = {"splits": meta.get("splits"), "mixture": meta.get("mixture"),
             "sources": [(s.get("sha256"), s.get("weight")) for s in meta.get("sources", [])]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
