"""The 'vit' architecture (models/vit.py) as the system sees it. Trained by masked autoencoding (objective
'mae', with its decoder) or supervised classification (with its classifier); what transfers is the encoder
(the ``encoder`` hook: the same architecture without decoder and classifier).

In the Hugging Face layout (the on-disk names every transformers version reads): a model with a classifier
is a ``ViTForImageClassification``, one with an MAE decoder a ``ViTMAEForPreTraining`` (the run's
image.mask_ratio and image.norm_pix_loss in its config), an encoder alone a ``ViTModel`` (its unused pooler
written as the identity). Export renames and nests names; import reads those names and transformers 5's own
(``layers.N.attention.q_proj``, ``mlp.fc1``...) alike.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn as nn

from pretrain.config import ImageConfig, ModelConfig
from pretrain.models.spec import ArchSpec, HFMapping, StateDict, register


def _build(cfg: ModelConfig):
    from pretrain.models.vit import ViT

    return ViT(cfg)


def headless(model: nn.Module, cfg: ModelConfig, build, **drop: int) -> tuple[nn.Module, ModelConfig]:
    """The model rebuilt with the ``drop`` config fields set (to 0: no classifier, no decoder), its weights
    copied, on the model's device and in its mode; the model itself when nothing changes."""
    part_cfg = dataclasses.replace(cfg, **drop)
    if part_cfg == cfg:
        return model, cfg
    part = build(part_cfg)
    sd = model.state_dict()
    part.load_state_dict({k: sd[k] for k in part.state_dict()})
    p = next(model.parameters(), None)
    return part.to(p.device if p is not None else "cpu").train(model.training), part_cfg


