"""Pre-training: ``train(cfg, out_dir)`` = :func:`build` (everything a run needs, the config resolved once) →
a :class:`~pretrain.checkpoint.Checkpointer` (every stateful part saved and restored together) → :func:`loop`
(step, log, evaluate, checkpoint; one screen).

The same loop runs as one process or as several under ``torchrun`` (see pretrain/distributed.py): each rank
reads its own slice of every global batch, the model is wrapped (DDP or FSDP2) from outside, only rank 0
logs and writes files, and checkpoints are sharded (torch.distributed.checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pretrain import Interrupted, PretrainError
from pretrain.checkpoint import Checkpointer, TrainState
from pretrain.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    parse_sample_ranges,
)
from pretrain.data.loader import TokenSplit, eval_windows, train_loader
from pretrain.data.manifest import data_fingerprint, load_meta
from pretrain.data.tokenizer import Tokenizer
from pretrain.distributed import (
    DistEnv,
    all_reduce_mean_,
    all_reduce_sum_,
    any_rank,
    apply_activation_checkpointing,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    clip_grad_norm_,
    grad_sync,
    init_distributed,
    max_over_ranks,
    teardown,
    unwrap,
)
from pretrain.evaluation import evaluate
from pretrain.guard import SpikeGuard, parse_fault
from pretrain.hardware import (
    autocast_context,
    autocast_dtype,
    peak_flops,
    resolve_device,
    tune_cpu_allocator,
    use_compile,
)
from pretrain.io import exclusive_lock, write_text_atomic
from pretrain.metrics import Metrics, Progress, divergence, plot_metrics
from pretrain.models import build_model, get_spec
from pretrain.models.spec import specs
from pretrain.objectives import build_objective, padded_documents
from pretrain.optim import build_optimizer, lr_at, set_lr

# Keys that may change when a run is continued (they do not change what was trained so far).
RESUMABLE_KEYS = {"train.max_steps", "train.max_time_s", "train.time_schedule", "train.target_val_loss",
                  "train.stop_at_step", "train.eval_interval", "train.eval_batches", "train.log_interval",
                  "train.ckpt_interval", "train.keep_checkpoints", "train.plot", "train.threads",
                  "train.device", "train.compile", "data.path", "train.activation_checkpointing",
                  "train.prefetch",
                  # how the global batch is split over processes, and how they talk
                  # (checked: the global batch)
                  "train.grad_accum", "train.global_batch_size", "train.parallelism", "train.dist_timeout_s",
                  "train.consolidate",
                  # the spike guard and what to skip (they decide about the steps still to come)
                  "train.guard", "train.guard_z", "train.guard_warmup", "train.guard_window",
                  "train.guard_max_events", "train.guard_lr_scale", "train.skip_samples", "train.fault",
                  # where the scalars are reported besides metrics.jsonl
                  "train.report_to"}


# ----------------------------------------------------------------------------------------------------------
# the config, resolved once (the caller's is left as it was)


def is_images(meta: dict[str, Any]) -> bool:
    """Whether a prepared data directory's manifest is of images (else: tokens)."""
    return meta.get("kind") == "images"


def resolve_image_config(cfg: Config, meta: dict[str, Any]) -> Config:
    """Fill in what an image model takes from the data: image size, channels, pixel statistics, and the
    classification head's size (objective supervised; no head for mae, whose decoder other objectives
    drop)."""
    m, im = cfg.model, meta["image"]
    h, w, c = int(im["height"]), int(im["width"]), int(im["channels"])
    if h != w:
        raise ConfigError(f"{cfg.data.path} holds {h}x{w} images; image models take square ones: prepare "
                          "with --image-size N")
    for key, have in (("image_size", h), ("channels", c)):
        if getattr(m, key) not in (0, have):
            raise ConfigError(f"model.{key} {getattr(m, key)} does not match the data's {have} "
                              f"({cfg.data.path}); leave it at 0 to take it from the data, or prepare "
                              "with --image-size")
    classes = list(meta.get("classes") or [])
    n_classes = 0
    if cfg.objective == "supervised":
        if not classes or meta["splits"]["train"].get("labels") is None:
            raise ConfigError(f"objective supervised needs labelled images; {cfg.data.path} has no labels "
                              "(use objective mae for unlabelled images)")
        if m.num_classes not in (0, len(classes)):
            raise ConfigError(f"model.num_classes {m.num_classes} does not match the data's {len(classes)} "
                              "classes; leave it at 0")
        n_classes = len(classes)
    mean = m.image_mean or [float(v) for v in im["mean"]]
    std = m.image_std or [max(float(v), 1e-3) for v in im["std"]]
    if len(mean) != c:
        raise ConfigError(f"model.image_mean has {len(mean)} values for {c}-channel images")
    model = dataclasses.replace(m, image_size=h, channels=c, image_mean=mean, image_std=std,
                                num_classes=n_classes,
                                decoder_layers=m.decoder_layers if cfg.objective == "mae" else 0)
    return dataclasses.replace(cfg, model=model)


def resolve_config(cfg: Config, meta: dict[str, Any]) -> Config:
    """Fill in the values that come from the data (vocab size) and data.seq_len (max_seq_len); for images,
    :func:`resolve_image_config`."""
    if is_images(meta):
        return resolve_image_config(cfg, meta)
    m, data_vocab, seq_len = cfg.model, int(meta["tokenizer"]["vocab_size"]), cfg.data.seq_len
    if m.vocab_size and m.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than the data's tokenizer vocabulary "
                          f"({data_vocab}); leave it at 0 to take it from the data")
    if m.max_seq_len and m.max_seq_len < seq_len:
        raise ConfigError(f"data.seq_len {seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    return dataclasses.replace(cfg, model=dataclasses.replace(
        m, vocab_size=m.vocab_size or data_vocab, max_seq_len=m.max_seq_len or seq_len))


