"""What the rest of the system knows about an architecture, in one object per architecture.

An :class:`ArchSpec` is registered under its ``model.arch`` name and tells the trainer, the optimizer, the
distributed wrappers, fine-tuning, features and export everything they need: how to build the model, where
its blocks, embeddings and output head are, which objectives train it, its LoRA targets, default pooling,
FLOPs per token, and its Hugging Face mapping both ways (:class:`HFMapping`). Nothing outside ``models/``
branches on an architecture's name: it asks the spec. Adding an architecture is a model file plus a spec
(see gpt_spec.py for the pattern; torchtitan's ``ModelSpec`` is the idea).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFTask:
    """A fine-tuned task model (backbone + task head: ``finetune.model.TaskModel``) as a stock
    ``transformers`` class: the backbone's weights as its mapping's ``to_hf`` names them, under the class's
    own prefixes, and our ``classifier`` under the class's name for its output layer."""

    task: str
    """The fine-tuning task it exports (finetune.json's ``task``): 'classification', 'regression', 'token',
    'qa'."""
    architecture: str
    """``config.json``'s architectures[0], e.g. 'LlamaForQuestionAnswering'."""
    base: tuple[tuple[str, str], ...]
    """(prefix in the backbone's ``to_hf`` names, prefix in the task class): which backbone weights the class
    holds, and where, e.g. (('model.', 'transformer.'),). Names under no listed prefix (the language-model
    head) are left out."""
    head: str
    """The class's output layer (our TaskModel's ``classifier``): 'classifier', 'qa_outputs'."""
    head_features: bool = False
    """The class passes the final hidden states through the backbone's head transform before its output
    layer (ModernBERT's ``head``: our TaskModel with ``head_features``); a fine-tune must match."""
    config: tuple[tuple[str, Any], ...] = ()
    """config.json fields of the task class beyond the backbone's (``architectures`` and ``num_labels`` are
    set by export)."""
    head_bias: bool = True
    """The class's output layer has a bias (Llama's and GPT-2's sequence classifiers, ``score``, have none):
    a fine-tune for the task builds its classifier the same way, so that it exports exactly."""
    pooling: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    """Sequence tasks: the poolings the class computes (our ``finetune.pooling`` names: 'cls', 'mean',
    'last'), each with the config.json fields that select it, e.g. (('cls', (('classifier_pooling', 'cls'),)),
    ...); a fine-tune pooled otherwise does not export. Empty: a per-token task (no pooling)."""
    pad_pooled: bool = False
    """The class pools the last token that is not config.json's ``pad_token_id`` (Llama, GPT-2): the export
    needs a pad token no input holds (the tokenizer's own, else one added past the vocabulary)."""

    def pooling_config(self, pooling: str) -> dict[str, Any] | None:
        """config.json fields that make the class pool as ``pooling`` does; None when it cannot."""
        return next((dict(fields) for name, fields in self.pooling if name == pooling), None)


