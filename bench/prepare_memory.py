"""Peak memory of `pretrain prepare` on a huge single-line document and on a large corpus of ordinary ones.

Two inputs, generated in a temporary directory (deleted at the end):

* single line: one ``.txt`` file of ``--single-mb`` MB (default 100) holding one line — the text of
  ../shared/data (Tiny Shakespeare, WikiText-2, TinyStories, IMDB reviews, SST-2 sentences) with every run
  of whitespace made one space, repeated to the size asked (synthetic English-like words if the shared data
  is missing). One document: prepare cuts it at its text tail (the last 10% is validation).
* documents: ``--docs-mb`` MB (default 1000) of the same texts as ordinary documents (one per paragraph,
  article, story, review or sentence), repeated, in JSONL files of ~64 MB.

Each is prepared by ``python -m pretrain.cli prepare INPUT --out OUT --tokenizer T --json`` in a subprocess
(default tokenizer ``bpe``, trained on the input, as the CLI's default; prepare's own worker default: one
process per CPU for inputs of 32 MB and more). Reported per input: wall time of the subprocess, and peak
memory two ways:

* ``peak_tree_rss_mb``: the resident memory (VmRSS) of the prepare process and all its worker processes,
  **summed**, polled from /proc every 0.1 s — an upper bound of what the tree holds (forked workers share
  pages, counted once per process here), and what the targets are checked against;
* ``max_process_rss_mb``: the largest single process's own peak (VmHWM, kept by the kernel; polled too, so
  a worker's last 0.1 s may be missed).

MB = 10^6 bytes of text for sizes, 2^20 bytes for memory (as /proc counts). Targets: < 2 GB
(2048 MB) for the 100 MB single line, < 1 GB (1024 MB) for 1 GB of ordinary documents.

    python bench/prepare_memory.py --json                        # 100 MB single line + 1 GB of documents
    python bench/prepare_memory.py --single-mb 20 --docs-mb 0    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _shared import shared_documents, tree_rss_kb

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FILE_MB = 64
TARGETS_MB = {"single_line": 2048, "documents": 1024}


def synthetic_documents(n: int = 20_000, seed: int = 0) -> list[str]:
    """English-like documents from a fixed word list (when ../shared/data is not there)."""
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at "
             "which but have an they you were her she there been one all we their has would when if so no "
             "will more time can out up into only about like other could some king queen river stone light "
             "night morning garden window letter").split()
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(2, 12)):
            s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
            sents.append(s[0].upper() + s[1:] + rng.choice(".!?"))
        docs.append(" ".join(sents))
    return docs


def _repeat(docs: list[str], target_bytes: int) -> Iterator[str]:
    size = i = 0
    while size < target_bytes:
        d = docs[i % len(docs)]
        size += len(d.encode("utf-8"))
        i += 1
        yield d


def build_single_line(path: Path, docs: list[str], size_mb: float) -> int:
    """One line of about ``size_mb`` MB (exactly that many bytes, cut at a character) → its size in bytes."""
    target = int(size_mb * 1e6)
    flat = [re.sub(r"\s+", " ", d).strip() + " " for d in docs]
    written = 0
    with open(path, "wb") as f:
        for d in _repeat(flat, target):
            b = d.encode("utf-8")
            if written + len(b) > target:
                b = b[:target - written].decode("utf-8", "ignore").encode("utf-8")
            f.write(b)
            written += len(b)
    return written


def build_documents(work: Path, docs: list[str], size_mb: float) -> tuple[list[Path], int, int]:
    """JSONL files holding ``docs`` repeated to ``size_mb`` MB of text → (files, text bytes, documents)."""
    files: list[Path] = []
    text_bytes = n = 0
    f = None
    for d in _repeat(docs, int(size_mb * 1e6)):
        if f is None or f.tell() >= FILE_MB * 1e6:
            if f is not None:
                f.close()
            files.append(work / f"docs_{len(files):04d}.jsonl")
            f = open(files[-1], "wb")
        f.write((json.dumps({"text": d}) + "\n").encode())
        text_bytes += len(d.encode("utf-8"))
        n += 1
    if f is not None:
        f.close()
    return files, text_bytes, n


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``: wall time, peak summed RSS of its process tree and the largest process's own peak (VmHWM),
    both polled every 0.1 s, and the most processes seen at once."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = hwm = procs = 0
    while proc.poll() is None:
        rss, h, n = tree_rss_kb(proc.pid)
        peak, hwm, procs = max(peak, rss), max(hwm, h), max(procs, n)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_tree_rss_mb": round(peak / 1024, 1), "processes": procs,
            "max_process_rss_mb": round(hwm / 1024, 1), "stdout": out, "stderr": err}


def prepare_measured(name: str, inputs: list[Path], out: Path, args: argparse.Namespace,
                     text_bytes: int, documents: int) -> dict:
    cmd = [sys.executable, "-m", "pretrain.cli", "prepare", *map(str, inputs), "--out", str(out),
           "--tokenizer", args.tokenizer, "--vocab-size", str(args.vocab_size), "--json"]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    r = run_measured(cmd)
    res = json.loads(r["stdout"])
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    return {"size_mb": round(text_bytes / 1e6, 1), "documents": documents, "tokenizer": args.tokenizer,
            "workers": meta["settings"]["workers"], "wall_s": r["wall_s"],
            "mb_s": round(text_bytes / 1e6 / r["wall_s"], 2), "peak_tree_rss_mb": r["peak_tree_rss_mb"],
            "max_process_rss_mb": r["max_process_rss_mb"], "max_processes": r["processes"],
            "train_tokens": res["train_tokens"], "val_tokens": res["val_tokens"],
            "target_mb": TARGETS_MB[name], "target_met": r["peak_tree_rss_mb"] < TARGETS_MB[name]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--single-mb", type=float, default=100.0,
                    help="MB of the single-line document (default 100; 0: skip)")
    ap.add_argument("--docs-mb", type=float, default=1000.0,
                    help="MB of text in ordinary documents (default 1000; 0: skip)")
    ap.add_argument("--tokenizer", default="bpe", help="prepare's --tokenizer (default bpe)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="prepare's --vocab-size (default 8192)")
    ap.add_argument("--workers", type=int, default=None, help="prepare's --workers (default: its own)")
    ap.add_argument("--data", default=str(SHARED), help="the shared data folder (default ../shared/data)")
    ap.add_argument("--work", default=None, help="where to build the inputs (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        docs = shared_documents(Path(args.data))
    except OSError:  # no shared data here: synthetic text instead
        docs = []
    source = "shared" if docs else "synthetic"
    docs = docs or synthetic_documents()
    result: dict = {"text": source, "cpus": os.cpu_count(),
                    "peak_tree_rss": "summed over the prepare process and its workers (polled every 0.1 s)"}
    work = Path(tempfile.mkdtemp(prefix="prepare_memory_", dir=args.work))
    try:
        if args.single_mb > 0:
            path = work / "single_line.txt"
            size = build_single_line(path, docs, args.single_mb)
            say(f"single line: {size / 1e6:,.1f} MB, one line ({source} text)")
            result["single_line"] = prepare_measured("single_line", [path], work / "out_1", args, size, 1)
            path.unlink()
            say(f"  {json.dumps(result['single_line'])}")
        if args.docs_mb > 0:
            files, text_bytes, n = build_documents(work, docs, args.docs_mb)
            say(f"documents: {text_bytes / 1e6:,.1f} MB of text, {n:,} documents in {len(files)} JSONL files")
            result["documents"] = prepare_measured("documents", files, work / "out_docs", args, text_bytes, n)
            say(f"  {json.dumps(result['documents'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name in ("single_line", "documents"):
            if name in result:
                r = result[name]
                print(f"{name}: {r['size_mb']:,} MB, {r['wall_s']} s, peak RSS {r['peak_tree_rss_mb']:,} MB "
                      f"(tree, summed; largest process {r['max_process_rss_mb']} MB), target "
                      f"< {r['target_mb']} MB: {'met' if r['target_met'] else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
