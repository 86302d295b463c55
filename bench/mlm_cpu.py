"""Masked-LM pre-training on a CPU in ≤ 10 minutes: masked-token accuracy and fill-mask examples.

Corpus (from ../shared/data, labels unused): WikiText-2 valid+test raw (one document per article),
the TinyStories samples (one document per story paragraph block), IMDB train review texts (one per
review). WordPiece vocabulary, a ModernBERT-style encoder (configs/bert-cpu.yaml), 15% dynamic masking.

    python bench/mlm_cpu.py --json
    # {"val_masked_accuracy", "val_loss", "train_s", "fill_mask": {...}, ...}
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROBES = [
    "the cat sat on the [MASK].",
    "she opened the door and walked into the [MASK].",
    "this movie was one of the [MASK] films i have ever seen.",
    "the river flows into the [MASK] sea.",
    "once upon a time, there was a little [MASK] named lily.",
    "he was born in [MASK] and moved to london in 1990.",
]


def build_corpus(out: Path) -> Path:
    """One JSONL file of documents from the shared datasets."""
    docs: list[str] = []
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        text = (SHARED / "wikitext2" / name).read_text(encoding="utf-8")
        # articles start with a level-1 heading line " = Title = "
        for art in re.split(r"\n(?= = [^=].* = \n)", text):
            if art.strip():
                docs.append(art.strip())
    for name in ("tinystories_train_sample.txt", "tinystories_valid_sample.txt"):
        text = (SHARED / "tinystories" / name).read_text(encoding="utf-8")
        docs += [d.strip() for d in re.split(r"\n\s*\n", text) if len(d.strip()) > 50]
    with open(SHARED / "imdb" / "train.csv", encoding="utf-8", newline="") as f:
        docs += [row["text"].replace("<br />", " ") for row in csv.DictReader(f)]
    path = out / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    from pretrain.cli import split_overrides
    from pretrain.config import load_config
    from pretrain.data.prepare import prepare
    from pretrain.inference import evaluate_run, fill_mask
    from pretrain.train import train

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "bert-cpu.yaml"))
    ap.add_argument("--budget-s", type=float, default=540.0, help="training time limit (default 540)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(rest)
    work = Path(args.out or tempfile.mkdtemp(prefix="mlm_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    t0 = time.time()
    if not (data / "meta.json").exists():
        prepare([str(build_corpus(work))], data, tokenizer="wordpiece", vocab_size=8192, val_fraction=0.05,
                log=(lambda *a: None) if args.json else (lambda m: print(m, file=sys.stderr)))
    t_prep = time.time() - t0
    cfg = load_config(args.config, [*overrides, "--data.path", str(data),
                                    "--train.max_time_s", str(args.budget_s)])
    run = work / f"run_{int(time.time())}"
    summary = train(cfg, run, quiet=args.json)
    ev = evaluate_run(run)
    fills = {p: [f"{o['token']} ({o['prob']:.2f})" for o in fill_mask(run, p, top_k=5)[0]] for p in PROBES}
    result = {"val_masked_accuracy": round(ev["accuracy"], 4), "val_loss": round(ev["loss"], 4),
              "val_masked_tokens": ev["tokens"], "train_s": summary["elapsed_s"], "steps": summary["step"],
              "tokens_seen": summary["tokens_seen"], "n_params": summary["n_params"],
              "prepare_s": round(t_prep, 1),
              "config": args.config, "overrides": overrides, "fill_mask": fills}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"masked-token accuracy on the held-out split: {ev['accuracy']:.2%} (loss {ev['loss']:.3f}, "
              f"{ev['tokens']:,} masked tokens); {summary['step']} steps in {summary['elapsed_s']:.0f}s")
        for p, f in fills.items():
            print(f"{p}\n    → {', '.join(f)}")
    return result


if __name__ == "__main__":
    main()
