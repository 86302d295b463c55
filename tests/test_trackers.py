"""Experiment trackers (train.report_to / finetune --report-to): TensorBoard's event files and MLflow's local
store hold the same scalars as metrics.jsonl and the config; a resumed run does not log a step twice; W&B and
Trackio get the same calls (stand-in modules: their packages are not test dependencies); a missing package is
an error naming its extra, before anything is trained; the default path imports no tracker."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from _corpus import write_corpus

from pretrain.cli import main
from pretrain.config import ConfigError, TrainConfig

TINY = ["--data.seq_len", "32", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32",
        "--train.batch_size", "4", "--train.lr", "3e-3", "--train.warmup_steps", "2",
        "--train.log_interval", "1", "--train.eval_interval", "4", "--train.eval_batches", "2",
        "--train.plot", "false", "--train.threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    write_corpus(root / "corpus", n_docs=6)
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "bpe",
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    return root / "data"


def _train(run: Path, data: Path, *extra: str) -> int:
    return main(["train", "--out", str(run), "--data.path", str(data), *TINY, *extra])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def _tb_series(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """The same steps and values (TensorBoard keeps float32)."""
    return [s for s, _ in a] == [s for s, _ in b] and all(
        abs(x - y) <= 1e-6 * max(1.0, abs(y)) for (_, x), (_, y) in zip(a, b))


def test_tensorboard_has_the_scalars_of_metrics_jsonl_and_resume_logs_no_step_twice(tmp_path, data, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert _train(run, data, "--train.max_steps", "8", "--train.ckpt_interval", "4",
                  "--train.report_to", "tensorboard") == 0
    assert f"tensorboard: {run / 'tb'}" in capsys.readouterr().err  # where the logs go
    rows = _jsonl(run / "metrics.jsonl")
    for key in ("train_loss", "lr", "val_loss"):
        assert _close(_tb_series(run / "tb", key), _series(rows, key)), key
    assert len(_series(rows, "train_loss")) == 8

    # a run killed after its step-4 checkpoint: the points logged since are logged again on resume, once
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000008")
    assert _train(run, data, "--train.max_steps", "8", "--train.ckpt_interval", "4",
                  "--train.report_to", "tensorboard") == 0
    rows = _jsonl(run / "metrics.jsonl")
    tb = _tb_series(run / "tb", "train_loss")
    assert [s for s, _ in tb] == list(range(1, 9)) and _close(tb, _series(rows, "train_loss"))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2

    # the config as hyper-parameters (the HParams tab) and as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    meta = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(meta).session_start_info.hparams
    assert hp["train.lr"].number_value == pytest.approx(3e-3) and hp["model.arch"].string_value == "gpt"


def test_mlflow_local_store_has_the_metrics_and_the_config(tmp_path, data, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # (restored afterwards: the run sets it itself)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run = tmp_path / "run"
    assert _train(run, data, "--train.max_steps", "6", "--train.report_to", "mlflow") == 0
    assert "mlflow: run " in capsys.readouterr().err
    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    rows = _jsonl(run / "metrics.jsonl")
    for key in ("train_loss", "val_loss", "grad_norm"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], key))
        assert _close(hist, _series(rows, key)), key
    got = client.get_run(ids["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params["train.lr"] == "0.003" and got.data.params["model.d_model"] == "32"
    assert got.data.params["train.report_to"] == "['mlflow']"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    # resumed with more steps: the same MLflow run goes on (a parameter that changed keeps its first value)
    assert _train(run, data, "--train.max_steps", "8", "--train.report_to", "mlflow") == 0
    steps = sorted(m.step for m in client.get_metric_history(ids["run_id"], "train_loss"))
    assert steps == list(range(1, 9)) and client.get_run(ids["run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([got.info.experiment_id])) == 1


def test_a_finetune_logs_its_evaluations(tmp_path, data, monkeypatch):
    pytest.importorskip("tensorboard")
    import random

    assert _train(tmp_path / "run", data, "--train.max_steps", "4", "--quiet") == 0
    rng = random.Random(0)
    for name, n in (("train", 24), ("valid", 12)):
        lines = []
        for _ in range(n):
            lab = rng.random() < 0.5
            lines.append(json.dumps({"text": ("king crown " if lab else "river stone ") + "the old day",
                                     "label": "pos" if lab else "neg"}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "run"), "--train", str(tmp_path / "train.jsonl"), "--valid",
                 str(tmp_path / "valid.jsonl"), "--out", str(out), "--epochs", "2", "--batch-size", "8",
                 "--evals-per-epoch", "2", "--report-to", "tensorboard", "--quiet"]) == 0
    rows = _jsonl(out / "metrics.jsonl")
    assert len(rows) == 4
    for key in ("val_accuracy", "train_loss", "epoch"):
        assert _close(_tb_series(out / "tb", key), _series(rows, key)), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


@pytest.mark.parametrize("tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow"),
                                             ("wandb", "wandb"), ("trackio", "trackio")])
def test_a_missing_package_is_an_error_naming_the_extra_before_training(tmp_path, data, monkeypatch, capsys,
                                                                        tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    run = tmp_path / "run"
    assert _train(run, data, "--train.max_steps", "2", "--train.report_to", tracker) != 0
    err = capsys.readouterr().err
    assert f"pip install 'pretrain[{tracker}]'" in err and "train.report_to" in err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    from pretrain import PretrainError
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import finetune

    with pytest.raises(PretrainError, match=rf"report_to {tracker} .*pretrain\[{tracker}\]"):
        finetune(tmp_path / "no_run", "t.jsonl", "v.jsonl", tmp_path / "ft",
                 FinetuneConfig(report_to=[tracker]))


def test_unknown_tracker_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        TrainConfig(report_to=["tensorbord"])
    with pytest.raises(ConfigError, match="trackers are tensorboard, wandb, mlflow, trackio"):
        TrainConfig(report_to=["comet"])
    assert TrainConfig(report_to=["mlflow", "mlflow"]).report_to == ["mlflow"]
    assert TrainConfig(report_to="tensorboard, wandb").report_to == ["tensorboard", "wandb"]  # (from Python)
    from pretrain.cli import build_parser
    from pretrain.finetune.cli import _config

    args = build_parser().parse_args(["finetune", "RUN", "--train", "t", "--valid", "v", "--out", "o",
                                      "--report-to", "tensorboard,mlflow"])
    assert _config(args).report_to == ["tensorboard", "mlflow"]


class _FakeRun:
    def __init__(self, calls: list):
        self.calls, self.url = calls, None

    def define_metric(self, *a, **k):
        self.calls.append(("define_metric", a, k))

    def log(self, data):
        self.calls.append(("log", data))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def test_wandb_runs_offline_without_credentials_and_logs_against_the_step(tmp_path, monkeypatch):
    from pretrain.metrics import Metrics
    from pretrain.trackers import open_trackers

    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: (calls.append(("init", kw)), _FakeRun(calls))[1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    m = Metrics(tmp_path / "metrics.jsonl", 0, open_trackers(["wandb"], tmp_path, {"train": {"lr": 0.1}}))
    m.write({"step": 3, "train_loss": 2.5, "lr": 0.1})
    m.write({"step": 4, "guard": "skip", "loss": 9.0, "skipped_samples": [1, 2]})
    m.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["config"] == {"train.lr": 0.1}
    assert init["project"] == "pretrain" and init["resume"] == "allow"
    assert ("log", {"train_loss": 2.5, "lr": 0.1, "step": 3}) in calls
    assert ("log", {"guard/loss": 9.0, "step": 4}) in calls and calls[-1] == ("finish", 0)
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"] == init["id"]

    monkeypatch.setenv("WANDB_MODE", "disabled")  # WANDB_MODE is respected
    open_trackers(["wandb"], tmp_path, {})[0].close(failed=True)
    assert calls[-4][1]["mode"] == "disabled" and calls[-1] == ("finish", 1)


def test_trackio_gets_the_scalars_at_their_steps(tmp_path, monkeypatch):
    from pretrain.metrics import Metrics
    from pretrain.trackers import open_trackers

    calls: list = []
    fake = types.ModuleType("trackio")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda metrics, step=None: calls.append(("log", metrics, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    m = Metrics(tmp_path / "metrics.jsonl", 0, open_trackers(["trackio"], tmp_path / "ft", {"lr": 1e-3}))
    m.write({"step": 5, "val_accuracy": 0.75, "train_loss": None})
    m.close()
    assert calls == [("init", {"project": "pretrain", "name": "ft", "config": {"lr": 1e-3}}),
                     ("log", {"val_accuracy": 0.75}, 5), ("finish",)]


def test_a_failing_tracker_is_dropped_with_a_warning_and_metrics_jsonl_goes_on(tmp_path):
    from pretrain.metrics import Metrics
    from pretrain.trackers import Tracker

    class Broken(Tracker):
        name = "broken"

        def log(self, scalars, step):
            raise ConnectionError("server gone")

    m = Metrics(tmp_path / "metrics.jsonl", 0, [Broken()])
    with pytest.warns(UserWarning, match="report_to broken: logging failed.*server gone"):
        m.write({"step": 1, "train_loss": 1.0})
    m.write({"step": 2, "train_loss": 0.5})
    m.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2] and m.trackers == []


def test_the_default_path_imports_no_tracker(tmp_path, data):
    code = (f"import sys; from pretrain.cli import main; "
            f"assert main(['train', '--out', {str(tmp_path / 'run')!r}, '--data.path', {str(data)!r}, "
            f"*{TINY!r}, '--train.max_steps', '2', '--quiet']) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb', 'trackio', "
            "'tensorboard') or m.startswith('torch.utils.tensorboard') or m == 'pretrain.trackers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
