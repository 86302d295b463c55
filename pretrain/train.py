"""The training loop: ``train(cfg, out_dir)``. One function you can read in one sitting; the step,
evaluation, logging and checkpointing are small functions beside it.

The same loop runs as one process or as several under ``torchrun`` (see pretrain/distributed.py): each rank
reads its own slice of every global batch, the model is wrapped (DDP or FSDP2) from outside, only rank 0
logs and writes files, and checkpoints are sharded (torch.distributed.checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pretrain import PretrainError
from pretrain.checkpoint import (
    is_sharded,
    latest_checkpoint,
    load_full_optimizer,
    load_sharded,
    load_state,
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from pretrain.config import Config, ConfigError, ModelConfig, from_dict, load_yaml
from pretrain.data.loader import DocumentLoader, TokenSplit, TrainLoader, eval_batches, eval_windows
from pretrain.data.prepare import load_meta, write_text_atomic
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
    broadcast_object,
    clip_grad_norm_,
    grad_sync,
    init_distributed,
    is_fsdp,
    max_over_ranks,
    teardown,
    unwrap,
)
from pretrain.hardware import native_bf16, tune_cpu_allocator
from pretrain.models import build_model
from pretrain.objectives import CausalLM, build_objective
from pretrain.optim import build_optimizer, set_lr

# Keys that may change when a run is continued (they do not change what was trained so far).
RESUMABLE_KEYS = {"train.max_steps", "train.max_time_s", "train.time_schedule", "train.target_val_loss", "train.stop_at_step", "train.eval_interval",
                  "train.eval_batches", "train.log_interval", "train.ckpt_interval", "train.keep_checkpoints",
                  "train.plot", "train.threads", "train.device", "train.compile", "data.path",
                  "train.activation_checkpointing", "train.prefetch",
                  # how the global batch is split over processes, and how they talk (checked: the global batch)
                  "train.grad_accum", "train.global_batch_size", "train.parallelism", "train.dist_timeout_s",
                  "train.consolidate"}

# Dense bf16 peak FLOP/s (no sparsity) by device-name substring, most specific first; for MFU.
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
              ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("A10G", 70e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """bf16 autocast where 'bf16' is asked for, and by default ('auto') on CUDA and on CPUs with native bf16
    (:func:`pretrain.hardware.native_bf16`); fp32 otherwise."""
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "auto" and native_bf16(device):
        return torch.bfloat16
    return torch.float32


def autocast_context(device: torch.device, dtype: str):
    if autocast_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """train.compile: true / false, or 'auto': on CUDA, where compilation pays for itself quickly."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, if known (for MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:  # most specific names first
        if key in name:
            return value
    return None


