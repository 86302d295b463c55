"""Pieces the prepare benchmarks share: the shared data's documents, and the memory of a process tree."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path


def shared_documents(data: Path) -> list[str]:
    """The documents of the shared data, one per paragraph / article / story / review / sentence (OSError if
    a file is missing)."""
    docs: list[str] = []
    text = (data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs += [p for p in text.split("\n\n") if p.strip()]
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        text = (data / "wikitext2" / name).read_text(encoding="utf-8")
        docs += [a for a in re.split(r"\n(?= = [^=].* = \n)", text) if a.strip()]
    for name in ("tinystories_train_sample.txt", "tinystories_valid_sample.txt"):
        text = (data / "tinystories" / name).read_text(encoding="utf-8")
        docs += [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    for name in ("train.csv", "test.csv"):
        with open(data / "imdb" / name, encoding="utf-8", newline="") as f:
            docs += [row["text"] for row in csv.DictReader(f)]
    with open(data / "sst2" / "train.tsv", encoding="utf-8", newline="") as f:
        docs += [row["sentence"] for row in csv.DictReader(f, delimiter="\t") if row["sentence"].strip()]
    return docs


def tree_rss_kb(root: int) -> tuple[int, int, int]:
    """(summed VmRSS of ``root`` and all its descendants, the largest VmHWM (a process's own peak) among
    them, number of processes)."""
    parent: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        cur = frontier.pop()
        for pid, pp in parent.items():
            if pp == cur and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    total = hwm = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except OSError:
            pass
    return total, hwm, len(tree)
