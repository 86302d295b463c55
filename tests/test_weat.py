"""WEAT (Caliskan et al., 2017): the statistic on constructed vectors (a known effect size, a calibrated
null, symmetry, exact and sampled p-values agreeing), the words file's checks, and one end-to-end test on
tiny trained runs (causal and masked)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _corpus import TINY_TRAIN, overrides, write_corpus

from pretrain import PretrainError
from pretrain.weat import format_weat, read_words, weat, weat_statistics


def _at(angles: list[float], dim: int = 4) -> np.ndarray:
    """Unit vectors at ``angles`` from e1 towards e2 (cos(w, e1) = cos θ, cos(w, e2) = sin θ)."""
    v = np.zeros((len(angles), dim))
    v[:, 0], v[:, 1] = np.cos(angles), np.sin(angles)
    return v


def test_clearly_associated_targets_give_the_analytic_effect_size():
    ax, ay = [0.05, 0.15, 0.25, 0.35, 0.45, 0.3], [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    A, B = _at([0.0, 0.0]), _at([math.pi / 2])  # A: e1 (twice: means are unchanged), B: e2
    s = np.array([math.cos(t) - math.sin(t) for t in ax + ay])  # s(w, A, B), by hand
    want = (s[:6].mean() - s[6:].mean()) / s.std(ddof=1)
    res = weat_statistics(_at(ax), _at(ay), A, B)
    assert res["effect_size"] == pytest.approx(want, abs=1e-9)
    assert res["statistic"] == pytest.approx(s[:6].sum() - s[6:].sum(), abs=1e-9)
    assert res["std_ddof"] == 1 and res["std_s"] == pytest.approx(s.std(ddof=1))
    # every s(x) exceeds every s(y): no partition beats the observed one
    assert res["p_method"] == "exact" and res["partitions"] == res["permutations"] == math.comb(12, 6)
    assert res["p_value"] == 0.0
    sampled = weat_statistics(_at(ax), _at(ay), A, B, permutations=500, seed=3)
    assert sampled["p_method"] == "sampled" and sampled["permutations"] == 500
    assert sampled["p_value"] == pytest.approx(1 / 501)  # the observed partition counted once more
    assert sampled["effect_size"] == res["effect_size"]


def test_targets_from_one_distribution_show_no_association():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    res = weat_statistics(rng.normal(size=(40, 16)), rng.normal(size=(40, 16)), A, B)
    assert res["p_method"] == "sampled" and res["permutations"] == 10_000
    assert abs(res["effect_size"]) < 0.6 and 0.05 < res["p_value"] < 0.95
    # calibrated: under the null, p < 0.05 about 5% of the time
    ps = [weat_statistics(rng.normal(size=(6, 8)), rng.normal(size=(6, 8)), A[:, :8], B[:, :8])["p_value"]
          for _ in range(200)]
    assert np.mean(np.array(ps) < 0.05) < 0.1
    assert 0.35 < np.mean(ps) < 0.65


def test_swapping_the_targets_negates_d_and_mirrors_p():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    X = rng.normal(size=(7, 12)) + 0.3 * A.mean(0)
    Y = rng.normal(size=(7, 12)) + 0.3 * B.mean(0)
    xy, yx = weat_statistics(X, Y, A, B), weat_statistics(Y, X, A, B)
    assert xy["effect_size"] == pytest.approx(-yx["effect_size"])
    assert xy["statistic"] == pytest.approx(-yx["statistic"])
    # exact, S symmetric about 0: P(S > s) + P(S > -s) = 1 - P(S = s), the observed partition alone
    assert xy["p_value"] + yx["p_value"] == pytest.approx(1 - 1 / math.comb(14, 7), abs=1e-12)
    # A and B swapped: the same
    ab = weat_statistics(X, Y, B, A)
    assert ab["effect_size"] == pytest.approx(-xy["effect_size"])


def test_exact_and_sampled_p_values_agree():
    rng = np.random.default_rng(2)
    A, B = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    X = rng.normal(size=(7, 10)) + 0.15 * A.mean(0)
    Y = rng.normal(size=(7, 10))
    exact = weat_statistics(X, Y, A, B)
    sampled = weat_statistics(X, Y, A, B, permutations=3000, seed=0)
    assert exact["p_method"] == "exact" and sampled["p_method"] == "sampled"
    assert 0.01 < exact["p_value"] < 0.99
    assert abs(exact["p_value"] - sampled["p_value"]) < 0.03
    assert weat_statistics(X, Y, A, B, permutations=3000, seed=0) == sampled  # seeded


def test_bad_vectors():
    v = np.ones((3, 4))
    with pytest.raises(PretrainError, match="same size"):
        weat_statistics(v, np.ones((4, 4)), v, v)
    with pytest.raises(PretrainError, match="same dimension"):
        weat_statistics(v, v, np.ones((3, 5)), v)
    with pytest.raises(PretrainError, match="zeros"):
        weat_statistics(v, np.zeros((3, 4)), v, v)
    assert weat_statistics(v, v, v, v)["effect_size"] is None  # every s(w) equal: d undefined


GOOD = {"targets": {"X": ["king", "lord"], "Y": ["queen", "river"]},
        "attributes": {"A": ["old", "dark"], "B": ["young", "green", "light"]}}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("targets"), "no 'targets' key"),
    (lambda d: d.pop("attributes"), "no 'attributes' key"),
    (lambda d: d["targets"].update(Z=["x"]), "exactly two sets, got 3"),
    (lambda d: d["attributes"].pop("B"), "exactly two sets, got 1"),
    (lambda d: d["attributes"].update(B=[]), "attributes.B is empty"),
    (lambda d: d["targets"]["X"].__setitem__(1, 3), r"targets.X\[1\] is 3, not a word"),
    (lambda d: d["targets"]["X"].__setitem__(1, " "), r"targets.X\[1\] is ' ', not a word"),
    (lambda d: d["targets"].update(X="king"), "must be a list of words"),
    (lambda d: d["targets"]["Y"].append("stone"), "same size .*'X' has 2 words, 'Y' 3"),
    (lambda d: d["attributes"]["B"].append("king"), "'king' is in two sets, targets.X and attributes.B"),
    (lambda d: d["attributes"]["B"].append("green"), "lists 'green' twice"),
    (lambda d: d.update(templates=["no slot"]), r"one \"{}\""),
    (lambda d: d.update(templates=[]), "non-empty list"),
    (lambda d: d.update(template=["This is {}."]), "unknown key.*'template'"),
])
def test_words_file_errors(tmp_path, change, message):
    d = json.loads(json.dumps(GOOD))
    change(d)
    p = tmp_path / "words.json"
    p.write_text(json.dumps(d))
    with pytest.raises(PretrainError, match=message):
        read_words(p)


def test_words_file_reads_and_refuses_non_json(tmp_path):
    p = tmp_path / "words.json"
    p.write_text(json.dumps({**GOOD, "templates": ["This is {}.", "{} is here."]}))
    got = read_words(p)
    assert got["targets"] == [("X", ["king", "lord"]), ("Y", ["queen", "river"])]
    assert got["templates"] == ["This is {}.", "{} is here."]
    p.write_text("{targets")
    with pytest.raises(PretrainError, match="not valid JSON"):
        read_words(p)
    with pytest.raises(PretrainError, match="not found"):
        read_words(tmp_path / "none.json")


@pytest.fixture(scope="module", params=["clm", "mlm"])
def run(request, tmp_path_factory):
    from pretrain.cli import main

    root = tmp_path_factory.mktemp(f"weat_{request.param}")
    write_corpus(root / "corpus", n_docs=4, sents_per_doc=20)
    tok = "char" if request.param == "clm" else "wordpiece"
    extra = [] if request.param == "clm" else ["--objective", "mlm", "--model.arch", "bert"]
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", tok,
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    assert main(["train", "--out", str(root / "run"), *overrides(TINY_TRAIN), *extra, "--data.path",
                 str(root / "data"), "--train.max_steps", "3", "--train.warmup_steps", "1", "--quiet"]) == 0
    return request.param, root


def test_weat_on_a_run(run, tmp_path):
    objective, root = run
    words = {"targets": {"royal": ["king", "queen", "lord", "crown"],
                         "nature": ["river", "stone", "wind", "rain"]},
             "attributes": {"old": ["old", "dark", "night"], "new": ["young", "green", "light", "ζζ"]}}
    p = tmp_path / "words.json"
    p.write_text(json.dumps(words))
    res = weat(root / "run", p, device="cpu")
    json.dumps(res)  # JSON-able
    assert res["suite"] == "weat" and res["objective"] == objective and res["pooling"] == "mean"
    assert res["step"] == 3 and res["templates"] is None
    assert res["targets"] == [{"name": "royal", "size": 4}, {"name": "nature", "size": 4}]
    assert res["attributes"] == [{"name": "old", "size": 3}, {"name": "new", "size": 4}]
    assert res["p_method"] == "exact" and res["partitions"] == res["permutations"] == 70
    assert -2 <= res["effect_size"] <= 2 and 0 <= res["p_value"] <= 1
    assert set(res["associations"]["royal"]) == {"king", "queen", "lord", "crown"}
    assert "May et al." in res["caveat"]
    if objective == "mlm":  # WordPiece: 'ζ' is not in the vocabulary (the word becomes one [UNK])
        assert res["words_with_unknown_tokens"] == ["ζζ"]
    else:  # a character tokenizer splits every word of more than one character
        assert res["words_split"] == [w for ws in (*words["targets"].values(), *words["attributes"].values())
                                      for w in ws]
    text = format_weat(res)
    assert "effect size d =" in text and "exact, over all 70" in text and "caveat" in text

    # templates: each word's vector is the mean of its sentences' vectors; another pooling
    words["templates"] = ["the {} was here.", "a {} came."]
    p.write_text(json.dumps(words))
    pooled = "cls" if objective == "mlm" else "last"
    res2 = weat(root / "run", p, device="cpu", pooling=pooled, permutations=20, seed=1)
    assert res2["templates"] == words["templates"] and res2["pooling"] == pooled
    assert res2["p_method"] == "sampled" and res2["permutations"] == 20
    assert "20 random partitions of 70, seed 1" in format_weat(res2)
    with pytest.raises(PretrainError, match="pooling must be one of"):
        weat(root / "run", p, device="cpu", pooling="max")
