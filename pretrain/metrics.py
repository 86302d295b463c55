"""What a run reports as it goes, for pre-training and fine-tuning alike: progress (a tqdm bar on a terminal,
plain log lines otherwise), metrics.jsonl (one JSON object per line, cut back to the checkpoint on resume)
and the loss curve."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pretrain import PretrainError
from pretrain.io import write_text_atomic


class Progress:
    """A tqdm bar on a terminal, plain log lines (to stderr) otherwise."""

    def __init__(self, total: int, initial: int, quiet: bool = False, max_time_s: float = 0.0,
                 elapsed_s: float = 0.0):
        """``max_time_s`` (a time budget; ``elapsed_s`` of it spent before): the ETA is the sooner of the step
        budget's and the time budget's."""
        self.total, self.quiet = total, quiet
        self.bar = None
        self.t0 = time.time()
        self.initial = initial
        self.max_time_s, self.elapsed_s = max_time_s, elapsed_s
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, info: dict[str, Any], line: bool = True) -> None:
        """Move the bar to ``step`` showing ``info``; without a bar, a log line (unless ``line`` is false)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: v for k, v in info.items() if k != "val_loss" or v}, refresh=True)
            return
        if not line:
            return
        done, spent = step - self.initial, time.time() - self.t0
        eta = spent / max(done, 1) * (self.total - step)
        by_time = self.max_time_s and self.max_time_s - self.elapsed_s - spent < eta
        if by_time:
            eta = max(self.max_time_s - self.elapsed_s - spent, 0.0)
        head = f"step {step}" if by_time else f"step {step}/{self.total}"
        parts = [head] + [f"{k} {v}" for k, v in info.items()] + [f"eta {eta:.0f}s"]
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Metrics:
    """Appends one JSON object per line to metrics.jsonl; on resume, drops lines past the checkpoint. Each
    line also goes to the experiment ``trackers`` (pretrain/trackers.py: TensorBoard, MLflow, ...), if any."""

    def __init__(self, path: Path, keep_upto_step: int, trackers: list[Any] | None = None):
        self.path = path
        self.trackers = list(trackers or [])
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_upto_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
            write_text_atomic(path, "".join(k + "\n" for k in kept))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """One line of strict JSON: a non-finite number (an infinite gradient norm) is written as null."""
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.f.write(json.dumps(clean, allow_nan=False) + "\n")
        self.f.flush()
        if self.trackers:
            self._fan_out(clean)

    def _fan_out(self, record: dict[str, Any]) -> None:
        """The line's scalars to every tracker; one that fails is warned about and dropped (metrics.jsonl, the
        record, goes on)."""
        from pretrain.trackers import scalars

        values, step = scalars(record), int(record.get("step", 0))
        if not values:
            return
        for t in list(self.trackers):
            try:
                t.log(values, step)
            except Exception as e:  # (a tracker's server gone: the run goes on)
                warnings.warn(f"report_to {t.name}: logging failed ({type(e).__name__}: {e}); it is off for "
                              "the rest of this run (metrics.jsonl goes on)", stacklevel=2)
                self.trackers.remove(t)

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and end the trackers' runs (``failed``: the run ended by an error); a second
        call does nothing."""
        if not self.f.closed:
            self.f.close()
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(failed=failed)
            except Exception as e:
                warnings.warn(f"report_to {t.name}: closing failed ({type(e).__name__}: {e})", stacklevel=2)


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def divergence(kind: str, step: int, what: str, value: float, knob: str, kept: str) -> PretrainError:
    """The error that ends a diverged run, pre-training and fine-tuning alike: ``{kind} diverged at step N
    ({what} {value}); lower {knob}`` and what on disk is still good. Both loops check the loss (and the
    gradient norm) at every log line and before anything is saved, so a diverged model is never written."""
    return PretrainError(f"{kind} diverged at step {step} ({what} {value}); lower {knob} ({kept})")
