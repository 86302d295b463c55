"""The 'resnet' architecture (models/resnet.py) as the system sees it: trained by supervised classification;
what transfers is the network without its classifier (the ``encoder`` hook). Its features are a global
average pool whatever the pooling asked for; ``bidirectional`` (every output sees the whole image) makes the
default pooling 'cls', which it accepts.

In the Hugging Face layout a ``ResNetForImageClassification`` (``ResNetModel`` without a classifier), with
the 'imagenet' stem only: the 'small' stem has no equivalent there and does not export. Block k of our flat
``layers`` is ``resnet.encoder.stages.{i}.layers.{j}``; the classifier ``classifier.1``.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, HFMapping, StateDict, register
from pretrain.models.vit_spec import headless


def _build(cfg: ModelConfig):
    from pretrain.models.resnet import ResNet

    return ResNet(cfg)


def _encoder(model: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """The network without its classifier."""
    return headless(model, cfg, _build, num_classes=0, decoder_layers=0)


def _flops(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per image at the model's image_size (``seq_len`` does not apply): 3 x the forward's."""
    from pretrain.models.resnet import forward_flops

    return 3.0 * forward_flops(model)


# ------------------------------------------------------------------------------------ Hugging Face mapping


def _exportable(cfg: ModelConfig) -> None:
    if cfg.stem != "imagenet":
        from pretrain import PretrainError

        raise PretrainError(f"a ResNet with the {cfg.stem!r} stem has no Hugging Face equivalent "
                            "(transformers' ResNet has only the 'imagenet' stem: a 7x7 stride-2 convolution "
                            "and a max-pool), so it cannot be exported; train with model.stem imagenet to "
                            "export")


def hf_config(cfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    _exportable(cfg)
    conf: dict[str, Any] = {
        "architectures": ["ResNetForImageClassification" if cfg.num_classes > 0 else "ResNetModel"],
        "model_type": "resnet", "num_channels": cfg.channels, "embedding_size": cfg.stem_width,
        "hidden_sizes": list(cfg.widths), "depths": list(cfg.depths), "layer_type": cfg.block,
        "hidden_act": "relu", "downsample_in_first_stage": False, "downsample_in_bottleneck": False}
    if cfg.num_classes > 0:
        conf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        conf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return conf


def _blocks(cfg: ModelConfig) -> list[tuple[int, int]]:
    return [(i, j) for i, depth in enumerate(cfg.depths) for j in range(depth)]


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    _exportable(cfg)
    prefix = "resnet." if cfg.num_classes > 0 else ""
    where = _blocks(cfg)
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["classifier.1." + k.removeprefix("classifier.")] = v
        elif k.startswith("stem."):
            out[prefix + "embedder.embedder." + k.removeprefix("stem.")] = v
        else:
            m = re.match(r"^layers\.(\d+)\.(.+)$", k)
            i, j = where[int(m[1])]
            out[f"{prefix}encoder.stages.{i}.layers.{j}.{m[2]}"] = v
    return out


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    index = {ij: k for k, ij in enumerate(_blocks(cfg))}
    out: StateDict = {}
    for k, v in sd.items():
        k = k.removeprefix("resnet.")
        if k.startswith("classifier.1."):
            if cfg.num_classes > 0:
                out["classifier." + k.removeprefix("classifier.1.")] = v
        elif k.startswith("embedder.embedder."):
            out["stem." + k.removeprefix("embedder.embedder.")] = v
        elif m := re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$", k):
            out[f"layers.{index[int(m[1]), int(m[2])]}.{m[3]}"] = v
    return out


def config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    from pretrain import PretrainError

    for key, want in (("hidden_act", "relu"), ("downsample_in_first_stage", False),
                      ("downsample_in_bottleneck", False)):
        if conf.get(key, want) != want:
            raise PretrainError(f"cannot import a ResNet with {key} {conf[key]!r}: ours has {want!r}")
    arch = (conf.get("architectures") or [""])[0]
    return {"arch": "resnet", "channels": conf.get("num_channels", 3), "stem": "imagenet",
            "stem_width": conf["embedding_size"], "widths": list(conf["hidden_sizes"]),
            "depths": list(conf["depths"]), "block": conf["layer_type"],
            "num_classes": len(conf.get("id2label") or {}) if arch.endswith("ForImageClassification") else 0}


USAGE = """from PIL import Image
from transformers import pipeline
classify = pipeline('image-classification', model=PATH)
classify(Image.open('image.png'))"""

SPEC = register(ArchSpec(
    name="resnet", build=_build, objectives=("supervised",), blocks="layers", embeddings=("stem",),
    head="classifier", lora_targets=("convolution",), description="residual convolutional network",
    bidirectional=True, modality="images", channels_last=True,
    hf=HFMapping(architecture="ResNetForImageClassification", auto_class="AutoModelForImageClassification",
                 pipeline_tag="image-classification", config=hf_config, to_hf=to_hf, token_roles={},
                 model_types=("resnet",), config_from_hf=config_from_hf, from_hf=from_hf, usage=USAGE),
    encoder=_encoder, flops=_flops,
))
