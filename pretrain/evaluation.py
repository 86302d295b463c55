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
