"""Hugging Face layout: map our models onto stock `transformers` architectures.

Each architecture's spec (models/*_spec.py) holds its mapping (:class:`pretrain.models.spec.HFMapping`): the
config.json, the state-dict names both ways, the Auto class, the tokenizer's special-token roles. This module
writes and reads the files: weights (sharded above a size), configs, the tokenizer (text models) or the image
preprocessor (image models: ``preprocessor_config.json``), model card.

One architecture can map onto several `transformers` classes (a ViT with its MAE decoder is a
``ViTMAEForPreTraining``, with a classifier a ``ViTForImageClassification``): the spec's config.json names the
class (``architectures``), and the Auto class that loads it follows from that name (:func:`auto_class`).

A fine-tuned model (a ``pretrain finetune`` folder) exports where its architecture's mapping has a class for
its task (``HFMapping.tasks``: ``*ForSequenceClassification`` for classification and regression,
``*ForTokenClassification`` for token tags, ``*ForQuestionAnswering`` for question answering, on Llama, GPT-2
and ModernBERT), with a tokenizer that lays out a text (or a pair) as the model was fine-tuned on it. What the
class cannot compute exactly as the fine-tune does (another pooling, a head it lacks) is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pretrain.config import Config, ModelConfig
from pretrain.models.spec import ArchSpec, HFMapping, HFTask, get_spec, specs

EXPORT_FILES = ("generation_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "README.md")

# a `transformers` class name's ending → the Auto class that loads it and the model card's pipeline tag
AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
                ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
                ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
                ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
                ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
                ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
                ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
                ("ForPreTraining", "AutoModelForPreTraining", "image-feature-extraction"),
                ("Model", "AutoModel", "image-feature-extraction"))


def hf_mapping(cfg: ModelConfig) -> HFMapping:
    """The architecture's Hugging Face mapping (its spec's), or a clear error when it has none."""
    from pretrain import PretrainError

    hf = get_spec(cfg.arch).hf
    if hf is None:
        raise PretrainError(f"architecture {cfg.arch!r} has no Hugging Face mapping: it cannot be exported")
    return hf


def hf_config_dict(cfg: ModelConfig, special: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of the equivalent `transformers` model. ``special``: a text model's special token ids
    (eot_id / pad_id / cls_id / mask_id), an image model's run settings (mask_ratio, norm_pix_loss)."""
    return hf_mapping(cfg).config(cfg, special or {})


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the `transformers` names (fused projections split); tied weights once."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.contiguous() for k, v in hf_mapping(cfg).to_hf(sd, cfg).items()}


def hf_task(cfg: ModelConfig, task: str) -> HFTask:
    """The `transformers` class of a fine-tuned ``task`` model on this architecture (its spec's mapping's),
    or a clear error when it has none."""
    from pretrain import PretrainError

    head = hf_mapping(cfg).task(task)
    if head is None:
        known = sorted({t.task for s in specs() if s.hf is not None for t in s.hf.tasks})
        raise PretrainError(f"a {task} fine-tune of a {get_spec(cfg.arch).description} ({cfg.arch!r}) has no "
                            "stock `transformers` class to export as (tasks that export: "
                            f"{', '.join(known) or 'none'})")
    return head


def to_hf_task_state_dict(model: nn.Module, head: HFTask, extra_rows: int = 0) -> dict[str, torch.Tensor]:
    """A fine-tuned TaskModel's weights under the names of ``head``'s class: the backbone's (as its mapping
    names them) under the class's prefixes, the classifier as its output layer (a zero bias added where the
    class has one and the fine-tune had none); the pre-training head (except the part the class keeps,
    ModernBERT's head transform) left out. ``extra_rows``: zero rows appended to the token embedding (a pad
    token added past the vocabulary)."""
    spec = get_spec(model.backbone.cfg.arch)
    emb = getattr(model.backbone, spec.embeddings[0]).weight
    out: dict[str, torch.Tensor] = {}
    for k, v in to_hf_state_dict(model.backbone).items():
        for src, dst in head.base:
            if k.startswith(src):
                if extra_rows and v.data_ptr() == emb.data_ptr() and v.shape == emb.shape:
                    v = torch.cat([v, v.new_zeros(extra_rows, v.shape[1])])
                out[dst + k[len(src):]] = v
                break
    for k, v in model.classifier.state_dict().items():
        if k == "bias" and not head.head_bias:
            continue  # (all zeros: _task_fit checked)
        out[f"{head.head}.{k}"] = v.detach().contiguous()
    if head.head_bias and model.classifier.bias is None:
        out[f"{head.head}.bias"] = model.classifier.weight.new_zeros(model.classifier.out_features).detach()
    return out


