"""`pretrain data inspect`: what a prepared folder holds (its sources and their licence, token counts,
samples)."""

from __future__ import annotations

import json

from _corpus import sentences

from pretrain.cli import main


def test_data_inspect_and_licence(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(" ".join(sentences(40, seed=3)))
    (tmp_path / "b.txt").write_text(" ".join(sentences(40, seed=4)))
    assert main(["prepare", str(tmp_path / "*.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "char",
                 "--licence", "CC-BY-4.0", "--val-fraction", "0.5"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "d"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert all(s["licence"] == "CC-BY-4.0" for s in res["sources"])
    train = res["splits"]["train"]
    assert train["top_tokens"][0]["token"] == " " and train["distinct_tokens"] > 20
    assert sum(t["count"] for t in train["top_tokens"]) <= train["tokens"]
    assert len(train["samples"]) == 3 and all(isinstance(s, str) and s for s in train["samples"])
    assert main(["data", "inspect", str(tmp_path / "d")]) == 0
    assert "most frequent" in capsys.readouterr().out
