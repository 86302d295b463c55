"""Forgetting: the backbone's pre-training validation loss before fine-tuning and on the model kept, and
replay of pre-training batches to limit its rise (pretrain/finetune/forgetting.py)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from _corpus import WORDS, tiny_text_run

from pretrain.cli import main
from pretrain.inference import evaluate_run

HARD = ["--epochs", "6", "--lr", "1e-2", "--batch-size", "8", "--patience", "0", "--evals-per-epoch", "0",
        "--quiet", "--json"]


def rows(n: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lab = rng.random() < 0.5
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))] + ["zzyzx" if lab else "qwqwq"]
        out.append(json.dumps({"text": " ".join(words), "label": int(lab)}))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forget")
    tiny_text_run(root, "clm", steps=150)
    (root / "train.jsonl").write_text(rows(200, 1))
    (root / "valid.jsonl").write_text(rows(40, 2))
    return root


def finetune(root: Path, out: str, *extra: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(root / out), *HARD, *extra]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads((root / out / "finetune.json").read_text())["forgetting"] == res["forgetting"]
    return res


def test_forgetting_is_measured_and_replay_limits_it(root, capsys):
    plain = finetune(root, "ft", capsys=capsys)["forgetting"]
    # "before" is the run's own validation loss, on the same sequences `pretrain eval` scores
    ev = evaluate_run(root / "run", max_batches=16, batch_size=8, device="cpu")
    assert plain["before"] == pytest.approx(ev["loss"], rel=1e-5) and plain["tokens"] == ev["tokens"]
    assert plain["change"] > 0.2, plain  # fine-tuning hard on another task costs the LM
    assert plain["replay"] is None
    replayed = finetune(root, "ft_replay", "--replay", str(root / "data"), "--replay-frac", "0.5",
                        capsys=capsys)
    f = replayed["forgetting"]
    assert f["before"] == plain["before"]
    assert f["replay"]["steps"] == replayed["steps"]  # frac 0.5: one pre-training step per task step
    assert f["replay"]["mean_loss"] > 0
    assert f["change"] < 0.5 * plain["change"], (f, plain)


def test_a_frozen_backbone_forgets_nothing(root, capsys):
    f = finetune(root, "ft_head", "--head-only", capsys=capsys)["forgetting"]
    assert f["after"] == f["before"] and f["change"] == 0


def test_not_measured_says_why_and_replay_errors(root, tmp_path, capsys):
    f = finetune(root, "ft_scratch", "--from-scratch", "--epochs", "1", capsys=capsys)["forgetting"]
    assert f == {"not_measured": "from scratch: there is no pre-training to forget"}
    f = finetune(root, "ft_none", "--forgetting-batches", "0", "--epochs", "1", capsys=capsys)["forgetting"]
    assert "not asked" in f["not_measured"]
    # the run's data moved away: fine-tuning goes on and says so
    moved = root / "data_moved"
    shutil.move(root / "data", moved)
    try:
        f = finetune(root, "ft_moved", "--epochs", "1", capsys=capsys)["forgetting"]
        assert "is not there" in f["not_measured"]
    finally:
        shutil.move(moved, root / "data")
    base = ["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
            str(root / "valid.jsonl"), "--out", str(tmp_path / "x"), "--epochs", "1", "--quiet"]
    assert main([*base, "--replay", str(root / "data"), "--head-only"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert main([*base, "--replay", str(tmp_path)]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err
    other = tmp_path / "other"
    (tmp_path / "c.txt").write_text("other words entirely, and more of them\n\n" * 50)
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(other), "--vocab-size", "270",
                 "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    assert main([*base, "--replay", str(other)]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main([*base, "--replay", str(root / "data"), "--replay-frac", "1"]) == 2
    assert "replay_frac must be in (0, 1)" in capsys.readouterr().err


def test_bias_compares_a_backbone_with_its_fine_tunes(root, capsys):
    """`pretrain bias FT --compare RUN`: a fine-tune is scored with its backbone and the LM head it carries;
    a head-only fine-tune (backbone untouched) scores exactly as the run, a full one does not."""
    pairs = root / "pairs.csv"
    words = WORDS[:24]
    rows = [f"the {words[i]} saw a {words[i + 12]},the {words[i + 1]} saw a {words[i + 12]},stereo,made-up"
            for i in range(0, 12, 2)]
    pairs.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n" + "\n".join(rows) + "\n")
    for ft in ("ft_head", "ft"):
        if not (root / ft / "finetune.json").is_file():
            finetune(root, ft, *(["--head-only"] if ft == "ft_head" else []), capsys=capsys)
    reports = {}
    for ft in ("ft_head", "ft"):
        capsys.readouterr()
        assert main(["bias", str(root / ft), "--data", str(pairs), "--compare", str(root / "run"),
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert [r["finetuned"] for r in res["reports"]] == [True, False]
        assert res["reports"][0]["objective"] == "clm"
        assert (root / ft / "bias" / "crows-pairs.json").is_file()
        reports[ft] = [r["mean_margin"] for r in res["reports"]]
    head, full = reports["ft_head"], reports["ft"]
    assert head[0] == pytest.approx(head[1], abs=1e-6)
    assert abs(full[0] - full[1]) > 1e-3

