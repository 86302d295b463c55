"""Typed configuration: dataclasses with a docstring per field, YAML that states only what differs,
and dotted command-line overrides (``--train.lr 3e-4``).

Unknown keys are errors with a "did you mean" suggestion; values are checked against field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain import PretrainError


class ConfigError(PretrainError):
    """A configuration problem (unknown key, wrong type, invalid value)."""


@dataclass
class DataConfig:
    path: str = ""
    """Prepared data directory written by `pretrain prepare` (holds meta.json and the shards)."""
    seq_len: int = 256
    """Tokens per training sequence (the context length the model is trained on)."""
    packing: bool = True
    """Pack documents back to back into full sequences (true), or put one document per sequence, cut at
    seq_len and padded with [PAD] (false; needs a tokenizer with a pad token, e.g. wordpiece)."""
    doc_mask: bool = False
    """Document masking: in packed sequences, attention stays within each document (block-diagonal, split
    at the tokenizer's end-of-text token), so a token never sees the previous document. Architectures gpt
    and bert; SDPA then runs with an explicit mask (slower than plain causal attention on some backends)."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, "data.seq_len must be >= 1")


@dataclass
class ModelConfig:
    arch: str = "gpt"
    """Architecture: 'gpt' (decoder-only, Llama-compatible), 'bert' (bidirectional encoder,
    ModernBERT-compatible), or 'gpt2' (OpenAI GPT-2 layout, for continuing imported GPT-2 checkpoints)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads (query heads)."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means the same as n_head."""
    d_model: int = 128
    """Hidden size (embedding width)."""
    d_ff: int = 0
    """MLP inner width (SwiGLU); 0 means about 8/3 * d_model rounded up to a multiple of 64."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the prepared data's tokenizer."""
    max_seq_len: int = 0
    """Longest sequence the model supports (rotary table size); 0 means data.seq_len."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection weights."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (0 for pre-training at scale)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; output projections are scaled by 1/sqrt(2*n_layer)."""
    generator_layers: int = 0
    """arch electra only: blocks of the generator (the small masked LM that proposes replacements; it shares
    the discriminator's token embeddings and width d_model); 0 = max(1, n_layer // 4). ELECTRA found a
    generator 1/4 to 1/2 the discriminator's size best: a bigger one makes the task too hard."""
    generator_heads: int = 0
    """arch electra only: the generator's attention heads; 0 = n_head (at a fixed width the number of heads
    does not change the compute)."""
    generator_ff: int = 0
    """arch electra only: the generator's MLP inner width; 0 = half the discriminator's (ff_dim / 2, rounded
    up to a multiple of 64)."""
    image_size: int = 0
    """Image architectures (vit, resnet): side of the square input images in pixels; 0 takes it from the
    prepared data."""
    channels: int = 0
    """Image architectures: input colour channels (1 grayscale, 3 RGB); 0 takes it from the prepared data."""
    image_mean: list[float] = field(default_factory=list)
    """Image architectures: per-channel mean of the pixels (scaled to [0, 1]) subtracted before the model;
    empty takes the training split's, from the prepared data (saved with the run: fine-tuning, features and
    export normalise new images alike)."""
    image_std: list[float] = field(default_factory=list)
    """Image architectures: per-channel standard deviation the pixels are divided by; empty: the data's."""
    num_classes: int = 0
    """Image architectures: outputs of the classification head, for objective supervised; 0 takes the
    number of classes of the prepared data (and no head for objective mae)."""
    patch_size: int = 4
    """arch vit: side of the square patches an image is cut into (ViT-B/16: 16; 4 for 28-pixel images)."""
    decoder_layers: int = 2
    """arch vit, objective mae: blocks of the light decoder that reconstructs the masked patches (MAE: 8 at
    512 wide for ViT-B; a few narrow ones suffice for small images); dropped for other objectives."""
    decoder_dim: int = 128
    """arch vit, objective mae: the decoder's width."""
    decoder_heads: int = 4
    """arch vit, objective mae: the decoder's attention heads."""
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    """arch resnet: residual blocks per stage (ResNet-18: [2, 2, 2, 2]; ResNet-50: [3, 4, 6, 3] with block
    bottleneck)."""
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """arch resnet: output channels of each stage (Hugging Face's hidden_sizes; ResNet-50: [256, 512, 1024,
    2048], a bottleneck block's inner width being a quarter of it)."""
    stem_width: int = 64
    """arch resnet: channels of the stem convolution (Hugging Face's embedding_size)."""
    block: str = "basic"
    """arch resnet: 'basic' (two 3x3 convolutions; ResNet-18/34) or 'bottleneck' (1x1, 3x3, 1x1;
    ResNet-50)."""
    stem: str = "small"
    """arch resnet: 'small' (one 3x3 convolution at stride 1, no pooling: 28-64 pixel images) or 'imagenet'
    (7x7 convolution at stride 2 and a max-pool: 224 pixels; the only stem Hugging Face's ResNet has)."""

    def __post_init__(self) -> None:
        _all_finite(self, "model")
        from pretrain.models.spec import arch_names  # (the registry imports this module: resolved at use)

        names = arch_names()
        close = difflib.get_close_matches(self.arch, names, n=1)
        _check(self.arch in names,
               f"model.arch must be one of {', '.join(map(repr, names))}, got {self.arch!r}"
               + (f" (did you mean {close[0]!r}?)" if close else ""))
        _check(self.n_layer >= 1 and self.n_head >= 1 and self.d_model >= 1, "model sizes must be >= 1")
        for name in ("n_kv_head", "d_ff", "vocab_size", "max_seq_len", "init_std", "generator_layers",
                     "generator_heads", "generator_ff", "image_size", "channels", "num_classes",
                     "decoder_layers"):
            _check(getattr(self, name) >= 0, f"model.{name} must be >= 0")
        _check(self.rope_theta > 0 and self.norm_eps > 0, "model.rope_theta and model.norm_eps must be > 0")
        _check(self.d_model % self.n_head == 0,
               f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        _check((self.d_model // self.n_head) % 2 == 0, "head size (d_model / n_head) must be even for rotary")
        kv = self.n_kv_head or self.n_head
        _check(self.n_head % kv == 0,
               f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({kv})")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(self.patch_size >= 1 and self.decoder_dim >= 1 and self.decoder_heads >= 1
               and self.stem_width >= 1,
               "model.patch_size, decoder_dim, decoder_heads and stem_width must be >= 1")
        _check(self.decoder_dim % self.decoder_heads == 0,
               f"model.decoder_dim ({self.decoder_dim}) must be divisible by model.decoder_heads "
               f"({self.decoder_heads})")
        _check(len(self.depths) >= 1 and len(self.depths) == len(self.widths)
               and all(v >= 1 for v in (*self.depths, *self.widths)),
               "model.depths and model.widths must be lists of positive integers of the same length")
        _check(self.block in ("basic", "bottleneck"),
               f"model.block must be basic or bottleneck, got {self.block!r}")
        _check(self.stem in ("small", "imagenet"), f"model.stem must be small or imagenet, got {self.stem!r}")
        _check(len(self.image_mean) == len(self.image_std) and all(v > 0 for v in self.image_std),
               "model.image_mean and model.image_std must have one value per channel (std > 0)")
        if self.generator_heads:
            _check(self.d_model % self.generator_heads == 0
                   and (self.d_model // self.generator_heads) % 2 == 0,
                   f"model.generator_heads ({self.generator_heads}) must divide model.d_model "
                   f"({self.d_model}) into heads of an even size")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return ((8 * self.d_model // 3) + 63) // 64 * 64


@dataclass
class TrainConfig:
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (on each process)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all processes, = batch_size x grad_accum x world size. When set,
    grad_accum is derived from it at each launch (so a run can continue on another number of processes with
    the same training); 0 means batch_size x grad_accum x world size."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine, linear and wsd)."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak learning rate."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: 'cosine', 'linear' (to the floor), 'wsd' (warmup-stable-decay) or
    'constant'."""
    decay_frac: float = 0.2
    """wsd only: fraction of max_steps spent in the final (linear) decay."""
    optimizer: str = "adamw"
    """'adamw', or 'muon' (Muon for hidden-layer matrices at train.muon_lr, AdamW for embeddings,
    output head and gains at train.lr)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (orthogonalized updates have unit spectral scale, so ~0.02-0.05)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms or embeddings' gains)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    eval_interval: int = 200
    """Evaluate on the validation split every this many steps (and at the end); 0 disables."""
    eval_batches: int = 20
    """Micro-batches of validation data per evaluation (spread evenly over the split); 0 means all of it."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    ckpt_interval: int = 500
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep."""
    seed: int = 1337
    """Random seed (model init, data order, dropout)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bf16 on CUDA and on CPUs with native bf16 instructions, AVX512-BF16 or AMX;
    fp32 elsewhere), 'bf16' or 'fp32'. Weights, gradients and optimizer state stay fp32."""
    compile: bool | str = "auto"
    """Compile the model with torch.compile (falls back to eager with a warning if compilation fails):
    true, false, or 'auto' = on CUDA only (on a CPU, compiling takes about a minute on 2 cores for
    roughly 10-20% faster steps: worth it for long runs only, so there it is on when asked for)."""
    threads: int = 0
    """CPU threads for torch (0 leaves torch's default)."""
    prefetch: int = 2
    """Batches prepared ahead by a background thread (pinned memory and an asynchronous copy on CUDA);
    0 draws each batch in the training loop. Resume stays exact either way."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them: less
    memory (larger micro-batches or models) for about a third more compute per step."""
    auto_batch: bool = False
    """On CUDA, at the start of a fresh run: find the largest micro-batch (train.batch_size) that fits in
    memory, trying forward+backward at doubling sizes, no larger than the global batch, and derive
    grad_accum to keep the global batch (train.global_batch_size, or batch_size x grad_accum x world
    size as configured). On CPU, and under FSDP, the configured batch_size is kept."""
    parallelism: str = "ddp"
    """Under torchrun (several processes): 'ddp' (a full model replica per process, gradients all-reduced) or
    'fsdp' (FSDP2: parameters, gradients and optimizer state sharded over the processes, per block)."""
    dist_timeout_s: float = 600.0
    """Several processes: seconds a collective waits for the other ranks before the job fails."""
    consolidate: bool = True
    """Several processes: also write each checkpoint's full weights as one model.safetensors (gathered on
    rank 0, on CPU) beside the sharded torch.distributed.checkpoint files, for eval/export/fine-tuning.
    With false only the shards are written; `pretrain.checkpoint.consolidate(RUN)` writes the file later."""
    max_time_s: float = 0.0
    """Stop (and checkpoint) after this many seconds of training; 0 means no limit."""
    time_schedule: bool = False
    """With max_time_s: the LR decay also runs over the time budget (after the warmup, which stays in steps,
    the LR is the lower of the schedule at step / max_steps and at elapsed / max_time_s), so a slower
    machine still finishes the decay instead of stopping at a high LR. The LR then depends on wall time:
    runs are not bit-reproducible."""
    stop_at_step: int = 0
    """Stop (and checkpoint) after this step while keeping the schedule of max_steps, to split one run
    across several jobs (continue with `pretrain train --resume RUN --train.stop_at_step 0`); 0 disables."""
    target_val_loss: float = 0.0
    """Stop (and checkpoint) as soon as an evaluation reaches this validation loss; 0 disables."""
    plot: bool = True
    """Write loss_curve.png into the run directory at the end."""
    init_from: str = ""
    """A local Hugging Face model directory (Llama architecture: config.json + safetensors + tokenizer.json)
    to start from; its architecture replaces the model section. Prepare the data with --tokenizer DIR."""
    guard: str = "off"
    """Loss-spike guard (pretrain/guard.py): 'off', 'stop' (end the run at a spike), 'skip' (drop that update)
    or 'rollback' (back to the last checkpoint, past the samples since, LR x guard_lr_scale). A step whose
    loss or gradient norm is not finite, or lies guard_z standard deviations above the recent ones, is a
    spike."""
    guard_z: float = 6.0
    """Spike threshold in standard deviations above the mean of the last guard_window accepted steps."""
    guard_warmup: int = 50
    """Accepted steps before spikes are judged (the loss falls fast at first)."""
    guard_window: int = 100
    """Accepted steps the mean and standard deviation are taken over."""
    guard_max_events: int = 5
    """More skips or rollbacks than this end the run."""
    guard_lr_scale: float = 1.0
    """After a rollback, every learning rate is multiplied by this (e.g. 0.5)."""
    skip_samples: str = ""
    """Global sample ranges the loader passes over, 'A-B[,C-D...]' (B excluded): data a run should not see
    again (e.g. the batches before a spike; see the summary's guard events)."""
    fault: str = ""
    """For tests: 'nan@STEP' or 'spike@STEP' makes that step's loss and gradients NaN or 1000x."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get metrics.jsonl's scalars and the config (rank 0 only): any of
    'tensorboard' (RUN/tb), 'mlflow' (RUN/mlruns unless MLFLOW_TRACKING_URI is set), 'wandb' (offline in
    RUN/wandb unless logged in or WANDB_MODE is set), 'trackio'; each needs its extra, e.g.
    `pip install 'pretrain[tensorboard]'` (docs/tracking.md). [] = metrics.jsonl only."""

    def __post_init__(self) -> None:
        _all_finite(self, "train")
        self.report_to = check_report_to(self.report_to, "train.report_to")
        _check(self.guard in ("off", "stop", "skip", "rollback"),
               f"train.guard must be 'off', 'stop', 'skip' or 'rollback', got {self.guard!r}")
        _check(self.guard_z > 0 and self.guard_warmup >= 0 and self.guard_window >= 2
               and self.guard_max_events >= 0 and 0 < self.guard_lr_scale <= 1,
               "train.guard_z must be > 0, guard_warmup >= 0, guard_window >= 2, guard_max_events >= 0 and "
               "guard_lr_scale in (0, 1]")
        parse_sample_ranges(self.skip_samples)
        _check(self.fault == "" or re.fullmatch(r"(nan|spike)@\d+", self.fault) is not None,
               f"train.fault must be 'nan@STEP' or 'spike@STEP', got {self.fault!r}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1,
               "train.batch_size and train.grad_accum must be >= 1")
        _check(self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(not self.time_schedule or self.max_time_s > 0,
               "train.time_schedule needs train.max_time_s > 0")
        _check(self.prefetch >= 0, "train.prefetch must be >= 0")
        _check(self.compile in (True, False, "auto"),
               f"train.compile must be true, false or 'auto', got {self.compile!r}")
        _check(self.lr > 0 and self.muon_lr > 0, "train.lr and train.muon_lr must be > 0")
        _check(self.optimizer in ("adamw", "muon"),
               f"train.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        _check(self.schedule in ("cosine", "linear", "wsd", "constant"),
               f"train.schedule must be 'cosine', 'linear', 'wsd' or 'constant', got {self.schedule!r}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(0.0 < self.decay_frac <= 1.0, "train.decay_frac must be in (0, 1]")
        _check(self.dtype in ("auto", "bf16", "fp32"),
               f"train.dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.log_interval >= 1, "train.log_interval must be >= 1")
        _check(self.parallelism in ("ddp", "fsdp"),
               f"train.parallelism must be 'ddp' or 'fsdp', got {self.parallelism!r}")
        _check(self.global_batch_size == 0 or self.global_batch_size >= self.batch_size,
               "train.global_batch_size must be 0 or at least train.batch_size")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s must be > 0")
        for name in ("warmup_steps", "eval_interval", "eval_batches", "ckpt_interval", "seed", "threads",
                     "stop_at_step", "weight_decay", "grad_clip", "max_time_s", "target_val_loss"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0")
        _check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
               "train.beta1 and train.beta2 must be in [0, 1)")


def parse_sample_ranges(spec: str) -> list[tuple[int, int]]:
    """'A-B,C-D' → [(A, B), (C, D)] (B excluded); '' → []."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        _check(m is not None and int(m[1]) < int(m[2]),
               f"train.skip_samples: {item!r} is not a range A-B of sample indices with A < B")
        out.append((int(m[1]), int(m[2])))
    return out


@dataclass
class MLMConfig:
    mask_prob: float = 0.15
    """Fraction of (non-special) tokens selected for prediction (BERT 0.15; 0.3 also works well)."""
    mask_token_frac: float = 0.8
    """Of the selected tokens, the fraction replaced by [MASK]."""
    random_token_frac: float = 0.1
    """Of the selected tokens, the fraction replaced by a random token (the rest are left unchanged)."""
    whole_word: bool = False
    """Select whole words: all WordPiece pieces of a word are masked together."""
    end_frac: float = 0.0
    """Fraction of sequences in which, instead, only the last token of each document (the one before its
    end-of-document token) is masked: BERT4Rec's extra training samples, which mirror predicting the next
    item after a history (item sequences); 0 for text."""

    def __post_init__(self) -> None:
        _all_finite(self, "mlm")
        _check(0.0 < self.mask_prob < 1.0, "mlm.mask_prob must be in (0, 1)")
        _check(0.0 <= self.end_frac <= 1.0, "mlm.end_frac must be in [0, 1]")
        _check(self.mask_token_frac >= 0 and self.random_token_frac >= 0
               and self.mask_token_frac + self.random_token_frac <= 1.0,
               "mlm.mask_token_frac and mlm.random_token_frac must be >= 0 and sum to at most 1")


@dataclass
class RTDConfig:
    weight: float = 50.0
    """Weight of the discriminator's loss (mean binary cross-entropy over every real token) against the
    generator's masked-LM loss (ELECTRA's lambda, 50). Which positions the generator fills is
    mlm.mask_prob (and mlm.whole_word); all of them are [MASK] for the generator."""

    def __post_init__(self) -> None:
        _all_finite(self, "rtd")
        _check(self.weight > 0, "rtd.weight must be > 0")


@dataclass
class ImageConfig:
    mask_ratio: float = 0.75
    """objective mae: fraction of the patches hidden from the encoder (MAE: 0.75)."""
    norm_pix_loss: bool = True
    """objective mae: reconstruct each patch's pixels normalised by the patch's own mean and variance (MAE's
    better-representation variant) rather than the raw pixels."""
    label_smoothing: float = 0.1
    """objective supervised: label smoothing of the cross-entropy."""
    crop_scale: float = 0.35
    """Random resized crop: the smallest fraction of the image's area a crop keeps (aspect ratio 3/4 to 4/3),
    then resized back to the full size; 1.0 turns cropping off. MAE and ImageNet training use 0.2 / 0.08 on
    large photos; small images lose too much below about 0.3."""
    flip: bool = False
    """Random horizontal flips. Off by default: flipping changes what digits, letters or chest X-rays show."""
    knn_k: int = 20
    """k-NN monitor at each evaluation, when the data has labels: accuracy of a k-nearest-neighbour vote
    (cosine similarity of frozen features) of validation images among training images; 0 turns it off."""
    knn_bank: int = 5000
    """k-NN monitor: training images in the memory bank (the first of a fixed seeded sample)."""

    def __post_init__(self) -> None:
        _all_finite(self, "image")
        _check(0.0 < self.mask_ratio < 1.0, "image.mask_ratio must be in (0, 1)")
        _check(0.0 <= self.label_smoothing < 1.0, "image.label_smoothing must be in [0, 1)")
        _check(0.0 < self.crop_scale <= 1.0, "image.crop_scale must be in (0, 1]")
        _check(self.knn_k >= 0 and self.knn_bank >= 1, "image.knn_k must be >= 0 and image.knn_bank >= 1")


OBJECTIVES = ("clm", "mlm", "rtd", "mae", "supervised")


@dataclass
class Config:
    objective: str = "clm"
    """Self-supervised objective: 'clm' (causal LM, next token; model.arch gpt), 'mlm' (masked LM;
    model.arch bert) or 'rtd' (replaced-token detection, ELECTRA: a small masked-LM generator and a
    discriminator trained together; model.arch electra); for images 'mae' (masked autoencoding; model.arch
    vit) or 'supervised' (classification pre-training on labelled images; model.arch vit or resnet)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the prepared data is and how it is cut into sequences."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture and size."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, checkpointing."""
    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Masking, for objective 'mlm' (and which positions the generator fills, for 'rtd')."""
    rtd: RTDConfig = field(default_factory=RTDConfig)
    """Replaced-token detection (ELECTRA), for objective 'rtd'."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image objectives (mae, supervised): masking, augmentation, the k-NN monitor."""

    def __post_init__(self) -> None:
        from pretrain.models.spec import get_spec, specs

        _check(self.objective in OBJECTIVES,
               f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {self.objective!r}")
        if self.objective not in get_spec(self.model.arch).objectives:
            want = [s.name for s in specs() if self.objective in s.objectives]
            _check(False, f"objective {self.objective!r} trains a {' or '.join(map(repr, want))} model "
                          f"(set model.arch: {want[0]}), not {self.model.arch!r}")
        _check(self.objective not in ("mlm", "rtd") or self.data.seq_len >= 2,
               f"objective {self.objective} needs data.seq_len >= 2 ([CLS] takes the first position)")
        if self.objective == "rtd":  # ELECTRA's generator sees every selected position as [MASK]
            default = MLMConfig()
            _check(self.mlm.mask_token_frac == default.mask_token_frac
                   and self.mlm.random_token_frac == default.random_token_frac,
                   "objective rtd puts [MASK] at every position the generator fills: mlm.mask_token_frac "
                   "and mlm.random_token_frac do not apply (leave them unset)")
        _check(not (self.train.target_val_loss and not self.train.eval_interval),
               "train.target_val_loss needs evaluations to check it: set train.eval_interval > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


TASKS = ("classification", "regression", "token", "qa")


@dataclass
class FinetuneConfig:
    METRICS = ("auto", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc")  # (not a field: no annotation)

    task: str = "classification"
    """'classification' (one label per text or text pair), 'regression' (a number per text or pair),
    'token' (one tag per word, CoNLL files) or 'qa' (extractive question answering: the answer is a span of
    the context; SQuAD JSON or tables)."""
    text_column: str = "text"
    """Column (CSV/TSV/Parquet) or field (JSONL) holding the text."""
    text_pair_column: str | None = None
    """Second text column for sentence-pair tasks (entailment, paraphrase, similarity)."""
    label_column: str = "label"
    """Column holding the label (a class name or number; a float for regression)."""
    epochs: int = 3
    """Passes over the training data (early stopping may end sooner)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit)."""
    max_train: int = 0
    """Fine-tune on a random subset of this many training rows, drawn with ``seed`` (classification keeps
    at least one row of every class), as ``pretrain probe --max-train`` does; 0 = all rows."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (of the top layer when layer_decay < 1)."""
    head_lr: float = 0.0
    """Learning rate of the task head (0 = same as lr)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: the top block gets lr, each block below a factor layer_decay less, the
    embeddings lr × layer_decay^n_layer (1 = off)."""
    head_only: bool = False
    """Freeze the backbone; train the task head only."""
    lora: bool = False
    """Train LoRA adapters on the blocks' linear layers (and the head) instead of all weights (needs peft)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input."""
    save_adapter: bool = False
    """With lora: also write OUT/adapter, a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors, the tokenizer) that `peft` loads onto the pre-trained run's Hugging Face export
    (`pretrain export RUN`), with the same predictions."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    warmup_frac: float = 0.06
    """Fraction of the steps spent warming the LR up linearly; it then decays linearly to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    dropout: float = 0.1
    """Dropout in the backbone and before the head while fine-tuning."""
    pooling: str = "auto"
    """Sequence representation: 'cls' (encoders), 'last' (decoders), 'mean', or 'auto' (cls / last)."""
    max_length: int = 0
    """Longest input in tokens, specials included (0 = the model's context)."""
    truncation: str = "end"
    """Over-long inputs: 'end' (cut the end; the longer text of a pair first), 'start' (keep the end)
    or 'error'. The number truncated is reported."""
    schedule_epochs: int = 0
    """Epochs the learning-rate schedule spans (0 = epochs). More than ``epochs`` stops training part-way
    through the schedule, where early stopping would have (``finetune --search`` and ``transfer`` replay the
    search's best run this way)."""
    patience: int = 3
    """Early stopping: stop after this many evaluations without a better validation metric (0 = never)."""
    evals_per_epoch: int = 1
    """Validation passes per epoch (early stopping counts them); 0 = one pass, after the last step (the
    model saved is the final one)."""
    prompt: str = ""
    """Prompt-based classification (PET / LM-BFF): a template with {text} (and {text_pair} for pairs) and
    {mask}, e.g. '{text} It was {mask}.' The backbone's own LM head scores the --verbalizer words at {mask}
    (encoders: a [MASK] token; decoders: the next token, so {mask} must end the template), so no head
    starts from random. '' = a linear head on pooled features."""
    verbalizer: str = ""
    """With --prompt: one word per label, 'label=word,...' (e.g. '0=terrible,1=great'); each word must be a
    single token of the run's vocabulary."""
    from_scratch: bool = False
    """Start from a random init of the run's architecture instead of its weights (the baseline)."""
    seed: int = 0
    """Seed of the head init, dropout, shuffling (and the scratch init)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bf16 on CUDA and on CPUs with native bf16 instructions, fp32 elsewhere),
    'bf16' or 'fp32'."""
    metric: str = "auto"
    """The validation metric that picks the best model, drives early stopping, the recipe search and
    transfer's report: 'auto' (accuracy for classification, Pearson for regression, entity F1 for token
    tags, SQuAD F1 for qa) or, for classification, 'accuracy', 'balanced_accuracy', 'macro_f1' or
    'roc_auc' (two classes only: the medical convention)."""
    class_weights: str = "none"
    """Classification loss: 'none', or 'auto' (each class weighted by the inverse of its frequency in the
    training labels, n / (classes x count): imbalanced labels)."""
    crop_scale: float = 0.8
    """Image runs: random resized crop while fine-tuning: a crop keeps at least this fraction of the image's
    area (aspect ratio 3/4 to 4/3) and is resized back to full size; 1 = no cropping."""
    flip: bool = False
    """Image runs: random horizontal flips while fine-tuning (off by default: flipping changes what digits,
    letters or chest X-rays show)."""
    question_column: str = "question"
    """Task qa, tables (CSV/TSV/JSONL/Parquet): the column with the question (SQuAD JSON needs no names)."""
    context_column: str = "context"
    """Task qa, tables: the column with the passage the answer is taken from."""
    answer_column: str = "answer_text"
    """Task qa, tables: the column with the answer's text, exactly as it appears in the context (empty or
    null: the question has no answer in the context, SQuAD 2.0)."""
    answer_start_column: str = "answer_start"
    """Task qa, tables: the column with the answer's character offset in the context."""
    id_column: str = "id"
    """Task qa, tables: the column with each question's id (optional: the row number when absent)."""
    doc_stride: int = 128
    """Task qa: tokens shared by consecutive windows of a context longer than fits beside the question (as
    Hugging Face's ``stride``): an answer near one window's edge is whole in the next."""
    max_answer_length: int = 30
    """Task qa: the longest answer span decoded, in tokens."""
    n_best: int = 1
    """Task qa: spans each window puts forward when decoding; the same answer text put forward more than
    once (by overlapping windows) adds up its scores (transformers' question-answering pipeline's top_k)."""
    null_threshold: float = 0.0
    """Task qa with unanswerable questions (SQuAD 2.0): answer nothing when the null score (start and end
    on the null position) exceeds the best span's score by more than this (probabilities, 0..1)."""
    bad_rows: str = "error"
    """Task qa: a row that cannot be used (an answer not at its answer_start, an empty context, a question
    longer than max_length): 'error' (stop, naming it) or 'skip' (leave it out, counted in a warning)."""
    forgetting_batches: int = 16
    """Forgetting: batches (8 sequences each) of the backbone's pre-training validation split scored with its
    pre-training objective before fine-tuning and on the model kept; the change is finetune.json's
    ``forgetting`` (causal and masked LM runs whose prepared data is still there; 0 = not measured)."""
    replay: str = ""
    """A prepared data directory (tokenized with the run's tokenizer: usually the run's own data) whose train
    batches are mixed into fine-tuning under the pre-training objective, to limit forgetting ('' = none)."""
    replay_frac: float = 0.1
    """With replay: the share of optimizer steps that are pre-training steps (spread evenly)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get metrics.jsonl's scalars and these options (comma-separated on the
    command line): 'tensorboard' (OUT/tb), 'mlflow' (OUT/mlruns unless MLFLOW_TRACKING_URI is set), 'wandb',
    'trackio' (docs/tracking.md)."""

    def __post_init__(self) -> None:
        _all_finite(self, "finetune")
        self.report_to = check_report_to(self.report_to, "report_to")
        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.max_steps >= 0 and self.schedule_epochs >= 0,
               "max_steps and schedule_epochs must be >= 0")
        _check(self.max_train >= 0, "max_train must be >= 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0 and self.head_lr >= 0, "lr must be > 0 and head_lr >= 0")
        _check(0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]")
        _check(not (self.head_only and self.lora), "head_only and lora exclude each other")
        _check(self.lora_r >= 1, "lora_r must be >= 1")
        _check(self.lora_alpha > 0, "lora_alpha must be > 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        _check(self.lora or not self.save_adapter, "save_adapter writes a LoRA adapter: it needs lora")
        _check(0 <= self.warmup_frac < 1, "warmup_frac must be in [0, 1)")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(self.pooling in ("auto", "cls", "last", "mean"),
               f"pooling must be auto, cls, last or mean, got {self.pooling!r}")
        _check(self.max_length >= 0, "max_length must be >= 0")
        _check(self.truncation in ("end", "start", "error"),
               f"truncation must be end, start or error, got {self.truncation!r}")
        _check(self.patience >= 0 and self.evals_per_epoch >= 0,
               "patience and evals_per_epoch must be >= 0")
        _check(self.dtype in ("auto", "bf16", "fp32"),
               f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        _check(self.metric in self.METRICS,
               f"metric must be one of {', '.join(self.METRICS)}, got {self.metric!r}")
        _check(self.metric == "auto" or self.task == "classification",
               f"metric {self.metric!r} is for task classification (other tasks: auto)")
        _check(self.class_weights in ("none", "auto"),
               f"class_weights must be none or auto, got {self.class_weights!r}")
        _check(self.class_weights == "none" or self.task == "classification",
               "class_weights auto is for task classification")
        _check(0 < self.crop_scale <= 1, "crop_scale must be in (0, 1]")
        _check(self.doc_stride >= 0, "doc_stride must be >= 0")
        _check(self.max_answer_length >= 1 and self.n_best >= 1, "max_answer_length and n_best must be >= 1")
        _check(self.bad_rows in ("error", "skip"), f"bad_rows must be error or skip, got {self.bad_rows!r}")
        _check(self.forgetting_batches >= 0, "forgetting_batches must be >= 0")
        _check(0 < self.replay_frac < 1, "replay_frac must be in (0, 1)")
        if self.prompt or self.verbalizer:
            _check(self.task == "classification", "prompt/verbalizer are for task classification only")
            _check(bool(self.prompt and self.verbalizer),
                   "prompt-based classification needs both prompt and verbalizer")
            parse_template(self.prompt, self.text_pair_column is not None)
            parse_verbalizer(self.verbalizer)


# the grammar of FinetuneConfig.prompt and .verbalizer (checked here, used by finetune/encode.py)
PROMPT_FIELDS = ("{text}", "{text_pair}", "{mask}")


def parse_template(template: str, pair: bool) -> list[str]:
    """``'{text} It was {mask}.'`` → ``['{text}', ' It was ', '{mask}', '.']`` (fields and literal text)."""
    parts = [p for p in re.split(r"(\{text\}|\{text_pair\}|\{mask\})", template) if p]
    for slot in PROMPT_FIELDS:
        want = 0 if slot == "{text_pair}" and not pair else 1
        if parts.count(slot) != want:
            raise ConfigError(f"prompt {template!r} must hold {slot} "
                              f"{'exactly once' if want else 'only with --text-pair-column'}"
                              f" (fields: {', '.join(PROMPT_FIELDS)}; other braces are not allowed)")
    if any("{" in p or "}" in p for p in parts if p not in PROMPT_FIELDS):
        raise ConfigError(f"prompt {template!r} has an unknown field; "
                          f"the fields are {', '.join(PROMPT_FIELDS)}")
    return parts


def parse_verbalizer(spec: str) -> dict[str, str]:
    """``'0=terrible,1=great'`` → ``{'0': 'terrible', '1': 'great'}``."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise ConfigError(f"verbalizer {spec!r}: each item is label=word, got {item!r}")
        if label.strip() in out:
            raise ConfigError(f"verbalizer {spec!r} names label {label.strip()!r} twice")
        out[label.strip()] = word.strip()
    if len(set(out.values())) < len(out):
        raise ConfigError(f"verbalizer {spec!r}: every label needs its own word")
    return out


REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")
"""The experiment trackers train.report_to / finetune's report_to may name (pretrain/trackers.py)."""


def check_report_to(names: list[str] | str, key: str) -> list[str]:
    """``names`` without repeats, each a known tracker; otherwise a ConfigError with a suggestion. A string
    (``FinetuneConfig(report_to="tensorboard,mlflow")`` from Python) is split at its commas."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        if name not in REPORT_TO:
            close = difflib.get_close_matches(str(name), REPORT_TO, n=1, cutoff=0.5)
            raise ConfigError(f"{key}: unknown tracker {name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; the trackers are {', '.join(REPORT_TO)}")
        if name not in out:
            out.append(name)
    return out


def _all_finite(section: Any, name: str) -> None:
    """Every number of a config section is finite: `lr: inf` or `.nan` is a config error, not a later NaN."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{name}.{f.name} must be a finite number, got {v}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------------------
# building configs from dicts, YAML files and dotted overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def _takes_text(parts: list[str]) -> bool:
    """Is the Config field at this dotted path a string (not an int, bool, ...)? Unknown paths: no."""
    cls: Any = Config
    for name in parts:
        if not dataclasses.is_dataclass(cls):
            return False
        tp = _field_types(cls).get(name)
        if tp is None:
            return False
        cls = tp
    return cls is str


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is list:
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # `--model.depths 3,4,6,3`
            value = [v for v in (x.strip() for x in value.strip("[]").split(",")) if v]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [v if elem is Any else _coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial, possibly nested) dict; unknown keys are errors."""
    if data is None:  # an empty section (`train:` with nothing under it)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(_not_a_mapping(prefix.rstrip(".") or "config", data))
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{_suggest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _not_a_mapping(name: str, value: Any, where: str = "") -> str:
    return (f"{where}{name} must be a mapping (indented `key: value` lines), got {type(value).__name__} "
            f"{value!r}")


def _check_sections(data: dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    """Every section of ``data`` (a field of ``cls`` that is itself a dataclass) is a mapping (or empty), so
    that merging overrides into it can never replace it silently (``train: 5`` + ``--train.lr 1e-3``)."""
    hints = _field_types(cls)
    for key, value in data.items():
        tp = hints.get(key) if isinstance(key, str) else None
        if tp is None or not dataclasses.is_dataclass(tp) or value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(_not_a_mapping(prefix + key, value, f"{where}: "))
        _check_sections(value, tp, where, prefix + key + ".")


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``extra`` over ``base``, mappings merged key by key. A mapping never replaces a value that is not one
    (``train: 5`` with ``--train.lr 1e-3`` is an error, not a ``train`` section holding only ``lr``)."""
    out = dict(base)
    for k, v in extra.items():
        old, name = out.get(k), f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = _merge(old, v, name + ".")
        elif isinstance(v, dict) and old is not None:
            raise ConfigError(f"{name!r} is {old!r}, not a mapping, so {name}.{next(iter(v), '...')} cannot "
                              "be set in it")
        elif v is None and isinstance(old, dict):  # an empty section (`train:`) changes nothing
            continue
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--train.lr', '3e-4', '--model.n_layer=6']`` → nested dict. Values are YAML scalars, except that a
    string field of :class:`Config` gets the text exactly as typed."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r} (config overrides look like --section.key value)")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2
                                      and not args[i + 1][2:3].isdigit()):
                raise ConfigError(f"override {arg!r} needs a value")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        parts = key.split(".")
        if _takes_text(parts):  # as typed: `--data.path 010` is "010", not YAML's octal 8
            value: Any = raw
        else:
            try:
                value = _load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with another override")
        node[parts[-1]] = value
    return out


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's numbers (``010`` is 10, not YAML 1.1's octal 8; ``3e-4`` is a float,
    ``1:30`` a string, not 90) that refuses a key given twice in one mapping (YAML keeps the last
    silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice "
                                                        f"(line {key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {  # YAML 1.1's int/float resolvers out, the 1.2 core schema's in
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text[2:], 16 if text[1] == "x" else 8) if text[:2] in ("0x", "0o") else int(text, 10)


_ConfigLoader.add_constructor(_INT, _yaml12_int)


class _ConfigDumper(yaml.SafeDumper):
    """yaml.safe_dump that also quotes strings YAML 1.2 reads as numbers (``3e-4``), so the file reads back
    the same with this module's loader and with any YAML 1.1 one."""


_ConfigDumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []),
            *_ConfigLoader.yaml_implicit_resolvers.get(first, [])]
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_ConfigLoader.yaml_implicit_resolvers}}


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def dump_yaml(data: dict[str, Any]) -> str:
    """A config dict as YAML that :func:`load_yaml` (and ``yaml.safe_load``) read back as the same values."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = _load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults ← ``base`` dict ← YAML file ← overrides, validated into a :class:`Config`."""
    merged: dict[str, Any] = dict(base or {})
    _check_sections(merged, Config, "base config")
    if path is not None:
        data = load_yaml(path)
        _check_sections(data, Config, f"config file {path}")
        merged = _merge(merged, data)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        _check_sections(overrides, Config, "overrides")
        merged = _merge(merged, overrides)
    return from_dict(Config, merged)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (for help output)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


# ----------------------------------------------------------------------------------------------------------
# presets: YAML configs that ship inside the package (pretrain/presets/NAME.yaml), named without a path

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> dict[str, Path]:
    """Every preset that ships with the package, by name (``gpt2-small``) → its YAML file, sorted by name."""
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"), key=lambda p: p.stem)}


def preset_description(path: str | Path) -> str:
    """A preset's one-line description: the first line of the comment opening its YAML file ('' if none)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        return line.strip().lstrip("#").strip().rstrip(":;,").strip() if line.lstrip().startswith("#") else ""
    return ""


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file for ``pretrain train NAME_OR_PATH``: an existing file, else the preset of that name
    (``gpt2-small``, or ``gpt2-small.yaml``). An unknown name is an error that suggests the closest preset."""
    text = str(name_or_path)
    p = Path(text)
    if p.is_file():
        return p
    known = presets()
    bare = not any(sep in text for sep in ("/", "\\"))
    stem = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    if bare and stem in known:
        return known[stem]
    if p.is_dir():
        run = (p / "config.yaml").is_file()
        raise ConfigError(f"{p} is a directory, not a YAML config or preset name"
                          + (f" (to continue the run in it: `pretrain train --resume {p}`)" if run else ""))
    if not bare or p.suffix in (".yaml", ".yml"):  # a path: the file is missing
        hint = (f" (a preset of that name ships with the package: `pretrain train {stem} ...`)"
                if stem in known else "")
        raise ConfigError(f"config file not found: {p}{hint}")
    close = difflib.get_close_matches(stem, list(known), n=1, cutoff=0.6)
    raise ConfigError(f"unknown preset {text!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + "; `pretrain presets` lists them, or give the path of a YAML file")
