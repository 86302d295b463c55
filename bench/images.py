"""Vision pre-training that pays off: Fashion-MNIST and medical transfer (PneumoniaMNIST), on a CPU.

Stage ``data``: ``pretrain prepare`` of Fashion-MNIST (../shared/data/fashion-mnist: the 60k training images
with a seeded 10% validation split carved out, the 10k test images as the test split) and of PneumoniaMNIST
(../shared/data/pneumoniamnist/pneumoniamnist.npz: its own train / val / test splits, 28-pixel chest X-rays,
pneumonia : normal about 3 : 1 in train).

Stage ``pretrain``: ``pretrain train CONFIG`` on one prepared set for ``--budget-s`` seconds (the LR decays
over the time budget), into WORK/runs/NAME — e.g. masked autoencoding of a small ViT
(configs/vit-mae-cpu.yaml) on Fashion-MNIST's training images (labels unused), or on PneumoniaMNIST's.

Stage ``transfer``: ``pretrain transfer`` of one or more runs on a task (fmnist: train → test; pneumonia:
train → test, ROC-AUC selects, class weights auto) at label budgets with seeds; the automatic recipe (lr,
pooling, epochs chosen per arm and budget on a split carved from the budget's labels), a from-scratch arm of
the same architecture and a logistic regression on raw pixels. Every arm is scored on the test split, which
chooses nothing. Stage ``report``: one table of every transfer in WORK (mean ± std over seeds).

    python bench/images.py --work /tmp/img --stage data
    python bench/images.py --work /tmp/img --stage pretrain --name fmnist-mae --data fmnist \\
        --config configs/vit-mae-cpu.yaml --budget-s 1200
    python bench/images.py --work /tmp/img --stage transfer --runs fmnist-mae --task fmnist --budgets 1000 \\
        --seeds 5
    python bench/images.py --work /tmp/img --stage report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FMNIST = SHARED / "fashion-mnist"
INPUTS = {
    "fmnist": [str(FMNIST / f"{s}-{k}-idx{d}-ubyte.gz") for s in ("train", "t10k")
               for k, d in (("images", 3), ("labels", 1))],
    "pneumonia": [str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz")],
}
TASK_ARGS = {"fmnist": [], "pneumonia": ["--metric", "roc_auc", "--class-weights", "auto"]}


def _cli(args: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from pretrain.cli import main

    rc = main(args)
    if rc != 0:
        raise SystemExit(f"pretrain {' '.join(args[:2])} failed ({rc})")


def stage_data(work: Path) -> dict:
    out = {}
    for name, inputs in INPUTS.items():
        t = time.time()
        _cli(["prepare", *inputs, "--out", str(work / name), "--overwrite", "--licence",
              "MIT" if name == "fmnist" else "CC BY 4.0"])
        out[name] = round(time.time() - t, 1)
    return out


def stage_pretrain(work: Path, name: str, data: str, config: str, budget_s: float, extra: list[str]) -> dict:
    run = work / "runs" / name
    _cli(["train", config, "--out", str(run), "--data.path", str(work / data),
          "--train.max_time_s", str(budget_s), "--train.time_schedule", "true",
          "--train.max_steps", "1000000", "--train.plot", "false", *extra])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_loss" in r][-1]
    return {"run": str(run), **{k: last[k] for k in last if k.startswith("val_") or k in ("step", "images")}}


def stage_transfer(work: Path, runs: list[str], task: str, budgets: str, seeds: int,
                   extra: list[str]) -> Path:
    out = work / "transfer" / f"{task}-{'+'.join(runs)}"
    _cli(["transfer", *[str(work / "runs" / r) for r in runs], "--train", str(work / task),
          "--valid", f"{work / task}@test", "--out", str(out), "--budgets", budgets, "--seeds", str(seeds),
          *TASK_ARGS[task], *extra])
    return out


def stage_report(work: Path) -> str:
    lines = ["| task | labels | arm | metric (test) | mean ± std | gain vs scratch [95% CI] | seeds |",
             "|---|---|---|---|---|---|---|"]
    for rep in sorted((work / "transfer").glob("*/report.json")):
        data = json.loads(rep.read_text())
        for row in data["summary"]:
            for arm, res in row["arms"].items():
                gain = row.get("gain", {}).get(arm)
                g = (f"{100 * gain['mean']:+.1f} [{100 * gain['ci95'][0]:+.1f}, {100 * gain['ci95'][1]:+.1f}]"
                     if gain else "")
                lines.append(f"| {rep.parent.name} | {row['n']:,} | {arm} | {data['metric']} | "
                             f"{100 * res['mean']:.1f} ± {100 * res['std']:.1f} | {g} | {res['seeds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--stage", required=True, choices=["data", "pretrain", "transfer", "report"])
    p.add_argument("--name", help="pretrain: the run's name (WORK/runs/NAME)")
    p.add_argument("--data", choices=sorted(INPUTS), help="pretrain: which prepared set")
    p.add_argument("--config", default=str(ROOT / "configs" / "vit-mae-cpu.yaml"))
    p.add_argument("--budget-s", type=float, default=1200.0)
    p.add_argument("--runs", help="transfer: comma-separated run names")
    p.add_argument("--task", choices=sorted(INPUTS))
    p.add_argument("--budgets", default="1000")
    p.add_argument("--seeds", type=int, default=5)
    args, extra = p.parse_known_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if args.stage == "data":
        res: dict = {"seconds": stage_data(work)}
    elif args.stage == "pretrain":
        res = stage_pretrain(work, args.name, args.data, args.config, args.budget_s, extra)
    elif args.stage == "transfer":
        res = {"report": str(stage_transfer(work, args.runs.split(","), args.task, args.budgets, args.seeds,
                                            extra))}
    else:
        table = stage_report(work)
        print(table)
        res = {"table": table}
    res["wall_s"] = round(time.time() - t, 1)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
