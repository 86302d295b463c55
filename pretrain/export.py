"""Hugging Face layout: map our models onto stock `transformers` architectures.

The decoder (`models/gpt.py`) is a Llama (``LlamaForCausalLM``); the encoder (`models/bert.py`) is a
ModernBERT with global attention in every layer (``ModernBertForMaskedLM``). The only differences are
names and our fused projections (q/k/v and gate/up), which are split here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pretrain.config import ModelConfig


def hf_config_dict(cfg: ModelConfig, special: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The config.json of the equivalent `transformers` model."""
    special = special or {}
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std}
    if cfg.arch == "gpt":
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                "bos_token_id": special.get("eot_id"), "eos_token_id": special.get("eot_id")}
    if cfg.arch == "bert":
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        return {**common, "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
                "hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": cfg.norm_eps,
                "norm_bias": False, "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
                "decoder_bias": True, "global_attn_every_n_layers": 1, "local_attention": cfg.max_seq_len,
                "layer_types": ["full_attention"] * cfg.n_layer, "global_rope_theta": cfg.rope_theta,
                "local_rope_theta": cfg.rope_theta,
                "rope_parameters": {"full_attention": rope, "sliding_attention": rope},
                "embedding_dropout": 0.0, "attention_dropout": 0.0, "mlp_dropout": 0.0,
                "pad_token_id": special.get("pad_id"), "cls_token_id": special.get("cls_id"),
                "sep_token_id": special.get("eot_id"), "mask_token_id": special.get("mask_id")}
    raise ValueError(f"no Hugging Face mapping for arch {cfg.arch!r}")


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the `transformers` names (fused projections split); tied weights once."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt":
        nq, nkv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        for k, v in sd.items():
            if k.endswith("qkv_proj.weight"):
                base = "model." + k[: -len("qkv_proj.weight")]
                q, kk, vv = v.split([nq, nkv, nkv], dim=0)
                out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = q, kk, vv
            elif k.endswith("gate_up_proj.weight"):
                base = "model." + k[: -len("gate_up_proj.weight")]
                out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = v.chunk(2, dim=0)
            elif k == "lm_head.weight":
                if not cfg.tie_embeddings:
                    out[k] = v
            else:
                out["model." + k] = v
        return {k: v.contiguous() for k, v in out.items()}
    if cfg.arch == "bert":
        rename = {"tok_embeddings.weight": "model.embeddings.tok_embeddings.weight",
                  "emb_norm.weight": "model.embeddings.norm.weight",
                  "final_norm.weight": "model.final_norm.weight",
                  "head_dense.weight": "head.dense.weight", "head_norm.weight": "head.norm.weight",
                  "decoder.bias": "decoder.bias"}
        for k, v in sd.items():
            if k in rename:
                out[rename[k]] = v
            elif k == "decoder.weight":
                if not cfg.tie_embeddings:
                    out[k] = v
            else:
                out["model." + k] = v
        return {k: v.contiguous() for k, v in out.items()}
    raise ValueError(f"no Hugging Face mapping for arch {cfg.arch!r}")
