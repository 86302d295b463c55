"""Image architectures (models/vit.py, models/resnet.py) and their specs: shapes, MAE masking, patch order,
the encoder hook, FLOPs. Tiny models (16-pixel images, 4-pixel patches)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pretrain.config import Config, ModelConfig, load_config
from pretrain.models import build_model, get_spec, spec_of, transferable
from pretrain.models.resnet import forward_flops as resnet_flops
from pretrain.models.vit import ViT, sincos_2d
from pretrain.models.vit import forward_flops as vit_flops

ROOT = Path(__file__).resolve().parents[1]


def vit_cfg(**kw) -> ModelConfig:
    base = {"arch": "vit", "n_layer": 2, "n_head": 2, "d_model": 32, "image_size": 16, "channels": 3,
            "patch_size": 4, "decoder_layers": 1, "decoder_dim": 16, "decoder_heads": 2}
    return ModelConfig(**{**base, **kw})


def resnet_cfg(**kw) -> ModelConfig:
    base = {"arch": "resnet", "channels": 1, "image_size": 16, "stem_width": 8, "widths": [8, 16],
            "depths": [2, 1], "num_classes": 3}
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------- ViT


def test_vit_shapes_and_interface():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    m = build_model(vit_cfg(num_classes=5)).eval()
    assert isinstance(m, ViT) and m.feature_dim == 32 and m.n_patches == 16
    assert m.encode(x).shape == (3, 17, 32)
    assert m.features(x).shape == m.features(x, "mean").shape == (3, 32)
    h = m.encode(x)
    assert torch.allclose(m.features(x, "cls"), h[:, 0])
    assert torch.allclose(m.features(x, "mean"), h[:, 1:].mean(1))
    assert m.classify(x).shape == (3, 5)
    with pytest.raises(ValueError, match="'cls' or 'mean'"):
        m.features(x, "last")
    assert m.num_params(non_embedding=True) < m.num_params() == sum(p.numel() for p in m.parameters())
    # forward, the training entry: MAE with noise, logits without; an encoder alone gives features
    noise = torch.rand(3, 16)
    pred, mask = m(x, noise, 0.75)
    assert pred.shape == (3, 16, 4 * 4 * 3) and mask.shape == (3, 16)
    assert torch.equal(m(x), m.classify(x))
    enc = build_model(vit_cfg(decoder_layers=0)).eval()
    assert enc.decoder is None and enc.classifier is None and torch.equal(enc(x), enc.features(x))
    with pytest.raises(ValueError, match="no MAE decoder"):
        enc.mae(x)
    with pytest.raises(ValueError, match="no classification head"):
        enc.classify(x)


def test_vit_needs_a_valid_image_geometry():
    with pytest.raises(ValueError, match="resolved image_size and channels"):
        build_model(vit_cfg(image_size=0))
    with pytest.raises(ValueError, match="multiple of model.patch_size"):
        build_model(vit_cfg(image_size=18))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6, 0.9])
def test_mae_masks_exactly_and_deterministically(ratio):
    torch.manual_seed(0)
    m = build_model(vit_cfg()).eval()
    x, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    pred, mask = m.mae(x, noise, ratio)
    keep = int(16 * (1 - ratio))
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == 16 - keep).all()
    # the kept patches are those of the lowest noise
    ranks = noise.argsort(1).argsort(1)
    assert torch.equal(mask.bool(), ranks >= keep)
    pred2, mask2 = m.mae(x, noise.clone(), ratio)
    assert torch.equal(pred, pred2) and torch.equal(mask, mask2)
    # the encoder never sees a hidden patch: changing its pixels changes no prediction
    hidden = m.unpatchify(mask[..., None].expand(-1, -1, 48)).bool()
    pred3, _ = m.mae(torch.where(hidden, torch.randn_like(x), x), noise, ratio)
    assert torch.allclose(pred, pred3, atol=1e-6)
    # mask_ratio defaults to the model's
    m.mask_ratio = ratio
    assert torch.equal(m.mae(x, noise)[1], mask)


def test_mae_trains_only_what_mae_trains():
    m = build_model(vit_cfg())
    assert not m.embeddings.position_embeddings.requires_grad  # fixed sin-cos during MAE
    assert not m.decoder.decoder_pos_embed.requires_grad
    pred, mask = m.mae(torch.randn(2, 3, 16, 16), torch.rand(2, 16), 0.75)
    ((pred ** 2).mean(-1) * mask).sum().backward()
    assert m.embeddings.cls_token.grad is not None and m.decoder.mask_token.grad is not None
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert torch.allclose(m.embeddings.position_embeddings[0], sincos_2d(4, 32))
    # without a decoder (supervised; fine-tuning), the positions are learned
    assert build_model(vit_cfg(decoder_layers=0, num_classes=2)).embeddings.position_embeddings.requires_grad


def test_sincos_table_is_maes():
    """MAE's get_2d_sincos_pos_embed, written out: column (w) frequencies first, then row (h)."""
    t = sincos_2d(3, 8)
    assert t.shape == (10, 8) and torch.equal(t[0], torch.zeros(8))
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    h, w = 1, 2  # the patch at row 1, column 2: index 1 + 3 * 1 + 2
    want = torch.cat([(w * omega).sin(), (w * omega).cos(), (h * omega).sin(), (h * omega).cos()]).float()
    assert torch.allclose(t[1 + 3 * h + w], want)


