"""Hugging Face layout: map our models onto stock `transformers` architectures.

The decoder (`models/gpt.py`) is a Llama (``LlamaForCausalLM``); the encoder (`models/bert.py`) is a
ModernBERT with global attention in every layer (``ModernBertForMaskedLM``). The only differences are
names and our fused projections (q/k/v and gate/up), which are split here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pretrain.config import ModelConfig

EXPORT_FILES = ("generation_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "README.md")

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
                "sep_token_id": special.get("eot_id"), "mask_token_id": special.get("mask_id"),
                # as ModernBERT's own configs: bos = [CLS], eos = [SEP] (else transformers fills in ids
                # 50281/50282, outside a small vocabulary)
                "bos_token_id": special.get("cls_id"), "eos_token_id": special.get("eot_id")}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.max_seq_len,
                "n_inner": cfg.d_ff or 4 * cfg.d_model, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
                "bos_token_id": special.get("eot_id"), "eos_token_id": special.get("eot_id")}
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
    if cfg.arch == "gpt2":
        for k, v in sd.items():
            if k == "lm_head.weight":
                if not cfg.tie_embeddings:
                    out[k] = v
                continue
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                v = v.t()  # Linear (out, in) → Conv1D (in, out)
            out["transformer." + k] = v
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


def export_hf(run: str | Path, out: str | Path, dtype: str = "fp32", max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False) -> dict[str, Any]:
    """Write a run's newest checkpoint in the Hugging Face layout: config.json, model.safetensors (sharded
    with an index above ``max_shard_bytes``), generation_config.json (decoders), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and a model card (README.md). Loadable with
    ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` and ``AutoTokenizer`` without custom code."""
    from safetensors.torch import save_file

    from pretrain import PretrainError
    from pretrain.checkpoint import load_pretrained, resolve_checkpoint

    if dtype not in ("fp32", "bf16"):
        raise PretrainError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PretrainError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    model, cfg, tok, meta = load_pretrained(run, "cpu")
    ckpt = resolve_checkpoint(run)
    # written whole into a temporary folder, then moved into place: beside a new OUT (one rename), inside an
    # existing one (a folder the user made, maybe a mount point or a symlink: it stays as it is)
    fresh = not out.exists()
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = (out.parent / f".{out.name}.export-{os.getpid()}") if fresh else out / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        sd = {k: v.to(torch_dtype).contiguous() for k, v in to_hf_state_dict(model).items()}

        # weights, sharded above the threshold
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            weight_files = ["model.safetensors"]
        else:
            weight_files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": {k: name for name, shard in zip(weight_files, shards) for k in shard}}
            for name, shard in zip(weight_files, shards):
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        special = {"eot_id": tok.eot_id, "pad_id": tok.pad_id, "cls_id": tok.cls_id, "mask_id": tok.mask_id}
        config = {**hf_config_dict(cfg.model, special), "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if cfg.model.arch in ("gpt", "gpt2"):
            gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "do_sample": True, "temperature": 0.8,
                   "top_k": 50, "max_length": cfg.model.max_seq_len}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))

        # tokenizer
        tok.save(tmp / "tokenizer.json")
        names = {}
        arch = cfg.model.arch
        for key, tid in (("eos_token", tok.eot_id), ("bos_token", tok.eot_id if arch != "bert" else None),
                         ("unk_token", tok.unk_id), ("pad_token", tok.pad_id), ("cls_token", tok.cls_id),
                         ("mask_token", tok.mask_id), ("sep_token", tok.eot_id if arch == "bert" else None)):
            if tid is not None:
                names[key] = tok.tk.id_to_token(tid)
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.max_seq_len,
                   "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **names}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
        (tmp / "README.md").write_text(_model_card(cfg.model, model, meta, ckpt, config))
        if fresh:
            os.replace(tmp, out)
        else:
            _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "architecture": config["architectures"][0], "weights": weight_files,
            "dtype": dtype, "step": meta["step"], "n_params": model.num_params()}


def _source_name(s: dict[str, Any]) -> str:
    """A file source's file name, or a Hub source's ``hf:NAME[:CONFIG]``."""
    if s.get("path"):
        return Path(s["path"]).name
    return "hf:" + str(s.get("name", "?")) + (f":{s['config']}" if s.get("config") else "")


def _short_sha(sha: str | list[str] | None) -> str:
    """The first 12 hex digits; a Hub source built from local files has one hash per file."""
    shas = sha if isinstance(sha, list) else [sha] if sha else []
    return ", ".join(f"`{h[:12]}`" for h in shas[:3]) + (" …" if len(shas) > 3 else "") if shas else "—"


def _move_into(tmp: Path, out: Path) -> None:
    """Swap the finished export in ``tmp`` (a folder inside ``out``) for the files of an earlier export in
    ``out`` (weight shards, configs, tokenizer, model card); other files stay. Should a move fail, the
    earlier export is put back."""
    old = out / f".export-old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    stale = [p for p in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json"),
                         *(out / n for n in EXPORT_FILES)] if p.is_file()]
    moved: list[Path] = []
    placed: list[Path] = []
    try:
        for p in stale:
            os.replace(p, old / p.name)
            moved.append(p)
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
            placed.append(out / p.name)
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        for p in moved:
            os.replace(old / p.name, p)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _model_card(cfg: ModelConfig, model: nn.Module, meta: dict[str, Any], ckpt: Path, config: dict) -> str:
    import yaml

    data_meta: dict[str, Any] = {}
    data_path = meta.get("config", {}).get("data", {}).get("path")
    if data_path and (Path(data_path) / "meta.json").is_file():
        data_meta = json.loads((Path(data_path) / "meta.json").read_text())
    arch = config["architectures"][0]
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {'fill-mask' if cfg.arch == 'bert' else 'text-generation'}",
        "---", "", f"# {Path(str(ckpt)).parent.parent.name}", "",
        f"A {model.num_params() / 1e6:.1f}M-parameter {'masked-language-model encoder' if cfg.arch == 'bert' else 'decoder-only language model'} "
        f"pre-trained with `pretrain` and exported as a stock `{arch}` (no custom code needed).", "",
        "## Architecture", "",
        f"- {cfg.n_layer} layers, hidden size {cfg.d_model}, {cfg.n_head} attention heads"
        f"{f' ({cfg.kv_heads} key/value heads)' if cfg.kv_heads != cfg.n_head else ''}, MLP width {cfg.ff_dim}",
        f"- vocabulary {cfg.vocab_size:,}, context {cfg.max_seq_len} tokens, "
        f"{'learned positions' if cfg.arch == 'gpt2' else f'rotary base {cfg.rope_theta:g}'}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings", "",
        "## Training", "",
        f"- objective `{meta['config']['objective']}`, {meta['step']:,} steps, {meta.get('tokens_seen', 0):,} tokens",
        f"- final validation loss {meta['val_loss']:.4f}" if meta.get("val_loss") is not None else "- no validation result recorded",
        "", "Training configuration:", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```", "",
        "## Data", "",
    ]
    if data_meta:
        for split, info in data_meta["splits"].items():
            lines.append(f"- {split}: {info['tokens']:,} tokens, {info['documents']:,} documents")
        lines += ["", "| source | sha256 | bytes | documents | licence |", "|---|---|---|---|---|"]
        for s in data_meta["sources"][:50]:
            nbytes = f"{s['bytes']:,}" if isinstance(s.get("bytes"), int) else "—"  # a Hub source has no size
            lines.append(f"| {_source_name(s)} | {_short_sha(s.get('sha256'))} | {nbytes} | "
                         f"{s.get('documents', 0):,} | {s.get('licence', 'not given')} |")
        if len(data_meta["sources"]) > 50:
            lines.append(f"| … {len(data_meta['sources']) - 50} more | | | | |")
    else:
        lines.append("The prepared data directory was not available at export time.")
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
             "tok = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
             if cfg.arch != "bert" else
             "from transformers import pipeline\nfill = pipeline('fill-mask', model=PATH)")
    lines += ["", "## Use", "", "```python", usage, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- import


def model_config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json → our model section (see :func:`_model_config_from_hf`)."""
    from pretrain import PretrainError

    if not isinstance(conf, dict):
        raise PretrainError(f"config.json must hold a JSON object, not a {type(conf).__name__}")
    try:
        return _model_config_from_hf(conf)
    except KeyError as e:
        raise PretrainError(f"config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type (a string for a size, ...)
        raise PretrainError(f"config.json has a field of the wrong type or value: {e}") from None


def _model_config_from_hf(conf: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json (Llama-architecture decoders, ModernBERT encoders) → our model section.
    Anything our blocks cannot represent exactly is an error naming it."""
    from pretrain import PretrainError

    arch = (conf.get("architectures") or [conf.get("model_type", "?")])[0]
    mtype = conf.get("model_type")
    if mtype in ("llama", "mistral") and not conf.get("sliding_window"):
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if conf.get(key, ok) != ok:
                raise PretrainError(f"cannot import {arch}: {key}={conf.get(key)!r} is not supported (needs {ok!r})")
        rope = conf.get("rope_scaling") or {}
        if (conf.get("rope_parameters") or {}).get("rope_type", "default") != "default" or rope:
            raise PretrainError(f"cannot import {arch}: scaled rotary embeddings ({rope or conf['rope_parameters']}) "
                                "are not supported")
        theta = (conf.get("rope_parameters") or {}).get("rope_theta", conf.get("rope_theta", 10000.0))
        hd = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
        if hd * conf["num_attention_heads"] != conf["hidden_size"]:
            raise PretrainError(f"cannot import {arch}: head_dim {hd} x heads != hidden_size")
        return {"arch": "gpt", "n_layer": conf["num_hidden_layers"], "n_head": conf["num_attention_heads"],
                "n_kv_head": conf.get("num_key_value_heads") or conf["num_attention_heads"],
                "d_model": conf["hidden_size"], "d_ff": conf["intermediate_size"], "vocab_size": conf["vocab_size"],
                "max_seq_len": conf.get("max_position_embeddings", 2048), "rope_theta": float(theta),
                "norm_eps": conf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(conf.get("tie_word_embeddings", False)),
                "dropout": 0.0}
    if mtype == "gpt2":
        if conf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise PretrainError(f"cannot import {arch}: activation {conf.get('activation_function')!r}")
        if conf.get("scale_attn_by_inverse_layer_idx") or conf.get("reorder_and_upcast_attn"):
            raise PretrainError(f"cannot import {arch}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
        return {"arch": "gpt2", "n_layer": conf["n_layer"], "n_head": conf["n_head"], "d_model": conf["n_embd"],
                "d_ff": conf.get("n_inner") or 4 * conf["n_embd"], "vocab_size": conf["vocab_size"],
                "max_seq_len": conf["n_positions"], "norm_eps": conf.get("layer_norm_epsilon", 1e-5),
                "tie_embeddings": bool(conf.get("tie_word_embeddings", True)), "dropout": 0.0}
    raise PretrainError(f"cannot import {arch} (model_type {mtype!r}): supported are Llama-architecture decoders "
                        "(LlamaForCausalLM; Mistral without sliding window) and GPT-2 (GPT2LMHeadModel)")


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict` for decoders: fuse q/k/v and gate/up, strip the ``model.`` prefix.
    GPT-2: strip ``transformer.``, transpose Conv1D weights, drop the causal-mask buffers."""
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        for k, v in sd.items():
            k = k[len("transformer."):] if k.startswith("transformer.") else k
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints store the causal mask as a buffer
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                v = v.t()  # Conv1D (in, out) → Linear (out, in)
            out[k] = v
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        try:
            out[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
            out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [sd.pop(p + "mlp.gate_proj.weight"), sd.pop(p + "mlp.up_proj.weight")], dim=0)
        except KeyError as e:
            from pretrain import PretrainError

            raise PretrainError(f"the checkpoint has no tensor {e.args[0]}: not a Llama-layout checkpoint") from None
    for k, v in sd.items():
        if k.startswith("model."):
            out[k[len("model."):]] = v
        elif k == "lm_head.weight":
            out[k] = v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_hf(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A local Hugging Face model directory → (our model section, our state dict)."""
    from safetensors.torch import load_file

    from pretrain import PretrainError

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise PretrainError(f"{d} is not a Hugging Face model directory (no config.json)")
    try:
        conf = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    model_cfg = model_config_from_hf(conf)
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif (d / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((d / "model.safetensors.index.json").read_text(encoding="utf-8"))
            files = [d / f for f in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PretrainError(f"{d / 'model.safetensors.index.json'} is not a valid weight index "
                                f"(a JSON object with a 'weight_map' of tensor names to files): {e!r}") from None
    else:
        raise PretrainError(f"{d} has no model.safetensors (PyTorch .bin checkpoints are not loaded: "
                            "convert them to safetensors first)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise PretrainError(f"missing weight shard {f}")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise PretrainError(f"{f} is corrupt: {str(e).splitlines()[0]}") from None
    cfg = ModelConfig(**model_cfg)
    return model_cfg, {k: v.float() for k, v in from_hf_state_dict(sd, cfg).items()}
