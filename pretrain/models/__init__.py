"""Model architectures (architecture only: no losses, no distributed logic)."""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt":
        from pretrain.models.gpt import GPT

        return GPT(cfg)
    if cfg.arch == "gpt2":
        from pretrain.models.gpt2 import GPT2

        return GPT2(cfg)
    if cfg.arch == "bert":
        from pretrain.models.bert import Encoder

        return Encoder(cfg)
    raise ValueError(f"unknown architecture {cfg.arch!r}")
