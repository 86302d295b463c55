"""Faults during training: the loss-spike guard (train.guard stop | skip | rollback) and the injected NaNs
and spikes that prove it, sample ranges a run skips, diverged weights never saved, a full disk while a
checkpoint or an export is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain import PretrainError
from pretrain.config import ConfigError, load_config
from pretrain.guard import SpikeGuard
from pretrain.train import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _cfg(data: Path, **train_kw):
    base = {"data": {"path": str(data), "seq_len": 16},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
            "train": {"batch_size": 2, "max_steps": 12, "warmup_steps": 1, "eval_interval": 0,
                      "log_interval": 1, "ckpt_interval": 4, "plot": False, "threads": 1, "dtype": "fp32",
                      "guard_warmup": 4, "guard_z": 6.0, **train_kw}}
    return load_config(None, base)


def _rows(run: Path) -> list[dict]:
    def strict(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return [json.loads(x, parse_constant=strict) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_spike_guard_judges_against_the_window():
    g = SpikeGuard("skip", z=4.0, warmup=5, window=10, max_events=1)
    for i in range(5):
        assert g.judge(3.0 - 0.01 * i, 1.0 + 0.01 * i) == (False, 0.0)  # warming up: accepted, not judged
    bad, z = g.judge(2.9, 1.02)
    assert not bad and abs(z) < 4
    bad, z = g.judge(30.0, 1.0)
    assert bad and z > 4  # a loss spike, not added to the window
    assert g.judge(2.9, 50.0)[0]  # a gradient-norm spike
    assert g.judge(float("nan"), 1.0) == (True, math.inf) and g.judge(2.9, float("inf"))[0]
    assert len(g.losses) == 6
    g.record(7, 30.0, 1.0, 9.0)
    assert not g.exhausted
    g.record(8, 30.0, 1.0, 9.0)
    assert g.exhausted
    h = SpikeGuard("skip", z=4.0, warmup=5, window=10)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))  # checkpointed as plain data
    assert list(h.losses) == list(g.losses) and h.events == g.events


def test_stop_ends_the_run_at_the_spike_and_keeps_the_checkpoint_before(tmp_path, prepared_data):
    run = tmp_path / "run"
    with pytest.raises(PretrainError, match="spike at step 10"):
        train(_cfg(prepared_data, guard="stop", fault="spike@10"), run, quiet=True)
    rows = _rows(run)
    assert [r for r in rows if "guard" in r][0]["step"] == 10
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]


def test_skip_drops_the_update_and_the_run_goes_on(tmp_path, prepared_data):
    run = tmp_path / "run"
    res = train(_cfg(prepared_data, guard="skip", fault="nan@6"), run, quiet=True)
    assert res["step"] == 12 and [e["step"] for e in res["guard_events"]] == [6]
    assert res["guard_events"][0]["action"] == "skip" and res["guard_events"][0]["z"] is None  # (not finite)
    rows = _rows(run)  # strict JSON: the NaN loss of the event is written as null
    assert [r["step"] for r in rows if "guard" in r] == [6]
    assert all(math.isfinite(r["train_loss"]) for r in rows if r.get("train_loss") is not None)
    from pretrain.checkpoint import load_pretrained

    model, *_ = load_pretrained(run)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_rollback_goes_back_to_the_last_checkpoint_past_the_samples_since(tmp_path, prepared_data):
    run = tmp_path / "run"
    res = train(_cfg(prepared_data, guard="rollback", fault="spike@10", guard_lr_scale=0.5), run, quiet=True)
    (event,) = res["guard_events"]
    assert event["step"] == 10 and event["action"] == "rollback" and event["to_step"] == 8
    assert event["skipped_samples"] == [16, 20]  # steps 9 and 10, two sequences each
    assert res["step"] == 12
    state = torch.load(run / "checkpoints" / "step_000012" / "state.pt", weights_only=True)
    assert state["loader"]["samples_seen"] == 28 and state["loader"]["skipped"] == [[16, 20]]
    groups = state["optimizer"]["param_groups"]
    assert all(g["base_lr"] == pytest.approx(0.5 * _cfg(prepared_data).train.lr) for g in groups)


def test_more_events_than_allowed_end_the_run(tmp_path, prepared_data):
    with pytest.raises(PretrainError, match="more than train.guard_max_events 0"):
        train(_cfg(prepared_data, guard="skip", guard_max_events=0, fault="nan@6"), tmp_path / "run",
              quiet=True)


def test_a_guarded_run_resumes_exactly(tmp_path, prepared_data):
    """The guard's window is checkpointed: stopped and resumed, the run judges and trains as in one go."""
    whole = train(_cfg(prepared_data, guard="skip", fault="spike@10"), tmp_path / "whole", quiet=True)
    train(_cfg(prepared_data, guard="skip", fault="spike@10", stop_at_step=8), tmp_path / "cut", quiet=True)
    cut = train(_cfg(prepared_data, guard="skip", fault="spike@10"), tmp_path / "cut", quiet=True)
    assert cut["guard_events"] == whole["guard_events"]
    assert [r.get("train_loss") for r in _rows(tmp_path / "cut")] == \
        [r.get("train_loss") for r in _rows(tmp_path / "whole")]


