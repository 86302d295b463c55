"""Hugging Face layout: map our models onto stock `transformers` architectures.

Each architecture's spec (models/*_spec.py) holds its mapping (:class:`pretrain.models.spec.HFMapping`): the
config.json, the state-dict names both ways, the Auto class, the tokenizer's special-token roles. This module
writes and reads the files: weights (sharded above a size), configs, tokenizer, model card.
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
from pretrain.models.spec import ArchSpec, HFMapping, get_spec, specs

EXPORT_FILES = ("generation_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "README.md")

def hf_mapping(cfg: ModelConfig) -> HFMapping:
    """The architecture's Hugging Face mapping (its spec's), or a clear error when it has none."""
    from pretrain import PretrainError

    hf = get_spec(cfg.arch).hf
    if hf is None:
        raise PretrainError(f"architecture {cfg.arch!r} has no Hugging Face mapping: it cannot be exported")
    return hf


def hf_config_dict(cfg: ModelConfig, special: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The config.json of the equivalent `transformers` model."""
    return hf_mapping(cfg).config(cfg, special or {})


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the `transformers` names (fused projections split); tied weights once."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.contiguous() for k, v in hf_mapping(cfg).to_hf(sd, cfg).items()}


def export_hf(run: str | Path, out: str | Path, dtype: str = "fp32", max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False) -> dict[str, Any]:
    """Write a run's newest checkpoint in the Hugging Face layout: config.json, model.safetensors (sharded
    with an index above ``max_shard_bytes``), generation_config.json (decoders), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and a model card (README.md). Loadable with
    ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` and ``AutoTokenizer`` without custom code.

    ``out`` is a new or empty folder or an earlier export, whose files it replaces (unless one was edited
    since it was written); ``overwrite`` writes into any other folder, replacing only the files an export
    writes."""
    from safetensors.torch import save_file

    from pretrain import PretrainError
    from pretrain.checkpoint import load_pretrained, resolve_checkpoint
    from pretrain.io import card_record, check_output_dir, write_failed

    if dtype not in ("fp32", "bf16"):
        raise PretrainError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    out = Path(out)
    # a new or empty folder, or an earlier export none of whose files changed since; else --overwrite
    check_output_dir(out, "export", [run], overwrite)
    # the part that transfers (an ELECTRA run: its discriminator, exported as the 'bert' encoder it is)
    model, cfg, tok, meta = load_pretrained(run, "cpu", part="encoder")
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
        config = {**hf_config_dict(cfg.model, special),
                  "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        spec = get_spec(cfg.model.arch)
        if spec.generates:
            gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "do_sample": True,
                   "temperature": 0.8, "top_k": 50, "max_length": cfg.model.max_seq_len}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))

        # tokenizer
        tok.save(tmp / "tokenizer.json")
        names = {}
        for key, attr in hf_mapping(cfg.model).token_roles.items():
            tid = getattr(tok, attr)
            if tid is not None:
                names[key] = tok.tk.id_to_token(tid)
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.max_seq_len,
                   "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
                   **names}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
        # the card ends with a record of every file written, so a later export can tell an edited one
        card = _model_card(spec, cfg.model, model, meta, ckpt).rstrip("\n") + "\n"
        record = card_record(tmp, "export", [p.name for p in tmp.iterdir()], card)
        (tmp / "README.md").write_text(card + record, encoding="utf-8")
        if fresh:
            os.replace(tmp, out)
        else:
            _move_into(tmp, out)
    except OSError as e:  # a full disk, above all: the partial export is removed, an earlier one stays
        need = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        raise write_failed(e, "the export", out, need,
                           "an earlier export there, if any, is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hf = hf_mapping(cfg.model)
    return {"out": str(out), "architecture": hf.architecture, "auto_class": hf.auto_class,
            "weights": weight_files, "dtype": dtype, "step": meta["step"], "n_params": model.num_params()}


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


def _model_card(spec: ArchSpec, cfg: ModelConfig, model: nn.Module, meta: dict[str, Any], ckpt: Path) -> str:
    import yaml

    data_meta: dict[str, Any] = {}
    data_path = meta.get("config", {}).get("data", {}).get("path")
    if data_path and (Path(data_path) / "meta.json").is_file():
        data_meta = json.loads((Path(data_path) / "meta.json").read_text())
    hf = hf_mapping(cfg)
    arch = hf.architecture
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {hf.pipeline_tag}",
        "---", "", f"# {Path(str(ckpt)).parent.parent.name}", "",
        f"A {model.num_params() / 1e6:.1f}M-parameter {spec.description} "
        f"pre-trained with `pretrain` and exported as a stock `{arch}` (no custom code needed).", "",
        "## Architecture", "",
        f"- {cfg.n_layer} layers, hidden size {cfg.d_model}, {cfg.n_head} attention heads"
        f"{f' ({cfg.kv_heads} key/value heads)' if cfg.kv_heads != cfg.n_head else ''}, "
        f"MLP width {cfg.ff_dim}",
        f"- vocabulary {cfg.vocab_size:,}, context {cfg.max_seq_len} tokens, "
        f"{'learned positions' if spec.learned_positions else f'rotary base {cfg.rope_theta:g}'}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings", "",
        "## Training", "",
        f"- objective `{meta['config']['objective']}`, {meta['step']:,} steps, "
        f"{meta.get('tokens_seen', 0):,} tokens"
        + (f" (this is the part of the trained `{trained}` model that transfers: "
           f"{get_spec(trained).description}, exported as a `{cfg.arch}`)"
           if (trained := meta["config"].get("model", {}).get("arch", cfg.arch)) != cfg.arch else ""),
        (f"- final validation loss {meta['val_loss']:.4f}" if meta.get("val_loss") is not None
         else "- no validation result recorded"),
        "", "Training configuration:", "", "```yaml",
        yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```", "",
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
    lines += ["", "## Use", "", "```python", hf.usage, "```", ""]
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
    """A Hugging Face config.json → our model section, by the spec whose mapping imports its model_type.
    Anything our blocks cannot represent exactly is an error naming it."""
    from pretrain import PretrainError

    arch = (conf.get("architectures") or [conf.get("model_type", "?")])[0]
    mtype = conf.get("model_type")
    importers = [s.hf for s in specs() if s.hf is not None and s.hf.config_from_hf is not None]
    for hf in importers:
        if mtype in hf.model_types:
            return hf.config_from_hf(conf)
    known = ", ".join(f"{h.architecture} (model_type {'/'.join(h.model_types)})" for h in importers)
    raise PretrainError(f"cannot import {arch} (model_type {mtype!r}): supported are {known}")


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict` (for architectures whose spec imports)."""
    hf = hf_mapping(cfg)
    if hf.from_hf is None:
        from pretrain import PretrainError

        raise PretrainError(f"architecture {cfg.arch!r} cannot be imported from the Hugging Face layout")
    return hf.from_hf(sd, cfg)


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
                                "(a JSON object with a 'weight_map' of tensor names to files): "
                                f"{e!r}") from None
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