def _encoder(model: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """The encoder: the same ViT without its MAE decoder and classifier (position embeddings then learned:
    fine-tuning trains them, as MAE's does)."""
    return headless(model, cfg, _build, num_classes=0, decoder_layers=0)


def _flops(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per image (``seq_len`` does not apply): 3 x the forward's (models/vit.forward_flops;
    MAE: the encoder on the kept patches at the model's mask_ratio, the decoder on every patch)."""
    from pretrain.models.vit import forward_flops

    return 3.0 * forward_flops(model)


# ------------------------------------------------------------------------------------ Hugging Face mapping


def _variant(cfg: ModelConfig) -> str:
    if cfg.num_classes > 0:
        return "ViTForImageClassification"
    return "ViTMAEForPreTraining" if cfg.decoder_layers > 0 else "ViTModel"


def hf_config(cfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json of the variant the model is (see the module docstring). ``extra``: the run's image settings
    (mask_ratio, norm_pix_loss; ImageConfig's defaults when absent)."""
    from pretrain.models.vit import mlp_width

    variant = _variant(cfg)
    conf: dict[str, Any] = {
        "architectures": [variant], "model_type": "vit_mae" if variant.startswith("ViTMAE") else "vit",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": mlp_width(cfg), "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.channels, "qkv_bias": True}
    if variant == "ViTMAEForPreTraining":
        default = ImageConfig()
        conf.update({"decoder_hidden_size": cfg.decoder_dim, "decoder_num_hidden_layers": cfg.decoder_layers,
                     "decoder_num_attention_heads": cfg.decoder_heads,
                     "decoder_intermediate_size": 4 * cfg.decoder_dim,
                     "mask_ratio": float(extra.get("mask_ratio", default.mask_ratio)),
                     "norm_pix_loss": bool(extra.get("norm_pix_loss", default.norm_pix_loss))})
    else:
        conf.update({"encoder_stride": cfg.patch_size, "pooler_output_size": cfg.d_model,
                     "pooler_act": "tanh"})
    if cfg.num_classes > 0:
        conf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        conf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return conf


# block-relative names: ours → the Hugging Face (transformers 4 layout) ones
BLOCK_TO_HF = {"attention.query": "attention.attention.query", "attention.key": "attention.attention.key",
               "attention.value": "attention.attention.value", "attention.dense": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
# every name a Hugging Face file may hold for them (transformers 4's, and 5's in-memory ones) → ours
BLOCK_FROM_HF = {**{v: k for k, v in BLOCK_TO_HF.items()},
                 "attention.q_proj": "attention.query", "attention.k_proj": "attention.key",
                 "attention.v_proj": "attention.value", "attention.o_proj": "attention.dense",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^(layers\.\d+|decoder\.decoder_layers\.\d+)\.(.+)\.(weight|bias)$")


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    variant = _variant(cfg)
    prefix = "" if variant == "ViTModel" else "vit."
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("decoder.") and variant != "ViTMAEForPreTraining":
            continue
        m = _BLOCK.match(k)
        if m:
            name = f"{m[1]}.{BLOCK_TO_HF.get(m[2], m[2])}.{m[3]}"
            k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", name)
        if k.startswith(("decoder.", "classifier.")):
            out[k] = v
        else:
            out[prefix + k] = v
    if variant == "ViTModel":  # its pooler (dense + tanh, unused by us): the identity, not a random init
        out["pooler.dense.weight"] = torch.eye(cfg.d_model)
        out["pooler.dense.bias"] = torch.zeros(cfg.d_model)
    return out


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        k = k.removeprefix("vit.")
        k = re.sub(r"^encoder\.layer\.(\d+)\.", r"layers.\1.", k)
        # transformers 5 writes the decoder's blocks as decoder.decoder_encoder.layer.N
        k = re.sub(r"^decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1.", k)
        m = _BLOCK.match(k)
        if m:
            k = f"{m[1]}.{BLOCK_FROM_HF.get(m[2], m[2])}.{m[3]}"
        if (k.startswith("pooler.") or (k.startswith("classifier.") and cfg.num_classes == 0)
                or (k.startswith("decoder.") and cfg.decoder_layers == 0)):
            continue
        out[k] = v
    return out


def _size(value: Any, name: str) -> int:
    """An image or patch size: an int or a square [s, s]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            from pretrain import PretrainError

            raise PretrainError(f"config.json's {name} {value} is not square: only square images import")
        value = value[0]
    return int(value)


def config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    from pretrain import PretrainError

    if conf.get("hidden_act", "gelu") != "gelu":
        raise PretrainError(f"cannot import a ViT with hidden_act {conf['hidden_act']!r}: only 'gelu' "
                            "(exact)")
    if not conf.get("qkv_bias", True):
        raise PretrainError("cannot import a ViT without query/key/value biases (qkv_bias false)")
    arch = (conf.get("architectures") or [""])[0]
    section: dict[str, Any] = {
        "arch": "vit", "d_model": conf["hidden_size"], "n_layer": conf["num_hidden_layers"],
        "n_head": conf["num_attention_heads"], "d_ff": conf["intermediate_size"],
        "norm_eps": conf.get("layer_norm_eps", 1e-12), "init_std": conf.get("initializer_range", 0.02),
        "dropout": conf.get("hidden_dropout_prob", 0.0),
        "image_size": _size(conf["image_size"], "image_size"),
        "patch_size": _size(conf["patch_size"], "patch_size"), "channels": conf.get("num_channels", 3),
        "num_classes": len(conf.get("id2label") or {}) if arch.endswith("ForImageClassification") else 0,
        "decoder_layers": 0}
    if conf.get("model_type") == "vit_mae" and arch != "ViTMAEModel":
        dd = conf["decoder_hidden_size"]
        if conf["decoder_intermediate_size"] != 4 * dd:
            raise PretrainError(f"cannot import a ViTMAE decoder with decoder_intermediate_size "
                                f"{conf['decoder_intermediate_size']}: ours is 4 x decoder_hidden_size "
                                f"({4 * dd})")
        section.update({"decoder_layers": conf["decoder_num_hidden_layers"], "decoder_dim": dd,
                        "decoder_heads": conf["decoder_num_attention_heads"]})
    return section


MAE_USAGE = """from PIL import Image
from transformers import AutoImageProcessor, AutoModel
processor = AutoImageProcessor.from_pretrained(PATH)
encoder = AutoModel.from_pretrained(PATH, mask_ratio=0.0)  # the ViTMAEModel encoder, no patch hidden
inputs = processor(Image.open('image.png'), return_tensors='pt')
features = encoder(**inputs).last_hidden_state[:, 0]  # [CLS] after the final LayerNorm
# the whole masked autoencoder: AutoModelForPreTraining.from_pretrained(PATH)"""

SPEC = register(ArchSpec(
    name="vit", build=_build, objectives=("mae", "supervised"), blocks="layers", embeddings=("embeddings",),
    head="classifier", lora_targets=("query", "key", "value", "dense", "fc1", "fc2"),
    description="vision transformer", bidirectional=True, modality="images",
    hf=HFMapping(architecture="ViTMAEForPreTraining", auto_class="AutoModelForPreTraining",
                 pipeline_tag="image-feature-extraction", config=hf_config, to_hf=to_hf, token_roles={},
                 model_types=("vit", "vit_mae"), config_from_hf=config_from_hf, from_hf=from_hf,
                 usage=MAE_USAGE),
    encoder=_encoder, flops=_flops,
))
