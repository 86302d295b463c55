"""The loss-spike guard (``train.guard``): judge each step's loss and gradient norm *before* the optimizer
applies it, against a rolling window of the steps it accepted.

A step is a spike when its loss or gradient norm lies more than ``train.guard_z`` standard deviations above
the window's mean (after ``train.guard_warmup`` accepted steps), and is always bad when either is not finite.
What then happens is the mode's:

- ``stop``: the run ends with an error naming the step; the last checkpoint (before it) is kept.
- ``skip``: the update is dropped (gradients zeroed, no optimizer step); training goes on with the next batch.
- ``rollback``: weights, optimizer, RNG and counters go back to the last checkpoint, the samples drawn since
  then are skipped (the loader does not rewind), and the learning rate is scaled by ``train.guard_lr_scale``.

More than ``train.guard_max_events`` skips or rollbacks end the run: something is wrong beyond a bad batch.
The judgement uses the step's loss averaged over all processes and the global gradient norm, so every rank
decides the same. Events go to metrics.jsonl (``{"step", "guard", "loss", "grad_norm", "z"}``) and the run's
summary; the window and the event count are checkpointed, so a resumed run judges as the uninterrupted one.
PaLM (loss spikes: restart before them, skip 200-500 batches), OLMo and Megatron-LM describe why.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

MODES = ("off", "stop", "skip", "rollback")


class SpikeGuard:
    def __init__(self, mode: str = "off", z: float = 6.0, warmup: int = 50, window: int = 100,
                 max_events: int = 5):
        self.mode, self.z, self.warmup, self.max_events = mode, z, warmup, max_events
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.events: list[dict[str, Any]] = []

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def judge(self, loss: float, grad_norm: float) -> tuple[bool, float]:
        """(is this step bad, its z-score: the larger of loss and gradient norm; inf when not finite). A good
        step joins the window."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True, math.inf
        z = 0.0
        if len(self.losses) >= max(self.warmup, 2):
            z = max(_z(loss, self.losses), _z(grad_norm, self.norms))
            if z > self.z:
                return True, z
        self.losses.append(loss)
        self.norms.append(grad_norm)
        return False, z

    def record(self, step: int, loss: float, grad_norm: float, z: float, **extra: Any) -> dict[str, Any]:
        def num(x: float) -> float | None:  # (JSON has no NaN or infinity: the summary and metrics.jsonl)
            return x if math.isfinite(x) else None

        event = {"step": step, "guard": self.mode, "loss": num(loss), "grad_norm": num(grad_norm),
                 "z": num(z), **extra}
        self.events.append(event)
        return event

    @property
    def exhausted(self) -> bool:
        return len(self.events) > self.max_events

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.losses.clear()
        self.losses.extend(float(x) for x in state.get("losses", []))
        self.norms.clear()
        self.norms.extend(float(x) for x in state.get("norms", []))
        self.events = list(state.get("events", []))


def _z(x: float, past: deque[float]) -> float:
    mean = sum(past) / len(past)
    std = math.sqrt(sum((v - mean) ** 2 for v in past) / (len(past) - 1))
    return (x - mean) / max(std, 1e-3 * abs(mean), 1e-8)


def parse_fault(spec: str) -> tuple[str, int] | None:
    """``train.fault`` (tests only, checked by the config): 'nan@STEP' makes that step's loss and gradients
    NaN, 'spike@STEP' scales them by 1000; '' is none."""
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    return kind, int(at)
