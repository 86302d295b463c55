"""Checkpoints: atomic save, strict verified load, pruning, the ``latest`` link, crash safety."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    read_meta,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import TrainConfig
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent


def trained_state(model: GPT, steps: int = 2):
    """An optimizer that has taken ``steps`` steps on ``model`` (so it has moment buffers)."""
    opt = build_optimizer(model, TrainConfig(lr=1e-2), "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def save(run: Path, step: int, model: GPT, keep: int = 2, state: dict | None = None) -> Path:
    return save_checkpoint(run, step, model, state if state is not None else {"step": step},
                           {"note": "test"}, keep=keep)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ================================================================================================ round trip


@pytest.mark.parametrize("tie", [True, False])
def test_weights_round_trip(tmp_path, tiny_model, tie):
    model = tiny_model(seed=1, tie_embeddings=tie)
    trained_state(model)  # move the weights away from their init
    ckpt = save(tmp_path, 5, model)
    assert ckpt == tmp_path / "checkpoints" / "step_000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]

    other = tiny_model(seed=2, tie_embeddings=tie)
    assert not same_weights(model, other)
    load_weights(ckpt, other)
    assert same_weights(model, other)
    if tie:  # still one tensor after loading
        assert other.lm_head.weight.data_ptr() == other.embed_tokens.weight.data_ptr()
    else:
        assert other.lm_head.weight.data_ptr() != other.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 50, (1, 10))
    assert torch.equal(model(x), other(x))


def test_meta_records_files(tmp_path, tiny_model):
    ckpt = save(tmp_path, 3, tiny_model())
    meta = read_meta(ckpt)
    assert meta["step"] == 3 and meta["note"] == "test"
    import hashlib

    for name in ("model.safetensors", "state.pt"):
        data = (ckpt / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_state_round_trip_with_optimizer_and_rng(tmp_path, tiny_model):
    model = tiny_model(seed=3)
    opt = trained_state(model, steps=3)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    state = {"optimizer": opt.state_dict(), "loader": {"samples_seen": 96, "seed": 1, "seq_len": 8},
             "step": 3, "rng": rng_state(), "losses": [1.5, 1.25]}
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt = save(tmp_path, 3, model, state=state)

    loaded = load_state(ckpt)
    assert loaded["loader"] == state["loader"] and loaded["step"] == 3 and loaded["losses"] == [1.5, 1.25]
    saved_opt, got_opt = state["optimizer"], loaded["optimizer"]
    assert got_opt["param_groups"] == saved_opt["param_groups"]
    assert saved_opt["state"].keys() == got_opt["state"].keys() and saved_opt["state"]
    for k, s in saved_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[name], got_opt["state"][k][name])
    # the restored optimizer is usable and continues identically
    twin = tiny_model(seed=99)
    load_weights(ckpt, twin)
    opt2 = build_optimizer(twin, TrainConfig(lr=1e-2), "cpu")
    opt2.load_state_dict(got_opt)
    for o, m in ((opt, model), (opt2, twin)):
        x = torch.arange(10).view(1, 10) % 50
        o.zero_grad()
        m(x).float().pow(2).mean().backward()
        o.step()
    assert same_weights(model, twin)
    # RNG state comes back too
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(loaded["rng"])
    assert random.random() == expected_draws[0]
    assert float(np.random.rand()) == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])


class Custom:
    """An arbitrary class: unpickling it fully could run code, so weights_only loading must refuse it."""


def test_load_state_is_weights_only(tmp_path, tiny_model):
    ckpt = save(tmp_path, 1, tiny_model(), state={"obj": Custom()})
    assert isinstance(torch.load(ckpt / "state.pt", weights_only=False)["obj"], Custom)  # the file is intact
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        load_state(ckpt)  # ... but weights_only loading refuses arbitrary objects


# ================================================================================================ listing


def test_keep_last_k_and_latest_link(tmp_path, tiny_model):
    model = tiny_model()
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, keep=2)
        assert os.readlink(root / "latest") == f"step_{step:06d}"
        assert (root / "latest" / "meta.json").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000030", "step_000040"]
    assert latest_checkpoint(tmp_path) == root / "step_000040"
    assert resolve_checkpoint(tmp_path) == root / "step_000040"
    assert resolve_checkpoint(root / "step_000030") == root / "step_000030"
    save(tmp_path, 50, model, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000050"]


def test_resaving_the_same_step(tmp_path, tiny_model):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    save(tmp_path, 7, a)
    ckpt = save(tmp_path, 7, b)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000007"]
    fresh = tiny_model(seed=3)
    load_weights(ckpt, fresh)
    assert same_weights(fresh, b)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000007"]


def test_list_ignores_incomplete(tmp_path, tiny_model):
    model = tiny_model()
    save(tmp_path, 1, model)
    root = tmp_path / "checkpoints"
    # a writer that crashed before its rename, and a step directory without meta.json
    crashed = root / ".tmp_step_000002_12345"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    half = root / "step_000003"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (root / "step_000004.txt").write_text("not a dir")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert latest_checkpoint(tmp_path) == root / "step_000001"
    # the next save cleans up the crashed writer's temporary directory
    save(tmp_path, 5, model)
    assert not crashed.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000005"]


def test_list_empty_and_resolve_errors(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")


def test_checkpoints_sort_numerically_past_six_digits(tmp_path, tiny_model):
    model = tiny_model()
    save(tmp_path, 999_999, model, keep=1)
    save(tmp_path, 1_000_000, model, keep=1)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1000000"


# ================================================================================================ corruption


def test_truncated_weights(tmp_path, tiny_model):
    ckpt = save(tmp_path, 1, tiny_model())
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(ckpt, tiny_model())


def test_truncated_weights_without_recorded_sizes(tmp_path, tiny_model):
    ckpt = save(tmp_path, 1, tiny_model())
    meta = read_meta(ckpt)
    del meta["files"]  # e.g. a checkpoint written by another tool: safetensors itself must notice
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(ckpt, tiny_model(), meta)


def test_flipped_bytes_in_state(tmp_path, tiny_model):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, state={"optimizer": trained_state(model).state_dict()})
    p = ckpt / "state.pt"
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))  # same size: only the checksum can tell
    with pytest.raises(CheckpointError, match="sha256"):
        load_state(ckpt)
    meta = read_meta(ckpt)
    del meta["files"]
    p.write_bytes(b"\x00" * len(data))  # garbage that is not a zip archive at all
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(ckpt, meta)


def test_flipped_bytes_in_weights(tmp_path, tiny_model):
    ckpt = save(tmp_path, 1, tiny_model())
    p = ckpt / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(ckpt, tiny_model())


def test_missing_files(tmp_path, tiny_model):
    ckpt = save(tmp_path, 1, tiny_model())
    (ckpt / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_state(ckpt)
    (ckpt / "meta.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_weights(ckpt, tiny_model())


@pytest.mark.parametrize("change", [dict(d_model=64), dict(vocab_size=60), dict(n_kv_head=2)])
def test_shape_mismatch(tmp_path, tiny_model, change):
    ckpt = save(tmp_path, 1, tiny_model())
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(ckpt, tiny_model(**change))


@pytest.mark.parametrize("change", [dict(n_layer=3), dict(n_layer=1), dict(tie_embeddings=False)])
def test_structure_mismatch(tmp_path, tiny_model, change):
    ckpt = save(tmp_path, 1, tiny_model())
    with pytest.raises(CheckpointError, match="does not match"):
        load_weights(ckpt, tiny_model(**change))


# ============================================================================================== crash safety

CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from pretrain.config import ModelConfig
    from pretrain.models.gpt import GPT
    from pretrain import checkpoint

    run, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, d_model=32, n_head=4, vocab_size=50, max_seq_len=32))
    checkpoint.save_checkpoint(run, 1, model, {"step": 1}, {}, keep=2)
    torch.save(model.state_dict(), os.path.join(run, "reference.pt"))

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write half a file, then die without any cleanup
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)

    torch.save = dying_save
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpoint.save_checkpoint(run, {step}, model, {{"step": {step}}}, {{}}, keep=1)
    print("unreachable")
""")


