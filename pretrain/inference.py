"""Using a trained run: evaluate it on prepared data, generate text."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import PretrainError
from pretrain.checkpoint import load_pretrained
from pretrain.data.loader import TokenSplit
from pretrain.data.manifest import data_fingerprint, load_meta
from pretrain.evaluation import evaluate
from pretrain.hardware import autocast_context, resolve_device
from pretrain.objectives import build_objective, padded_documents


def _evaluate_images(run, model, cfg, meta, data_dir: Path, dmeta: dict[str, Any], own_data: bool, split: str,
                     max_batches: int | None, batch_size: int | None, dev) -> dict[str, Any]:
    """``evaluate_run`` of an image model: the objective's loss (and accuracy) per image, and the k-NN
    accuracy of its features when the data has labels."""
    from pretrain.data.images import ImageSplit
    from pretrain.evaluation import evaluate_images, knn_monitor
    from pretrain.features import check_image_size
    from pretrain.objectives import build_image_objective

    if dmeta.get("kind") != "images":
        raise PretrainError(f"{data_dir} holds tokens; {run} is an image model: pass a prepared image folder")
    images = ImageSplit(data_dir, split)
    check_image_size(f"{data_dir}@{split}", images, cfg.model, run)
    saved = meta.get("data_fingerprint")
    same_data = None if saved is None else saved == data_fingerprint(dmeta)
    objective = build_image_objective(cfg)
    bs = batch_size or cfg.train.batch_size
    ev = evaluate_images(model, images, bs, dev, cfg.train.dtype, max_batches, objective)
    if not math.isfinite(ev["loss"]):
        raise PretrainError(f"the {split} loss of {run} is {ev['loss']}: the model's weights have diverged")
    knn = None
    if images.labels is not None and split != "train":
        knn = knn_monitor(model, ImageSplit(data_dir, "train"), images, objective, bs, dev, cfg.train.dtype,
                          cfg.image.knn_k or 20, cfg.image.knn_bank, max_batches, cfg.train.seed)
    out = {"run": str(run), "step": meta["step"], "data": str(data_dir), "split": split,
           "objective": cfg.objective, "loss": ev["loss"], "images": ev["images"], "knn_accuracy": knn,
           "data_matches_run": same_data}
    if "accuracy" in ev:
        out["accuracy"] = ev["accuracy"]
    return out


def evaluate_run(run: str | Path, data: str | Path | None = None, split: str = "val",
                 max_batches: int | None = None, batch_size: int | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a run's newest checkpoint on a prepared split."""
    if max_batches is not None and max_batches < 1:
        raise PretrainError("max_batches must be >= 1")
    dev = resolve_device(device)
    model, cfg, tok, meta = load_pretrained(run, dev, part="whole")  # the run itself, as trained
    data_dir = Path(data or cfg.data.path)
    dmeta = load_meta(data_dir)
    if dmeta.get("kind") == "images" and tok is not None:
        raise PretrainError(f"{data_dir} holds images; {run} is a text model: pass a prepared text folder")
    if tok is None:  # an image model
        return _evaluate_images(run, model, cfg, meta, data_dir, dmeta, data is None, split, max_batches,
                                batch_size, dev)
    dvocab = int(dmeta["tokenizer"]["vocab_size"])
    if dvocab > cfg.model.vocab_size:
        raise PretrainError(f"{data_dir} was tokenized with a vocabulary of {dvocab} tokens but the model "
                            f"has {cfg.model.vocab_size}: the data does not match this model's tokenizer")
    if meta.get("tokenizer_sha256") and dmeta["tokenizer"]["sha256"] != meta["tokenizer_sha256"]:
        raise PretrainError(f"{data_dir} was tokenized with a different tokenizer than the model was trained "
                            "on (tokenizer.json differs); prepare it with --tokenizer RUN_DIR/tokenizer.json")
    saved = meta.get("data_fingerprint")  # (None: a checkpoint from before it was recorded, unknown)
    same_data = None if saved is None else saved == data_fingerprint(dmeta)
    if data is None and same_data is False:
        raise PretrainError(f"the data in {data_dir} is not the data {run} was trained on (it was prepared "
                            "again from other inputs or settings), so its held-out split may hold training "
                            "text; pass --data to evaluate on it anyway")
    objective = build_objective(cfg.objective, tok, cfg.mlm, cfg.train.seed, cfg.data.doc_mask,
                                cfg.rtd)  # as trained
    tokens = TokenSplit(data_dir, split)
    unknown = _count_unknown(tokens, tok.unk_id)
    if unknown:
        warnings.warn(f"{unknown:,} of {tokens.tokens:,} tokens of the {split} split of {data_dir} are the "
                      f"unknown token {tok.tk.id_to_token(tok.unk_id)!r} (text the tokenizer could not "
                      "represent when the data was prepared): they are scored like any other token",
                      stacklevel=2)
    ev = evaluate(model, tokens, cfg.data.seq_len, batch_size or cfg.train.batch_size,
                  dev, cfg.train.dtype, max_batches, objective, padded_documents(cfg, tok))
    if not ev["tokens"]:
        raise PretrainError(f"no token of the {split} split was scored (sequences too short for a target?)")
    if not math.isfinite(ev["loss"]):
        raise PretrainError(f"the {split} loss of {run} is {ev['loss']}: the model's weights have diverged")
    out = {"run": str(run), "step": meta["step"], "data": str(data_dir), "split": split,
           "objective": cfg.objective, "loss": ev["loss"], "perplexity": ev["ppl"],
           "bits_per_byte": ev.get("bpb"), "tokens": ev["tokens"], "data_matches_run": same_data,
           "unknown_tokens": unknown}
    if "accuracy" in ev:
        out["accuracy"] = ev["accuracy"]
    return out


