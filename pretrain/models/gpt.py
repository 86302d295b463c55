"""Decoder-only transformer, architecturally a Llama: pre-norm RMSNorm, rotary positions, causal SDPA
attention with optional grouped-query heads, SwiGLU MLP, no biases, tied or untied embeddings.

Query/key/value and gate/up projections are fused into one matrix each (fewer, larger matmuls); export
to the Hugging Face layout splits them again.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.layers import RMSNorm, apply_rope, cached_attention_mask, document_mask, rope_cache


class KVCache:
    """Pre-allocated keys/values for incremental decoding: (n_layer) × (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int):
        self.shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # allocated on first use, in the dtype attention runs in (bf16 under autocast)
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        t = k.size(2)
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd],
                                         dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        causal = False
        if mask is None:  # (a document mask, when given, is already causal)
            mask, causal = cached_attention_mask(past, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.ff_dim
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * self.hidden, bias=False)
        self.down_proj = nn.Linear(self.hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask))
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.max_seq_len < 1:
            raise ValueError("GPT needs a resolved vocab_size and max_seq_len")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm gains stay at 1
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False,
                doc_ids: torch.Tensor | None = None):
        """idx: (B, T) token ids → logits (B, T, vocab), or final hidden states (B, T, d_model).
        doc_ids (B, T): attend only within the same document (packed sequences; see layers.document_ids)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's max_seq_len "
                             f"{self.cfg.max_seq_len}")
        cos = self.rope_cos[start:start + T].to(idx.device)
        sin = self.rope_sin[start:start + T].to(idx.device)
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (document masking) is for training, not for KV-cached decoding")
            mask = document_mask(doc_ids, causal=True)  # (B, 1, T, T)
        x = self.drop(self.embed_tokens(idx))  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)  # (B, T, V)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head: final hidden states (..., C) → vocabulary logits (..., V)."""
        return self.lm_head(hidden)


    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
        """Sample continuations of idx (B, T) with a KV cache; temperature 0 means greedy.

        Past the model's context, the cache is rebuilt from the last half-context of tokens (a sliding
        window), so any number of tokens can be generated.
        """
        was_training = self.training
        self.eval()
        ctx = self.cfg.max_seq_len
        out = idx

        def prefill(tokens: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
            cache = KVCache(self.cfg, tokens.size(0), ctx)
            return cache, self(tokens, cache)[:, -1]

        cache, logits = prefill(out[:, -ctx:] if out.size(1) > ctx else out)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt], dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
            if cache.pos >= ctx:
                cache, logits = prefill(out[:, -max(1, ctx // 2):])
            else:
                logits = self(nxt, cache)[:, -1]
        self.train(was_training)
        return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → next ids (B, 1)."""
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or too small to divide by in this dtype: greedy
        return logits.argmax(dim=-1, keepdim=True)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # no overflow for a tiny temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
