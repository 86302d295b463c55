"""Time-to-quality on Tiny Shakespeare (character level): prepare → train with a time budget → report.

Prints the wall time at which the validation loss first reached ``--target`` (training time including
evaluations, from the first step; model build and data loading excluded), the best validation loss
within ``--budget-s`` seconds, and the full-validation-split loss of the final model. ``--compare CONFIG``
first trains another config on the same data in the same process and reports both.

    python bench/shakespeare_char.py                       # defaults: target 1.88, budget 300 s
    python bench/shakespeare_char.py --budget-s 60 --json  # {"time_to_target_s", "best_val_loss", ...}
    python bench/shakespeare_char.py --config configs/shakespeare-char.yaml --train.lr 2e-3
    python bench/shakespeare_char.py --compare configs/shakespeare-char.yaml --json
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


def main(argv: list[str] | None = None) -> dict:
    from pretrain.cli import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(DEFAULT_INPUT), help="Tiny Shakespeare input.txt")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--stop-at-target", action="store_true", help="stop as soon as the target is reached")
    ap.add_argument("--out", default=None, help="keep the run here (default: a temporary directory)")
    ap.add_argument("--compare", metavar="CONFIG", default=None,
                    help="also run this config (e.g. configs/shakespeare-char.yaml, nanoGPT's CPU recipe) on "
                         "the same data in the same process, first, and report both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(rest)
    args.out = args.out or tempfile.mkdtemp(prefix="shakespeare_char_")
    if args.compare:
        base = run_one(args.compare, [], args, quiet=args.json)
        ours = run_one(args.config, overrides, args, quiet=args.json)
        result = {"baseline": base, "ours": ours,
                  "wall_ratio": round(base["wall_s"] / ours["wall_s"], 3)}
        print(json.dumps(result) if args.json else
              f"baseline {args.compare}: {base['wall_s']:.1f}s → full val {base['final_full_val_loss']:.4f}\n"
              f"ours     {args.config}: {ours['wall_s']:.1f}s → full val {ours['final_full_val_loss']:.4f}\n"
              f"wall-time ratio {result['wall_ratio']:.2f}x")
        return result
    result = run_one(args.config, overrides, args, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    else:
        hit = result["time_to_target_s"]
        print(f"time to val loss <= {args.target}: {hit if hit is None else f'{hit:.1f}s'}")
        print(f"best val loss within {args.budget_s:.0f}s: {result['best_val_loss']:.4f} "
              f"(final model on the full val split: {result['final_full_val_loss']:.4f}); "
              f"{result['steps']} steps, wall {result['wall_s']:.1f}s")
    return result


def run_one(config: str, overrides: list[str], args: argparse.Namespace, quiet: bool) -> dict:
    from pretrain.config import load_config
    from pretrain.data.prepare import prepare
    from pretrain.inference import evaluate_run
    from pretrain.train import train

    work = Path(args.out)
    data = work / "data"
    if not (data / "meta.json").exists():
        prepare([args.input], data, tokenizer="char", val_fraction=0.1, log=lambda *a: None)
    # a config's own, shorter budget stands (5min: 280 s, leaving time for the final evaluation)
    own = load_config(config, overrides).train.max_time_s
    budget = min(args.budget_s, own) if own > 0 else args.budget_s
    extra = ["--data.path", str(data), "--train.max_time_s", str(budget)]
    if args.stop_at_target:
        extra += ["--train.target_val_loss", str(args.target)]
    cfg = load_config(config, [*overrides, *extra])  # the bench's own settings win
    run = work / f"run_{Path(config).stem}_{int(time.time())}"
    t0 = time.time()
    summary = train(cfg, run, quiet=quiet)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["elapsed_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    hit = next((t for t, v in evals if v <= args.target), None)
    full = evaluate_run(run)
    return {
        "time_to_target_s": hit, "best_val_loss": min(v for _, v in evals), "wall_s": round(wall, 2),
        "target": args.target, "budget_s": args.budget_s, "steps": summary["step"],
        "tokens_seen": summary["tokens_seen"], "final_full_val_loss": round(full["loss"], 4),
        "n_params": summary["n_params"], "config": str(config), "overrides": overrides,
    }


if __name__ == "__main__":
    main()