@dataclass(frozen=True)
class HFMapping:
    """The equivalent stock ``transformers`` model, and how to convert to and from it."""

    architecture: str
    """``config.json``'s architectures[0], e.g. 'LlamaForCausalLM'."""
    auto_class: str
    """The Auto class that loads an export, e.g. 'AutoModelForCausalLM'."""
    pipeline_tag: str
    """The model card's pipeline tag: 'text-generation' or 'fill-mask'."""
    config: Callable[[ModelConfig, dict[str, Any]], dict[str, Any]]
    """(our model config, special token ids: eot_id / pad_id / cls_id / mask_id; for image models the run's
    image settings instead: mask_ratio, norm_pix_loss) → config.json. Its ``architectures`` may name another
    class than ``architecture`` where the model config decides (a ViT with its MAE decoder or a classifier):
    export then takes the Auto class from that name."""
    to_hf: Callable[[StateDict, ModelConfig], StateDict]
    """Our state dict → the ``transformers`` names (fused projections split; a tied head left out)."""
    token_roles: dict[str, str]
    """tokenizer_config.json's special-token roles → the Tokenizer attribute holding the id, e.g.
    {'eos_token': 'eot_id'} (empty for image models, which export an image processor instead)."""
    model_types: tuple[str, ...] = ()
    """``model_type`` values of config.json this architecture imports (empty: export only)."""
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """config.json → our model section (raise PretrainError for what our blocks cannot represent)."""
    from_hf: Callable[[StateDict, ModelConfig], StateDict] | None = None
    """Inverse of ``to_hf``."""
    usage: str = ""
    """A few lines of Python for the model card, with PATH for the export folder."""
    tasks: tuple[HFTask, ...] = ()
    """The fine-tuned task models that export as stock classes (none: fine-tunes do not export)."""

    def task(self, name: str) -> HFTask | None:
        """The mapping of fine-tuning task ``name`` ('classification', 'qa', ...), or None when it has
        none."""
        return next((t for t in self.tasks if t.task == name), None)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    """The ``model.arch`` value."""
    build: Callable[[ModelConfig], nn.Module]
    """Model config (vocab_size and max_seq_len resolved) → the model, freshly initialised."""
    objectives: tuple[str, ...]
    """Self-supervised objectives that train it ('clm', 'mlm', 'rtd'); the first is its default."""
    blocks: str
    """Name of the ``nn.ModuleList`` of transformer blocks (FSDP units, activation checkpointing, layer-wise
    learning rates, per-block compilation)."""
    embeddings: tuple[str, ...]
    """Names of the input embedding modules (no weight decay, no Muon; the bottom of layer-wise decay)."""
    head: str
    """Name of the output projection (an ``nn.Linear`` onto the vocabulary; fused with the loss)."""
    lora_targets: tuple[str, ...]
    """Linear layers inside the blocks where LoRA adapters go."""
    description: str
    """What it is, for model cards and messages: 'decoder-only language model'."""
    bidirectional: bool = False
    """Attention sees the whole sequence (an encoder: takes an attention mask, pools on [CLS])."""
    doc_mask: bool = False
    """Supports document masking (``doc_ids``) in packed training sequences."""
    learned_positions: bool = False
    """Positions are a learned table of max_seq_len rows (cannot be extended) rather than rotary."""
    hf: HFMapping | None = None
    """The Hugging Face mapping; None: no export."""
    encoder: Callable[[nn.Module, ModelConfig], tuple[nn.Module, ModelConfig]] | None = None
    """The part of a pre-trained model that transfers (features, fine-tuning, export), as a model of another
    registered architecture with its config: (built model, its config) → (part, the part's config), e.g.
    ELECTRA's discriminator as a 'bert' encoder. None: the whole model transfers. Applied in one place,
    ``models.transferable`` (through ``checkpoint.load_pretrained``); training, resume and evaluation of the
    run itself keep the whole model."""
    modality: str = "text"
    """What the model reads: 'text' (token ids from a prepared text directory) or 'images' (pixels from a
    prepared image directory). Image models take normalised pixels (B, C, H, W) and offer
    ``features(pixels, pooling) -> (B, D)`` (``model.feature_dim`` wide) and ``classify(pixels)``; a ViT
    also ``mae(pixels, noise, mask_ratio)`` and ``patchify(pixels)`` for masked autoencoding."""
    channels_last: bool = False
    """Convolutions run faster on NHWC weights and activations (oneDNN on CPUs, cuDNN on GPUs): the trainer
    converts the model to ``torch.channels_last`` (from outside; not under FSDP)."""
    flops: Callable[[nn.Module, int], float] | None = None
    """(model, seq_len) → training FLOPs per token, for a model the default estimate
    (:meth:`flops_per_token`) does not fit; None: that estimate. Image models: per image (seq_len unused)."""

    @property
    def pooling(self) -> str:
        """Default sequence pooling for features and fine-tuning: 'cls' for encoders, 'last' for decoders."""
        return "cls" if self.bidirectional else "last"

    @property
    def generates(self) -> bool:
        """Samples text left to right (a causal LM)."""
        return "clm" in self.objectives

    # ----------------------------------------------------------------------------- parts of a built model

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        return list(getattr(model, self.blocks))

    def output_head(self, model: nn.Module) -> nn.Linear:
        return getattr(model, self.head)

    def is_embedding(self, name: str) -> bool:
        """Whether parameter ``name`` (of the model, or of a wrapper holding it) belongs to an input
        embedding."""
        return any(_has_part(name, e) for e in self.embeddings)

    def is_head(self, name: str) -> bool:
        return _has_part(name, self.head)

    def decays(self, name: str, p: torch.Tensor) -> bool:
        """Whether AdamW's weight decay applies: to matrices (embeddings included), not to gains and
        biases."""
        return p.dim() >= 2

    def is_hidden_matrix(self, name: str, p: torch.Tensor) -> bool:
        """A 2-D weight inside the network (not an embedding nor the output head): Muon's domain."""
        return p.dim() == 2 and not self.is_embedding(name) and not self.is_head(name)

    def layer_of(self, name: str, n_layer: int) -> int:
        """Depth of parameter ``name`` for layer-wise learning rates: 0 = embeddings, i + 1 = block i,
        n_layer for the rest of the backbone (final norms, the pre-training head)."""
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == self.blocks and parts[i + 1].isdigit():
                return int(parts[i + 1]) + 1
        return 0 if self.is_embedding(name) else n_layer

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (non-embedding parameters + a tied output head) + attention
        (12 x layers x width x sequence), as in the PaLM / nanoGPT MFU estimate."""
        if self.flops is not None:
            return self.flops(model, seq_len)
        c = model.cfg
        head = self.output_head(model).weight
        tied = any(head is p for e in self.embeddings for p in getattr(model, e).parameters())
        n = model.num_params(non_embedding=True) + (head.numel() if tied else 0)
        return 6.0 * n + 12.0 * c.n_layer * c.d_model * seq_len


def _has_part(name: str, module: str) -> bool:
    """Whether a dotted parameter name passes through the module called ``module``."""
    return name.startswith(module + ".") or f".{module}." in name


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Make ``spec`` the architecture ``spec.name`` (``model.arch``); returns it (a later one replaces it)."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def arch_names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get_spec(arch: str) -> ArchSpec:
    _load_builtin()
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: registered are {', '.join(_REGISTRY)}") from None


def spec_of(model: nn.Module) -> ArchSpec:
    """The spec of a built model (any of ours carries its ModelConfig as ``model.cfg``)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile'd
    return get_spec(inner.cfg.arch)


def specs() -> list[ArchSpec]:
    _load_builtin()
    return list(_REGISTRY.values())


BUILTIN = ("gpt", "bert", "gpt2", "electra", "vit", "resnet")


def _load_builtin() -> None:
    import importlib

    for name in BUILTIN:  # each spec module registers itself on import
        importlib.import_module(f"pretrain.models.{name}_spec")
