"""`pretrain data audit`: every source with its licence (unknown ones flagged), sha256, bytes and tokens
(which add up to the splits' totals on every path of prepare), what cleaning, dedup, decontamination and the
PII check removed; image and interaction directories; clear errors; the export's model card carries the
table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _corpus import sentences
from conftest import quiet

from pretrain import PretrainError
from pretrain.cli import main
from pretrain.data.audit import OLDER, audit
from pretrain.data.clean import CleanConfig
from pretrain.data.prepare import prepare

EMAIL = "Write to jane.roe@example.com or call +44 20 7946 0958 today."


def _corpus(root):
    """Three text files, a JSONL file with an exact duplicate, a document with personal data and one that
    overlaps the evaluation file; the evaluation file."""
    (root / "c").mkdir(parents=True)
    for i in range(3):
        (root / "c" / f"a{i}.txt").write_text(" ".join(sentences(30, seed=i)) + "\n")
    docs = [" ".join(sentences(6, seed=10 + i)) for i in range(8)]
    docs += [docs[0], EMAIL + " " + " ".join(sentences(4, seed=50))]
    (root / "c" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "eval.txt").write_text(docs[3])
    return root / "c"


@pytest.mark.parametrize("tokenizer,workers,long_chars", [("byte", 0, None), ("byte", 2, None),
                                                          ("char", 0, None), ("char", 2, None),
                                                          ("byte", 0, 500), ("char", 2, 500)])
def test_tokens_per_source_add_up_to_the_splits(tmp_path, monkeypatch, tokenizer, workers, long_chars):
    """Tokens are counted per source in the scan (a tokenizer known upfront) and in the encode pass (a
    trained one), in process and in workers, whole documents and long ones in pieces."""
    from pretrain.data import prepare as prep

    if long_chars:
        monkeypatch.setattr(prep, "LONG_DOC_CHARS", long_chars)
        monkeypatch.setattr(prep, "SLICE_CHARS", 90)
    corpus = _corpus(tmp_path)
    meta = prepare([str(corpus)], tmp_path / "d", tokenizer=tokenizer, val_fraction=0.3, log=quiet,
                   workers=workers, batch_chars=500,
                   clean=CleanConfig(dedup_exact=True, pii="redact",
                                     decontaminate=[str(tmp_path / "eval.txt")]))
    for sp in ("train", "val"):
        assert sum(s["tokens"][sp] for s in meta["sources"]) == meta["splits"][sp]["tokens"] > 0
    rep = audit(tmp_path / "d")
    assert [r["tokens"] for r in rep["sources"]] == [s["tokens"] for s in meta["sources"]]
    assert rep["totals"]["tokens"] == {sp: meta["splits"][sp]["tokens"] for sp in ("train", "val")}


def test_mixture_tokens_per_source(tmp_path):
    corpus = _corpus(tmp_path)
    meta = prepare([f"{corpus}/a*.txt::1", f"{corpus}/b.jsonl::3"], tmp_path / "d", tokenizer="byte",
                   val_fraction=0.2, log=quiet, workers=0)
    for m in meta["mixture"]:  # each input's sources add up to its tokens
        members = [s for s in meta["sources"] if s["group"] == m["group"]]
        assert {sp: sum(s["tokens"][sp] for s in members) for sp in ("train", "val")} == m["tokens"]
    rep = audit(tmp_path / "d")
    assert [m["share"] for m in rep["mixture"]] == [0.25, 0.75]
    assert all(r["weight"] in (1, 3) for r in rep["sources"])


def test_audit_cli_licence_cleaning_and_pii(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    common = ["--tokenizer", "byte", "--val-fraction", "0.3", "--workers", "0"]
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "d"), *common, "--licence", "CC-BY-4.0",
                 "--dedup", "--pii", "redact", "--decontaminate", str(tmp_path / "eval.txt")]) == 0
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "nolicence"), *common]) == 0
    capsys.readouterr()

    assert main(["data", "audit", str(tmp_path / "d"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"data_dir", "kind", "unit", "sources", "splits", "cleaning", "totals", "flags",
                        "notes"}
    assert rep["kind"] == "text" and rep["unit"] == "tokens" and rep["flags"] == [] and rep["notes"] == []
    assert [r["source"] for r in rep["sources"]] == ["a0.txt", "a1.txt", "a2.txt", "b.jsonl"]
    for r in rep["sources"]:
        assert r["licence"] == "CC-BY-4.0" and r["licence_recorded"] and len(r["sha256"]) == 64
        assert r["bytes"] == (corpus / r["source"]).stat().st_size
        assert set(r["tokens"]) == {"train", "val"}
    b = rep["sources"][3]
    assert b["documents"] == 10 and b["kept"] == 8
    assert b["removed"] == {"exact_duplicate": 1, "contaminated": 1}
    assert b["pii"] == {"documents": 1, "matches": {"email": 1, "phone": 1}}
    assert rep["sources"][0]["removed"] == {} and rep["sources"][0]["pii"]["documents"] == 0
    c = rep["cleaning"]
    assert c["settings"]["dedup_exact"] and c["settings"]["pii"] == "redact"
    assert c["settings"]["decontaminate"] == [str(tmp_path / "eval.txt")]
    assert {k: v["documents"] for k, v in c["removed"].items()} == {"exact_duplicate": 1, "contaminated": 1}
    assert c["pii"]["mode"] == "redact" and c["pii"]["documents"] == 1
    assert rep["totals"]["licences"] == ["CC-BY-4.0"] and rep["totals"]["documents"] == 13

    assert main(["data", "audit", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "b.jsonl" in out and "exact_duplicate 1, contaminated 1" in out and "email 1, phone 1" in out
    assert "exact dedup on" in out and "decontaminated against" in out and "warning" not in out

    # no --licence: every source "unknown", flagged in the JSON and warned about in the text
    assert main(["data", "audit", str(tmp_path / "nolicence"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert all(r["licence"] == "unknown" and not r["licence_recorded"] for r in rep["sources"])
    (flag,) = rep["flags"]
    assert flag["flag"] == "licence_unknown" and flag["sources"] == ["a0.txt", "a1.txt", "a2.txt", "b.jsonl"]
    assert "pii" not in rep["cleaning"] and rep["cleaning"]["settings"]["pii"] == ""
    assert main(["data", "audit", str(tmp_path / "nolicence")]) == 0
    out = capsys.readouterr().out
    assert "unknown (!)" in out and "warning: 4 of 4 sources have no recorded licence" in out
    assert "personal data not checked" in out


def test_audit_errors_and_older_manifests(tmp_path, capsys):
    assert main(["data", "audit", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["data", "audit", str(tmp_path / "missing")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{ not json")
    assert main(["data", "audit", str(tmp_path / "bad")]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(PretrainError, match="not a prepared data directory"):
        audit(tmp_path)

    # a directory prepared before per-source tokens and cleaning settings were recorded
    corpus = _corpus(tmp_path)
    prepare([str(corpus)], tmp_path / "d", tokenizer="byte", log=quiet, workers=0)
    p = tmp_path / "d" / "meta.json"
    meta = json.loads(p.read_text())
    for s in meta["sources"]:
        del s["tokens"]
    del meta["cleaning"]["settings"]
    p.write_text(json.dumps(meta))
    rep = audit(tmp_path / "d")
    assert all(r["tokens"] is None for r in rep["sources"]) and len(rep["notes"]) == 2
    assert main(["data", "audit", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "not recorded" in out and OLDER in out


def test_audit_images_and_interactions(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", x_train=rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
             y_train=np.arange(12) % 2)
    assert main(["prepare", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "im"), "--workers", "0",
                 "--licence", "CC0"]) == 0
    (tmp_path / "log.csv").write_text("user,item,ts\n" + "".join(f"u{u},i{(u + k) % 5},{k}\n"
                                                                 for u in range(4) for k in range(4)))
    assert main(["prepare", str(tmp_path / "log.csv"), "--interactions", "--user-column", "user",
                 "--item-column", "item", "--time-column", "ts", "--out", str(tmp_path / "rec")]) == 0
    capsys.readouterr()

    assert main(["data", "audit", str(tmp_path / "im"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "images" and rep["unit"] == "images" and rep["flags"] == []
    (src,) = rep["sources"]
    assert src["licence"] == "CC0" and src["images"] == 12 and len(src["sha256"]) == 64
    assert sum(v["images"] for v in rep["splits"].values()) == 12
    assert main(["data", "audit", str(tmp_path / "im")]) == 0
    assert "unit per source: images" in capsys.readouterr().out

    assert main(["data", "audit", str(tmp_path / "rec"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "interactions" and rep["unit"] == "rows"
    (src,) = rep["sources"]
    assert src["rows"] == 16 and src["content"] == "interactions" and src["licence"] == "unknown"
    assert rep["flags"][0]["flag"] == "licence_unknown" and rep["totals"]["rows"] == 16
    assert rep["cleaning"]["users"] == 4
    assert main(["data", "audit", str(tmp_path / "rec")]) == 0
    out = capsys.readouterr().out
    assert "log.csv" in out and "unit per source: rows" in out and "min_user_items" in out


def test_model_card_carries_the_audit_table(tmp_path, capsys):
    import shutil

    from _corpus import TINY_TRAIN, overrides

    corpus = _corpus(tmp_path)
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", "byte",
                 "--val-fraction", "0.3", "--workers", "0", "--licence", "MIT", "--dedup",
                 "--pii", "report"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), "--data.path", str(tmp_path / "d"),
                 "--train.max_steps", "2", "--train.warmup_steps", "0", "--quiet"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    section = card.split("## Training data", 1)[1].split("\n## ", 1)[0]
    assert "| source | licence | sha256 | bytes | documents | tokens (train / val) |" in section
    rep = audit(tmp_path / "d")
    for r in rep["sources"]:
        tok = " / ".join(f"{r['tokens'][sp]:,}" for sp in ("train", "val"))
        assert f"| {r['source']} | MIT | {r['sha256'][:12]} | {r['bytes']:,} | {r['documents']} | {tok} |" \
            in section
    assert "exact_duplicate 1" in section and "email 1, phone 1" in section and "exact dedup on" in section
    # the data directory gone: the card says so
    shutil.rmtree(tmp_path / "d")
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "was not available at export time" in card.split("## Training data", 1)[1]
