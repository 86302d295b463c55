"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.models import spec_of
from pretrain.models.layers import document_ids
from pretrain.objectives.losses import linear_cross_entropy, unwrap_compiled


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) packed tokens → inputs (B, T), targets (B, T) shifted by one."""
    return batch[:, :-1], batch[:, 1:]


def loss(model: nn.Module, batch: torch.Tensor, eot_id: int | None = None,
         reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) over a (B, T+1) batch (``reduction="sum"``: the sum over
    its B*T targets). With ``eot_id``, attention stays within each document of the packed sequence (document
    masking). The output head runs inside the loss, chunk by chunk (``losses.linear_cross_entropy``): the
    model returns its final hidden states and the (B*T, V) logits are never held at once."""
    inputs, targets = split_batch(batch)
    extra = {} if eot_id is None else {"doc_ids": document_ids(inputs, eot_id)}
    hidden = model(inputs, return_hidden=True, **extra)  # (B, T, C)
    m = unwrap_compiled(model)
    head = spec_of(m).output_head(m)
    return linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, reduction=reduction)