def _with_train(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def _from_hf(cfg: Config, meta: dict[str, Any]) -> tuple[Config, dict[str, torch.Tensor]]:
    """train.init_from: take the model section and weights from a Hugging Face directory, and check that the
    data was tokenized with that model's tokenizer."""
    from pretrain.export import load_hf

    hf_dir = Path(cfg.train.init_from)
    model_section, sd = load_hf(hf_dir)
    if get_spec(model_section["arch"]).modality == "images":
        return _from_hf_images(cfg, meta, hf_dir, model_section, sd)
    if not (hf_dir / "tokenizer.json").is_file():
        raise PretrainError(f"{hf_dir} has no tokenizer.json: the model's tokenizer is needed "
                            "to prepare the data")
    if Tokenizer.load(hf_dir).sha256() != meta["tokenizer"]["sha256"]:
        raise PretrainError(f"{cfg.data.path} was not tokenized with {hf_dir}'s tokenizer: prepare it with "
                            f"`pretrain prepare ... --tokenizer {hf_dir}`")
    if cfg.objective != "clm":
        raise ConfigError("train.init_from supports causal-LM (Llama-architecture) checkpoints: "
                          "objective clm")
    # the architecture comes from config.json: model.* values set (in a preset or on the command line) that
    # contradict it are ignored, and said so; dropout (not architecture) may be set for the continued training
    defaults, given = ModelConfig().__dict__, cfg.model.__dict__
    ignored = [f"model.{k}={v!r} (checkpoint: {model_section[k]!r})" for k, v in given.items()
               if k not in ("dropout", "max_seq_len") and k in model_section and v != defaults.get(k)
               and v != model_section[k]]
    if ignored:
        print(f"warning: train.init_from takes the architecture from {hf_dir / 'config.json'}; ignoring "
              + ", ".join(ignored), file=sys.stderr, flush=True)
    seq_len = cfg.data.seq_len
    if get_spec(model_section["arch"]).learned_positions and seq_len > model_section["max_seq_len"]:
        raise ConfigError(f"data.seq_len {seq_len} exceeds {hf_dir}'s {model_section['max_seq_len']} "
                          "learned positions (n_positions); use a seq_len of at most that")
    model = from_dict(ModelConfig, {**model_section,
                                    "dropout": given.get("dropout", model_section.get("dropout", 0.0)),
                                    "max_seq_len": max(model_section["max_seq_len"], seq_len)}, "model.")
    return dataclasses.replace(cfg, model=model), sd



def _from_hf_images(cfg: Config, meta: dict[str, Any], hf_dir: Path, section: dict[str, Any],
                    sd: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """train.init_from of a Hugging Face ViT / ViTMAE / ResNet: its architecture and pixel statistics, this
    run's objective (a classification head sized for the data; MAE's decoder as the checkpoint has it, or
    new); the images must have the checkpoint's size and channels."""
    if not is_images(meta):
        raise ConfigError(f"{hf_dir} is an image model ({section['arch']}); {cfg.data.path} holds tokens")
    spec = get_spec(section["arch"])
    if cfg.objective not in spec.objectives:
        raise ConfigError(f"{hf_dir} is a {section['arch']!r} model: objective must be one of "
                          f"{', '.join(spec.objectives)}, not {cfg.objective!r}")
    im = meta["image"]
    for key, have in (("image_size", im["height"]), ("channels", im["channels"])):
        if section.get(key) and section[key] != have:
            raise ConfigError(f"{hf_dir} takes images with {key} {section[key]}; {cfg.data.path} has {have}: "
                              f"prepare the images with --image-size {section.get('image_size')}")
    keep = {k: v for k, v in section.items() if k not in ("num_classes",)}
    if cfg.objective == "mae" and not section.get("decoder_layers"):  # a new decoder, of this run's size
        keep.pop("decoder_layers", None)
    model = from_dict(ModelConfig, {**dataclasses.asdict(cfg.model), **keep}, "model.")
    return dataclasses.replace(cfg, model=model), sd


# ----------------------------------------------------------------------------------------------------------
# the batch


def resolve_batch(tc, world_size: int) -> tuple[int, int]:
    """(micro-batches per step on each process, global batch in sequences) for ``world_size`` processes:
    batch_size x grad_accum x world_size = global_batch_size, grad_accum derived when global_batch_size is
    set."""
    if not tc.global_batch_size:
        return tc.grad_accum, tc.batch_size * tc.grad_accum * world_size
    per_micro = tc.batch_size * world_size
    accum, rest = divmod(tc.global_batch_size, per_micro)
    if rest or accum < 1:
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} is not a multiple of "
                          f"train.batch_size {tc.batch_size} x {world_size} process(es) = {per_micro}")
    if tc.grad_accum not in (1, accum):
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} = batch_size {tc.batch_size} x "
                          f"grad_accum x {world_size} process(es) needs grad_accum {accum}, but "
                          f"train.grad_accum is {tc.grad_accum}: leave grad_accum at 1 when "
                          "global_batch_size is set")
    return accum, tc.global_batch_size


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """The largest size b in [1, limit] with ``fits(b)`` (fitting assumed monotone: if b fits, so does every
    smaller size), found by doubling from ``start`` until a size fails (or ``limit`` is reached), then
    bisecting between the last size that fit and the first that did not; 0 if not even 1 fits."""
    lo, hi = 0, limit + 1  # lo fits (0 trivially), hi does not (limit + 1 is never tried)
    b = max(1, min(start, limit))
    while True:
        if fits(b):
            lo = b
            if b >= limit:
                break
            b = min(2 * b, limit)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def auto_micro_batch(per_rank: int, fits: Callable[[int], bool]) -> tuple[int, int]:
    """(micro-batch, grad_accum) for ``per_rank`` sequences per optimizer step on each process: the largest
    divisor of ``per_rank`` that fits, so micro-batch x grad_accum is exactly the configured batch."""
    best = largest_fitting(fits, per_rank)
    if best < 1:
        raise PretrainError("train.auto_batch: not even a micro-batch of 1 sequence fits in memory")
    micro = max(d for d in range(1, best + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def cuda_fits(model: nn.Module, objective, example: Callable[[int, torch.device], Any], device: torch.device,
              dtype: str) -> Callable[[int], bool]:
    """fits(b): does one forward+backward of ``example(b)`` (b random samples) run without CUDA running out
    of memory? Leaves no gradients behind and does not touch the global RNG streams."""

    def fits(b: int) -> bool:
        batch = example(b, device)
        try:
            with torch.random.fork_rng(devices=[device]):
                with autocast_context(device, dtype):
                    loss = objective.loss(model, batch, seed=0)
                loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()

    return fits


def check_config_compatible(saved: Config, new: Config) -> None:
    from pretrain.trackers import flatten  # (the module imports no tracker package)

    a, b = flatten(saved.to_dict()), flatten(new.to_dict())
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k) and k not in RESUMABLE_KEYS]
    if diffs:
        raise ConfigError("the run directory holds a run with a different configuration ("
                          + "; ".join(diffs[:6])
                          + "); to continue it, drop those changes (`pretrain train --resume RUN_DIR` "
                          "takes its saved config; only settings such as train.max_steps, "
                          "train.eval_interval or train.device may change), or start a new run with "
                          "another --out")