def data_fingerprint(meta: dict[str, Any]) -> str:
    """What identifies a prepared dataset's content, for resume: its splits (shards and their token counts)
    and each input's content hash and mixture weight — not paths, so moved folders still match."""
    ident = {"splits": meta.get("splits"), "mixture": meta.get("mixture"),
             "sources": [(s.get("sha256"), s.get("weight")) for s in meta.get("sources", [])]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_config(cfg: Config, meta: dict[str, Any]) -> Config:
    """Fill in the values that come from the data (vocab size) and data.seq_len (max_seq_len)."""
    d = cfg.to_dict()
    data_vocab = int(meta["tokenizer"]["vocab_size"])
    if d["model"]["vocab_size"] == 0:
        d["model"]["vocab_size"] = data_vocab
    elif d["model"]["vocab_size"] < data_vocab:
        raise ConfigError(f"model.vocab_size {d['model']['vocab_size']} is smaller than the data's tokenizer "
                          f"vocabulary ({data_vocab}); leave it at 0 to take it from the data")
    if d["model"]["max_seq_len"] == 0:
        d["model"]["max_seq_len"] = d["data"]["seq_len"]
    elif d["model"]["max_seq_len"] < d["data"]["seq_len"]:
        raise ConfigError(f"data.seq_len {d['data']['seq_len']} exceeds model.max_seq_len {d['model']['max_seq_len']}")
    return from_dict(Config, d)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _from_hf(cfg: Config, meta: dict[str, Any]) -> tuple[Config, dict[str, torch.Tensor]]:
    """train.init_from: take the model section and weights from a Hugging Face directory, and check that the
    data was tokenized with that model's tokenizer."""
    from pretrain.export import load_hf

    hf_dir = Path(cfg.train.init_from)
    model_section, sd = load_hf(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise PretrainError(f"{hf_dir} has no tokenizer.json: the model's tokenizer is needed to prepare the data")
    if Tokenizer.load(hf_dir).sha256() != meta["tokenizer"]["sha256"]:
        raise PretrainError(f"{cfg.data.path} was not tokenized with {hf_dir}'s tokenizer: prepare it with "
                            f"`pretrain prepare ... --tokenizer {hf_dir}`")
    if cfg.objective != "clm":
        raise ConfigError("train.init_from supports causal-LM (Llama-architecture) checkpoints: objective clm")
    d = cfg.to_dict()
    # the architecture comes from config.json: model.* values set (in a preset or on the command line) that
    # contradict it are ignored, and said so; dropout (not architecture) may be set for the continued training
    defaults, given = ModelConfig().__dict__, d["model"]
    ignored = [f"model.{k}={v!r} (checkpoint: {model_section[k]!r})" for k, v in given.items()
               if k not in ("dropout", "max_seq_len") and k in model_section and v != defaults.get(k)
               and v != model_section[k]]
    if ignored:
        print(f"warning: train.init_from takes the architecture from {hf_dir / 'config.json'}; ignoring "
              + ", ".join(ignored), file=sys.stderr, flush=True)
    if model_section.get("arch") == "gpt2" and d["data"]["seq_len"] > model_section["max_seq_len"]:
        raise ConfigError(f"data.seq_len {d['data']['seq_len']} exceeds {hf_dir}'s {model_section['max_seq_len']} "
                          "learned positions (n_positions); use a seq_len of at most that")
    d["model"] = {**model_section, "dropout": given.get("dropout", model_section.get("dropout", 0.0)),
                  "max_seq_len": max(model_section["max_seq_len"], d["data"]["seq_len"])}
    return from_dict(Config, d), sd


def padded_documents(cfg: Config, tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """(eot_id, pad_id, piece_len) when sequences are single padded documents (data.packing false), else None.
    ``piece_len``: the tokens of a document a row holds, the ones the model sees (a longer document is cut into
    pieces of that many): seq_len, or seq_len - 1 when the masked LM puts [CLS] in front."""
    if cfg.data.packing:
        return None
    if cfg.objective != "mlm" or tokenizer.pad_id is None:
        raise ConfigError("data.packing false (one padded document per sequence) needs objective mlm and a "
                          "tokenizer with a [PAD] token (prepare with --tokenizer wordpiece)")
    return tokenizer.eot_id, tokenizer.pad_id, cfg.data.seq_len - (tokenizer.cls_id is not None)


def resolve_batch(tc, world_size: int) -> tuple[int, int]:
    """(micro-batches per step on each process, global batch in sequences) for ``world_size`` processes:
    batch_size x grad_accum x world_size = global_batch_size, grad_accum derived when global_batch_size is set."""
    if not tc.global_batch_size:
        return tc.grad_accum, tc.batch_size * tc.grad_accum * world_size
    per_micro = tc.batch_size * world_size
    accum, rest = divmod(tc.global_batch_size, per_micro)
    if rest or accum < 1:
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} is not a multiple of train.batch_size "
                          f"{tc.batch_size} x {world_size} process(es) = {per_micro}")
    if tc.grad_accum not in (1, accum):
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} = batch_size {tc.batch_size} x "
                          f"grad_accum x {world_size} process(es) needs grad_accum {accum}, but train.grad_accum "
                          f"is {tc.grad_accum}: leave grad_accum at 1 when global_batch_size is set")
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


def cuda_fits(model: nn.Module, objective, seq_len: int, vocab: int, device: torch.device,
              dtype: str) -> Callable[[int], bool]:
    """fits(b): does one forward+backward of b random sequences run without CUDA running out of memory?
    Leaves no gradients behind and does not touch the global RNG streams."""

    def fits(b: int) -> bool:
        gen = torch.Generator().manual_seed(b)
        batch = torch.randint(0, vocab, (b, seq_len + 1), generator=gen).to(device)
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
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k) and k not in RESUMABLE_KEYS]
    if diffs:
        raise ConfigError("the run directory holds a run with a different configuration (" + "; ".join(diffs[:6])
                          + "); to continue it, drop those changes (`pretrain train --resume RUN_DIR` takes its "
                          "saved config; only settings such as train.max_steps, train.eval_interval or "
                          "train.device may change), or start a new run with another --out")


