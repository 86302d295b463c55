"""Experiment trackers: TensorBoard, MLflow, Weights & Biases and Trackio get the scalars of metrics.jsonl and
the config as hyper-parameters (``train.report_to`` / finetune's ``report_to``; docs/tracking.md).

metrics.jsonl stays the record: :class:`pretrain.metrics.Metrics` writes each line there first, then fans
it out to the trackers opened here (rank 0 only). Each tracker is an optional extra (``pip install
'pretrain[tensorboard]'``); none is imported unless asked for, and a missing one is an error naming its
extra before anything is trained (:func:`require`). Offline by default where there is a choice: TensorBoard
writes RUN/tb, MLflow a local file store RUN/mlruns (unless MLFLOW_TRACKING_URI is set), W&B runs offline
into RUN/wandb unless it has credentials or WANDB_MODE says otherwise, Trackio keeps its local database.

A run that resumes continues its tracker runs (their ids are kept in RUN/trackers.json): TensorBoard drops
the points logged after the checkpoint, as metrics.jsonl does; MLflow and W&B keep them.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain import PretrainError
from pretrain.io import write_json_atomic

# tracker → (the module it needs, the package and extra that provide it)
MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
           "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}
IDS_FILE = "trackers.json"
PROJECT = "pretrain"
"""The MLflow experiment, W&B project and Trackio project runs go to (MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT
and TRACKIO_PROJECT override it)."""


def require(names: list[str], key: str = "train.report_to") -> None:
    """Import each tracker's package now, before any training: a missing one is a PretrainError that names the
    extra to install."""
    for name in names:
        module, extra = MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise PretrainError(f"{key} {name} needs the {extra} package, which is not installed ({e}): "
                                f"pip install 'pretrain[{extra}]'") from None


class Tracker:
    """What :class:`pretrain.metrics.Metrics` writes to: ``log`` the scalars of one metrics.jsonl line at its
    step, ``close`` at the end (``failed``: the run ended by an error)."""

    name = ""
    where = ""
    """Where the logs go and how to look at them, printed when the run starts."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        pass

    def ident(self) -> dict[str, str] | None:
        """What continues this tracker's run when the run resumes (kept in OUT/trackers.json), if anything."""
        return None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line but its step (booleans, text, lists and nulls left out). A line
    that names an event with text (the spike guard's ``"guard": "skip"``) has its numbers under that name
    (``guard/loss``), apart from the regular scalars of the same name."""
    tag = next((k for k, v in record.items() if isinstance(v, str)), None)
    out = {}
    for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{tag}/{k}" if tag else k] = float(v)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} → {'train.lr': 1e-3}: the hyper-parameters trackers show."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(names: list[str], out: Path, params: dict[str, Any], resume_step: int | None = None,
                  say: Callable[[str], None] = print) -> list[Tracker]:
    """The trackers ``names`` for the run in ``out``, each told the (flattened) ``params``; ``say`` is given a
    line per tracker saying where its logs go. ``resume_step``: the run continues from that checkpoint step
    (the tracker runs recorded in out/trackers.json are continued); None: a new run."""
    if not names:
        return []
    require(names)
    out = Path(out)
    ids_path = out / IDS_FILE
    ids: dict[str, Any] = {}
    if resume_step is not None and ids_path.is_file():
        try:
            ids = json.loads(ids_path.read_text(encoding="utf-8"))
        except ValueError:
            ids = {}
    flat = flatten(params)
    trackers: list[Tracker] = []
    try:
        for name in names:
            tracker = OPENERS[name](out, flat, resume_step, ids.get(name))
            trackers.append(tracker)
            say(f"{name}: {tracker.where}")
    except Exception as e:
        for t in trackers:
            t.close(failed=True)
        if isinstance(e, PretrainError):
            raise
        raise PretrainError(f"report_to {name}: could not start logging ({type(e).__name__}: {e})") from e
    kept = {t.name: t.ident() for t in trackers if t.ident() is not None}
    if kept:
        write_json_atomic(ids_path, {**ids, **kept})
    return trackers


# ----------------------------------------------------------------------------------------------------------
# the trackers


class TensorBoard(Tracker):
    """Event files in OUT/tb: the scalars, the hyper-parameters (the HParams tab) and the config as text."""

    name = "tensorboard"

    def __init__(self, out: Path, params: dict[str, Any], resume_step: int | None, _ids: Any):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = out / "tb"
        # TensorBoard drops the points of earlier event files from purge_step on: a resumed run's points after
        # its checkpoint, or everything of an earlier run in this folder
        self.writer = SummaryWriter(str(logdir), purge_step=0 if resume_step is None else resume_step + 1)
        self.where = f"{logdir} (view: tensorboard --logdir {logdir})"
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        exp, ssi, self._sei = hparams(hp, {})
        self.writer.file_writer.add_summary(exp)
        self.writer.file_writer.add_summary(ssi)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self, failed: bool = False) -> None:
        if not failed:
            self.writer.file_writer.add_summary(self._sei)
        self.writer.close()


class MLflow(Tracker):
    """A run in experiment ``pretrain`` (or MLFLOW_EXPERIMENT_NAME) of the store MLFLOW_TRACKING_URI names, by
    default a local file store in OUT/mlruns; metrics at their steps, the config as parameters."""

    name = "mlflow"

    def __init__(self, out: Path, params: dict[str, Any], resume_step: int | None, ids: Any):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store (in maintenance mode) unless allowed: the local default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = ""
        if isinstance(ids, dict) and ids.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(ids["run_id"])
                self.run_id = run.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                have = run.data.params  # (a parameter once logged cannot change: the first value stays)
                params = {k: v for k, v in params.items() if k not in have}
            except Exception:  # gone from the store: a new run
                self.run_id = ""
        if not self.run_id:
            self.run_id = self.client.create_run(exp_id, run_name=out.resolve().name,
                                                 tags={"pretrain.out": str(out.resolve())}).info.run_id
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # (MLflow takes at most 100 parameters a batch)
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.uri = uri
        local = uri.startswith("file:")
        self.where = (f"run {self.run_id} of experiment {name!r} in {uri}"
                      + (f" (view: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {uri})"
                         if local else ""))

    def ident(self) -> dict[str, str]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def wandb_mode() -> str | None:
    """WANDB_MODE when set; 'offline' when W&B has no credentials (no WANDB_API_KEY, no netrc entry for its
    host); otherwise None (W&B's own default, online)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        if netrc.netrc().authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandB(Tracker):
    """A W&B run in OUT/wandb (project ``pretrain`` or WANDB_PROJECT), offline without credentials; the
    scalars against metrics.jsonl's step (logged as ``step``), the config as the run's config."""

    name = "wandb"

    def __init__(self, out: Path, params: dict[str, Any], resume_step: int | None, ids: Any):
        import wandb

        self.id = ids.get("id") if isinstance(ids, dict) and ids.get("id") else uuid.uuid4().hex[:8]
        mode = wandb_mode()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name,
                              dir=str(out), config=params, id=self.id, resume="allow", mode=mode)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.where = (f"{out / 'wandb'}, offline (upload: wandb sync {out / 'wandb'}/offline-run-*)"
                      if mode == "offline" else f"{getattr(self.run, 'url', None) or out / 'wandb'}")

    def ident(self) -> dict[str, str]:
        return {"id": self.id}

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio(Tracker):
    """A Trackio run named after OUT in project ``pretrain`` (or TRACKIO_PROJECT): Trackio's local database,
    or the Hugging Face Space TRACKIO_SPACE_ID names."""

    name = "trackio"

    def __init__(self, out: Path, params: dict[str, Any], resume_step: int | None, _ids: Any):
        import trackio

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        kwargs = {"resume": "allow"} if resume_step is not None else {}
        self.run = trackio.init(project=project, name=out.resolve().name, config=params, **kwargs)
        space = os.environ.get("TRACKIO_SPACE_ID")
        self.where = (f"project {project!r}, run {out.resolve().name!r}"
                      + (f" on the Space {space}" if space else f" (view: trackio show --project {project})"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.trackio.finish()


OPENERS: dict[str, Callable[..., Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB,
                                              "trackio": Trackio}
