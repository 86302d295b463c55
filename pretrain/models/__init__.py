"""Model architectures (architecture only: no losses, no distributed logic), and one spec per architecture
(models/spec.py) that tells the rest of the system what it needs to know about it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, get_spec, spec_of

if TYPE_CHECKING:
    from pretrain.config import Config

__all__ = ["ArchSpec", "build_model", "get_spec", "spec_of", "transferable"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg.arch`` names, built by its spec."""
    return get_spec(cfg.arch).build(cfg)


def transferable(model: nn.Module, cfg: Config) -> tuple[nn.Module, Config]:
    """The part of a pre-trained ``model`` (of run config ``cfg``) that transfers to features, fine-tuning
    and export, and a run config that describes it: its spec's ``encoder`` hook applied (ELECTRA: the
    discriminator, a plain 'bert' encoder); the model itself when the spec has none. When the part is of
    another architecture, the config's objective becomes that architecture's own (its default), so the
    config stays valid and rebuilds the part (``build_model(cfg.model)``)."""
    inner = getattr(model, "_orig_mod", model)
    hook = spec_of(inner).encoder
    if hook is None:
        return model, cfg
    part, mcfg = hook(inner, cfg.model)
    objectives = get_spec(mcfg.arch).objectives
    objective = cfg.objective if cfg.objective in objectives else objectives[0]
    return part, dataclasses.replace(cfg, model=mcfg, objective=objective)
