"""Feature extraction: one embedding per input text (or image) from a pre-trained run.

Texts are read row-aligned (a .txt line, a JSONL line, a CSV/TSV/Parquet row), tokenized as in
training (encoders get [CLS] ... [SEP]), truncated to the model's context (counted and reported),
batched by length with padding and an attention mask, and pooled: ``mean`` over real tokens, ``cls``
(the first position; encoders) or ``last`` (the last real token; decoders). Output row i belongs to
input row i whatever the batch size.

Image runs (their spec's ``modality`` is 'images') read a split of a prepared image directory, named
``DIR`` or ``DIR@SPLIT`` (:func:`image_data`), normalise the pixels as pre-training did (the run's
``image_mean`` / ``image_std``) and pool the model's ``features``: ``cls`` or ``mean`` over the patches
(ViT), the global average (ResNet: ``mean``). Output row i is image i of the split.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import PretrainError
from pretrain.checkpoint import load_pretrained
from pretrain.models import spec_of

POOLINGS = ("mean", "cls", "last")


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Row-aligned texts from .txt (one per line), .jsonl/.json, .csv/.tsv or .parquet; empty rows are
    errors."""
    from pretrain.data.sources import expand_inputs, iter_rows, kind_of, read_text

    p = Path(path)
    if not p.is_file():
        raise PretrainError(f"input not found: {p}")
    (src,) = expand_inputs([str(p)])
    if kind_of(p) == "text":
        # CRLF too
        texts: list[str | None] = [line.removesuffix("\r") for line in read_text(src.path).split("\n")]
        if texts and texts[-1] == "":
            texts.pop()
    else:
        texts = list(iter_rows(src.path, src.kind, text_field))
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise PretrainError(f"{p}: row {i + 1} has no text (empty or not a string)")
    if not texts:
        raise PretrainError(f"{p} has no rows")
    return texts  # type: ignore[return-value]  (all checked to be non-empty strings above)


# ----------------------------------------------------------------------------------------------------------
# images: prepared image directories as inputs

SPLIT_SEP = "@"
"""``DIR@SPLIT`` names a split of a prepared image directory."""
DEFAULT_SPLIT = {"train": "train", "valid": "val", "test": "test"}
"""The split a bare ``DIR`` means in each role (--train, --valid, --test); for inputs to predict and embed
(role 'input'): 'test' when the directory has one, else 'val'."""


def _image_meta(d: Path) -> dict[str, Any] | None:
    import json

    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == "images" else None


def image_data(path: str | Path, role: str = "input") -> tuple[Path, str]:
    """``DIR`` or ``DIR@SPLIT`` → (the prepared image directory, the split): a bare DIR takes the role's
    default split (:data:`DEFAULT_SPLIT`). A path that exists as given is a directory, '@' and all."""
    s = str(path)
    if SPLIT_SEP in s and not Path(s).exists():
        d, _, split = s.rpartition(SPLIT_SEP)
        if split:
            return Path(d), split
    d = Path(s)
    if role == "input":
        meta = _image_meta(d) or {}
        return d, "test" if "test" in (meta.get("splits") or {}) else "val"
    return d, DEFAULT_SPLIT[role]


def is_image_data(path: str | Path | None) -> bool:
    """Whether ``path`` (``DIR`` or ``DIR@SPLIT``) is a prepared image directory."""
    if path is None:
        return False
    d, _ = image_data(path, "train")
    return d.is_dir() and _image_meta(d) is not None


def open_images(path: str | Path, role: str = "input"):
    """The split ``path`` names (``DIR`` / ``DIR@SPLIT``, see :func:`image_data`) → (ImageSplit, 'DIR@SPLIT'),
    or one error naming the directory and the splits it has."""
    from pretrain.data.images import ImageSplit

    d, split = image_data(path, role)
    meta = _image_meta(d) if d.is_dir() else None
    if meta is None:
        what = "not found" if not d.exists() else "not a prepared image directory (no image meta.json)"
        raise PretrainError(f"{d}: {what}; make one with `pretrain prepare IMAGES --out DIR`")
    have = sorted(meta.get("splits") or {})
    if split not in have:
        raise PretrainError(f"{d} has no split {split!r} (it has {', '.join(have) or 'none'}): name one as "
                            f"{d}{SPLIT_SEP}SPLIT")
    return ImageSplit(d, split), f"{d}{SPLIT_SEP}{split}"