SCHEDULE_KEYS = ("max_steps", "warmup_steps", "lr", "min_lr_ratio", "schedule", "decay_frac")
"""The train settings the LR schedule is drawn from (with time_schedule: max_time_s too)."""


def schedule_change(saved: dict[str, Any], tc: TrainConfig, step: int, elapsed_s: float = 0.0) -> str:
    """The line a resume prints when the LR schedule of ``tc`` differs from the checkpoint's (``saved``: its
    train section): the settings that changed and the LR of the next step (0-based ``step``) under the
    checkpoint's schedule and under this one; '' when they are the same."""
    keys = SCHEDULE_KEYS + (("max_time_s", "time_schedule") if tc.time_schedule or saved.get("time_schedule")
                            else ())
    changed = [k for k in keys if k in saved and saved[k] != getattr(tc, k)]
    if not changed:
        return ""
    try:
        old = dataclasses.replace(tc, **{k: saved[k] for k in changed})
    except (ConfigError, TypeError):
        return ""

    def lr(c: TrainConfig) -> float:
        return lr_at(step, c, elapsed_s / c.max_time_s if c.time_schedule and c.max_time_s else 0.0)

    how = ("stretches" if tc.max_steps > old.max_steps else "shortens" if tc.max_steps < old.max_steps
           else "changes")
    return (f"resume: {', '.join(f'train.{k} {saved[k]} -> {getattr(tc, k)}' for k in changed)} {how} the LR "
            f"schedule: at step {step + 1}, where this run goes on, the LR is {lr(tc):.4g} (new schedule; "
            f"{lr(old):.4g} under the checkpoint's)")


# ----------------------------------------------------------------------------------------------------------
# the step's parts


def backward_step(model: nn.Module, fwd: nn.Module, objective, parts: list[tuple], world_size: int,
                  device: torch.device, dtype: str) -> torch.Tensor:
    """Forward and backward over one step's prepared micro-batches (``objective.prepare``); returns this
    process's share of the step's loss (detached; averaged over the processes: the step's loss). Every target
    token of the *global* batch weighs the same: each micro-batch's summed loss is divided by the target count
    of all micro-batches of all processes (times the world size, as gradients are averaged over processes), so
    the gradient is that of one batch of all of them, however the batch is split."""
    n_targets = all_reduce_sum_(sum(objective.targets(p) for p in parts))
    scale = (world_size / n_targets.clamp(min=1).double()).float()
    total = torch.zeros((), device=device)
    for micro, part in enumerate(parts):
        with grad_sync(model, micro == len(parts) - 1):  # all-reduce only after the last micro-batch
            with autocast_context(device, dtype):
                loss = objective.loss_sum(fwd, part) * scale
            loss.backward()
        total += loss.detach()
    return total


class Prefetcher:
    """Draws the loader's next batches in a background thread into a queue of ``depth`` (pinned in page-locked
    memory when going to CUDA, so the copy in :meth:`next` overlaps compute). ``state_dict`` is the loader's
    state after the last batch *consumed* (taken by :meth:`next`), not after the last one prefetched, so a
    checkpoint resumes exactly at the next unconsumed batch. ``depth`` 0: no thread, batches drawn in the
    loop."""

    def __init__(self, loader, device: torch.device, depth: int = 2):
        import queue
        import threading

        self.loader, self.device, self.depth = loader, device, depth
        self.pin = device.type == "cuda"
        self.consumed = loader.state_dict()
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
            self.thread.start()

    def _draw(self) -> tuple[Any, dict[str, Any]]:
        batch = self.loader.next_batch()
        return (_each(batch, torch.Tensor.pin_memory) if self.pin else batch), self.loader.state_dict()

    def _fill(self) -> None:
        import queue

        while not self.stop.is_set():
            try:
                item: Any = self._draw()
            except BaseException as e:  # handed to the training thread, raised there
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> torch.Tensor:
        item = self.queue.get() if self.thread is not None else self._draw()
        if isinstance(item, BaseException):
            raise item
        batch, self.consumed = item
        return _each(batch, lambda t: t.to(self.device, non_blocking=self.pin))

    def state_dict(self) -> dict[str, Any]:
        return dict(self.consumed)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def _each(batch, fn):
    """``fn`` applied to a batch: one tensor (tokens) or a tuple of them (images, labels)."""
    return tuple(fn(t) for t in batch) if isinstance(batch, tuple) else fn(batch)


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # stop_reason of a run stopped gracefully by one of them


