"""Does pre-training on general text pay off on tasks nobody tuned for? SST-2 and BANKING77, MLM and RTD.

Stage ``data``: a general-text corpus from ../shared/data — WikiText-2 (valid + test, one document per
article), the TinyStories samples (one per paragraph block) and Tiny Shakespeare (one per speech block) —
with no movie reviews and no banking queries: ``pretrain prepare --decontaminate`` drops every document
that shares an 8-word n-gram (short queries and sentences have no 13-word ones) with SST-2 (train + dev
sentences) or BANKING77 (train + test queries).
One WordPiece vocabulary (8,192), shared by every backbone (so the from-scratch arm is one arm).

Stage ``pretrain``: an encoder of 4 x 192 pre-trained for ``--budget-s`` seconds with ``--backbone mlm``
(masked LM, configs/bert-cpu-sst2.yaml) or ``rtd`` (replaced-token detection, ELECTRA-style: that encoder as
the discriminator and a one-block generator, configs/electra-cpu.yaml), the LR decaying over the time
budget; the time budget ends it, not the preset's step cap (lifted: a fast machine once stopped at the cap
after 20 of its 30 minutes). Each backbone lands in WORK/<objective> (or WORK/<--name>).

Stage ``transfer``: ``pretrain transfer`` with its defaults (the automatic recipe: learning rate, pooling and
epochs chosen per arm and budget on a validation split carved from the training labels) for every backbone
on both tasks (SST-2 train -> dev; BANKING77 train -> test), and TF-IDF + logistic regression on the same
label subsets (its C chosen the same way). Stage ``report``: one table, mean over seeds with 95% intervals.

    python bench/transfer_tasks.py --work /tmp/tt --stage data
    python bench/transfer_tasks.py --work /tmp/tt --stage pretrain --backbone mlm --budget-s 1500
    python bench/transfer_tasks.py --work /tmp/tt --stage pretrain --backbone rtd --budget-s 1500
    python bench/transfer_tasks.py --work /tmp/tt --stage transfer --budgets 100,1000 --seeds 5
    python bench/transfer_tasks.py --work /tmp/tt --stage report
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

CONFIGS = {"mlm": "bert-cpu-sst2.yaml", "rtd": "electra-cpu.yaml"}
NGRAM = 8
TASKS = {
    "sst2": {"train": SHARED / "sst2" / "train.tsv", "valid": SHARED / "sst2" / "dev.tsv",
             "text": "sentence", "label": "label"},
    "banking77": {"train": SHARED / "banking77" / "train.csv", "valid": SHARED / "banking77" / "test.csv",
                  "text": "text", "label": "category"},
}


def general_documents() -> Iterator[str]:
    """WikiText-2 articles, TinyStories paragraph blocks, Tiny Shakespeare speeches no reviews or banking."""
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        text = (SHARED / "wikitext2" / name).read_text(encoding="utf-8")
        for art in re.split(r"\n(?= = [^=].* = \n)", text):  # articles start with " = Title = "
            if art.strip():
                yield art.strip()
    for name in ("tinystories_train_sample.txt", "tinystories_valid_sample.txt"):
        text = (SHARED / "tinystories" / name).read_text(encoding="utf-8")
        yield from (d.strip() for d in re.split(r"\n\s*\n", text) if len(d.strip()) > 50)
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    yield from (d.strip() for d in re.split(r"\n\s*\n", text) if len(d.strip()) > 50)


def task_texts(out: Path) -> list[str]:
    """The texts of both tasks (train and evaluation) as JSONL files for --decontaminate: those of at least
    NGRAM words (a shorter one is matched whole, and SST-2's phrase fragments — "the film", "a" — would
    remove most of Wikipedia)."""
    paths = []
    for name, t in TASKS.items():
        path = out / f"decontam_{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for split in ("train", "valid"):
                delim = "\t" if t[split].suffix == ".tsv" else ","
                quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
                with open(t[split], encoding="utf-8", newline="") as src:
                    for row in csv.DictReader(src, delimiter=delim, quoting=quoting):
                        text = row[t["text"]].strip()
                        if len(text.split()) >= NGRAM:  # a shorter phrase is matched whole: "the film"
                            f.write(json.dumps({"text": text}) + "\n")
        paths.append(str(path))
    return paths


def stage_data(work: Path, quiet: bool) -> dict:
    from pretrain.data.prepare import prepare

    data = work / "data"
    if (data / "meta.json").exists():
        return json.loads((data / "meta.json").read_text(encoding="utf-8")).get("counts", {})
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "general.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in general_documents():
            f.write(json.dumps({"text": d}) + "\n")
    t0 = time.time()
    from pretrain.data.clean import CleanConfig

    prepare([str(corpus)], data, tokenizer="wordpiece", vocab_size=8192, val_fraction=0.02,
            clean=CleanConfig(decontaminate=task_texts(work), ngram=NGRAM),
            log=(lambda *a: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    return {"prepare_s": round(time.time() - t0, 1)}


UNCAPPED = 1_000_000
"""The pre-training stage's step limit: the time budget ends the run (--train.max_steps overrides it)."""


