"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.layers import document_ids


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) packed tokens → inputs (B, T), targets (B, T) shifted by one."""
    return batch[:, :-1], batch[:, 1:]


def loss(model: nn.Module, batch: torch.Tensor, eot_id: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) over a (B, T+1) batch (``reduction="sum"``: the sum over
    its B*T targets). With ``eot_id``, attention stays within each document of the packed sequence (document
    masking)."""
    inputs, targets = split_batch(batch)
    if eot_id is None:
        logits = model(inputs)  # (B, T, V)
    else:
        logits = model(inputs, doc_ids=document_ids(inputs, eot_id))
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
