"""Architectural compatibility with stock `transformers` models: the same weights give the same logits.

Our decoder must be a LlamaForCausalLM and our encoder a ModernBertForMaskedLM once names are mapped and
fused projections split (pretrain.export) — fp32, max abs difference <= 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.export import hf_config_dict, to_hf_state_dict
from pretrain.models import build_model

transformers = pytest.importorskip("transformers")


def _randomize_gains(model: torch.nn.Module) -> None:
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a mix-up would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _hf_model(cfg: ModelConfig, model: torch.nn.Module, cls_name: str, config_cls: str):
    conf = getattr(transformers, config_cls)(**{k: v for k, v in hf_config_dict(cfg).items()
                                               if k not in ("architectures", "model_type")})
    conf._attn_implementation = "eager"
    hf = getattr(transformers, cls_name)(conf).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = {"lm_head.weight", "decoder.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("kv,tie", [(0, True), (2, False)])
def test_gpt_matches_llama(kv, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", n_layer=2, n_head=4, n_kv_head=kv, d_model=64, vocab_size=97, max_seq_len=32,
                      tie_embeddings=tie, rope_theta=500.0)
    model = build_model(cfg).eval()
    _randomize_gains(model)
    hf = _hf_model(cfg, model, "LlamaForCausalLM", "LlamaConfig")
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_encoder_matches_modernbert(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", n_layer=3, n_head=4, d_model=64, vocab_size=101, max_seq_len=32,
                      tie_embeddings=tie, rope_theta=1000.0)
    model = build_model(cfg).eval()
    _randomize_gains(model)
    hf = _hf_model(cfg, model, "ModernBertForMaskedLM", "ModernBertConfig")
    x = torch.randint(5, cfg.vocab_size, (2, 24))
    mask = torch.ones_like(x)
    mask[1, 17:] = 0  # padding in the second row
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = hf(input_ids=x, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
