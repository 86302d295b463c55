"""`pretrain embed`: deterministic, row-aligned, identical across batch sizes; bad input → clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _corpus import TINY_TRAIN, overrides, sentences, write_corpus

from pretrain.cli import main


@pytest.fixture(scope="module", params=["clm", "mlm"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"embed_{request.param}")
    write_corpus(root / "corpus", n_docs=6)
    tok = "char" if request.param == "clm" else "wordpiece"
    extra = [] if request.param == "clm" else ["--objective", "mlm", "--model.arch", "bert"]
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", tok,
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    assert main(["train", "--out", str(root / "run"), *overrides(TINY_TRAIN), *extra, "--data.path",
                 str(root / "data"), "--data.seq_len", "256", "--train.max_steps", "3", "--quiet"]) == 0
    texts = [" ".join(sentences(1 + i % 2, seed=i)) for i in range(23)]
    texts[5] = " ".join(sentences(30, seed=99))  # longer than the context: truncated and reported
    (root / "in.txt").write_text("\n".join(texts) + "\n")
    return request.param, root, texts


def test_embed_deterministic_aligned_batch_invariant(run, capsys):
    objective, root, texts = run
    capsys.readouterr()
    pooling = ["mean", "last"] if objective == "clm" else ["mean", "cls"]
    for pool in pooling:
        outs = []
        for bs in ("1", "4", "64"):
            out = root / f"e_{pool}_{bs}.npy"
            assert main(["embed", str(root / "run"), "--input", str(root / "in.txt"), "--out", str(out),
                         "--pooling", pool, "--batch-size", bs, "--json"]) == 0
            res = json.loads(capsys.readouterr().out)
            assert res["rows"] == len(texts) and res["truncated"] == 1
            outs.append(np.load(out))
        assert outs[0].shape == (len(texts), 32)
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
        np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
        # row-aligned: embedding one text alone gives that row
        (root / "one.txt").write_text(texts[7] + "\n")
        assert main(["embed", str(root / "run"), "--input", str(root / "one.txt"),
                     "--out", str(root / "one.npy"), "--pooling", pool]) == 0
        capsys.readouterr()
        np.testing.assert_allclose(np.load(root / "one.npy")[0], outs[0][7], atol=1e-5)
        assert not np.allclose(outs[0][0], outs[0][1])
        # CRLF line ends: the same rows, the same vectors (no trailing carriage return in the texts)
        (root / "crlf.txt").write_bytes(("\r\n".join(texts) + "\r\n").encode())
        assert main(["embed", str(root / "run"), "--input", str(root / "crlf.txt"), "--out",
                     str(root / "crlf.npy"), "--pooling", pool]) == 0
        capsys.readouterr()
        np.testing.assert_allclose(np.load(root / "crlf.npy"), outs[0], atol=1e-5)
    assert main(["embed", str(root / "run"), "--input", str(root / "in.txt"),
                 "--out", str(root / "n.parquet"), "--normalize"]) == 0
    import pyarrow.parquet as pq

    emb = np.array(pq.read_table(root / "n.parquet").column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_embed_bad_input(run, capsys):
    objective, root, _ = run
    (root / "bad.txt").write_text("fine text\n\nmore text\n")
    assert main(["embed", str(root / "run"), "--input", str(root / "bad.txt"),
                 "--out", str(root / "x.npy")]) == 2
    assert "row 2 has no text" in capsys.readouterr().err
    (root / "t.csv").write_text("sentence,label\nhello,1\n")
    assert main(["embed", str(root / "run"), "--input", str(root / "t.csv"),
                 "--out", str(root / "x.npy")]) == 2
    assert "sentence" in capsys.readouterr().err
    assert main(["embed", str(root / "run"), "--input", str(root / "in.txt"),
                 "--out", str(root / "x.txt")]) == 2
    capsys.readouterr()
    if objective == "clm":
        assert main(["embed", str(root / "run"), "--input", str(root / "in.txt"),
                     "--out", str(root / "x.npy"), "--pooling", "cls"]) == 2
        assert "encoder" in capsys.readouterr().err


def test_embed_replaces_only_its_own_unchanged_file(run, tmp_path, capsys):
    """Rule 1 for `embed --out`: rerunning into its own earlier file works; a file it did not write, or one
    changed since, needs --overwrite; the input is never the output."""
    objective, root, texts = run
    if objective == "mlm":
        pytest.skip("one backbone is enough for the output rule")
    args = ["embed", str(root / "run"), "--input", str(root / "in.txt"), "--out"]
    out = tmp_path / "e.npy"
    assert main([*args, str(out)]) == 0 and main([*args, str(out)]) == 0  # new, then its own: replaced
    capsys.readouterr()
    mine = tmp_path / "mine.npy"
    np.save(mine, np.ones((2, 2), dtype=np.float32))
    before = mine.read_bytes()
    assert main([*args, str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not written by `pretrain embed`" in err and "--overwrite" in err
    assert mine.read_bytes() == before
    assert main([*args, str(mine), "--overwrite"]) == 0 and np.load(mine).shape == (len(texts), 32)
    np.save(out, np.load(out)[:3])  # edited after embed wrote it
    assert main([*args, str(out)]) == 2 and "was changed after" in capsys.readouterr().err
    # the input itself: refused, --overwrite or not
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": texts}), table)
    before = table.read_bytes()
    assert main(["embed", str(root / "run"), "--input", str(table), "--out", str(table), "--overwrite"]) == 2
    assert "an input of `pretrain embed`" in capsys.readouterr().err and table.read_bytes() == before
