"""Discoverable configuration: presets named without a path (`pretrain train tiny`, `pretrain presets`),
`pretrain train --help` listing every config key, `--print-config`, and `--resume auto|always|never`."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

import pretrain
from pretrain.cli import main
from pretrain.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    config_path,
    field_docs,
    from_dict,
    load_config,
    preset_description,
    presets,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--data.seq_len", "16", "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16",
         "--train.batch_size", "4", "--train.warmup_steps", "1", "--train.eval_interval", "0",
         "--train.ckpt_interval", "2", "--train.plot", "false", "--train.threads", "1"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, str]]:
    """(dotted key, field, docstring) of every leaf of the config."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, docs.get(f.name, "")))
    return out


# ----------------------------------------------------------------------------------------------------------
# the presets


def test_presets_ship_in_the_package_with_a_line_each(capsys):
    files = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    assert PRESETS_DIR.parent == Path(pretrain.__file__).resolve().parent
    # every preset that configs/ had when they moved into the package is still there, by name
    for name in ("tiny", "gpt2-small", "gpt2-medium", "bert-base", "bert-cpu", "bert-cpu-sst2", "bert-tiny",
                 "electra-cpu", "shakespeare-char", "shakespeare-char-fast", "shakespeare-char-5min",
                 "vit-mae-cpu", "vit-s16-mae", "vit-b16-mae", "resnet-cpu", "resnet18", "resnet50",
                 "sasrec-cpu", "sasrec-gpu", "bert4rec-cpu", "bert4rec-gpu"):
        assert name in files
    rc, out, _ = run_cli(capsys, "presets", "--json")
    assert rc == 0
    listed = json.loads(out)["presets"]
    assert [p["name"] for p in listed] == files
    for p in listed:
        d = p["description"]
        # one line, a whole phrase (the first line of the file's opening comment), not cut mid-parenthesis
        assert d and "\n" not in d and len(d) <= 120 and d.count("(") == d.count(")"), p
        assert Path(p["path"]).read_text().startswith("# " + d[:20])
    rc, out, _ = run_cli(capsys, "presets")
    assert rc == 0
    for p in listed:
        assert f"{p['name']}  " in out and p["description"] in out


