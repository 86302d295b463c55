"""pretrain/io.py: the output rule every writer follows (no command replaces what it did not write without
--overwrite; an output is never one of the inputs), on folders and files made by hand. The writers' own tests
(test_cli: train; test_finetune: finetune, predict, transfer; test_features: embed; test_export: export)
check that each one uses it; the demo's are here."""

from __future__ import annotations

import json
import os

import pytest

from pretrain import PretrainError
from pretrain.io import (
    OUTPUTS,
    card_record,
    check_output_dir,
    check_output_file,
    output_kinds,
    record_output,
)


def make(root, files: dict[str, str]):
    """A folder holding ``files`` (relative path → text; a path ending in / is an empty folder)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return root


CARD = "A model pre-trained with `pretrain` and exported as a stock `LlamaForCausalLM`."
FOLDERS = {  # what each command leaves, by its defining files
    "run": {"config.yaml": "x", "tokenizer.json": "{}", "metrics.jsonl": "", "checkpoints/step_000004/": ""},
    "finetune": {"finetune.json": "{}", "finetune.yaml": "x", "model.safetensors": "w",
                 "tokenizer.json": "{}"},
    "export": {"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "{}", "README.md": CARD},
    "hf-model": {"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "{}"},
    "data": {"meta.json": "{}", "train_000000.bin": "", "val_000000.bin": "", "tokenizer.json": "{}"},
    "transfer": {"report.json": "{}", "report.md": "x", "runs/pretrained_n20_s0/finetune.yaml": "x"},
}


def export_folder(root):
    """An export as `pretrain export` leaves it: its model card ends with the record of its files."""
    make(root, {k: v for k, v in FOLDERS["export"].items() if k != "README.md"})
    card = CARD + "\n"
    (root / "README.md").write_text(card + card_record(root, "export", sorted(os.listdir(root)), card))
    return root


def demo_folder(root):
    meta = {"sources": [{"path": "/usr/lib/python3/os.py"}, {"path": "/usr/lib/python3/re.py"}]}
    return make(root, {"data/meta.json": json.dumps(meta), "data/train_000000.bin": "",
                       **{f"run/{k}": v for k, v in FOLDERS["run"].items()},
                       "task/train.jsonl": "", "task/valid.jsonl": "",
                       **{f"finetune_pretrained/{k}": v for k, v in FOLDERS["finetune"].items()}})


def test_each_output_is_recognised_by_its_defining_files(tmp_path):
    for kind, files in FOLDERS.items():
        assert output_kinds(make(tmp_path / kind, files)) == [kind]
    assert output_kinds(demo_folder(tmp_path / "demo")) == ["demo"]
    # a fine-tune interrupted before its first evaluation: finetune.yaml + metrics.jsonl
    early = make(tmp_path / "ft_early", {"finetune.yaml": "x", "metrics.jsonl": ""})
    assert output_kinds(early) == ["finetune"]
    # a user's folder that merely holds a config file of that name is none of them
    assert output_kinds(make(tmp_path / "mine", {"config.yaml": "x", "finetune.yaml": "x"})) == []
    assert output_kinds(tmp_path / "missing") == [] and output_kinds(make(tmp_path / "empty", {})) == []
    # a demo folder is only the demo's: prepared from Python modules, nothing else beside its parts
    other = demo_folder(tmp_path / "demo2")
    (other / "data" / "meta.json").write_text(json.dumps({"sources": [{"path": "/home/me/corpus.txt"}]}))
    assert output_kinds(other) == []
    assert output_kinds(make(demo_folder(tmp_path / "demo3"), {"notes.txt": "mine"})) == []


@pytest.mark.parametrize("command", ["train", "finetune", "export", "transfer", "demo"])
def test_a_folder_writer_takes_new_empty_and_its_own_folders_only(tmp_path, command):
    own = {"train": "run", "finetune": "finetune", "export": "export", "transfer": "transfer"}.get(command)
    check_output_dir(tmp_path / "new" / "deeper", command)
    # hidden entries (a stale lock, temporary files, .git) are never replaced: the folder counts as empty
    check_output_dir(make(tmp_path / "hidden", {".lock": "", ".git/HEAD": "ref"}), command)
    mine = {"export": export_folder, "demo": demo_folder}.get(own or "demo")
    check_output_dir(mine(tmp_path / "own") if mine else make(tmp_path / own, FOLDERS[own]), command)
    for kind, files in [*FOLDERS.items(), ("other", {"notes.txt": "mine", "a/b.txt": "x"})]:
        if kind == own:
            continue
        folder = make(tmp_path / f"foreign_{kind}", files)
        with pytest.raises(PretrainError) as e:
            check_output_dir(folder, command)
        msg = str(e.value)
        assert f"not an earlier `pretrain {command}`'s output" in msg and "--overwrite" in msg, msg
        if kind == "other":
            assert "other files (a/, notes.txt)" in msg
        check_output_dir(folder, command, overwrite=True)  # --overwrite: written into, nothing removed


def test_an_own_folder_mixed_with_another_kind_needs_overwrite(tmp_path):
    mixed = make(tmp_path / "run", {**FOLDERS["run"], "finetune.json": "{}"})  # fine-tuned into a run
    with pytest.raises(PretrainError, match="a pre-training run .* and a fine-tuned model"):
        check_output_dir(mixed, "train")
    check_output_dir(mixed, "train", overwrite=True)


def test_an_output_is_never_an_input(tmp_path):
    run = make(tmp_path / "run", FOLDERS["run"])
    data = make(tmp_path / "d", {"train.jsonl": "{}"})
    for out, inputs, needle in [(run, [run], "is a pre-training run"),  # the input itself
                                (tmp_path, [run], "holds"),  # a folder holding an input
                                (data, [run, data / "train.jsonl"], "holds"),  # the data file's folder
                                (run / "checkpoints" / "..", [run], "is a pre-training run")]:
        for overwrite in (False, True):
            with pytest.raises(PretrainError, match=needle) as e:
                check_output_dir(out, "finetune", inputs, overwrite)
            assert "an input of `pretrain finetune`" in str(e.value)
    os.symlink(run, tmp_path / "link")  # the same folder under another name
    with pytest.raises(PretrainError, match="an input"):
        check_output_dir(tmp_path / "link", "export", [run], overwrite=True)
    check_output_dir(run / "hf", "export", [run])  # a new folder inside an input replaces nothing
    check_output_dir(tmp_path / "new", "finetune", [run, None, ""])
    with pytest.raises(PretrainError, match="is a file"):
        check_output_dir(data / "train.jsonl", "export", overwrite=True)


def test_a_file_writer_replaces_only_its_own_unchanged_file(tmp_path):
    out = tmp_path / "preds.jsonl"
    check_output_file(out, "predict")  # new
    out.write_text('{"row": 0}\n')
    record_output(out, "predict")
    check_output_file(out, "predict")  # the same command's, unchanged: a rerun replaces it
    with pytest.raises(PretrainError, match="not written by `pretrain embed`"):
        check_output_file(out, "embed")
    out.write_text('{"row": 0, "checked": "by hand"}\n')  # the user's work now
    with pytest.raises(PretrainError, match="was changed after `pretrain predict` wrote it.*--overwrite"):
        check_output_file(out, "predict")
    check_output_file(out, "predict", overwrite=True)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("{}\n")
    with pytest.raises(PretrainError, match="already exists and was not written by `pretrain predict`"):
        check_output_file(mine, "predict")
    # the input itself (by name or by a hard link), --overwrite or not
    os.link(mine, tmp_path / "hard.jsonl")
    for name in ("mine.jsonl", "hard.jsonl"):
        with pytest.raises(PretrainError, match="an input of `pretrain predict`"):
            check_output_file(tmp_path / name, "predict", [mine], overwrite=True)
    with pytest.raises(PretrainError, match="is a folder"):
        check_output_file(tmp_path, "embed", overwrite=True)
    record = json.loads((tmp_path / OUTPUTS).read_text())["outputs"]
    assert set(record) == {"preds.jsonl"} and record["preds.jsonl"]["command"] == "predict"


def test_an_export_is_exported_over_only_while_none_of_its_files_was_edited(tmp_path):
    out = export_folder(tmp_path / "hf")
    assert output_kinds(out) == ["export"]
    (out / "notes.md").write_text("mine")  # a file the export never writes: no matter
    check_output_dir(out, "export")
    card = (out / "README.md").read_text()
    for edit, needle in [(lambda: (out / "config.json").write_text('{"edited": 1}'), "config.json changed"),
                         (lambda: (out / "README.md").write_text(card.replace("A model", "My model")),
                          "README.md changed"),
                         (lambda: (out / "README.md").write_text(card + "\nMore words.\n"),
                          "does not end with pretrain's record")]:
        export_folder(out)
        edit()
        with pytest.raises(PretrainError, match=needle):
            check_output_dir(out, "export")
        check_output_dir(out, "export", overwrite=True)
    # an export made before the record existed: edits cannot be told, so --overwrite
    with pytest.raises(PretrainError, match="does not end with pretrain's record"):
        check_output_dir(make(tmp_path / "old", FOLDERS["export"]), "export")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing hidden in a folder to share


def test_recording_is_best_effort(tmp_path, monkeypatch):
    import pretrain.io as io

    out = tmp_path / "e.npy"
    out.write_bytes(b"x")

    def fail(*_a, **_k):
        raise PermissionError("read-only")

    monkeypatch.setattr(io, "write_json_atomic", fail)
    record_output(out, "embed")  # no error: the next run just asks for --overwrite
    with pytest.raises(PretrainError, match="not written by"):
        check_output_file(out, "embed")


def test_demo_refuses_a_foreign_folder_before_doing_anything(tmp_path, capsys):
    from pretrain.cli import main

    mine = make(tmp_path / "work", {"notes.txt": "mine", "run/": ""})
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an earlier `pretrain demo`'s output" in err
    assert "--overwrite" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "run"]
    check_output_dir(demo_folder(tmp_path / "demo"), "demo")  # an earlier demo's folder: run again


def test_weights_are_written_with_the_umask_mode_not_0600(tmp_path):
    """safetensors creates 0600 files; checkpoints, fine-tunes and exports get 0666 less the umask, as any
    other file the project writes."""
    import os

    import torch

    from pretrain.checkpoint import _save_weights
    from pretrain.io import default_mode

    umask = os.umask(0o022)
    os.umask(umask)
    p = tmp_path / "w.safetensors"
    _save_weights({"a": torch.zeros(2)}, p)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    q = tmp_path / "x"
    q.write_text("")
    os.chmod(q, 0o600)
    default_mode(q)
    assert q.stat().st_mode & 0o777 == 0o666 & ~umask