def test_patchify_order_and_round_trip():
    torch.manual_seed(0)
    m = build_model(vit_cfg(channels=2, image_size=8, patch_size=4))
    x = torch.randn(2, 2, 8, 8)
    p = m.patchify(x)
    assert p.shape == (2, 4, 32)
    # patch 1 = row 0, column 1; within a patch: pixel rows, then columns, then channels
    assert torch.equal(p[:, 1], x[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(m.unpatchify(p), x)


# ------------------------------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("stem,block,side", [("small", "basic", 8), ("small", "bottleneck", 8),
                                              ("imagenet", "basic", 2), ("imagenet", "bottleneck", 2)])
def test_resnet_shapes(stem, block, side):
    torch.manual_seed(0)
    widths = [8, 16] if block == "basic" else [16, 32]
    m = build_model(resnet_cfg(stem=stem, block=block, widths=widths)).eval()
    x = torch.randn(2, 1, 16, 16)
    assert m.feature_map(x).shape == (2, widths[-1], side, side)  # small: 16, then 8; imagenet: 4, then 2
    assert m.features(x).shape == (2, widths[-1]) and m.feature_dim == widths[-1]
    assert torch.equal(m.features(x, "cls"), m.features(x, "mean"))  # global average pooling, always
    assert m.classify(x).shape == (2, 3) and torch.equal(m(x), m.classify(x))
    assert len(m.layers) == 3
    enc = build_model(resnet_cfg(stem=stem, block=block, widths=widths, num_classes=0)).eval()
    assert enc.classifier is None and enc(x).shape == (2, widths[-1])


def test_resnet_flops_match_the_known_figures():
    """ResNet-18 and -50 at 224 pixels: 1.82 and 4.09 G multiply-adds per image forward (torchvision's)."""
    for widths, depths, block, gmacs in (([64, 128, 256, 512], [2, 2, 2, 2], "basic", 1.82),
                                         ([256, 512, 1024, 2048], [3, 4, 6, 3], "bottleneck", 4.09)):
        cfg = ModelConfig(arch="resnet", channels=3, image_size=224, stem="imagenet", widths=widths,
                          depths=depths, block=block, num_classes=1000)
        with torch.device("meta"):
            m = build_model(cfg)
        assert resnet_flops(m) / 2e9 == pytest.approx(gmacs, rel=0.01)
        assert get_spec("resnet").flops_per_token(m, 0) == 3 * resnet_flops(m)


# -------------------------------------------------------------------------------------------------- specs


