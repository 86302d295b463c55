"""Bidirectional transformer encoder, architecturally a ModernBERT (all layers global attention):
token embeddings → LayerNorm, pre-norm blocks (the first block has no attention norm), rotary positions,
SDPA attention over all positions with a padding mask, GeGLU MLP, no biases in the blocks, a final
LayerNorm; the masked-LM head is dense → GELU → LayerNorm → decoder tied to the embeddings (with bias).

Parameter names follow Hugging Face's ModernBertForMaskedLM so export is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.layers import apply_rope, document_mask, rope_cache


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, bias=False)


class EncoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.hd = cfg.n_head, cfg.head_dim
        self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.Wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, rows=None):
        """rows (B, M): only these positions' outputs (B, M, C) are computed (queries at those positions,
        keys and values everywhere)."""
        B, T, C = x.shape
        if rows is None:
            # 3 × (B, H, T, D)
            q, k, v = self.Wqkv(x).view(B, T, 3, self.n_head, self.hd).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            M = rows.size(1)
            w_q, w_kv = self.Wqkv.weight.split([C, 2 * C])
            x_q = x.gather(1, rows[..., None].expand(B, M, C))  # (B, M, C)
            q = F.linear(x_q, w_q).view(B, M, self.n_head, self.hd).transpose(1, 2)  # (B, H, M, D)
            k, v = F.linear(x, w_kv).view(B, T, 2, self.n_head, self.hd).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos[rows][:, None], sin[rows][:, None]), apply_rope(k, cos, sin)
            if mask is not None and mask.size(-2) > 1:  # per-query rows of a (B, 1, T, T) mask
                mask = mask.gather(2, rows[:, None, :, None].expand(B, 1, M, T))
            T = M
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.Wo(y.transpose(1, 2).reshape(B, T, C))


class GeGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.d_model, 2 * cfg.ff_dim, bias=False)
        self.Wo = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(F.gelu(inp) * gate))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = nn.Identity() if index == 0 else _layer_norm(cfg.d_model, cfg.norm_eps)
        self.attn = EncoderAttention(cfg)
        self.mlp_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.mlp = GeGLU(cfg)

    def forward(self, x, cos, sin, mask, rows=None):
        """rows (B, M): compute the block's output at these positions only → (B, M, C)."""
        if rows is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        else:
            x = x.gather(1, rows[..., None].expand(*rows.shape, x.size(-1))) + \
                self.attn(self.attn_norm(x), cos, sin, mask, rows)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Encoder(nn.Module):
    """Bidirectional encoder: ids (B, T) [+ attention_mask (B, T), 1 = real token] → logits or hidden
    states."""

    sparse_output = True  # forward(..., select=) computes the outputs at selected positions only

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.max_seq_len < 1:
            raise ValueError("Encoder needs a resolved vocab_size and max_seq_len")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        # masked-LM head
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.head_norm = _layer_norm(cfg.d_model, cfg.norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.decoder.weight = self.tok_embeddings.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("decoder.bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                scale = (math.sqrt(2 * self.cfg.n_layer) if name.endswith(("attn.Wo.weight", "mlp.Wo.weight"))
                         else 1.0)
                nn.init.normal_(p, 0.0, std / scale)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if non_embedding else n


    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False, doc_ids: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """doc_ids (B, T): attend only within the same document (packed sequences; see layers.document_ids).
        select (B, T) bool: the output at these positions only, (N, C) or (N, V) in row-major order (as
        ``out[select]`` of the full output); the last block then runs its queries, output projection and
        MLP on those positions alone (for masked LM: ~15% of them), which changes no value."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        mask = None
        if attention_mask is not None:  # (B, T) 1/True = real token → (B, 1, 1, T) keys to attend to
            mask = attention_mask.bool()[:, None, None, :]
        if doc_ids is not None:  # (B, 1, T, T) block-diagonal, and padding keys still excluded
            mask = (document_mask(doc_ids, causal=False) if mask is None
                    else document_mask(doc_ids, False) & mask)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.drop(self.emb_norm(self.tok_embeddings(idx)))  # (B, T, C)
        rows = valid = None
        if select is not None:  # each row's selected positions, in order, padded to the longest row: (B, M)
            counts = select.sum(dim=1)
            m = int(counts.max())
            rows = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :m]
            valid = torch.arange(m, device=idx.device)[None, :] < counts[:, None]
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, rows if i == last else None)
        if select is not None:
            x = x[valid] if self.layers else x[select]  # (N, C)
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM head: hidden states (..., C) → vocabulary logits (..., V)."""
        return self.decoder(self.head_features(hidden))

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The masked-LM head up to its output projection (``decoder``): dense, GELU, norm (..., C)."""
        return self.head_norm(F.gelu(self.head_dense(hidden)))