def _count_unknown(split: TokenSplit, unk_id: int | None, block: int = 1 << 24) -> int:
    """How many tokens of ``split`` are the unknown token (read in blocks: memory stays small)."""
    if unk_id is None:
        return 0
    return sum(int(np.count_nonzero(s[i:i + block] == unk_id)) for s in split.shards
               for i in range(0, len(s), block))


def generate_text(run: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "auto",
                  num_samples: int = 1) -> list[str]:
    """Continue ``prompt`` with the run's newest checkpoint (KV-cached sampling)."""
    if (max_new_tokens < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or num_samples < 1
            or not 0 <= temperature < float("inf")):
        raise PretrainError("need max_new_tokens >= 0, top_k >= 0, 0 < top_p <= 1, temperature >= 0 and "
                            "num_samples >= 1")
    dev = resolve_device(device)
    model, cfg, tok, _ = load_pretrained(run, dev, part="whole")
    if cfg.objective != "clm":
        raise PretrainError(f"{run} is a masked-LM encoder; it cannot generate text "
                            "(try `pretrain fill-mask`)")
    bad = tok.unknown_chars(prompt)
    if bad:
        raise PretrainError(f"the prompt contains characters outside the tokenizer's vocabulary: "
                            f"{', '.join(repr(c) for c in bad[:10])}")
    ids = (tok.encode(prompt) if prompt else []) or [tok.eot_id]
    if any(i >= cfg.model.vocab_size for i in ids):
        raise PretrainError("the prompt encodes to token ids outside the model's vocabulary")
    ctx = cfg.model.max_seq_len
    if len(ids) > ctx:
        warnings.warn(f"the prompt is {len(ids):,} tokens, longer than the model's context of {ctx:,}: "
                      f"the model sees only its last {ctx:,} tokens (the first {len(ids) - ctx:,} are "
                      "dropped); shorten the prompt to keep them in view", stacklevel=2)
    gen = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    with autocast_context(dev, cfg.train.dtype):
        out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, gen)
    start = 0 if tok.encode(prompt) else 1
    return [tok.decode(row[start:].tolist()) for row in out]


def fill_mask(run: str | Path, text: str, top_k: int = 5, device: str = "auto") -> list[list[dict[str, Any]]]:
    """For each [MASK] in ``text``, the ``top_k`` most likely tokens with their probabilities."""
    if top_k < 1:
        raise PretrainError("top_k must be >= 1")
    dev = resolve_device(device)
    model, cfg, tok, _ = load_pretrained(run, dev, part="whole")
    if cfg.objective != "mlm":
        raise PretrainError(f"{run} is a {cfg.objective!r} model; fill-mask needs a masked-LM "
                            "(objective mlm) run")
    ids = tok.encode(text)
    if tok.mask_id is None or tok.mask_id not in ids:
        raise PretrainError("the text has no [MASK] token to fill")
    bad = tok.unknown_chars(text)
    if bad:
        raise PretrainError(f"the text contains characters (or words) outside the tokenizer's vocabulary: "
                            f"{', '.join(repr(c) for c in bad[:10])}")
    if tok.cls_id is not None:
        ids = [tok.cls_id, *ids, tok.eot_id]
    ctx = cfg.model.max_seq_len
    if len(ids) > ctx:  # never cut: a cut could drop a [MASK] or the words it is guessed from
        framed = (f" with {tok.tk.id_to_token(tok.cls_id)} and {tok.tk.id_to_token(tok.eot_id)}"
                  if tok.cls_id is not None else "")
        raise PretrainError(f"the text is {len(ids):,} tokens{framed}, {len(ids) - ctx:,} more than the "
                            f"model's context of {ctx:,}: shorten it to the words around the [MASK]")
    x = torch.tensor([ids], device=dev)
    with torch.no_grad(), autocast_context(dev, cfg.train.dtype):
        probs = model(x)[0].float().softmax(-1)  # (T, V)
    out = []
    for pos in (i for i, t in enumerate(ids) if t == tok.mask_id):
        idx = probs[pos].argsort(descending=True, stable=True)[:top_k]  # equal probabilities: lower id first
        p = probs[pos][idx]
        out.append([{"token": tok.decode([int(i)]).strip() or tok.tk.id_to_token(int(i)), "id": int(i),
                     "prob": round(float(q), 4)} for q, i in zip(p, idx)])
    return out
