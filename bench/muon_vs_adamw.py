"""Muon vs AdamW: steps and wall time to a target validation loss, same data, same model, same schedule.

Tiny Shakespeare at the character level (prepared once), the model and recipe of
``configs/shakespeare-char-fast.yaml`` (2 x 128 Llama-style blocks, one head, context 64, batch 32,
cosine schedule), trained twice in this process, with only the optimizer changed:

* ``muon``: Muon on the hidden matrices at ``--muon-lr``, AdamW at ``--lr`` for embeddings and gains
  (the preset's own settings);
* ``adamw``: AdamW on everything at ``--adamw-lr``.

Both runs share ``--max-steps`` (the schedule's length), evaluate every ``--eval-interval`` steps on
``--eval-batches`` validation batches (the same ones each time) and stop at the first evaluation whose loss
is <= ``--target``. Reported per optimizer: ``steps_to_target``, ``time_to_target_s`` (training wall time at
that evaluation, evaluations included), ``best_val_loss`` and ``steps`` run; ``speedup_steps`` /
``speedup_time`` are AdamW's figure over Muon's (> 1: Muon gets there sooner).

    python bench/muon_vs_adamw.py                 # a table
    python bench/muon_vs_adamw.py --json          # {"muon": {...}, "adamw": {...}, "speedup_steps", ...}
    python bench/muon_vs_adamw.py --adamw-lr 3e-3 --target 1.9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_CONFIG = ROOT / "configs" / "shakespeare-char-fast.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", default=str(DEFAULT_INPUT), help="Tiny Shakespeare input.txt")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="model and recipe (the optimizer is overridden)")
    ap.add_argument("--target", type=float, default=1.88, help="validation loss to reach")
    ap.add_argument("--max-steps", type=int, default=600, help="schedule length, the same for both")
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation (0: all)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="Muon's lr (hidden matrices)")
    ap.add_argument("--lr", type=float, default=6e-3, help="AdamW lr of the muon run (embeddings, gains)")
    ap.add_argument("--adamw-lr", type=float, default=3e-3, help="the adamw run's lr (every parameter)")
    ap.add_argument("--only", choices=("muon", "adamw"), default=None)
    ap.add_argument("--out", default=None, help="keep data and runs here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (progress on stderr)")
    return ap.parse_args(argv)


def run_one(name: str, overrides: list[str], data: Path, args: argparse.Namespace) -> dict:
    from pretrain.config import load_config
    from pretrain.train import train

    cfg = load_config(args.config, [
        *overrides, "--data.path", str(data), "--train.max_steps", str(args.max_steps),
        "--train.eval_interval", str(args.eval_interval), "--train.eval_batches", str(args.eval_batches),
        "--train.target_val_loss", str(args.target), "--train.log_interval", str(args.eval_interval),
        "--train.ckpt_interval", "0", "--train.plot", "false"])
    run = Path(args.out) / f"run_{name}_{int(time.time())}"
    t0 = time.time()
    summary = train(cfg, run, quiet=True)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["elapsed_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    hit = next(((s, t) for s, t, v in evals if v <= args.target), None)
    out = {"steps_to_target": hit[0] if hit else None, "time_to_target_s": round(hit[1], 2) if hit else None,
           "best_val_loss": round(min(v for _, _, v in evals), 4), "steps": summary["step"],
           "wall_s": round(wall, 2), "stop_reason": summary["stop_reason"], "overrides": overrides}
    print(f"[{name}] {out}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from pretrain.data.prepare import prepare

    args.out = args.out or tempfile.mkdtemp(prefix="muon_vs_adamw_")
    data = Path(args.out) / "data"
    if not (data / "meta.json").exists():
        prepare([args.input], data, tokenizer="char", val_fraction=0.1, log=lambda *a: None)
    runs = {"muon": ["--train.optimizer", "muon", "--train.muon_lr", str(args.muon_lr),
                     "--train.lr", str(args.lr)],
            "adamw": ["--train.optimizer", "adamw", "--train.lr", str(args.adamw_lr)]}
    result: dict = {}
    for name, overrides in runs.items():
        if args.only in (None, name):
            result[name] = run_one(name, overrides, data, args)
    if len(result) == 2:
        for key, field in (("speedup_steps", "steps_to_target"), ("speedup_time", "time_to_target_s")):
            a, m = result["adamw"][field], result["muon"][field]
            result[key] = round(a / m, 3) if a and m else None
    result["config"] = {"config": str(args.config), "target": args.target, "max_steps": args.max_steps,
                        "eval_interval": args.eval_interval, "eval_batches": args.eval_batches}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"target val loss {args.target} ({args.eval_batches or 'all'} val batches every "
              f"{args.eval_interval} steps), schedule {args.max_steps} steps, {Path(args.config).name}")
        print(f"{'optimizer':<10} {'steps to target':>16} {'time to target (s)':>19} {'best val':>9}")
        for name in ("muon", "adamw"):
            if name in result:
                r = result[name]
                print(f"{name:<10} {str(r['steps_to_target']):>16} {str(r['time_to_target_s']):>19} "
                      f"{r['best_val_loss']:>9.4f}")
        if "speedup_steps" in result:
            print(f"Muon: {result['speedup_steps']}x fewer steps, {result['speedup_time']}x less time")
    return result


if __name__ == "__main__":
    main()