def stage_pretrain(work: Path, objective: str, config: str, budget_s: float, overrides: list[str],
                   quiet: bool, name: str | None = None) -> dict:
    from pretrain.config import load_config
    from pretrain.hardware import cpu_has_native_bf16
    from pretrain.train import train

    dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    cfg = load_config(config, ["--objective", objective, "--data.path", str(work / "data"),
                               "--train.max_time_s", str(budget_s), "--train.time_schedule", "true",
                               "--train.max_steps", str(UNCAPPED),
                               "--train.eval_interval", "500", "--train.ckpt_interval", "500",
                               "--train.dtype", dtype, *overrides])
    return {"dtype": dtype, **train(cfg, work / (name or objective), quiet=quiet)}


def stage_transfer(work: Path, runs: list[str], tasks: list[str], budgets: str, seeds: int,
                   quiet: bool) -> dict:
    """`pretrain transfer` (its defaults: the automatic recipe, TF-IDF arm) of every backbone on each
    task, into WORK/transfer_<task>; the from-scratch runs are shared by the backbones (one architecture,
    one tokenizer) and reused from an earlier call."""
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.transfer import transfer

    out = {}
    for task in tasks:
        t = TASKS[task]
        cfg = FinetuneConfig(text_column=t["text"], label_column=t["label"])
        res = transfer([work / r for r in runs], t["train"], t["valid"], work / f"transfer_{task}", cfg,
                       budgets=budgets, seeds=seeds, quiet=quiet)
        print(res["verdict"], file=sys.stderr)
        out[task] = res
    return out


def stage_report(work: Path) -> str:
    """One table over the tasks' report.json files: mean and 95% interval per arm, gains over scratch."""
    lines = []
    for task in TASKS:
        path = work / f"transfer_{task}" / "report.json"
        if not path.exists():
            continue
        rep = json.loads(path.read_text(encoding="utf-8"))
        arms = [a["name"] for a in rep["arms"]]
        pre = [a["name"] for a in rep["arms"] if a["kind"] == "pretrained"]
        if not lines:
            lines += ["| task | labels | " + " | ".join(arms) + " | " + " | ".join(f"gain {p}" for p in pre)
                      + " | seeds |", "|---|---:|" + "---:|" * (len(arms) + len(pre) + 1)]
        for row in rep["summary"]:
            def cell(d, signed=False):
                f = "{:+.1f}" if signed else "{:.1f}"
                ci = d["ci95"]
                return f.format(100 * d["mean"]) + ("" if ci is None else
                                                    f" [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]")
            lines.append(f"| {task} | {row['n']:,} | " + " | ".join(cell(row["arms"][a]) for a in arms)
                         + " | "
                         + " | ".join(cell(row["gain"][p], True) for p in pre)
                         + f" | {row['arms'][arms[0]]['seeds']} |")
        lines.append(f"| {task} | verdict | {rep['verdict']['line']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from pretrain.cli import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work directory (kept: stages reuse what it holds)")
    ap.add_argument("--stage", choices=["data", "pretrain", "transfer", "report"], required=True)
    ap.add_argument("--backbone", default="mlm", choices=sorted(CONFIGS),
                    help="pretrain stage: the objective, mlm or rtd")
    ap.add_argument("--config", default=None,
                    help="pretrain stage: default configs/bert-cpu-sst2.yaml (mlm) or "
                         "configs/electra-cpu.yaml (rtd): one encoder size for both")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="pre-training time limit (default 1500)")
    ap.add_argument("--name", default=None,
                    help="pretrain stage: the run folder in WORK (default: the objective)")
    ap.add_argument("--runs", default="mlm,rtd", help="transfer stage: backbones in WORK (default mlm,rtd)")
    ap.add_argument("--tasks", default="sst2,banking77",
                    help="transfer stage: tasks (default sst2,banking77)")
    ap.add_argument("--budgets", default="100,1000", help="transfer stage: label budgets (default 100,1000)")
    ap.add_argument("--seeds", type=int, default=5, help="transfer stage: seeds per budget (default 5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(rest)
    work = Path(args.work)
    if args.stage == "data":
        result = stage_data(work, args.json)
    elif args.stage == "pretrain":
        stage_data(work, args.json)
        config = args.config or str(ROOT / "configs" / CONFIGS[args.backbone])
        result = stage_pretrain(work, args.backbone, config, args.budget_s, overrides, args.json,
                                args.name)
    elif args.stage == "transfer":
        result = stage_transfer(work, args.runs.split(","), args.tasks.split(","), args.budgets, args.seeds,
                                args.json)
    else:
        table = stage_report(work)
        print(table)
        return {"table": table}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