class StopSignals:
    """SIGTERM (a scheduler preempting the job, ``kill``, torchrun passing its own on) and SIGINT (Ctrl-C) ask
    the loop to stop *gracefully*: it finishes the step in progress, saves a checkpoint and returns with
    ``stop_reason`` "SIGTERM" / "SIGINT", so ``--resume`` continues from that very step. The same signal a
    second time aborts at once (KeyboardInterrupt; the last checkpoint saved stays intact). Handlers are
    installed only when training runs in the main thread, and the previous ones are restored on exit. Until
    :attr:`armed` (set when the loop starts; before it there is no step to save) either signal aborts at
    once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.armed or self.received == name:  # during set-up, or asked twice: stop now
            raise Interrupted(signum)
        if self.received is None:
            self.received = name
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks
                print(f"\n{name} received: stopping after this step and saving a checkpoint "
                      f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (getattr(signal, name) for name in STOP_SIGNALS):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------------------
# what the model reads: tokens or images


@dataclass
class Inputs:
    """The data side of a run, for its modality (text: token shards; images: image shards): the splits, the
    objective, how to make the training loader, what identifies the inputs a model was trained on (for
    resume: the tokenizer's sha256, or the images' format and pixel statistics), and the unit counted
    (tokens or images)."""

    train_split: Any
    val_split: Any
    objective: Any
    loader: Callable[[int, int, int, int], Any]
    """(batch_size, seed, rank, world_size) → the training loader."""
    identity_key: str
    identity: str
    unit: str
    """What throughput counts: 'tokens' or 'images'."""
    per_sample: int
    """Units per sample: data.seq_len tokens, or 1 image."""
    documents: tuple[int, int, int] | None = None
    example: Callable[[int, torch.device], Any] | None = None
    """b → a random batch of b samples (the CUDA auto-batch probe)."""
    monitor: Callable[[nn.Module], dict[str, float]] | None = None
    """model → more validation figures for metrics.jsonl (item sequences: ranking metrics of the
    validation items)."""
    travel: tuple[str, ...] = ()
    """Files of the data directory copied into the run beside its tokenizer (item metadata)."""

    def describe(self, loader) -> str:
        if self.unit == "images":
            s = self.train_split
            return f"{len(s):,} train images of {s.height}x{s.width}x{s.channels}"
        return (f"{self.train_split.tokens:,} train tokens ({loader.n_windows:,} sequences of "
                f"{self.per_sample})")


def _text_inputs(cfg: Config, meta: dict[str, Any]) -> Inputs:
    tc = cfg.train
    if get_spec(cfg.model.arch).modality != "text":
        raise ConfigError(f"{cfg.data.path} holds tokens, but model.arch {cfg.model.arch!r} reads images: "
                          "prepare images for it, or use a text architecture")
    train_split, val_split = TokenSplit(cfg.data.path, "train"), TokenSplit(cfg.data.path, "val")
    if tc.eval_interval and eval_windows(val_split, cfg.data.seq_len) < 1:
        raise PretrainError(f"the validation split of {cfg.data.path} has {val_split.tokens:,} tokens, "
                            f"too few for one sequence of {cfg.data.seq_len}: prepare with a larger "
                            "--val-fraction, use a smaller data.seq_len, or set train.eval_interval 0")
    tokenizer = Tokenizer.load(Path(cfg.data.path) / meta["tokenizer"]["file"])
    objective = build_objective(cfg.objective, tokenizer, cfg.mlm, tc.seed, cfg.data.doc_mask, cfg.rtd)
    documents = padded_documents(cfg, tokenizer)
    seq_len, vocab = cfg.data.seq_len, cfg.model.vocab_size

    def loader(batch_size: int, seed: int, rank: int, world_size: int):
        return train_loader(train_split, seq_len, batch_size, documents, seed, rank, world_size)

    def example(b: int, device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(b)
        return torch.randint(0, vocab, (b, seq_len + 1), generator=gen).to(device)

    monitor, travel = None, ()
    if meta.get("kind") == "interactions":  # item sequences: rank the validation items at each evaluation
        if cfg.data.packing and not cfg.data.doc_mask:
            warnings.warn(f"{cfg.data.path} holds one item sequence per user, packed back to back: without "
                          "data.doc_mask true attention crosses from one user into the next (the presets "
                          "configs/sasrec-*.yaml and bert4rec-*.yaml set it)", stacklevel=2)
        from pretrain.evaluation import validation_ranking

        monitor = validation_ranking(cfg, tokenizer, tc.eval_batches * tc.batch_size)
        travel = tuple(f for f in [meta["interactions"].get("items_file")] if f)
    return Inputs(train_split, val_split, objective, loader, "tokenizer_sha256", meta["tokenizer"]["sha256"],
                  "tokens", seq_len, documents, example, monitor, travel)


def _image_inputs(cfg: Config, meta: dict[str, Any]) -> Inputs:
    from pretrain.data.images import ImageSplit, image_identity
    from pretrain.data.loader import ImageLoader
    from pretrain.objectives import build_image_objective

    if get_spec(cfg.model.arch).modality != "images":
        raise ConfigError(f"{cfg.data.path} holds images, but model.arch {cfg.model.arch!r} reads text: use "
                          "an image architecture (vit or resnet) with objective mae or supervised")
    if cfg.objective not in ("mae", "supervised"):
        raise ConfigError(f"{cfg.data.path} holds images: objective must be mae or supervised, not "
                          f"{cfg.objective!r}")
    train_split, val_split = ImageSplit(cfg.data.path, "train"), ImageSplit(cfg.data.path, "val")
    if cfg.train.eval_interval and len(val_split) < 1:
        raise PretrainError(f"the validation split of {cfg.data.path} has no images: prepare with a larger "
                            "--val-fraction, or set train.eval_interval 0")
    objective = build_image_objective(cfg)
    m = cfg.model

    def loader(batch_size: int, seed: int, rank: int, world_size: int):
        return ImageLoader(train_split, batch_size, seed, rank, world_size)

    def example(b: int, device: torch.device):
        gen = torch.Generator().manual_seed(b)
        images = torch.randint(0, 256, (b, m.image_size, m.image_size, m.channels), generator=gen,
                               dtype=torch.uint8)
        labels = torch.randint(0, max(m.num_classes, 1), (b,), generator=gen)
        return images.to(device), labels.to(device)

    return Inputs(train_split, val_split, objective, loader, "image_sha256", image_identity(meta), "images",
                  1, None, example)


# ----------------------------------------------------------------------------------------------------------
# build


def train(cfg: Config, out_dir: str | Path, quiet: bool = False, resume: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Train (or continue training) a model into ``out_dir``; returns a summary dict. ``cfg`` is not changed.

    If ``out_dir`` already holds a checkpoint of a run with a compatible config, training resumes from
    its newest complete checkpoint exactly where it stopped (``resume``: it must; see
    :func:`pretrain.checkpoint.resume_point` for what is refused). Any other non-empty ``out_dir`` needs
    ``overwrite`` (:func:`pretrain.io.check_output_dir`).
    """
    from pretrain.io import check_output_dir

    run = Path(out_dir)
    # before the ranks meet in init_distributed, so before rank 0 writes anything: all see the same folder
    check_output_dir(run, "train", [cfg.data.path, cfg.train.init_from], overwrite)
    if cfg.train.report_to:  # a tracker's missing package: an error now, on every rank, before any work
        from pretrain.trackers import require

        require(cfg.train.report_to)
    env = init_distributed(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = exclusive_lock(run / ".lock", f"{run} is in use by another training process")
        with lock if env.is_main else contextlib.nullcontext():  # rank 0 speaks for the job
            with StopSignals() as stop:
                job = build(cfg, run, quiet or not env.is_main, env, resume)
                try:
                    return loop(job, stop)
                except BaseException:
                    if job.metrics is not None:  # (the trackers' runs end as failed)
                        job.metrics.close(failed=True)
                    raise
    except PretrainError as e:
        if env.world_size > 1:  # say which rank failed (torchrun then stops the others)
            e.args = (f"[rank {env.rank}/{env.world_size}] {e}", *e.args[1:])
        raise
    finally:
        teardown(env)


@dataclass
class Job:
    """Everything one run needs, built before the loop starts."""

    cfg: Config
    """The resolved config (vocabulary, context, data path, batch), as saved with the run."""
    run: Path
    env: DistEnv
    model: nn.Module
    """The model as trained: wrapped (DDP / FSDP) when several processes train."""
    fwd: nn.Module
    """What the forward pass calls: the model, or its compiled version."""
    objective: Any
    optimizer: torch.optim.Optimizer
    batches: Prefetcher
    val_split: TokenSplit
    documents: tuple[int, int, int] | None
    checkpointer: Checkpointer
    state: TrainState
    accum: int
    global_batch: int
    progress: Progress
    metrics: Metrics | None
    n_params: int
    flops_per_token: float
    guard: SpikeGuard
    fault: tuple[str, int] | None = None
    """train.fault (tests): ('nan' | 'spike', step)."""
    inputs: Inputs | None = None
    """What the model reads (tokens or images) and how: splits, loader, objective, unit."""

    @property
    def unit(self) -> str:
        return self.inputs.unit if self.inputs is not None else "tokens"


def _resolve(cfg: Config, run: Path, env: DistEnv, meta: dict[str, Any],
             ckpt: Checkpointer) -> tuple[Config, dict[str, torch.Tensor] | None]:
    """The config of this launch, resolved once: absolute data path, the Hugging Face starting point, values
    taken from the data, the batch of a resumed auto-batch run; checked against the run it continues."""
    # saved absolute (config.yaml, checkpoints): eval and --resume then work from any directory
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                            path=str(Path(cfg.data.path).resolve())))
    init_sd = None
    if cfg.train.init_from:
        cfg, init_sd = _from_hf(cfg, meta)
    cfg = resolve_config(cfg, meta)
    tc = cfg.train
    if tc.warmup_steps >= tc.max_steps and env.is_main:
        warnings.warn(f"train.warmup_steps {tc.warmup_steps} >= train.max_steps {tc.max_steps}: the learning "
                      "rate never reaches train.lr nor decays", stacklevel=3)
    if env.active and tc.parallelism == "fsdp" and tc.optimizer == "muon":
        raise ConfigError("train.optimizer muon is not supported with train.parallelism fsdp (Muon needs "
                          "whole matrices; FSDP shards them): use parallelism ddp, or optimizer adamw")
    if ckpt.resuming and (run / "config.yaml").is_file():
        saved = from_dict(Config, load_yaml(run / "config.yaml"))
        if tc.auto_batch:  # keep the batch found at the start
            _, global_batch = resolve_batch(tc, env.world_size)
            cfg = _with_train(cfg, batch_size=saved.train.batch_size, grad_accum=saved.train.grad_accum,
                              global_batch_size=saved.train.global_batch_size or global_batch)
        check_config_compatible(saved, cfg)
    resolve_batch(cfg.train, env.world_size)  # (a batch that does not divide: an error now)
    if cfg.data.doc_mask and not get_spec(cfg.model.arch).doc_mask:
        raise ConfigError(f"data.doc_mask is supported for model.arch "
                          f"{' and '.join(s.name for s in specs() if s.doc_mask)}, not {cfg.model.arch!r}")
    return cfg, init_sd


