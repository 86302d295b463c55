"""Recommendations on MovieLens (ml-latest-small): next-item (SASRec-style, causal) and masked-item
(BERT4Rec-style) pre-training against popularity and item-kNN, full ranking.

Data: ../shared/data/movielens (ml-latest-small, October 2016: 100,004 ratings of 9,066 movies by 671
users, with titles and genres). GroupLens terms: research and non-commercial use only; cite Harper &
Konstan, The MovieLens Datasets, ACM TiiS 5(4) 2015. Every rating counts as an interaction (implicit
feedback, as SASRec and BERT4Rec treat MovieLens).

Stage ``data``: ``pretrain prepare ratings.csv --interactions --user-column userId --item-column movieId
--time-column timestamp --items movies.csv --out WORK/data`` (leave-one-out: each user's last item is the
test target, the one before the validation target); and the genre probe files WORK/genre_{train,val}.csv:
movies with at least 10 ratings that are Drama or Comedy but not both, label = which, split in half by a
seeded shuffle (``random.Random(0)``).

Stage ``train``: configs/sasrec-cpu.yaml (objective clm) and configs/bert4rec-cpu.yaml (objective mlm),
seeds 0..S-1 (``--train.seed``), one thread each, ``--jobs`` at a time, into WORK/runs/{clm,mlm}-sN.

Stage ``eval``: ``pretrain eval RUN --rec --json`` (test items, full ranking, the user's history excluded;
popularity and item-kNN on the same users, the kNN's recency decay tuned on the validation items) and the
same with ``--negatives 100`` (sampled metrics, as the papers report, for reference only), into
WORK/eval/.

Stage ``probe``: ``pretrain probe RUN --train WORK/genre_train.csv --valid WORK/genre_val.csv --text-column
movieId --label-column genre`` for every run, and with ``--random-init`` (the same architecture untrained).

Stage ``report``: per objective NDCG@10 / HR@10 / MRR mean ± std over seeds, the ratios to popularity and
to item-kNN, the sampled figures, the probe, the training time: WORK/report.md (printed).

    python bench/recsys.py --work /work/recsys --stage data
    OMP_NUM_THREADS=1 python bench/recsys.py --work /work/recsys --stage train --seeds 3 --jobs 2
    python bench/recsys.py --work /work/recsys --stage eval
    python bench/recsys.py --work /work/recsys --stage probe
    python bench/recsys.py --work /work/recsys --stage report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ML = ROOT.parent / "shared" / "data" / "movielens"
PRESETS = {"clm": ROOT / "configs" / "sasrec-cpu.yaml", "mlm": ROOT / "configs" / "bert4rec-cpu.yaml"}
NAMES = {"clm": "next item (causal, SASRec-style)", "mlm": "masked items (BERT4Rec-style)"}
PROBE_MIN_RATINGS = 10


def pretrain(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "pretrain", *args]
    res = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return res.stdout if capture else ""


def stage_data(work: Path) -> None:
    pretrain("prepare", str(ML / "ratings.csv"), "--interactions", "--user-column", "userId",
             "--item-column", "movieId", "--time-column", "timestamp", "--items", str(ML / "movies.csv"),
             "--licence", "GroupLens MovieLens terms: research and non-commercial use",
             "--out", str(work / "data"), "--overwrite")
    with open(ML / "ratings.csv", newline="") as f:
        count = Counter(r["movieId"] for r in csv.DictReader(f))
    rows = []
    with open(ML / "movies.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            g = set(r["genres"].split("|"))
            if count[r["movieId"]] >= PROBE_MIN_RATINGS and ("Drama" in g) != ("Comedy" in g):
                rows.append((r["movieId"], "Drama" if "Drama" in g else "Comedy"))
    random.Random(0).shuffle(rows)
    half = len(rows) // 2
    for name, part in (("genre_train.csv", rows[:half]), ("genre_val.csv", rows[half:])):
        (work / name).write_text("movieId,genre\n" + "".join(f"{m},{g}\n" for m, g in part))
    print(f"genre probe: {half} train / {len(rows) - half} validation movies "
          f"({dict(Counter(g for _, g in rows))})")


def runs(work: Path) -> list[tuple[str, int, Path]]:
    out = []
    for p in sorted(q for q in (work / "runs").glob("*-s*") if q.is_dir()):
        obj, seed = p.name.rsplit("-s", 1)
        out.append((obj, int(seed), p))
    return out


def stage_train(work: Path, seeds: int, jobs: int, objectives: list[str], extra: list[str]) -> None:
    todo = [(obj, s) for s in range(seeds) for obj in objectives]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, str, float]] = []
    (work / "runs").mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < jobs:
            obj, s = todo.pop(0)
            run = work / "runs" / f"{obj}-s{s}"
            log = open(work / "runs" / f"{obj}-s{s}.log", "w")
            cmd = [sys.executable, "-m", "pretrain", "train", str(PRESETS[obj]), "--data.path",
                   str(work / "data"), "--out", str(run), "--train.seed", str(s), "--train.threads", "1",
                   *extra]
            print(" ".join(cmd[2:]), flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), run.name,
                            time.time()))
        time.sleep(2)
        for p, name, t0 in list(running):
            if p.poll() is not None:
                running.remove((p, name, t0))
                print(f"{name}: exit {p.returncode} after {time.time() - t0:.0f} s", flush=True)
                if p.returncode:
                    raise SystemExit(f"training {name} failed: see its .log")


def stage_eval(work: Path) -> None:
    (work / "eval").mkdir(exist_ok=True)
    for _, _, run in runs(work):
        for tag, extra in (("full", []), ("sampled", ["--negatives", "100"])):
            out = pretrain("eval", str(run), "--rec", "--json", *extra, capture=True)
            (work / "eval" / f"{run.name}-{tag}.json").write_text(out)
            r = json.loads(out)
            print(f"{run.name} {tag}: NDCG@10 {r['model']['ndcg@10']:.4f} (popularity "
                  f"{r['popularity']['ndcg@10']:.4f}, item-kNN {r['item_knn']['ndcg@10']:.4f})", flush=True)


def stage_probe(work: Path) -> None:
    (work / "probe").mkdir(exist_ok=True)
    for _, seed, run in runs(work):
        for tag, extra in (("pretrained", []), ("random", ["--random-init", "--seed", str(seed)])):
            out = pretrain("probe", str(run), "--train", str(work / "genre_train.csv"), "--valid",
                           str(work / "genre_val.csv"), "--text-column", "movieId", "--label-column", "genre",
                           "--json", *extra, capture=True)
            (work / "probe" / f"{run.name}-{tag}.json").write_text(out)


def _ms(xs: list[float], scale: float = 1.0, digits: int = 4) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def stage_report(work: Path) -> str:
    lines = ["| arm | NDCG@10 | HR@10 | MRR | × popularity | × item-kNN | train s | steps |",
             "|---|---|---|---|---|---|---|---|"]
    base: dict[str, Any] = {}
    sampled_rows = []
    probe_rows = []
    for obj in PRESETS:
        full, sampled, secs, steps, probes = [], [], [], [], {"pretrained": [], "random": []}
        for o, _, run in runs(work):
            if o != obj or not (work / "eval" / f"{run.name}-full.json").is_file():
                continue
            full.append(json.loads((work / "eval" / f"{run.name}-full.json").read_text()))
            sampled.append(json.loads((work / "eval" / f"{run.name}-sampled.json").read_text()))
            summary = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            secs.append(max(r.get("elapsed_s", 0) for r in summary))
            steps.append(max(r.get("step", 0) for r in summary))
            for tag in probes:
                p = work / "probe" / f"{run.name}-{tag}.json"
                if p.is_file():
                    probes[tag].append(json.loads(p.read_text()))
        if not full:
            continue
        base = full[0]
        m = {key: [r["model"][key] for r in full] for key in ("ndcg@10", "hr@10", "mrr")}
        pop = [r["model"]["ndcg@10"] / r["popularity"]["ndcg@10"] for r in full]
        knn = [r["model"]["ndcg@10"] / r["item_knn"]["ndcg@10"] for r in full]
        lines.append(f"| {NAMES[obj]}, {len(full)} seeds | {_ms(m['ndcg@10'])} | {_ms(m['hr@10'])} | "
                     f"{_ms(m['mrr'])} | {_ms(pop, digits=2)} | {_ms(knn, digits=2)} | "
                     f"{statistics.mean(secs):.0f} | {statistics.mean(steps):.0f} |")
        sampled_rows.append(f"| {NAMES[obj]} | {_ms([r['model']['ndcg@10'] for r in sampled])} | "
                            f"{_ms([r['model']['hr@10'] for r in sampled])} |")
        if probes["pretrained"]:
            pre, rnd = probes["pretrained"], probes["random"]
            probe_rows.append(f"| {NAMES[obj]} | {_ms([p['accuracy'] for p in pre], 100, 1)} | "
                              f"{_ms([p['roc_auc'] for p in pre])} | "
                              f"{_ms([p['accuracy'] for p in rnd], 100, 1)} | "
                              f"{_ms([p['roc_auc'] for p in rnd])} |")
    if base:
        for name, key in (("popularity", "popularity"), ("item-kNN (recency decay "
                                                         f"{base['item_knn_settings']['decay']}, tuned on "
                                                         "validation)", "item_knn")):
            r = base[key]
            lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {r['mrr']:.4f} | | | | |")
        s = json.loads((work / "eval" / f"{runs(work)[0][2].name}-sampled.json").read_text())
        sampled_rows += [f"| {name} | {s[key]['ndcg@10']:.4f} | {s[key]['hr@10']:.4f} |"
                         for name, key in (("popularity", "popularity"), ("item-kNN", "item_knn"))]
    out = [f"Test items of {base.get('users', '?')} users, full ranking over {base.get('items', '?')} items "
           "(the user's history excluded):", "", *lines, "",
           "Sampled metrics (the target among 100 random unseen items; not comparable with full "
           "ranking):", "",
           "| arm | NDCG@10 | HR@10 |", "|---|---|---|", *sampled_rows]
    if probe_rows:
        out += ["", "Genre probe (Drama vs Comedy from the item embedding; logistic regression):", "",
                "| arm | accuracy % | ROC-AUC | untrained accuracy % | untrained ROC-AUC |",
                "|---|---|---|---|---|",
                *probe_rows]
    text = "\n".join(out) + "\n"
    (work / "report.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/recsys"))
    ap.add_argument("--stage", required=True, choices=["data", "train", "eval", "probe", "report"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--objectives", default="clm,mlm")
    args, extra = ap.parse_known_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "data":
        stage_data(args.work)
    elif args.stage == "train":
        stage_train(args.work, args.seeds, args.jobs, args.objectives.split(","), extra)
    elif args.stage == "eval":
        stage_eval(args.work)
    elif args.stage == "probe":
        stage_probe(args.work)
    else:
        print(stage_report(args.work))


if __name__ == "__main__":
    main()
