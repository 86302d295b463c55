"""Personal-data detectors (pretrain/data/pii.py) on WikiText-2: matches per type, every matched string with
its context (WikiText-2 is Wikipedia: essentially no real personal data, so nearly every match is a false
positive a human can judge), throughput, and the recall / false positives on the planted set of
tests/test_pii.py.

Text: the WikiText-2 raw files found in ../shared/data/wikitext2 (wiki.{train,valid,test}.raw), as they are
("raw": numbers tokenised as ``1 @,@ 000``, ``3 @.@ 5``, ``1990 @-@ 2000``) and detokenised (``@,@`` →
``,``, ``@.@`` → ``.``, ``@-@`` → ``-``, spaces removed: ``1,000``, ``3.5``, ``1990-2000``, the form
ordinary text has). MB/s: MB (10^6 bytes of UTF-8) of text per second of ``pii.count`` (find only) and
``pii.redact`` (find and replace) on one core, best of ``--rounds``, over the whole text as one string.

    python bench/pii.py            # add --json for one JSON object
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pretrain.data import pii  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "wikitext2"


def detokenize(text: str) -> str:
    return re.sub(r" @([-,.])@ ", r"\1", text)


def matches(text: str, context: int = 30) -> list[dict]:
    out = []
    for kind, a, b in pii.find_pii(text):
        out.append({"type": kind, "match": text[a:b],
                    "context": text[max(0, a - context):b + context].replace("\n", " ")})
    return out


def throughput(fn, text: str, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - t0)
    return len(text.encode("utf-8")) / 1e6 / best


def planted() -> dict:
    from test_pii import ORDINARY, PLANTED, _contexts

    found = total = 0
    missed = []
    for kind, items in PLANTED.items():
        for s in items:
            for text in _contexts(s):
                total += 1
                start = text.index(s)
                if pii.find_pii(text) == [(kind, start, start + len(s))]:
                    found += 1
                else:
                    missed.append(text)
    flagged = [t for s in ORDINARY for t in _contexts(s) if pii.find_pii(t)]
    return {"planted_items": sum(map(len, PLANTED.values())), "planted_texts": total, "found": found,
            "recall": found / total, "missed": missed, "ordinary_items": len(ORDINARY),
            "ordinary_texts": len(ORDINARY) * len(_contexts("x")), "ordinary_flagged": flagged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    files = [f for f in (SHARED / f"wiki.{s}.raw" for s in ("train", "valid", "test")) if f.exists()]
    raw = "".join(f.read_text(encoding="utf-8") for f in files)
    res: dict = {"files": [f.name for f in files], "planted": planted()}
    for name, text in (("raw", raw), ("detokenized", detokenize(raw))):
        found = matches(text)
        res[name] = {"mb": len(text.encode("utf-8")) / 1e6,
                     "matches": {t: sum(m["type"] == t for m in found) for t in pii.TYPES},
                     "found": found,
                     "count_mb_s": throughput(pii.count, text, args.rounds),
                     "redact_mb_s": throughput(pii.redact, text, args.rounds)}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    p = res["planted"]
    print(f"planted: {p['found']}/{p['planted_texts']} found ({p['recall']:.1%}; {p['planted_items']} items "
          f"in {p['planted_texts'] // p['planted_items']} contexts each); ordinary numbers flagged: "
          f"{len(p['ordinary_flagged'])}/{p['ordinary_texts']}")
    for t in p["missed"] + p["ordinary_flagged"]:
        print(f"  {t!r}")
    for name in ("raw", "detokenized"):
        r = res[name]
        print(f"\nWikiText-2 {name} ({', '.join(res['files'])}; {r['mb']:.2f} MB): "
              + ", ".join(f"{t} {n}" for t, n in r["matches"].items())
              + f"; find {r['count_mb_s']:.1f} MB/s, redact {r['redact_mb_s']:.1f} MB/s")
        for m in r["found"]:
            print(f"  {m['type']:<11} {m['match']!r:<32} …{m['context']}…")


if __name__ == "__main__":
    main()
