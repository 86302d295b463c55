"""Bias probes: is the instrument right (the planted-bias experiment), and what do our backbones show on
CrowS-Pairs?

Stage ``planted``: for each seed, ``pretrain.bias.planted_experiment(--pairs, seed=SEED)`` writes two corpora
identical except that in one a set of made-up groups always co-occurs with a made-up stereotype word, and
CrowS-Pairs-shaped probe pairs; each corpus is prepared (WordPiece) and a 2 x 64 masked LM trained on it
(1,200 steps in fp32, document masking — the settings of tests/test_bias.py); ``pretrain bias`` scores
both on the pairs (``--compare``). Expected: the biased model's interval above 50, the balanced one's
containing 50.

Stage ``crows``: ``pretrain bias RUN --data ../shared/data/crows-pairs/crows_pairs_anonymized.csv
[--compare RUN2] --json`` for the runs given (e.g. the bench encoder and a GPT pre-trained on the same
text). CrowS-Pairs: CC BY-SA 4.0, Nangia et al. (EMNLP 2020); caveat: Blodgett et al. (ACL 2021) — one
signal with its interval, not a verdict.

    OMP_NUM_THREADS=1 python bench/bias.py --work /work/bias --stage planted --pairs 30 --seeds 3
    OMP_NUM_THREADS=1 python bench/bias.py --work /work/bias --stage crows --runs /work/qa/mlm /work/bias/gpt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CROWS = ROOT.parent / "shared" / "data" / "crows-pairs" / "crows_pairs_anonymized.csv"
def pretrain(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], check=True, text=True,
                          stdout=subprocess.PIPE).stdout


def _line(r: dict) -> str:
    o = r["overall"]
    return f"{o['score']:.1f}% (95% CI {o['ci95'][0]:.1f}-{o['ci95'][1]:.1f}, n={o['n']}, {r['ties']} ties)"


def stage_planted(work: Path, pairs: int, seeds: int) -> None:
    from pretrain.bias import PLANTED_TRAIN, planted_experiment

    for seed in range(seeds):
        root = work / f"planted-s{seed}"
        root.mkdir(parents=True, exist_ok=True)
        texts = planted_experiment(pairs, seed=seed)
        (root / "pairs.csv").write_text(texts["pairs"])
        for name in ("biased", "balanced"):
            (root / f"{name}.txt").write_text(texts[name])
            pretrain("prepare", str(root / f"{name}.txt"), "--out", str(root / f"data_{name}"),
                     "--tokenizer", "wordpiece", "--vocab-size", "1000", "--text-unit", "paragraph",
                     "--val-fraction", "0.05", "--overwrite")
            pretrain("train", "--out", str(root / f"run_{name}"), "--data.path", str(root / f"data_{name}"),
                     "--train.seed", str(seed), *PLANTED_TRAIN, "--quiet")
        res = json.loads(pretrain("bias", str(root / "run_biased"), "--data", str(root / "pairs.csv"),
                                  "--compare", str(root / "run_balanced"), "--json"))
        (root / "bias.json").write_text(json.dumps(res, indent=1))
        biased, balanced = res["reports"]
        d = res["difference"]
        print(f"seed {seed}: biased corpus {_line(biased)}; balanced corpus {_line(balanced)}; difference "
              f"{d['difference']:+.1f} ({d['ci95'][0]:+.1f} .. {d['ci95'][1]:+.1f})", flush=True)


def stage_crows(work: Path, runs: list[str]) -> None:
    args = [runs[0], "--data", str(CROWS), "--json", "--png", str(work / "crows-pairs.png")]
    if len(runs) > 1:
        args += ["--compare", runs[1]]
    res = json.loads(pretrain("bias", *args))
    (work / "crows-pairs.json").write_text(json.dumps(res, indent=1))
    for r in res["reports"]:
        print(f"{r['run']} ({r['objective']}, step {r['step']}): {_line(r)}")
        for t, s in r["by_type"].items():
            print(f"  {t:22} {s['score']:5.1f}  ({s['ci95'][0]:.1f}-{s['ci95'][1]:.1f})  n={s['n']}")
    if "difference" in res:
        d = res["difference"]
        print(f"difference: {d['difference']:+.1f} points ({d['ci95'][0]:+.1f} .. {d['ci95'][1]:+.1f})")
    print(res["reports"][0]["caveat"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/bias"))
    ap.add_argument("--stage", required=True, choices=["planted", "crows"])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=[])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "planted":
        stage_planted(args.work, args.pairs, args.seeds)
    else:
        if not args.runs:
            raise SystemExit("--runs RUN [RUN2]")
        stage_crows(args.work, args.runs)


if __name__ == "__main__":
    main()