def check_image_size(source: str, split, mcfg, run: str | Path) -> None:
    """Images of another size or number of channels than the run was pre-trained on: one error that says
    how to prepare them at the run's size."""
    want = (mcfg.image_size, mcfg.image_size, mcfg.channels)
    have = (split.height, split.width, split.channels)
    if have != want:
        kind = {1: "grayscale", 3: "RGB"}
        hint = (f"`pretrain prepare SOURCE --out DIR --image-size {mcfg.image_size}`"
                + (f" from {kind.get(mcfg.channels, f'{mcfg.channels}-channel')} images"
                   if have[2] != want[2] else ""))
        raise PretrainError(f"{source} holds {have[0]}x{have[1]} images with {have[2]} channel(s), but "
                            f"{run} was pre-trained on {want[0]}x{want[1]} with {want[2]}: prepare them "
                            f"again at the run's size, {hint}")


def image_pixels(images: np.ndarray, mcfg, device: torch.device | str = "cpu") -> torch.Tensor:
    """(k, H, W, C) uint8 images → (k, C, H, W) float pixels on ``device``, normalised with the run's
    per-channel mean and std (``model.image_mean`` / ``image_std``) as pre-training normalised them."""
    from pretrain.objectives.image import to_pixels

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    c = x.shape[-1]
    mean = torch.tensor(list(mcfg.image_mean) or [0.0] * c, device=device)
    std = torch.tensor(list(mcfg.image_std) or [1.0] * c, device=device)
    return to_pixels(x, mean, std)


def image_poolings(model: torch.nn.Module) -> tuple[str, ...]:
    """The poolings an image model's features offer: the model's own ``poolings`` when it declares them (a
    ResNet's one global average: ('mean',)); else cls and mean for a model that reads the image as a
    sequence with a [CLS] position (a bidirectional spec: ViT), mean otherwise."""
    declared = getattr(getattr(model, "_orig_mod", model), "poolings", None)
    if declared:
        return tuple(declared)
    return ("cls", "mean") if spec_of(model).bidirectional else ("mean",)


def image_pooling(model: torch.nn.Module, pooling: str = "auto") -> str:
    """``pooling``, or for 'auto' the architecture's default where the model offers it (ViT: cls), else
    mean."""
    if pooling != "auto":
        return pooling
    default = spec_of(model).pooling
    return default if default in image_poolings(model) else "mean"


@torch.no_grad()
def embed_images(model, mcfg, images, pooling: str = "mean", normalize: bool = False, batch_size: int = 32,
                 device: torch.device | str = "cpu", dtype: str = "fp32") -> np.ndarray:
    """(N, feature_dim) float32 features of every image of ``images`` (anything with ``len`` and
    ``images(index) -> (k, H, W, C) uint8``: an ImageSplit), in order."""
    from pretrain.evaluation import image_features

    if pooling not in image_poolings(model):
        raise PretrainError(f"pooling {pooling!r} is not offered by this image model "
                            f"(it offers {', '.join(image_poolings(model))})")
    dev = torch.device(device)
    v = image_features(model, images, np.arange(len(images), dtype=np.int64),
                       lambda a: image_pixels(a, mcfg, dev), batch_size, dev, dtype, pooling)
    if normalize:
        v = torch.nn.functional.normalize(v, dim=-1)
    return v.cpu().numpy().astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------------
# text


def hidden_states(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, encoder: bool) -> torch.Tensor:
    """(B, T, C) final hidden states of right-padded ids ``x`` with ``mask`` (True = real token)."""
    # decoders: right padding never reaches earlier (real) positions under causal attention
    return model(x, attention_mask=mask, return_hidden=True) if encoder else model(x, return_hidden=True)


