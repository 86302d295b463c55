"""Fine-tune a pre-trained run on labelled data: ``finetune(run, train, valid, out, cfg)``.

Adapts the run's backbone (or a random init of the same architecture with ``from_scratch``) to sequence
classification, regression or token classification; full fine-tuning, head-only, or LoRA adapters (peft);
layer-wise learning-rate decay; early stopping on the validation metric; the best model kept in OUT
(model.safetensors + finetune.json + tokenizer.json) and one metrics.jsonl line per evaluation; with a
test set, the best model scored on it once at the end.

What the run reads decides the data (its spec's ``modality``): text runs take tables / CoNLL files
(finetune/encode.py); image runs take prepared image directories, ``DIR`` or ``DIR@SPLIT``
(finetune/images.py: normalised pixels, a light random resized crop). One loop trains both, through the
job's ``inputs`` (:class:`TextInputs` or ``images.ImageInputs``): its batches, its validation predictions.

Built from the parts pre-training uses: the schedule (optim.schedule, linear to 0), gradient clipping
(distributed.clip_grad_norm_), the divergence rule and the metrics writer (metrics.py), the device and
autocast (hardware.py), atomic writes (io.py).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import ConfigError, FinetuneConfig, dump_yaml
from pretrain.distributed import clip_grad_norm_
from pretrain.finetune.data import TaskDataError, check_known, label_names
from pretrain.finetune.encode import (
    IGNORE,
    Encoded,
    _batch,
    _encode_task,
    _labels_of,
    length_batches,
    read_task,
    verbalizer_ids,
)
from pretrain.finetune.metrics import compute_metrics
from pretrain.finetune.model import TaskModel, _apply_lora, carry_head, load_backbone
from pretrain.finetune.predict import FT_FILE, run_model, save_finetuned
from pretrain.hardware import autocast_context, resolve_device, tune_cpu_allocator
from pretrain.io import check_output_dir, write_json_atomic, write_text_atomic
from pretrain.metrics import Metrics, Progress, divergence
from pretrain.models import spec_of
from pretrain.optim import scale_lr, schedule

KEPT = "the best model saved, if any, is from before"


@dataclass
class TaskData:
    """The task's examples, label names (none for regression) and their encodings."""

    train: Any
    valid: Any
    names: list[Any]
    tr: Encoded | None = None
    va: Encoded | None = None


def read_data(cfg: FinetuneConfig, train_path: str | Path, valid_path: str | Path,
              train_subset: list[int] | None, valid_subset: list[int] | None = None) -> TaskData:
    """Both files read (the rows ``*_subset`` of them, if given) and their labels checked: numeric for
    regression, at least two classes, no validation label unseen in training."""
    train_ex = read_task(cfg, train_path)
    valid_ex = train_ex if Path(valid_path) == Path(train_path) else read_task(cfg, valid_path)
    if train_subset is not None:
        train_ex = train_ex.subset(train_subset)
    if valid_subset is not None:
        valid_ex = valid_ex.subset(valid_subset)
    if cfg.task == "qa":
        return TaskData(train_ex, valid_ex, [])
    if cfg.task == "regression":
        for ex, where in ((train_ex, train_path), (valid_ex, valid_path)):
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ex.labels):
                raise TaskDataError(f"{where}: regression needs finite numeric labels in "
                                    f"{cfg.label_column!r}")
        return TaskData(train_ex, valid_ex, [])
    names = label_names(_labels_of(cfg, train_ex))
    if len(names) < 2 and cfg.task == "classification":
        raise TaskDataError(f"{train_path}: classification needs at least two labels, found {names}")
    check_known(_labels_of(cfg, valid_ex), names, str(valid_path))
    return TaskData(train_ex, valid_ex, names)


@dataclass
class FtJob:
    """Everything a fine-tuning run needs, built before its loop."""

    cfg: FinetuneConfig
    out: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: TaskData
    device: torch.device
    pad: int
    total: int
    """Steps trained."""
    warmup: int
    info: dict[str, Any]
    """finetune.json's content (without the best evaluation)."""
    tok: Any
    progress: Progress
    n_train: int = 0
    """Parameters trained (all, the head's, or LoRA's), of n_total."""
    n_total: int = 0
    metrics: Metrics | None = None
    schedule_total: int = 0
    """Steps the LR schedule spans (>= total: cfg.schedule_epochs stops training part-way)."""
    inputs: Any = None
    """The data as the loop sees it (:class:`TextInputs`, ``images.ImageInputs``)."""
    class_weights: torch.Tensor | None = None
    """Per-class loss weights (cfg.class_weights 'auto'), or None."""
    replay: Any = None
    """Pre-training batches mixed in (``forgetting.Replay``, cfg.replay), or None."""


