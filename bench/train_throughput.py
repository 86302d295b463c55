"""CPU training throughput of our models against the same-size stock Hugging Face `transformers` models.

Two pairs, trained in this one process on the same random token batches (``torch.randint``, no data files):

* ``gpt``: ``pretrain.models.gpt.GPT`` vs ``transformers.LlamaForCausalLM``, next-token cross-entropy (ours:
  ``pretrain.objectives.clm.loss``, head and loss fused chunk by chunk; HF's: ``F.cross_entropy`` on the fp32
  logits of the whole batch);
* ``bert``: ``pretrain.models.bert.Encoder`` vs ``transformers.ModernBertForMaskedLM``, masked-LM loss on
  ``--mask-prob`` of the positions, the MLM head on those positions only on both sides (ModernBERT's
  ``sparse_prediction``; ``--hf-dense-head``: its library default, head and loss on every position).

The two models of a pair have the same sizes, vocabulary and tying (HF config from
``pretrain.export.hf_config_dict``, attention ``sdpa``; parameter counts printed and checked equal) and
train in a plain loop: forward, loss, backward, ``torch.optim.AdamW`` step (weight decay on matrices only;
ours ``fused=True`` as our trainer, HF's per ``--hf-optimizer``: fused on CUDA, foreach on the CPU),
zero_grad. ``--dtype`` is our side's (auto: what ``train.dtype auto`` picks, bf16 autocast on CUDA and on
CPUs with native bf16, else fp32), ``--hf-dtype`` HF's (``same``, or ``fp32``: what a plain ``transformers``
loop runs on a CPU); both are in the output (``config.dtype`` / ``config.hf_dtype``). On a CPU glibc's malloc
is first tuned as our trainer tunes it (``pretrain.hardware.tune_cpu_allocator``, ``config.malloc_tuned``),
process-wide.

Timing: ``--warmup`` untimed steps per model, then ``--rounds`` rounds of ``--steps`` timed steps per model
in ABBA order (ours, HF, HF, ours, ...), so noise hits both sides alike. A round's tokens/s is
batch_size x seq_len x steps / its wall time (every input position). ``ours_tok_s`` / ``hf_tok_s`` are each
side's best round, ``ratio`` = ours / HF (> 1: ours is faster); ``*_median`` / ``ratio_median`` are medians
over rounds. Rounds whose CPU seconds per wall second fall well below the best are counted as
``contended_rounds`` and warned about on stderr; when best and median disagree, rerun on an idle machine.

Roofline (CPU): ``matmul_peak_gflops`` is the best ``torch.mm`` in our dtype over the models' projection
shapes (output head included); ``*_gflops`` = tokens/s x ``flops_per_token`` (6N + attention; an over-count
for the encoder), ``ceiling_ratio`` = peak / HF's GFLOP/s (null across dtypes). On ``--device cuda`` each
pair reports ``*_mfu`` (against the device's dense bf16 peak, ``pretrain.hardware.peak_flops``) and peak GPU
memory instead. ``--compile`` / ``--hf-compile`` compile each side; ``--preset gpt2-small`` is the 124M size
(seq 1024); ``bash bench/gpu_check.sh`` runs that comparison on a GPU.

    python bench/train_throughput.py                 # a table
    python bench/train_throughput.py --json          # {"gpt": {"ours_tok_s", "hf_tok_s", "ratio", ...},
                                                     #  "bert": {...}, "config": {...}, "torch": ...,
                                                     #  "transformers": ...}
    python bench/train_throughput.py --threads 2 --d-model 512 --n-layer 8 --n-head 8 --rounds 6
    python bench/train_throughput.py --preset gpt2-small --device cuda --compile --hf-compile --only gpt

Needs ``transformers`` (``pip install -e '.[hf]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100
N_SPECIAL = 4  # random MLM batches draw content ids from [N_SPECIAL, vocab); MASK_ID stands in for [MASK]
MASK_ID = 3
CONTENDED = 0.8  # a round with CPU/wall below this fraction of the best round's counts as contended
PRESETS = {  # named sizes; each value becomes an argparse default
    "gpt2-small": {"_doc": "124M (GPT-2 small: 12 x 768, 12 heads, MLP 2048, vocab 50304, seq 1024, "
                           "batch 16), for a GPU", "d_model": 768, "n_layer": 12, "n_head": 12, "d_ff": 2048,
                   "vocab": 50304, "seq_len": 1024, "batch_size": 16, "steps": 10, "rounds": 4, "warmup": 3},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress: stderr)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named size whose values become the defaults (explicit flags still win): "
                        + "; ".join(f"{k}: {v['_doc']}" for k, v in sorted(PRESETS.items())))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both models train")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="our side: fp32, or bf16 autocast with fp32 weights and optimizer state; auto: what "
                        "our trainer's train.dtype auto picks here (bf16 on CUDA and on CPUs with native "
                        "bf16)")
    p.add_argument("--hf-dtype", choices=("same", "fp32", "bf16"), default="same",
                   help="Hugging Face's side: the same as ours, or fp32 (what a plain training loop of "
                        "transformers runs on a CPU, without autocast) / bf16")
    p.add_argument("--d-model", type=int, default=256, help="hidden size")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--d-ff", type=int, default=0, help="MLP width (0: ~8/3 d_model, to 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per model (alternating, ABBA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of positions the MLM loss is on")
    p.add_argument("--untied", action="store_true", help="untie input embedding and output projection (both)")
    p.add_argument("--hf-dense-head", action="store_true",
                   help="Hugging Face ModernBERT runs its MLM head on every position (its default, "
                        "sparse_prediction=False) instead of on the masked ones only like ours")
    p.add_argument("--compile", action="store_true",
                   help="ours runs under torch.compile (train.compile: true); compile time, spent in the "
                        "untimed warmup, is reported as ours_warmup_s")
    p.add_argument("--hf-compile", action="store_true",
                   help="Hugging Face's model and loss run under torch.compile too (its best settings on a "
                        "GPU)")
    p.add_argument("--hf-optimizer", choices=("auto", "foreach", "fused"), default="auto",
                   help="Hugging Face's AdamW implementation; auto: fused on CUDA (the default of its "
                        "Trainer, adamw_torch_fused), foreach on the CPU (torch's plain default)")
    p.add_argument("--only", choices=("gpt", "bert"), default=None, help="measure one pair only")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for weights and batches")
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**{k: v for k, v in PRESETS[known.preset].items() if not k.startswith("_")})
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.hf_optimizer == "auto":
        args.hf_optimizer = "fused" if args.device == "cuda" else "foreach"
    for name in ("d_model", "n_layer", "n_head", "seq_len", "batch_size", "vocab", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vocab <= N_SPECIAL:
        p.error(f"--vocab must be > {N_SPECIAL}")
    if not 0.0 < args.mask_prob < 1.0:
        p.error("--mask-prob must be in (0, 1)")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_dtypes(args: argparse.Namespace) -> None:
    """--dtype auto → the trainer's choice on this device (pretrain.hardware.autocast_dtype); --hf-dtype
    same."""
    from pretrain.hardware import autocast_dtype

    bf16 = autocast_dtype(torch.device(args.device), args.dtype) == torch.bfloat16
    args.ours_dtype = "bf16" if bf16 else "fp32"
    args.hf_dtype_resolved = args.ours_dtype if args.hf_dtype == "same" else args.hf_dtype


def autocast(args: argparse.Namespace, side: str):
    """bf16 autocast (fp32 weights, bf16 matmuls) for a side whose dtype is bf16, as the trainer runs it."""
    if (args.ours_dtype if side == "ours" else args.hf_dtype_resolved) == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def adamw(model: nn.Module, args: argparse.Namespace, fused: bool = False) -> torch.optim.AdamW:
    """The same optimizer for every model: weight decay on matrices (dim >= 2), none on gains and biases.
    ``fused``: the single-kernel implementation our trainer uses (pretrain.optim); the same update."""
    params = list(model.parameters())  # shared (tied) parameters appear once
    groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             **impl)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # counts a tied weight once


def model_config(args: argparse.Namespace, arch: str):
    from pretrain.config import ModelConfig

    return ModelConfig(arch=arch, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                       d_ff=args.d_ff, vocab_size=args.vocab, max_seq_len=args.seq_len,
                       tie_embeddings=not args.untied)


def hf_config(cls: type, cfg, **extra):
    from pretrain.export import hf_config_dict

    d = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    return cls(**{**d, **extra}, attn_implementation="sdpa")


def check_pair(name: str, ours: nn.Module, hf, tied: bool) -> None:
    """Same parameter count, same tying, sdpa attention, both in training mode."""
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    hf_tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert hf_tied == tied, f"{name}: Hugging Face embeddings tied={hf_tied}, ours tied={tied}"
    # Both layouts have exactly the same tensors (ours fuses q/k/v and gate/up, which changes no count;
    # no biases except the encoder's decoder bias, which ModernBERT has too (decoder_bias=True); a tied
    # output matrix counted once on both sides), so the counts must be equal, not merely close.
    a, b = n_params(ours), n_params(hf)
    assert a == b, f"{name}: ours has {a:,} parameters, Hugging Face {b:,}"
    assert ours.training and hf.training


def build_gpt(args: argparse.Namespace):
    import transformers

    from pretrain.models.gpt import GPT

    cfg = model_config(args, "gpt")
    torch.manual_seed(args.seed)
    ours = GPT(cfg).train()
    torch.manual_seed(args.seed)
    hf = transformers.LlamaForCausalLM(hf_config(transformers.LlamaConfig, cfg)).train()
    check_pair("gpt", ours, hf, cfg.tie_embeddings)
    ours.to(args.device)
    hf.to(args.device)

    from pretrain.objectives import clm

    fwd = ours
    if args.compile:  # the model, as the trainer compiles it (pretrain.distributed.apply_compile)
        from pretrain.distributed import apply_compile

        fwd = apply_compile(ours)

    def ours_loss(seq):  # the trainer's loss: head and cross-entropy fused, chunk by chunk
        with autocast(args, "ours"):
            return clm.loss(fwd, seq)

    def hf_loss(seq):  # what Hugging Face's own causal-LM loss computes: cross-entropy on fp32 logits
        with autocast(args, "hf"):
            logits = hf(input_ids=seq[:, :-1]).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), seq[:, 1:].reshape(-1))

    if args.hf_compile:  # model and loss in one graph (the cross-entropy fuses with the head)
        hf_loss = torch.compile(hf_loss)

    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=g).to(args.device)
               for _ in range(4)]
    return cfg, ours, hf, ours_loss, hf_loss, batches


def build_bert(args: argparse.Namespace):
    import transformers

    from pretrain.models.bert import Encoder
    from pretrain.objectives.mlm import loss_and_accuracy

    cfg = model_config(args, "bert")
    torch.manual_seed(args.seed)
    ours = Encoder(cfg).train()
    torch.manual_seed(args.seed)
    # bos/eos: ModernBertConfig's defaults (50281/50282) lie outside small vocabularies (a warning)
    conf = hf_config(transformers.ModernBertConfig, cfg, sparse_prediction=not args.hf_dense_head,
                     bos_token_id=None, eos_token_id=None)
    hf = transformers.ModernBertForMaskedLM(conf).train()
    check_pair("bert", ours, hf, cfg.tie_embeddings)
    ours.to(args.device)
    hf.to(args.device)

    fwd = ours
    if args.compile:
        from pretrain.distributed import apply_compile

        fwd = apply_compile(ours)

    def ours_loss(batch):
        inputs, labels = batch
        with autocast(args, "ours"):
            return loss_and_accuracy(fwd, inputs, labels)[0]

    def hf_loss(batch):
        inputs, labels = batch
        with autocast(args, "hf"):
            return hf(input_ids=inputs, labels=labels).loss

    if args.hf_compile:
        hf_loss = torch.compile(hf_loss)

    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(4):
        ids = torch.randint(N_SPECIAL, args.vocab, (args.batch_size, args.seq_len), generator=g)
        selected = torch.rand(ids.shape, generator=g) < args.mask_prob
        selected[:, 0] = True  # never an empty selection
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
        inputs = torch.where(selected, torch.full_like(ids, MASK_ID), ids)  # 100% [MASK]: the corruption mix
        batches.append((inputs.to(args.device), labels.to(args.device)))     # does not change the compute
    return cfg, ours, hf, ours_loss, hf_loss, batches


def matmul_peak_gflops(args: argparse.Namespace, cfg, repeats: int = 5) -> dict:
    """Best GFLOP/s of torch.mm, in our side's dtype, over the models' own shapes: (tokens, d) @ (d, out) for
    the fused qkv, attention output, gate/up and down projections and the output head (forward shapes)."""
    dt = torch.bfloat16 if args.ours_dtype == "bf16" else torch.float32
    m = args.batch_size * args.seq_len
    d, f, v = cfg.d_model, cfg.ff_dim, cfg.vocab_size
    shapes = {"qkv": (m, d, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim), "o_proj": (m, d, d),
              "gate_up": (m, d, 2 * f), "down": (m, f, d), "head": (m, d, v)}
    out = {}
    for name, (a, b, c) in shapes.items():
        x, w = torch.randn(a, b, dtype=dt), torch.randn(b, c, dtype=dt)
        torch.mm(x, w)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, w)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(2.0 * a * b * c / best / 1e9, 1)
    return {"matmul_peak_gflops": max(out.values()), "matmul_gflops_by_shape": out}


def train_steps(loss_fn: Callable, opt: torch.optim.Optimizer, batches: list, n: int,
                start: int, device: str = "cpu") -> tuple[float, float, float]:
    """n plain training steps; returns (wall seconds, CPU seconds of this process, last loss). On CUDA the
    clock stops after the device has finished (synchronize), and the loss is read after that."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = torch.zeros(())
    for i in range(n):
        loss = loss_fn(batches[(start + i) % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())


def bench_pair(name: str, build: Callable, args: argparse.Namespace) -> dict:
    cfg, ours, hf, ours_loss, hf_loss, batches = build(args)
    sides = {"ours": (ours_loss, adamw(ours, args, fused=True)),
             "hf": (hf_loss, adamw(hf, args, fused=args.hf_optimizer == "fused"))}
    log(f"[{name}] parameters: ours {n_params(ours):,}, Hugging Face {n_params(hf):,} "
        f"({type(hf).__name__}, attn {hf.config._attn_implementation})")
    tokens = args.batch_size * args.seq_len * args.steps
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    util: dict[str, list[float]] = {"ours": [], "hf": []}  # CPU seconds per wall second (~threads if alone)
    losses: dict[str, float] = {}
    warmup_s, peak_mem = {}, {}
    for side, (fn, opt) in sides.items():
        compiled = args.compile if side == "ours" else args.hf_compile
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warmup_s[side] = train_steps(fn, opt, batches, max(args.warmup, 1 if compiled else 0), 0,
                                     args.device)[0]
        if args.device == "cuda":
            peak_mem[side] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    step = {"ours": args.warmup, "hf": args.warmup}
    for r in range(args.rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")  # ABBA: cancels linear drift too
        for side in order:
            fn, opt = sides[side]
            wall, cpu, losses[side] = train_steps(fn, opt, batches, args.steps, step[side], args.device)
            step[side] += args.steps
            rates[side].append(tokens / wall)
            util[side].append(cpu / wall)
        log(f"[{name}] round {r + 1}/{args.rounds}: ours {rates['ours'][-1]:,.0f} tok/s "
            f"(cpu {util['ours'][-1]:.2f}), HF {rates['hf'][-1]:,.0f} tok/s (cpu {util['hf'][-1]:.2f})")
    # A round whose process got much less CPU per wall second than the best round was sharing the cores.
    top = max(util["ours"] + util["hf"])
    contended = 0 if args.device == "cuda" else sum(u < CONTENDED * top for side in util for u in util[side])
    if contended:
        log(f"[{name}] warning: {contended} of {2 * args.rounds} rounds got < {CONTENDED:.0%} of the best "
            f"CPU/wall ({top:.2f}): other processes were using the cores; the best rounds are reported")
    best = {side: max(r) for side, r in rates.items()}
    median = {side: statistics.median(r) for side, r in rates.items()}
    from pretrain.models import spec_of

    fpt = spec_of(ours).flops_per_token(ours, args.seq_len)
    roofline: dict = {"flops_per_token": fpt, "ours_gflops": round(best["ours"] * fpt / 1e9, 1),
                      "hf_gflops": round(best["hf"] * fpt / 1e9, 1)}
    if args.device == "cpu":
        peak = matmul_peak_gflops(args, cfg)
        same = args.ours_dtype == args.hf_dtype_resolved  # a ceiling over HF only means something then
        roofline.update(peak, ceiling_ratio=round(peak["matmul_peak_gflops"] * 1e9 / (best["hf"] * fpt), 3)
                        if same else None)
        log(f"[{name}] roofline: ours {roofline['ours_gflops']} GFLOP/s, HF {roofline['hf_gflops']} GFLOP/s, "
            f"best {args.ours_dtype} matmul of the model's shapes {peak['matmul_peak_gflops']} GFLOP/s"
            + (f" -> at most {roofline['ceiling_ratio']:.2f}x over HF without less arithmetic"
               if same else ""))
    else:  # MFU the standard way: model FLOPs per token x tokens/s against the device's dense bf16 peak
        from pretrain.hardware import peak_flops

        dev_peak = peak_flops(torch.device(args.device)) if args.ours_dtype == "bf16" else None
        roofline["device_name"] = torch.cuda.get_device_name()
        roofline["peak_tflops"] = dev_peak / 1e12 if dev_peak else None
        roofline["ours_mfu"] = round(best["ours"] * fpt / dev_peak, 4) if dev_peak else None
        roofline["hf_mfu"] = round(best["hf"] * fpt / dev_peak, 4) if dev_peak else None
        roofline["ours_peak_mem_gib"], roofline["hf_peak_mem_gib"] = peak_mem["ours"], peak_mem["hf"]
        log(f"[{name}] {roofline['device_name']}: MFU ours {roofline['ours_mfu']}, HF {roofline['hf_mfu']} "
            f"(peak {roofline['peak_tflops']} TFLOP/s bf16); peak memory ours {peak_mem['ours']} GiB, "
            f"HF {peak_mem['hf']} GiB")
    return {"ours_tok_s": round(best["ours"], 1), "hf_tok_s": round(best["hf"], 1),
            "ratio": round(best["ours"] / best["hf"], 4),
            "ours_tok_s_median": round(median["ours"], 1), "hf_tok_s_median": round(median["hf"], 1),
            "ratio_median": round(median["ours"] / median["hf"], 4),
            "ours_tok_s_per_round": [round(x, 1) for x in rates["ours"]],
            "hf_tok_s_per_round": [round(x, 1) for x in rates["hf"]],
            "ours_cpu_per_wall_per_round": [round(x, 2) for x in util["ours"]],
            "hf_cpu_per_wall_per_round": [round(x, 2) for x in util["hf"]],
            "contended_rounds": contended, "ours_warmup_s": round(warmup_s["ours"], 1),
            "hf_warmup_s": round(warmup_s["hf"], 1),
            "ours_params": n_params(ours), "hf_params": n_params(hf), "hf_class": type(hf).__name__,
            "d_ff": cfg.ff_dim, "ours_last_loss": round(losses["ours"], 4),
            "hf_last_loss": round(losses["hf"], 4), **roofline}


def print_table(result: dict) -> None:
    c = result["config"]
    where = f"{c['threads']} CPU threads" if c["device"] == "cpu" else c["device"]
    dtypes = c["dtype"] if c["dtype"] == c["hf_dtype"] else f"ours {c['dtype']}, HF {c['hf_dtype']}"
    print(f"training throughput, {dtypes}, {where}, torch {result['torch']}, "
          f"transformers {result['transformers']}; compiled: ours {c['ours_compile']}, HF {c['hf_compile']}")
    print(f"d_model {c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads, d_ff {c['d_ff']}, "
          f"vocab {c['vocab']}, seq {c['seq_len']}, batch {c['batch_size']}, "
          f"{'tied' if c['tie_embeddings'] else 'untied'} embeddings, HF MLM head {c['hf_mlm_head']}; "
          f"{c['rounds']} rounds x {c['steps']} steps (ABBA), {c['warmup']} warmup steps")
    print()
    print(f"{'pair':<5} {'HF model':<22} {'params ours / HF':<22} {'ours tok/s':>11} {'HF tok/s':>10} "
          f"{'ours/HF':>8}   {'median: ours':>12} {'HF':>7} {'ours/HF':>8}   contended rounds")
    for name in ("gpt", "bert"):
        if name not in result:
            continue
        r = result[name]
        params = f"{r['ours_params']:,} / {r['hf_params']:,}"
        print(f"{name:<5} {r['hf_class']:<22} {params:<22} {r['ours_tok_s']:>11,.0f} {r['hf_tok_s']:>10,.0f} "
              f"{r['ratio']:>8.3f}   {r['ours_tok_s_median']:>12,.0f} {r['hf_tok_s_median']:>7,.0f} "
              f"{r['ratio_median']:>8.3f}   {r['contended_rounds']} of {2 * c['rounds']}")
    print()
    for name in ("gpt", "bert"):
        if name in result:
            r = result[name]
            if "matmul_peak_gflops" in r:
                ceiling = f": ceiling {r['ceiling_ratio']:.2f}x over HF" if r["ceiling_ratio"] else ""
                print(f"{name}: model GFLOP/s ours {r['ours_gflops']}, HF {r['hf_gflops']}; "
                      f"best {c['dtype']} matmul of its shapes {r['matmul_peak_gflops']} GFLOP/s{ceiling}")
            else:
                print(f"{name}: model TFLOP/s ours {r['ours_gflops'] / 1e3:.1f}, "
                      f"HF {r['hf_gflops'] / 1e3:.1f} on {r['device_name']}; "
                      f"MFU ours {r['ours_mfu']}, HF {r['hf_mfu']}; peak memory ours "
                      f"{r['ours_peak_mem_gib']} GiB, HF {r['hf_peak_mem_gib']} GiB")
    print()
    print("tok/s: batch*seq*steps / round time (forward, loss, backward, AdamW step), best round and median")
    print("round; ours/HF > 1 means ours is faster. Contended: the process got < 80% of its best CPU/wall.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resolve_dtypes(args)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.compile or args.hf_compile:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        # a graph that fails to compile runs eagerly (with a warning), as in the trainer (apply_compile)
        dynamo.config.suppress_errors = True
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = False
    if args.device == "cpu":  # as our trainer does on a CPU; process-wide, so both sides run with it
        from pretrain.hardware import tune_cpu_allocator

        allocator = tune_cpu_allocator()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result: dict = {}
    pairs = {"gpt": build_gpt, "bert": build_bert}
    for name, build in pairs.items():
        if args.only in (None, name):
            result[name] = bench_pair(name, build, args)
    d_ff = model_config(args, "gpt").ff_dim
    result["config"] = {"d_model": args.d_model, "n_layer": args.n_layer, "n_head": args.n_head, "d_ff": d_ff,
                        "vocab": args.vocab, "seq_len": args.seq_len, "batch_size": args.batch_size,
                        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                        "threads": torch.get_num_threads(), "tie_embeddings": not args.untied,
                        "mask_prob": args.mask_prob,
                        "hf_mlm_head": "dense" if args.hf_dense_head else "sparse",
                        "ours_compile": args.compile, "hf_compile": args.hf_compile, "preset": args.preset,
                        "optimizer": {"name": "AdamW", "ours": "fused", "hf": args.hf_optimizer,
                                      "lr": args.lr, "betas": [0.9, 0.95],
                                      "eps": 1e-8, "weight_decay": args.weight_decay},
                        "dtype": args.ours_dtype, "hf_dtype": args.hf_dtype_resolved,
                        "dtype_flag": args.dtype,
                        "device": args.device, "seed": args.seed, "malloc_tuned": allocator,
                        "wall_s": round(time.perf_counter() - t0, 1)}
    result["torch"] = torch.__version__
    result["transformers"] = transformers.__version__
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
