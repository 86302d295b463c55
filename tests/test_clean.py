"""Cleaning: near-duplicates found with high recall and few false positives, decontamination, counted
filters, and clear errors when nothing is left."""

from __future__ import annotations

import json
import random

import pytest
from _corpus import WORDS, sentences

from pretrain.cli import main
from pretrain.data.clean import CleanConfig, Cleaner
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError


def _edit(doc: str, n: int, rng: random.Random) -> str:
    words = doc.split()
    for i in rng.sample(range(len(words)), n):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def test_near_duplicates_recall_and_precision():
    rng = random.Random(0)
    distinct = [" ".join(sentences(20, seed=1000 + i)) for i in range(300)]  # ~190 words each
    copies = [_edit(distinct[i], 3, rng) for i in rng.sample(range(300), 60)]  # a few words edited
    docs = distinct + copies
    rng.shuffle(docs)
    copy_set = set(copies)
    first_seen: set[str] = set()
    cleaner = Cleaner(CleanConfig(near_dup_threshold=0.7))
    removed_copies = removed_distinct = 0
    for d in docs:
        if not cleaner.keep(d):
            if d in copy_set and d not in first_seen:
                removed_copies += 1
            else:
                removed_distinct += 1
        first_seen.add(d)
    # a copy that comes before its original is kept and the original is removed instead: count pairs
    pairs_caught = removed_copies + removed_distinct
    assert pairs_caught >= 0.9 * len(copies), (removed_copies, removed_distinct)
    assert cleaner.stats["near_duplicate"]["documents"] == pairs_caught
    assert pairs_caught - len(copies) < 0.01 * len(distinct)  # fewer than 1% of distinct documents lost


def test_documents_without_words_are_not_near_duplicates_of_each_other():
    cleaner = Cleaner(CleanConfig(near_dup_threshold=0.7))
    docs = ["!!!", "...", "🙂🙂", "---", "🙂🙂"]
    assert [cleaner.keep(d) for d in docs] == [True, True, True, True, True]  # (exact dedup is off)
    cleaner = Cleaner(CleanConfig(near_dup_threshold=0.7, dedup_exact=True))
    assert [cleaner.keep(d) for d in docs] == [True, True, True, True, False]


def test_decontamination_removes_documents_with_test_sentences(tmp_path):
    test_sents = [" ".join(sentences(2, seed=900 + i)) for i in range(5)]  # 10+ words each
    (tmp_path / "eval.txt").write_text("\n".join(test_sents) + "\n")
    docs = [" ".join(sentences(8, seed=i)) for i in range(50)]
    leaked = {3, 17, 29, 41, 44}
    for k, i in enumerate(sorted(leaked)):
        docs[i] = docs[i] + " " + test_sents[k] + " " + " ".join(sentences(2, seed=500 + i))
    cleaner = Cleaner(CleanConfig(decontaminate=[str(tmp_path / "eval.txt")], ngram=13))
    dropped = {i for i, d in enumerate(docs) if not cleaner.keep(d)}
    assert dropped == leaked
    assert cleaner.report()["removed"]["contaminated"]["documents"] == 5
    # a JSONL evaluation set: the fields named, each of them (question and answer)
    rows = [{"question": test_sents[k], "answer": "x"} if k % 2
            else {"question": "q?", "answer": test_sents[k]} for k in range(5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="no field 'text'.*choose one with --decontaminate-field"):
        Cleaner(CleanConfig(decontaminate=[str(tmp_path / "eval.jsonl")]))
    cleaner = Cleaner(CleanConfig(decontaminate=[str(tmp_path / "eval.jsonl")],
                                  decontaminate_fields=["question", "answer"]))
    assert {i for i, d in enumerate(docs) if not cleaner.keep(d)} == leaked


def test_filters_and_report_through_prepare(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    base = " ".join(sentences(12, seed=1))
    files = {"a.txt": base, "b.txt": base, "c.txt": "short", "d.txt": "#$%&*@! " * 40,
             "e.txt": "same line\n" * 30, "f.txt": " ".join(sentences(12, seed=2)),
             "g.txt": "caf\u0065\u0301 " + base[:300]}
    for name, text in files.items():
        (corpus / name).write_text(text)
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", "byte", "--dedup",
                 "--min-chars", "20", "--max-symbol-ratio", "0.5", "--max-repeated-line-ratio", "0.5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == {"min_chars": 1, "symbol_ratio": 1, "repeated_lines": 1, "exact_duplicate": 1}
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    rep = meta["cleaning"]
    assert (rep["kept"]["documents"] == 3
            == meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"])
    assert rep["removed"]["min_chars"]["examples"] == ["short"]
    assert sum(v["exact_duplicate"] for v in rep["per_source"].values()) == 1
    assert any(name.endswith("b.txt") and v["exact_duplicate"] == 1 for name, v in rep["per_source"].items())


def test_nfc_normalisation_applies_to_the_tokens(tmp_path):
    from pretrain.data.tokenizer import Tokenizer

    (tmp_path / "x.txt").write_text("cafe\u0301 " * 50)
    prepare([str(tmp_path / "x.txt")], tmp_path / "d", tokenizer="char", log=lambda *a: None)
    assert "\u0301" not in Tokenizer.load(tmp_path / "d").tk.get_vocab()  # é composed into one character


def test_nothing_left_after_cleaning(tmp_path):
    (tmp_path / "x.txt").write_text("tiny")
    with pytest.raises(DataError, match="no documents left after cleaning"):
        prepare([str(tmp_path / "x.txt")], tmp_path / "d", tokenizer="byte", clean=CleanConfig(min_chars=100),
                log=lambda *a: None)