class TextInputs:
    """Text data as the loop sees it: length-bucketed batches of token ids, predictions on the validation
    examples."""

    def __init__(self, cfg: FinetuneConfig, data: TaskData, pad: int):
        self.cfg, self.data, self.pad = cfg, data, pad

    @property
    def n_train(self) -> int:
        return len(self.data.tr.ids)

    def targets(self) -> list[Any]:
        return self.data.tr.targets

    def batches(self, rng: random.Random) -> list[list[int]]:
        return length_batches([len(r) for r in self.data.tr.ids], self.cfg.batch_size, rng)

    def batch(self, idx: list[int], device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The model's inputs (ids, mask) and the targets of training examples ``idx``."""
        cfg, tr = self.cfg, self.data.tr
        if cfg.task == "token":
            x, mask, y = _batch([tr.ids[i] for i in idx], self.pad, [tr.targets[i] for i in idx])
        else:
            x, mask, _ = _batch([tr.ids[i] for i in idx], self.pad)
            y = torch.tensor([tr.targets[i] for i in idx],
                             dtype=torch.float32 if cfg.task == "regression" else torch.long)
        return (x.to(device), mask.to(device)), y.to(device)

    def predict(self, model: nn.Module, device: torch.device) -> tuple[list[Any], Any]:
        """Predictions on the validation examples and their scores (class probabilities, ...)."""
        cfg = self.cfg
        return run_model(model, self.data.va, cfg.task, self.data.names, self.pad, cfg.batch_size * 2, device,
                         cfg.dtype)

    def gold(self) -> list[Any]:
        cfg, valid = self.cfg, self.data.valid
        return _labels_of(cfg, valid) if cfg.task != "token" else valid.tags


class QAInputs(TextInputs):
    """Question answering as the loop sees it: length-bucketed batches of windows with their start / end
    targets and the positions an answer may take; the validation questions decoded into answers
    (finetune/qa.py)."""

    def __init__(self, cfg: FinetuneConfig, data: TaskData, pad: int, encoder: bool, null: bool):
        from pretrain.finetune.qa import null_in_softmax

        super().__init__(cfg, data, pad)
        self.null = null
        self.with_null = null_in_softmax(encoder, null)

    def batch(self, idx: list[int], device: torch.device):
        from pretrain.finetune.qa import allowed_positions

        tr = self.data.tr
        x, mask, _ = _batch([tr.ids[i] for i in idx], self.pad)
        allowed = allowed_positions(tr, idx, x.shape[1], self.with_null)
        y = (torch.tensor([tr.start[i] for i in idx]), torch.tensor([tr.end[i] for i in idx]), allowed)
        return (x.to(device), mask.to(device)), tuple(v.to(device) for v in y)

    def loss(self, logits: torch.Tensor, y) -> torch.Tensor:
        from pretrain.finetune.qa import qa_loss

        return qa_loss(logits, *y)

    def predict(self, model: nn.Module, device: torch.device) -> tuple[list[str], list[Any]]:
        from pretrain.finetune.qa import decode, window_logits

        va, ex = self.data.va, self.data.valid
        logits = window_logits(model, va, self.pad, self.cfg.batch_size * 2, device, self.cfg.dtype)
        answers = decode(ex, va, logits, self.with_null, self.null, self.cfg)
        return [a.text for a in answers], answers

    def gold(self) -> list[list[str]]:
        return _labels_of(self.cfg, self.data.valid)


def class_weights(targets: list[int] | Any, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, n / (classes present x count) (sklearn's 'balanced'); 0 for a class with no
    training example (it is never a target)."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=n_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def build(run: str | Path, out: Path, cfg: FinetuneConfig, data: TaskData, quiet: bool,
          loaded: tuple | None = None) -> FtJob:
    """The task model on the run's backbone (LoRA or frozen as asked), the encoded data, the optimizer with
    layer-wise learning rates, and the step budget. ``loaded``: :func:`load_backbone`'s result, if the caller
    has it."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    backbone, pcfg, tok, ckpt = loaded or load_backbone(run, cfg.dropout, cfg.from_scratch, cfg.seed)
    spec = spec_of(backbone)
    if spec.modality == "images":
        from pretrain.finetune.images import build_images

        return build_images(run, out, cfg, data, quiet, device, backbone, pcfg, ckpt)
    if cfg.task == "qa":
        return build_qa(out, cfg, data, quiet, device, backbone, pcfg, tok, ckpt)
    if cfg.metric == "roc_auc" and len(data.names) != 2:
        raise ConfigError(f"metric roc_auc is for two classes; the task has {len(data.names)}")
    encoder = spec.bidirectional
    ctx = pcfg.model.max_seq_len
    if cfg.max_length > ctx:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's context of {ctx} tokens")
    max_len = cfg.max_length or ctx
    pooling = cfg.pooling if cfg.pooling != "auto" else spec.pooling
    if pooling == "cls" and not encoder:
        raise ConfigError("cls pooling needs an encoder (masked-LM) run; use last or mean for a decoder")
    names = data.names
    n_out = 1 if cfg.task == "regression" else len(names)
    label_ids = verbalizer_ids(tok, cfg.verbalizer, names, encoder) if cfg.prompt else None
    if cfg.prompt and cfg.head_only:
        raise ConfigError("head_only has no head to train with a prompt (the LM head is the backbone's); "
                          "use lora")
    # the head of the stock transformers class the task exports as, where the architecture has one
    # (ModernBERT: the pre-trained head transform first; Llama / GPT-2 sequence classifiers: no bias)
    hf_head = spec.hf.task(cfg.task) if spec.hf is not None and label_ids is None else None
    head_features = hf_head is not None and hf_head.head_features and hasattr(backbone, "head_features")
    head_bias = hf_head is None or hf_head.head_bias
    torch.manual_seed(cfg.seed)
    model: nn.Module = TaskModel(backbone, pcfg.model.d_model, n_out, pooling, encoder, cfg.dropout,
                                 token_level=cfg.task == "token", label_ids=label_ids, mask_id=tok.mask_id,
                                 head_features=head_features, bias=head_bias)
    model = adapt(model, cfg, device)
    data.tr = _encode_task(cfg, tok, encoder, max_len, data.train, names)
    data.va = _encode_task(cfg, tok, encoder, max_len, data.valid, names)
    info = {"format": 1, "task": cfg.task, "labels": names, "pooling": pooling, "encoder": encoder,
            "head_features": head_features, "head_bias": head_bias,
            "token_label": ("first" if encoder else "last") if cfg.task == "token" else None,
            "prompt": None if label_ids is None else {"label_ids": label_ids, "mask_id": tok.mask_id},
            "max_length": max_len, "config": dataclasses.asdict(cfg), "backbone": pcfg.to_dict(),
            "pretrained_from": None if cfg.from_scratch else str(ckpt), "train_examples": len(data.tr.ids),
            "valid_examples": len(data.va.ids),
            "truncated": {"train": data.tr.truncated, "valid": data.va.truncated},
            "tokenizer_sha256": tok.sha256()}
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    tr, va = data.tr, data.va
    return assemble(FtJob(cfg, out, model, None, data, device, pad, 0, 0, info, tok, None,  # type: ignore
                          inputs=TextInputs(cfg, data, pad)),
                    pcfg.model.n_layer, quiet, len(names),
                    f"fine-tuning {'a random init of ' if cfg.from_scratch else ''}{ckpt} for {cfg.task}: "
                    f"{len(tr.ids):,} train / {len(va.ids):,} valid examples, {n_out} output(s), ",
                    (f"; truncated to {max_len} tokens: {tr.truncated} train, {va.truncated} valid"
                     if tr.truncated or va.truncated else ""))


def build_qa(out: Path, cfg: FinetuneConfig, data: TaskData, quiet: bool, device: torch.device,
             backbone: nn.Module, pcfg, tok, ckpt) -> FtJob:
    """:func:`build` for extractive question answering: a start/end head at every position (after the
    backbone's head transform where it has one, as Hugging Face's ModernBERT), windows of the contexts."""
    from pretrain.finetune.qa import encode_qa

    spec = spec_of(backbone)
    encoder = spec.bidirectional
    ctx = pcfg.model.max_seq_len
    if cfg.max_length > ctx:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's context of {ctx} tokens")
    max_len = cfg.max_length or ctx
    null = data.train.unanswerable > 0  # SQuAD 2.0: the model learns to answer nothing
    torch.manual_seed(cfg.seed)
    head_features = hasattr(backbone, "head_features")
    model: nn.Module = TaskModel(backbone, pcfg.model.d_model, 2, "none", encoder, cfg.dropout,
                                 token_level=True, head_features=head_features)
    if not cfg.from_scratch:
        carry_head(model, ckpt, "qa")
    model = adapt(model, cfg, device)
    data.tr = encode_qa(tok, data.train, encoder, max_len, cfg, null, train=True)
    data.va = encode_qa(tok, data.valid, encoder, max_len, cfg, null, train=False)
    if not data.tr.ids:
        raise TaskDataError(f"no training window holds its answer within --max-length {max_len} tokens")
    qa = {"doc_stride": cfg.doc_stride, "max_answer_length": cfg.max_answer_length, "n_best": cfg.n_best,
          "null_threshold": cfg.null_threshold, "null": null}
    info = {"format": 1, "task": "qa", "labels": [], "pooling": "none", "encoder": encoder,
            "head_features": head_features, "qa": qa, "prompt": None,
            "max_length": max_len, "config": dataclasses.asdict(cfg), "backbone": pcfg.to_dict(),
            "pretrained_from": None if cfg.from_scratch else str(ckpt),
            "train_examples": len(data.train), "valid_examples": len(data.valid),
            "windows": {"train": len(data.tr.ids), "valid": len(data.va.ids)},
            "skipped": {"train": data.train.skipped + data.tr.skipped,
                        "valid": data.valid.skipped + data.va.skipped},
            "truncated": {"train": 0, "valid": 0}, "tokenizer_sha256": tok.sha256()}
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    return assemble(FtJob(cfg, out, model, None, data, device, pad, 0, 0, info, tok, None,  # type: ignore
                          inputs=QAInputs(cfg, data, pad, encoder, null)),
                    pcfg.model.n_layer, quiet, 0,
                    f"fine-tuning {'a random init of ' if cfg.from_scratch else ''}{ckpt} for question "
                    f"answering: {len(data.train):,} train questions ({len(data.tr.ids):,} windows) / "
                    f"{len(data.valid):,} valid ({len(data.va.ids):,} windows)"
                    + (f", {data.train.unanswerable:,} unanswerable" if null else "") + ", ")


def model_of(model: nn.Module) -> nn.Module:
    """The task model inside a LoRA wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapt(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """The task model as ``cfg`` trains it: its backbone frozen (head_only) or LoRA adapters added, on
    ``device``."""
    if cfg.save_adapter:  # (refused before training where the adapter could not be written)
        from pretrain.export import check_adapter

        check_adapter(model, cfg.task)
    if cfg.head_only:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if cfg.lora:
        model = _apply_lora(model, cfg)
    model.to(device)
    return model


def assemble(job: FtJob, n_layers: int, quiet: bool, n_classes: int, start: str, end: str = "") -> FtJob:
    """The rest of a job, whatever its inputs: the step budget and schedule, the optimizer with layer-wise
    learning rates, the class weights, the progress line (``start`` + parameters trained + ``end``)."""
    cfg, model, device = job.cfg, job.model, job.device
    steps_per_epoch = math.ceil(job.inputs.n_train / cfg.batch_size)
    total = (steps_per_epoch * cfg.epochs if not cfg.max_steps
             else min(cfg.max_steps, steps_per_epoch * cfg.epochs))
    job.optimizer = torch.optim.AdamW(param_groups(model, cfg, n_layers), betas=(0.9, 0.98), eps=1e-6,
                                      fused=device.type == "cuda")
    span = max(total, steps_per_epoch * cfg.schedule_epochs)
    job.total, job.warmup, job.schedule_total = total, int(cfg.warmup_frac * span), span
    job.progress = Progress(total, 0, quiet)
    if cfg.class_weights == "auto":
        job.class_weights = class_weights(job.inputs.targets(), n_classes).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    job.progress.write(start + f"{n_train:,} of {n_total:,} parameters trained"
                       + (" (LoRA)" if cfg.lora else "") + end)
    job.n_train, job.n_total = n_train, n_total
    return job


def param_groups(model: nn.Module, cfg: FinetuneConfig, n_layers: int) -> list[dict[str, Any]]:
    """AdamW groups: layer-wise learning rates (the head at head_lr), weight decay on matrices other than
    embeddings and the head; each group's peak as ``base_lr`` for the schedule."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    inner = model_of(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = inner.layer_of(name.removeprefix("base_model.model."))
        is_head = depth == n_layers + 1
        lr = (cfg.head_lr or cfg.lr) if is_head else cfg.lr * cfg.layer_decay ** (n_layers - depth)
        wd = cfg.weight_decay if p.ndim >= 2 and not inner.is_embedding(name) and not is_head else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd, "base_lr": lr} for (lr, wd), ps in groups.items()]


def finetune(run: str | Path, train_path: str | Path, valid_path: str | Path, out: str | Path,
             cfg: FinetuneConfig | None = None, train_subset: list[int] | None = None,
             quiet: bool = False, overwrite: bool = False,
             valid_subset: list[int] | None = None, test_path: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune ``run`` on ``train_path``, select on ``valid_path``; the best model goes to ``out``: a new or
    empty folder or an earlier fine-tune, or with ``overwrite`` any other folder but the inputs' own.
    ``train_subset`` / ``valid_subset``: use only these rows of the files (``valid_path`` may then be
    ``train_path``: a validation split carved from the training file). ``test_path``: scored once by the best
    model at the end (the result's and finetune.json's ``test``); it chooses nothing.

    An image run takes prepared image directories: ``DIR`` (its 'train', 'val' and 'test' split for the
    three roles) or ``DIR@SPLIT``; the rows are images of the split."""
    from pretrain.features import image_data, is_image_data
    from pretrain.finetune.model import run_modality

    cfg = cfg or FinetuneConfig()
    if cfg.report_to:  # a tracker's missing package: an error before any work
        from pretrain.trackers import require

        require(cfg.report_to, "report_to")
    out = Path(out)
    paths = [p for p in (train_path, valid_path, test_path) if p is not None]
    images = run_modality(run) == "images"
    check_output_dir(out, "finetune", [run, *(image_data(p, "train")[0] if is_image_data(p) else p
                                              for p in paths)], overwrite)
    if cfg.max_train and train_subset is None:
        train_subset = max_train_subset(cfg, run, train_path)
    loaded = None
    if images:
        from pretrain.finetune.images import read_image_task

        loaded = load_backbone(run, cfg.dropout, cfg.from_scratch, cfg.seed)
        data = read_image_task(cfg, run, loaded[1].model, train_path, valid_path, train_subset, valid_subset)
    else:
        for p in paths:
            if is_image_data(p):
                raise TaskDataError(f"{p} is a prepared image directory, but {run} is a text run: fine-tune "
                                    "it on text (CSV/TSV/JSONL/Parquet, CoNLL), or the images with an image "
                                    "run")
        data = read_data(cfg, train_path, valid_path, train_subset, valid_subset)
    job = build(run, out, cfg, data, quiet, loaded)
    probe, why = _forgetting_setup(job)
    before = None if probe is None else probe.loss(model_of(job.model).backbone, job.device, cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    # a folder used before: no finetune.json until this run saves a model
    for stale in ("metrics.jsonl", FT_FILE):
        (out / stale).unlink(missing_ok=True)
    write_text_atomic(out / "finetune.yaml", dump_yaml(dataclasses.asdict(cfg)))
    job.metrics = Metrics(out / "metrics.jsonl", keep_upto_step=0)
    failed = True
    try:
        if cfg.report_to:
            from pretrain.trackers import open_trackers

            params = {**dataclasses.asdict(cfg), "run": str(run), "train": str(train_path),
                      "valid": str(valid_path)}
            job.metrics.trackers = open_trackers(cfg.report_to, out, params, None, job.progress.write)
        res = loop(job)
        failed = False
    finally:
        job.metrics.close(failed=failed)
        job.progress.close()
    res["forgetting"] = record_forgetting(out, job, probe, before, why)
    res["train_examples"] = job.info.get("train_examples")
    if test_path is not None:
        res["test"] = score_test(out, test_path, cfg)
    return res


def max_train_subset(cfg: FinetuneConfig, run: str | Path, train_path: str | Path) -> list[int] | None:
    """The training rows ``cfg.max_train`` keeps: a random subset drawn with ``cfg.seed`` (classification:
    every class keeps a row), as ``pretrain probe --max-train`` draws it; None when there are no more rows."""
    from pretrain.finetune.recipe import read_labelled
    from pretrain.finetune.transfer import sample_budget

    full = read_labelled(cfg, run, train_path)
    if cfg.max_train >= len(full):
        return None
    return sample_budget(full.labels if cfg.task == "classification" else None, cfg.max_train, cfg.seed,
                         len(full))


def _forgetting_setup(job: FtJob) -> tuple[Any, str]:
    """The forgetting probe (or None and why not) and the replay batches of ``job`` (finetune/forgetting.py);
    finetune.json records the objective the backbone was pre-trained with (a later fine-tune of this one
    reads it there)."""
    from pretrain.config import Config, from_dict
    from pretrain.finetune import forgetting

    cfg = job.cfg
    pcfg = from_dict(Config, job.info["backbone"])
    ckpt = job.info.get("pretrained_from")
    objective = forgetting.pretraining_objective(ckpt, pcfg) if ckpt else pcfg.objective
    job.info["pretraining_objective"] = objective
    if cfg.replay:
        job.replay = forgetting.Replay(cfg, pcfg, job.tok, objective, cfg.head_only)
    return forgetting.probe(pcfg, job.tok, objective, cfg)


def record_forgetting(out: Path, job: FtJob, probe, before: dict[str, float] | None,
                      why: str) -> dict[str, Any]:
    """The pre-training validation loss of the model kept (the best evaluation's, as saved in ``out``) against
    ``before``; recorded in finetune.json's ``forgetting`` (or why it was not measured)."""
    import json

    from pretrain.finetune import forgetting
    from pretrain.finetune.predict import load_finetuned

    if probe is None:
        rec: dict[str, Any] = {"not_measured": why}
        if job.replay is not None:
            rec["replay"] = job.replay.summary(job.cfg)
    else:
        kept, _, _ = load_finetuned(out, job.device)
        after = probe.loss(kept.backbone, job.device, job.cfg.dtype)
        rec = forgetting.report(before, after, probe, job.replay, job.cfg)
    info = json.loads((out / FT_FILE).read_text(encoding="utf-8"))
    info["forgetting"] = rec
    write_json_atomic(out / FT_FILE, info)
    return rec


def score_test(out: Path, test_path: str | Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """The best model (as saved in ``out``) scored on ``test_path``, recorded in finetune.json's ``test``."""
    import json

    from pretrain.finetune.predict import evaluate_finetuned

    m = evaluate_finetuned(out, test_path, device=cfg.device, dtype=cfg.dtype)
    info = json.loads((out / FT_FILE).read_text(encoding="utf-8"))
    info["test"] = m
    write_json_atomic(out / FT_FILE, info)
    return m


def loop(job: FtJob) -> dict[str, Any]:
    """Epochs of shuffled, length-bucketed batches; evaluations ``evals_per_epoch`` times an epoch (and after
    a zero-shot prompt's first look), early stopping after ``patience`` evaluations without a better
    metric."""
    cfg = job.cfg
    loss_fn = (nn.MSELoss() if cfg.task == "regression"
               else nn.CrossEntropyLoss(weight=job.class_weights, ignore_index=IGNORE))
    params = [p for p in job.model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(job.inputs.n_train / cfg.batch_size)
    # evals_per_epoch 0: one evaluation, after the last step
    eval_at = {round(steps_per_epoch * (k + 1) / cfg.evals_per_epoch) for k in range(cfg.evals_per_epoch)}
    rng = random.Random(cfg.seed)
    ev = Evaluator(job)
    step, stop, bad_evals, best_trained = 0, "epochs", 0, None
    if cfg.prompt:  # the prompt works before any training: that zero-shot figure is the first evaluation
        ev(0.0, step, None)
    for epoch in range(cfg.epochs):
        job.model.train()
        loss_sum, loss_n = 0.0, 0
        for b, idx in enumerate(job.inputs.batches(rng)):
            scale_lr(job.optimizer, schedule(step, 1.0, 0.0, job.warmup, job.schedule_total, "linear"))
            loss = _loss(job, loss_fn, idx)
            loss.backward()
            grad_norm = clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            job.optimizer.step()
            job.optimizer.zero_grad(set_to_none=True)
            if job.replay is not None:
                _replay_steps(job, params, step + 1)
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            for what, value in (("loss", loss_sum), ("gradient norm", float(grad_norm))):
                if not math.isfinite(value):
                    raise divergence("fine-tuning", step, what, value, "--lr", KEPT)
            job.progress.update(step, {"loss": f"{loss_sum / loss_n:.4f}"}, line=False)
            last = step >= job.total
            if (b + 1) in eval_at or last:
                metric = ev(epoch + (b + 1) / steps_per_epoch, step, loss_sum / max(loss_n, 1))
                loss_sum, loss_n = 0.0, 0
                # patience counts from the first trained evaluation:
                # a zero-shot start may beat the first epochs
                bad_evals = 0 if best_trained is None or metric > best_trained else bad_evals + 1
                best_trained = metric if best_trained is None else max(best_trained, metric)
                if cfg.patience and bad_evals >= cfg.patience:
                    stop = "early_stopping"
                    break
            if last:
                stop = "max_steps" if cfg.max_steps and step >= cfg.max_steps else stop
                break
        if stop != "epochs" or step >= job.total:
            break
    assert ev.best is not None
    return {"out": str(job.out), "task": cfg.task, "best": ev.best, "final": ev.history[-1], "steps": step,
            "stop_reason": stop,
            "elapsed_s": round(time.time() - ev.t0, 2), "trained_params": job.n_train,
            "total_params": job.n_total, "truncated": job.info.get("truncated"),
            "from_scratch": cfg.from_scratch, "history": ev.history}


def _replay_steps(job: FtJob, params: list[nn.Parameter], step: int) -> None:
    """The pre-training steps due after a task step (cfg.replay_frac of all steps), at the same learning
    rate, on the backbone's own objective."""
    cfg = job.cfg
    backbone = model_of(job.model).backbone
    for _ in range(job.replay.due()):
        loss = job.replay.loss(backbone, job.device, cfg.dtype)
        loss.backward()
        grad_norm = clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        value = loss.item()
        for what, v in (("replay loss", value), ("replay gradient norm", float(grad_norm))):
            if not math.isfinite(v):
                raise divergence("fine-tuning", step, what, v, "--lr", KEPT)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.replay.loss_sum += value


def _loss(job: FtJob, loss_fn: nn.Module, idx: list[int]) -> torch.Tensor:
    cfg = job.cfg
    args, y = job.inputs.batch(idx, job.device)
    with autocast_context(job.device, cfg.dtype):
        logits = job.model(*args)
    if cfg.task == "regression":
        return loss_fn(logits.squeeze(-1), y)
    if hasattr(job.inputs, "loss"):  # (question answering: start and end over the allowed positions)
        return job.inputs.loss(logits, y)
    return loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class Evaluator:
    """One validation pass: a metrics.jsonl line, the model saved when it is the best so far."""

    def __init__(self, job: FtJob):
        self.job, self.t0 = job, time.time()
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []

    def __call__(self, epoch_at: float, step: int, train_loss: float | None) -> float:
        job, cfg = self.job, self.job.cfg
        # never evaluated, nor saved
        if not all(bool(torch.isfinite(p).all()) for p in job.model.parameters()):
            raise divergence("fine-tuning", step, "weights", float("nan"), "--lr", KEPT)
        preds, scores = job.inputs.predict(job.model, job.device)
        # class probabilities: the metrics that need them, for image runs and when selected
        probs = (scores if cfg.task == "classification" and not cfg.prompt
                 and (job.info.get("modality") == "images" or cfg.metric in ("balanced_accuracy", "roc_auc"))
                 else None)
        m = compute_metrics(cfg.task, preds, job.inputs.gold(), probs, job.data.names, cfg.metric)
        rec = {"epoch": round(epoch_at, 3), "step": step,
               "train_loss": None if train_loss is None else round(train_loss, 6),
               "elapsed_s": round(time.time() - self.t0, 2),
               **{f"val_{k}": round(v, 6) for k, v in m.items()}}
        job.metrics.write(rec)
        self.history.append(rec)
        improved = self.best is None or m["metric"] > self.best["val_metric"]
        job.progress.write(f"epoch {rec['epoch']:g} step {step}: "
                           + ("before training" if train_loss is None else f"train loss {train_loss:.4f}")
                           + f", val {' '.join(f'{k} {v:.4f}' for k, v in m.items() if k != 'metric')}"
                           + (" *" if improved else ""))
        if improved:
            self.best = rec
            save_finetuned(job.out, job.model, {**job.info, "best": rec}, job.tok)
            if job.cfg.save_adapter:  # (a PEFT adapter for the pre-trained run's export)
                from pretrain.export import ADAPTER_DIR, save_adapter

                save_adapter(job.out / ADAPTER_DIR, job.model, job.info, job.tok)
        job.model.train()
        return m["metric"]
