"""Feature extraction: one embedding per input text from a pre-trained run (decoder or encoder).

Texts are read row-aligned (a .txt line, a JSONL line, a CSV/TSV/Parquet row), tokenized as in
training (encoders get [CLS] ... [SEP]), truncated to the model's context (counted and reported),
batched by length with padding and an attention mask, and pooled: ``mean`` over real tokens, ``cls``
(the first position; encoders) or ``last`` (the last real token; decoders). Output row i belongs to
input row i whatever the batch size.
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


def embed(run: str | Path, input_path: str | Path, out: str | Path, pooling: str = "mean",
          normalize: bool = False, batch_size: int = 32, text_field: str = "text",
          device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Embed every row of ``input_path`` with the run's newest checkpoint; write .npy or .parquet. An existing
    ``out`` is replaced only if an earlier ``embed`` wrote it (and it is unchanged since) or with
    ``overwrite``; never when it is the input."""
    from pretrain.hardware import resolve_device
    from pretrain.io import atomic_path, check_output_file, record_output

    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise PretrainError(f"--out must end in .npy or .parquet, got {out.name}")
    if batch_size < 1:
        raise PretrainError("batch_size must be >= 1")
    check_output_file(out, "embed", [input_path, run], overwrite)
    texts = read_texts(input_path, text_field)
    dev = resolve_device(device)
    model, cfg, tok, meta = load_pretrained(run, dev, part="encoder")  # what transfers (spec.encoder)
    vectors, truncated = embed_texts(model, tok, cfg, texts, pooling, normalize, batch_size, dev)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # a failed write keeps the previous file
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

            pq.write_table(pa.table({"row": np.arange(len(texts)), "embedding": list(vectors)}), tmp)
    record_output(out, "embed")
    return {"out": str(out), "rows": len(texts), "dim": int(vectors.shape[1]), "pooling": pooling,
            "normalized": normalize, "truncated": truncated, "max_tokens": cfg.model.max_seq_len,
            "step": meta["step"]}