def test_a_preset_without_a_comment_has_no_description(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("train:\n  lr: 0.1  # a comment, not a description\n")
    assert preset_description(bare) == ""
    bare.write_text("\n# Described.\ntrain:\n  lr: 0.1\n")
    assert preset_description(bare) == "Described."


def test_show_one_preset(capsys):
    rc, out, _ = run_cli(capsys, "presets", "tiny")
    assert rc == 0 and out == (PRESETS_DIR / "tiny.yaml").read_text()
    rc, out, _ = run_cli(capsys, "presets", "tiny", "--json")
    res = json.loads(out)
    assert res["name"] == "tiny" and yaml.safe_load(res["yaml"])["model"]["n_layer"] == 2
    rc, _, err = run_cli(capsys, "presets", "tinny")
    assert rc == 2 and err.startswith("error: unknown preset 'tinny' (did you mean 'tiny'?)")


def test_configs_dir_is_the_packaged_presets():
    """configs/ (bench scripts, docs, older commands) is a symlink to pretrain/presets, tracked by git as one,
    and every preset is tracked."""
    configs = REPO / "configs"
    assert configs.is_symlink() and configs.resolve() == PRESETS_DIR
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    staged = subprocess.run(["git", "ls-files", "-s", "configs"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    assert staged[:1] == ["120000"] and staged[-1] == "configs"  # a symlink, not a folder of copies
    tracked = subprocess.run(["git", "ls-files", "pretrain/presets"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(tracked) == sorted(f"pretrain/presets/{p.name}" for p in PRESETS_DIR.glob("*.yaml"))


def test_names_and_paths_resolve_to_the_same_file(tmp_path, monkeypatch):
    tiny = PRESETS_DIR / "tiny.yaml"
    assert config_path("tiny") == config_path("tiny.yaml") == tiny
    assert config_path(REPO / "configs" / "tiny.yaml").resolve() == tiny
    assert set(presets()) == {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  lr: 0.5\n")
    assert config_path(own) == own
    monkeypatch.chdir(tmp_path)
    assert config_path("mine.yaml") == Path("mine.yaml")  # a file in the working directory
    (tmp_path / "tiny").mkdir()  # a folder that happens to have a preset's name does not hide it
    assert config_path("tiny") == tiny


@pytest.mark.parametrize("given, message", [
    ("gpt2-smal", "unknown preset 'gpt2-smal' (did you mean 'gpt2-small'?)"),
    ("shakespear-char", "unknown preset 'shakespear-char' (did you mean 'shakespeare-char'?)"),
    ("qqqqqq", "unknown preset 'qqqqqq'; `pretrain presets` lists them"),
    ("elsewhere/tiny.yaml", "config file not found: elsewhere/tiny.yaml (a preset of that name ships with "
                            "the package: `pretrain train tiny ...`)"),
    ("missing.yaml", "config file not found: missing.yaml"),
])
def test_unknown_presets_and_missing_files(given, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_path(given)
    rc, _, err = run_cli(capsys, "train", given, "--out", str(tmp_path / "run"))
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_directory_is_not_a_preset(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  lr: 0.1\n")
    rc, _, err = run_cli(capsys, "train", str(run), "--out", str(tmp_path / "other"))
    assert rc == 2 and "is a directory, not a YAML config" in err and f"--resume {run}" in err


# ----------------------------------------------------------------------------------------------------------
# --help and --print-config


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    keys = config_keys()
    assert {"train.lr", "model.d_model", "data.path", "objective"} <= {k for k, _, _ in keys}
    for key, f, doc in keys:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert f"  {key} ({f.type}, default {json.dumps(value)})" in out, key
        assert doc and " ".join(doc.split()) in flat, key  # the whole docstring, wrapped
    for section in ("data", "model", "train", "mlm", "rtd", "image"):
        assert f"\n{section}: " in out
    assert "--print-config" in out and "auto|always|never|RUN_DIR" in out


def test_print_config_without_data(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "train", "tiny", "--print-config", "--train.lr", "3e-4",
                           "--model.n_layer=3")
    assert rc == 0 and err == ""
    assert out.startswith("# pretrain train: defaults <- preset tiny <- --train.lr 3e-4 --model.n_layer=3\n")
    printed = from_dict(Config, yaml.safe_load(out))
    assert printed == load_config(PRESETS_DIR / "tiny.yaml", ["--train.lr", "3e-4", "--model.n_layer", "3"])
    assert printed.train.lr == 3e-4 and printed.model.n_layer == 3 and printed.data.seq_len == 64
    assert "data.path is not set" in out
    # the same through a path, and as JSON
    rc, out2, _ = run_cli(capsys, "train", str(REPO / "configs" / "tiny.yaml"), "--print-config", "--json",
                          "--train.lr", "3e-4", "--model.n_layer=3")
    assert rc == 0 and json.loads(out2) == printed.to_dict()
    # a bad override is the same error as training would give, and nothing is written
    rc, _, err = run_cli(capsys, "train", "tiny", "--print-config", "--train.lrr", "1", "--out",
                         str(tmp_path / "run"))
    assert rc == 2 and "did you mean 'lr'" in err and not (tmp_path / "run").exists()


def test_print_config_resolves_what_the_data_decides(capsys, prepared_data, tmp_path):
    meta = json.loads((prepared_data / "meta.json").read_text())
    rc, out, _ = run_cli(capsys, "train", "tiny", "--data.path", str(prepared_data), "--data.seq_len", "24",
                         "--out", str(tmp_path / "run"), "--print-config")
    assert rc == 0 and not (tmp_path / "run").exists()
    cfg = yaml.safe_load(out)
    assert cfg["data"]["path"] == str(prepared_data.resolve())
    assert cfg["model"]["vocab_size"] == meta["tokenizer"]["vocab_size"] and cfg["model"]["max_seq_len"] == 24
    # a batch that cannot be split is refused here as training refuses it
    rc, _, err = run_cli(capsys, "train", "tiny", "--data.path", str(prepared_data), "--print-config",
                         "--train.global_batch_size", "12")
    assert rc == 2 and "not a multiple of train.batch_size 8" in err
    # a path that is not prepared yet: printed, with a note
    rc, out, _ = run_cli(capsys, "train", "tiny", "--data.path", str(tmp_path / "later"), "--print-config")
    assert rc == 0 and "is not a prepared data directory (yet)" in out
    assert yaml.safe_load(out)["model"]["vocab_size"] == 0


# ----------------------------------------------------------------------------------------------------------
# --resume auto | always | never | RUN_DIR


def test_resume_modes(capsys, prepared_data, tmp_path):
    run, data = tmp_path / "run", ["--data.path", str(prepared_data)]

    def train(*argv: str) -> tuple[int, dict | str]:
        rc, out, err = run_cli(capsys, "train", *argv, "--quiet", "--json")
        return rc, json.loads(out) if rc == 0 else err

    # never: starts a run ...
    rc, res = train("tiny", "--out", str(run), "--resume", "never", *data, *SMALL, "--train.max_steps", "2")
    assert rc == 0 and res["step"] == 2
    saved = (run / "config.yaml").read_text()
    # ... and refuses to continue one
    rc, err = train("tiny", "--out", str(run), "--resume", "never", *data, *SMALL, "--train.max_steps", "4")
    assert rc == 2 and "--resume never" in err and "already holds a run" in err and "step_000002" in err
    assert (run / "config.yaml").read_text() == saved
    # auto: continues it (the command's config, checked against the run's) ...
    rc, res = train("tiny", "--out", str(run), "--resume", "auto", *data, *SMALL, "--train.max_steps", "4")
    assert rc == 0 and res["step"] == 4
    # ... as the same command without --resume does
    rc, res = train("tiny", "--out", str(run), *data, *SMALL, "--train.max_steps", "6")
    assert rc == 0 and res["step"] == 6
    # always, no preset: the run's saved config is the base
    rc, res = train("--out", str(run), "--resume", "always", "--train.max_steps", "8")
    assert rc == 0 and res["step"] == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["d_model"] == 16
    # --resume RUN_DIR is the same
    rc, out, _ = run_cli(capsys, "train", "--resume", str(run), "--train.max_steps", "10", "--print-config")
    assert rc == 0 and yaml.safe_load(out)["train"]["max_steps"] == 10
    assert yaml.safe_load(out)["model"]["d_model"] == 16
    # always: refuses to start a run
    fresh = tmp_path / "fresh"
    rc, err = train("tiny", "--out", str(fresh), "--resume", "always", *data, *SMALL)
    assert rc == 2 and "has no checkpoint to continue from" in err and not fresh.exists()
    # auto: starts one
    rc, res = train("tiny", "--out", str(fresh), "--resume", "auto", *data, *SMALL, "--train.max_steps", "2")
    assert rc == 0 and res["step"] == 2
    # a mode needs --out; a run directory called `auto` is ./auto
    rc, err = train("tiny", "--resume", "auto", *data)
    assert rc == 2 and "--resume auto needs --out RUN_DIR" in err and "--resume ./auto" in err
