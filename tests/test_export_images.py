"""Image models in the Hugging Face layout: an export loads with the Auto classes and AutoImageProcessor
(no custom code) and gives our logits (fp32, max abs difference <= 1e-4): ViTMAEForPreTraining (the same
noise: the same mask and reconstructions), ViTForImageClassification, ViTModel, ResNetForImageClassification
(basic and bottleneck blocks) and ResNetModel; transformers' own folders import back to the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pretrain import PretrainError
from pretrain.config import Config, DataConfig, ImageConfig, ModelConfig
from pretrain.export import export_model, load_hf
from pretrain.models import build_model
from pretrain.models.vit import sincos_2d

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

TOL = 1e-4


def _perturb(model: torch.nn.Module, channels: int = 0, size: int = 0) -> torch.nn.Module:
    """Gains, biases, tokens and position tables moved off their initial values (so a mix-up shows), and
    BatchNorm statistics gathered (on images of ``channels`` x ``size`` x ``size``, by default the model
    config's): the model in eval mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "token" in name or "pos" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            model.train()
            channels, size = channels or model.cfg.channels, size or model.cfg.image_size
            model(torch.randn(8, channels, size, size, generator=g))
    return model.eval()


def vit_cfg(**kw) -> ModelConfig:
    base = {"arch": "vit", "n_layer": 2, "n_head": 2, "d_model": 32, "image_size": 16, "channels": 3,
            "patch_size": 4, "decoder_layers": 2, "decoder_dim": 16, "decoder_heads": 2, "norm_eps": 1e-6,
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    return ModelConfig(**{**base, **kw})


def resnet_cfg(block: str, **kw) -> ModelConfig:
    widths = [8, 16, 32] if block == "basic" else [16, 32, 64]
    base = {"arch": "resnet", "channels": 3, "image_size": 32, "stem": "imagenet", "stem_width": 8,
            "widths": widths, "depths": [2, 1, 2], "block": block, "num_classes": 4,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return ModelConfig(**{**base, **kw})


def _export(model, tmp_path, objective, name="hf", **kw):
    out = tmp_path / name
    res = export_model(model, Config(objective=objective, model=model.cfg, **kw), out)
    return out, res


def _loaded(auto: str, path, unused: str = "", **kw):
    """The Auto class's model from ``path``; every weight loaded and none missing (but those under the prefix
    ``unused``, which this class has no place for)."""
    hf, info = getattr(transformers, auto).from_pretrained(path, output_loading_info=True, **kw)
    info["unexpected_keys"] = {k for k in info["unexpected_keys"] if not (unused and k.startswith(unused))}
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


# --------------------------------------------------------------------------------------------------- ViT


def test_vit_mae_exports_as_vitmae_for_pretraining(tmp_path):
    torch.manual_seed(0)
    model = _perturb(build_model(vit_cfg()))
    out, res = _export(model, tmp_path, "mae", image=ImageConfig(mask_ratio=0.6, norm_pix_loss=False))
    assert res["architecture"] == "ViTMAEForPreTraining" and res["auto_class"] == "AutoModelForPreTraining"
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    conf = json.loads((out / "config.json").read_text())
    assert conf["mask_ratio"] == 0.6 and conf["norm_pix_loss"] is False and conf["layer_norm_eps"] == 1e-6
    hf = _loaded("AutoModelForPreTraining", out)
    assert type(hf).__name__ == "ViTMAEForPreTraining"
    x, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        theirs = hf(pixel_values=x, noise=noise)
        pred, mask = model.mae(x, noise, 0.6)
    assert torch.equal(theirs.mask, mask)
    assert (theirs.logits - pred).abs().max().item() <= TOL
    assert torch.equal(hf.patchify(x), model.patchify(x)) and torch.equal(hf.unpatchify(model.patchify(x)), x)
    # the card's recipe for features: the ViTMAEModel encoder with nothing hidden → our [CLS] features
    encoder = _loaded("AutoModel", out, unused="decoder.", mask_ratio=0.0)
    with torch.no_grad():
        cls = encoder(pixel_values=x).last_hidden_state[:, 0]
    assert (cls - model.features(x)).abs().max().item() <= TOL
    card = (out / "README.md").read_text()
    assert "pre-trained with `pretrain`" in card and "pipeline_tag: image-feature-extraction" in card
    assert "mask_ratio=0.0" in card


def test_vit_sincos_positions_are_transformers_own():
    """ViTMAE's own initialisation of its fixed tables (computed by its embedding and decoder modules)."""
    from transformers.models.vit_mae import modeling_vit_mae as mae

    conf = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=16, patch_size=4,
                                     decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                     decoder_num_attention_heads=2,
                                     decoder_intermediate_size=64)
    emb = mae.ViTMAEEmbeddings(conf)
    emb.initialize_weights()
    dec = mae.ViTMAEDecoder(conf, num_patches=16)
    ours = build_model(vit_cfg())
    assert torch.allclose(emb.position_embeddings[0], sincos_2d(4, 32), atol=1e-6)
    assert torch.allclose(dec.decoder_pos_embed[0], sincos_2d(4, 16), atol=1e-6)
    assert torch.equal(ours.embeddings.position_embeddings[0], sincos_2d(4, 32))
    assert torch.equal(ours.decoder.decoder_pos_embed[0], sincos_2d(4, 16))


def test_grayscale_vit_classifier_exports_with_its_labels(tmp_path):
    """channels 1: AutoImageProcessor gives (B, 1, H, W) from grayscale images, normalised as we do; the class
    names come from the prepared data's meta.json; the pipeline runs as the card says."""
    torch.manual_seed(0)
    data = tmp_path / "data"
    data.mkdir()
    names = ["zero", "one", "two", "three", "four"]
    (data / "meta.json").write_text(json.dumps({"classes": names}))
    cfg = vit_cfg(channels=1, decoder_layers=0, num_classes=5, image_mean=[0.13], image_std=[0.31])
    model = _perturb(build_model(cfg))
    out, res = _export(model, tmp_path, "supervised", data=DataConfig(path=str(data)))
    assert res["architecture"] == "ViTForImageClassification"
    assert res["auto_class"] == "AutoModelForImageClassification"
    hf = _loaded("AutoModelForImageClassification", out)
    assert hf.config.id2label == dict(enumerate(names))
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L") for _ in range(3)]
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 1, 16, 16)
    want = (torch.tensor(np.stack([np.asarray(i) for i in images]))[:, None].float() / 255 - 0.13) / 0.31
    assert (pixels - want).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (hf(pixel_values=pixels).logits - model.classify(pixels)).abs().max().item() <= TOL
    # the pipeline opens images as RGB: a grayscale model takes (H, W, 1) arrays, as the card shows
    top = transformers.pipeline("image-classification", model=str(out))(np.asarray(images[0])[..., None],
                                                                       top_k=5)
    probs = model.classify(pixels[:1]).softmax(-1)[0]
    assert {r["label"]: r["score"] for r in top} == pytest.approx({n: p.item() for n, p in zip(names, probs)},
                                                                  abs=1e-4)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "convert('L'))[..., None]" in card


def test_vit_encoder_exports_as_vitmodel_and_rgb_processing(tmp_path):
    torch.manual_seed(0)
    model = _perturb(build_model(vit_cfg(decoder_layers=0)))
    out, res = _export(model, tmp_path, "supervised")
    assert res["architecture"] == "ViTModel" and res["auto_class"] == "AutoModel"
    hf = _loaded("AutoModel", out)
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    gray = Image.fromarray(np.full((20, 20), 100, dtype=np.uint8), "L")  # converted to RGB, resized to 16
    pixels = proc(gray, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    want = (100 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    assert torch.allclose(pixels[0, :, 5, 5], want, atol=1e-5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (hf(pixel_values=x).last_hidden_state - model.encode(x)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_exports_as_resnet_for_image_classification(block, tmp_path):
    torch.manual_seed(0)
    model = _perturb(build_model(resnet_cfg(block)))
    out, res = _export(model, tmp_path, "supervised")
    assert res["architecture"] == "ResNetForImageClassification"
    hf = _loaded("AutoModelForImageClassification", out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model.classify(x)).abs().max().item() <= TOL
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and pre["image_mean"] == [0.485, 0.456, 0.406]
    # bf16 weights; BatchNorm's batch counts stay integers
    export_model(model, Config(objective="supervised", model=model.cfg), tmp_path / "bf16", dtype="bf16")
    sd = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for k, v in sd.items() if not k.endswith("num_batches_tracked")} == {torch.bfloat16}
    assert {v.dtype for k, v in sd.items() if k.endswith("num_batches_tracked")} == {torch.int64}
    half = _loaded("AutoModelForImageClassification", tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        assert (half(pixel_values=x).logits - model.classify(x)).abs().max().item() < 0.1
    # the network without its classifier: a ResNetModel whose pooled output is our features
    enc = _perturb(build_model(resnet_cfg(block, num_classes=0)))
    out, res = _export(enc, tmp_path, "supervised", name="enc")
    assert res["architecture"] == "ResNetModel"
    base = _loaded("AutoModel", out)
    with torch.no_grad():
        assert (base(pixel_values=x).pooler_output.flatten(1) - enc.features(x)).abs().max().item() <= TOL


def test_resnet_small_stem_export_is_refused(tmp_path):
    model = build_model(resnet_cfg("basic", stem="small"))
    with pytest.raises(PretrainError, match="'small' stem has no Hugging Face equivalent") as e:
        _export(model, tmp_path, "supervised")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- import


def _same_logits(section, sd, hf, x, **kw):
    ours = build_model(ModelConfig(**section)).eval()
    ours.load_state_dict(sd)  # strict: every tensor, and no other
    with torch.no_grad():
        theirs = hf(pixel_values=x, **kw)
        if "noise" in kw:
            pred, mask = ours.mae(x, kw["noise"], hf.config.mask_ratio)
            assert torch.equal(mask, theirs.mask)
            return (pred - theirs.logits).abs().max().item()
        return (ours(x) - theirs.logits).abs().max().item()


def test_transformers_folders_import(tmp_path):
    """Folders saved by transformers itself (its own names) → load_hf → our model with the same logits; the
    image processor's normalisation comes along."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    mae = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=16,
        patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, mask_ratio=0.5)).eval()
    _perturb(mae)
    mae.save_pretrained(tmp_path / "mae")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3],
                                   image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "mae")
    section, sd = load_hf(tmp_path / "mae")
    assert section["decoder_layers"] == 2 and section["d_ff"] == 48 and section["num_classes"] == 0
    assert section["image_mean"] == [0.1, 0.2, 0.3] and section["image_std"] == [0.4, 0.5, 0.6]
    assert _same_logits(section, sd, mae, x, noise=torch.rand(2, 16)) <= TOL

    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3)).eval()
    _perturb(vit)
    vit.save_pretrained(tmp_path / "vit")
    section, sd = load_hf(tmp_path / "vit")
    assert section["num_classes"] == 3 and section["decoder_layers"] == 0 and "image_mean" not in section
    assert _same_logits(section, sd, vit, x) <= TOL

    x = torch.randn(2, 3, 32, 32)
    for block, widths in (("basic", [8, 16]), ("bottleneck", [16, 32])):
        res = transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=widths, depths=[2, 2], layer_type=block, num_labels=4))
        _perturb(res, 3, 32)
        res.save_pretrained(tmp_path / block)
        section, sd = load_hf(tmp_path / block)
        assert section["stem"] == "imagenet" and section["block"] == block and section["num_classes"] == 4
        assert _same_logits(section, sd, res, x) <= TOL


def test_export_import_round_trip(tmp_path):
    """Our export read back by load_hf: the same config and every tensor equal; exporting again over it is
    allowed (an earlier export, unedited)."""
    for model, objective in ((build_model(vit_cfg()), "mae"),
                             (build_model(vit_cfg(decoder_layers=0, num_classes=3)), "supervised"),
                             (build_model(resnet_cfg("bottleneck")), "supervised")):
        model = _perturb(model)
        out, _ = _export(model, tmp_path, objective, name=model.cfg.arch)
        section, sd = load_hf(out)
        back = build_model(ModelConfig(**section))
        back.load_state_dict(sd)
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        for key in ("image_size", "channels", "image_mean", "image_std", "num_classes", "decoder_layers"):
            assert getattr(back.cfg, key) == pytest.approx(getattr(model.cfg, key)), key
        export_model(model, Config(objective=objective, model=model.cfg), out)


def test_an_import_that_does_not_fit_is_refused(tmp_path):
    conf = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=16, patch_size=4,
                                     decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                     decoder_num_attention_heads=2,
                                     decoder_intermediate_size=48)
    transformers.ViTMAEForPreTraining(conf).save_pretrained(tmp_path / "mae")
    with pytest.raises(PretrainError, match="decoder_intermediate_size 48"):
        load_hf(tmp_path / "mae")
    conf = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1],
                                     downsample_in_bottleneck=True)
    transformers.ResNetModel(conf).save_pretrained(tmp_path / "res")
    with pytest.raises(PretrainError, match="downsample_in_bottleneck"):
        load_hf(tmp_path / "res")
