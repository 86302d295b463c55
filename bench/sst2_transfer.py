"""Was pre-training worth it on SST-2? Pre-train an encoder on a CPU (≤ 30 min), then `pretrain transfer`.

Stage 1 (pre-train, skipped when WORK/run already has a checkpoint): a WordPiece vocabulary and a
ModernBERT-style encoder (configs/bert-cpu-sst2.yaml: 4 x 192, 3.4M parameters, 25% masking) trained with
masked LM on unlabelled movie-review text from ../shared/data (--corpus in-domain): the IMDB review texts
(train + test, labels unused) and the SST-2 *train* sentences without their labels, drawn as 30% of the
samples (task-adaptive pre-training; the dev sentences are never seen). --corpus mixed adds WikiText-2 and
TinyStories (the earlier recipe, with --config configs/bert-cpu.yaml --train.max_steps 1600). Time limit:
--budget-s (default 1740 s of training); the LR schedule decays over that budget (train.time_schedule), so a
slower machine ends with fewer steps but a finished schedule. Precision: bf16 autocast on a CPU with native
bf16 (AVX512-BF16 / AMX), fp32 elsewhere; --dtype forces one.

Stage 2 (transfer): `pretrain transfer` fine-tunes the pre-trained encoder and the same architecture
from a random init at several label budgets and seeds on SST-2 train, evaluates on SST-2 dev, and
writes report.md / report.json / report.png into WORK/transfer.

    python bench/sst2_transfer.py --work /tmp/sst2 --pooling mean --json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def imdb_texts(split: str) -> Iterator[str]:
    """The IMDB review texts of ``split`` (train | test), labels unused, ``<br />`` as spaces."""
    with open(SHARED / "imdb" / f"{split}.csv", encoding="utf-8", newline="") as src:
        for row in csv.DictReader(src):
            yield row["text"].replace("<br />", " ")


def sst2_train_sentences() -> Iterator[str]:
    """The SST-2 train sentences without their labels (the dev sentences are never pre-trained on)."""
    with open(SHARED / "sst2" / "train.tsv", encoding="utf-8", newline="") as src:
        for row in csv.DictReader(src, delimiter="\t", quoting=csv.QUOTE_NONE):
            yield row["sentence"].strip()


def write_jsonl(path: Path, texts: Iterable[str], mode: str = "w") -> Path:
    with open(path, mode, encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def build_corpus(out: Path) -> Path:
    """bench/mlm_cpu.py's corpus plus IMDB test texts and the SST-2 train sentences (no labels)."""
    from mlm_cpu import build_corpus as mlm_corpus

    return write_jsonl(mlm_corpus(out), itertools.chain(imdb_texts("test"), sst2_train_sentences()), mode="a")


def build_in_domain(out: Path, sst2_weight: float) -> list[str]:
    """Movie reviews only: the IMDB texts (train + test, labels unused) and the SST-2 train sentences (no
    labels), as two mixture components; the SST-2 one drawn with probability ``sst2_weight`` (it is ~1/8 of
    the tokens, so a weight above that repeats it: task-adaptive pre-training)."""
    imdb = write_jsonl(out / "imdb.jsonl", itertools.chain(imdb_texts("train"), imdb_texts("test")))
    sst2 = write_jsonl(out / "sst2_train.jsonl", sst2_train_sentences())
    return [f"{imdb}::{1.0 - sst2_weight:g}", f"{sst2}::{sst2_weight:g}"]


