"""Several processes on torch.distributed: 2 processes on CPU (gloo) launched with torchrun, and the same on a
GPU (NCCL) when there is one.

- equivalence: DDP and FSDP runs log the same loss curve as one process with the same global batch and seed;
- elastic resume: a checkpoint saved by 2 processes continues in 1, and one saved by 1 continues in 2, on
  the same curve;
- two "nodes" (two torchrun launchers, --nnodes 2, rendezvous on 127.0.0.1) train together;
- killing one rank stops the whole job quickly, and its last complete checkpoint resumes exactly;
- an error on one rank stops the job with that rank's message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _corpus import TINY_TRAIN, overrides, write_corpus

from pretrain.checkpoint import consolidate, latest_checkpoint, load_pretrained, read_meta
from pretrain.cli import main

# global batch 8 = 4 sequences x 2 processes, or 4 x 2 micro-batches in one process
TRAIN = {**TINY_TRAIN, "train": {**TINY_TRAIN["train"], "max_steps": 20, "global_batch_size": 8,
                                 "keep_checkpoints": 3}}
TOL = 1e-4  # fp32 on CPU: the curves agree to ~1e-6
# fp32 for the checks below that compare curves to 1e-4 across resumes and process counts; bf16 autocast (the
# default on CPUs with native bf16) has its own (test_two_processes_in_bf16_autocast_track_one)
CPU = ["--train.device", "cpu", "--train.dtype", "fp32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_corpus(root / "corpus")
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "char",
                 "--val-fraction", "0.2"]) == 0
    return root / "data"


def args_for(data_dir: Path, *extra: str) -> list[str]:
    return [*overrides(TRAIN), "--data.path", str(data_dir), "--quiet", *extra]


def curve(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl written by more than one rank, or steps repeated"
    return {r["step"]: r for r in rows}


def assert_same_curve(a: dict[int, dict], b: dict[int, dict], tol: float = TOL) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("train_loss", "val_loss", "grad_norm"):
            assert (key in a[step]) == (key in b[step]), (step, key)
            if key in a[step]:
                assert a[step][key] == pytest.approx(b[step][key], abs=tol), (step, key, a[step][key],
                                                                               b[step][key])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, script: Path | None = None, launcher: list[str] | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """torchrun (``python -m torch.distributed.run``) of ``pretrain train ARGS`` (or of ``script``)."""
    target = [str(script)] if script else ["-m", "pretrain", "train"]
    launcher = launcher or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *launcher, *target,
           *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(args: list[str], nproc: int = 2, timeout: float = 180) -> str:
    proc = launch(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def copy_until(run: Path, dest: Path, step: int) -> Path:
    """A copy of ``run`` whose newest checkpoint is ``step`` (as if it had stopped there)."""
    shutil.copytree(run, dest, symlinks=True)
    for ck in (dest / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    assert latest_checkpoint(dest).name == f"step_{step:06d}"
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """One process, global batch 8 as 2 micro-batches of 4."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--out", str(run), *args_for(data_dir, *CPU)]) == 0
    return run


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_procs(request, tmp_path_factory, data_dir) -> tuple[str, Path]:
    """The same run on 2 processes (4 sequences each), DDP or FSDP."""
    run = tmp_path_factory.mktemp(f"two_{request.param}") / "run"
    out = torchrun(["--out", str(run), *args_for(data_dir, *CPU, "--train.parallelism", request.param)])
    assert out.count("trained ") == 1  # the summary comes from rank 0 only
    return request.param, run


# ----------------------------------------------------------------------------------------------------------
# the loader's slices, and what is refused (no processes needed)