def evaluate(model: nn.Module, split: TokenSplit, seq_len: int, batch_size: int, device: torch.device,
             dtype: str = "auto", max_batches: int | None = None, objective=None,
             documents: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Mean loss over (part of) a split with perplexity, and bits per byte (causal LM) or accuracy (masked LM)."""
    objective = objective or CausalLM()
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(eval_batches(split, seq_len, batch_size, max_batches, documents)):
            batch = batch.to(device, non_blocking=True)
            with autocast_context(device, dtype):
                loss_sum, count, right = objective.eval_batch(model, batch, i)
            total, n = total + loss_sum, n + count
            correct = None if right is None else correct + right
    model.train(was_training)
    mean = total / max(n, 1)
    out = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": n}
    if correct is not None:
        out["accuracy"] = correct / max(n, 1)
    if objective.reports_bpb and split.bytes:
        out["bpb"] = mean / math.log(2) * split.tokens / split.bytes
    return out


def backward_step(model: nn.Module, fwd: nn.Module, objective, parts: list[tuple], world_size: int,
                  device: torch.device, dtype: str) -> torch.Tensor:
    """Forward and backward over one step's prepared micro-batches (``objective.prepare``); returns this process's
    share of the step's loss (detached; averaged over the processes: the step's loss). Every target token of
    the *global* batch weighs the same: each micro-batch's summed loss is divided by the target count of all
    micro-batches of all processes (times the world size, as gradients are averaged over processes), so the
    gradient is that of one batch of all of them, however the batch is split."""
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
    checkpoint resumes exactly at the next unconsumed batch. ``depth`` 0: no thread, batches drawn in the loop."""

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

    def _draw(self) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = self.loader.next_batch()
        return (batch.pin_memory() if self.pin else batch), self.loader.state_dict()

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
        return batch.to(self.device, non_blocking=self.pin)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.consumed)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # stop_reason of a run stopped gracefully by one of them


