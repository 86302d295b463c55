"""Masked language modelling (BERT): corrupt a fraction of the tokens and predict the originals.

Dynamic masking: each batch is masked afresh, with a generator seeded from (seed, batch position), so
the masks are reproducible and an exactly resumed run sees the same ones. Of the selected positions,
``mask_token_frac`` become [MASK], ``random_token_frac`` a random (non-special) token, the rest stay as
they are (BERT's 80/10/10). Special tokens ([CLS], [SEP], [PAD], ...) are never selected, and the loss
is computed on selected positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.models import spec_of
from pretrain.objectives.losses import linear_cross_entropy, unwrap_compiled

IGNORE = -100


@dataclass
class MaskingSpec:
    mask_id: int
    cls_id: int | None
    vocab_size: int
    special_ids: list[int]
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    continuation: torch.Tensor | None = None  # (vocab,) bool: WordPiece '##' pieces, for whole-word masking
    pad_id: int | None = None  # padding (data.packing false): never masked, never attended to
    end_frac: float = 0.0  # rows in which only each document's last token (before eot_id) is masked
    eot_id: int | None = None


def add_cls(batch: torch.Tensor, cls_id: int | None) -> torch.Tensor:
    """(B, T+1) packed tokens → (B, T) inputs: [CLS] followed by the first T-1 tokens (or the first T)."""
    if cls_id is None:
        return batch[:, :-1]
    cls = torch.full_like(batch[:, :1], cls_id)
    return torch.cat([cls, batch[:, :-2]], dim=1)


def mask_tokens(ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) → (corrupted inputs, labels with IGNORE at unselected positions). Runs on ids' device."""
    device = ids.device
    special = torch.zeros(spec.vocab_size, dtype=torch.bool, device=device)
    special[torch.tensor(spec.special_ids, dtype=torch.long, device=device)] = True
    eligible = ~special[ids]
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    rand = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
    if spec.continuation is not None:
        # whole words: a word's pieces share the draw of its first piece
        cont = spec.continuation.to(device)[ids] & eligible
        pos = torch.arange(ids.size(1), device=device).expand_as(ids)
        # position of each word's first piece
        word_start = torch.where(cont, torch.zeros_like(pos), pos).cummax(dim=1).values
        rand = torch.gather(rand, 1, word_start)
    selected = eligible & (rand < spec.mask_prob)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
    to_mask = selected & (action < spec.mask_token_frac)
    to_random = (selected & (action >= spec.mask_token_frac)
                 & (action < spec.mask_token_frac + spec.random_token_frac))
    normal = (~special).nonzero().squeeze(1)  # ids a random replacement may take
    random_ids = normal[torch.randint(len(normal), ids.shape, generator=generator, device="cpu").to(device)]
    inputs = torch.where(to_mask, torch.full_like(ids, spec.mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    if spec.end_frac > 0 and spec.eot_id is not None:  # (drawn last: other settings keep their masks)
        rows = torch.rand(ids.size(0), generator=generator, device="cpu") < spec.end_frac
        rows = rows.to(device)[:, None]
        last = torch.zeros_like(eligible)
        last[:, :-1] = (ids[:, 1:] == spec.eot_id) & eligible[:, :-1]
        labels = torch.where(rows, torch.where(last, ids, torch.full_like(ids, IGNORE)), labels)
        inputs = torch.where(rows, torch.where(last, torch.full_like(ids, spec.mask_id), ids), inputs)
    return inputs, labels


def loss_and_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None,
                      reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy over selected positions (``reduction="sum"``: their sum), number correct, number
    selected (head only on those). ``doc_ids`` (B, T): attention stays within each document (document
    masking)."""
    extra = {} if doc_ids is None else {"doc_ids": doc_ids}
    sel = labels != IGNORE
    n = int(sel.sum())
    if n == 0:
        hidden = model(inputs, attention_mask=attention_mask, return_hidden=True, **extra)  # (B, T, C)
        zero = hidden.sum() * 0.0
        return zero, torch.zeros((), device=inputs.device), 0
    # the last block runs on the selected positions only
    if getattr(unwrap_compiled(model), "sparse_output", False):
        hidden = model(inputs, attention_mask=attention_mask, return_hidden=True, select=sel,
                       **extra)  # (N, C)
    else:
        hidden = model(inputs, attention_mask=attention_mask, return_hidden=True, **extra)[sel]
    m = unwrap_compiled(model)
    # the head's output projection and the cross-entropy fused (losses.linear_cross_entropy)
    head = spec_of(m).output_head(m)
    loss, correct = linear_cross_entropy(m.head_features(hidden), head.weight, labels[sel],
                                         bias=head.bias, reduction=reduction, return_correct=True)
    return loss, correct, n