def test_ranks_read_disjoint_slices_of_the_global_batch(data_dir):
    from pretrain.data.loader import TokenSplit, TrainLoader

    split = TokenSplit(data_dir, "train")
    one = TrainLoader(split, 32, 4, seed=3)
    ranks = [TrainLoader(split, 32, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(torch.cat(parts), whole)  # the union is the single-process batch, in order
    assert {ld.state_dict()["samples_seen"] for ld in ranks} == {one.state_dict()["samples_seen"]}


def test_resume_needs_the_same_global_batch(tmp_path, data_dir, reference, capsys):
    run = copy_until(reference, tmp_path / "run", 10)
    assert main(["train", "--out", str(run),
                 *args_for(data_dir, *CPU, "--train.global_batch_size", "4")]) == 2
    assert "global batch of 8" in capsys.readouterr().err


def test_muon_with_fsdp_is_refused(tmp_path, data_dir, monkeypatch, capsys):
    # a 1-process group in this process (as torchrun would set it up): the distributed code path, cheaply
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--out", str(tmp_path / "run"),
                 *args_for(data_dir, *CPU, "--train.parallelism", "fsdp", "--train.optimizer", "muon")]) == 2
    assert "muon is not supported with train.parallelism fsdp" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # torn down


# ----------------------------------------------------------------------------------------------------------
# 2 processes (torchrun, gloo)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_in_bf16_autocast_track_one(tmp_path, data_dir, parallelism):
    """bf16 autocast on a CPU (the default where it has native bf16): FSDP keeps fp32 parameters there and the
    fused head + loss runs on each rank's half; the curve is the one-process curve."""
    bf16 = ["--train.device", "cpu", "--train.dtype", "bf16", "--train.max_steps", "8"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *args_for(data_dir, *bf16)]) == 0
    run = tmp_path / "run"
    torchrun(["--out", str(run), *args_for(data_dir, *bf16, "--train.parallelism", parallelism)])
    assert_same_curve(curve(run), curve(ref))  # each rank's half is one of the reference's two micro-batches