def pool_hidden(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) hidden states → (B, C): ``mean`` over real tokens, ``cls`` (first position) or ``last``
    (last real token)."""
    if pooling == "mean":
        m = mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
    if pooling == "cls":
        return h[:, 0]
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), mask.sum(1) - 1]
    raise PretrainError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


@torch.no_grad()
def embed_texts(model, tok, cfg, texts: list[str], pooling: str = "mean", normalize: bool = False,
                batch_size: int = 32, device: torch.device | str = "cpu") -> tuple[np.ndarray, int]:
    """(N, d_model) float32 embeddings and the number of texts that were truncated."""
    if pooling not in POOLINGS:
        raise PretrainError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    encoder = spec_of(model).bidirectional
    if pooling == "cls" and not encoder:
        raise PretrainError("cls pooling needs an encoder (masked-LM) run; use mean or last for a decoder")
    ctx = cfg.model.max_seq_len
    ids: list[list[int]] = []
    truncated = 0
    for t in texts:
        x = tok.encode(t, text_only=True)  # as prepare encoded the training text
        if encoder and tok.cls_id is not None:
            x = [tok.cls_id, *x, tok.eot_id]
        if len(x) > ctx:
            truncated += 1
            x = x[:ctx]
        ids.append(x or [tok.eot_id])
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(ids), cfg.model.d_model), dtype=np.float32)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="text", file=sys.stderr)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.bool)
        for r, i in enumerate(idx):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = True
        x, mask = x.to(device), mask.to(device)
        v = pool_hidden(hidden_states(model, x, mask, encoder).float(), mask, pooling)
        if normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        out[idx] = v.cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out, truncated


def write_vectors(out: Path, vectors: np.ndarray, columns: dict[str, Any] | None = None) -> None:
    """Write ``pretrain embed``'s output atomically (a failed write keeps the previous file) and record it:
    .npy, the (N, D) matrix alone; .parquet, ``columns`` (each N long) with the vectors as ``embedding``
    after the first of them."""
    from pretrain.io import atomic_path, record_output

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if out.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors)
            try:  # np.save can miss a short write (a full disk, a file size limit)
                whole = np.load(tmp, mmap_mode="r").shape == vectors.shape
            except ValueError:
                whole = False
            if not whole:
                raise PretrainError(f"writing {out} failed: the file came out short (disk full?)")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = dict(columns or {})
            first = dict(list(cols.items())[:1])
            pq.write_table(pa.table({**first, "embedding": list(vectors), **cols}), tmp)
    record_output(out, "embed")


def embed(run: str | Path, input_path: str | Path, out: str | Path, pooling: str = "mean",
          normalize: bool = False, batch_size: int = 32, text_field: str = "text",
          device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Embed every row of ``input_path`` with the run's newest checkpoint; write .npy or .parquet. For an
    image run, ``input_path`` is a prepared image directory, ``DIR`` (its test split, else val) or
    ``DIR@SPLIT``: one vector per image of the split. An existing ``out`` is replaced only if an earlier
    ``embed`` wrote it (and it is unchanged since) or with ``overwrite``; never when it is the input."""
    from pretrain.hardware import resolve_device
    from pretrain.io import check_output_file

    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise PretrainError(f"--out must end in .npy or .parquet, got {out.name}")
    if batch_size < 1:
        raise PretrainError("batch_size must be >= 1")
    dev = resolve_device(device)
    images = is_image_data(input_path)
    check_output_file(out, "embed", [image_data(input_path)[0] if images else input_path, run], overwrite)
    texts = None if images else read_texts(input_path, text_field)
    model, cfg, tok, meta = load_pretrained(run, dev, part="encoder")  # what transfers (spec.encoder)
    modality = spec_of(model).modality
    if modality == "images":
        if texts is not None:
            raise PretrainError(f"{run} is an image run: --input must be a prepared image directory, DIR "
                                f"or DIR{SPLIT_SEP}SPLIT (`pretrain prepare IMAGES --out DIR`), not "
                                f"{input_path}")
        split, source = open_images(input_path, "input")
        check_image_size(source, split, cfg.model, run)
        vectors, truncated = embed_images(model, cfg.model, split, pooling, normalize, batch_size, dev), 0
    else:
        if images:
            raise PretrainError(f"{input_path} is a prepared image directory, but {run} is a text run: "
                                "embed text files with it (or images with an image run)")
        assert texts is not None
        vectors, truncated = embed_texts(model, tok, cfg, texts, pooling, normalize, batch_size, dev)
    write_vectors(out, vectors, {"row": np.arange(len(vectors))})
    res = {"out": str(out), "rows": len(vectors), "dim": int(vectors.shape[1]), "pooling": pooling,
           "normalized": normalize, "truncated": truncated, "max_tokens": cfg.model.max_seq_len,
           "step": meta["step"]}
    if modality == "images":
        res.update(input=source, max_tokens=None)
    return res