@pytest.mark.parametrize("mode, step", [("exit", 2), ("kill", 2), ("kill", 1)])
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, tiny_model, mode, step):
    run = tmp_path / "run"
    run.mkdir()
    script = CRASH_SCRIPT.replace("{step}", str(step)).replace("{{", "{").replace("}}", "}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(run), mode], capture_output=True, text=True,
                          timeout=120, env=env)
    assert "unreachable" not in proc.stdout
    assert proc.returncode == (-9 if mode == "kill" else 1), proc.stderr

    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]  # the half-written one is not listed
    assert latest_checkpoint(run) == root / "step_000001"
    assert os.readlink(root / "latest") == "step_000001"
    assert [p.name for p in root.glob(".tmp_*")]  # the crashed writer's leftovers, not yet cleaned
    model = tiny_model(seed=5)
    load_weights(root / "step_000001", model)
    reference = torch.load(run / "reference.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert load_state(root / "step_000001") == {"step": 1}
    # the next successful save cleans up the crashed writer's directory
    save(run, 3, model)
    assert not list(root.glob(".tmp_*"))
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000003"]


def test_crash_between_renames_when_resaving_keeps_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = textwrap.dedent("""
        import os, signal, sys
        import torch
        from pretrain.config import ModelConfig
        from pretrain.models.gpt import GPT
        from pretrain import checkpoint

        run = sys.argv[1]
        model = GPT(ModelConfig(n_layer=1, d_model=16, n_head=2, vocab_size=20, max_seq_len=8))
        checkpoint.save_checkpoint(run, 1, model, {}, {}, keep=2)
        real_replace = os.replace

        def dying_replace(src, dst):
            real_replace(src, dst)
            if os.path.basename(str(dst)).startswith(".old_"):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.os.replace = dying_replace
        checkpoint.save_checkpoint(run, 1, model, {}, {}, keep=2)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]


def test_checkpoint_meta_is_json(tmp_path, tiny_model):
    ckpt = save(tmp_path, 2, tiny_model())
    json.loads((ckpt / "meta.json").read_text())
    with pytest.raises(CheckpointError):
        read_meta(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------- what a run resumes from


def _tiny_run(tmp_path: Path, prepared_data: Path, **train):
    from pretrain.config import load_config

    base = {"data": {"path": str(prepared_data), "seq_len": 16},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
            "train": {"batch_size": 2, "max_steps": 4, "warmup_steps": 1, "eval_interval": 0,
                      "log_interval": 1, "ckpt_interval": 2, "plot": False, "threads": 1, **train}}
    return load_config(None, base)


def test_a_history_without_a_checkpoint_is_never_trained_over(tmp_path, prepared_data):
    from pretrain.train import train

    run = tmp_path / "run"
    train(_tiny_run(tmp_path, prepared_data), run, quiet=True)
    before = (run / "metrics.jsonl").read_text()
    for d in (run / "checkpoints").glob("step_*"):  # the checkpoints lost, the history still there
        d.rename(tmp_path / d.name)
    with pytest.raises(CheckpointError, match="training history to step 4"):
        train(_tiny_run(tmp_path, prepared_data, max_steps=6), run, quiet=True)
    assert (run / "metrics.jsonl").read_text() == before
    # --resume of a run that has no checkpoint refuses too, even without a history
    (run / "metrics.jsonl").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(_tiny_run(tmp_path, prepared_data, max_steps=6), run, quiet=True, resume=True)


def test_an_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, prepared_data):
    from pretrain.train import train

    run = tmp_path / "run"
    train(_tiny_run(tmp_path, prepared_data), run, quiet=True)
    newest = run / "checkpoints" / "step_000004"
    (newest / "meta.json").unlink()  # a save that never finished
    with pytest.warns(UserWarning, match="step_000004: an incomplete checkpoint"):
        res = train(_tiny_run(tmp_path, prepared_data, max_steps=6), run, quiet=True)
    assert res["step"] == 6 and (run / "checkpoints" / "step_000006").is_dir()


def test_a_damaged_newest_checkpoint_names_the_newest_that_verifies(tmp_path, prepared_data):
    from pretrain.checkpoint import resume_point, verify_checkpoint
    from pretrain.train import train

    run = tmp_path / "run"
    train(_tiny_run(tmp_path, prepared_data, keep_checkpoints=3, max_steps=6), run, quiet=True)
    for step in (6, 4):
        weights = run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(run / "checkpoints" / "step_000006")
    with pytest.raises(CheckpointError, match="step_000006 is damaged.*step_000002 verifies"):
        resume_point(run)


# ----------------------------------------------------------------------------------------------------------
# load_pretrained: the run's tokenizer.json is the one it was trained with (the sha256 in meta.json)


def _run_with_tokenizer(tmp_path: Path, tiny_model, chars: str = "abcdef", sha: str | None = "auto",
                        data: Path | None = None) -> tuple[Path, object]:
    """A run whose checkpoint records ``tokenizer_sha256`` (``sha``: "auto" = the tokenizer's own, None =
    not recorded, as older checkpoints) and whose tokenizer.json is a char tokenizer of ``chars``."""
    from pretrain.config import Config, DataConfig
    from pretrain.data.tokenizer import char_tokenizer

    tok = char_tokenizer(chars)
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    model = tiny_model()
    meta = {"config": Config(data=DataConfig(path=str(data or "")), model=model.cfg).to_dict()}
    if sha is not None:
        meta["tokenizer_sha256"] = tok.sha256() if sha == "auto" else sha
    save_checkpoint(run, 1, model, {}, meta)
    return run, tok


def test_load_pretrained_refuses_a_swapped_tokenizer_of_the_same_size(tmp_path, tiny_model):
    from pretrain.checkpoint import TokenizerMismatchError, load_pretrained
    from pretrain.data.tokenizer import char_tokenizer

    run, tok = _run_with_tokenizer(tmp_path, tiny_model)
    assert load_pretrained(run)[2].sha256() == tok.sha256()
    other = char_tokenizer("abcdeg")  # as many tokens, one character different: every later id shifts
    assert other.vocab_size == tok.vocab_size
    other.save(run / "tokenizer.json")
    with pytest.raises(TokenizerMismatchError) as e:
        load_pretrained(run)
    msg = str(e.value)
    assert msg.startswith(f"{run / 'tokenizer.json'} is not the tokenizer this run was trained with")
    assert other.sha256() in msg and tok.sha256() in msg
    assert str(run / "checkpoints" / "step_000001" / "meta.json") in msg and "put back" in msg


def test_a_swapped_tokenizer_error_names_the_training_datas_copy(tmp_path, tiny_model):
    from pretrain.checkpoint import TokenizerMismatchError, load_pretrained
    from pretrain.data.tokenizer import char_tokenizer

    data = tmp_path / "data"
    data.mkdir()
    tok = char_tokenizer("abcdef")
    tok.save(data / "tokenizer.json")
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.json",
                                                              "sha256": tok.sha256()}}))
    run, _ = _run_with_tokenizer(tmp_path, tiny_model, data=data)
    char_tokenizer("abcdeg").save(run / "tokenizer.json")
    want = f"copy {data / 'tokenizer.json'} .*whose sha256 matches"
    with pytest.raises(TokenizerMismatchError, match=want):
        load_pretrained(run)
    (run / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())  # what the error says to do
    load_pretrained(run)


def test_older_checkpoints_without_the_tokenizer_hash_still_load(tmp_path, tiny_model):
    from pretrain.checkpoint import load_pretrained
    from pretrain.data.tokenizer import char_tokenizer

    run, _ = _run_with_tokenizer(tmp_path, tiny_model, sha=None)
    char_tokenizer("abcdeg").save(run / "tokenizer.json")  # nothing recorded to check it against
    load_pretrained(run)


def test_the_training_datas_own_file_passes_when_the_library_serialises_it_differently(tmp_path, tiny_model):
    # the hash is of the tokenizer as `tokenizers` serialises it: another version of the library may write the
    # same tokenizer differently. The very file the data was prepared with (byte for byte, its manifest
    # recording the checkpoint's hash) is the one the run was trained with.
    from pretrain.checkpoint import TokenizerMismatchError, load_pretrained

    old = "0" * 64  # the hash an older library gave
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.json", "sha256": old}}))
    run, _ = _run_with_tokenizer(tmp_path, tiny_model, sha=old, data=data)
    (data / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())
    load_pretrained(run)
    (data / "tokenizer.json").write_text("{}")  # not the same file: refused
    with pytest.raises(TokenizerMismatchError, match="is not the tokenizer this run was trained with"):
        load_pretrained(run)