class StopSignals:
    """SIGTERM (a scheduler preempting the job, ``kill``, torchrun passing its own on) and SIGINT (Ctrl-C) ask the
    loop to stop *gracefully*: it finishes the step in progress, saves a checkpoint and returns with
    ``stop_reason`` "SIGTERM" / "SIGINT", so ``--resume`` continues from that very step. The same signal a
    second time aborts at once (KeyboardInterrupt; the last checkpoint saved stays intact). Handlers are
    installed only when training runs in the main thread, and the previous ones are restored on exit. Until
    :attr:`armed` (set when the loop starts; before it there is no step to save) either signal aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.armed or self.received == name:  # during set-up, or asked twice: stop now
            raise KeyboardInterrupt
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


class Progress:
    """A tqdm bar on a terminal, plain log lines (to stderr) otherwise."""

    def __init__(self, total: int, initial: int, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.bar = None
        self.t0 = time.time()
        self.initial = initial
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: v for k, v in info.items() if k != "val_loss" or v}, refresh=True)
            return
        done = step - self.initial
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in info.items()] + [f"eta {eta:.0f}s"]
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Metrics:
    """Appends one JSON object per line to metrics.jsonl; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_upto_step: int):
        self.path = path
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_upto_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
            write_text_atomic(path, "".join(k + "\n" for k in kept))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def train(cfg: Config, out_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Train (or continue training) a model into ``out_dir``; returns a summary dict.

    If ``out_dir`` already holds a checkpoint of a run with a compatible config, training resumes from
    its newest complete checkpoint exactly where it stopped.
    """
    run = Path(out_dir)
    env = init_distributed(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
    if env.device.type == "cpu":
        tune_cpu_allocator()
    try:
        run.mkdir(parents=True, exist_ok=True)
        with run_lock(run) if env.is_main else contextlib.nullcontext():  # rank 0 speaks for the job
            with StopSignals() as stop:
                return _train(cfg, run, quiet or not env.is_main, env, stop)
    except PretrainError as e:
        from pretrain.checkpoint import CheckpointError, list_checkpoints

        ckpts = list_checkpoints(run) if isinstance(e, CheckpointError) and run.is_dir() else []
        if len(ckpts) > 1 and str(ckpts[-1]) in str(e):  # the newest is damaged: say how to use the one before
            e.args = (f"{e}; the previous checkpoint {ckpts[-2]} is kept: move {ckpts[-1].name} out of "
                      f"{ckpts[-1].parent} to resume from it", *e.args[1:])
        if env.world_size > 1:  # say which rank failed (torchrun then stops the others)
            e.args = (f"[rank {env.rank}/{env.world_size}] {e}", *e.args[1:])
        raise
    finally:
        teardown(env)


@contextlib.contextmanager
def run_lock(run: Path):
    """One trainer per run directory: a second one fails at once instead of fighting over checkpoints."""
    import fcntl

    f = open(run / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise PretrainError(f"{run} is in use by another training process") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _train(cfg: Config, run: Path, quiet: bool, env: DistEnv, stop: StopSignals) -> dict[str, Any]:
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a directory made by `pretrain prepare`")
    meta = load_meta(cfg.data.path)
    # saved absolute (config.yaml, checkpoints): eval and --resume then work from any directory
    cfg.data.path = str(Path(cfg.data.path).resolve())
    fingerprint = data_fingerprint(meta)  # saved with every checkpoint, checked on resume
    init_sd = None
    if cfg.train.init_from:
        cfg, init_sd = _from_hf(cfg, meta)
    cfg = resolve_config(cfg, meta)
    tc = cfg.train
    accum, global_batch = resolve_batch(tc, env.world_size)
    if tc.warmup_steps >= tc.max_steps and env.is_main:
        warnings.warn(f"train.warmup_steps {tc.warmup_steps} >= train.max_steps {tc.max_steps}: the learning "
                      "rate never reaches train.lr nor decays", stacklevel=2)
    if env.active and tc.parallelism == "fsdp" and tc.optimizer == "muon":
        raise ConfigError("train.optimizer muon is not supported with train.parallelism fsdp (Muon needs whole "
                          "matrices; FSDP shards them): use parallelism ddp, or optimizer adamw")

    ckpt = broadcast_object(latest_checkpoint(run) if env.is_main else None)  # all ranks continue the same one
    if ckpt is not None and tc.auto_batch and (run / "config.yaml").is_file():  # keep the batch found at the start
        saved = from_dict(Config, load_yaml(run / "config.yaml")).train
        d = cfg.to_dict()
        d["train"].update(batch_size=saved.batch_size, grad_accum=saved.grad_accum,
                          global_batch_size=saved.global_batch_size or global_batch)
        cfg = from_dict(Config, d)
        tc = cfg.train
        accum, global_batch = resolve_batch(tc, env.world_size)
    if ckpt is not None and (run / "config.yaml").is_file():
        check_config_compatible(from_dict(Config, load_yaml(run / "config.yaml")), cfg)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = env.device
    torch.manual_seed(tc.seed)
    train_split, val_split = TokenSplit(cfg.data.path, "train"), TokenSplit(cfg.data.path, "val")
    if tc.eval_interval and eval_windows(val_split, cfg.data.seq_len) < 1:
        raise PretrainError(f"the validation split of {cfg.data.path} has {val_split.tokens:,} tokens, too few "
                            f"for one sequence of {cfg.data.seq_len}: prepare with a larger --val-fraction, "
                            "use a smaller data.seq_len, or set train.eval_interval 0")

    model = build_model(cfg.model)
    tokenizer = Tokenizer.load(Path(cfg.data.path) / meta["tokenizer"]["file"])
    if cfg.data.doc_mask and cfg.model.arch not in ("gpt", "bert"):
        raise ConfigError(f"data.doc_mask is supported for model.arch gpt and bert, not {cfg.model.arch!r}")
    objective = build_objective(cfg.objective, tokenizer, cfg.mlm, tc.seed, cfg.data.doc_mask)
    documents = padded_documents(cfg, tokenizer)
    # (on CPU: the configured batch_size; under FSDP the probe would need the whole unsharded model: likewise)
    if tc.auto_batch and ckpt is None and env.device.type == "cuda" and not (env.active and tc.parallelism == "fsdp"):
        per_rank = global_batch // env.world_size
        model.to(env.device)
        micro, _ = auto_micro_batch(per_rank, cuda_fits(model, objective, cfg.data.seq_len, cfg.model.vocab_size,
                                                        env.device, tc.dtype))
        if env.active:  # every rank takes the smallest size found
            t = torch.tensor([micro], device=env.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            micro = int(t.item())
            micro = max(d for d in range(1, micro + 1) if per_rank % d == 0)
        d = cfg.to_dict()
        d["train"].update(batch_size=micro, grad_accum=1, global_batch_size=global_batch)
        cfg = from_dict(Config, d)
        tc = cfg.train
        accum, global_batch = resolve_batch(tc, env.world_size)
        if env.is_main and not quiet:
            print(f"train.auto_batch: micro-batch {micro} x grad_accum {accum} x {env.world_size} process(es) "
                  f"= {global_batch} sequences per step", file=sys.stderr)
    shard = {"seed": tc.seed, "rank": env.rank, "world_size": env.world_size}  # each rank its slice of a batch
    if documents is None:
        loader = TrainLoader(train_split, cfg.data.seq_len, tc.batch_size, **shard)
    else:
        loader = DocumentLoader(train_split, cfg.data.seq_len, tc.batch_size, *documents, **shard)
    step, tokens_seen, elapsed, best_val = 0, 0, 0.0, float("inf")
    last_val: float | None = None  # the latest evaluation's val loss (a resumed run starts from its checkpoint's)
    loss_sum, loss_n = 0.0, 0  # train loss summed since the last log line (checkpointed: exact resume)
    state = None
    if ckpt is not None:
        cmeta = read_meta(ckpt)
        if cmeta.get("tokenizer_sha256") not in (None, meta["tokenizer"]["sha256"]):
            raise PretrainError(f"{cfg.data.path} was tokenized with a different tokenizer than the run in {run}")
        if cmeta.get("data_fingerprint") not in (None, fingerprint):
            raise PretrainError(f"the data in {cfg.data.path} is not the data the run in {run} was trained on (it "
                                "was prepared again from other inputs, or with other settings), so resuming "
                                "would not continue the same sample order; prepare it into another folder, or "
                                "start a new run from this one's weights (pretrain export, then --init-from)")
        saved_tc = cmeta.get("config", {}).get("train", {})
        saved_batch = cmeta.get("global_batch_size") or saved_tc.get("batch_size", 0) * saved_tc.get("grad_accum", 1)
        if saved_batch != global_batch:
            raise ConfigError(f"the run in {run} was trained with a global batch of {saved_batch} sequences, this "
                              f"launch has {global_batch} (batch_size x grad_accum x {env.world_size} process(es)); "
                              f"set --train.global_batch_size {saved_batch} to continue it")
        if not is_sharded(cmeta):
            load_weights(ckpt, model, cmeta)
        state = load_state(ckpt, cmeta)
        step, tokens_seen = cmeta["step"], cmeta["tokens_seen"]
        elapsed, best_val = cmeta.get("elapsed_s", 0.0), cmeta.get("best_val_loss") or float("inf")
        last_val = cmeta.get("val_loss")
        loss_sum, loss_n = state.get("loss_sum", 0.0), state.get("loss_n", 0)
    if state is None and init_sd is not None:  # a fresh run that starts from a Hugging Face checkpoint
        try:
            missing, unexpected = model.load_state_dict(init_sd, strict=False)
        except RuntimeError as e:
            raise PretrainError(f"{tc.init_from}: weights do not fit its config.json ({str(e).splitlines()[1:2]})") from None
        if unexpected or set(missing) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set()):
            raise PretrainError(f"{tc.init_from}: missing {missing[:4]} / unexpected {unexpected[:4]} tensors")
    model.to(device)
    n_params, flops_tok = model.num_params(), model.flops_per_token(cfg.data.seq_len)
    progress = Progress(tc.max_steps, step, quiet)
    if tc.activation_checkpointing:  # from outside the model, before compile and sharding
        apply_activation_checkpointing(model)
    compile_model = use_compile(tc.compile, device)
    if env.active:  # from outside the model: compile (per block), then shard or replicate
        if compile_model and tc.parallelism == "fsdp":
            model = apply_compile(model, progress, per_block=True)
        bf16 = device.type == "cuda" and autocast_dtype(device, tc.dtype) == torch.bfloat16  # CPU: fp32 weights, autocast
        model = apply_fsdp(model, torch.bfloat16 if bf16 else torch.float32) if tc.parallelism == "fsdp" \
            else apply_ddp(model, device)
    optimizer = build_optimizer(unwrap(model), tc, device.type)
    if state is not None:
        try:
            if is_sharded(cmeta):
                load_sharded(ckpt, model, optimizer, cmeta)
            elif is_fsdp(model):
                load_full_optimizer(model, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise PretrainError(f"cannot restore the optimizer from {ckpt}: {e}") from None
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])

    metrics = None
    if env.is_main:
        write_text_atomic(run / "config.yaml", cfg.to_yaml())
        shutil.copyfile(Path(cfg.data.path) / meta["tokenizer"]["file"], run / "tokenizer.json")
        metrics = Metrics(run / "metrics.jsonl", keep_upto_step=step)
    where = f"{env.world_size} processes ({tc.parallelism}, {device.type})" if env.active else device.type
    where += ", bf16 autocast" if autocast_dtype(device, tc.dtype) == torch.bfloat16 else ", fp32"
    progress.write(f"{'resuming ' + str(run) + ' at step ' + str(step) if step else 'training ' + str(run)}: "
                   f"{n_params / 1e6:.2f}M parameters on {where}, "
                   f"{train_split.tokens:,} train tokens ({loader.n_windows:,} sequences of {cfg.data.seq_len})")
    if compile_model and not (env.active and tc.parallelism == "fsdp"):
        fwd = apply_compile(model, progress)
    else:
        fwd = model
    peak = peak_flops(device) if autocast_dtype(device, tc.dtype) == torch.bfloat16 else None
    tokens_per_step = global_batch * cfg.data.seq_len
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(val_loss: float | None) -> None:
        all_reduce_mean_(loss_acc)  # the job's running loss (the same on every rank from here on)
        saved = {"loader": batches.state_dict(), "rng": rng_state(), "loss_sum": loss_acc.item(), "loss_n": loss_n}
        info = {"tokens_seen": tokens_seen, "elapsed_s": elapsed, "val_loss": val_loss,
                "best_val_loss": None if math.isinf(best_val) else best_val,
                "tokenizer_sha256": meta["tokenizer"]["sha256"], "data_fingerprint": fingerprint,
                "config": cfg.to_dict(), "n_params": n_params,
                "global_batch_size": global_batch}
        if env.active:
            save_sharded_checkpoint(run, step, model, optimizer, saved, info, keep=tc.keep_checkpoints,
                                    consolidate=tc.consolidate)
        else:
            save_checkpoint(run, step, model, {"optimizer": optimizer.state_dict(), **saved}, info,
                            keep=tc.keep_checkpoints)

    def diverged(value: float, what: str = "loss") -> None:
        batches.close()
        progress.close()
        raise PretrainError(f"training diverged at step {step} ({what} {value}); lower train.lr (the last "
                            f"checkpoint saved, if any, is from before)")

    def check_finite() -> None:  # the losses since the last log line and the last step's gradient norm
        bad = not (bool(torch.isfinite(loss_acc)) and bool(torch.isfinite(torch.as_tensor(grad_norm))))
        if any_rank(bad, device):
            diverged(float("nan"), "loss or gradient norm")

    batches = Prefetcher(loader, device, tc.prefetch)  # started after the loader state is restored
    model.train()
    stop_reason = "max_steps"
    saved_at = step if ckpt is not None else -1
    t_start, elapsed_start = time.time(), elapsed  # elapsed_s: wall time of all training so far
    t_last, tok_last = t_start, tokens_seen
    loss_acc = torch.tensor(loss_sum, device=device)
    done = step >= tc.max_steps or bool(tc.stop_at_step and step >= tc.stop_at_step)
    time_frac = elapsed / tc.max_time_s if tc.max_time_s else 0.0  # the same on every rank (see below)
    if not done and tc.max_time_s and time_frac >= 1.0:  # resumed with the time budget already spent
        done, stop_reason = True, "max_time_s"
    stop.armed, grad_norm = True, 0.0
    while not done:
        lr = set_lr(optimizer, step, tc, time_frac if tc.time_schedule else 0.0)  # time_schedule: decay by time too
        # global micro-batch index: MLM masks depend on which samples, not on how many processes
        parts = [objective.prepare(batches.next(), seed=(tc.seed * 1_000_003 + step) * 1024
                                   + micro * env.world_size + env.rank) for micro in range(accum)]
        loss_acc += backward_step(model, fwd, objective, parts, env.world_size, device, tc.dtype)
        grad_norm = clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_n += 1
        tokens_seen += tokens_per_step
        elapsed = elapsed_start + time.time() - t_start
        if tc.max_time_s:  # every rank stops together, and sets the same time-scheduled LR
            time_frac = max_over_ranks(elapsed, device) / tc.max_time_s
        time_up = bool(tc.max_time_s) and time_frac >= 1.0
        done = step >= tc.max_steps or time_up or bool(tc.stop_at_step and step >= tc.stop_at_step)
        if done and step < tc.max_steps:
            stop_reason = "max_time_s" if time_up else "stop_at_step"
        # a stop signal: every rank stops at the same step (asked at logging steps when distributed, each step
        # alone); no evaluation, straight to the checkpoint
        if not done and (not env.active or step % tc.log_interval == 0) and any_rank(stop.received is not None,
                                                                                      device):
            done, stop_reason = True, stop.received or "SIGTERM"
        record: dict[str, Any] = {}

        if step % tc.log_interval == 0 or step == tc.max_steps:
            train_loss = all_reduce_mean_(loss_acc).item() / loss_n  # .item() syncs: time is read after it
            now = time.time()
            elapsed = elapsed_start + now - t_start
            if not math.isfinite(train_loss):  # (the same on every rank)
                diverged(train_loss)
            tok_s = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            record = {"step": step, "tokens": tokens_seen, "train_loss": round(train_loss, 6), "lr": lr,
                      "grad_norm": round(float(grad_norm), 6), "tokens_per_s": round(tok_s, 1),
                      "elapsed_s": round(elapsed, 3)}
            if peak:
                record["mfu"] = round(flops_tok * tok_s / (peak * env.world_size), 4)
            progress.update(step, {"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"})
            loss_acc.zero_()
            loss_n = 0

        if tc.eval_interval and (step % tc.eval_interval == 0 or done) and stop_reason not in STOP_SIGNALS:
            ev = evaluate(fwd, val_split, cfg.data.seq_len, tc.batch_size, device, tc.dtype, tc.eval_batches,
                          objective, documents)
            elapsed = elapsed_start + time.time() - t_start
            last_val = ev["loss"]
            if not math.isfinite(last_val):
                diverged(last_val, "val loss")
            best_val = min(best_val, last_val)
            record.update({"step": step, "tokens": tokens_seen, "val_loss": round(ev["loss"], 6),
                           "val_ppl": round(ev["ppl"], 4), "elapsed_s": round(elapsed, 3)})
            for key in ("bpb", "accuracy"):
                if key in ev:
                    record[f"val_{key}"] = round(ev[key], 6)
            progress.write(f"step {step}: val loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f}) at {elapsed:.1f}s")
            if tc.target_val_loss and any_rank(last_val <= tc.target_val_loss, device) and not done:
                done, stop_reason = True, "target_val_loss"
        if record and metrics is not None:
            metrics.write(record)
        if done or (tc.ckpt_interval and step % tc.ckpt_interval == 0):
            check_finite()  # never save diverged weights over the last good checkpoint
            checkpoint(last_val)
            saved_at = step
        if record and "train_loss" in record:
            t_last, tok_last = time.time(), tokens_seen

    if saved_at != step:
        check_finite()
        checkpoint(last_val)
    batches.close()
    progress.close()
    if metrics is not None:
        metrics.close()
        if tc.plot and (run / "metrics.jsonl").stat().st_size:
            plot_metrics(run / "metrics.jsonl", run / "loss_curve.png")
    return {"run_dir": str(run), "step": step, "tokens_seen": tokens_seen, "elapsed_s": round(elapsed, 3),
            "val_loss": last_val, "best_val_loss": None if math.isinf(best_val) else best_val,
            "stop_reason": stop_reason, "n_params": n_params}