def build(cfg: Config, run: Path, quiet: bool, env: DistEnv, resume: bool = False) -> Job:
    """Resolve the config, build the model (wrapped and compiled from outside), objective, loader and
    optimizer, and restore them all from the run's newest checkpoint when it has one."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a directory made by `pretrain prepare`")
    meta = load_meta(cfg.data.path)
    ckpt = Checkpointer(run, env.active, cfg.train.ckpt_interval, cfg.train.keep_checkpoints,
                        cfg.train.consolidate, resume)
    cfg, init_sd = _resolve(cfg, run, env, meta, ckpt)
    tc, device = cfg.train, env.device
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    inputs = (_image_inputs if is_images(meta) else _text_inputs)(cfg, meta)
    spec, model = get_spec(cfg.model.arch), build_model(cfg.model)
    if cfg.objective == "mae":  # (its FLOPs count the encoder on the visible patches only)
        model.mask_ratio = cfg.image.mask_ratio
    # (on CPU: the configured batch_size; under FSDP the probe would need the whole unsharded model: likewise)
    if (tc.auto_batch and not ckpt.resuming and device.type == "cuda"
            and not (env.active and tc.parallelism == "fsdp")):
        cfg = _auto_batch(cfg, model, inputs, env, quiet)
        tc = cfg.train
    accum, global_batch = resolve_batch(tc, env.world_size)
    # each rank its slice of a batch
    loader = inputs.loader(tc.batch_size, tc.seed, env.rank, env.world_size)
    ckpt.check(cfg.data.path, inputs.identity, data_fingerprint(meta), global_batch, env.world_size,
               key=inputs.identity_key)
    ckpt.restore_weights(model)
    if not ckpt.resuming and init_sd is not None:  # a fresh run that starts from a Hugging Face checkpoint
        _load_init(model, init_sd, spec.head, cfg)
    model.to(device)
    n_params, flops_tok = model.num_params(), spec.flops_per_token(model, inputs.per_sample)
    ckpt.identity = {inputs.identity_key: inputs.identity,
                     "data_fingerprint": data_fingerprint(meta), "config": cfg.to_dict(),
                     "n_params": n_params, "global_batch_size": global_batch}
    progress = Progress(tc.max_steps, ckpt.meta.get("step", 0), quiet, tc.max_time_s,
                        ckpt.meta.get("elapsed_s", 0.0))
    model, fwd = _apply_parallelism(model, cfg, env, progress)
    optimizer = build_optimizer(unwrap(model), tc, device.type)
    state = ckpt.restore(model, optimizer, loader)
    metrics = None
    if env.is_main:
        write_text_atomic(run / "config.yaml", cfg.to_yaml())
        if not is_images(meta):
            shutil.copyfile(Path(cfg.data.path) / meta["tokenizer"]["file"], run / "tokenizer.json")
        for name in inputs.travel:
            shutil.copyfile(Path(cfg.data.path) / name, run / name)
        metrics = Metrics(run / "metrics.jsonl", keep_upto_step=state.step)
    where = f"{env.world_size} processes ({tc.parallelism}, {device.type})" if env.active else device.type
    where += ", bf16 autocast" if autocast_dtype(device, tc.dtype) == torch.bfloat16 else ", fp32"
    progress.write(
        f"{'resuming ' + str(run) + ' at step ' + str(state.step) if state.step else 'training ' + str(run)}"
        f": {n_params / 1e6:.2f}M parameters on {where}, "
        f"{inputs.describe(loader)}")
    saved_tc = ckpt.meta.get("config", {}).get("train", {})
    if ckpt.resuming and (change := schedule_change(saved_tc, tc, state.step, state.elapsed_s)):
        progress.write(change)
    if metrics is not None and tc.report_to:
        from pretrain.trackers import open_trackers

        metrics.trackers = open_trackers(tc.report_to, run, cfg.to_dict(),
                                         state.step if ckpt.resuming else None, progress.write)
    loader.skip_samples(parse_sample_ranges(tc.skip_samples))
    guard = SpikeGuard(tc.guard, tc.guard_z, tc.guard_warmup, tc.guard_window, tc.guard_max_events)
    guard.load_state_dict(ckpt.extra.get("guard"))
    batches = Prefetcher(loader, device, tc.prefetch)  # started after the loader state is restored
    return Job(cfg, run, env, model, fwd, inputs.objective, optimizer, batches, inputs.val_split,
               inputs.documents, ckpt, state, accum, global_batch, progress, metrics, n_params, flops_tok,
               guard, parse_fault(tc.fault), inputs)


def _load_init(model: nn.Module, init_sd: dict[str, torch.Tensor], head: str, cfg: Config) -> None:
    if get_spec(cfg.model.arch).modality == "images":  # a new head (or decoder) where the checkpoint has none
        own = model.state_dict()
        fits = {k: v for k, v in init_sd.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fits, strict=False)
        new = sorted({k.split(".")[0] for k in own if k not in fits})
        if new:
            print(f"note: train.init_from: {', '.join(new)} start from a fresh initialisation (not in "
                  f"{cfg.train.init_from}, or of another size)", file=sys.stderr, flush=True)
        return
    try:
        missing, unexpected = model.load_state_dict(init_sd, strict=False)
    except RuntimeError as e:
        raise PretrainError(f"{cfg.train.init_from}: weights do not fit its config.json "
                            f"({str(e).splitlines()[1:2]})") from None
    if unexpected or set(missing) - ({f"{head}.weight"} if cfg.model.tie_embeddings else set()):
        raise PretrainError(f"{cfg.train.init_from}: missing {missing[:4]} / unexpected {unexpected[:4]} "
                            "tensors")


def _apply_parallelism(model: nn.Module, cfg: Config, env: DistEnv,
                       progress: Progress) -> tuple[nn.Module, nn.Module]:
    """From outside the model, in torchtitan's order: activation checkpointing, compile (per block under
    FSDP), then shard (FSDP2) or replicate (DDP). Returns (the model as trained, what the forward pass
    calls)."""
    tc, device = cfg.train, env.device
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    compile_model = use_compile(tc.compile, device)
    fsdp = env.active and tc.parallelism == "fsdp"
    if get_spec(cfg.model.arch).channels_last and not fsdp:
        model = model.to(memory_format=torch.channels_last)
    if env.active:
        if compile_model and fsdp:
            model = apply_compile(model, progress, per_block=True)
        # CPU: fp32 weights
        bf16 = device.type == "cuda" and autocast_dtype(device, tc.dtype) == torch.bfloat16
        model = (apply_fsdp(model, torch.bfloat16 if bf16 else torch.float32) if fsdp
                 else apply_ddp(model, device))
    return model, (apply_compile(model, progress) if compile_model and not fsdp else model)


def _auto_batch(cfg: Config, model: nn.Module, inputs: Inputs, env: DistEnv, quiet: bool) -> Config:
    """train.auto_batch on CUDA: the largest micro-batch that fits, grad_accum making up the configured
    batch."""
    accum, global_batch = resolve_batch(cfg.train, env.world_size)
    per_rank = global_batch // env.world_size
    model.to(env.device)
    micro, _ = auto_micro_batch(per_rank, cuda_fits(model, inputs.objective, inputs.example, env.device,
                                                    cfg.train.dtype))
    if env.active:  # every rank takes the smallest size found
        t = torch.tensor([micro], device=env.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        micro = int(t.item())
        micro = max(d for d in range(1, micro + 1) if per_rank % d == 0)
    cfg = _with_train(cfg, batch_size=micro, grad_accum=1, global_batch_size=global_batch)
    accum, global_batch = resolve_batch(cfg.train, env.world_size)
    if env.is_main and not quiet:
        print(f"train.auto_batch: micro-batch {micro} x grad_accum {accum} x {env.world_size} process(es) "
              f"= {global_batch} sequences per step", file=sys.stderr)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# the loop


def loop(job: Job, stop: StopSignals) -> dict[str, Any]:
    """Train until max_steps, the time budget, the target loss, stop_at_step or a stop signal; log, evaluate
    and checkpoint on their intervals; always end on a checkpoint of the last step. Returns the run's
    summary."""
    cfg, tc, st, env, device = job.cfg, job.cfg.train, job.state, job.env, job.env.device
    params = [p for p in job.model.parameters() if p.requires_grad]
    peak = peak_flops(device) if autocast_dtype(device, tc.dtype) == torch.bfloat16 else None
    tokens_per_step = job.global_batch * (job.inputs.per_sample if job.inputs else cfg.data.seq_len)
    clock = Clock(st.elapsed_s, st.tokens_seen)
    loss_acc = torch.tensor(st.loss_sum, device=device)  # train loss summed since the last log line
    stop_reason, grad_norm = "max_steps", 0.0
    job.model.train()
    done = st.step >= tc.max_steps or bool(tc.stop_at_step and st.step >= tc.stop_at_step)
    time_frac = st.elapsed_s / tc.max_time_s if tc.max_time_s else 0.0  # the same on every rank (see below)
    if not done and tc.max_time_s and time_frac >= 1.0:  # resumed with the time budget already spent
        done, stop_reason = True, "max_time_s"
    stop.armed = True
    while not done:
        # time_schedule: by time too
        lr = set_lr(job.optimizer, st.step, tc, time_frac if tc.time_schedule else 0.0)
        step_loss = train_step(job)
        grad_norm = clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        verdict = guard_step(job, step_loss, grad_norm, loss_acc) if job.guard.active else "ok"
        if verdict == "ok":  # (the spike guard may drop the update, or go back to the last checkpoint)
            loss_acc += step_loss
            job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        if verdict == "rollback":
            continue
        st.step, st.tokens_seen = st.step + 1, st.tokens_seen + tokens_per_step
        st.loss_n += verdict == "ok"
        st.elapsed_s = clock.elapsed()
        if tc.max_time_s:  # every rank stops together, and sets the same time-scheduled LR
            time_frac = max_over_ranks(st.elapsed_s, device) / tc.max_time_s
        time_up = bool(tc.max_time_s) and time_frac >= 1.0
        done = st.step >= tc.max_steps or time_up or bool(tc.stop_at_step and st.step >= tc.stop_at_step)
        if done and st.step < tc.max_steps:
            stop_reason = "max_time_s" if time_up else "stop_at_step"
        # a stop signal: every rank stops at the same step (asked at logging steps when distributed, each step
        # alone); no evaluation, straight to the checkpoint
        if not done and (not env.active or st.step % tc.log_interval == 0) and \
                any_rank(stop.received is not None, device):
            done, stop_reason = True, stop.received or "SIGTERM"
        record: dict[str, Any] = {}
        if st.step % tc.log_interval == 0 or st.step == tc.max_steps:
            record = log_step(job, clock, loss_acc, lr, grad_norm, peak)
        if tc.eval_interval and (st.step % tc.eval_interval == 0 or done) and stop_reason not in STOP_SIGNALS:
            record.update(validate(job, clock))
            if tc.target_val_loss and any_rank(st.last_val <= tc.target_val_loss, device) and not done:
                done, stop_reason = True, "target_val_loss"
        if record and job.metrics is not None:
            job.metrics.write(record)
        if done or job.checkpointer.due(st.step):
            save(job, loss_acc, grad_norm)
        if "train_loss" in record:
            clock.mark(st.tokens_seen)
    if job.checkpointer.saved_step != st.step:
        save(job, loss_acc, grad_norm)
    return finish(job, stop_reason)


class Clock:
    """Wall time of the whole run (``elapsed_s`` of a resumed run goes on from its checkpoint's), and the
    tokens-per-second window since the last log line."""

    def __init__(self, elapsed_before: float, tokens: int):
        self.t_start, self.before = time.time(), elapsed_before
        self.t_last, self.tok_last = self.t_start, tokens

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (now if now is not None else time.time()) - self.t_start

    def mark(self, tokens: int) -> None:
        self.t_last, self.tok_last = time.time(), tokens


def train_step(job: Job) -> torch.Tensor:
    """One optimizer step's forward and backward over ``accum`` micro-batches; returns its (detached) loss."""
    tc, env, step = job.cfg.train, job.env, job.state.step
    # global micro-batch index: MLM masks depend on which samples, not on how many processes
    parts = [job.objective.prepare(job.batches.next(), seed=(tc.seed * 1_000_003 + step) * 1024
                                   + micro * env.world_size + env.rank) for micro in range(job.accum)]
    loss = backward_step(job.model, job.fwd, job.objective, parts, env.world_size, env.device, tc.dtype)
    if job.fault is not None and job.fault[1] == step + 1:  # train.fault (tests): a NaN or a spike, once
        scale = float("nan") if job.fault[0] == "nan" else 1000.0
        job.fault = None
        loss.mul_(scale)
        for p in job.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return loss


def guard_step(job: Job, step_loss: torch.Tensor, grad_norm, loss_acc: torch.Tensor) -> str:
    """The spike guard's verdict on this step, before the optimizer applies it (pretrain/guard.py): 'ok',
    'skip' (drop the update) or 'rollback' (done here: back to the last checkpoint); 'stop', or more events
    than train.guard_max_events, end the run. The same on every rank: the loss is averaged over them and the
    gradient norm is global."""
    tc, st, guard = job.cfg.train, job.state, job.guard
    loss, norm = all_reduce_mean_(step_loss.clone()).item(), float(grad_norm)
    bad, z = guard.judge(loss, norm)
    if not bad:
        return "ok"
    at = st.step + 1  # (the step being taken, as metrics.jsonl numbers it)
    mode = "skip" if guard.mode == "rollback" and job.checkpointer.latest is None else guard.mode
    extra: dict[str, Any] = {}
    if mode == "rollback":
        seen = job.batches.state_dict()["samples_seen"]
        back, loader_then = job.checkpointer.rewind(job.model, job.optimizer)
        extra = {"to_step": back.step, "skipped_samples": [loader_then["samples_seen"], seen]}
        job.batches.loader.skip_samples([tuple(extra["skipped_samples"])])  # (already behind its position)
        for g in job.optimizer.param_groups:
            g["base_lr"] *= tc.guard_lr_scale
        elapsed = st.elapsed_s
        for f in dataclasses.fields(TrainState):
            setattr(st, f.name, getattr(back, f.name))
        st.elapsed_s = elapsed
        loss_acc.fill_(st.loss_sum)
    event = guard.record(at, loss, norm, z, action=mode, **extra)
    if job.metrics is not None:
        job.metrics.write(event)
    job.progress.write(f"train.guard: step {event['step']} loss {loss:.4g}, gradient norm {norm:.4g} "
                       f"(z {z:.1f}): {mode}")
    if mode == "stop" or guard.exhausted:
        why = (f"{len(guard.events)} spikes, more than train.guard_max_events {tc.guard_max_events}"
               if mode != "stop" else f"a spike at step {event['step']} (train.guard stop)")
        job.batches.close()
        job.progress.close()
        raise PretrainError(f"training stopped by {why}: loss {loss:.4g}, gradient norm {norm:.4g}, "
                            f"z {z:.1f}; the last checkpoint, if any, is from before it: resume with a "
                            "lower train.lr, train.guard skip or rollback, or --train.skip_samples past the "
                            "batches")
    return mode


def log_step(job: Job, clock: Clock, loss_acc: torch.Tensor, lr: float, grad_norm,
             peak: float | None) -> dict:
    """The mean train loss since the last log line (over all ranks), the step's lr, gradient norm, speed."""
    st = job.state
    # .item() syncs: time is read after it; (no step since the last line, all dropped by the spike guard: nan)
    train_loss = all_reduce_mean_(loss_acc).item() / st.loss_n if st.loss_n else float("nan")
    now = time.time()
    st.elapsed_s = clock.elapsed(now)
    if st.loss_n and not math.isfinite(train_loss):  # (the same on every rank)
        diverged(job, train_loss)
    tok_s = (st.tokens_seen - clock.tok_last) / max(now - clock.t_last, 1e-9)
    unit = job.unit
    record = {"step": st.step, unit: st.tokens_seen, "train_loss": round(train_loss, 6), "lr": lr,
              "grad_norm": round(float(grad_norm), 6), f"{unit}_per_s": round(tok_s, 1),
              "elapsed_s": round(st.elapsed_s, 3)}
    if peak:
        record["mfu"] = round(job.flops_per_token * tok_s / (peak * job.env.world_size), 4)
    job.progress.update(st.step, {"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}",
                                  ("img/s" if unit == "images" else "tok/s"): f"{tok_s:,.0f}"})
    loss_acc.zero_()
    st.loss_n = 0
    return record


def validate(job: Job, clock: Clock) -> dict[str, Any]:
    if job.unit == "images":
        return validate_images(job, clock)
    cfg, tc, st = job.cfg, job.cfg.train, job.state
    ev = evaluate(job.fwd, job.val_split, cfg.data.seq_len, tc.batch_size, job.env.device, tc.dtype,
                  tc.eval_batches, job.objective, job.documents)
    st.elapsed_s = clock.elapsed()
    st.last_val = ev["loss"]
    if not math.isfinite(st.last_val):
        diverged(job, st.last_val, "val loss")
    st.best_val = min(st.best_val, st.last_val)
    record = {"step": st.step, "tokens": st.tokens_seen, "val_loss": round(ev["loss"], 6),
              "val_ppl": round(ev["ppl"], 4), "elapsed_s": round(st.elapsed_s, 3)}
    for key in ("bpb", "accuracy"):
        if key in ev:
            record[f"val_{key}"] = round(ev[key], 6)
    extra = ""
    if job.inputs is not None and job.inputs.monitor is not None:
        with gathered(job.model) as inner:
            more = job.inputs.monitor(inner)
        record.update({f"val_{k}": round(v, 6) for k, v in more.items()})
        extra = "".join(f", {k} {v:.4f}" for k, v in more.items())
        st.elapsed_s = clock.elapsed()
        record["elapsed_s"] = round(st.elapsed_s, 3)
    job.progress.write(f"step {st.step}: val loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f}){extra} "
                       f"at {st.elapsed_s:.1f}s")
    return record


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The model unwrapped, its root parameters gathered under FSDP2 (for calls other than its forward:
    monitors, snapshots) and released again after."""
    inner = unwrap(model)
    fsdp = hasattr(inner, "unshard")
    if fsdp:
        inner.unshard()
    try:
        yield inner
    finally:
        if fsdp:
            inner.reshard()


def validate_images(job: Job, clock: Clock) -> dict[str, Any]:
    """Validation loss (and accuracy) of an image objective; the k-NN accuracy of frozen features when the
    data has labels; MAE: a reconstruction grid PNG of the first validation images, one per evaluation in
    reconstructions/ (rank 0)."""
    from pretrain.evaluation import evaluate_images, knn_monitor

    tc, st, im = job.cfg.train, job.state, job.cfg.image
    ev = evaluate_images(job.fwd, job.val_split, tc.batch_size, job.env.device, tc.dtype, tc.eval_batches,
                         job.objective)
    st.last_val = ev["loss"]
    if not math.isfinite(st.last_val):
        diverged(job, st.last_val, "val loss")
    st.best_val = min(st.best_val, st.last_val)
    record = {"step": st.step, "images": st.tokens_seen, "val_loss": round(ev["loss"], 6)}
    if "accuracy" in ev:
        record["val_accuracy"] = round(ev["accuracy"], 6)
    with gathered(job.model) as inner:
        knn = knn_monitor(inner, job.inputs.train_split, job.val_split, job.objective, tc.batch_size,
                          job.env.device, tc.dtype, im.knn_k, im.knn_bank, tc.eval_batches, tc.seed)
        if knn is not None:
            record["val_knn_accuracy"] = round(knn, 6)
        if job.env.is_main and hasattr(job.objective, "snapshot"):
            from pretrain.evaluation import _batch_on

            idx = np.arange(min(8, len(job.val_split)))
            was = job.fwd.training
            job.fwd.eval()
            with autocast_context(job.env.device, tc.dtype):
                job.objective.snapshot(job.fwd, _batch_on(job.val_split, idx, job.env.device)[0],
                                       job.run / "reconstructions" / f"step_{st.step:06d}.png")
            job.fwd.train(was)
    st.elapsed_s = clock.elapsed()
    record["elapsed_s"] = round(st.elapsed_s, 3)
    extra = "".join(f", {k[4:].replace('_', ' ')} {v:.3f}" for k, v in record.items()
                    if k in ("val_accuracy", "val_knn_accuracy"))
    job.progress.write(f"step {st.step}: val loss {ev['loss']:.4f}{extra} at {st.elapsed_s:.1f}s")
    return record


def save(job: Job, loss_acc: torch.Tensor, grad_norm) -> None:
    """Checkpoint the current step, never diverged weights over the last good checkpoint."""
    bad = not (bool(torch.isfinite(loss_acc)) and bool(torch.isfinite(torch.as_tensor(grad_norm))))
    if any_rank(bad, job.env.device):
        diverged(job, float("nan"), "loss or gradient norm")
    if any_rank(not params_finite(job.model), job.env.device):  # (a last step can overflow the weights)
        diverged(job, float("nan"), "weights")
    # the job's running loss (then the same on every rank)
    job.state.loss_sum = all_reduce_mean_(loss_acc).item()
    job.checkpointer.save(job.state, job.model, job.optimizer, job.batches.state_dict(),
                          {"guard": job.guard.state_dict()} if job.guard.active else None)


def params_finite(model: nn.Module) -> bool:
    """Whether every parameter (this rank's shard of it, under FSDP) is finite."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                   for p in model.parameters())


def diverged(job: Job, value: float, what: str = "loss") -> None:
    job.batches.close()
    job.progress.close()
    raise divergence("training", job.state.step, what, value, "train.lr",
                     "the last checkpoint saved, if any, is from before")


def finish(job: Job, stop_reason: str) -> dict[str, Any]:
    st = job.state
    job.batches.close()
    job.progress.close()
    if job.metrics is not None:
        job.metrics.close()
        if job.cfg.train.plot and (job.run / "metrics.jsonl").stat().st_size:
            plot_metrics(job.run / "metrics.jsonl", job.run / "loss_curve.png")
    return {"run_dir": str(job.run), "step": st.step, "tokens_seen": st.tokens_seen,
            "elapsed_s": round(st.elapsed_s, 3), "val_loss": st.last_val,
            "best_val_loss": None if math.isinf(st.best_val) else st.best_val, "stop_reason": stop_reason,
            "n_params": job.n_params, **({"guard_events": job.guard.events} if job.guard.events else {})}
