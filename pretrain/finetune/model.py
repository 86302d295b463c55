"""A task head on a pre-trained backbone (architecture only; the backbone is any pretrain model).

Sequence tasks pool the backbone's final hidden states (``cls`` for encoders, ``last`` real token for
decoders, or ``mean``) and apply dropout + a linear layer; token tasks apply the head at every position.
Image models (spec modality 'images', :class:`ImageTaskModel`) pool their own ``features`` (``cls`` or
``mean``) under the same dropout + linear head.
Prompt-based classification (``label_ids``) has no new head at all: the backbone's own language-model
head scores one word per label at the prompt's slot (the [MASK] token of an encoder; the next token after
the last one of a decoder), as in PET / LM-BFF — what pre-training learned is used from the first step.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain import PretrainError
from pretrain.features import hidden_states, pool_hidden
from pretrain.models import spec_of

if TYPE_CHECKING:
    from pretrain.config import FinetuneConfig


class _Head(nn.Module):
    """What the optimizer asks of a task model, read from its backbone's spec."""

    backbone: nn.Module

    def layer_of(self, name: str) -> int:
        """Depth of a parameter for layer-wise learning rates: 0 = embeddings, i + 1 = block i,
        last = head."""
        spec = spec_of(self.backbone)
        n_layers = len(spec.block_list(self.backbone))
        if name.startswith("classifier.") or ".classifier." in name:
            return n_layers + 1
        return spec.layer_of(name, n_layers)  # final norms and the pre-training head: the top block's

    def is_embedding(self, name: str) -> bool:
        return spec_of(self.backbone).is_embedding(name)


class TaskModel(_Head):
    def __init__(self, backbone: nn.Module, d_model: int, n_out: int, pooling: str, encoder: bool,
                 dropout: float = 0.1, token_level: bool = False, label_ids: list[int] | None = None,
                 mask_id: int | None = None, head_features: bool = False, bias: bool = True):
        """``label_ids`` (one vocabulary id per class) switches to prompt-based classification; encoders
        then need ``mask_id``, the token whose position holds the slot (exactly one per row).
        ``head_features``: the hidden states pass through the backbone's ``head_features`` (an encoder's
        pre-trained prediction-head transform: dense, activation, norm) before dropout and the linear layer,
        as Hugging Face's ModernBERT task heads do (so that an export is exact). ``bias``: the linear layer
        has one (Hugging Face's Llama and GPT-2 sequence classifiers have none)."""
        super().__init__()
        self.backbone = backbone
        self.pooling, self.encoder, self.token_level = pooling, encoder, token_level
        self.head_features = head_features
        if head_features and not hasattr(backbone, "head_features"):
            raise ValueError("head_features needs a backbone with a head_features transform")
        self.drop = nn.Dropout(dropout)
        self.prompt = label_ids is not None
        if self.prompt:
            if encoder and mask_id is None:
                raise ValueError("prompt-based classification on an encoder needs the tokenizer's mask token")
            self.register_buffer("label_ids", torch.tensor(label_ids, dtype=torch.long), persistent=False)
            self.mask_id = mask_id
            return
        self.classifier = nn.Linear(d_model, n_out, bias=bias)
        nn.init.normal_(self.classifier.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.classifier.bias)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, (B, T) bool mask → (B, n_out) logits, or (B, T, n_out) for token tasks."""
        h = hidden_states(self.backbone, idx, mask, self.encoder)  # (B, T, C)
        if self.prompt:  # the LM head's logits of the label words at the slot
            h = h[idx == self.mask_id] if self.encoder else pool_hidden(h, mask, "last")  # (B, C)
            return self.backbone.logits(h)[:, self.label_ids].float()
        if not self.token_level:
            h = pool_hidden(h, mask, self.pooling)  # (B, C)
        if self.head_features:
            h = self.backbone.head_features(h)
        return self.classifier(self.drop(h)).float()


class ImageTaskModel(_Head):
    """Image classification: the backbone's pooled ``features`` (``cls`` or ``mean``), dropout, a linear
    head."""

    prompt = False

    def __init__(self, backbone: nn.Module, n_out: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.feature_dim, n_out)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels → (B, n_out) logits."""
        return self.classifier(self.drop(self.backbone.features(pixels, self.pooling))).float()


