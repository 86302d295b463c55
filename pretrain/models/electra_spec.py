"""The 'electra' architecture (models/electra.py) as the system sees it: trained by replaced-token detection
(objective 'rtd'); what transfers is its discriminator, a plain 'bert' encoder (the ``encoder`` hook), so
features, fine-tuning (LoRA, pooling) and export (a ModernBERT) go through the bert spec. The run itself
(training, resume, ``pretrain eval``) keeps the whole model."""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, register

# the generator's vocabulary projection runs on the masked positions only; FLOPs count it at BERT's 15%
GENERATOR_HEAD_FRACTION = 0.15


def _build(cfg: ModelConfig):
    from pretrain.models.electra import Electra

    return Electra(cfg)


def _encoder(model: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """The discriminator, as the 'bert' encoder it is, with its config."""
    from pretrain.models.electra import discriminator_config

    return model.discriminator, discriminator_config(cfg)


def _flops(model: nn.Module, seq_len: int) -> float:
    """6 x (non-embedding parameters of both encoders, without the discriminator's unused vocabulary
    projection) + the generator's tied vocabulary projection at the masked positions + attention
    (12 x all blocks x width x sequence)."""
    c, emb = model.cfg, model.discriminator.tok_embeddings.weight
    unused = sum(p.numel() for p in model.discriminator.decoder.parameters() if p is not emb)
    n = model.num_params(non_embedding=True) - unused + GENERATOR_HEAD_FRACTION * emb.numel()
    return 6.0 * n + 12.0 * len(model.layers) * c.d_model * seq_len


SPEC = register(ArchSpec(
    name="electra", build=_build, objectives=("rtd",), blocks="layers",
    embeddings=("tok_embeddings", "emb_norm"), head="rtd_out", lora_targets=("Wqkv", "Wo", "Wi"),
    description="replaced-token-detection (ELECTRA) encoder", bidirectional=True, doc_mask=True,
    encoder=_encoder, flops=_flops,
))
