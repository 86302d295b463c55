"""Training: end to end through the CLI (prepare → train → eval → generate, and what a run directory
holds), its stop conditions, and the global batch split into micro-batches."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from _corpus import TINY_TRAIN, overrides, write_corpus

from pretrain.cli import main
from pretrain.config import ConfigError, TrainConfig
from pretrain.train import resolve_batch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_corpus(root / "corpus")
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "char",
                 "--val-fraction", "0.2"]) == 0
    return root / "data"


def test_cli_end_to_end(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--json", "--quiet", *overrides(TINY_TRAIN),
            "--data.path", str(data_dir), "--train.plot", "true"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 30 and summary["stop_reason"] == "max_steps"
    assert summary["tokens_seen"] == 30 * 4 * 32

    # the run directory a user finds
    assert (run / "loss_curve.png").stat().st_size > 1000
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] > 0 and saved["model"]["max_seq_len"] == 32  # resolved values
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("tokens", "train_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5  # it learns
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000020", "step_000030"]  # keep_checkpoints = 2
    assert (run / "checkpoints" / "latest").resolve().name == "step_000030"

    assert main(["eval", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["loss"] == pytest.approx(rows[-1]["val_loss"], rel=0.05)  # full split vs 4 eval batches
    assert ev["perplexity"] > 1 and ev["bits_per_byte"] > 0

    assert main(["generate", str(run), "--prompt", "The king", "--max-new-tokens", "40", "--seed", "3",
                 "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["samples"][0].startswith("The king") and len(gen["samples"][0]) == len("The king") + 40
    assert main(["generate", str(run), "--prompt", "The king", "--max-new-tokens", "40", "--seed", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == gen  # seeded sampling is reproducible

    assert main(["train", "--resume", str(run), "--quiet", "--json"]) == 0  # finished: trains no further
    again = json.loads(capsys.readouterr().out)
    assert (again["step"] == 30
            and again["val_loss"] == summary["val_loss"] == pytest.approx(rows[-1]["val_loss"]))
    assert again["best_val_loss"] == summary["best_val_loss"]


def test_global_batch_derives_grad_accum():
    tc = TrainConfig(batch_size=4, global_batch_size=32)
    assert (resolve_batch(tc, 1) == (8, 32) and resolve_batch(tc, 2) == (4, 32)
            and resolve_batch(tc, 8) == (1, 32))
    # unset: per-process semantics
    assert resolve_batch(TrainConfig(batch_size=4, grad_accum=3), 2) == (3, 24)
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_batch(tc, 3)
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_batch(tc, 16)
    with pytest.raises(ConfigError, match="needs grad_accum 4"):
        resolve_batch(TrainConfig(batch_size=4, global_batch_size=32, grad_accum=2), 2)
    with pytest.raises(ConfigError, match="parallelism"):
        TrainConfig(parallelism="tp")


def test_yaml_config_and_overrides(tmp_path, data_dir, capsys):
    cfg = dict(TINY_TRAIN, data={"path": str(data_dir), "seq_len": 16})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(run), "--train.max_steps", "5", "--train.lr=1e-3",
                 "--quiet", "--json"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["seq_len"] == 16 and saved["train"]["max_steps"] == 5
            and saved["train"]["lr"] == 1e-3)


@pytest.mark.slow
def test_time_and_target_stops(tmp_path, data_dir, capsys):
    base = [*overrides(TINY_TRAIN), "--data.path", str(data_dir), "--quiet", "--json"]
    assert main(["train", "--out", str(tmp_path / "a"), *base, "--train.max_steps", "100000",
                 "--train.max_time_s", "1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["stop_reason"] == "max_time_s" and s["step"] < 100000 and s["elapsed_s"] >= 1
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] > 0.99 * 3e-3  # step-based: 100,000 steps away, the cosine has not moved
    # time_schedule: the cosine runs over the 2-second budget instead, and ends near its floor
    assert main(["train", "--out", str(tmp_path / "t"), *base, "--train.max_steps", "100000",
                 "--train.max_time_s", "2", "--train.time_schedule", "true"]) == 0
    s = json.loads(capsys.readouterr().out)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert s["stop_reason"] == "max_time_s" and len(lrs) > 10
    assert lrs[-1] < 0.3 * 3e-3 and all(b <= a for a, b in zip(lrs[5:], lrs[6:])), lrs
    assert main(["train", "--out", str(tmp_path / "b"), *base, "--train.target_val_loss", "100"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["stop_reason"] == "target_val_loss" and s["step"] == 10  # the first evaluation meets it


def test_doc_mask_activation_checkpointing_and_prefetch(tmp_path):
    """data.doc_mask trains (and changes the losses); activation checkpointing and batch prefetching do not
    change them at all."""
    write_corpus(tmp_path / "corpus", n_docs=40, sents_per_doc=1)  # short documents: several per sequence
    data_dir = tmp_path / "data"
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(data_dir), "--tokenizer", "char",
                 "--val-fraction", "0.2"]) == 0

    def run(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        assert main(["train", "--out", str(out), "--quiet", *overrides(TINY_TRAIN),
                     "--data.path", str(data_dir), "--train.max_steps", "6", "--train.eval_interval", "0",
                     *extra]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    plain = run("plain")
    masked = run("masked", "--data.doc_mask", "true")
    assert len(masked) == 6 and masked != plain
    assert run("ckpt", "--data.doc_mask", "true", "--train.activation_checkpointing", "true",
               "--train.prefetch", "0") == pytest.approx(masked, rel=1e-5)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_eval_of_a_doc_mask_run_matches_its_logged_val_loss(tmp_path, capsys, objective):
    """`pretrain eval` evaluates with the attention the model was trained with (data.doc_mask), so on the same
    windows it gives the val loss training logged."""
    write_corpus(tmp_path / "corpus", n_docs=40, sents_per_doc=1)  # short documents: several per sequence
    tok = (["--tokenizer", "char"] if objective == "clm"
           else ["--tokenizer", "wordpiece", "--vocab-size", "200"])
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "data"), *tok,
                 "--val-fraction", "0.2"]) == 0
    run = tmp_path / "run"
    extra = [] if objective == "clm" else ["--objective", "mlm", "--model.arch", "bert"]
    assert main(["train", "--out", str(run), "--quiet", *overrides(TINY_TRAIN), *extra, "--data.path",
                 str(tmp_path / "data"), "--train.max_steps", "20", "--train.eval_interval", "20",
                 "--train.eval_batches", "0", "--data.doc_mask", "true"]) == 0
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(logged, abs=2e-6)


def test_divergence_never_checkpoints_nan_weights(tmp_path, data_dir, capsys):
    """A diverging run stops with an error before saving non-finite weights: whatever checkpoint it leaves
    evaluates to a finite loss (it used to save, and keep as the newest, the diverged ones)."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--quiet", *overrides(TINY_TRAIN), "--data.path", str(data_dir),
                 "--train.max_steps", "40", "--train.lr", "1e4", "--train.grad_clip", "0",
                 "--train.warmup_steps", "0", "--train.log_interval", "10", "--train.eval_interval", "0",
                 "--train.ckpt_interval", "1", "--train.keep_checkpoints", "1"]) == 2
    assert "diverged" in capsys.readouterr().err
    for ckpt in (run / "checkpoints").glob("step_*"):
        assert main(["eval", str(ckpt), "--json"]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])