def pretrain(work: Path, config: str, budget_s: float, overrides: list[str], quiet: bool,
             dtype: str = "auto", corpus: str = "in-domain", sst2_weight: float = 0.3) -> dict:
    from pretrain.config import load_config
    from pretrain.data.prepare import prepare
    from pretrain.train import train

    data, run = work / "data", work / "run"
    t0 = time.time()
    if not (data / "meta.json").exists():
        inputs = [str(build_corpus(work))] if corpus == "mixed" else build_in_domain(work, sst2_weight)
        prepare(inputs, data, tokenizer="wordpiece", vocab_size=8192, val_fraction=0.02,
                log=(lambda *a: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    t_prep = time.time() - t0
    if dtype == "auto":  # what train.dtype auto picks on a CPU, named in the result
        from pretrain.hardware import cpu_has_native_bf16

        dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    # the time budget ends the run (the config's max_steps is a ceiling above it) and the LR schedule runs
    # over the time budget (train.time_schedule): a slower machine stops with a finished decay, not
    # mid-cosine
    cfg = load_config(config, ["--data.path", str(data), "--train.max_time_s",
                               str(budget_s), "--train.time_schedule", "true",
                               "--train.eval_interval", "500", "--train.ckpt_interval", "500",
                               "--train.dtype", dtype, *overrides])
    summary = train(cfg, run, quiet=quiet)
    return {"prepare_s": round(t_prep, 1), "dtype": dtype, **summary}


def main(argv: list[str] | None = None) -> dict:
    from pretrain.cli import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work directory (kept: rerun to reuse the pre-trained run)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "bert-cpu-sst2.yaml"))
    ap.add_argument("--budget-s", type=float, default=1740.0, help="pre-training time limit (default 1740)")
    ap.add_argument("--corpus", default="in-domain", choices=["mixed", "in-domain"],
                    help="pre-training text: in-domain (default: IMDB and SST-2 train only, a weighted "
                         "mixture) or mixed (those plus WikiText-2 and TinyStories, as one file)")
    ap.add_argument("--sst2-weight", type=float, default=0.3,
                    help="in-domain corpus: share of training samples drawn from the SST-2 sentences "
                         "(default 0.3)")
    ap.add_argument("--stage", choices=["pretrain", "transfer", "all"], default="all")
    ap.add_argument("--budgets", default="100,1000,all", help="label budgets for the transfer stage")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per budget (the full set: 1)")
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tuning LR of the pre-trained model")
    ap.add_argument("--scratch-lr", type=float, default=1e-3, help="fine-tuning LR of the random init")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="pre-training precision: auto = bf16 on CPUs with native bf16, else fp32")
    ap.add_argument("--pooling", default="auto",
                    help="fine-tuning pooling, both sides: auto (cls) | mean | cls")
    ap.add_argument("--prompt", default="",
                    help="prompt-based fine-tuning on both sides, e.g. '{text} it was {mask}.' "
                         "(default: a linear head)")
    ap.add_argument("--verbalizer", default="0=terrible,1=great",
                    help="label words for --prompt (default 0=terrible,1=great)")
    ap.add_argument("--min-steps", type=int, default=200, help="small budgets train at least this many steps")
    ap.add_argument("--max-epochs", type=int, default=10, help="epoch cap for small budgets")
    ap.add_argument("--out", default=None, help="where the transfer report goes (default WORK/transfer)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(rest)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.stage in ("pretrain", "all"):
        result["pretrain"] = pretrain(work, args.config, args.budget_s, overrides, args.json, args.dtype,
                                       args.corpus, args.sst2_weight)
    if args.stage in ("transfer", "all"):
        from pretrain.config import FinetuneConfig
        from pretrain.finetune.transfer import transfer

        # one epoch over all 67k labels; small budgets get up to --max-epochs epochs (at least --min-steps
        # steps)
        cfg = FinetuneConfig(text_column="sentence", label_column="label", epochs=1, lr=args.lr,
                             pooling=args.pooling, prompt=args.prompt,
                             verbalizer=args.verbalizer if args.prompt else "")
        result["transfer"] = transfer(work / "run", SHARED / "sst2" / "train.tsv",
                                      SHARED / "sst2" / "dev.tsv", Path(args.out or work / "transfer"), cfg,
                                      budgets=args.budgets, seeds=args.seeds,
                                      scratch_lr=args.scratch_lr, min_steps=args.min_steps,
                                      max_epochs=args.max_epochs, quiet=False)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
