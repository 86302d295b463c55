"""Forgetting: how much of its pre-training a bench backbone loses when fine-tuned on SST-2, with and without
replay of pre-training batches.

For each replay fraction (0 = none) and seed: ``pretrain finetune RUN`` on ``--train-rows`` SST-2 training
sentences (a seeded sample of ../shared/data/sst2/train.tsv), selected on the dev set (872 sentences),
``--replay RUN's data --replay-frac F``. Each fine-tune measures the backbone's pre-training validation loss
(its own objective, fixed masks, ``--forgetting-batches`` batches of 8 x seq_len tokens) before fine-tuning
and on the model kept (finetune.json's ``forgetting``). Printed: SST-2 dev accuracy, the loss before /
after / change, per fraction mean ± std over seeds.

    OMP_NUM_THREADS=1 python bench/forgetting.py --run /work/qa/mlm --work /work/forget --seeds 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def _ms(xs: list[float], fmt: str = ".4f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True,
                    help="a pre-trained causal or masked LM run (its data still there)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--fracs", default="0,0.1,0.3", help="replay fractions (0: no replay)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--forgetting-batches", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    rng = random.Random(0)
    body = lines[1:]
    rng.shuffle(body)
    train = args.work / f"sst2_train_{args.train_rows}.tsv"
    train.write_text("\n".join([lines[0], *body[:args.train_rows]]) + "\n", encoding="utf-8")
    from pretrain.checkpoint import read_meta, resolve_checkpoint

    data = read_meta(resolve_checkpoint(args.run))["config"]["data"]["path"]
    results: dict[str, list[dict]] = {}
    for frac in [float(f) for f in args.fracs.split(",")]:
        for seed in range(args.seeds):
            out = args.work / f"ft_r{frac:g}_s{seed}"
            cmd = [sys.executable, "-m", "pretrain", "finetune", args.run, "--train", str(train), "--valid",
                   str(SST2 / "dev.tsv"), "--out", str(out), "--text-column", "sentence", "--epochs",
                   str(args.epochs), "--lr", str(args.lr), "--max-length", str(args.max_length), "--seed",
                   str(seed), "--forgetting-batches", str(args.forgetting_batches), "--overwrite", "--quiet",
                   "--json"]
            if frac:
                cmd += ["--replay", data, "--replay-frac", str(frac)]
            t0 = time.time()
            res = json.loads(subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout)
            f = res["forgetting"]
            row = {"frac": frac, "seed": seed, "accuracy": res["best"]["val_accuracy"], "before": f["before"],
                   "after": f["after"], "change": f["change"], "relative": f["relative"],
                   "replay_steps": (f["replay"] or {}).get("steps", 0), "steps": res["steps"],
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            results.setdefault(f"{frac:g}", []).append(row)
    print(f"\nSST-2 fine-tune of {args.run} on {args.train_rows:,} sentences, {args.epochs} epochs, "
          f"lr {args.lr:g}; "
          f"pre-training val loss on {data} ({args.forgetting_batches} batches of 8 sequences); "
          f"mean ± std over {args.seeds} seeds")
    print(f"{'replay':>8} {'SST-2 dev acc':>16} {'loss before':>12} {'loss after':>18} {'change':>18} "
          f"{'relative':>16} {'s/run':>6}")
    for frac, rows in results.items():
        print(f"{frac:>8} {_ms([r['accuracy'] for r in rows]):>16} {rows[0]['before']:>12.4f} "
              f"{_ms([r['after'] for r in rows]):>18} {_ms([r['change'] for r in rows]):>18} "
              f"{_ms([100 * r['relative'] for r in rows], '.1f') + '%':>16} "
              f"{statistics.mean(r['seconds'] for r in rows):>6.0f}")
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
