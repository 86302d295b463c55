"""Several processes, GPUs and machines on PyTorch's own engine (torch.distributed): process-group setup from
``torchrun``'s environment, rank helpers, and the wrappers applied to a model from outside (model code has no
distributed logic), in this order: :func:`apply_activation_checkpointing` (optional), :func:`apply_compile`
(per block under FSDP), then :func:`apply_fsdp` or :func:`apply_ddp`.

A plain ``python -m pretrain train ...`` is one process with no process group, exactly as before;
``torchrun --nproc-per-node N -m pretrain train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK and
:func:`init_distributed` joins the group (NCCL on CUDA, one GPU per local rank; gloo on CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pretrain.config import ConfigError
from pretrain.models import spec_of


@dataclass
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    active: bool = False
    """A process group is in use (the run is launched by torchrun, or by a caller that set one up)."""
    owned: bool = False
    """:func:`init_distributed` created the group, so :func:`teardown` destroys it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (or the caller already made); otherwise a single process.

    On CUDA each process takes GPU ``LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo. A collective
    that waits longer than ``timeout_s`` for the other ranks fails the job instead of hanging it.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistEnv(rank, world, local, _local_device(device, local), active=True)
    if not launched_by_torchrun():
        return DistEnv(0, 1, 0, device)
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: run a single process (no torchrun)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = _local_device(device, local)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return DistEnv(rank, world, local, device, active=True, owned=True)


def _local_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                          "visible): start at most one process per GPU (--nproc-per-node)")
    return torch.device("cuda", local_rank)


def teardown(env: DistEnv) -> None:
    """Leave the process group (if :func:`init_distributed` made it). A torchrun worker other than rank 0
    then prints nothing more on stdout: the job's summary (or ``--json`` object) comes from rank 0 alone."""
    if env.owned and dist.is_initialized():
        dist.destroy_process_group()
    if env.owned and not env.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this worker process


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over the ranks, in place (SUM then divide: gloo has no AVG)."""
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (asynchronous on the device: no host sync)."""
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks take the same decision)."""
    return bool(max_over_ranks(1.0 if flag else 0.0, device))


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of all ranks, on every rank (one all-reduce; the value itself when alone)."""
    if not _active():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ----------------------------------------------------------------------------------------------------------
# wrappers, applied from outside the model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, as its architecture's spec names them."""
    return spec_of(model).block_list(model)


class _DDP(DDP):
    """DDP whose unknown attributes fall through to the model, so an objective can call e.g. ``model.logits``
    (the masked-LM head, run on the selected positions only) on the wrapper as on the bare model."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward.
    Buffers are not re-broadcast each forward (ours are deterministic rotary tables)."""
    import inspect

    # broadcast_buffers' new name
    newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return _DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2 (``fully_shard``): each transformer block, then the root (embeddings, final norm, head).
    Parameters, gradients and optimizer state are sharded over the ranks; a block's parameters are
    all-gathered just before it runs. ``param_dtype`` bf16 computes in bf16 with gradients reduced in fp32
    (on CUDA); on CPU everything stays fp32. The model is changed in place and returned."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block's activations during backward instead of keeping them
    (torch.utils.checkpoint, non-reentrant): less memory for about one more forward pass. Applied in place
    by wrapping each block's ``forward`` (parameter names and the state dict are unchanged); apply it before
    :func:`apply_compile` and sharding."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation / generation: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def apply_compile(model: nn.Module, log: Callable[[str], None] | Any = None,
                  per_block: bool = False) -> nn.Module:
    """torch.compile the model (or, with ``per_block``, each transformer block in place, the order FSDP
    needs: compile, then shard); graphs that fail to compile run eagerly (with a warning) instead."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    warn = getattr(log, "write", log) or (lambda _msg: None)
    try:
        if per_block and blocks(model):
            for block in blocks(model):
                block.compile()
            return model
        return torch.compile(model)
    except Exception as e:  # pragma: no cover - depends on the platform's compiler
        warn(f"warning: torch.compile failed ({str(e).splitlines()[0]}); running eagerly")
        return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 wraps in place, so the model itself)."""
    return model.module if isinstance(model, DDP) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: with ``enabled`` false (all but the last micro-batch of a
    step) gradients only accumulate locally, skipping the all-reduce / reduce-scatter."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards under FSDP); returns the norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm
