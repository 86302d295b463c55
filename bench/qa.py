"""Extractive question answering on XQuAD (English): does a general-text encoder pay off over from scratch?

Data: ../shared/data/xquad/xquad.en.json (XQuAD, CC BY-SA 4.0: 1,190 questions on 240 paragraphs of 48
Wikipedia articles, SQuAD v1.1 format, one answer per question). Split BY ARTICLE, never by question: the
48 articles are shuffled with ``random.Random(0)``; the first 36 go to WORK/train.json and the other 12 to
WORK/dev.json (both SQuAD v1.1 JSON), so no paragraph of a dev article is seen in fine-tuning.

Stage ``data``: the split, WORK/contexts.jsonl (the 240 paragraphs of all 48 articles — both splits — one
``{"text": ...}`` per line), and a WordPiece (8,192) corpus prepared from the general text of the other
benches: WikiText-2 valid + test (one document per article), the TinyStories samples (one per paragraph
block) and the IMDB train reviews (bench/mlm_cpu.py's corpus), as a mixture that draws 2/7 of the training
sequences from Wikipedia (``wiki::2 stories::1 imdb::4``; naturally 14%: XQuAD is Wikipedia).
``--decontaminate WORK/contexts.jsonl`` drops every document sharing a 13-word n-gram with any XQuAD
paragraph.

Stage ``pretrain``: configs/bert-cpu-sst2.yaml (4 x 192 encoder, masked LM, 25% masking, Muon — the best
general-text backbone of bench/transfer_tasks.py) with ``data.seq_len 256`` (QA windows are 256 tokens:
an XQuAD paragraph is ~150 words) at batch 16 (the preset's 4,096 tokens per step) and ``model.max_seq_len
512``, for ``--budget-s`` seconds on ``--threads`` (default 1) threads, the LR decaying over the time budget.

Stage ``baseline``: the sliding-window baseline of Rajpurkar et al. (2016)
(pretrain.finetune.qa_baseline.sliding_window_predict) on the dev split; SQuAD v1.1 EM/F1 to
WORK/baseline.json.

Stage ``transfer``: ``pretrain transfer WORK/mlm --task qa --train WORK/train.json --valid WORK/dev.json``
(pre-trained vs from scratch, the sliding-window arm as its shallow baseline) into WORK/transfer: 256-token
windows ([CLS] question [SEP] context [SEP]) sharing 128 tokens, answers of at most 30 tokens; budgets and
seeds as given (measured: 16, 128 and all 927 questions, 3 seeds each; the same question subsets for every
arm, gains paired by seed).

Stage ``report``: arm x budget, EM and F1 mean +- std over seeds, the gains, the baseline: WORK/report.md.

    python bench/qa.py --work /work/qa --stage data
    OMP_NUM_THREADS=1 nice python bench/qa.py --work /work/qa --stage pretrain --budget-s 1800 \
        > /work/qa/pretrain.log 2>&1
    python bench/qa.py --work /work/qa --stage baseline
    OMP_NUM_THREADS=1 python bench/qa.py --work /work/qa --stage transfer --budgets 16,128,all --seeds 3 \
        --all-seeds 3 --recipe fixed --lr 1e-3 --scratch-lr 1e-3 --epochs 5 --batch-size 16 --max-epochs 10
    # = pretrain transfer /work/qa/mlm --task qa --train /work/qa/train.json --valid /work/qa/dev.json \
    #     --budgets 16,128,all --seeds 3 --all-seeds 3 --max-length 256 --doc-stride 128 \
    #     --max-answer-length 30 --out /work/qa/transfer --recipe fixed ... (the extra flags passed on)
    python bench/qa.py --work /work/qa --stage report
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
XQUAD = SHARED / "xquad" / "xquad.en.json"
CONFIG = ROOT / "configs" / "bert-cpu-sst2.yaml"
SPLIT_SEED = 0
TRAIN_ARTICLES = 36
NGRAM = 13
SOURCES = {"wiki": 2.0, "stories": 1.0, "imdb": 4.0}
"""Mixture weights of the pre-training sources (share of training sequences drawn from each): Wikipedia
(0.58M tokens) at 2/7 of the sequences instead of its natural 14%: seen ~6 times in 30 single-core minutes
(11.5M tokens); TinyStories (0.42M) ~4 times, IMDB (3.1M) ~2 times."""
PRETRAIN_OVERRIDES = ["--data.seq_len", "256", "--model.max_seq_len", "512", "--train.batch_size", "16"]


# ------------------------------------------------------------------------------------------------ data


def split_articles(articles: list[dict], n_train: int = TRAIN_ARTICLES,
                   seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """(train, dev) articles: a seeded shuffle of the articles, the first ``n_train`` to train; each keeps
    its original order within a split."""
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    train = sorted(order[:n_train])
    dev = sorted(order[n_train:])
    return [articles[i] for i in train], [articles[i] for i in dev]


def count_questions(articles: list[dict]) -> int:
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def write_squad(articles: list[dict], path: Path) -> None:
    path.write_text(json.dumps({"version": "1.1", "data": articles}, ensure_ascii=False), encoding="utf-8")


def source_documents(name: str) -> Iterator[str]:
    """The documents of one pre-training source: ``wiki`` (WikiText-2 valid + test, one per article),
    ``stories`` (the TinyStories samples, one per paragraph block), ``imdb`` (IMDB train reviews)."""
    if name == "wiki":
        for fname in ("wiki.valid.raw", "wiki.test.raw"):
            text = (SHARED / "wikitext2" / fname).read_text(encoding="utf-8")
            for art in re.split(r"\n(?= = [^=].* = \n)", text):  # articles start with " = Title = "
                if art.strip():
                    yield art.strip()
    elif name == "stories":
        for fname in ("tinystories_train_sample.txt", "tinystories_valid_sample.txt"):
            text = (SHARED / "tinystories" / fname).read_text(encoding="utf-8")
            yield from (d.strip() for d in re.split(r"\n\s*\n", text) if len(d.strip()) > 50)
    elif name == "imdb":
        with open(SHARED / "imdb" / "train.csv", encoding="utf-8", newline="") as f:
            yield from (row["text"].replace("<br />", " ") for row in csv.DictReader(f))
    else:
        raise ValueError(f"unknown source {name!r}")


def stage_data(work: Path, quiet: bool) -> dict[str, Any]:
    """The article split, the contexts file and the decontaminated pre-training corpus (kept if present)."""
    from pretrain.data.clean import CleanConfig
    from pretrain.data.prepare import prepare

    work.mkdir(parents=True, exist_ok=True)
    articles = json.loads(XQUAD.read_text(encoding="utf-8"))["data"]
    train, dev = split_articles(articles)
    write_squad(train, work / "train.json")
    write_squad(dev, work / "dev.json")
    contexts = [p["context"] for a in articles for p in a["paragraphs"]]
    with open(work / "contexts.jsonl", "w", encoding="utf-8") as f:
        for c in contexts:
            f.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")
    split = {"seed": SPLIT_SEED, "train_articles": [a["title"] for a in train],
             "dev_articles": [a["title"] for a in dev], "train_questions": count_questions(train),
             "dev_questions": count_questions(dev), "contexts": len(contexts)}
    (work / "split.json").write_text(json.dumps(split, indent=2), encoding="utf-8")
    data = work / "data"
    if not (data / "meta.json").exists():
        inputs = []
        for name, weight in SOURCES.items():
            path = work / f"corpus_{name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for d in source_documents(name):
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            inputs.append(f"{path}::{weight:g}")
        t0 = time.time()
        prepare(inputs, data, tokenizer="wordpiece", vocab_size=8192, val_fraction=0.02,
                clean=CleanConfig(decontaminate=[str(work / "contexts.jsonl")], ngram=NGRAM),
                log=(lambda *a: None) if quiet else (lambda m: print(m, file=sys.stderr)))
        split["prepare_s"] = round(time.time() - t0, 1)
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    split["decontamination"] = decontam_counts(meta)
    split["tokens"] = {k: v["tokens"] for k, v in meta["splits"].items()}
    if not quiet:
        print(f"split (seed {SPLIT_SEED}): {len(train)} articles / {split['train_questions']} questions to "
              f"train, {len(dev)} / {split['dev_questions']} to dev; decontamination: "
              f"{split['decontamination']}", file=sys.stderr)
    return split


def decontam_counts(meta: dict[str, Any]) -> dict[str, Any]:
    """The decontamination step's figures from a prepared meta.json's cleaning report: every entry named
    ``contaminated`` (documents and bytes removed, overall and per source)."""
    cleaning = meta.get("cleaning", {})

    def find(obj: Any, path: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(obj, dict):
            for k, v in obj.items():
                p = f"{path}.{k}" if path else str(k)
                if "contaminat" in str(k).lower():
                    out[p] = v
                else:
                    out.update(find(v, p))
        return out

    return find(cleaning)


# -------------------------------------------------------------------------------------------- pretrain


def stage_pretrain(work: Path, budget_s: float, overrides: list[str], threads: int, quiet: bool,
                   name: str = "mlm") -> dict[str, Any]:
    import torch

    from pretrain.config import load_config
    from pretrain.hardware import cpu_has_native_bf16
    from pretrain.inference import evaluate_run
    from pretrain.train import train

    torch.set_num_threads(threads)
    dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    cfg = load_config(str(CONFIG), ["--objective", "mlm", "--data.path", str(work / "data"),
                                    *PRETRAIN_OVERRIDES,
                                    "--train.max_time_s", str(budget_s), "--train.time_schedule", "true",
                                    "--train.eval_interval", "500", "--train.ckpt_interval", "500",
                                    "--train.dtype", dtype, *overrides])
    summary = train(cfg, work / name, quiet=quiet)
    ev = evaluate_run(work / name)
    result = {"dtype": dtype, "steps": summary.get("step"), "tokens_seen": summary.get("tokens_seen"),
              "elapsed_s": summary.get("elapsed_s"), "n_params": summary.get("n_params"),
              "val_loss": round(ev["loss"], 4), "val_masked_accuracy": round(ev["accuracy"], 4)}
    print(f"pretrain: {result['steps']} steps, {result['tokens_seen']:,} tokens in {result['elapsed_s']}s; "
          f"final val masked loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.2%}", file=sys.stderr)
    (work / f"{name}_pretrain.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# -------------------------------------------------------------------------------------------- metrics


def em_f1(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 in percent (pretrain.finetune.qa.squad_em_f1: the official
    normalisation, the maximum over a question's gold answers)."""
    from pretrain.finetune.qa import squad_em_f1

    res = squad_em_f1(predictions, golds)
    return {"em": 100.0 * res["exact_match"], "f1": 100.0 * res["f1"]}


