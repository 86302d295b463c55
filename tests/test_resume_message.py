"""A resume whose schedule settings differ from the checkpoint's (a new train.max_steps) says in one line that
it stretches or shortens the LR schedule, with the LR where the run goes on under the old and the new one."""

from __future__ import annotations

import re

import pytest
from _corpus import write_corpus

from pretrain.cli import main
from pretrain.config import TrainConfig
from pretrain.optim import lr_at
from pretrain.train import schedule_change

TINY = ["--data.seq_len", "32", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32",
        "--train.batch_size", "4", "--train.lr", "1e-3", "--train.warmup_steps", "2", "--train.eval_interval",
        "0", "--train.log_interval", "2", "--train.ckpt_interval", "4", "--train.plot", "false",
        "--train.threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_message")
    write_corpus(root / "corpus", n_docs=6)
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "char",
                 "--val-fraction", "0.3"]) == 0
    return root / "data"


def _lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if "LR schedule" in x]


def test_a_longer_run_says_it_stretches_the_schedule_with_the_lr_before_and_after(tmp_path, data, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--data.path", str(data), *TINY, "--train.max_steps", "8"]) == 0
    assert _lines(capsys.readouterr().err) == []  # a new run: nothing to say
    assert main(["train", "--resume", run, "--train.max_steps", "20"]) == 0
    (line,) = _lines(capsys.readouterr().err)
    old, new = TrainConfig(max_steps=8, lr=1e-3, warmup_steps=2), TrainConfig(max_steps=20, lr=1e-3,
                                                                               warmup_steps=2)
    # step 8 done: the next LR is lr_at(8): the old cosine's floor, well above it on the new one
    assert "train.max_steps 8 -> 20 stretches the LR schedule" in line and "at step 9" in line
    got = [float(x) for x in re.findall(r"the LR is (\S+) \(new schedule; (\S+) under", line)[0]]
    assert got == pytest.approx([lr_at(8, new), lr_at(8, old)], rel=1e-3)
    assert got[0] > 3 * got[1]

    # the same schedule again (only when to stop changed): no line
    assert main(["train", "--resume", run, "--train.max_steps", "20", "--train.stop_at_step", "24"]) == 0
    assert _lines(capsys.readouterr().err) == []


def test_a_shorter_schedule_says_it_shortens(tmp_path, data, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--data.path", str(data), *TINY, "--train.max_steps", "40",
                 "--train.stop_at_step", "4"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", run, "--train.max_steps", "6", "--train.stop_at_step", "0"]) == 0
    (line,) = _lines(capsys.readouterr().err)
    assert "train.max_steps 40 -> 6 shortens the LR schedule: at step 5" in line


def test_schedule_change_names_every_changed_setting():
    tc = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3)
    saved = {**{k: getattr(tc, k) for k in ("max_steps", "warmup_steps", "lr", "min_lr_ratio", "schedule",
                                            "decay_frac")}, "max_steps": 50, "schedule": "linear"}
    line = schedule_change(saved, tc, 40)
    assert "train.max_steps 50 -> 100, train.schedule linear -> cosine stretches" in line
    old = TrainConfig(max_steps=50, warmup_steps=10, lr=1e-3, schedule="linear")
    assert f"{lr_at(40, tc):.4g} (new schedule; {lr_at(40, old):.4g} under the checkpoint's)" in line
    assert schedule_change({**saved, "max_steps": 100, "schedule": "cosine"}, tc, 40) == ""  # the same
    assert schedule_change({}, tc, 40) == ""  # (a checkpoint without its config: nothing to compare)
    # the time budget counts only when the decay runs over it
    same = {**saved, "max_steps": 100, "schedule": "cosine"}
    assert schedule_change({**same, "max_time_s": 60.0}, tc, 40) == ""
    timed = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, max_time_s=120.0, time_schedule=True)
    line = schedule_change({**same, "max_time_s": 60.0, "time_schedule": True}, timed, 40, elapsed_s=30.0)
    assert "train.max_time_s 60.0 -> 120.0 changes the LR schedule" in line
