"""Tokenization throughput of `pretrain prepare` vs the `datasets` baseline, on the same corpus and tokenizer.

Corpus: the text in ../shared/data (Tiny Shakespeare paragraphs, WikiText-2 valid+test articles, the
TinyStories samples' stories, IMDB reviews, SST-2 sentences; one JSON document each) repeated until it
holds ``--size-mb`` MB of text, written as JSONL files of ~64 MB in a temporary directory that is
deleted at the end. Tokenizer: a byte-level BPE (vocabulary 16384) trained once on a 4 MB sample and
saved as tokenizer.json; both sides load that file.

* ours: ``pretrain prepare CORPUS --tokenizer tokenizer.json`` (default cleaning: NFC + control
  characters; train/val split; uint16 shards + meta.json), run as a subprocess.
* baseline — what a user would write with Hugging Face `datasets`: ``load_dataset("json", ...)``,
  ``Dataset.map(batched=True, num_proc=2)`` calling ``tokenizers.Tokenizer.encode_batch`` (EOT appended
  to every document), then the ids written to one uint16 ``.bin`` (``np.concatenate`` per chunk of
  rows), run as a subprocess with a fresh cache directory.

MB/s is MB of document text (UTF-8, 10^6 bytes) per second of the subprocess's wall time (with
``--rounds N``, ours and the baseline alternate N times and the median time of each is used). Peak RSS is
polled from /proc every 0.1 s over the whole process tree (the main process plus its worker processes,
summed: an upper bound, since forked workers share pages) — ``*_peak_rss_mb``; the largest single
process (``ru_maxrss``) is reported too.

    python bench/prepare_throughput.py --json                       # 200 MB, ours + baseline
    python bench/prepare_throughput.py --size-mb 2048 --skip-baseline --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import shared_documents, tree_rss_kb

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FILE_MB = 64


def build_corpus(work: Path, data: Path, size_mb: float) -> tuple[list[Path], int, int]:
    """JSONL files holding the shared documents repeated to ``size_mb`` MB of text → (files, text bytes,
    docs)."""
    docs = shared_documents(data)
    lines = [(json.dumps({"text": d}) + "\n").encode() for d in docs]
    sizes = [len(d.encode()) for d in docs]
    target = int(size_mb * 1e6)
    files: list[Path] = []
    text_bytes = n_docs = 0
    f = None
    i = 0
    while text_bytes < target:
        if f is None or f.tell() >= FILE_MB * 1e6:
            if f is not None:
                f.close()
            files.append(work / f"corpus_{len(files):04d}.jsonl")
            f = open(files[-1], "wb")
        k = i % len(docs)
        f.write(lines[k])
        text_bytes += sizes[k]
        n_docs += 1
        i += 1
    if f is not None:
        f.close()
    return files, text_bytes, n_docs


def train_tokenizer(work: Path, data: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from pretrain.data.tokenizer import train_bpe

    docs = shared_documents(data)
    sample, size = [], 0
    for d in docs[::3]:  # ~4 MB spread over every source
        sample.append(d)
        size += len(d)
        if size > 4e6:
            break
    path = work / "tokenizer.json"
    train_bpe(sample, 16384).save(path)
    return path


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, peak summed RSS of its process tree, its largest single-process max RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid)[0])
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "peak_tree_rss_mb": peak / 1024,
            "max_process_rss_mb": (maxrss / 1024) if maxrss > before else None, "stdout": out, "stderr": err}


def baseline(files: list[str], tokenizer: str, out: str, cache: str, num_proc: int) -> None:
    """The `datasets` way: load JSON → map(batched, num_proc) with encode_batch → ids to one .bin."""
    import datasets
    import numpy as np
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(tokenizer)
    eot = tok.token_to_id("<|endoftext|>")

    def encode(batch):
        return {"input_ids": [e.ids + [eot]
                              for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    ds = ds.with_format("numpy")
    n = 0
    with open(out, "wb") as f:
        for i in range(0, len(ds), 10_000):
            ids = np.concatenate(ds[i:i + 10_000]["input_ids"]).astype(np.uint16)
            f.write(ids.tobytes())
            n += ids.size
    print(json.dumps({"tokens": n}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=200.0, help="MB of text in the corpus (default 200)")
    ap.add_argument("--data", default=str(SHARED), help="the shared data folder (default ../shared/data)")
    ap.add_argument("--workers", type=int, default=None,
                    help="our --workers (default: prepare's own default)")
    ap.add_argument("--batch-mb", type=float, default=1.0, help="our --batch-mb (default 1)")
    ap.add_argument("--num-proc", type=int, default=2, help="the baseline's map num_proc (default 2)")
    ap.add_argument("--skip-baseline", action="store_true", help="measure ours only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating rounds of ours and the baseline; figures are medians (default 1)")
    ap.add_argument("--work", default=None, help="where to build the corpus (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--_baseline", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._baseline:
        files, tokenizer, out, cache, num_proc = args._baseline
        baseline(files.split(os.pathsep), tokenizer, out, cache, int(num_proc))
        return {}

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="prepare_bench_", dir=args.work))
    try:
        tok = train_tokenizer(work, Path(args.data))
        files, text_bytes, n_docs = build_corpus(work, Path(args.data), args.size_mb)
        mb = text_bytes / 1e6
        say(f"corpus: {mb:,.1f} MB of text, {n_docs:,} documents in {len(files)} JSONL files "
            f"({sum(f.stat().st_size for f in files) / 1e6:,.1f} MB on disk)")
        cmd = [sys.executable, "-m", "pretrain.cli", "prepare", *map(str, files), "--out", str(work / "ours"),
               "--tokenizer", str(tok), "--batch-mb", str(args.batch_mb), "--json"]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        base_cmd = [sys.executable, str(Path(__file__).resolve()), "--_baseline",
                    os.pathsep.join(map(str, files)), str(tok), str(work / "baseline.bin"),
                    str(work / "hf_cache"), str(args.num_proc)]
        rounds: list[dict] = []
        for r in range(args.rounds):  # alternate ours and the baseline: a shared machine's load hits both
            ours = run_measured(cmd)
            res = json.loads(ours["stdout"])
            meta = json.loads((work / "ours" / "meta.json").read_text())
            shutil.rmtree(work / "ours")
            row = {"ours_s": round(ours["wall_s"], 1), "ours_peak_rss_mb": round(ours["peak_tree_rss_mb"], 1),
                   "ours_max_process_rss_mb": ours["max_process_rss_mb"]
                   and round(ours["max_process_rss_mb"], 1),
                   "ours_workers": meta["settings"]["workers"],
                   "ours_tokens": res["train_tokens"] + res["val_tokens"]}
            say(f"round {r + 1} ours: {row['ours_s']} s, {mb / ours['wall_s']:.2f} MB/s, peak RSS "
                f"{row['ours_peak_rss_mb']} MB ({row['ours_workers']} workers)")
            if not args.skip_baseline:
                base = run_measured(base_cmd)
                shutil.rmtree(work / "hf_cache", ignore_errors=True)
                (work / "baseline.bin").unlink()
                row.update(baseline_s=round(base["wall_s"], 1),
                           baseline_peak_rss_mb=round(base["peak_tree_rss_mb"], 1),
                           baseline_tokens=json.loads(base["stdout"].strip().splitlines()[-1])["tokens"])
                say(f"round {r + 1} baseline: {row['baseline_s']} s, {mb / base['wall_s']:.2f} MB/s, "
                    f"peak RSS {row['baseline_peak_rss_mb']} MB; "
                    f"ratio {base['wall_s'] / ours['wall_s']:.2f}x")
            rounds.append(row)

        def med(key: str) -> float:
            vals = sorted(r[key] for r in rounds)
            return (vals[len(vals) // 2] if len(vals) % 2
                    else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2)

        result = {"size_mb": round(mb, 1), "documents": n_docs, "rounds": len(rounds),
                  "ours_mb_s": round(mb / med("ours_s"), 2), "baseline_mb_s": None, "ratio": None,
                  "ours_peak_rss_mb": max(r["ours_peak_rss_mb"] for r in rounds),
                  "ours_workers": rounds[0]["ours_workers"], "ours_tokens": rounds[0]["ours_tokens"]}
        if not args.skip_baseline:
            result.update(baseline_mb_s=round(mb / med("baseline_s"), 2),
                          baseline_tokens=rounds[0]["baseline_tokens"],
                          baseline_peak_rss_mb=max(r["baseline_peak_rss_mb"] for r in rounds))
            result["ratio"] = round(result["ours_mb_s"] / result["baseline_mb_s"], 2)
            result["ratio_per_round"] = [round(r["baseline_s"] / r["ours_s"], 2) for r in rounds]
        result["per_round"] = rounds
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
