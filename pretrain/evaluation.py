"""Validation: the mean loss of a model on (part of) a prepared split, with perplexity, and bits per byte
(causal LM) or accuracy (masked LM). Used by the training loop, ``pretrain eval`` and the benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.data.loader import TokenSplit, eval_batches
from pretrain.hardware import autocast_context
from pretrain.objectives import CausalLM


def evaluate(model: nn.Module, split: TokenSplit, seq_len: int, batch_size: int, device: torch.device,
             dtype: str = "auto", max_batches: int | None = None, objective=None,
             documents: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Mean loss over (part of) a split with perplexity, and bits per byte (causal LM) or accuracy (masked
    LM)."""
    objective = objective or CausalLM()
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(eval_batches(split, seq_len, batch_size, max_batches, documents)):
            batch = batch.to(device, non_blocking=True)
            with autocast_context(device, dtype):
                loss_sum, count, right = objective.eval_batch(model, batch, i)
            total, n = total + loss_sum, n + count
            correct = None if right is None else correct + right
    model.train(was_training)
    mean = total / max(n, 1)
    out = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": n}
    if correct is not None:
        out["accuracy"] = correct / max(n, 1)
    if objective.reports_bpb and split.bytes:
        out["bpb"] = mean / math.log(2) * split.tokens / split.bytes
    return out


def _batch_on(split, idx, device: torch.device):
    from pretrain.data.loader import image_batch

    images, labels = image_batch(split, idx)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def evaluate_images(model: nn.Module, split, batch_size: int, device: torch.device, dtype: str = "auto",
                    max_batches: int | None = None, objective=None) -> dict[str, float]:
    """The objective's mean validation loss per image over (part of) an image split (the same images and
    masks at every evaluation), and accuracy for objectives that classify."""
    from pretrain.data.loader import eval_image_indices

    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, idx in enumerate(eval_image_indices(len(split), batch_size, max_batches)):
            with autocast_context(device, dtype):
                loss_sum, count, right = objective.eval_batch(model, _batch_on(split, idx, device), i)
            total, n = total + loss_sum, n + count
            correct = None if right is None else correct + right
    model.train(was_training)
    out = {"loss": total / max(n, 1), "images": n}
    if correct is not None:
        out["accuracy"] = correct / max(n, 1)
    return out


@torch.no_grad()
def image_features(model: nn.Module, images, idx, pixels, batch_size: int, device: torch.device,
                   dtype: str = "auto", pooling: str = "cls") -> torch.Tensor:
    """(len(idx), D) float features (``model.features``) of images ``idx`` of ``images`` (anything with
    ``images(index) -> (k, H, W, C) uint8``: an ImageSplit), batch by batch; ``pixels``: uint8 array → the
    model's normalised input on ``device``."""
    out = []
    for i in range(0, len(idx), batch_size):
        with autocast_context(device, dtype):
            out.append(model.features(pixels(images.images(idx[i:i + batch_size])), pooling).float())
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "feature_dim", 0), device=device)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, labels: torch.Tensor,
                 n_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Accuracy of a weighted k-nearest-neighbour vote (cosine similarity; each neighbour's vote exp(sim /
    temperature), as in Wu et al. 2018 / DINO) of ``query`` features among ``bank`` features."""
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    query = torch.nn.functional.normalize(query.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(query), 1024):
        sim = query[i:i + 1024] @ bank.T
        top, where = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), n_classes, device=top.device)
        votes.scatter_add_(1, bank_labels[where], (top / temperature).exp())
        correct += int((votes.argmax(1) == labels[i:i + 1024]).sum())
    return correct / max(len(query), 1)


def knn_monitor(model: nn.Module, train_split, val_split, objective, batch_size: int, device: torch.device,
                dtype: str = "auto", k: int = 20, bank_size: int = 5000, max_batches: int | None = None,
                seed: int = 0) -> float | None:
    """The self-supervised monitor: k-NN accuracy of the (frozen) features of the validation images used in
    evaluation among those of ``bank_size`` training images (a fixed seeded sample). None when the data has
    no labels."""
    import numpy as np

    from pretrain.data.loader import eval_image_indices

    if train_split.labels is None or val_split.labels is None or k <= 0:
        return None
    n = len(train_split)
    bank_idx = np.sort(np.random.default_rng([seed, 0xB4A7]).permutation(n)[:min(bank_size, n)])
    val_idx = np.concatenate(eval_image_indices(len(val_split), batch_size, max_batches)
                             or [np.zeros(0, np.int64)])
    was_training = model.training
    model.eval()
    try:
        def pixels(a):
            return objective.pixels(torch.from_numpy(np.ascontiguousarray(a)).to(device))

        bank = image_features(model, train_split, bank_idx, pixels, batch_size, device, dtype)
        query = image_features(model, val_split, val_idx, pixels, batch_size, device, dtype)
    finally:
        model.train(was_training)
    n_classes = int(max(train_split.labels.max(), val_split.labels.max())) + 1
    return knn_accuracy(bank, torch.from_numpy(train_split.labels[bank_idx]).to(bank.device), query,
                        torch.from_numpy(val_split.labels[val_idx]).to(query.device), n_classes, k)