def test_resume_with_time_budget_spent_trains_no_more_and_paths_are_absolute(tmp_path, data_dir, capsys,
                                                                              monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(data_dir.parent)  # a data path relative to the working directory ...
    args = ["train", "--out", str(run), "--quiet", "--json", *overrides(TINY_TRAIN),
            "--data.path", data_dir.name, "--train.max_steps", "100000", "--train.max_time_s", "0.5",
            "--train.eval_interval", "0"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stop_reason"] == "max_time_s" and first["step"] < 100000
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
    assert saved == str(data_dir.resolve())  # ... is saved absolute
    monkeypatch.chdir(tmp_path)  # so eval and resume work from elsewhere
    for _ in range(2):
        assert main(["train", "--resume", str(run), "--quiet", "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["step"] == first["step"] and again["stop_reason"] == "max_time_s"
    assert main(["eval", str(run), "--json"]) == 0


def test_eval_refuses_a_data_folder_prepared_again_from_other_inputs(tmp_path, capsys):
    import shutil
    write_corpus(tmp_path / "a", n_docs=6)
    write_corpus(tmp_path / "b", n_docs=6, seed=1)
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", str(tmp_path / "a"), "--out", str(data), "--tokenizer", "char",
                 "--val-fraction", "0.2"]) == 0
    assert main(["train", "--out", str(run), "--quiet", "--json", *overrides(TINY_TRAIN),
                 "--data.path", str(data), "--train.max_steps", "2", "--train.warmup_steps", "0",
                 "--train.eval_interval", "0"]) == 0
    assert main(["prepare", str(tmp_path / "b"), "--out", str(tmp_path / "other"), "--tokenizer",
                 str(run / "tokenizer.json"), "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_matches_run"] is True
    assert main(["eval", str(run), "--data", str(tmp_path / "other"), "--json"]) == 0  # asked for: evaluated
    assert json.loads(capsys.readouterr().out)["data_matches_run"] is False
    shutil.rmtree(data)
    (tmp_path / "other").rename(data)  # the run's own folder now holds other text: refused, not read silently
    assert main(["eval", str(run), "--json"]) != 0
    assert "not the data" in capsys.readouterr().err


def test_train_leaves_the_callers_config_as_it_was(tmp_path, data_dir, monkeypatch):
    """train resolves the config once into its own copy: the data path made absolute, the vocabulary and the
    context taken from the data, the one saved with the run; the caller's object is not changed."""
    import copy
    import shutil

    from pretrain.config import load_config
    from pretrain.train import train

    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {**TINY_TRAIN, "data": {"seq_len": 32, "path": "data"},
                             "train": {**TINY_TRAIN["train"], "max_steps": 3, "eval_interval": 0}})
    before = copy.deepcopy(cfg)
    train(cfg, "run", quiet=True)
    assert cfg == before and cfg.data.path == "data" and cfg.model.vocab_size == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "data") and saved["model"]["vocab_size"] > 0