def test_flops_per_image():
    mae = build_model(vit_cfg())
    sup = build_model(vit_cfg(decoder_layers=0, num_classes=10))
    spec = get_spec("vit")
    f_mae, f_sup = spec.flops_per_token(mae, 0), spec.flops_per_token(sup, 0)
    assert 0 < f_mae < f_sup
    # at least 6 x the parameters the image goes through, for the supervised model (every patch)
    assert f_sup > 6 * sup.num_params(non_embedding=True)
    mae.mask_ratio = 0.5  # fewer hidden: more encoder work
    assert spec.flops_per_token(mae, 0) > f_mae and vit_flops(mae, 0.75) * 3 == f_mae


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_image_specs_describe_their_models(arch):
    spec = get_spec(arch)
    model = build_model(vit_cfg(num_classes=4) if arch == "vit" else resnet_cfg())
    assert spec_of(model) is spec and spec.modality == "images" and spec.pooling == "cls"
    assert spec.objectives == (("mae", "supervised") if arch == "vit" else ("supervised",))
    names = dict(model.named_parameters())
    blocks = spec.block_list(model)
    assert len(blocks) == 2 if arch == "vit" else len(blocks) == 3
    assert isinstance(spec.output_head(model), nn.Linear) and spec.output_head(model).out_features == 4 - (
        arch == "resnet")
    emb = [n for n in names if spec.is_embedding(n)]
    assert emb and not any(spec.is_hidden_matrix(n, names[n]) for n in emb)
    kind = nn.Linear if arch == "vit" else nn.Conv2d
    for target in spec.lora_targets:
        found = [m for b in blocks for n, m in b.named_modules() if n.split(".")[-1] == target]
        assert found and all(isinstance(m, kind) for m in found), target
    block_param = next(n for n in names if n.startswith(f"{spec.blocks}.1."))
    assert spec.layer_of(emb[0], 2) == 0 and spec.layer_of(block_param, 2) == 2
    if arch == "vit":  # the decoder's blocks are not the encoder's
        assert spec.layer_of("decoder.decoder_layers.0.mlp.fc1.weight", 2) == 2


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_encoder_hook_keeps_the_transferable_part(arch):
    torch.manual_seed(0)
    if arch == "vit":
        mcfg, objective = vit_cfg(), "mae"
    else:
        mcfg, objective = resnet_cfg(), "supervised"
    cfg = Config(objective=objective, model=mcfg)
    model = build_model(mcfg).eval()
    part, pcfg = transferable(model, cfg)
    assert pcfg.objective == objective and pcfg.model.num_classes == 0 and pcfg.model.decoder_layers == 0
    assert part.classifier is None and getattr(part, "decoder", None) is None and not part.training
    assert {k: v for k, v in model.state_dict().items() if k in part.state_dict()}.keys() == \
        part.state_dict().keys()
    x = torch.randn(2, mcfg.channels, 16, 16)
    assert torch.equal(part.features(x), model.features(x))
    rebuilt = build_model(pcfg.model)
    rebuilt.load_state_dict(part.state_dict())  # the part's config describes it
    if arch == "vit":
        assert part.embeddings.position_embeddings.requires_grad  # fine-tuning learns the positions
    # a model that is already its encoder comes back as it is
    again, _ = transferable(part, pcfg)
    assert again is part


def test_shipped_image_presets_build():
    for name, arch, objective in (("vit-mae-cpu", "vit", "mae"), ("vit-s16-mae", "vit", "mae"),
                                  ("vit-b16-mae", "vit", "mae"), ("resnet-cpu", "resnet", "supervised"),
                                  ("resnet18", "resnet", "supervised"), ("resnet50", "resnet", "supervised")):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.arch == arch and cfg.objective == objective
        mcfg = dataclasses.replace(cfg.model, image_size=cfg.model.image_size or 28, channels=3,
                                   num_classes=10 if objective == "supervised" else 0)
        with torch.device("meta"):
            m = build_model(mcfg)
        assert get_spec(arch).flops_per_token(m, 0) > 0
