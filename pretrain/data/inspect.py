"""``pretrain data inspect``: what a prepared directory holds, read through the loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.loader import TokenSplit
from pretrain.data.manifest import load_meta
from pretrain.data.tokenizer import Tokenizer


def inspect(data_dir: str | Path, samples: int = 3, sample_tokens: int = 64, top: int = 20) -> dict[str, Any]:
    """What a prepared directory holds: counts per split, the most frequent tokens, decoded samples and
    the manifest (sources, cleaning report); for images :func:`inspect_images`."""
    meta = load_meta(data_dir)
    if meta.get("kind") == "images":
        return inspect_images(data_dir)
    tok = Tokenizer.load(Path(data_dir) / meta["tokenizer"]["file"])
    out: dict[str, Any] = {"data_dir": str(data_dir), "tokenizer": meta["tokenizer"], "dtype": meta["dtype"],
                           "splits": {}, "sources": meta["sources"], "cleaning": meta.get("cleaning")}
    if meta.get("mixture"):
        out["mixture"] = meta["mixture"]
    for split in meta["splits"]:
        sp = TokenSplit(data_dir, split)
        info = {k: meta["splits"][split][k] for k in ("tokens", "documents", "bytes")}
        if sp.tokens:
            counts = np.zeros(max(tok.vocab_size, 1), dtype=np.int64)
            for shard in sp.shards:
                for i in range(0, len(shard), 1 << 24):  # bounded memory on large shards
                    counts += np.bincount(np.asarray(shard[i:i + (1 << 24)]),
                                          minlength=len(counts))[:len(counts)]
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


def inspect_images(data_dir: str | Path, chunk: int = 4096) -> dict[str, Any]:
    """What a prepared image directory holds: image size, the train pixel statistics, per split the images,
    shards and images per class (each split read through the reader, which checks its shards and labels,
    and its own per-channel pixel mean computed), the classes, sources and skipped files."""
    from pretrain.data.images import ImageSplit, image_identity

    meta = load_meta(data_dir, kind="images")
    out: dict[str, Any] = {"data_dir": str(data_dir), "kind": "images", "image": meta["image"],
                           "identity": image_identity(meta), "classes": meta.get("classes") or [],
                           "splits": {}, "sources": meta.get("sources", []),
                           "skipped": meta.get("skipped", []), "licence": meta.get("licence")}
    for split, info in meta["splits"].items():
        sp = ImageSplit(data_dir, split)
        total = np.zeros(sp.channels, np.float64)
        for i in range(0, len(sp), chunk):  # bounded memory on large splits
            total += sp.images(np.arange(i, min(len(sp), i + chunk))).sum(axis=(0, 1, 2), dtype=np.float64)
        pixels = len(sp) * sp.height * sp.width
        out["splits"][split] = {
            "images": len(sp), "shards": len(info["shards"]), "labels": info.get("labels"),
            "class_counts": info.get("class_counts") or {},
            "pixel_mean": [float(v) / 255.0 / pixels for v in total] if pixels else None}
    return out
