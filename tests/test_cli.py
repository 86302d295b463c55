"""Bad input gets a one-line clear error and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _corpus import TINY_TRAIN, overrides, prepared_wordpiece, write_corpus

from pretrain.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True,
                          timeout=120)


def assert_clean_error(res, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def error_of(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_corpus(root / "corpus", n_docs=6)
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "char",
                 "--val-fraction", "0.3"]) == 0
    run = root / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), "--data.path", str(root / "data"),
                 "--train.max_steps", "4", "--quiet"]) == 0
    return root, run


MLM_ARGS = ["--objective", "mlm", "--model.arch", "bert"]
OBJECTIVE_ARGS = {"clm": [], "mlm": MLM_ARGS}
# what each kind of run does with its checkpoint besides `eval`
USE_RUN = {"clm": ["generate", "--prompt", "The"], "mlm": ["fill-mask", "the [MASK] king"]}


@pytest.fixture(scope="module")
def trained_mlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_mlm")
    prepared_wordpiece(root, n_docs=6, val_fraction=0.3)
    run = root / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), *MLM_ARGS,
                 "--data.path", str(root / "data"), "--train.max_steps", "4", "--quiet"]) == 0
    return root, run


@pytest.fixture(params=["clm", "mlm"])
def trained_any(request):
    """(objective, root, run): the causal-LM run of :func:`trained` or a masked-LM (WordPiece, BERT) run."""
    fixture = {"clm": "trained", "mlm": "trained_mlm"}[request.param]
    return (request.param, *request.getfixturevalue(fixture))


def test_missing_and_empty_input_subprocess(tmp_path):
    assert_clean_error(run_cli("prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")),
                       "not found")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_clean_error(run_cli("prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d")),
                       "no text")


def test_binary_and_non_utf8(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("hello world, a perfectly fine document.\n" * 50)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert "binary" in error_of(capsys, "prepare", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "d"))
    assert "UTF-8" in error_of(capsys, "prepare", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "d"))
    assert "--bad-files skip" in error_of(capsys, "prepare", str(tmp_path / "latin1.txt"),
                                          "--out", str(tmp_path / "d"))
    assert "--bad-files" not in error_of(capsys, "embed", str(tmp_path),
                                         "--input", str(tmp_path / "latin1.txt"),
                                         "--out", str(tmp_path / "e.npy"))
    # --bad-files skip: warn and go on with the good file
    with pytest.warns(UserWarning, match="skipping") as record:
        assert main(["prepare", str(tmp_path / "*.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "byte",
                     "--bad-files", "skip", "--json"]) == 0
    assert len(record) == 2
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert [s.get("skipped", "") != "" for s in meta["sources"]].count(True) == 2
    assert meta["split_rule"] == "text-tail"  # one document left: its tail is the validation split


def test_unknown_config_key_suggests(tmp_path, trained, capsys):
    root, _ = trained
    err = error_of(capsys, "train", "--out", str(tmp_path / "r"), "--data.path", str(root / "data"),
                   "--train.lrr", "1e-3")
    assert "train.lrr" in err and "did you mean 'lr'" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle:\n  n_layer: 2\n")
    err = error_of(capsys, "train", str(cfg), "--out", str(tmp_path / "r"))
    assert "modle" in err and "did you mean 'model'" in err
    assert "integer" in error_of(capsys, "train", "--out", str(tmp_path / "r"), "--model.n_layer", "two")


def test_missing_data_dir(tmp_path, capsys):
    err = error_of(capsys, "train", "--out", str(tmp_path / "r"), "--data.path", str(tmp_path / "none"))
    assert "not found" in err and "pretrain prepare" in err


def test_prompt_outside_vocab(trained, capsys):
    _, run = trained
    assert "outside the tokenizer's vocabulary" in error_of(capsys, "generate", str(run), "--prompt", "ζ")


def test_corrupt_checkpoint(tmp_path, trained_any, capsys):
    import shutil

    objective, _, run = trained_any
    bad = tmp_path / "run"
    shutil.copytree(run, bad, symlinks=True)
    ckpt = sorted((bad / "checkpoints").glob("step_*"))[-1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "truncated" in error_of(capsys, "eval", str(bad))
    command, *rest = USE_RUN[objective]
    res = run_cli(command, str(bad), *rest)
    assert_clean_error(res, "truncated")


def test_damaged_newest_checkpoint_names_the_one_before(tmp_path, trained, capsys):
    root, _ = trained
    args = [*overrides(TINY_TRAIN), "--data.path", str(root / "data"), "--train.ckpt_interval", "2",
            "--quiet"]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args, "--train.max_steps", "4"]) == 0
    newest = run / "checkpoints" / "step_000004"
    (newest / "state.pt").write_bytes(b"garbage")
    err = error_of(capsys, "train", "--out", str(run), *args, "--train.max_steps", "6")
    assert "damaged" in err and "step_000002 verifies" in err and "\n" not in err.strip()
    assert (newest / "state.pt").read_bytes() == b"garbage"  # left as it is
    newest.rename(tmp_path / "aside")  # as the message says: then it resumes from step 2
    assert main(["train", "--out", str(run), *args, "--train.max_steps", "6"]) == 0
    assert (run / "checkpoints" / "step_000006").is_dir()


def test_data_with_other_tokenizer(tmp_path, trained, capsys):
    root, run = trained
    assert main(["prepare", str(root / "corpus"), "--out", str(tmp_path / "bytes"),
                 "--tokenizer", "byte"]) == 0
    err = error_of(capsys, "eval", str(run), "--data", str(tmp_path / "bytes"))
    assert "vocabulary" in err and "does not match" in err
    # same vocab size, different tokenizer: also refused
    corpus2 = tmp_path / "c2"
    corpus2.mkdir()
    for p in sorted((root / "corpus").glob("*.txt")):
        (corpus2 / p.name).write_text(p.read_text().upper())
    assert main(["prepare", str(corpus2), "--out", str(tmp_path / "upper"), "--tokenizer", "char"]) == 0
    assert "different tokenizer" in error_of(capsys, "eval", str(run), "--data", str(tmp_path / "upper"))


def test_resume_with_changed_config_is_refused(trained_any, capsys):
    objective, root, run = trained_any
    err = error_of(capsys, "train", "--out", str(run), *overrides(TINY_TRAIN), *OBJECTIVE_ARGS[objective],
                   "--data.path", str(root / "data"), "--model.n_layer", "3")
    assert "model.n_layer" in err and "--resume" in err


def test_overrides_outside_train_are_refused(trained, capsys):
    _, run = trained
    assert "only apply" in error_of(capsys, "eval", str(run), "--train.lr", "1")


def test_not_a_run_dir(tmp_path, capsys):
    assert "no complete checkpoint" in error_of(capsys, "eval", str(tmp_path))
    assert "not found" in error_of(capsys, "eval", str(tmp_path / "missing"))


def test_option_typos_get_a_suggestion(capsys):
    for args, hint in ((["prepare", "x", "--out", "y", "--vocab-sise", "5"],
                        "did you mean: --vocab-sise → --vocab-size?"),
                       (["finetune", "r", "--train", "a", "--valid", "b", "--out", "o", "--lrr", "3"],
                        "--lrr → --lr?"),
                       # an option of another command is said to be one, not "corrected" into a far one
                       (["prepare", "x", "--out", "y", "--quiet"],
                        "--quiet is an option of train, finetune, transfer, not of this command")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and hint in capsys.readouterr().err


def test_train_writes_only_into_its_own_runs(tmp_path, trained, capsys):
    """Rule 1 for `train --out`: a new or empty folder, or a run (continued); anything else needs --overwrite,
    and the data it trains on is never the output."""
    root, run = trained
    args = ["train", *overrides(TINY_TRAIN), "--data.path", str(root / "data"), "--train.max_steps", "4",
            "--quiet", "--out"]
    assert main([*args, str(run)]) == 0  # its own earlier output: continued (nothing left to train)
    capsys.readouterr()
    # someone else's: a Hugging Face export, a fine-tune, a folder of other files; nothing of theirs changes
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    ft = tmp_path / "ft"
    ft.mkdir()
    for name in ("finetune.json", "tokenizer.json", "model.safetensors"):
        (ft / name).write_text(f"the fine-tune's {name}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("my tokenizer")
    for out, what in ((tmp_path / "hf", "a Hugging Face export"), (ft, "a fine-tuned model"),
                      (mine, "other files (tokenizer.json)")):
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        err = error_of(capsys, *args, str(out))
        assert what in err and "--overwrite" in err and "not an earlier `pretrain train`'s output" in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        assert not (out / "checkpoints").exists()
    # --overwrite: the run is written into the folder, the user's other files stay
    (mine / "tokenizer.json").unlink()
    (mine / "notes.txt").write_text("mine")
    assert main([*args, str(mine), "--overwrite"]) == 0
    assert (mine / "checkpoints" / "latest").exists() and (mine / "notes.txt").read_text() == "mine"
    # the data folder, or a folder holding it: refused, --overwrite or not
    for out in (root / "data", root):
        err = error_of(capsys, *args, str(out), "--overwrite")
        assert "an input of `pretrain train`" in err and str(root / "data") in err
    assert not (root / "data" / "checkpoints").exists()
