"""Atomic checkpoints: ``RUN/checkpoints/step_NNNNNN/{model.safetensors, state.pt, meta.json}``.

A checkpoint is written into a temporary directory, every file fsync'ed, then renamed into place in one
step; ``meta.json`` (with each file's size and sha256) is written last. A crash at any moment therefore
leaves either the complete new checkpoint or none of it, and never touches the previous one. Weights are
safetensors; optimizer/loader/RNG state is loaded with ``torch.load(weights_only=True)``.

Runs of several processes (torchrun) save with ``torch.distributed.checkpoint`` instead: every rank writes
its own shard of the model and optimizer into ``step_NNNNNN/dcp/`` (``meta.json`` says ``"format": "dcp"``),
rank 0 adds ``state.pt`` (loader, RNG), by default the consolidated ``model.safetensors`` that eval, export
and fine-tuning read, and ``meta.json``, then renames the directory into place, after a barrier. Such a
checkpoint loads at any world size, one process included (DCP reshards on load).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from pretrain import PretrainError
from pretrain.io import (
    atomic_path,
    default_mode,
    fsync_dir,
    fsync_file,
    nbytes,
    write_failed,
    write_json_atomic,
)

CKPT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
DCP_DIR = "dcp"


class CheckpointError(PretrainError):
    """A checkpoint is missing, truncated or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``checkpoints/latest`` at it, keep the newest ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE))
        default_mode(tmp / MODEL_FILE)
        torch.save(state, tmp / STATE_FILE)
        files = _file_records(tmp, (MODEL_FILE, STATE_FILE))
    except OSError as e:  # a full disk, above all: nothing half-written stays, the last checkpoint is intact
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise write_failed(e, f"checkpoint step {step}", root, nbytes(model.state_dict()) + nbytes(state),
                           f"the previous checkpoint {previous} is intact" if previous else "") from None
    _commit(run_dir, tmp, final, {**meta, "step": step, "files": files}, keep)
    return final


def _file_records(tmp: Path, names) -> dict[str, dict[str, Any]]:
    files = {}
    for name in names:
        fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    return files


def _commit(run_dir: str | Path, tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    """meta.json last, then one rename into place; ``latest`` and keep-last-``keep`` follow."""
    root = final.parent
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume that trained no further)
        trash = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    _point_latest(root, final.name)
    for old in list_checkpoints(run_dir)[:-keep]:
        trash = root / f".trash_{old.name}_{os.getpid()}"  # out of sight first, so a half-deleted
        os.replace(old, trash)  # checkpoint is never mistaken for a complete one
        shutil.rmtree(trash, ignore_errors=True)
    for stale in [*root.glob(".tmp_*"), *root.glob(".trash_*")]:  # leftovers of crashed writers
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# several processes: torch.distributed.checkpoint (sharded), resumable at any world size


def optimizer_parts(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind ``optimizer`` (a MultiOptimizer holds several)."""
    return list(getattr(optimizer, "parts", [optimizer]))


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this; rank 0 gets the whole model's weights on CPU (tied weights stored once),
    the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pretrain.distributed import unwrap

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _without_aliases(full, unwrap(model))


def _without_aliases(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` with each tied weight under its first name only (as load_weights expects)."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return {k: v.detach().contiguous() for k, v in sd.items() if k not in aliases}


def _save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # (a channels_last model's convolution weights are strided otherwise; safetensors stores them dense)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    default_mode(path)


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer,
                            state: dict[str, Any], meta: dict[str, Any], keep: int = 2,
                            consolidate: bool = True) -> Path:
    """Called by every rank: each writes its shard of model + optimizer (DCP); rank 0 writes ``state``
    (loader, RNG: the same on every rank), the consolidated model.safetensors (``consolidate``) and meta.json,
    and renames the checkpoint into place once all shards are on disk. Needs a filesystem shared by all
    ranks."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from pretrain.distributed import barrier, is_main

    root = Path(run_dir) / CKPT_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_dcp"  # one name for all ranks
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    barrier()
    from torch.distributed.checkpoint.api import CheckpointException

    from pretrain.distributed import any_rank

    failed: BaseException | None = None
    names = [STATE_FILE]
    try:
        msd, osd = get_state_dict(model, optimizer_parts(optimizer))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / DCP_DIR)  # once every shard is written
    except (OSError, CheckpointException) as e:  # (a rank's failed write is raised on every rank)
        failed = e
    full = _full_weights(model) if consolidate and failed is None else {}
    if is_main() and failed is None:
        try:
            if consolidate:
                _save_weights(full, tmp / MODEL_FILE)
                names.insert(0, MODEL_FILE)
            torch.save(state, tmp / STATE_FILE)
            # size and sha256 of every shard, as for the other files: damage is caught on load
            shards = _file_records(tmp / DCP_DIR, sorted(f.name for f in (tmp / DCP_DIR).iterdir()))
            fsync_dir(tmp / DCP_DIR)
        except OSError as e:
            failed = e
    # every rank stops together, and nothing half-written stays
    if any_rank(failed is not None, next(model.parameters()).device):
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        previous = latest_checkpoint(run_dir)
        cause = (failed if isinstance(failed, OSError)
                 else OSError(f"another process could not write its part: {failed}"))
        raise write_failed(cause, f"checkpoint step {step}", root, None,
                           f"the previous checkpoint {previous} is intact" if previous else "") from None
    if is_main():
        meta = {**meta, "step": step, "format": "dcp", "world_size": dist.get_world_size(),
                "files": _file_records(tmp, names), "dcp_files": shards}
        _commit(run_dir, tmp, final, meta, keep)
    barrier()
    return final