def run_modality(run: str | Path) -> str:
    """What the run's model reads, as its architecture's spec says: 'text' or 'images' (read from the
    checkpoint's meta.json, without loading weights); 'text' when ``run`` is no readable run, so the
    loaders that follow report what is wrong with it as before."""
    from pretrain.checkpoint import CheckpointError, read_meta, resolve_checkpoint
    from pretrain.models import get_spec

    try:
        return get_spec(read_meta(resolve_checkpoint(run))["config"]["model"]["arch"]).modality
    except (CheckpointError, KeyError, TypeError, ValueError, OSError):
        return "text"


def is_finetuned(run: str | Path) -> bool:
    """Whether ``run`` is a fine-tuned model's directory (``pretrain finetune``'s output) rather than a
    pre-trained run."""
    from pretrain.finetune.predict import FT_FILE

    return (Path(run) / FT_FILE).is_file()


def origin(run: str | Path) -> str | Path:
    """The pre-trained run behind ``run``: itself, or for a fine-tuned model the checkpoint it was
    fine-tuned from (itself when that is unknown or was a random init)."""
    import json

    from pretrain.finetune.predict import FT_FILE

    if not is_finetuned(run):
        return run
    try:
        return json.loads((Path(run) / FT_FILE).read_text(encoding="utf-8")).get("pretrained_from") or run
    except (OSError, ValueError, AttributeError):
        return run


def carry_head(model: nn.Module, run: str | Path, task: str) -> bool:
    """Start ``model``'s head from the fine-tuned model ``run``'s when that was fine-tuned for the same
    task with a head of the same shape (intermediate-task training: e.g. question answering on
    self-supervised cloze questions, then on the labelled ones). Whether it did."""
    import json

    from safetensors import safe_open

    from pretrain.finetune.predict import FT_FILE, WEIGHTS

    if not is_finetuned(run) or not hasattr(model, "classifier"):
        return False
    info = json.loads((Path(run) / FT_FILE).read_text(encoding="utf-8"))
    if info.get("task") != task:
        return False
    with safe_open(str(Path(run) / WEIGHTS), "pt") as f:
        head = {k.removeprefix("classifier."): f.get_tensor(k) for k in f.keys()
                if k.startswith("classifier.")}
    own = model.classifier.state_dict()
    if set(head) != set(own) or any(head[k].shape != own[k].shape for k in own):
        return False
    model.classifier.load_state_dict(head)
    return True


def load_backbone(run: str | Path, dropout: float, from_scratch: bool, seed: int):
    """The run's model (the part of it that transfers: ``models.transferable``) rebuilt with fine-tuning
    dropout → (backbone, Config of the backbone, Tokenizer (None for an image run), checkpoint path).
    ``run`` may also be a fine-tuned model's directory: its backbone goes on to the next task (the path
    returned is then that directory)."""
    from pretrain.checkpoint import CheckpointError, load_pretrained, resolve_checkpoint
    from pretrain.models import build_model

    if is_finetuned(run):
        from pretrain.config import Config, from_dict
        from pretrain.finetune.predict import load_finetuned

        task_model, info, tok = load_finetuned(run)
        cfg = from_dict(Config, info["backbone"])
        cfg.model = dataclasses.replace(cfg.model, dropout=dropout)
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        if not from_scratch:
            model.load_state_dict(task_model.backbone.state_dict())
        return model, cfg, tok, Path(run)
    try:
        ckpt = resolve_checkpoint(run)
        # the part that transfers (spec.encoder; ELECTRA: the discriminator as a 'bert' encoder), and a Config
        # of that part, which finetune.json records as the backbone (load_finetuned rebuilds it from there)
        pre, cfg, tok, _ = load_pretrained(ckpt, part="encoder")
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    cfg.model = dataclasses.replace(cfg.model, dropout=dropout)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if not from_scratch:
        model.load_state_dict(pre.state_dict())
    return model, cfg, tok, ckpt


def _apply_lora(model: TaskModel, cfg: FinetuneConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PretrainError("LoRA needs the peft library: pip install 'pretrain[lora]' "
                            "(or pip install peft)") from None
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=list(spec_of(model.backbone).lora_targets),
                    modules_to_save=None if model.prompt else ["classifier"])
    return get_peft_model(model, lc)


def merged(model: nn.Module) -> TaskModel:
    """A plain TaskModel: LoRA adapters folded into the weights (a copy; training goes on untouched)."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
