"""The bias probe: shared-token scoring, the CrowS-Pairs reading rules, and the planted-bias experiment — two
corpora identical except that in one a made-up group always co-occurs with a made-up stereotype word; the
probe must find the planted preference (interval above 50) and not find one in the balanced corpus.

"Not find one" is tested so that a sound instrument cannot fail it by chance: a balanced model's preferences
are coin flips (its margins are ~1000x smaller than the biased model's), so a 95% interval excludes 50 in one
run in twenty — on another CPU's numerics it did (9 of 30). The test asks instead that the balanced score
pass a sign test at the 0.1% level and that its mean margin be a small fraction of the biased one's; the
95%-interval figures over seeds are bench/bias.py's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pretrain import PretrainError
from pretrain.bias import PLANTED_TRAIN, bootstrap_ci, planted_experiment, read_pairs, shared_positions
from pretrain.cli import main

N_PAIRS = 30


def test_shared_positions_skip_the_changed_words():
    a = [5, 6, 7, 8, 9]
    b = [5, 6, 70, 71, 8, 9]
    pa, pb = shared_positions(a, b)
    assert [a[i] for i in pa] == [b[i] for i in pb] == [5, 6, 8, 9]


def test_antistereo_pairs_swap_which_sentence_is_stereotyping(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n"
                 "A x,B x,stereo,age\nC y,D y,antistereo,age\n")
    got = read_pairs(p)
    assert [(x.stereo, x.other) for x in got] == [("A x", "B x"), ("D y", "C y")]
    p.write_text("sent_more,sent_less,bias_type\nA,B,age\n")
    with pytest.raises(PretrainError, match="no column 'stereo_antistereo'; columns present: sent_more"):
        read_pairs(p)


def test_bootstrap_interval():
    assert bootstrap_ci(np.ones(20)) == [1.0, 1.0]
    lo, hi = bootstrap_ci(np.r_[np.ones(50), np.zeros(50)])
    assert lo < 0.5 < hi and hi - lo < 0.25


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    texts = planted_experiment(N_PAIRS)
    (root / "pairs.csv").write_text(texts["pairs"])
    runs = {}
    for name in ("biased", "balanced"):
        (root / f"{name}.txt").write_text(texts[name])
        assert main(["prepare", str(root / f"{name}.txt"), "--out", str(root / f"data_{name}"),
                     "--tokenizer", "wordpiece", "--vocab-size", "400", "--text-unit", "paragraph",
                     "--val-fraction", "0.05"]) == 0
        run = root / f"run_{name}"
        assert main(["train", "--out", str(run), "--data.path", str(root / f"data_{name}"), *PLANTED_TRAIN,
                     "--quiet"]) == 0
        runs[name] = run
    return root, runs


def test_the_probe_finds_a_planted_bias_and_not_a_balanced_one(planted, capsys):
    root, runs = planted
    capsys.readouterr()
    assert main(["bias", str(runs["biased"]), "--data", str(root / "pairs.csv"), "--compare",
                 str(runs["balanced"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    biased, balanced = (r["overall"] for r in res["reports"])
    assert biased["n"] == balanced["n"] == N_PAIRS
    assert biased["ci95"][0] > 50  # significantly prefers the planted stereotype
    # no preference: a sign test at the 0.1% level, and margins a sliver of the planted one's
    k = round(balanced["score"] * N_PAIRS / 100)
    tail = sum(math.comb(N_PAIRS, i) for i in range(min(k, N_PAIRS - k) + 1)) / 2 ** N_PAIRS
    assert 2 * tail > 0.001, balanced
    margins = [r["mean_margin"] for r in res["reports"]]
    assert margins[0] > 1.0 and abs(margins[1]) < 0.05 * margins[0], margins
    assert res["difference"]["ci95"][0] > 0
    assert set(res["reports"][0]["by_type"]) == {"planted"}
    assert "Blodgett" in res["reports"][0]["caveat"]
    saved = json.loads((runs["biased"] / "bias" / "crows-pairs.json").read_text())
    assert saved["overall"] == biased
    assert (runs["biased"] / "bias" / "crows-pairs.png").stat().st_size > 1000
    # the export's model card carries the run's last bias report
    out = root / "hf_biased"
    assert main(["export", str(runs["biased"]), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Bias (CrowS-Pairs)" in card and "**100.0%** of 30 pairs" in card
    assert "| planted | 100.0 |" in card and "Blodgett" in card


def test_weat_on_the_planted_runs(planted, capsys):
    """WEAT through the CLI on the planted runs: the report, saved, in the model card, and the suites' options
    kept apart. Not asserted: that WEAT finds the planted association — on these masked LMs it did with
    d = +1.1 to +1.9 in three seeds on one thread, but gave d = -0.53 on two threads (docs/responsible.md:
    the direction a contextual model's geometry takes is not fixed). The statistic itself is tested on
    constructed vectors in tests/test_weat.py."""
    root, runs = planted
    (root / "words.json").write_text(planted_experiment(N_PAIRS)["weat"])
    res = {}
    for name, run in runs.items():
        capsys.readouterr()
        assert main(["bias", str(run), "--suite", "weat", "--words", str(root / "words.json"),
                     "--permutations", "4000", "--json"]) == 0
        res[name] = json.loads(capsys.readouterr().out)
        assert res[name]["p_method"] == "sampled" and res[name]["targets"][0]["size"] == N_PAIRS
    for r in res.values():
        assert -2 <= r["effect_size"] <= 2 and 0 < r["p_value"] <= 1 and r["words_with_unknown_tokens"] == []
        assert set(r["associations"]["stereotyped"]) | set(r["associations"]["other"]) == {
            w for ws in json.loads((root / "words.json").read_text())["targets"].values() for w in ws}
    saved = json.loads((runs["biased"] / "bias" / "weat.json").read_text())
    assert saved["effect_size"] == res["biased"]["effect_size"]
    out = root / "hf_weat"
    assert main(["export", str(runs["biased"]), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Word associations (WEAT)" in card and f"**{res['biased']['effect_size']:+.3f}**" in card
    # the suites' options do not mix
    assert main(["bias", str(runs["biased"]), "--suite", "weat", "--data", str(root / "pairs.csv")]) == 2
    assert "--data: for --suite crows-pairs only" in capsys.readouterr().err
    assert main(["bias", str(runs["biased"]), "--suite", "weat"]) == 2
    assert "needs --words" in capsys.readouterr().err
    assert main(["bias", str(runs["biased"]), "--data", str(root / "pairs.csv"), "--pooling", "cls"]) == 2
    assert "--pooling: for --suite weat only" in capsys.readouterr().err


def test_bias_errors(planted, tmp_path, capsys):
    root, runs = planted
    mine = tmp_path / "mine.png"  # a file the command did not write is kept
    mine.write_bytes(b"not a plot")
    assert main(["bias", str(runs["biased"]), "--data", str(root / "pairs.csv"), "--png", str(mine)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and mine.read_bytes() == b"not a plot"
    assert main(["bias", str(runs["biased"]), "--data", str(tmp_path / "missing.csv")]) == 2
    assert "bias data not found" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("sent_more,sent_less,stereo_antistereo,bias_type\na,b,both,age\n")
    assert main(["bias", str(runs["biased"]), "--data", str(tmp_path / "bad.csv")]) == 2
    assert "row 1: stereo_antistereo is 'both'" in capsys.readouterr().err