def is_sharded(meta: dict[str, Any]) -> bool:
    return meta.get("format") == "dcp"


def _verify_shards(ckpt: Path, meta: dict[str, Any]) -> Path:
    d = ckpt / DCP_DIR
    for name, info in meta.get("dcp_files", {}).items():
        _check_file(d / name, info if isinstance(info, dict) else {"bytes": info})  # older runs: a size only
    if not (d / ".metadata").is_file():
        raise CheckpointError(f"{d} has no .metadata: not a complete torch.distributed.checkpoint")
    return d


def _dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(state_dict, checkpoint_id=path, no_dist=single)
        except (Exception, CheckpointException) as e:  # DCP raises assorted errors (and wraps each rank's)
            raise CheckpointError(f"cannot load the sharded checkpoint {path}: "
                                  f"{str(e).splitlines()[0][:300]}") from None


def load_sharded(ckpt: Path, model: nn.Module, optimizer, meta: dict[str, Any] | None = None) -> None:
    """Load model and optimizer (any wrapping: plain, DDP, FSDP2; any world size) from a DCP checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = meta if meta is not None else read_meta(ckpt)
    path = _verify_shards(ckpt, meta)
    parts = optimizer_parts(optimizer)
    msd, osd = get_state_dict(model, parts)  # the layout (and shards) this run wants; DCP fills it in place
    _dcp_load({"model": msd, "optim": osd}, path)
    set_state_dict(model, parts, model_state_dict=msd, optim_state_dict=osd)


def load_full_optimizer(model: nn.Module, optimizer, saved: dict[str, Any]) -> None:
    """Load a single-process optimizer state_dict (parameters numbered in order) into an optimizer of a
    sharded (FSDP2) ``model``: each rank keeps its shard of every state tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    parts = optimizer_parts(optimizer)
    saved_parts = saved["parts"] if "parts" in saved else [saved]
    if len(saved_parts) != len(parts):
        raise ValueError("optimizer state does not match this optimizer (different train.optimizer?)")
    names = {id(p): n for n, p in model.named_parameters()}
    for opt, sd in zip(parts, saved_parts):
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        if len(order) != sum(len(g["params"]) for g in sd["param_groups"]):
            raise ValueError("optimizer state does not match this optimizer's parameters")
        fqn_sd = {"state": {order[int(i)]: v for i, v in sd["state"].items()},
                  "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                   for g in sd["param_groups"]]}
        set_optimizer_state_dict(model, opt, fqn_sd, options=StateDictOptions(full_state_dict=True))


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write a sharded (DCP) checkpoint's weights as one ``model.safetensors`` (into the checkpoint, recorded
    in its meta.json, unless ``out`` names another file). ``path``: a checkpoint or run directory."""
    from pretrain.config import Config, from_dict
    from pretrain.models import build_model

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if not is_sharded(meta):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint: its {MODEL_FILE} is already the whole "
                              "model")
    model = build_model(from_dict(Config, meta["config"]).model)
    load_weights(ckpt, model, meta)
    target = Path(out) if out is not None else ckpt / MODEL_FILE
    with atomic_path(target) as tmp:
        _save_weights(_without_aliases(model.state_dict(), model), tmp)
    if out is None:  # record it, so load_weights verifies it like any other
        meta["files"] = {**meta.get("files", {}), **_file_records(ckpt, (MODEL_FILE,))}
        write_json_atomic(ckpt / META_FILE, meta)
    return target


def _point_latest(root: Path, name: str) -> None:
    link = root / "latest"
    tmp = root / f".latest_{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError:  # filesystems without symlinks: a text file naming the directory
        (root / "latest.txt").write_text(name + "\n")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    for old in root.glob(".old_step_*"):  # a re-save of the same step crashed between its two renames
        name = old.name[len(".old_"):].rsplit("_", 1)[0]
        if not (root / name).exists() and (old / META_FILE).is_file():
            os.replace(old, root / name)
    dirs = [d for d in root.glob("step_*") if d.is_dir() and (d / META_FILE).is_file() and _step_of(d) >= 0]
    return sorted(dirs, key=_step_of)


def _step_of(d: Path) -> int:
    try:
        return int(d.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (→ its newest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if (p / META_FILE).is_file() and ((p / MODEL_FILE).exists() or (p / DCP_DIR).is_dir()):
        return p
    if p.is_dir():
        ck = latest_checkpoint(p)
        if ck is not None:
            return ck
        raise CheckpointError(f"{p} has no complete checkpoint (expected {CKPT_DIR}/step_*/{META_FILE})")
    raise CheckpointError(f"not found: {p}")


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE} is unreadable or corrupt: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{ckpt / META_FILE} is not a pretrain checkpoint manifest")
    return meta


def _verify(ckpt: Path, meta: dict[str, Any], name: str) -> Path:
    p = ckpt / name
    _check_file(p, meta.get("files", {}).get(name))
    return p


def _check_file(p: Path, info: dict[str, Any] | None) -> None:
    """``p`` exists and, as far as recorded at save time (``info``: bytes, sha256), is what was written."""
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: the checkpoint is incomplete")
    if info:
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{p} is truncated or corrupt ({size} bytes, expected {info['bytes']})")
        if "sha256" in info and _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p} is corrupt (sha256 does not match the one recorded at save time)")


def load_weights(ckpt: Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Load model.safetensors into ``model`` (strict; tied weights are stored once); from the shards of a
    sharded checkpoint written without it (train.consolidate false)."""
    meta = meta if meta is not None else read_meta(ckpt)
    if is_sharded(meta) and MODEL_FILE not in meta.get("files", {}):
        sd = model.state_dict()
        _dcp_load({"model": sd}, _verify_shards(ckpt, meta))
        return
    p = _verify(ckpt, meta, MODEL_FILE)
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt: {e}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    # a tied weight is saved under one of its names only
    ptrs = {}
    for k, v in own.items():
        ptrs.setdefault(v.data_ptr(), []).append(k)
    tied_ok = {k for names in ptrs.values() if len(names) > 1 and any(n in tensors for n in names)
               for k in names}
    missing = [k for k in missing if k not in tied_ok]
    if missing or unexpected:
        raise CheckpointError(f"{p} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{p}: {k} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False)


def load_state(ckpt: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The optimizer/loader/RNG state saved beside the weights (weights_only=True)."""
    meta = meta if meta is not None else read_meta(ckpt)
    p = _verify(ckpt, meta, STATE_FILE)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted errors on damaged pickles/zip archives
        raise CheckpointError(f"{p} is corrupt: {str(e).splitlines()[0][:200]}") from None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", part: str = "encoder"):
    """A run directory or checkpoint → (model in eval mode, Config, Tokenizer, checkpoint meta).

    ``part`` "encoder" (the default: what features, fine-tuning, probes and export use): the part of the model
    that transfers, as its architecture's spec says (``models.transferable``; ELECTRA: the discriminator, a
    plain 'bert' encoder), with a Config that describes that part; the whole model for architectures
    without such a part. "whole": the model as trained and the run's own Config (to evaluate the run)."""
    from pretrain.config import Config, from_dict
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models import build_model, get_spec, transferable

    if part not in ("encoder", "whole"):
        raise ValueError(f"part must be 'encoder' or 'whole', got {part!r}")

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if "config" not in meta:
        raise CheckpointError(f"{ckpt / META_FILE} has no config: not a pretrain checkpoint")
    cfg = from_dict(Config, meta["config"])
    model = build_model(cfg.model)
    load_weights(ckpt, model, meta)
    model.to(device).eval()
    if get_spec(cfg.model.arch).modality != "text":  # images: no tokenizer (cfg.model describes the pixels)
        if part == "encoder":
            model, cfg = transferable(model, cfg)
        return model, cfg, None, meta
    tok_path = next((p for p in (ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json")
                     if p.is_file()), None)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.json beside {ckpt} or in its run directory")
    tok = Tokenizer.load(tok_path)
    _verify_tokenizer(tok, tok_path, ckpt, meta, cfg.data.path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"{tok_path} has {tok.vocab_size} tokens but the model only "
                              f"{cfg.model.vocab_size}")
    if part == "encoder":
        model, cfg = transferable(model, cfg)
    return model, cfg, tok, meta


class TokenizerMismatchError(PretrainError):
    """A run's tokenizer.json is not the tokenizer it was trained with (the checkpoint is fine: not a
    :class:`CheckpointError`, which callers report as "not a pre-trained run")."""


def _verify_tokenizer(tok, tok_path: Path, ckpt: Path, meta: dict[str, Any], data_path: str) -> None:
    """``tok`` (read from ``tok_path``) is the tokenizer the run was trained with: its sha256 is the
    ``tokenizer_sha256`` the checkpoint recorded at training time. A swapped tokenizer.json, even one of the
    same size, would give the model other token ids than it learned: an error that names both hashes and what
    to do. Checkpoints from before the hash was recorded load unchecked."""
    from pretrain.data.tokenizer import Tokenizer, TokenizerError

    expected = meta.get("tokenizer_sha256")
    if not expected:
        return
    actual = tok.sha256()
    if actual == expected:
        return
    data_tok, data_sha = _data_tokenizer(data_path)
    if (data_tok is not None and data_sha == expected
            and tok_path.read_bytes() == data_tok.read_bytes()):
        # the very file the data was prepared with (its manifest records the same hash): the hash differs
        # only because this version of `tokenizers` serialises the same tokenizer differently
        return
    fix = ("put back the tokenizer.json this run was trained with (a copy is in the data folder it was "
           "trained on, if that folder was not prepared again since)")
    if data_tok is not None:
        try:
            if Tokenizer.load(data_tok).sha256() == expected:
                fix = f"copy {data_tok} (the training data's tokenizer, whose sha256 matches) to {tok_path}"
        except TokenizerError:
            pass
    raise TokenizerMismatchError(
        f"{tok_path} is not the tokenizer this run was trained with: its sha256 is {actual}, but "
        f"{ckpt / META_FILE} records tokenizer_sha256 {expected} (a different tokenizer, even one of the "
        f"same size, would feed the model token ids it was not trained on); {fix}")


def _data_tokenizer(data_path: str) -> tuple[Path | None, str | None]:
    """The training data's tokenizer.json (when it is still there) and the sha256 its manifest records."""
    if not data_path:
        return None, None
    try:
        tmeta = json.loads((Path(data_path) / "meta.json").read_text(encoding="utf-8"))["tokenizer"]
        p = Path(data_path) / tmeta.get("file", "tokenizer.json")
        return (p if p.is_file() else None), tmeta.get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


# ----------------------------------------------------------------------------------------------------------
# the trainer's view: every stateful part of a run, saved and restored together


@dataclass
class TrainState:
    """What the loop advances besides the model, optimizer, loader and RNG; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    """Wall time of all training so far (over every resume)."""
    best_val: float = math.inf
    last_val: float | None = None
    """The latest evaluation's validation loss (a resumed run starts from its checkpoint's)."""
    loss_sum: float = 0.0
    """Train loss summed since the last log line, and over how many steps (exact resume of the mean)."""
    loss_n: int = 0


def verify_checkpoint(ckpt: Path) -> None:
    """Every file a checkpoint recorded is there, with the size and sha256 it was written with (a clear
    CheckpointError otherwise)."""
    meta = read_meta(ckpt)
    for name in meta.get("files", {}):
        _verify(ckpt, meta, name)
    if is_sharded(meta):
        _verify_shards(ckpt, meta)


def resume_point(run: Path, resume: bool = False) -> Path | None:
    """The checkpoint a run continues from: its newest complete one, verified. An incomplete checkpoint
    (a save that never finished) is skipped with a warning naming it; a damaged newest one is an error that
    names the newest one that does verify, so nothing is overwritten unseen; a run with a training history
    (metrics.jsonl) but no checkpoint, or ``resume`` asked with none, is an error rather than a new start
    from step 0."""
    import warnings

    root = run / CKPT_DIR
    complete = list_checkpoints(run)
    for d in sorted(root.glob("step_*")) if root.is_dir() else []:
        if d.is_dir() and d not in complete:
            warnings.warn(f"skipping {d}: an incomplete checkpoint (no {META_FILE}: its save did not finish)",
                          stacklevel=2)
    if not complete:
        history = _last_logged_step(run / "metrics.jsonl")
        if history or resume:
            what = f"a training history to step {history} (metrics.jsonl)" if history else "no checkpoint"
            raise CheckpointError(f"{run} holds {what} but no complete checkpoint to continue from, and "
                                  "training again from step 0 would write over it: continue from a copy that "
                                  "has its checkpoints, or start the run in another --out")
        return None
    newest = complete[-1]
    try:
        verify_checkpoint(newest)
        return newest
    except CheckpointError as e:
        problem = str(e)
    good = None
    for older in reversed(complete[:-1]):
        try:
            verify_checkpoint(older)
            good = older
            break
        except CheckpointError:
            continue
    hint = (f"{good} verifies: move {newest.name} out of {root} to resume from it" if good is not None
            else "no earlier checkpoint verifies either")
    raise CheckpointError(f"the newest checkpoint {newest} is damaged ({problem}); it is left as it is; "
                          f"{hint}")


def _last_logged_step(path: Path) -> int:
    if not path.is_file():
        return 0
    last = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue  # a line torn by a crash
    return last


class Checkpointer:
    """Owns a run's checkpoints: finds the newest complete one to resume from (the same on every rank), checks
    that it belongs to this run (tokenizer, data, global batch), restores every stateful part (weights,
    optimizer, loader position, RNG, :class:`TrainState`), and saves them all atomically every ``interval``
    steps and at the end, keeping the newest ``keep`` (sharded with torch.distributed.checkpoint when several
    processes train)."""

    def __init__(self, run: Path, distributed: bool, interval: int, keep: int, consolidate: bool = True,
                 resume: bool = False):
        """``resume``: the user asked to continue (``--resume``): a run without a usable checkpoint is then
        an error, not a fresh start."""
        from pretrain.distributed import broadcast_object, is_main

        self.run, self.distributed, self.interval, self.keep = Path(run), distributed, interval, keep
        self.consolidate = consolidate
        found = resume_point(self.run, resume) if is_main() else None
        self.ckpt: Path | None = broadcast_object(found)
        self.meta: dict[str, Any] = read_meta(self.ckpt) if self.ckpt is not None else {}
        self.identity: dict[str, Any] = {}
        """What every checkpoint of this run records about it (tokenizer, data fingerprint, config, ...)."""
        self.saved_step = self.meta.get("step", -1)
        self.latest: Path | None = self.ckpt
        """The checkpoint written last (or resumed from): where a rollback goes back to."""
        self.extra: dict[str, Any] = {}
        """State of other parts (the spike guard's window) restored from the checkpoint."""

    @property
    def resuming(self) -> bool:
        return self.ckpt is not None

    def check(self, data_path: str, tokenizer_sha256: str, fingerprint: str, global_batch: int,
              world_size: int, key: str = "tokenizer_sha256") -> None:
        """The checkpoint continues this run: the same tokenizer (``key`` 'image_sha256': the same image
        format and pixel statistics), the same data, the same global batch."""
        from pretrain.config import ConfigError

        if not self.resuming:
            return
        m = self.meta
        if m.get(key) not in (None, tokenizer_sha256):
            what = "tokenized with a different tokenizer" if key == "tokenizer_sha256" else \
                "prepared with another image size, channels or pixel statistics"
            raise PretrainError(f"{data_path} was {what} than the run in {self.run}")
        if m.get("data_fingerprint") not in (None, fingerprint):
            raise PretrainError(f"the data in {data_path} is not the data the run in {self.run} was trained "
                                "on (it was prepared again from other inputs, or with other settings), so "
                                "resuming would not continue the same sample order; prepare it into another "
                                "folder, or start a new run from this one's weights (pretrain export, then "
                                "--init-from)")
        saved_tc = m.get("config", {}).get("train", {})
        saved_batch = (m.get("global_batch_size")
                       or saved_tc.get("batch_size", 0) * saved_tc.get("grad_accum", 1))
        if saved_batch != global_batch:
            raise ConfigError(f"the run in {self.run} was trained with a global batch of {saved_batch} "
                              f"sequences, this launch has {global_batch} (batch_size x grad_accum x "
                              f"{world_size} process(es)); set --train.global_batch_size {saved_batch} to "
                              "continue it")

    def restore_weights(self, model: nn.Module) -> None:
        """The weights of a whole-model checkpoint, into the bare model (before it is wrapped or sharded)."""
        if self.resuming and not is_sharded(self.meta):
            load_weights(self.ckpt, model, self.meta)

    def restore(self, model: nn.Module, optimizer, loader) -> TrainState:
        """Optimizer (and a sharded checkpoint's weights), loader position, RNG streams and train state, once
        the model is wrapped and the optimizer built; a fresh TrainState for a new run."""
        if not self.resuming:
            return TrainState()
        m, state = self.meta, load_state(self.ckpt, self.meta)
        _load_optimizer(self.ckpt, m, state, model, optimizer)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.extra = state.get("extra", {})
        return _train_state(m, state)

    def rewind(self, model: nn.Module, optimizer) -> tuple[TrainState, dict[str, Any]]:
        """Back to :attr:`latest`: weights, optimizer, RNG streams and train state (the loader is left where
        it is, so the samples drawn since are not seen again; its state then comes back with the train
        state). For the spike guard's rollback."""
        from pretrain.distributed import unwrap

        ckpt = self.latest
        assert ckpt is not None
        m = read_meta(ckpt)
        state = load_state(ckpt, m)
        if not is_sharded(m):
            load_weights(ckpt, unwrap(model), m)
        _load_optimizer(ckpt, m, state, model, optimizer)
        set_rng_state(state["rng"])
        return _train_state(m, state), state["loader"]

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def save(self, st: TrainState, model: nn.Module, optimizer, loader_state: dict[str, Any],
             extra: dict[str, Any] | None = None) -> None:
        """Checkpoint step ``st.step`` (every rank calls it; sharded, each writes its part); ``extra``: the
        state of other parts (comes back as :attr:`extra`)."""
        saved = {"loader": loader_state, "rng": rng_state(), "loss_sum": st.loss_sum, "loss_n": st.loss_n}
        if extra:
            saved["extra"] = extra
        info = {"tokens_seen": st.tokens_seen, "elapsed_s": st.elapsed_s, "val_loss": st.last_val,
                "best_val_loss": None if math.isinf(st.best_val) else st.best_val, **self.identity}
        if self.distributed:
            self.latest = save_sharded_checkpoint(self.run, st.step, model, optimizer, saved, info,
                                                  keep=self.keep, consolidate=self.consolidate)
        else:
            state = {"optimizer": optimizer.state_dict(), **saved}
            self.latest = save_checkpoint(self.run, st.step, model, state, info, keep=self.keep)
        self.saved_step = st.step


def _load_optimizer(ckpt: Path, meta: dict[str, Any], state: dict[str, Any], model: nn.Module,
                    optimizer) -> None:
    """The optimizer (and a sharded checkpoint's weights) from checkpoint ``ckpt``."""
    from pretrain.distributed import is_fsdp

    try:
        if is_sharded(meta):
            load_sharded(ckpt, model, optimizer, meta)
        elif is_fsdp(model):
            load_full_optimizer(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise PretrainError(f"cannot restore the optimizer from {ckpt}: {e}") from None


def _train_state(meta: dict[str, Any], state: dict[str, Any]) -> TrainState:
    return TrainState(step=meta["step"], tokens_seen=meta["tokens_seen"],
                      elapsed_s=meta.get("elapsed_s", 0.0), best_val=meta.get("best_val_loss") or math.inf,
                      last_val=meta.get("val_loss"),
                      loss_sum=state.get("loss_sum", 0.0), loss_n=state.get("loss_n", 0))