def test_without_a_guard_a_nan_ends_the_run_and_nothing_diverged_is_saved(tmp_path, prepared_data):
    run = tmp_path / "run"
    with pytest.raises(PretrainError, match="diverged at step 6"):
        train(_cfg(prepared_data, fault="nan@6"), run, quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004"]
    _rows(run)  # still strict JSON


def test_weights_are_checked_before_a_save():
    from pretrain.train import params_finite

    model = torch.nn.Linear(2, 2)
    assert params_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert not params_finite(model)


def test_skip_samples_and_bad_settings(tmp_path, prepared_data):
    from pretrain.data.loader import TokenSplit, TrainLoader

    loader = TrainLoader(TokenSplit(prepared_data, "train"), 16, 2)
    plain = [loader.sample(i).tolist() for i in range(8)]
    loader.skip_samples([(2, 6)])
    got = [loader.next_batch().tolist() for _ in range(3)]
    assert got == [plain[0:2], plain[6:8], [loader.sample(8).tolist(), loader.sample(9).tolist()]]
    assert loader.state_dict()["skipped"] == [[2, 6]]
    res = train(_cfg(prepared_data, max_steps=3, skip_samples="0-4"), tmp_path / "run", quiet=True)
    assert res["step"] == 3
    for bad in ({"guard": "maybe"}, {"skip_samples": "5-2"}, {"fault": "boom@3"}, {"guard_lr_scale": 2.0}):
        with pytest.raises(ConfigError):
            _cfg(prepared_data, **bad)


# ------------------------------------------------------------------ a full disk while a checkpoint is written


def _disk_full(*_a, **_k):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_and_loses_nothing(tmp_path, prepared_data,
                                                                              monkeypatch, capsys):
    import pretrain.checkpoint as ck
    from pretrain.checkpoint import resume_point

    run = tmp_path / "run"
    train(_cfg(prepared_data, max_steps=4), run, quiet=True)
    real = ck.save_model
    monkeypatch.setattr(ck, "save_model", _disk_full)
    with pytest.raises(PretrainError) as e:
        train(_cfg(prepared_data, max_steps=8), run, quiet=True)
    msg = str(e.value)
    assert "could not write checkpoint step 8" in msg and "No space left on device" in msg
    assert "B free there" in msg and "needs about" in msg and "step_000004 is intact" in msg
    assert not list((run / "checkpoints").glob(".tmp_*"))  # nothing half-written stays
    monkeypatch.setattr(ck, "save_model", real)
    assert resume_point(run).name == "step_000004"  # the previous checkpoint verifies, and the run goes on
    assert train(_cfg(prepared_data, max_steps=8), run, quiet=True)["step"] == 8
    # through the CLI: one error line, status 2
    from pretrain.cli import main

    monkeypatch.setattr(ck, "save_model", _disk_full)
    assert main(["train", "--out", str(run), "--data.path", str(prepared_data), "--data.seq_len", "16",
                 "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16",
                 "--train.batch_size", "2", "--train.max_steps", "10", "--train.warmup_steps", "1",
                 "--train.eval_interval", "0", "--train.log_interval", "1", "--train.ckpt_interval", "4",
                 "--train.plot", "false", "--train.threads", "1", "--train.dtype", "fp32",
                 "--train.guard_warmup", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write checkpoint step 10") and "\n" not in err


def test_a_full_disk_during_an_export_leaves_no_partial_folder(tmp_path, prepared_data, monkeypatch):
    from pretrain.export import export_hf

    run = tmp_path / "run"
    train(_cfg(prepared_data, max_steps=2), run, quiet=True)
    monkeypatch.setattr("safetensors.torch.save_file", _disk_full)
    with pytest.raises(PretrainError, match="could not write the export .*No space left on device"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
