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
    the manifest (sources, cleaning report)."""
    meta = load_meta(data_dir)
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
