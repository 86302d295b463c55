"""Model architectures (architecture only: no losses, no distributed logic), and one spec per architecture
(models/spec.py) that tells the rest of the system what it needs to know about it."""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, get_spec, spec_of

__all__ = ["ArchSpec", "build_model", "get_spec", "spec_of"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg.arch`` names, built by its spec."""
    return get_spec(cfg.arch).build(cfg)
