"""The 'bert' architecture (models/bert.py) as the system sees it; in the Hugging Face layout a ModernBERT
with global attention in every layer (``ModernBertForMaskedLM``): parameter names differ only in prefixes."""

from __future__ import annotations

from typing import Any

from pretrain.config import ModelConfig
from pretrain.models.spec import ArchSpec, HFMapping, HFTask, StateDict, register


def _build(cfg: ModelConfig):
    from pretrain.models.bert import Encoder

    return Encoder(cfg)


def hf_config(cfg: ModelConfig, special: dict[str, int | None]) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
            "hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": cfg.norm_eps,
            "norm_bias": False, "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
            "decoder_bias": True, "global_attn_every_n_layers": 1, "local_attention": cfg.max_seq_len,
            "layer_types": ["full_attention"] * cfg.n_layer, "global_rope_theta": cfg.rope_theta,
            "local_rope_theta": cfg.rope_theta,
            "rope_parameters": {"full_attention": rope, "sliding_attention": rope},
            "embedding_dropout": 0.0, "attention_dropout": 0.0, "mlp_dropout": 0.0,
            "pad_token_id": special.get("pad_id"), "cls_token_id": special.get("cls_id"),
            "sep_token_id": special.get("eot_id"), "mask_token_id": special.get("mask_id"),
            # as ModernBERT's own configs: bos = [CLS], eos = [SEP] (else transformers fills in ids
            # 50281/50282, outside a small vocabulary)
            "bos_token_id": special.get("cls_id"), "eos_token_id": special.get("eot_id")}


RENAME = {"tok_embeddings.weight": "model.embeddings.tok_embeddings.weight",
          "emb_norm.weight": "model.embeddings.norm.weight",
          "final_norm.weight": "model.final_norm.weight",
          "head_dense.weight": "head.dense.weight", "head_norm.weight": "head.norm.weight",
          "decoder.bias": "decoder.bias"}


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        if k in RENAME:
            out[RENAME[k]] = v
        elif k == "decoder.weight":
            if not cfg.tie_embeddings:
                out[k] = v
        else:
            out["model." + k] = v
    return out


# ModernBERT's task classes: the base model and its prediction-head transform, then `classifier`
_HEAD: dict[str, Any] = dict(base=(("model.", "model."), ("head.", "head.")), head="classifier",
                             head_features=True,
                             config=(("classifier_dropout", 0.0), ("classifier_activation", "gelu"),
                                     ("classifier_bias", False)))
# ModernBertForSequenceClassification pools [CLS] or the mean over the attention mask (before its head)
_POOLING = (("cls", (("classifier_pooling", "cls"),)), ("mean", (("classifier_pooling", "mean"),)))

SPEC = register(ArchSpec(
    name="bert", build=_build, objectives=("mlm",), blocks="layers",
    embeddings=("tok_embeddings", "emb_norm"), head="decoder", lora_targets=("Wqkv", "Wo", "Wi"),
    description="masked-language-model encoder", bidirectional=True, doc_mask=True,
    hf=HFMapping(architecture="ModernBertForMaskedLM", auto_class="AutoModelForMaskedLM",
                 pipeline_tag="fill-mask",
                 config=hf_config, to_hf=to_hf,
                 token_roles={"eos_token": "eot_id", "unk_token": "unk_id", "pad_token": "pad_id",
                              "cls_token": "cls_id", "mask_token": "mask_id", "sep_token": "eot_id"},
                 usage="from transformers import pipeline\nfill = pipeline('fill-mask', model=PATH)",
                 # ModernBERT's task heads take the hidden states through the prediction-head transform
                 # (head.dense → GELU → head.norm: our head_dense / head_norm) before their classifier
                 tasks=(HFTask("qa", "ModernBertForQuestionAnswering", **_HEAD),
                        HFTask("classification", "ModernBertForSequenceClassification", **_HEAD,
                               pooling=_POOLING),
                        HFTask("regression", "ModernBertForSequenceClassification", **_HEAD,
                               pooling=_POOLING),
                        HFTask("token", "ModernBertForTokenClassification", **_HEAD))),
))
