"""Tokens/s and MFU of `pretrain train` itself — the whole trainer a user runs (prefetching loader, bf16
autocast and torch.compile by default on CUDA, gradient clipping, fused AdamW, metrics) — as it logs them.

The corpus is the demo's (the Python standard library's modules: on every machine, no download), prepared with
a byte-level BPE; the model is a YAML preset (default ``configs/gpt2-small.yaml``: 124M, seq 1024) whose
vocabulary is set to ``--vocab`` (default 50,304, GPT-2's padded to a multiple of 64) so that the output layer
costs what it costs with a GPT-2-size vocabulary; the tokenizer's ids are a subset. Evaluation and periodic
checkpoints are off; the run ends with one checkpoint, outside the timed steps. The first ``--skip`` log
intervals (compilation, warm-up) are left out; the figures are the median and best of the others:
``tok_s`` (the trainer's ``tokens_per_s``) and ``mfu`` (the trainer's own: 6N + attention FLOPs per token
against the device's dense bf16 peak; null on a CPU or an unknown device).

    python bench/trainer_mfu.py --json                               # on a GPU: GPT-2 small, batch 16 x 1024
    python bench/trainer_mfu.py --config configs/tiny.yaml --vocab 0 --steps 40 --device cpu   # anywhere
    python bench/trainer_mfu.py --set train.batch_size=32 --set train.activation_checkpointing=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "gpt2-small.yaml"),
                   help="model/train preset (YAML)")
    p.add_argument("--vocab", type=int, default=50304, help="model.vocab_size (0: the tokenizer's)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="train.batch_size (sequences per micro-batch)")
    p.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum")
    p.add_argument("--log-interval", type=int, default=10, help="steps per logged tokens/s figure")
    p.add_argument("--skip", type=int, default=2, help="first log intervals left out (compilation, warm-up)")
    p.add_argument("--device", default="auto", help="train.device")
    p.add_argument("--tokenizer-vocab", type=int, default=8192, help="BPE vocabulary trained on the corpus")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. train.compile=false (repeatable)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    if args.steps < (args.skip + 1) * args.log_interval:
        p.error("--steps must be at least (--skip + 1) x --log-interval = "
                f"{(args.skip + 1) * args.log_interval}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from pretrain.config import load_config
    from pretrain.data.prepare import prepare
    from pretrain.demo import demo_corpus
    from pretrain.train import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        t0 = time.perf_counter()
        files = demo_corpus()
        meta = prepare(files, work / "data", tokenizer="bpe", vocab_size=args.tokenizer_vocab,
                       val_fraction=0.01, overwrite=True, log=lambda m: print(m, file=sys.stderr, flush=True))
        prep_s = time.perf_counter() - t0
        overrides = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" if "=" in kv else kv for kv in args.set]
        base = [f"--data.path={work / 'data'}", f"--model.vocab_size={args.vocab}",
                f"--train.max_steps={args.steps}", f"--train.batch_size={args.batch_size}",
                f"--train.grad_accum={args.grad_accum}", f"--train.log_interval={args.log_interval}",
                "--train.eval_interval=0", "--train.ckpt_interval=0", "--train.max_time_s=0",
                "--train.global_batch_size=0", f"--train.device={args.device}", "--train.plot=false",
                f"--train.warmup_steps={min(10, args.steps // 4)}"]
        cfg = load_config(args.config, base + overrides)
        run = work / "run"
        t1 = time.perf_counter()
        summary = train(cfg, run, quiet=not sys.stderr.isatty())
        wall = time.perf_counter() - t1
        logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        logs = [r for r in logs if "tokens_per_s" in r][args.skip:]
        tok_s = [r["tokens_per_s"] for r in logs]
        mfu = [r["mfu"] for r in logs if "mfu" in r]
        from pretrain.hardware import resolve_device

        device = resolve_device(cfg.train.device)
        result = {
            "tok_s_median": round(statistics.median(tok_s), 1), "tok_s_best": round(max(tok_s), 1),
            "mfu_median": round(statistics.median(mfu), 4) if mfu else None,
            "mfu_best": round(max(mfu), 4) if mfu else None,
            "tok_s_per_log": tok_s, "intervals_used": len(tok_s), "n_params": summary["n_params"],
            "final_train_loss": logs[-1]["train_loss"], "steps": summary["step"],
            "tokens_per_step": cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len,
            "train_wall_s": round(wall, 1), "prepare_s": round(prep_s, 1),
            "tokenizer_vocab": meta["tokenizer"]["vocab_size"],
            "model_vocab": args.vocab or meta["tokenizer"]["vocab_size"],
            "config": args.config, "overrides": base + overrides,
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "compile": cfg.train.compile, "dtype": cfg.train.dtype, "torch": torch.__version__,
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pretrain train on {result['device_name']}: {result['n_params'] / 1e6:.1f}M parameters, "
              f"{result['tokens_per_step']:,} tokens/step, {result['intervals_used']} log intervals of "
              f"{args.log_interval} steps after {args.skip} skipped")
        print(f"tokens/s median {result['tok_s_median']:,.0f}, best {result['tok_s_best']:,.0f}; MFU median "
              f"{result['mfu_median']}, best {result['mfu_best']}")
    return result


if __name__ == "__main__":
    main()
