"""The prepared-dataset format: ``meta.json`` (what the shards hold, from where, under which licence), its
version, the token dtype of the shards, and the fingerprint that identifies a dataset's content. Written by
prepare.py (text) and images.py (images, ``"kind": "images"``), read by loader.py, train and eval; neither
of those imports the other."""

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
KINDS = {"text": ("tokenizer", "dtype", "splits"), "images": ("image", "dtype", "splits")}
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
        raise DataError(f"{d} holds {'images' if have == 'images' else 'text (token shards)'}, not "
                        f"{'images' if kind == 'images' else 'text'}: prepare "
                        f"{'image' if kind == 'images' else 'text'} data for this")
    return meta


def data_fingerprint(meta: dict[str, Any]) -> str:
    """What identifies a prepared dataset's content, for resume: its splits (shards and their token counts)
    and each input's content hash and mixture weight — not paths, so moved folders still match."""
    ident = {"splits": meta.get("splits"), "mixture": meta.get("mixture"),
             "sources": [(s.get("sha256"), s.get("weight")) for s in meta.get("sources", [])]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
