"""The 'gpt' architecture (models/gpt.py) as the system sees it; in the Hugging Face layout a Llama
(``LlamaForCausalLM``): the same blocks, with our fused q/k/v and gate/up projections split."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, HFMapping, HFTask, StateDict, register


def _build(cfg: ModelConfig):
    from pretrain.models.gpt import GPT

    return GPT(cfg)


def hf_config(cfg: ModelConfig, special: dict[str, int | None]) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "bos_token_id": special.get("eot_id"), "eos_token_id": special.get("eot_id")}


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    nq, nkv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out: StateDict = {}
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
    return out


def config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    """A Llama-architecture config.json (Mistral without a sliding window too) → our model section."""
    from pretrain import PretrainError

    arch = (conf.get("architectures") or [conf.get("model_type", "?")])[0]
    if conf.get("sliding_window"):
        raise PretrainError(f"cannot import {arch}: sliding-window attention is not supported")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if conf.get(key, ok) != ok:
            raise PretrainError(f"cannot import {arch}: {key}={conf.get(key)!r} is not supported "
                                f"(needs {ok!r})")
    rope = conf.get("rope_scaling") or {}
    if (conf.get("rope_parameters") or {}).get("rope_type", "default") != "default" or rope:
        raise PretrainError(f"cannot import {arch}: scaled rotary embeddings "
                            f"({rope or conf['rope_parameters']}) are not supported")
    theta = (conf.get("rope_parameters") or {}).get("rope_theta", conf.get("rope_theta", 10000.0))
    hd = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    if hd * conf["num_attention_heads"] != conf["hidden_size"]:
        raise PretrainError(f"cannot import {arch}: head_dim {hd} x heads != hidden_size")
    return {"arch": "gpt", "n_layer": conf["num_hidden_layers"], "n_head": conf["num_attention_heads"],
            "n_kv_head": conf.get("num_key_value_heads") or conf["num_attention_heads"],
            "d_model": conf["hidden_size"], "d_ff": conf["intermediate_size"],
            "vocab_size": conf["vocab_size"], "max_seq_len": conf.get("max_position_embeddings", 2048),
            "rope_theta": float(theta),
            "norm_eps": conf.get("rms_norm_eps", 1e-6),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", False)), "dropout": 0.0}


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Fuse q/k/v and gate/up, strip the ``model.`` prefix."""
    from pretrain import PretrainError

    sd, out = dict(sd), {}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        try:
            out[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
            out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [sd.pop(p + "mlp.gate_proj.weight"), sd.pop(p + "mlp.up_proj.weight")], dim=0)
        except KeyError as e:
            raise PretrainError(f"the checkpoint has no tensor {e.args[0]}: not a Llama-layout "
                                "checkpoint") from None
    for k, v in sd.items():
        if k.startswith("model."):
            out[k[len("model."):]] = v
        elif k == "lm_head.weight":
            out[k] = v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


DECODER_ROLES = {"eos_token": "eot_id", "bos_token": "eot_id", "unk_token": "unk_id", "pad_token": "pad_id",
                 "cls_token": "cls_id", "mask_token": "mask_id"}
DECODER_USAGE = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "tok = AutoTokenizer.from_pretrained(PATH)\n"
                 "model = AutoModelForCausalLM.from_pretrained(PATH)")

SPEC = register(ArchSpec(
    name="gpt", build=_build, objectives=("clm",), blocks="layers", embeddings=("embed_tokens",),
    head="lm_head", lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    description="decoder-only language model", doc_mask=True,
    hf=HFMapping(architecture="LlamaForCausalLM", auto_class="AutoModelForCausalLM",
                 pipeline_tag="text-generation", config=hf_config, to_hf=to_hf, token_roles=DECODER_ROLES,
                 model_types=("llama", "mistral"),
                 config_from_hf=config_from_hf, from_hf=from_hf, usage=DECODER_USAGE,
                 # (LlamaForQuestionAnswering keeps its base model under `transformer.`, as old versions did)
                 tasks=(HFTask("qa", "LlamaForQuestionAnswering", base=(("model.", "transformer."),),
                               head="qa_outputs"),
                        # the last token that is not the pad token, through `score` (no bias)
                        *(HFTask(t, "LlamaForSequenceClassification", base=(("model.", "model."),),
                                 head="score", head_bias=False, pooling=(("last", ()),), pad_pooled=True)
                          for t in ("classification", "regression")),
                        HFTask("token", "LlamaForTokenClassification", base=(("model.", "model."),),
                               head="score", config=(("classifier_dropout", 0.0),)))),
))
