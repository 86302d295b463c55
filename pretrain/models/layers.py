"""Shared transformer pieces: RMSNorm, rotary embedding (Llama/HF layout), attention masks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like Llama's, cast back to the input dtype
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim), halves repeated (the Hugging Face Llama convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def cached_attention_mask(past: int, new: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for ``new`` query tokens after ``past`` cached ones, for SDPA: a fresh sequence
    is plain causal; one new token sees everything cached; several see the cache and causally each other."""
    if past == 0 or new == 1:
        return None, past == 0 and new > 1
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past), False


def document_ids(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) token ids → (B, T) document index within each row: an end-of-text token closes its document,
    so it belongs to the document it ends and the next token starts a new one."""
    eot = (ids == eot_id).long()
    return eot.cumsum(dim=1) - eot


def document_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, T) document ids → (B, 1, T, T) boolean SDPA mask: query i attends to key j only within the same
    document (block-diagonal), and only j <= i when ``causal``."""
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        mask = mask.tril()
    return mask[:, None]