@pytest.mark.slow
def test_two_processes_match_one(reference, two_procs):
    parallelism, run = two_procs
    assert_same_curve(curve(run), curve(reference))
    ck = latest_checkpoint(run)
    meta = read_meta(ck)
    assert meta["format"] == "dcp" and meta["world_size"] == 2 and meta["step"] == 20
    # a shard each
    assert sorted(p.name for p in (ck / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((run / "checkpoints").glob(".tmp_*"))


@pytest.mark.slow
@pytest.mark.parametrize("step", [10])
def test_two_process_checkpoint_resumes_in_one(tmp_path, data_dir, reference, two_procs, step):
    parallelism, run = two_procs
    resumed = copy_until(run, tmp_path / "run", step)
    # 1 process: 2 micro-batches
    assert main(["train", "--out", str(resumed), *args_for(data_dir, *CPU)]) == 0
    assert_same_curve(curve(resumed), curve(run))
    assert_same_curve(curve(resumed), curve(reference))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two(tmp_path, data_dir, reference):
    resumed = copy_until(reference, tmp_path / "run", 10)
    torchrun(["--out", str(resumed), *args_for(data_dir, *CPU, "--train.parallelism", "fsdp")])
    assert_same_curve(curve(resumed), curve(reference))
    assert read_meta(latest_checkpoint(resumed))["world_size"] == 2


@pytest.mark.slow
def test_sharded_checkpoint_consolidates_for_eval_and_export(tmp_path, two_procs, capsys):
    parallelism, run = two_procs
    ck = latest_checkpoint(run)
    model, _, _, _ = load_pretrained(run)  # reads the model.safetensors written at save time
    # a checkpoint saved without it (train.consolidate false): loaded from the shards, then consolidated
    bare = copy_until(run, tmp_path / "run", 20)
    bck = latest_checkpoint(bare)
    (bck / "model.safetensors").unlink()
    meta = read_meta(bck)
    del meta["files"]["model.safetensors"]
    (bck / "meta.json").write_text(json.dumps(meta))
    from_shards, _, _, _ = load_pretrained(bare)
    for (k, a), b in zip(model.state_dict().items(), from_shards.state_dict().values()):
        assert torch.equal(a, b), k
    assert consolidate(bare) == bck / "model.safetensors"  # the same file as the one written at save time
    assert (bck / "model.safetensors").read_bytes() == (ck / "model.safetensors").read_bytes()
    assert "model.safetensors" in read_meta(bck)["files"]  # recorded: verified on load like any other
    assert main(["eval", str(bare), "--json", "--max-batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0


@pytest.mark.slow
def test_truncated_shard_is_a_clear_error(tmp_path, data_dir, two_procs, capsys):
    parallelism, run = two_procs
    broken = copy_until(run, tmp_path / "run", 20)
    shard = latest_checkpoint(broken) / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["train", "--out", str(broken), *args_for(data_dir, *CPU, "--train.max_steps", "30")]) == 2
    assert "__1_0.distcp is truncated or corrupt" in capsys.readouterr().err
    # same-size damage (bytes overwritten in place) is caught too, by the sha256 recorded at save time
    broken = copy_until(run, tmp_path / "run2", 20)
    shard = latest_checkpoint(broken) / "dcp" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 64] = bytes(64)
    shard.write_bytes(bytes(raw))
    # (eval and export read the consolidated model.safetensors, itself checked; resuming reads the shards)
    assert main(["train", "--out", str(broken), *args_for(data_dir, *CPU, "--train.max_steps", "30")]) == 2
    err = capsys.readouterr().err
    assert "__0_0.distcp is corrupt (sha256" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------------------
# failures


SLOW_WORKER = textwrap.dedent("""
    # a torchrun worker that trains slowly (so it can be killed mid-run) and can fail on purpose
    import os, sys, time
    from pathlib import Path
    import pretrain.objectives.clm as clm
    from pretrain import PretrainError
    _loss, calls = clm.loss, [0]
    def slow_loss(*args, **kwargs):
        calls[0] += 1
        if os.environ.get("FAIL_RANK") == os.environ["RANK"] and calls[0] == 3:
            raise PretrainError("injected failure")
        time.sleep(0.05)
        return _loss(*args, **kwargs)
    clm.loss = slow_loss
    Path(sys.argv[1], "pid_" + os.environ["RANK"]).write_text(str(os.getpid()))
    from pretrain.cli import main
    sys.exit(main(["train", *sys.argv[2:]]))
""")


@pytest.mark.slow
def test_killing_one_rank_stops_the_job(tmp_path, data_dir, reference):
    script = tmp_path / "worker.py"
    script.write_text(SLOW_WORKER)
    run = tmp_path / "run"
    args = ["--out", str(run), *args_for(data_dir, *CPU)]
    proc = launch([str(tmp_path), *args], script=script)
    marker = run / "checkpoints" / "step_000010" / "meta.json"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    time.sleep(0.2)  # mid-run, a few steps past the checkpoint
    os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGKILL)
    t0 = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0, out[-3000:]
    assert time.time() - t0 < 60, "the job did not stop within 60 s of losing a rank"
    # the last complete checkpoint is intact, loads, and continues on the uninterrupted curve
    ck = latest_checkpoint(run)
    assert 10 <= read_meta(ck)["step"] < 20
    load_pretrained(run)
    assert main(["train", "--out", str(run), *args_for(data_dir, *CPU)]) == 0
    assert_same_curve(curve(run), curve(reference))


@pytest.mark.slow
def test_error_on_one_rank_stops_the_job_with_its_message(tmp_path, data_dir):
    script = tmp_path / "worker.py"
    script.write_text(SLOW_WORKER)
    proc = launch([str(tmp_path), "--out", str(tmp_path / "run"), *args_for(data_dir, *CPU)], script=script,
                  env={"FAIL_RANK": "1"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: [rank 1/2] injected failure" in out


# ----------------------------------------------------------------------------------------------------------
# two "nodes" on one machine


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path, data_dir):
    run = tmp_path / "run"
    port = free_port()
    args = ["--out", str(run),
            *args_for(data_dir, *CPU, "--train.max_steps", "4", "--train.eval_interval", "0")]
    procs = [launch(args, nproc=1, launcher=["--nnodes", "2", "--node-rank", str(node),
                                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                             "--rdzv-id", "two-nodes"])
             for node in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert [r["step"] for r in curve(run).values()] == [1, 2, 3, 4]
    assert read_meta(latest_checkpoint(run))["world_size"] == 2


# ----------------------------------------------------------------------------------------------------------
# on a GPU (NCCL): the same checks, on as many GPUs as there are (up to 2)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_gpu_processes_match_one_and_resume(tmp_path, data_dir, parallelism):
    nproc = min(2, torch.cuda.device_count())
    gpu = ["--train.device", "cuda", "--train.dtype", "fp32"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *args_for(data_dir, *gpu)]) == 0
    run = tmp_path / "run"
    torchrun(["--out", str(run), *args_for(data_dir, *gpu, "--train.parallelism", parallelism)], nproc=nproc)
    assert_same_curve(curve(run), curve(ref), tol=2e-3)  # TF32/cuBLAS reductions differ slightly
    assert read_meta(latest_checkpoint(run))["world_size"] == nproc
    resumed = copy_until(run, tmp_path / "resumed", 10)  # saved by the NCCL job, continued in one process
    assert main(["train", "--out", str(resumed), *args_for(data_dir, *gpu)]) == 0
    assert_same_curve(curve(resumed), curve(ref), tol=2e-3)
    back = copy_until(ref, tmp_path / "back", 10)  # and the reverse
    torchrun(["--out", str(back), *args_for(data_dir, *gpu, "--train.parallelism", parallelism)], nproc=nproc)
    assert_same_curve(curve(back), curve(ref), tol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["skip", "rollback"])
def test_spike_guard_decides_the_same_on_every_rank(tmp_path, data_dir, mode):
    """A spike injected at step 7: two processes take the same decision at the same step (else their
    collectives would part ways) and train on to the same curve as one process."""
    extra = ("--train.guard", mode, "--train.guard_warmup", "3", "--train.fault", "spike@7",
             "--train.ckpt_interval", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--out", str(one), *args_for(data_dir, *CPU, *extra)]) == 0
    torchrun(["--out", str(two), *args_for(data_dir, *CPU, *extra)])

    def rows(run: Path) -> tuple[list[dict], dict[int, dict]]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        events = [r for r in lines if "guard" in r]
        last = {r["step"]: r for r in lines if "train_loss" in r}  # (after a rollback, the steps again)
        return events, last

    (ev1, last1), (ev2, last2) = rows(one), rows(two)
    assert [(e["step"], e["action"]) for e in ev1] == [(e["step"], e["action"]) for e in ev2] == [(7, mode)]
    assert ev1[0]["loss"] == pytest.approx(ev2[0]["loss"], rel=1e-4)
    assert sorted(last1) == sorted(last2) and max(last1) == 20
    for step in last1:
        assert last1[step]["train_loss"] == pytest.approx(last2[step]["train_loss"], abs=TOL), step


FULL_DISK_WORKER = """
import errno, sys
import torch
import pretrain.checkpoint as ck
from pretrain.cli import main

real = torch.save
calls = []


def save(obj, f, *a, **k):  # rank 0's second checkpoint (step 8) finds the disk full
    if str(f).endswith("state.pt"):
        calls.append(f)
    if len(calls) == 2 and str(f).endswith("state.pt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *a, **k)


ck.torch.save = save
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_sharded_checkpoint_stops_every_rank_cleanly(tmp_path, data_dir):
    script = tmp_path / "worker.py"
    script.write_text(FULL_DISK_WORKER)
    run = tmp_path / "run"
    proc = launch(["--out", str(run), *args_for(data_dir, *CPU, "--train.ckpt_interval", "4",
                                                "--train.max_steps", "12")], script=script)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "could not write checkpoint step 8" in out and "No space left on device" in out, out[-3000:]
    assert "step_000004 is intact" in out
    assert not list((run / "checkpoints").glob(".tmp_*"))  # nothing half-written stays
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]
    torchrun(["--out", str(run), *args_for(data_dir, *CPU, "--train.ckpt_interval", "4",
                                            "--train.max_steps", "12")])  # and the run goes on from it
    assert latest_checkpoint(run).name == "step_000012"


@pytest.mark.slow
def test_spike_guard_stop_ends_every_rank_at_the_spike(tmp_path, data_dir):
    run = tmp_path / "run"
    guard = ("--train.guard", "stop", "--train.guard_warmup", "3", "--train.fault", "spike@7",
             "--train.ckpt_interval", "4")
    proc = launch(["--out", str(run), *args_for(data_dir, *CPU, *guard)])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "a spike at step 7 (train.guard stop)" in out, out[-3000:]
    assert out.count("training stopped by") == 2  # each rank decided the same, at the same step
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]