def squad_examples(path: Path) -> list[dict[str, Any]]:
    """(id, question, context, gold answer texts) of a SQuAD v1.1 JSON file, in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    return [{"id": q["id"], "question": q["question"], "context": p["context"],
             "answers": [a["text"] for a in q["answers"]]}
            for art in data for p in art["paragraphs"] for q in p["qas"]]


# -------------------------------------------------------------------------------------------- baseline


def stage_baseline(work: Path, max_words: int, quiet: bool) -> dict[str, Any]:
    from pretrain.finetune.qa_baseline import sliding_window_predict

    ex = squad_examples(work / "dev.json")
    t0 = time.time()
    preds = sliding_window_predict([e["question"] for e in ex], [e["context"] for e in ex], max_words)
    elapsed = time.time() - t0
    for (text, start), e in zip(preds, ex, strict=True):
        assert e["context"][start:start + len(text)] == text
    scores = em_f1([t for t, _ in preds], [e["answers"] for e in ex])
    result = {"split": "dev", "questions": len(ex), "max_words": max_words, **{k: round(v, 2)
              for k, v in scores.items()}, "elapsed_s": round(elapsed, 2),
              "predictions": {e["id"]: t for (t, _), e in zip(preds, ex, strict=True)}}
    (work / "baseline.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"sliding-window baseline on dev ({len(ex)} questions): EM {scores['em']:.1f}, "
          f"F1 {scores['f1']:.1f} ({elapsed:.1f}s)", file=sys.stderr)
    return {k: v for k, v in result.items() if k != "predictions"}


# -------------------------------------------------------------------------------------------- transfer


def stage_transfer(work: Path, runs: list[str], budgets: str, seeds: int, all_seeds: int, max_length: int,
                   doc_stride: int, max_answer_length: int, extra: list[str]) -> int:
    """``pretrain transfer`` with the QA task (the CLI, in a child process: its exit status is returned);
    ``extra``: further flags passed on as they are (``--search-carves 3``, ``--no-tfidf``, ...)."""
    cmd = [sys.executable, "-m", "pretrain", "transfer", *[str(work / r) for r in runs], "--task", "qa",
           "--train", str(work / "train.json"), "--valid", str(work / "dev.json"),
           "--budgets", budgets, "--seeds", str(seeds), "--all-seeds", str(all_seeds),
           "--max-length", str(max_length),
           "--doc-stride", str(doc_stride), "--max-answer-length", str(max_answer_length),
           "--out", str(work / "transfer"), *extra]
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT)


# -------------------------------------------------------------------------------------------- report


def _pct(x: float) -> float:
    return 100.0 * x if abs(x) <= 1.0 else x


def _seed_values(results: list[dict[str, Any]], arm: str, n: int, keys: tuple[str, ...]) -> list[float]:
    vals = []
    for r in sorted((r for r in results if r["arm"] == arm and r["n"] == n), key=lambda r: r["seed"]):
        for k in keys:
            if r.get(k) is not None:
                vals.append(_pct(float(r[k])))
                break
    return vals


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:.1f} ± {sd:.1f}"


EM_KEYS = ("val_em", "val_exact_match", "em", "exact_match")
F1_KEYS = ("val_f1", "f1", "metric")


def report_table(rep: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """Markdown: one row per arm and budget, EM and F1 mean ± std (sample std) over seeds; the per-seed gains
    of every pre-trained arm over scratch; the sliding-window baseline on the same dev split."""
    arms = [a["name"] for a in rep["arms"]]
    pre = [a["name"] for a in rep["arms"] if a["kind"] == "pretrained"]
    results = rep["results"]
    lines = ["| arm | labelled questions | EM | F1 | seeds |", "|---|---:|---:|---:|---:|"]
    for n in rep["budgets"]:
        for a in arms:
            em, f1 = _seed_values(results, a, n, EM_KEYS), _seed_values(results, a, n, F1_KEYS)
            lines.append(f"| {a} | {n:,} | {_mean_std(em)} | {_mean_std(f1)} | {len(f1)} |")
    if baseline is not None:
        lines.append(f"| sliding window (Rajpurkar et al. 2016) | 0 | {baseline['em']:.1f} | "
                     f"{baseline['f1']:.1f} | – |")
    if pre and "scratch" in arms:
        lines += ["", "| gain over scratch (paired by seed) | labelled questions | EM | F1 |",
                  "|---|---:|---:|---:|"]
        for n in rep["budgets"]:
            for p in pre:
                gains = {}
                for name, keys in (("em", EM_KEYS), ("f1", F1_KEYS)):
                    a, s = _seed_values(results, p, n, keys), _seed_values(results, "scratch", n, keys)
                    gains[name] = [x - y for x, y in zip(a, s)]
                lines.append(f"| {p} | {n:,} | {_signed(gains['em'])} | {_signed(gains['f1'])} |")
    if baseline is not None and pre:
        lines += [""]
        for n in rep["budgets"]:
            for p in pre:
                f1 = _seed_values(results, p, n, F1_KEYS)
                if f1:
                    m = sum(f1) / len(f1)
                    lines.append(f"- {p} at {n:,} questions: F1 {m:.1f}, {m - baseline['f1']:+.1f} over the "
                                 f"sliding-window baseline ({baseline['f1']:.1f}).")
    verdict = rep.get("verdict", {})
    if isinstance(verdict, dict) and verdict.get("line"):
        lines = [f"**{verdict['line']}**", "", *lines]
    return "\n".join(lines)


def _signed(vals: list[float]) -> str:
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:+.1f}"
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:+.1f} ± {sd:.1f}"


def stage_report(work: Path) -> str:
    path = work / "transfer" / "report.json"
    bpath = work / "baseline.json"
    baseline = json.loads(bpath.read_text(encoding="utf-8")) if bpath.exists() else None
    if not path.exists():
        table = "no transfer report yet (WORK/transfer/report.json)"
        if baseline is not None:
            table += (f"\nsliding-window baseline on dev ({baseline['questions']} questions): "
                      f"EM {baseline['em']:.1f}, F1 {baseline['f1']:.1f}")
        return table
    table = report_table(json.loads(path.read_text(encoding="utf-8")), baseline)
    (work / "report.md").write_text(table + "\n", encoding="utf-8")
    return table


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pretrain.cli import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work directory (kept: stages reuse what it holds)")
    ap.add_argument("--stage", choices=["data", "pretrain", "baseline", "transfer", "report"], required=True)
    ap.add_argument("--budget-s", type=float, default=1800.0, help="pre-training time limit (default 1800)")
    ap.add_argument("--threads", type=int, default=1, help="pretrain stage: torch threads (default 1)")
    ap.add_argument("--name", default="mlm", help="pretrain stage: the run folder in WORK (default mlm)")
    ap.add_argument("--max-words", type=int, default=10,
                    help="baseline stage: longest candidate answer in words (default 10)")
    ap.add_argument("--runs", default="mlm", help="transfer stage: backbones in WORK (default mlm)")
    ap.add_argument("--budgets", default="16,128,all",
                    help="transfer stage: question budgets (default 16,128,all)")
    ap.add_argument("--seeds", type=int, default=3, help="transfer stage: seeds per budget (default 3)")
    ap.add_argument("--all-seeds", type=int, default=3,
                    help="transfer stage: seeds for the full training set (default 3)")
    ap.add_argument("--max-length", type=int, default=256, help="transfer stage: tokens per window (256)")
    ap.add_argument("--doc-stride", type=int, default=128, help="transfer stage: window stride (128)")
    ap.add_argument("--max-answer-length", type=int, default=30,
                    help="transfer stage: longest answer in tokens (30)")
    ap.add_argument("--json", action="store_true")
    args, extra = ap.parse_known_args(rest)
    if extra and args.stage != "transfer":
        ap.error(f"unrecognized arguments: {' '.join(extra)} (only the transfer stage passes flags on)")
    work = Path(args.work)
    result: dict[str, Any]
    if args.stage == "data":
        result = stage_data(work, args.json)
    elif args.stage == "pretrain":
        stage_data(work, args.json)
        result = stage_pretrain(work, args.budget_s, overrides, args.threads, args.json, args.name)
    elif args.stage == "baseline":
        result = stage_baseline(work, args.max_words, args.json)
    elif args.stage == "transfer":
        rc = stage_transfer(work, args.runs.split(","), args.budgets, args.seeds, args.all_seeds,
                            args.max_length, args.doc_stride, args.max_answer_length, extra + overrides)
        if rc:
            raise SystemExit(rc)
        result = {"out": str(work / "transfer")}
    else:
        table = stage_report(work)
        print(table)
        return {"table": table}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
