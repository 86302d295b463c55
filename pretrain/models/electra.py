"""ELECTRA (Clark et al., 2020): a discriminator that tells, for every token, whether a small generator
replaced it, trained together with that generator. Architecture only; the objective (masking, sampling,
losses) is objectives/rtd.py.

Both parts are our bidirectional encoders (models/bert.py, ModernBERT-style):

- ``discriminator``: an ``Encoder`` of the run's size (``model.*``, as arch 'bert'). It is what transfers
  (features, fine-tuning, export: the spec's ``encoder`` hook hands it out as a plain bert encoder).
- ``generator``: a smaller ``Encoder`` of the same width (``model.generator_layers / _heads / _ff``) whose
  token embeddings *are* the discriminator's (one Parameter), and whose masked-LM decoder is tied to them.
- the replaced-token-detection head: the discriminator's own ``head_features`` (dense → GELU → norm), then
  ``rtd_out``, a linear map to one logit per token (> 0: replaced).

The discriminator's masked-LM decoder (its bias, and its weight when not tied to the embeddings) is never
used by the objective: it does not require gradients, so DDP finds no unused parameter that needs one, and
the optimizer leaves it alone. It stays in the state dict (zeros) so the discriminator exports as a complete
ModernBERT.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.bert import Encoder

GENERATOR_FIELDS = {"generator_layers": 0, "generator_heads": 0, "generator_ff": 0}


def discriminator_config(cfg: ModelConfig) -> ModelConfig:
    """The discriminator as a plain 'bert' encoder config."""
    return dataclasses.replace(cfg, arch="bert", **GENERATOR_FIELDS)


def generator_config(cfg: ModelConfig) -> ModelConfig:
    """The generator: the same width, vocabulary and context; fewer blocks (and heads, MLP width)."""
    ff = cfg.generator_ff or ((cfg.ff_dim // 2) + 63) // 64 * 64
    return dataclasses.replace(cfg, arch="bert", n_layer=cfg.generator_layers or max(1, cfg.n_layer // 4),
                               n_head=cfg.generator_heads or cfg.n_head, n_kv_head=0, d_ff=ff,
                               tie_embeddings=True, **GENERATOR_FIELDS)


class Electra(nn.Module):
    """Generator + discriminator with shared token embeddings. ``forward`` is the discriminator's (hidden
    states, ``select``, ``doc_ids``, attention mask alike), with ``part="generator"`` the generator's;
    without ``return_hidden`` it returns the replaced-token logits (B, T) (the generator: vocabulary
    logits)."""

    sparse_output = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.discriminator = Encoder(discriminator_config(cfg))
        self.generator = Encoder(generator_config(cfg))
        shared = self.discriminator.tok_embeddings.weight
        self.generator.tok_embeddings.weight = shared  # one Parameter: the embeddings are shared
        self.generator.decoder.weight = shared  # the generator's masked-LM decoder tied to them
        self.rtd_out = nn.Linear(cfg.d_model, 1, bias=True)
        nn.init.normal_(self.rtd_out.weight, 0.0, cfg.init_std)
        nn.init.zeros_(self.rtd_out.bias)
        for p in self.discriminator.decoder.parameters():  # the discriminator's MLM output: unused by RTD
            if p is not shared:
                p.requires_grad_(False)

    @property
    def layers(self) -> list[nn.Module]:
        """Every transformer block, the discriminator's then the generator's (FSDP units, activation
        checkpointing, per-block compilation; a plain list, so the state dict has each block once)."""
        return [*self.discriminator.layers, *self.generator.layers]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # (each shared Parameter once)
        return n - self.discriminator.tok_embeddings.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False, doc_ids: torch.Tensor | None = None,
                select: torch.Tensor | None = None, part: str = "discriminator") -> torch.Tensor:
        """``part`` 'discriminator' (default) or 'generator': that encoder's forward (see bert.Encoder);
        hidden states with ``return_hidden``, else the discriminator's replaced-token logits (B, T) / (N,)
        or the generator's vocabulary logits."""
        if part == "generator":
            return self.generator(idx, attention_mask, return_hidden, doc_ids, select)
        if part != "discriminator":
            raise ValueError(f"part must be 'discriminator' or 'generator', got {part!r}")
        hidden = self.discriminator(idx, attention_mask, True, doc_ids, select)
        return hidden if return_hidden else self.rtd_logits(hidden)

    def rtd_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Discriminator hidden states (..., C) → replaced-token logits (...): its head's dense → GELU →
        norm, then ``rtd_out``."""
        return self.rtd_out(self.discriminator.head_features(hidden)).squeeze(-1)

    def generator_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Generator hidden states (..., C) → the input of its vocabulary projection (generator.decoder)."""
        return self.generator.head_features(hidden)
