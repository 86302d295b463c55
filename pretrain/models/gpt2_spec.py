"""The 'gpt2' architecture (models/gpt2.py) as the system sees it; in the Hugging Face layout
``GPT2LMHeadModel``, whose Conv1D weights are stored transposed."""

from __future__ import annotations

from typing import Any

from pretrain.config import ModelConfig
from pretrain.models.gpt_spec import DECODER_ROLES, DECODER_USAGE
from pretrain.models.spec import ArchSpec, HFMapping, HFTask, StateDict, register

CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # Linear (out, in) here, Conv1D (in, out) there


def _build(cfg: ModelConfig):
    from pretrain.models.gpt2 import GPT2

    return GPT2(cfg)


def hf_config(cfg: ModelConfig, special: dict[str, int | None]) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_positions": cfg.max_seq_len, "n_inner": cfg.d_ff or 4 * cfg.d_model,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
            "bos_token_id": special.get("eot_id"), "eos_token_id": special.get("eot_id")}


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[k] = v
            continue
        out["transformer." + k] = v.t() if k.endswith(CONV1D) else v
    return out


def config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    from pretrain import PretrainError

    arch = (conf.get("architectures") or [conf.get("model_type", "?")])[0]
    if conf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise PretrainError(f"cannot import {arch}: activation {conf.get('activation_function')!r}")
    if conf.get("scale_attn_by_inverse_layer_idx") or conf.get("reorder_and_upcast_attn"):
        raise PretrainError(f"cannot import {arch}: scale_attn_by_inverse_layer_idx / "
                            "reorder_and_upcast_attn")
    return {"arch": "gpt2", "n_layer": conf["n_layer"], "n_head": conf["n_head"], "d_model": conf["n_embd"],
            "d_ff": conf.get("n_inner") or 4 * conf["n_embd"], "vocab_size": conf["vocab_size"],
            "max_seq_len": conf["n_positions"], "norm_eps": conf.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", True)), "dropout": 0.0}


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Strip ``transformer.``, transpose the Conv1D weights, drop the causal-mask buffers."""
    out: StateDict = {}
    for k, v in sd.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        out[k] = v.t() if k.endswith(CONV1D) else v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


SPEC = register(ArchSpec(
    name="gpt2", build=_build, objectives=("clm",), blocks="h", embeddings=("wte", "wpe"), head="lm_head",
    lora_targets=("c_attn", "c_proj", "c_fc"), description="decoder-only language model",
    learned_positions=True,
    hf=HFMapping(architecture="GPT2LMHeadModel", auto_class="AutoModelForCausalLM",
                 pipeline_tag="text-generation", config=hf_config, to_hf=to_hf, token_roles=DECODER_ROLES,
                 model_types=("gpt2",),
                 config_from_hf=config_from_hf, from_hf=from_hf, usage=DECODER_USAGE,
                 tasks=(HFTask("qa", "GPT2ForQuestionAnswering", base=(("transformer.", "transformer."),),
                               head="qa_outputs"),
                        # the last token that is not the pad token, through `score` (no bias)
                        *(HFTask(t, "GPT2ForSequenceClassification", base=(("transformer.", "transformer."),),
                                 head="score", head_bias=False, pooling=(("last", ()),), pad_pooled=True)
                          for t in ("classification", "regression")),
                        HFTask("token", "GPT2ForTokenClassification",
                               base=(("transformer.", "transformer."),), head="classifier",
                               config=(("classifier_dropout", 0.0),)))),
))
