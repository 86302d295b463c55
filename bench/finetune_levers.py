"""Fine-tuning levers for a general-text backbone at 1k labels, judged on held-out *training* rows.

Issue 30 asks a backbone pre-trained on general text to beat the same architecture from scratch by 3 points at
1k labels on SST-2 and BANKING77. This script asks whether the fine-tuning side holds that gain back: each
variant fine-tunes the backbone on ``--n`` labels (the same subset per seed for every variant, drawn as
``pretrain transfer`` draws it) with one fixed recipe, and is scored after every epoch on 2,000 rows held out
of the task's *training* file (SST-2: rows of at least 8 words, nearer the dev sentences). The dev / test sets
are never read, so the variants chosen here do not tune on them.

Variants (``--variants``, comma-separated; each one fine-tune per seed):

    base        lr 1e-3, the given pooling, 10 epochs, dropout 0.1 (the recipe `transfer` chose before)
    scratch     the same from a random init
    ld07        layer-wise LR decay 0.7 (``--layer-decay``)
    freeze_emb  token embeddings frozen (generalises to words the labels never show?)
    dropout0    no dropout while fine-tuning (the backbone was pre-trained without)
    head_lr     the head at 1e-2, the backbone at 1e-3
    lpft        LP-FT (Kumar et al. 2022): 10 epochs of the head alone at 1e-2, then all weights from there
    lr3e-4      a smaller step
    e20 / e20_scratch   20 epochs instead of 10
    reinit_top  the top block re-initialised before fine-tuning (Zhang et al. 2021: the layers nearest the
                pre-training head are the least general)

freeze_emb, lpft and reinit_top reach into the fine-tuning loop (``adapt``) from here: they are experiments,
not options.

    python bench/finetune_levers.py --run /work/tt3/mlm --task sst2 --pooling cls --work /work/levers
    python bench/finetune_levers.py --run /work/tt3/mlm --task banking77 --pooling mean --work /work/levers
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transfer_tasks import TASKS  # noqa: E402  (the tasks' files and columns)

from pretrain.config import FinetuneConfig  # noqa: E402
from pretrain.finetune import loop as L  # noqa: E402
from pretrain.finetune.model import carry_head  # noqa: E402
from pretrain.finetune.recipe import read_labelled  # noqa: E402
from pretrain.finetune.transfer import sample_budget  # noqa: E402

MIN_WORDS = {"sst2": 8, "banking77": 1}  # held-out rows at least this long (SST-2: not its phrase fragments)
VARIANTS = {"base": {}, "scratch": {"from_scratch": True}, "ld07": {"layer_decay": 0.7},
            "freeze_emb": {}, "dropout0": {"dropout": 0.0}, "head_lr": {"head_lr": 1e-2}, "lpft": {},
            "lr3e-4": {"lr": 3e-4}, "e20": {"epochs": 20},
            "e20_scratch": {"epochs": 20, "from_scratch": True}, "reinit_top": {}}
HELD = 2000


def split(task: str, work: Path) -> tuple[Path, Path]:
    """The task's training file → (pool, held): HELD rows (seeded, long enough) held out, the rest to sample
    label budgets from."""
    src, text, min_words = TASKS[task]["train"], TASKS[task]["text"], MIN_WORDS[task]
    pool, held = work / f"{task}_pool.csv", work / f"{task}_held.csv"
    if pool.exists() and held.exists():
        return pool, held
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if src.suffix == ".tsv" else ","))
    order = list(range(len(rows)))
    random.Random(123).shuffle(order)
    keep = set([i for i in order if len(rows[i][text].split()) >= min_words][:HELD])
    for path, part in ((pool, [r for i, r in enumerate(rows) if i not in keep]),
                       (held, [rows[i] for i in sorted(keep)])):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    return pool, held


def run_variant(run: str, task: str, name: str, pooling: str, seeds: int, n: int, work: Path) -> dict:
    pool, held = split(task, work)
    cfg0 = FinetuneConfig(text_column=TASKS[task]["text"], label_column=TASKS[task]["label"], epochs=10,
                          lr=1e-3, pooling=pooling, patience=0, evals_per_epoch=1, **VARIANTS[name])
    full = read_labelled(cfg0, run, pool)
    orig_adapt, start_head = L.adapt, [None]

    def adapt(model, cfg, device):  # freeze_emb / lpft's second phase / reinit_top
        if start_head[0] is not None and not carry_head(model, start_head[0], "classification"):
            raise RuntimeError("LP-FT: the head did not carry over")
        if name == "reinit_top":
            backbone = L.model_of(model).backbone
            fresh = type(backbone)(backbone.cfg).layers[-1]  # the architecture's own init
            backbone.layers[-1].load_state_dict(fresh.state_dict())
        if name == "freeze_emb":
            inner = L.model_of(model)
            for pname, p in model.named_parameters():
                if inner.is_embedding(pname):
                    p.requires_grad_(False)
        return orig_adapt(model, cfg, device)

    L.adapt = adapt
    curves, t0 = [], time.time()
    try:
        for seed in range(seeds):
            rows = sample_budget(full.labels, n, seed, len(full))
            cfg, src = dataclasses.replace(cfg0, seed=seed), run
            start_head[0] = None
            if name == "lpft":
                src = work / "runs" / task / f"{name}_probe_s{seed}"
                L.finetune(run, pool, held, src, dataclasses.replace(cfg, head_only=True, lr=1e-2,
                                                                      evals_per_epoch=0),
                           train_subset=rows, quiet=True, overwrite=True)
                start_head[0] = src
            r = L.finetune(src, pool, held, work / "runs" / task / f"{name}_s{seed}", cfg, train_subset=rows,
                           quiet=True, overwrite=True)
            curves.append([h["val_metric"] * 100 for h in r["history"]])
    finally:
        L.adapt = orig_adapt
    final = [c[-1] for c in curves]
    mean_curve = [round(statistics.mean(c[i] for c in curves), 1) for i in range(min(map(len, curves)))]
    return {"task": task, "variant": name, "final_mean": round(statistics.mean(final), 2),
            "final_std": round(statistics.stdev(final), 2) if len(final) > 1 else 0.0,
            "final": [round(v, 1) for v in final], "mean_curve": mean_curve,
            "seconds": round(time.time() - t0)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the pre-trained backbone (a run directory)")
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--pooling", default="cls", choices=["cls", "mean"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="labels per fine-tune (default 1000)")
    ap.add_argument("--work", required=True, help="scratch folder: the splits, runs and results.jsonl")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        res = run_variant(args.run, args.task, name, args.pooling, args.seeds, args.n, work)
        print(f"{res['task']} {name}: {res['final_mean']:.1f} ± {res['final_std']:.1f} after the last epoch "
              f"({' '.join(map(str, res['final']))}); mean curve {res['mean_curve']} ({res['seconds']} s)",
              flush=True)
        with open(work / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(res) + "\n")
        out.append(res)
    return out


if __name__ == "__main__":
    main()
