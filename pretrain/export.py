"""Hugging Face layout: map our models onto stock `transformers` architectures.

Each architecture's spec (models/*_spec.py) holds its mapping (:class:`pretrain.models.spec.HFMapping`): the
config.json, the state-dict names both ways, the Auto class, the tokenizer's special-token roles. This module
writes and reads the files: weights (sharded above a size), configs, the tokenizer (text models) or the image
preprocessor (image models: ``preprocessor_config.json``), model card.

One architecture can map onto several `transformers` classes (a ViT with its MAE decoder is a
``ViTMAEForPreTraining``, with a classifier a ``ViTForImageClassification``): the spec's config.json names the
class (``architectures``), and the Auto class that loads it follows from that name (:func:`auto_class`).

A fine-tuned model (a ``pretrain finetune`` folder) exports where its architecture's mapping has a class for
its task (``HFMapping.tasks``; question answering for now: ``LlamaForQuestionAnswering``,
``GPT2ForQuestionAnswering``, ``ModernBertForQuestionAnswering``), with a tokenizer that lays out a
(question, context) pair as the model was fine-tuned on it.
"""

from __future__ import annotations

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


def to_hf_task_state_dict(model: nn.Module, head: HFTask) -> dict[str, torch.Tensor]:
    """A fine-tuned TaskModel's weights under the names of ``head``'s class: the backbone's (as its mapping
    names them) under the class's prefixes, the classifier as its output layer; the pre-training head
    (except the part the class keeps, ModernBERT's head transform) left out."""
    out: dict[str, torch.Tensor] = {}
    for k, v in to_hf_state_dict(model.backbone).items():
        for src, dst in head.base:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
    for k, v in model.classifier.state_dict().items():
        out[f"{head.head}.{k}"] = v.detach().contiguous()
    return out


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
    for key, name in (("bias", "crows-pairs.json"), ("weat", "weat.json")):  # `pretrain bias`'s last reports
        report = Path(str(ckpt)).parent.parent / "bias" / name
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
    class its architecture's mapping names for the task (``HFMapping.tasks``): for question answering an
    ``AutoModelForQuestionAnswering`` whose start / end logits are the fine-tune's, and a tokenizer that lays
    out (question, context) as fine-tuning did (``[CLS] question [SEP] context [SEP]`` for encoders,
    ``question <eot> context <eot>`` for decoders; padding on the right, no token type ids). Other tasks
    are refused with one error. ``out``, ``overwrite``, ``dtype``, ``max_shard_bytes``: as
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
        raise PretrainError(f"{ft_dir} is a fine-tune for {task}: only question-answering fine-tunes "
                            "(`pretrain finetune --task qa`) export to the Hugging Face layout for now")
    try:  # (its own checks: a missing or corrupt finetune.json, weights or tokenizer)
        model, info, tok = load_finetuned(ft_dir)
        cfg = from_dict(Config, info["backbone"])
        qa = {k: info["qa"][k] for k in QA_SETTINGS}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PretrainError(f"{info_file} is corrupt or incomplete ({type(e).__name__}: {e})") from None
    head = hf_task(cfg.model, info["task"])
    if bool(info.get("head_features")) != head.head_features:
        raise PretrainError(f"{ft_dir}: {head.architecture} {'applies' if head.head_features else 'has no'} "
                            "head transform before its classifier, but this fine-tune "
                            f"{'did not' if head.head_features else 'did'} (finetune.json head_features "
                            f"{info.get('head_features')!r}): it cannot be exported exactly")
    best = info.get("best") if isinstance(info.get("best"), dict) else {}
    meta = {"step": best.get("step", 0), "config": info["backbone"],
            "finetune": {**info, "qa": qa, "best": best}}
    return export_model(model, cfg, out, tok=tok, meta=meta, name=ft_dir.resolve().name, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite, inputs=[ft_dir],
                        task=info["task"])


EXPORT_TASKS = ("qa",)
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
    # the config and weights first: a model that cannot be exported (a ResNet's 'small' stem) fails here,
    # before anything is written
    if images:
        special: dict[str, Any] = {"mask_ratio": cfg.image.mask_ratio,
                                   "norm_pix_loss": cfg.image.norm_pix_loss}
    else:
        special = {"eot_id": tok.eot_id, "pad_id": tok.pad_id, "cls_id": tok.cls_id, "mask_id": tok.mask_id}
    config = {**hf_config_dict(cfg.model, special),
              "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
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
        config.update({**dict(head.config), "architectures": [head.architecture], "num_labels": n_out,
                       "id2label": {str(i): f"LABEL_{i}" for i in range(n_out)},
                       "label2id": {f"LABEL_{i}": i for i in range(n_out)}, "tie_word_embeddings": False})
    architecture = (config.get("architectures") or [hf.architecture])[0]
    auto, pipeline_tag = auto_class(hf, architecture, spec.modality)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hf_sd = to_hf_task_state_dict(model, head) if head is not None else to_hf_state_dict(model)
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
            gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "do_sample": True,
                   "temperature": 0.8, "top_k": 50, "max_length": cfg.model.max_seq_len}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if images:
            pre = image_processor_config(cfg.model)
            (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        else:
            _write_tokenizer(tmp, tok, hf, cfg.model, pair=head is not None and head.task == "qa",
                             lead_cls=spec.bidirectional)
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
                     lead_cls: bool = False) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a text model. ``pair``: a
    (question, context) pair model: the tokenizer adds the fine-tuning layout's special tokens
    (``[CLS] A <eot> B <eot>`` with ``lead_cls`` where the tokenizer has a [CLS], else ``A <eot> B <eot>``;
    a single text ``[CLS] A <eot>`` / ``A <eot>``) and pads on the right (the question-answering pipeline
    then puts the question first). No tokenizer gives token type ids (our models have none; transformers 4.x
    would hand them to the model, and GPT-2 adds them to its embeddings)."""
    if pair:
        _pair_tokenizer(tok, lead_cls).save(str(folder / "tokenizer.json"))
    else:
        tok.save(folder / "tokenizer.json")
    names = {}
    for key, attr in hf.token_roles.items():
        tid = getattr(tok, attr)
        if tid is not None:
            names[key] = tok.tk.id_to_token(tid)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
               "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
               "model_input_names": ["input_ids", "attention_mask"], **names}
    if pair:
        tok_cfg["padding_side"] = "right"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2))


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
             else _usage(hf, arch, auto, pipeline_tag, images))
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


TASK_NAMES = {"qa": "extractive question answering"}


def _finetune_section(ft: dict[str, Any], spec: ArchSpec) -> list[str]:
    """The model card's account of a fine-tune (its finetune.json ``ft``)."""
    import yaml

    windows = ft.get("windows") or {}
    lines = ["## Fine-tuning", "",
             f"- {ft.get('train_examples', 0):,} training questions ({windows.get('train', 0):,} windows), "
             f"{ft.get('valid_examples', 0):,} validation questions"]
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
