"""Exact resume: a run stopped at step k (cleanly, by SIGTERM/SIGINT, or by SIGKILL mid-run) and resumed
logs, at every later step, the same train loss as an uninterrupted run, for both objectives (causal and
masked LM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _corpus import TINY_TRAIN, kill_after, overrides, write_corpus

from pretrain.cli import main

# Each objective with a tokenizer that suits it: the causal LM on characters, the masked LM on WordPiece
# (it needs [MASK]). Masks are drawn per step from the run's seed, so an MLM resume must be exact too.
OBJECTIVES = {
    "clm": {"prepare": ["--tokenizer", "char"], "train": []},
    "mlm": {"prepare": ["--tokenizer", "wordpiece", "--vocab-size", "300"],
            "train": ["--objective", "mlm", "--model.arch", "bert"]},
}


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def objective(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, objective):
    root = tmp_path_factory.mktemp(f"resume_{objective}")
    write_corpus(root / "corpus")
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"),
                 *OBJECTIVES[objective]["prepare"], "--val-fraction", "0.2"]) == 0
    return root / "data"


def train_args(objective: str, data_dir: Path) -> list[str]:
    return [*overrides(TINY_TRAIN), *OBJECTIVES[objective]["train"], "--data.path", str(data_dir), "--quiet"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "metrics.jsonl has duplicated steps after resume"
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, objective, data_dir):
    run = tmp_path_factory.mktemp(f"ref_{objective}") / "run"
    assert main(["train", "--out", str(run), *train_args(objective, data_dir)]) == 0
    return losses(run)


@pytest.mark.parametrize("extra", [[], ["--train.log_interval", "4", "--train.optimizer", "muon"]],
                         ids=["adamw-log1", "muon-log4"])
def test_stop_and_resume_is_exact(tmp_path, objective, data_dir, reference, extra):
    common = [*train_args(objective, data_dir), *extra]
    if extra:  # its own uninterrupted reference
        assert main(["train", "--out", str(tmp_path / "ref"), *common]) == 0
        reference = losses(tmp_path / "ref")
    run = tmp_path / "run"
    # stop at 13: not a multiple of the log interval, so a partial loss average is carried over
    assert main(["train", "--out", str(run), *common, "--train.stop_at_step", "13"]) == 0
    assert max(losses(run)) <= 13
    # re-running the same command continues the run (no --resume needed) ...
    assert main(["train", "--out", str(run), *common, "--train.stop_at_step", "21"]) == 0
    # ... and --resume continues with the saved config
    assert main(["train", "--resume", str(run), "--train.stop_at_step", "0", "--quiet"]) == 0
    assert losses(run) == reference


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, objective, data_dir, reference):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *train_args(objective, data_dir)]
    # a child process that trains slowly (each micro-batch sleeps) so it can be killed mid-run
    module, fn = {"clm": ("clm", "loss"), "mlm": ("mlm", "loss_and_accuracy")}[objective]
    script = textwrap.dedent(f"""
        import sys, time
        import pretrain.objectives.{module} as objective
        _loss = objective.{fn}
        def slow_loss(*args, **kwargs):
            time.sleep(0.05)
            return _loss(*args, **kwargs)
        objective.{fn} = slow_loss
        from pretrain.cli import main
        sys.exit(main({args!r}))
    """)
    # a few steps past the checkpoint, mid-step
    kill_after(script, run / "checkpoints" / "step_000010" / "meta.json", 0.3)
    logged = losses(run)
    assert 10 <= max(logged) < 30  # killed after the checkpoint, before the end
    assert main(args) == 0  # the same command again resumes from step 10
    assert losses(run) == reference


def _signalling_child(objective: str, args: list[str], sends: list[str],
                      at_call: int) -> subprocess.CompletedProcess:
    """Run ``main(args)`` in a child that sends itself the signals ``sends`` during its ``at_call``-th
    training loss."""
    module, fn = {"clm": ("clm", "loss"), "mlm": ("mlm", "loss_and_accuracy")}[objective]
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        import pretrain.objectives.{module} as objective
        _loss, calls = objective.{fn}, [0]
        def signalling_loss(*args, **kwargs):
            calls[0] += torch.is_grad_enabled()  # training steps only, not evaluation
            if calls[0] == {at_call}:
                for name in {sends!r}:
                    os.kill(os.getpid(), getattr(signal, name))
            return _loss(*args, **kwargs)
        objective.{fn} = signalling_loss
        from pretrain.cli import main
        sys.exit(main({args!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stop_signal_saves_a_checkpoint_and_resume_is_exact(tmp_path, objective, data_dir, reference, sig):
    """A scheduler's SIGTERM (or Ctrl-C) mid-run: the step in progress finishes, a checkpoint of that very
    step is saved (not only the last periodic one), the exit status says which signal, and resuming is
    exact."""
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *train_args(objective, data_dir)]
    proc = _signalling_child(objective, args, [sig], at_call=14)  # during step 14 (one loss per step)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert f"stopped by {sig} at step 14" in proc.stderr and "--resume" in proc.stderr
    assert (run / "checkpoints" / "step_000014" / "meta.json").is_file()
    assert max(losses(run)) == 14
    assert main(args) == 0  # the same command again continues from step 14
    assert losses(run) == reference


@pytest.mark.slow
def test_second_stop_signal_aborts_at_once_keeping_the_last_checkpoint(tmp_path, objective, data_dir):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *train_args(objective, data_dir)]
    proc = _signalling_child(objective, args, ["SIGTERM", "SIGTERM"], at_call=14)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in proc.stderr, proc.stderr
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_000010"]
    assert main([*args, "--train.stop_at_step", "12"]) == 0  # the step-10 checkpoint is intact and resumes


def test_resume_refuses_data_prepared_again_from_other_inputs(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", n_docs=6)
    prep = ["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "data"), "--tokenizer", "byte",
            "--val-fraction", "0.2"]
    assert main(prep) == 0
    args = [*train_args("clm", tmp_path / "data"), "--train.stop_at_step", "5"]
    assert main(["train", "--out", str(tmp_path / "run"), *args]) == 0
    moved = tmp_path / "moved"  # the same content in another folder still resumes
    (tmp_path / "data").rename(moved)
    assert main(["train", "--resume", str(tmp_path / "run"), "--data.path", str(moved),
                 "--train.stop_at_step", "10", "--quiet"]) == 0
    write_corpus(tmp_path / "corpus", n_docs=8, seed=1)  # other documents, the same tokenizer
    assert main([*prep, "--out", str(moved), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--data.path", str(moved), "--quiet"]) == 2
    assert "is not the data the run" in capsys.readouterr().err