def _task_fit(model: nn.Module, head: HFTask, cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields that make ``head``'s class compute what the fine-tuned TaskModel ``model``
    computes (its pooling), or one error naming what differs: a prompt-based model, another pooling, a head
    transform the class has and the fine-tune had not (or the reverse), a classifier bias the class lacks."""
    from pretrain import PretrainError

    what = f"{head.architecture} cannot compute what this fine-tune does"
    again = "fine-tuned before the head matched the export class: fine-tune it again to export it"
    if getattr(model, "prompt", False):
        raise PretrainError("a prompt-based fine-tune (--prompt/--verbalizer) scores its label words with "
                            "the language-model head at the prompt's slot; no stock transformers class does "
                            "that: fine-tune with a linear head (no --prompt) to export it, or export the "
                            "pre-trained run and apply the prompt yourself")
    if bool(getattr(model, "head_features", False)) != head.head_features:
        raise PretrainError(f"{what}: the class {'applies' if head.head_features else 'has no'} head "
                            f"transform (the {get_spec(cfg.arch).description}'s prediction head) before its "
                            f"classifier, but this fine-tune {'did not' if head.head_features else 'did'} "
                            f"({again})")
    bias = model.classifier.bias
    if bias is not None and not head.head_bias and bool(bias.detach().abs().max() > 0):
        raise PretrainError(f"{what}: its output layer `{head.head}` has no bias, but this fine-tune's "
                            f"classifier has one ({again})")
    if model.token_level or not head.pooling:
        return {}
    fields = head.pooling_config(model.pooling)
    if fields is None:
        poolings = [n for n, _ in head.pooling]
        raise PretrainError(f"{what}: the class pools the sequence by {' or '.join(poolings)}, this "
                            f"fine-tune by {model.pooling} (fine-tunes with --pooling {'/'.join(poolings)} "
                            "export)")
    return fields


def auto_class(hf: HFMapping, architecture: str, modality: str = "text") -> tuple[str, str]:
    """(the Auto class that loads a `transformers` ``architecture``, the model card's pipeline tag): the
    mapping's own for its main architecture, else by the class name's ending (AUTO_CLASSES)."""
    if architecture == hf.architecture:
        return hf.auto_class, hf.pipeline_tag
    for ending, auto, tag in AUTO_CLASSES:
        if architecture.endswith(ending):
            return auto, tag if modality == "images" or ending != "Model" else "feature-extraction"
    return hf.auto_class, hf.pipeline_tag


def export_hf(run: str | Path, out: str | Path, dtype: str = "fp32", max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False) -> dict[str, Any]:
    """Write a run's newest checkpoint in the Hugging Face layout: config.json, model.safetensors (sharded
    with an index above ``max_shard_bytes``), a model card (README.md), and for text models
    generation_config.json (decoders), tokenizer.json, tokenizer_config.json, special_tokens_map.json, for
    image models preprocessor_config.json. Loadable with the Auto classes (``AutoModelForCausalLM``,
    ``AutoModelForMaskedLM``, ``AutoModelForPreTraining``, ``AutoModelForImageClassification``) and
    ``AutoTokenizer`` / ``AutoImageProcessor`` without custom code.

    The model as trained when its architecture maps onto a `transformers` one (a ViT with its MAE decoder or
    its classifier, a ResNet with its classifier); else the part that transfers (an ELECTRA run: its
    discriminator, exported as the 'bert' encoder it is).

    ``run`` may also be a fine-tuned model's folder (``pretrain finetune``; question answering for now:
    :func:`export_finetuned`).

    ``out`` is a new or empty folder or an earlier export, whose files it replaces (unless one was edited
    since it was written); ``overwrite`` writes into any other folder, replacing only the files an export
    writes."""
    from pretrain.checkpoint import load_pretrained, resolve_checkpoint
    from pretrain.io import check_output_dir, output_kinds
    from pretrain.models import transferable

    _check_dtype(dtype)
    out = Path(out)
    # a new or empty folder, or an earlier export none of whose files changed since; else --overwrite
    check_output_dir(out, "export", [run], overwrite)
    if "finetune" in output_kinds(run):
        return export_finetuned(run, out, dtype, max_shard_bytes, overwrite)
    model, cfg, tok, meta = load_pretrained(run, "cpu", part="whole")
    if get_spec(cfg.model.arch).hf is None:
        model, cfg = transferable(model, cfg)
    ckpt = resolve_checkpoint(run)
    from pretrain.bias import bias_dir

    for key, name in (("bias", "crows-pairs.json"), ("weat", "weat.json")):  # `pretrain bias`'s last reports
        report = bias_dir(ckpt) / name
        if report.is_file():
            try:
                meta = {**meta, key: json.loads(report.read_text(encoding="utf-8"))}
            except ValueError:
                pass  # (a damaged report is left out of the card, not a reason to fail the export)
    return export_model(model, cfg, out, tok=tok, meta=meta, name=Path(str(ckpt)).parent.parent.name,
                        dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite, inputs=[run])


def export_finetuned(ft_dir: str | Path, out: str | Path, dtype: str = "fp32",
                     max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> dict[str, Any]:
    """Write a fine-tuned model (``pretrain finetune --out FT_DIR``) in the Hugging Face layout, as the stock
    class its architecture's mapping names for the task (``HFMapping.tasks``): for classification and
    regression an ``AutoModelForSequenceClassification`` (config.json's ``id2label`` / ``label2id`` the
    fine-tune's labels; ``problem_type`` 'regression' with one output), for token tags an
    ``AutoModelForTokenClassification``, for question answering an ``AutoModelForQuestionAnswering``, whose
    logits are the fine-tune's; and a tokenizer that lays out a text, a pair or (question, context) as
    fine-tuning did (``[CLS] a [SEP] (b [SEP])`` for encoders, ``a <eot> (b <eot>)`` for decoders; padding on
    the right, no token type ids), so transformers' ``pipeline`` predicts as ``pretrain predict`` does. A
    class that pools the last token that is not the pad token (Llama, GPT-2) gets a pad token no input holds
    (the tokenizer's own, else ``<pad>`` added past the vocabulary, with a zero embedding row).
    Prompt-based fine-tunes, and fine-tunes whose pooling or head the class cannot compute, are refused with
    one error naming what differs. ``out``, ``overwrite``, ``dtype``, ``max_shard_bytes``: as
    :func:`export_hf`."""
    from pretrain import PretrainError
    from pretrain.config import Config, from_dict
    from pretrain.finetune.predict import FT_FILE, load_finetuned
    from pretrain.io import check_output_dir

    _check_dtype(dtype)
    ft_dir, out = Path(ft_dir), Path(out)
    check_output_dir(out, "export", [ft_dir], overwrite)
    info_file = ft_dir / FT_FILE
    task = _finetune_task(info_file)
    if task is not None and task not in EXPORT_TASKS:
        raise PretrainError(f"{ft_dir} is a fine-tune for {task}: fine-tunes for "
                            f"{', '.join(EXPORT_TASKS)} export to the Hugging Face layout")
    try:  # (its own checks: a missing or corrupt finetune.json, weights or tokenizer)
        model, info, tok = load_finetuned(ft_dir)
        cfg = from_dict(Config, info["backbone"])
        qa = {k: info["qa"][k] for k in QA_SETTINGS} if info["task"] == "qa" else None
        labels = None if info["task"] in ("qa", "regression") else [str(n) for n in info["labels"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PretrainError(f"{info_file} is corrupt or incomplete ({type(e).__name__}: {e})") from None
    hf_task(cfg.model, info["task"])  # (no class for the task: one error naming those that export)
    best = info.get("best") if isinstance(info.get("best"), dict) else {}
    meta = {"step": best.get("step", 0), "config": info["backbone"],
            "finetune": {**info, "qa": qa, "best": best}}
    return export_model(model, cfg, out, tok=tok, meta=meta, name=ft_dir.resolve().name, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite, inputs=[ft_dir],
                        task=info["task"], labels=labels)


EXPORT_TASKS = ("classification", "regression", "token", "qa")
"""Fine-tuning tasks whose models export (each architecture's mapping names its class: HFMapping.tasks)."""
QA_SETTINGS = ("doc_stride", "max_answer_length", "n_best", "null_threshold", "null")
"""finetune.json's ``qa`` settings (windows and decoding), for the model card."""


def _finetune_task(info_file: Path) -> str | None:
    """finetune.json's task ('image classification' for an image fine-tune); None when it cannot be read
    (``load_finetuned`` then says what is wrong)."""
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        task = info["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(task, str):
        return None
    return f"image {task}" if info.get("modality") == "images" else task


def _check_dtype(dtype: str) -> None:
    from pretrain import PretrainError

    if dtype not in ("fp32", "bf16"):
        raise PretrainError(f"--dtype must be fp32 or bf16, got {dtype!r}")


def export_model(model: nn.Module, cfg: Config, out: str | Path, tok: Any = None,
                 meta: dict[str, Any] | None = None, name: str | None = None, labels: list[str] | None = None,
                 dtype: str = "fp32", max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False,
                 inputs: Any = (), task: str | None = None) -> dict[str, Any]:
    """Write ``model`` (built from ``cfg.model``; the run's Config ``cfg``) in the Hugging Face layout (see
    :func:`export_hf`, which calls this for a run's checkpoint). ``tok``: the Tokenizer of a text model
    (required there); ``meta``: its checkpoint's meta (step, validation loss, the run config) for the model
    card; ``name``: the card's title; ``labels``: class names of an image classifier (default: the prepared
    data's ``classes`` when its meta.json lists as many, else LABEL_i). ``out``, ``overwrite`` as
    :func:`export_hf`; ``inputs``: paths ``out`` must not be nor hold. ``task``: ``model`` is a fine-tuned
    TaskModel for that task ('qa'; ``cfg`` its backbone's Config), written as the class the architecture's
    mapping names for it (``meta['finetune']``: its finetune.json, for the model card)."""
    from safetensors.torch import save_file

    from pretrain import PretrainError
    from pretrain.io import card_record, check_output_dir, default_mode, write_failed

    _check_dtype(dtype)
    out = Path(out)
    check_output_dir(out, "export", inputs, overwrite)
    model = getattr(model, "_orig_mod", model)
    spec = get_spec(cfg.model.arch)
    images = spec.modality == "images"
    if not images and tok is None:
        raise PretrainError(f"a {spec.description} exports with its tokenizer: none was given")
    meta = meta if meta is not None else {"step": 0, "config": cfg.to_dict()}
    hf = hf_mapping(cfg.model)
    head = hf_task(cfg.model, task) if task is not None else None
    fit = _task_fit(model, head, cfg.model) if head is not None else {}
    # the config and weights first: a model that cannot be exported (a ResNet's 'small' stem) fails here,
    # before anything is written
    model_cfg, pad, extra_rows = cfg.model, None, 0
    if images:
        special: dict[str, Any] = {"mask_ratio": cfg.image.mask_ratio,
                                   "norm_pix_loss": cfg.image.norm_pix_loss}
    else:
        pad, pad_id, extra_rows = _pad_token(tok, cfg.model.vocab_size,
                                             own=head is not None and head.pad_pooled)
        if extra_rows:
            model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size + extra_rows)
        special = {"eot_id": tok.eot_id, "pad_id": pad_id, "cls_id": tok.cls_id, "mask_id": tok.mask_id}
    config = {**hf_config_dict(model_cfg, special),
              "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
    if not images:
        config["pad_token_id"] = special["pad_id"]  # (batched inputs pad with it; pooled models skip it)
    if "id2label" in config:
        names = labels if labels is not None else _data_classes(cfg.data.path)
        if names is not None and len(names) == len(config["id2label"]):
            config["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
            config["label2id"] = {str(n): i for i, n in enumerate(names)}
        elif labels is not None:
            raise PretrainError(f"{len(labels)} label names for a classifier of {len(config['id2label'])} "
                                "classes")
    if head is not None:  # a fine-tuned task model: its class, its outputs; no language-model head
        n_out = model.classifier.out_features
        names = labels if labels is not None and task != "qa" else [f"LABEL_{i}" for i in range(n_out)]
        if len(names) != n_out or len(set(names)) != n_out:
            raise PretrainError(f"{len(names)} label names ({len(set(names))} distinct) for a classifier of "
                                f"{n_out} outputs")
        config.update({**dict(head.config), **fit, "architectures": [head.architecture], "num_labels": n_out,
                       "id2label": {str(i): str(n) for i, n in enumerate(names)},
                       "label2id": {str(n): i for i, n in enumerate(names)}, "tie_word_embeddings": False})
        if task in PROBLEM_TYPES:
            config["problem_type"] = PROBLEM_TYPES[task]
    architecture = (config.get("architectures") or [hf.architecture])[0]
    auto, pipeline_tag = auto_class(hf, architecture, spec.modality)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hf_sd = to_hf_task_state_dict(model, head, extra_rows) if head is not None else to_hf_state_dict(model)
    sd = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous()  # (BatchNorm counts: ints)
          for k, v in hf_sd.items()}
    # written whole into a temporary folder, then moved into place: beside a new OUT (one rename), inside an
    # existing one (a folder the user made, maybe a mount point or a symlink: it stays as it is)
    fresh = not out.exists()
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = (out.parent / f".{out.name}.export-{os.getpid()}") if fresh else out / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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
            default_mode(tmp / "model.safetensors")
            weight_files = ["model.safetensors"]
        else:
            weight_files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": {k: name for name, shard in zip(weight_files, shards) for k in shard}}
            for wname, shard in zip(weight_files, shards):
                save_file(shard, str(tmp / wname), metadata={"format": "pt"})
                default_mode(tmp / wname)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if spec.generates and head is None:
            # max_length: the whole context (transformers' default, 20 tokens, would cut every sample short)
            gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": special["pad_id"],
                   "do_sample": True, "temperature": 0.8, "top_k": 50, "max_length": cfg.model.max_seq_len}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if images:
            pre = image_processor_config(cfg.model)
            (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        else:
            _write_tokenizer(tmp, tok, hf, cfg.model, pair=head is not None, lead_cls=spec.bidirectional,
                             pad=pad)
        # the card ends with a record of every file written, so a later export can tell an edited one
        card = _model_card(spec, cfg.model, model, meta, name or out.name, config, auto, pipeline_tag)
        card = card.rstrip("\n") + "\n"
        record = card_record(tmp, "export", [p.name for p in tmp.iterdir()], card)
        (tmp / "README.md").write_text(card + record, encoding="utf-8")
        if fresh:
            os.replace(tmp, out)
        else:
            _move_into(tmp, out)
    except OSError as e:  # a full disk, above all: the partial export is removed, an earlier one stays
        need = sum(v.numel() * v.element_size() for v in sd.values())
        raise write_failed(e, "the export", out, need,
                           "an earlier export there, if any, is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "architecture": architecture, "auto_class": auto,
            "weights": weight_files, "dtype": dtype, "step": meta.get("step", 0),
            "n_params": _n_params(model)}


def _n_params(model: nn.Module) -> int:
    """Parameters of one of our models, or of a task model (backbone + head) built on one."""
    if hasattr(model, "num_params"):
        return model.num_params()
    return sum(p.numel() for p in model.parameters())


def _write_tokenizer(folder: Path, tok: Any, hf: HFMapping, cfg: ModelConfig, pair: bool = False,
                     lead_cls: bool = False, pad: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a text model. ``pair``: a
    fine-tuned task model: the tokenizer adds the fine-tuning layout's special tokens
    (``[CLS] A <eot> B <eot>`` with ``lead_cls`` where the tokenizer has a [CLS], else ``A <eot> B <eot>``;
    a single text ``[CLS] A <eot>`` / ``A <eot>``) and pads on the right (the question-answering pipeline
    then puts the question first). ``pad``: the pad token (see :func:`_pad_token`; added as a special token
    when the tokenizer lacks it). No tokenizer gives token type ids (our models have none; transformers 4.x
    would hand them to the model, and GPT-2 adds them to its embeddings)."""
    from tokenizers import Tokenizer as HFTokenizer

    tk = _pair_tokenizer(tok, lead_cls) if pair else HFTokenizer.from_str(tok.tk.to_str())
    if pad is not None and tk.token_to_id(pad) is None:
        tk.add_special_tokens([pad])
    tk.save(str(folder / "tokenizer.json"))
    names = {}
    for key, attr in hf.token_roles.items():
        tid = getattr(tok, attr)
        if tid is not None:
            names[key] = tok.tk.id_to_token(tid)
    if pad is not None and ("pad_token" in hf.token_roles or pair):
        names["pad_token"] = pad
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
               "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
               "model_input_names": ["input_ids", "attention_mask"], **names}
    if pair:
        tok_cfg["padding_side"] = "right"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2))


PAD = "<pad>"
"""The pad token an export adds where the tokenizer has none and the class must tell padding apart."""
PROBLEM_TYPES = {"classification": "single_label_classification", "regression": "regression"}
"""config.json's ``problem_type`` of a sequence-classification export, by fine-tuning task."""


def _pad_token(tok: Any, vocab_size: int, own: bool = False) -> tuple[str, int, int]:
    """(the export's pad token, its id, embedding rows to add for it): the tokenizer's own ([PAD], <pad>);
    else the end-of-text token, as GPT-2 and Llama users set it (padding is masked out); else, ``own``, for
    a class that pools the last token that is not the pad (Llama's, GPT-2's sequence classifiers), ``<pad>``
    added after the vocabulary (with a zero embedding row where the model has no spare one), so no input
    holds it."""
    if tok.pad_id is not None and tok.pad_id != tok.eot_id:
        return tok.tk.id_to_token(tok.pad_id), tok.pad_id, 0
    if not own:
        return tok.tk.id_to_token(tok.eot_id), tok.eot_id, 0
    pad_id = tok.tk.token_to_id(PAD)
    if pad_id is None or pad_id == tok.eot_id:
        pad_id = tok.vocab_size
    return PAD, pad_id, max(0, pad_id + 1 - vocab_size)


def _pair_tokenizer(tok: Any, lead_cls: bool) -> Any:
    """A copy of ``tok``'s `tokenizers` Tokenizer whose post-processor adds the special tokens of the
    fine-tuning layout (see :func:`_write_tokenizer`; as ``finetune.qa.encode_qa`` builds its windows). A
    byte-level post-processor (offset trimming) is kept before it, so token offsets stay as they were."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    eot = tok.tk.id_to_token(tok.eot_id)
    lead = [tok.tk.id_to_token(tok.cls_id)] if lead_cls and tok.cls_id is not None else []
    specials = [(t, tok.tk.token_to_id(t)) for t in dict.fromkeys([*lead, eot])]
    template = processors.TemplateProcessing(single=" ".join([*lead, "$A", eot]),
                                             pair=" ".join([*lead, "$A", eot, "$B:1", f"{eot}:1"]),
                                             special_tokens=specials)
    tk = HFTokenizer.from_str(tok.tk.to_str())  # (a copy: the caller's tokenizer stays as it is)
    before = tk.post_processor
    tk.post_processor = template
    if isinstance(before, processors.ByteLevel):
        tk.post_processor = processors.Sequence([before, template])
    return tk


def image_processor_config(cfg: ModelConfig) -> dict[str, Any]:
    """preprocessor_config.json of an image model: a ``ViTImageProcessor`` (any image model loads it through
    ``AutoImageProcessor``) that resizes to image_size x image_size (bilinear), scales to [0, 1] and
    normalises by the model's image_mean / image_std, as the model was trained. RGB models convert any image
    to RGB; a grayscale model (channels 1) takes grayscale ('L') images."""
    mean = list(cfg.image_mean) or [0.0] * cfg.channels  # unresolved: the pixels in [0, 1] as they are
    std = list(cfg.image_std) or [1.0] * cfg.channels
    return {"image_processor_type": "ViTImageProcessor", "do_resize": cfg.image_size > 0,
            "size": {"height": cfg.image_size or 224, "width": cfg.image_size or 224}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
            "image_std": std, "do_convert_rgb": cfg.channels == 3}


def _data_meta(data_path: str | None) -> dict[str, Any]:
    """The prepared data's meta.json ({} when it is not there)."""
    if data_path and (Path(data_path) / "meta.json").is_file():
        try:
            return json.loads((Path(data_path) / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {}


def _data_classes(data_path: str | None) -> list[str] | None:
    """The class names the prepared image data lists (meta.json's ``classes``), if any."""
    classes = _data_meta(data_path).get("classes")
    if isinstance(classes, list) and classes:
        return [str(c) for c in classes]
    if isinstance(classes, dict) and classes and all(str(k).isdigit() for k in classes):  # {id: name}
        return [str(classes[k]) for k in sorted(classes, key=lambda k: int(k))]
    return None


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


def _model_card(spec: ArchSpec, cfg: ModelConfig, model: nn.Module, meta: dict[str, Any], name: str,
                config: dict[str, Any], auto: str, pipeline_tag: str) -> str:
    import yaml

    data_meta = _data_meta(meta.get("config", {}).get("data", {}).get("path"))
    hf = hf_mapping(cfg)
    arch = (config.get("architectures") or [hf.architecture])[0]
    images = spec.modality == "images"
    run_cfg = meta.get("config", {})
    if images:
        sizes = ", ".join(f"{k} {v}" for k, v in config.items()
                          if (isinstance(v, int) and not isinstance(v, bool))
                          or (isinstance(v, list) and v and all(isinstance(x, int) for x in v)))
        about = [f"- {cfg.image_size}x{cfg.image_size}-pixel images, {cfg.channels} channel"
                 f"{'s' * (cfg.channels != 1)}, normalised by mean {list(cfg.image_mean)} and std "
                 f"{list(cfg.image_std)} after scaling to [0, 1] (preprocessor_config.json does all of it)",
                 f"- {sizes}"]
        if "id2label" in config:
            labels = list(config["id2label"].values())
            more = " …" if len(labels) > 20 else ""
            about.append(f"- {len(labels)} classes: {', '.join(labels[:20])}{more}")
        seen = next((f", {meta[k]:,} images" for k in ("images_seen", "samples_seen") if meta.get(k)), "")
    else:
        about = [f"- {cfg.n_layer} layers, hidden size {cfg.d_model}, {cfg.n_head} attention heads"
                 f"{f' ({cfg.kv_heads} key/value heads)' if cfg.kv_heads != cfg.n_head else ''}, "
                 f"MLP width {cfg.ff_dim}",
                 f"- vocabulary {cfg.vocab_size:,}, context {cfg.max_seq_len} tokens, "
                 f"{'learned positions' if spec.learned_positions else f'rotary base {cfg.rope_theta:g}'}, "
                 f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings"]
        seen = f", {meta.get('tokens_seen', 0):,} tokens"
    trained = run_cfg.get("model", {}).get("arch", cfg.arch)
    ft = meta.get("finetune")
    if ft:
        fine_tuned = f", fine-tuned for {TASK_NAMES.get(ft['task'], ft['task'])} (`pretrain finetune`)"
        src = ft.get("pretrained_from")
        training = [f"- pre-trained with objective `{run_cfg.get('objective', '?')}`"
                    + (f": run `{Path(str(src)).parent.parent.name}`, checkpoint `{Path(str(src)).name}`"
                       if src else " (fine-tuned from a random init: `--from-scratch`)")]
    else:
        fine_tuned = ""
        training = [
            f"- objective `{run_cfg.get('objective', '?')}`, {meta.get('step', 0):,} steps{seen}"
            + (f" (this is the part of the trained `{trained}` model that transfers: "
               f"{get_spec(trained).description}, exported as a `{cfg.arch}`)"
               if trained != cfg.arch else ""),
            (f"- final validation loss {meta['val_loss']:.4f}" if meta.get("val_loss") is not None
             else "- no validation result recorded")]
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {pipeline_tag}",
        "---", "", f"# {name}", "",
        f"A {_n_params(model) / 1e6:.1f}M-parameter {spec.description} "
        f"pre-trained with `pretrain`{fine_tuned} and exported as a stock `{arch}` "
        "(no custom code needed).", "",
        "## Architecture", "", *about, "",
        "## Training", "", *training,
        "", "Training configuration:", "", "```yaml",
        yaml.safe_dump(run_cfg, sort_keys=False).rstrip(), "```", "",
        *(_finetune_section(ft, spec) if ft else []),
        "## Training data", "",
        *_data_section(data_meta),
    ]
    lines += _bias_section(meta.get("bias")) + _weat_section(meta.get("weat"))
    usage = (_qa_usage(ft, spec.bidirectional) if ft and ft["task"] == "qa"
             else _task_usage(ft) if ft else _usage(hf, arch, auto, pipeline_tag, images))
    if images and cfg.channels == 1:  # transformers opens image files as RGB: a grayscale model takes arrays
        usage = "import numpy as np\n" + usage.replace(
            "Image.open('image.png')", "np.asarray(Image.open('image.png').convert('L'))[..., None]")
    lines += ["", "## Use", "", "```python", usage, "```", ""]
    return "\n".join(lines)


def _data_section(data_meta: dict[str, Any]) -> list[str]:
    """The model card's provenance table: `pretrain data audit` of the run's prepared data (every source with
    its licence, sha256, size, contribution and what cleaning removed), when its meta.json is still there."""
    from pretrain.data.audit import audit_meta, markdown

    if not data_meta:
        return ["The prepared data directory was not available at export time: no provenance table (run "
                "`pretrain data audit DATA_DIR` where the data is)."]
    try:
        return ["Provenance (`pretrain data audit`; licence \"unknown (!)\": none was recorded at prepare "
                "time):", "", *markdown(audit_meta(data_meta))]
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a meta.json of an unexpected shape
        return [f"The prepared data's meta.json could not be audited ({type(e).__name__}: {e})."]


def _bias_section(rep: dict[str, Any] | None) -> list[str]:
    """The model card's account of the run's last ``pretrain bias`` report (CrowS-Pairs), if it has one."""
    if not isinstance(rep, dict) or "overall" not in rep:
        return []
    o = rep["overall"]
    lines = ["", "## Bias (CrowS-Pairs)", "",
             f"`pretrain bias` at step {rep.get('step')}: the model prefers the stereotyping sentence in "
             f"**{o['score']:.1f}%** of {o['n']:,} pairs (95% bootstrap interval {o['ci95'][0]:.1f}–"
             f"{o['ci95'][1]:.1f}; 50 = no preference). Scoring: {rep.get('scoring', '?')}.", "",
             "| bias type | % preferring the stereotype | 95% interval | pairs |", "|---|---|---|---|"]
    for t, s in rep.get("by_type", {}).items():
        lines.append(f"| {t} | {s['score']:.1f} | {s['ci95'][0]:.1f}–{s['ci95'][1]:.1f} | {s['n']:,} |")
    return [*lines, "", f"Caveat: {rep.get('caveat', '')}"]


def _weat_section(rep: dict[str, Any] | None) -> list[str]:
    """The model card's account of the run's last ``pretrain bias --suite weat`` report, if it has one."""
    if not isinstance(rep, dict) or "targets" not in rep:
        return []
    (x, y), (a, b) = rep["targets"], rep["attributes"]
    d = rep.get("effect_size")
    return ["", "## Word associations (WEAT)", "",
            f"`pretrain bias --suite weat` at step {rep.get('step')} ({rep.get('pooling')} pooling; words "
            f"from {Path(str(rep.get('words_file', '?'))).name}): targets {x['name']} ({x['size']}) vs "
            f"{y['name']} ({y['size']}), attributes {a['name']} ({a['size']}) vs {b['name']} ({b['size']}): "
            "effect size "
            + ("undefined" if d is None else f"**{d:+.3f}**")
            + f", one-sided p = {rep.get('p_value', float('nan')):.4g} ({rep.get('p_method')}).", "",
            f"Caveat: {rep.get('caveat', '')}"]


TASK_NAMES = {"qa": "extractive question answering", "classification": "text classification",
              "regression": "regression (a number per text)",
              "token": "token classification (a tag per word)"}


def _finetune_section(ft: dict[str, Any], spec: ArchSpec) -> list[str]:
    """The model card's account of a fine-tune (its finetune.json ``ft``)."""
    import yaml

    windows = ft.get("windows") or {}
    if ft["task"] == "qa":
        lines = ["## Fine-tuning", "",
                 f"- {ft.get('train_examples', 0):,} training questions ({windows.get('train', 0):,} "
                 f"windows), {ft.get('valid_examples', 0):,} validation questions"]
    else:
        eot = "[SEP]" if spec.bidirectional else "<eot>"
        layout = ("[CLS] " if spec.bidirectional else "") + f"text {eot} (text_pair {eot})"
        lines = ["## Fine-tuning", "",
                 f"- {ft.get('train_examples', 0):,} training examples, {ft.get('valid_examples', 0):,} "
                 "validation examples",
                 f"- input `{layout}` (the exported tokenizer adds the special tokens), at most "
                 f"{ft.get('max_length')} tokens"]
        if ft["task"] == "token":
            lines.append(f"- each word's tag is predicted at its {ft.get('token_label') or 'first'} "
                         "sub-token")
        else:
            lines.append(f"- the sequence is pooled by `{ft.get('pooling')}`")
        if ft["task"] in ("classification", "token"):
            lines.append(f"- labels: {', '.join(str(n) for n in ft.get('labels') or [])}")
    best = ft.get("best") or {}
    scores = {k[len("val_"):]: v for k, v in best.items() if k.startswith("val_") and k != "val_metric"}
    if scores:
        lines.append("- best validation "
                     + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in scores.items())
                     + f" (epoch {best.get('epoch', '?')}, step {best.get('step', '?')})")
    if ft["task"] == "qa":
        qa = ft["qa"]
        eot = "[SEP]" if spec.bidirectional else "<eot>"
        layout = (f"[CLS] question {eot} context {eot}" if spec.bidirectional
                  else f"question {eot} context {eot}")
        lines += [f"- input `{layout}` (the tokenizer adds the special tokens to a (question, context) "
                  f"pair), at most {ft['max_length']} tokens; a longer context is cut into windows that "
                  f"share {qa['doc_stride']} tokens",
                  f"- answer: per window the span (at most {qa['max_answer_length']} tokens) with the "
                  "highest p(start) x p(end), softmax over the window's context tokens"
                  + (" and [CLS]" if spec.bidirectional else "")
                  + "; the best over the windows, as transformers' question-answering pipeline decides"]
        if qa.get("null"):
            where = "[CLS]" if spec.bidirectional else "the last token"
            lines.append("- trained with unanswerable questions: no answer when the null score (start and "
                         f"end on {where}) beats the best span's by more than {qa['null_threshold']}")
    lines += ["", "Fine-tuning configuration:", "", "```yaml",
              yaml.safe_dump(ft.get("config") or {}, sort_keys=False).rstrip(), "```", ""]
    return lines


def _qa_usage(ft: dict[str, Any], encoder: bool) -> str:
    """The model card's snippet for a question-answering export, with its window settings."""
    qa = ft["qa"]
    null = bool(qa.get("null"))  # the pipeline's "no answer" is the first position: an encoder's [CLS]
    return ("# transformers 4.x: the question-answering pipeline answers as `pretrain predict` does\n"
            "from transformers import pipeline\n"
            "qa = pipeline('question-answering', model=PATH)\n"
            f"qa(question='...', context='...', max_seq_len={ft['max_length']}, "
            f"doc_stride={qa['doc_stride']}, max_answer_len={qa['max_answer_length']}, align_to_words=False"
            + (", handle_impossible_answer=True)" if null and encoder else ")")
            + ("  # (never 'no answer': this model's null position is its last token)" if null and not encoder
               else "") + "\n\n"
            "# any version: the start and end logits of a (question, context) window\n"
            "from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n"
            "tok = AutoTokenizer.from_pretrained(PATH)\n"
            "model = AutoModelForQuestionAnswering.from_pretrained(PATH)\n"
            "out = model(**tok('a question?', 'its context.', return_tensors='pt'))\n"
            "out.start_logits, out.end_logits")


def _task_usage(ft: dict[str, Any]) -> str:
    """The model card's snippet for a classification, regression or token-classification export."""
    if ft["task"] == "token":
        at = ft.get("token_label") or "first"
        return ("from transformers import pipeline\n"
                "tag = pipeline('token-classification', model=PATH, ignore_labels=[])\n"
                f"tag('words separated by spaces')  # a tag per sub-token; a word's is its {at} sub-token's"
                + ("\n# whole words: tag(..., aggregation_strategy='first')" if at == "first" else ""))
    if ft["task"] == "regression":
        return ("from transformers import pipeline\n"
                "score = pipeline('text-classification', model=PATH, function_to_apply='none')\n"
                "score('a text')  # [{'label': 'LABEL_0', 'score': the predicted number}]")
    return ("from transformers import pipeline\n"
            "classify = pipeline('text-classification', model=PATH, top_k=None)\n"
            "classify('a text')  # every label with its probability\n"
            "classify({'text': 'a text', 'text_pair': 'its pair'})  # a sentence-pair model")


def _usage(hf: HFMapping, architecture: str, auto: str, pipeline_tag: str, images: bool) -> str:
    """The model card's snippet: the mapping's own for its main architecture, else one for the Auto class."""
    if architecture == hf.architecture and hf.usage:
        return hf.usage
    if pipeline_tag == "image-classification":
        return ("from PIL import Image\nfrom transformers import pipeline\n"
                "classify = pipeline('image-classification', model=PATH)\nclassify(Image.open('image.png'))")
    if images:
        return ("from PIL import Image\nfrom transformers import AutoImageProcessor, " + auto + "\n"
                "processor = AutoImageProcessor.from_pretrained(PATH)\n"
                f"model = {auto}.from_pretrained(PATH)\n"
                "outputs = model(**processor(Image.open('image.png'), return_tensors='pt'))")
    return f"from transformers import {auto}\nmodel = {auto}.from_pretrained(PATH)"


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


def _image_settings(d: Path, section: dict[str, Any]) -> dict[str, Any]:
    """An image model's normalisation (image_mean, image_std) and, when config.json has none, its image size,
    from the folder's preprocessor_config.json ({} without one: the prepared data's are used)."""
    from pretrain import PretrainError

    f = d / "preprocessor_config.json"
    if not f.is_file():
        return {}
    try:
        pre = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainError(f"{f} is not valid JSON: {e}") from None
    out: dict[str, Any] = {}
    channels = section.get("channels", 3)
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if pre.get("do_normalize", True) and isinstance(mean, list) and isinstance(std, list) \
            and len(mean) == len(std) == channels:
        out["image_mean"], out["image_std"] = [float(v) for v in mean], [float(v) for v in std]
    if not section.get("image_size"):
        size = {**(pre.get("size") or {}), **(pre.get("crop_size") or {})} if pre.get("do_center_crop") \
            else (pre.get("size") or {})
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        if isinstance(side, int) and side > 0:
            out["image_size"] = side
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
    if get_spec(model_cfg["arch"]).modality == "images":
        model_cfg.update(_image_settings(d, model_cfg))
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


# ---------------------------------------------------------------------------------------------- adapters

ADAPTER_DIR = "adapter"
"""The PEFT adapter folder inside a fine-tune (``finetune --lora --save-adapter``)."""
ADAPTER_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "token": "TOKEN_CLS",
                      "qa": "QUESTION_ANS"}


def check_adapter(model: nn.Module, task: str) -> HFTask:
    """The class a LoRA fine-tune's adapter (``--save-adapter``) applies to, or one clear error (before
    training) when the architecture has none for the task or the class cannot compute what it does."""
    cfg = model.backbone.cfg
    head = hf_task(cfg, task)
    _task_fit(model, head, cfg)
    return head


def _lora_rows(backbone: nn.Module, loras: dict[str, tuple[torch.Tensor, torch.Tensor]]
               ) -> dict[str, tuple[str, torch.Tensor, bool]]:
    """For each LoRA-adapted weight of ``backbone`` (our name → (A, B)), where its mapping's ``to_hf`` puts
    it: {transformers weight name: (our name, the rows of ours it holds, stored transposed)}. Found by
    sending numbered float64 probes through ``to_hf`` (no architecture named here): a fused q/k/v weight
    split into three is three modules sharing A, each with its rows of B."""
    from pretrain import PretrainError

    cfg = backbone.cfg
    sd = {k.replace(".base_layer", ""): v.detach() for k, v in backbone.state_dict().items()
          if "lora_" not in k}
    probe, ranges, offset = dict(sd), [], 0
    for name in loras:
        w = sd[name]
        probe[name] = torch.arange(offset, offset + w.numel(), dtype=torch.float64).view(w.shape)
        ranges.append((name, offset, w.shape[1]))
        offset += w.numel()
    out: dict[str, tuple[str, torch.Tensor, bool]] = {}
    for hf_name, t in hf_mapping(cfg).to_hf(probe, cfg).items():
        if t.dtype != torch.float64:
            continue
        first = float(t.flatten()[0])
        name, start, n_in = next(r for r in reversed(ranges) if r[1] <= first)
        for transposed, m in ((False, t), (True, t.t())):
            if m.dim() == 2 and m.shape[1] == n_in:
                rows = ((m[:, 0] - start) // n_in).long()
                if torch.equal(m, start + rows[:, None].double() * n_in + torch.arange(n_in).double()):
                    out[hf_name] = (name, rows, transposed)
                    break
        else:
            raise PretrainError(f"the LoRA adapter of {name} cannot be mapped onto {hf_name}")
    return out


def save_adapter(out: str | Path, model: nn.Module, info: dict[str, Any], tok: Any) -> dict[str, Any]:
    """A LoRA fine-tune (``model``: the peft-wrapped TaskModel) as a PEFT adapter folder for the pre-trained
    run's Hugging Face export (``pretrain export RUN``): adapter_config.json and adapter_model.safetensors
    (the LoRA matrices under the export's module names, a fused projection's split as its export splits the
    weight; the task head as the class's output layer, ``modules_to_save``), the fine-tune's tokenizer
    (its layout and pad token), pretrain_adapter.json (the class and the config fields to load the base
    with) and a README. Written whole, then moved into place over an earlier one."""
    import yaml
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pretrain import PretrainError
    from pretrain.finetune.model import merged
    from pretrain.io import default_mode

    task_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, task = task_model.backbone, info["task"]
    cfg, spec = backbone.cfg, get_spec(backbone.cfg.arch)
    head = check_adapter(task_model, task)
    peft_cfg = model.peft_config["default"]
    loras = {}
    for name, mod in backbone.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            loras[name + ".weight"] = (mod.lora_A["default"].weight.detach(),
                                       mod.lora_B["default"].weight.detach())
    tensors: dict[str, torch.Tensor] = {}
    flips = set()
    for hf_name, (name, rows, transposed) in _lora_rows(backbone, loras).items():
        dst = next((d + hf_name[len(s):] for s, d in head.base if hf_name.startswith(s)), None)
        if dst is None:
            raise PretrainError(f"{head.architecture} has no module for the LoRA adapter of {name}")
        a, b = loras[name]
        module = dst.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b[rows].contiguous().clone()
        flips.add(transposed)
    if len(flips) > 1:
        raise PretrainError("the adapted layers are stored both ways round in the export (fan_in_fan_out)")
    classifier = merged(model).classifier
    for k, v in classifier.state_dict().items():
        if k != "bias" or head.head_bias:
            tensors[f"base_model.model.{head.head}.{k}"] = v.detach().contiguous().clone()
    if head.head_bias and classifier.bias is None:
        tensors[f"base_model.model.{head.head}.bias"] = classifier.weight.new_zeros(classifier.out_features)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_A." in k})
    lora = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout,
                      target_modules=targets, modules_to_save=[head.head], fan_in_fan_out=flips == {True},
                      task_type=ADAPTER_TASK_TYPES[task], bias="none")
    n_out = classifier.out_features
    names = ([str(n) for n in info["labels"]] if task in ("classification", "token")
             else [f"LABEL_{i}" for i in range(n_out)])
    pad, pad_id, extra_rows = _pad_token(tok, cfg.vocab_size, own=head.pad_pooled)
    base_config = {**dict(head.config), **_task_fit(task_model, head, cfg), "num_labels": n_out,
                   "id2label": {str(i): n for i, n in enumerate(names)},
                   "label2id": {n: i for i, n in enumerate(names)}}
    if task in PROBLEM_TYPES:
        base_config["problem_type"] = PROBLEM_TYPES[task]
    auto, _ = auto_class(hf_mapping(cfg), head.architecture)
    recipe = {"auto_class": auto, "architecture": head.architecture, "base_config": base_config,
              "vocab_size": cfg.vocab_size + extra_rows, "pad_token_id": pad_id, "task": task,
              "note": "load the pre-trained run's export (`pretrain export RUN`) with base_config's fields, "
                      "resize its token embeddings to vocab_size where larger, set config.pad_token_id, "
                      "then apply the adapter"}
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora.save_pretrained(str(tmp))
        _write_tokenizer(tmp, tok, hf_mapping(cfg), cfg, pair=True, lead_cls=spec.bidirectional, pad=pad)
        (tmp / "pretrain_adapter.json").write_text(json.dumps(recipe, indent=2))
        kwargs = ", ".join(f"{k}={v!r}" for k, v in base_config.items())
        resize = (f"\nbase.resize_token_embeddings({cfg.vocab_size + extra_rows})  # (the pad token's row)"
                  if extra_rows else "") + "\nbase.config.pad_token_id = tok.pad_token_id"
        (tmp / "README.md").write_text("\n".join([
            f"# LoRA adapter: {TASK_NAMES.get(task, task)}", "",
            f"A PEFT LoRA adapter (rank {peft_cfg.r}) fine-tuned with `pretrain finetune --lora`, for the "
            f"pre-trained run's Hugging Face export (`pretrain export RUN --out BASE`) loaded as a "
            f"`{head.architecture}`; the task head (`{head.head}`) is saved whole.", "",
            "```python", "from peft import PeftModel",
            f"from transformers import AutoTokenizer, {auto}", "",
            "tok = AutoTokenizer.from_pretrained(ADAPTER)  # the fine-tune's layout and pad token",
            f"base = {auto}.from_pretrained(BASE, {kwargs}){resize}",
            "model = PeftModel.from_pretrained(base, ADAPTER).eval()", "```", "",
            "Fine-tuning configuration:", "", "```yaml",
            yaml.safe_dump(info.get("config") or {}, sort_keys=False).rstrip(), "```", ""]),
            encoding="utf-8")
        default_mode(tmp)
        old = out.parent / f".{out.name}.old{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return recipe
