"""Packed fixed-length batches from token shards: deterministic, rank-aware, resumable in O(1).

Training order: each epoch cuts every shard into windows of ``seq_len + 1`` tokens (stride ``seq_len``,
so documents are packed back to back with their EOT separators), starting at an epoch-dependent random
offset in [0, seq_len), and visits the windows in a seeded random permutation. Global sample ``i`` is
fully determined by (seed, i), so the loader's whole state is the number of samples consumed: resuming
never replays batches. Rank ``r`` of ``world`` takes samples ``r*B .. (r+1)*B`` of each global batch.

Mixtures: when the data was prepared with weights (``PATH::WEIGHT``; meta.json has a ``mixture``), each
input's shards form a component and sample ``i`` first picks a component with probability ∝ its weight,
then the component's next sample in its own seeded permutation (its own epochs: a small, heavily
weighted source repeats, a large, lightly weighted one is sub-sampled). Components are assigned in
blocks of ``MIX_BLOCK`` samples in which component ``g`` fills exactly ``round(MIX_BLOCK * share_g)``
positions (largest remainder), shuffled per block by (seed, block): still a pure function of
(seed, i), so resume stays exact and O(1) and rank slicing is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data.manifest import load_meta
from pretrain.data.sources import DataError

MIX_BLOCK = 1 << 16


class TokenSplit:
    """The memory-mapped shards of one split of a prepared data directory."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        if split not in self.meta["splits"]:
            raise DataError(f"{self.data_dir} has no {split!r} split")
        info = self.meta["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.shards: list[np.memmap] = []
        self.groups: list[int] = []  # mixture component (input index) of each shard
        for sh in info["shards"]:
            p = self.data_dir / sh["file"]
            if not p.is_file():
                raise DataError(f"missing shard {p} (the data directory is incomplete)")
            expected = sh["tokens"] * self.dtype.itemsize
            if p.stat().st_size != expected:
                raise DataError(f"shard {p} has {p.stat().st_size} bytes, meta.json says {expected}: "
                                "the data directory is corrupt; run `pretrain prepare` again")
            if sh["tokens"]:
                self.shards.append(np.memmap(p, dtype=self.dtype, mode="r"))
                self.groups.append(int(sh.get("group", 0)))
        self.tokens = sum(len(s) for s in self.shards)
        self.bytes = int(info.get("bytes", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def mixture(self) -> list[dict[str, Any]] | None:
        """The mixture components (input, weight, ...) when the data was prepared with weights."""
        return self.meta.get("mixture") or None


class _Mixture:
    """Sample index → (component, index among that component's samples), exactly in proportion to the
    weights within every block of MIX_BLOCK samples; deterministic in (seed, index)."""

    def __init__(self, weights: np.ndarray, seed: int):
        p = weights / weights.sum()
        raw = p * MIX_BLOCK
        counts = np.floor(raw).astype(np.int64)
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:MIX_BLOCK - int(counts.sum())]] += 1
        self.counts, self.seed = counts, seed
        self.base = np.repeat(np.arange(len(counts)), counts)
        self.group_start = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate(self, index: int) -> tuple[int, int]:
        block, j = divmod(index, MIX_BLOCK)
        if self._cache is None or self._cache[0] != block:
            pattern = np.random.default_rng([self.seed, block, 0x313C]).permutation(self.base)
            order = np.argsort(pattern, kind="stable")  # positions grouped by component, in order
            rank = np.empty(MIX_BLOCK, dtype=np.int64)
            rank[order] = np.arange(MIX_BLOCK) - self.group_start
            self._cache = (block, pattern, rank)
        _, pattern, rank = self._cache
        g = int(pattern[j])
        return g, block * int(self.counts[g]) + int(rank[j])


def _window_counts(shards: list[np.memmap], seq_len: int, slack: int) -> np.ndarray:
    """Windows of seq_len+1 tokens per shard, leaving room for an offset of up to ``slack`` tokens."""
    return np.array([max(0, (len(s) - 1 - slack) // seq_len) for s in shards], dtype=np.int64)


class TrainLoader:
    """Shuffled, packed training batches of shape (batch_size, seq_len + 1)."""

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.counts = _window_counts(split.shards, seq_len, slack=seq_len - 1)
        self.n_windows = int(self.counts.sum())
        if self.n_windows < 1:
            raise DataError(f"the {split.split} split has {split.tokens:,} tokens: too few for even one "
                            f"sequence of seq_len {seq_len} (need at least {2 * seq_len}); use a smaller "
                            "data.seq_len or more data")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.samples_seen = 0  # global samples consumed (all ranks)
        self.skipped: list[tuple[int, int]] = []
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None
        self._setup_mixture(np.repeat(np.asarray(split.groups, dtype=np.int64), self.counts), "sequence")

    def _setup_mixture(self, unit_groups: np.ndarray, unit: str) -> None:
        """Per mixture component, the global indices of its units (windows or documents)."""
        self._mix: _Mixture | None = None
        self.mixture_weights: list[float] | None = None
        comps = self.split.mixture
        if not comps:
            return
        comps = [c for c in comps if c.get("weight")]
        self._g_units = [np.flatnonzero(unit_groups == int(c["group"])) for c in comps]
        for c, units in zip(comps, self._g_units):
            if len(units) == 0:
                raise DataError(f"input {c.get('input')!r} (mixture weight {c['weight']}) has no {unit} in "
                                f"the {self.split.split} split (too few tokens for seq_len {self.seq_len}): "
                                "give it weight 0 or more data")
        self.mixture_weights = [float(c["weight"]) for c in comps]
        self._mix = _Mixture(np.asarray(self.mixture_weights), self.seed)
        for c, n in zip(comps, self._mix.counts):
            if n == 0:
                raise DataError(f"input {c.get('input')!r}: mixture weight {c['weight']} is below "
                                f"1/{MIX_BLOCK} of the total; raise it or set it to 0")
        self._g_cache: dict[int, tuple[int, np.ndarray, int]] = {}

    def _mixed(self, index: int) -> tuple[int, int]:
        """(global unit index, offset) of global sample ``index`` under the mixture."""
        g, k = self._mix.locate(index)  # type: ignore[union-attr]
        units = self._g_units[g]
        epoch, pos = divmod(k, len(units))
        cached = self._g_cache.get(g)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED, g + 1])
            offset = int(rng.integers(self.seq_len))
            cached = self._g_cache[g] = (epoch, rng.permutation(len(units)), offset)
        return int(units[cached[1][pos]]), cached[2]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            offset = int(rng.integers(self.seq_len))
            perm = rng.permutation(self.n_windows)
            self._epoch_cache = (epoch, perm, offset)
        return self._epoch_cache[1], self._epoch_cache[2]

    def sample(self, index: int) -> np.ndarray:
        """Global sample ``index`` (seq_len + 1 tokens)."""
        if self._mix is not None:
            w, offset = self._mixed(index)
        else:
            epoch, pos = divmod(index, self.n_windows)
            perm, offset = self._epoch(epoch)
            w = int(perm[pos])
        shard = int(np.searchsorted(self.starts, w, side="right") - 1)
        start = offset + (w - int(self.starts[shard])) * self.seq_len
        return self.split.shards[shard][start:start + self.seq_len + 1]

    def skip_samples(self, ranges: list[tuple[int, int]]) -> None:
        """Pass over global samples [a, b) (``train.skip_samples``, the spike guard's rollback): when the
        position reaches a range, it jumps to its end. Kept in the state, so a resume skips them too."""
        self.skipped = sorted({(int(a), int(b)) for a, b in [*self.skipped, *ranges] if b > a})

    def next_batch(self) -> torch.Tensor:
        for a, b in self.skipped:
            if a <= self.samples_seen < b:
                self.samples_seen = b
        base = self.samples_seen + self.rank * self.batch_size
        rows = [self.sample(base + i) for i in range(self.batch_size)]
        self.samples_seen += self.batch_size * self.world_size
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.n_windows

    def state_dict(self) -> dict[str, Any]:
        state = {"samples_seen": self.samples_seen, "seed": self.seed, "seq_len": self.seq_len}
        if self.mixture_weights is not None:
            state["mixture"] = list(self.mixture_weights)
        if self.skipped:
            state["skipped"] = [list(r) for r in self.skipped]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise DataError(f"loader state was saved with seq_len={state.get('seq_len')} "
                            f"seed={state.get('seed')}, but this run has seq_len={self.seq_len} "
                            f"seed={self.seed}")
        saved = state.get("mixture")
        if (list(saved) if saved is not None else None) != self.mixture_weights:
            raise DataError(f"loader state was saved with mixture weights {saved}, but the data now has "
                            f"{self.mixture_weights}: resuming would draw different batches")
        self.samples_seen = int(state["samples_seen"])
        self.skip_samples([tuple(r) for r in state.get("skipped", [])])


def document_spans(split: TokenSplit, eot_id: int, max_len: int) -> np.ndarray:
    """(n, 3) int64 rows (shard, start, length): every document with its end-of-document token, documents
    longer than ``max_len`` cut into consecutive pieces of at most ``max_len`` tokens."""
    out = []
    for k, shard in enumerate(split.shards):
        eots = np.flatnonzero(np.asarray(shard) == eot_id)
        starts = np.concatenate([[0], eots + 1])
        ends = np.concatenate([eots + 1, [len(shard)]])  # end includes the EOT
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        pieces = -(-(ends - starts) // max_len)
        first = np.repeat(starts, pieces)
        idx = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        piece_start = first + idx * max_len
        piece_len = np.minimum(max_len, np.repeat(ends, pieces) - piece_start)
        out.append(np.stack([np.full(len(first), k), piece_start, piece_len], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def _padded_row(split: TokenSplit, span: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    shard, start, length = (int(v) for v in span)
    row = np.full(width, pad_id, dtype=np.int64)
    row[:length] = split.shards[shard][start:start + length]
    return row


class DocumentLoader(TrainLoader):
    """One document per sequence, padded with ``pad_id`` (``data.packing: false``) to rows of seq_len + 1;
    documents longer than ``piece_len`` tokens (default seq_len + 1: a whole row) are cut into several, so an
    objective that uses fewer of a row's tokens (the masked LM with [CLS]: seq_len - 1) never loses any. Same
    ordering, rank slicing and O(1) resume as the packed loader."""

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, eot_id: int, pad_id: int,
                 piece_len: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        piece_len = seq_len + 1 if piece_len is None else piece_len
        if not 1 <= piece_len <= seq_len + 1:
            raise ValueError(f"piece_len must be in [1, seq_len + 1], not {piece_len}")
        self.spans = document_spans(split, eot_id, piece_len)
        self.n_windows = len(self.spans)
        if self.n_windows < 1:
            raise DataError(f"the {split.split} split has no documents")
        self.samples_seen = 0
        self.skipped = []
        self._epoch_cache = None
        self._setup_mixture(np.asarray(split.groups, dtype=np.int64)[self.spans[:, 0]], "document")

    def sample(self, index: int) -> np.ndarray:
        if self._mix is not None:
            span, _ = self._mixed(index)
        else:
            epoch, pos = divmod(index, self.n_windows)
            perm, _ = self._epoch(epoch)
            span = int(perm[pos])
        return _padded_row(self.split, self.spans[span], self.seq_len + 1, self.pad_id)


def train_loader(split: TokenSplit, seq_len: int, batch_size: int,
                 documents: tuple[int, int, int] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> TrainLoader:
    """The training loader of a split: packed windows (:class:`TrainLoader`), or one padded document per row
    (:class:`DocumentLoader`) when ``documents`` is ``objectives.padded_documents``' (eot_id, pad_id,
    piece_len)."""
    if documents is None:
        return TrainLoader(split, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size)
    return DocumentLoader(split, seq_len, batch_size, *documents, seed=seed, rank=rank, world_size=world_size)


def eval_windows(split: TokenSplit, seq_len: int) -> int:
    """How many non-overlapping evaluation windows of seq_len + 1 tokens the split holds."""
    return int(_window_counts(split.shards, seq_len, slack=0).sum())


def eval_batches(split: TokenSplit, seq_len: int, batch_size: int, max_batches: int | None = None,
                 documents: tuple[int, ...] | None = None):
    """Deterministic evaluation batches: non-overlapping windows from offset 0 (or, with ``documents`` =
    (eot_id, pad_id[, piece_len]), one padded document (piece) per row, as :class:`DocumentLoader`), evenly
    spread over the split when ``max_batches`` limits how many are used (None or 0: all). Yields
    (batch_size', seq_len + 1) tensors."""
    if documents is not None:
        spans = document_spans(split, documents[0], documents[2] if len(documents) > 2 else seq_len + 1)
        if len(spans) < 1:
            raise DataError(f"the {split.split} split has no documents")
        n = len(spans) if not max_batches else min(len(spans), max_batches * batch_size)
        chosen = np.unique(np.linspace(0, len(spans) - 1, n).round().astype(np.int64))
        for i in range(0, len(chosen), batch_size):
            rows = [_padded_row(split, spans[j], seq_len + 1, documents[1]) for j in chosen[i:i + batch_size]]
            yield torch.from_numpy(np.stack(rows))
        return
    counts = _window_counts(split.shards, seq_len, slack=0)
    total = int(counts.sum())
    if total < 1:
        raise DataError(f"the {split.split} split has {split.tokens:,} tokens: too few for one sequence of "
                        f"seq_len {seq_len}; use a smaller data.seq_len or a larger --val-fraction")
    starts = np.concatenate([[0], np.cumsum(counts)])
    n = total if not max_batches else min(total, max_batches * batch_size)
    chosen = np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))
    for i in range(0, len(chosen), batch_size):
        rows = []
        for w in chosen[i:i + batch_size]:
            shard = int(np.searchsorted(starts, w, side="right") - 1)
            start = int(w - starts[shard]) * seq_len
            rows.append(split.shards[shard][start:start + seq_len + 1])
        yield torch.from_numpy(np.stack(rows).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------
# images


class ImageLoader:
    """Shuffled batches of images from a prepared image directory (``pretrain.data.images.ImageSplit``):
    ``(images (B, H, W, C) uint8, labels (B,) int64)``, labels -1 when the data has none. The same contract as
    :class:`TrainLoader`: global sample ``i`` is image ``perm_e[i mod N]`` of epoch ``e = i // N`` (a seeded
    permutation per epoch), rank ``r`` takes samples ``r*B .. (r+1)*B`` of each global batch, and the whole
    state is the number of samples consumed (O(1) resume, skipped ranges kept)."""

    def __init__(self, split, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.split, self.batch_size = split, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = len(split)
        if self.n_windows < 1:
            raise DataError(f"the {split.split} split of {split.data_dir} has no images")
        self.samples_seen = 0
        self.skipped: list[tuple[int, int]] = []
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, np.random.default_rng([self.seed, epoch, 0x1A6E]).permutation(
                self.n_windows))
        return self._epoch_cache[1]

    def indices(self, start: int, n: int) -> np.ndarray:
        """Image indices of global samples start .. start + n."""
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            epoch, pos = divmod(start + i, self.n_windows)
            out[i] = self._perm(epoch)[pos]
        return out

    skip_samples = TrainLoader.skip_samples

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        for a, b in self.skipped:
            if a <= self.samples_seen < b:
                self.samples_seen = b
        idx = self.indices(self.samples_seen + self.rank * self.batch_size, self.batch_size)
        self.samples_seen += self.batch_size * self.world_size
        return image_batch(self.split, idx)

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.n_windows

    def state_dict(self) -> dict[str, Any]:
        state = {"samples_seen": self.samples_seen, "seed": self.seed, "images": self.n_windows}
        if self.skipped:
            state["skipped"] = [list(r) for r in self.skipped]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("images") != self.n_windows:
            raise DataError(f"loader state was saved with seed={state.get('seed')} over "
                            f"{state.get('images')} images, but this run has seed={self.seed} over "
                            f"{self.n_windows}: resuming would draw different batches")
        self.samples_seen = int(state["samples_seen"])
        self.skip_samples([tuple(r) for r in state.get("skipped", [])])


def image_batch(split, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (k, H, W, C) uint8, labels (k,) int64; -1 without labels) of the split's images ``idx``."""
    images = torch.from_numpy(np.ascontiguousarray(split.images(np.asarray(idx, dtype=np.int64))))
    labels = (torch.from_numpy(np.asarray(split.labels[idx], dtype=np.int64)) if split.labels is not None
              else torch.full((len(idx),), -1, dtype=torch.int64))
    return images, labels


def eval_image_indices(n: int, batch_size: int, max_batches: int | None = None) -> list[np.ndarray]:
    """Deterministic evaluation batches over a split of ``n`` images: all of them in order, or, with
    ``max_batches``, that many batches of images spread evenly over the split."""
    count = n if not max_batches else min(n, max_batches * batch_size)
    chosen = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    return [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
