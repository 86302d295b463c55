"""prepare: shards + meta.json, the train/validation split, overwriting safely; at scale, worker processes
give the same bytes as in-process, memory does not grow with the corpus, an interrupted (SIGKILL'ed)
prepare restarts cleanly; mixtures are recorded in the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from _corpus import _docs, _jsonl, sentences
from conftest import _bins, quiet, read_split

from pretrain.cli import main
from pretrain.data.clean import CleanConfig, Cleaner
from pretrain.data.loader import TokenSplit, TrainLoader
from pretrain.data.manifest import load_meta, token_dtype
from pretrain.data.prepare import _is_val, _scan_batch, _Workers, prepare
from pretrain.data.sources import DataError, expand_inputs
from pretrain.data.tokenizer import Tokenizer, byte_tokenizer
from pretrain.io import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]


def split_on(ids: np.ndarray, sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids.tolist():
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out


def _same_meta(a: dict, b: dict) -> None:
    for key in ("splits", "tokenizer", "cleaning", "sources", "split_rule", "dtype"):
        assert a[key] == b[key], key


# ===================================================================================== split and manifest


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32


def test_single_file_splits_at_text_tail(corpus_file, prepared_data):
    text = corpus_file.read_text(encoding="utf-8")
    meta = load_meta(prepared_data)
    tok = Tokenizer.load(prepared_data / "tokenizer.json")
    cut = int(len(text) * (1 - 0.2))
    assert meta["split_rule"] == "text-tail"
    assert read_split(prepared_data, "train").tolist() == tok.encode(text[:cut])
    assert read_split(prepared_data, "val").tolist() == tok.encode(text[cut:])
    assert tok.decode(read_split(prepared_data, "train").tolist()) + tok.decode(
        read_split(prepared_data, "val").tolist()) == text
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_meta_json_fields(corpus_file, prepared_data):
    meta = load_meta(prepared_data)
    tok = Tokenizer.load(prepared_data / "tokenizer.json")
    text = corpus_file.read_text(encoding="utf-8")
    assert meta["format"] == 1
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["kind"] == "char"
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size == len(set(text)) + 2
    assert meta["tokenizer"]["eot_id"] == tok.eot_id
    assert meta["tokenizer"]["sha256"] == tok.sha256()
    assert meta["val_fraction"] == 0.2
    total_bytes = 0
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = [(prepared_data / sh["file"]).stat().st_size for sh in info["shards"]]
        assert [sh["tokens"] * 2 for sh in info["shards"]] == sizes
        assert info["tokens"] == sum(sizes) // 2 > 0
        total_bytes += info["bytes"]
    assert total_bytes == len(text.encode("utf-8"))
    (src,) = meta["sources"]
    assert Path(src["path"]) == corpus_file.resolve()
    assert src["format"] == "text" and src["documents"] == 1
    assert src["sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    assert src["bytes"] == corpus_file.stat().st_size
    # nothing but the finished files is left behind
    assert sorted(p.name for p in prepared_data.parent.iterdir() if p.name.startswith(".")) == []


def test_multi_document_corpus(prepare_corpus, text_factory):
    docs = [text_factory(40 + 5 * i, seed=100 + i) for i in range(12)]
    out = prepare_corpus(docs, val_fraction=0.3)
    meta = load_meta(out)
    tok = Tokenizer.load(out)
    assert meta["split_rule"] == "document-hash"
    encoded = [tok.encode(d) for d in docs]
    seen = []
    for split in ("train", "val"):
        ids = read_split(out, split)
        n = meta["splits"][split]["documents"]
        assert n >= 1
        assert int((ids == tok.eot_id).sum()) == n - 1  # EOT between documents, not after the last
        pieces = split_on(ids, tok.eot_id)
        assert len(pieces) == n
        idx = [encoded.index(p) for p in pieces]  # every piece is exactly one whole document ...
        assert idx == sorted(idx)  # ... in corpus order
        seen += idx
        assert meta["splits"][split]["bytes"] == sum(len(docs[i].encode()) for i in idx)
    assert sorted(seen) == list(range(len(docs)))  # each document in exactly one split
    # the split is a function of content: preparing again gives identical shards
    again = prepare_corpus(docs, name="again", val_fraction=0.3)
    for split in ("train", "val"):
        assert np.array_equal(read_split(out, split), read_split(again, split))


def test_at_least_one_validation_document(prepare_corpus, text_factory):
    docs = [text_factory(30, seed=s) for s in range(200, 206)]
    frac = 1e-6  # far too small for any document to hash into validation ...
    assert not any(_is_val(d, frac) for d in docs)
    out = prepare_corpus(docs, val_fraction=frac)
    meta = load_meta(out)
    tok = Tokenizer.load(out)
    assert meta["splits"]["val"]["documents"] == 1  # ... so the last document is used
    assert read_split(out, "val").tolist() == tok.encode(docs[-1])


def test_no_validation_split(prepare_corpus, text_factory):
    docs = [text_factory(30, seed=s) for s in range(3)]
    out = prepare_corpus(docs, val_fraction=0.0)
    meta = load_meta(out)
    assert meta["splits"]["val"]["tokens"] == 0 and meta["splits"]["train"]["documents"] == 3


def test_txt_and_jsonl_give_same_ids(prepare_corpus, text_factory):
    docs = [text_factory(35, seed=50 + i) for i in range(8)]
    a = prepare_corpus(docs, name="from_txt", fmt="txt")
    b = prepare_corpus(docs, name="from_jsonl", fmt="jsonl")
    assert load_meta(a)["tokenizer"]["sha256"] == load_meta(b)["tokenizer"]["sha256"]
    for split in ("train", "val"):
        assert np.array_equal(read_split(a, split), read_split(b, split))
    assert read_split(a, "train").size > 0


def test_prepare_byte_and_bpe(corpus_file, tmp_path):
    text = corpus_file.read_text()
    meta = prepare([str(corpus_file)], tmp_path / "byte", tokenizer="byte", val_fraction=0.1, log=quiet)
    assert meta["tokenizer"]["vocab_size"] == 257
    cut = int(len(text) * 0.9)
    assert read_split(tmp_path / "byte", "train").tolist() == list(text[:cut].encode())
    meta = prepare([str(corpus_file)], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, val_fraction=0.1,
                   log=quiet)
    tok = Tokenizer.load(tmp_path / "bpe")
    assert meta["tokenizer"]["kind"] == "bpe"
    assert tok.decode(read_split(tmp_path / "bpe", "train").tolist()) == text[:cut]


def test_prepare_multiple_shards(corpus_file, tmp_path):
    out = tmp_path / "sharded"
    meta = prepare([str(corpus_file)], out, tokenizer="char", val_fraction=0.2, shard_tokens=1000, log=quiet)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) == -(-meta["splits"]["train"]["tokens"] // 1000) > 1
    assert all(sh["tokens"] == 1000 for sh in shards[:-1])
    text = corpus_file.read_text()
    tok = Tokenizer.load(out)
    assert read_split(out, "train").tolist() == tok.encode(text[:int(len(text) * 0.8)])


def test_prepare_refuses_to_overwrite(corpus_file, prepared_data, tmp_path, text_factory):
    before = (prepared_data / "train_000000.bin").read_bytes()
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare([str(corpus_file)], prepared_data, tokenizer="char", log=quiet)
    assert (prepared_data / "train_000000.bin").read_bytes() == before
    other = tmp_path / "other.txt"
    other.write_text(text_factory(400, seed=99), encoding="utf-8")
    meta = prepare([str(other)], prepared_data, tokenizer="byte", val_fraction=0.2, overwrite=True, log=quiet)
    assert load_meta(prepared_data)["tokenizer"]["kind"] == "byte" == meta["tokenizer"]["kind"]
    assert (read_split(prepared_data, "train").tolist()
            == list(other.read_bytes()[: int(len(other.read_text()) * 0.8)]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old dirs left


def test_prepare_does_not_delete_unrelated_output_folder(tmp_path, text_factory):
    folder = tmp_path / "data"
    folder.mkdir()
    src = folder / "input.txt"
    src.write_text(text_factory(300), encoding="utf-8")
    try:
        prepare([str(src)], folder, tokenizer="char", log=quiet)
    except DataError:
        pass  # refusing is fine; destroying the user's files is not
    assert src.is_file()


def test_prepare_all_empty_input(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("  \n\n\t", encoding="utf-8")
    (tmp_path / "in" / "c.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match="no text found"):
        prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer="char", log=quiet)
    assert not (tmp_path / "out").exists()


def test_prepare_invalid_val_fraction(corpus_file, tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        prepare([str(corpus_file)], tmp_path / "out", val_fraction=1.0, log=quiet)


def _docs_all_hashing_to_val(frac: float, n: int, text_factory) -> list[str]:
    out, seed = [], 0
    while len(out) < n:
        d = text_factory(20, seed=1000 + seed)
        seed += 1
        if _is_val(d, frac):
            out.append(d)
    return out


def test_prepare_keeps_a_training_document(prepare_corpus, text_factory):
    docs = _docs_all_hashing_to_val(0.2, 2, text_factory)
    out = prepare_corpus(docs, val_fraction=0.2)
    assert load_meta(out)["splits"]["train"]["documents"] >= 1


def test_warnings_free_prepare(corpus_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare([str(corpus_file)], tmp_path / "w", tokenizer="char", log=quiet)


def test_bad_cleaning_options_and_unencodable_text_are_clear_errors(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from pretrain.cli import main

    (tmp_path / "c.txt").write_text("the king spoke to the queen\n", encoding="utf-8")
    for flags, message in ((["--normalize", "NFX"], "unknown Unicode normalisation form 'NFX'"),
                           (["--decontam-ngram", "0"], "n-gram length must be >= 1"),
                           (["--near-dup", "1.5"], "near_dup_threshold must be between 0 and 1"),
                           (["--tokenizer-sample-mb", "0"], "--tokenizer-sample-mb must be > 0")):
        assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"), "--tokenizer", "char",
                     *flags]) == 2
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "o").exists()
    # a reused tokenizer.json whose model cannot encode an unseen word (WordLevel without an unknown token)
    tk = HFTokenizer(models.WordLevel({"the": 0, "king": 1, "<|endoftext|>": 2}))
    tk.add_special_tokens(["<|endoftext|>"])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "wl.json"))
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"), "--tokenizer",
                 str(tmp_path / "wl.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot encode this text" in err and "Traceback" not in err
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "ok"),
                 "--tokenizer", "char"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "ok"), "--samples", "-1"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err


def test_reused_tokenizer_that_does_not_cover_the_corpus_is_reported(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc abc\n", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], tmp_path / "d1", tokenizer="char", log=quiet)
    (tmp_path / "b.txt").write_text("ZZZ 123 ééé abc\n", encoding="utf-8")
    lines: list[str] = []
    prepare([str(tmp_path / "b.txt")], tmp_path / "d2", tokenizer=str(tmp_path / "d1" / "tokenizer.json"),
            log=lines.append)
    warning = [x for x in lines if "unknown token" in x]
    assert len(warning) == 1 and "9 of 16 tokens" in warning[0], lines
    lines.clear()
    prepare([str(tmp_path / "a.txt")], tmp_path / "d3", tokenizer=str(tmp_path / "d1" / "tokenizer.json"),
            log=lines.append)
    assert not [x for x in lines if "unknown token" in x]


def test_out_inside_an_input_folder_is_not_read_back(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text to read\n", encoding="utf-8")
    out = tmp_path / "corpus" / "prep"
    first = prepare([str(tmp_path / "corpus")], out, tokenizer="byte", log=quiet)
    again = prepare([str(tmp_path / "corpus")], out, tokenizer="byte", overwrite=True, log=quiet)
    assert len(again["sources"]) == len(first["sources"]) == 1
    assert again["splits"] == first["splits"]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_a_vocabulary_smaller_than_asked_is_reported(tmp_path, kind):
    (tmp_path / "a.txt").write_text("a tiny corpus with few words, a tiny corpus\n", encoding="utf-8")
    lines: list[str] = []
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "d", tokenizer=kind, vocab_size=4000,
                   log=lines.append)
    assert meta["tokenizer"]["vocab_size"] < 4000
    assert [x for x in lines if "fewer than the 4,000 asked for" in x], lines


def test_tokenizer_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    import pretrain.data.tokenizer as tk

    docs = [" ".join(sentences(10, seed=i)) for i in range(200)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_text(d)
    seen: list[int] = []
    real = tk.train_bpe

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.append(sum(len(t) for t in texts))
        return real(texts, vocab_size)

    monkeypatch.setattr(tk, "train_bpe", spy)
    total = sum(len(d) for d in docs)
    prepare([str(tmp_path)], tmp_path / "d", tokenizer="bpe", vocab_size=300,
            tokenizer_sample_chars=total // 4, val_fraction=0.0, log=lambda *a: None)
    assert 0.1 * total < seen[0] < 0.45 * total  # about a quarter, spread over the corpus


def test_near_dup_in_prepare_keeps_documents_without_words_and_encoders_get_no_index(tmp_path, monkeypatch):
    """As Cleaner.keep: wordless documents have no MinHash, so none is a near-duplicate of another; and the
    encoding workers (pass 3) get a cleaner without the duplicate index the scan built."""
    import pickle

    import pretrain.data.prepare as prep

    docs = [*_docs(40), "!!!", "...", "---", "+++", ");"]
    sizes = []
    real = prep._Workers.__init__

    def spy(self, workers, init_args, *a, **k):
        sizes.append(len(pickle.dumps(init_args[0])))
        real(self, workers, init_args, *a, **k)

    monkeypatch.setattr(prep._Workers, "__init__", spy)
    meta = prepare([str(_jsonl(tmp_path / "d.jsonl", docs))], tmp_path / "o", tokenizer="bpe", vocab_size=300,
                   clean=CleanConfig(dedup_exact=True, near_dup_threshold=0.7), log=quiet, workers=0)
    assert "near_duplicate" not in meta["cleaning"]["removed"]
    assert len(sizes) == 2 and sizes[1] <= sizes[0] + 64  # pass 3's cleaner: no bigger than at the start


def test_special_tokens_written_in_a_document_are_text(tmp_path):
    """Only the writer puts EOT between documents: a document spelling out <|endoftext|> stays one
    document."""
    from pretrain.data.tokenizer import Tokenizer

    docs = ["first document, it mentions <|endoftext|> in the middle of its text", "second document"] * 3
    for tok in ("byte", "bpe", "unigram", "wordpiece"):
        counts = []
        for name, texts in (("spelled", docs), ("plain", [d.replace("<|endoftext|>", "xx") for d in docs])):
            out = tmp_path / f"{tok}_{name}"
            prepare([str(_jsonl(tmp_path / f"{name}.jsonl", texts))], out, tokenizer=tok, vocab_size=300,
                    val_fraction=0.0, log=quiet, workers=0)
            ids = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted(out.glob("train_*.bin"))])
            t = Tokenizer.load(out)
            counts.append(int((ids == t.eot_id).sum()))
            # (wordpiece lower-cases and splits; unigram has no '<')
            if name == "spelled" and tok in ("byte", "bpe"):
                assert "<|endoftext|>" in t.decode(ids.tolist(), skip_special_tokens=True)
        assert counts[0] == counts[1], tok


# =============================================================================================== parallel


def test_workers_and_batch_size_do_not_change_the_output(tmp_path):
    docs = _docs(120)
    docs += docs[:10]  # exact duplicates
    docs += [d.replace("the", "a", 1) for d in docs[20:30]]  # near-duplicates
    docs += ["short"] * 3
    (tmp_path / "eval.txt").write_text(docs[50] + "\n")
    src = _jsonl(tmp_path / "in" / "docs.jsonl", docs)
    clean = CleanConfig(dedup_exact=True, near_dup_threshold=0.8, min_chars=20,
                        decontaminate=[str(tmp_path / "eval.txt")])
    metas = {}
    for name, kw in {"inproc": dict(workers=0),
                     "pool": dict(workers=2, batch_chars=3000, start_method="spawn"),
                     "pool_tiny_batches": dict(workers=2, batch_chars=1)}.items():
        metas[name] = prepare([str(src)], tmp_path / name, tokenizer="bpe", vocab_size=400, clean=clean,
                              log=quiet, **kw)
    # a tokenizer known upfront is applied during the scan (one read): same bytes as the three-pass path
    tok = str(tmp_path / "inproc" / "tokenizer.json")
    for name, kw in {"file_inproc": dict(workers=0), "file_pool": dict(workers=2, batch_chars=2000)}.items():
        metas[name] = prepare([str(src)], tmp_path / name, tokenizer=tok, clean=clean, log=quiet, **kw)
    removed = metas["inproc"]["cleaning"]["removed"]
    assert {"exact_duplicate", "near_duplicate", "min_chars", "contaminated"} <= set(removed)
    for name in ("pool", "pool_tiny_batches", "file_inproc", "file_pool"):
        _same_meta(metas["inproc"], {**metas[name], "tokenizer": metas["inproc"]["tokenizer"]})
        assert _bins(tmp_path / "inproc") == _bins(tmp_path / name)
    assert metas["file_pool"]["tokenizer"]["sha256"] == metas["inproc"]["tokenizer"]["sha256"]
    assert metas["pool"]["settings"]["workers"] == 2


def test_in_flight_batches_are_bounded():
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled, ["some text"] * 4

    pool = _Workers(2, (Cleaner(CleanConfig()), None, 0.1, "uint32"))
    try:
        it = pool.map(_scan_batch, endless())
        for _ in range(3):
            next(it)
        assert pulled <= 2 * 2 + 3  # never more than 2 x workers batches ahead of the consumer
    finally:
        pool.close(ok=False)


_RSS_SCRIPT = """
import resource, sys
from pretrain.data.prepare import prepare
prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], workers=0, batch_chars=200_000, \
log=lambda *a: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    tok = tmp_path / "tok.json"
    byte_tokenizer().save(tok)
    base = _docs(400, sents=20)  # ~0.5 MB of distinct documents
    rss = {}
    for mb in (2, 12):
        path = tmp_path / f"c{mb}.jsonl.gz"
        block = "".join(json.dumps({"text": f"{k} {d}"}) + "\n" for k, d in enumerate(base)).encode()
        with gzip.open(path, "wb", compresslevel=1) as f:
            for r in range(-(-mb * 1_000_000 // len(block))):
                f.write(block.replace(b'{"text": "', f'{{"text": "{r} '.encode()))
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / f"d{mb}"),
                              str(tok)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr
        rss[mb] = int(res.stdout.split()[-1]) / 1024  # MB
    assert load_meta(tmp_path / "d12")["splits"]["train"]["bytes"] > 10_000_000
    assert rss[12] - rss[2] < 8, rss  # 10 MB more text (in a single compressed file), not 10 MB more memory


# =========================================================================================== crash safety


@pytest.mark.parametrize("finished", [True, False])
def test_crash_inside_the_final_swap_loses_nothing(tmp_path, finished):
    (tmp_path / "a.txt").write_text("first corpus text\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second, other corpus text\n", encoding="utf-8")
    out = tmp_path / "d"
    prepare([str(tmp_path / "a.txt")], out, tokenizer="byte", log=quiet)
    old_meta = load_meta(out)
    prepare([str(tmp_path / "b.txt")], tmp_path / "new", tokenizer="byte", log=quiet)
    # the state between the swap's two renames: out moved aside, the new directory not yet in place
    out.rename(tmp_path / ".d.old")
    partial = tmp_path / ".d.partial"
    (tmp_path / "new").rename(partial)
    if not finished:
        (partial / "meta.json").unlink()  # the new one was not complete
    with pytest.raises(DataError, match="recovered from an interrupted prepare"):
        # no --overwrite: nothing replaced
        prepare([str(tmp_path / "b.txt")], out, tokenizer="byte", log=quiet)
    got = load_meta(out)
    assert got["sources"][0]["path"].endswith("b.txt" if finished else "a.txt")
    assert finished or got == old_meta
    assert (tmp_path / ".d.old").exists() is False
    prepare([str(tmp_path / "b.txt")], out, tokenizer="byte", overwrite=True, log=quiet)
    assert load_meta(out)["sources"][0]["path"].endswith("b.txt")
    assert not (tmp_path / ".d.old").exists() and not partial.exists()


_KILL_SCRIPT = """
import os, signal, sys
import pretrain.data.prepare as P  # pretrain-kill-test
orig = P.ShardWriter._seal
sealed = []
def seal(self):
    had = self._f is not None
    orig(self)
    if had:
        sealed.append(self.shards[-1]["file"])
        if len(sealed) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
P.ShardWriter._seal = seal
P.prepare([sys.argv[1]], sys.argv[2], tokenizer="byte", workers=2, batch_chars=4000, shard_tokens=5000,
          log=lambda *a: None)
"""


def _orphans(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc")
def test_sigkill_mid_prepare_then_rerun_restarts_cleanly(tmp_path):
    src = _jsonl(tmp_path / "in" / "docs.jsonl", _docs(300))
    out = tmp_path / "data"
    res = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(src), str(out)], cwd=ROOT, timeout=120,
                         capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    # killed mid-way: nothing at --out, only the hidden work directory with some sealed shards
    assert not out.exists()
    partial = tmp_path / ".data.partial"
    assert partial.is_dir() and not (partial / "meta.json").exists()
    assert len(list(partial.glob("*.bin"))) >= 3
    with pytest.raises(DataError, match="not found"):
        load_meta(out)
    deadline = time.time() + 10  # the orphaned worker processes see their task pipe close and exit
    while _orphans("pretrain-kill-test") and time.time() < deadline:
        time.sleep(0.1)
    assert not _orphans("pretrain-kill-test")

    logs: list[str] = []
    meta = prepare([str(src)], out, tokenizer="byte", workers=2, batch_chars=4000, shard_tokens=5000,
                   log=logs.append)
    assert any("interrupted" in m for m in logs)
    reference = prepare([str(src)], tmp_path / "reference", tokenizer="byte", workers=0, shard_tokens=5000,
                        log=quiet)
    _same_meta(meta, reference)
    assert _bins(out) == _bins(tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_shards_in_progress_are_never_complete_names(tmp_path, monkeypatch):
    """While a shard is being written it is NAME.partial; meta.json (written last) lists only sealed
    shards."""
    import pretrain.data.prepare as P

    seen: list[list[str]] = []
    orig = P.ShardWriter.write

    def spy(self, ids):
        orig(self, ids)
        seen.append(sorted(p.name for p in self.out_dir.iterdir()))

    monkeypatch.setattr(P.ShardWriter, "write", spy)
    src = _jsonl(tmp_path / "docs.jsonl", _docs(40))
    meta = prepare([str(src)], tmp_path / "d", tokenizer="byte", shard_tokens=2000, log=quiet)
    assert any(n.endswith(".bin.partial") for names in seen for n in names)
    assert all("meta.json" not in names for names in seen)
    listed = {sh["file"] for sp in meta["splits"].values() for sh in sp["shards"]}
    assert listed == {p.name for p in (tmp_path / "d").glob("*.bin")}


def test_concurrent_prepare_into_the_same_output_is_refused(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", _docs(5))
    out = tmp_path / "d"
    with exclusive_lock(tmp_path / ".d.lock", "held by this test"):  # what a running prepare holds
        with pytest.raises(DataError, match="another prepare"):
            prepare([str(src)], out, tokenizer="byte", log=quiet)
    prepare([str(src)], out, tokenizer="byte", log=quiet)  # the lock is released (and its file removed)
    assert not (tmp_path / ".d.lock").exists()


# =============================================================================================== mixtures


def test_mixture_is_recorded_in_the_manifest(mixture):
    out, meta = mixture
    by_input = {Path(m["input"]).name: m for m in meta["mixture"]}
    assert by_input["a.jsonl"]["weight"] == 1.0 and by_input["b"]["weight"] == 3.0
    assert by_input["b"]["share"] == 0.75 and by_input["b"]["sources"] == 8
    assert all(s["weight"] in (1.0, 3.0) and s["group"] in (0, 1) for s in meta["sources"])
    shards = meta["splits"]["train"]["shards"]
    assert {sh["group"] for sh in shards} == {0, 1}
    assert all(sh["file"].startswith(f"train_g{sh['group']:03d}_") for sh in shards)
    assert sum(m["tokens"]["train"] for m in meta["mixture"]) == meta["splits"]["train"]["tokens"]


def test_without_weights_nothing_changes(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", _docs(30))
    meta = prepare([str(src)], tmp_path / "d", tokenizer="byte", log=quiet)
    assert "mixture" not in meta and all("weight" not in s for s in meta["sources"])
    assert [sh["file"] for sh in meta["splits"]["train"]["shards"]] == ["train_000000.bin"]
    loader = TrainLoader(TokenSplit(tmp_path / "d", "train"), seq_len=16, batch_size=4)
    assert set(loader.state_dict()) == {"samples_seen", "seed", "seq_len"}


def test_weight_errors(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", _docs(30))
    tiny = _jsonl(tmp_path / "tiny.jsonl", ["only a few words here"])
    with pytest.raises(DataError, match="must be a number"):
        expand_inputs([f"{src}::heavy"])
    with pytest.raises(DataError, match=">= 0"):
        expand_inputs([f"{src}::-1"])
    with pytest.raises(DataError, match="every mixture weight is 0"):
        prepare([f"{src}::0"], tmp_path / "z", tokenizer="byte", log=quiet)
    prepare([f"{src}::1", f"{tiny}::1"], tmp_path / "d", tokenizer="byte", val_fraction=0.0, log=quiet)
    with pytest.raises(DataError, match="tiny.jsonl.*no sequence"):
        TrainLoader(TokenSplit(tmp_path / "d", "train"), seq_len=64, batch_size=2)
    prepare([f"{src}::1", f"{tiny}::0"], tmp_path / "d0", tokenizer="byte", val_fraction=0.0, log=quiet)
    TrainLoader(TokenSplit(tmp_path / "d0", "train"), seq_len=64, batch_size=2)  # weight 0: never drawn, fine


def test_a_one_document_input_of_a_mixture_is_cut_at_its_tail(tmp_path):
    """The split rules hold per input: a weighted single document (a book) trains and validates, whatever
    its content hash (it used to go wholly to one split, so training could find no sequence of it)."""
    a = _jsonl(tmp_path / "a.jsonl", _docs(30))
    book = _jsonl(tmp_path / "book.jsonl", [" ".join(_docs(20, seed=5))])
    for workers in (0, 2):
        meta = prepare([f"{a}::1", f"{book}::2"], tmp_path / f"d{workers}", tokenizer="byte",
                       val_fraction=0.5, log=quiet, workers=workers)
        comp = {m["input"]: m for m in meta["mixture"]}
        assert comp[str(book)]["documents"] == {"train": 1, "val": 1}
        assert comp[str(book)]["tokens"]["val"] == pytest.approx(comp[str(book)]["tokens"]["train"], rel=0.01)
        assert 0 < comp[str(a)]["documents"]["val"] < 30 and meta["split_rule"].startswith("document-hash")
        TrainLoader(TokenSplit(tmp_path / f"d{workers}", "train"), seq_len=64, batch_size=2)
    assert _bins(tmp_path / "d0") == _bins(tmp_path / "d2")


def test_cli_weights_and_new_options(tmp_path, capsys):
    a = _jsonl(tmp_path / "a.jsonl", _docs(30, seed=1))
    b = _jsonl(tmp_path / "b.jsonl", _docs(10, seed=2))
    assert main(["prepare", f"{a}::2", f"{b}::0.5", "--out", str(tmp_path / "d"), "--tokenizer", "byte",
                 "--workers", "2", "--batch-mb", "0.01", "--shard-tokens", "3000", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mixture"][str(a)]["weight"] == 2.0 and res["mixture"][str(b)]["weight"] == 0.5
    meta = load_meta(tmp_path / "d")
    assert meta["settings"]["workers"] == 2 and meta["settings"]["batch_chars"] == 10_000
    assert max(sh["tokens"] for sh in meta["splits"]["train"]["shards"]) <= 3000


# ====================================================================================== huge documents

_LONG_TEXT_PARTS = ["Hello, world! It's 2026; we'll see.", "  runs of   spaces,\ttabs\t\tand\n\nlines \r\n",
                    "numbers 3.14159 1,000,000 ½ ² ٣", "naïve café — “quotes” 漢字かな交じり文",
                    "🙂👍🏽 Ελληνικά ΑΣ.",
                    "combining e\u0301 a\u0308; no-break\u00a0space; ideographic\u3000space",
                    "a written-out <|endoftext|> and [SEP] and <unk>", "SHOUTING'S FINE'LL 'RE 'VE ''' ----"]


def _long_text(n: int = 60) -> str:
    """A long document of ordinary and tricky text, and one 200-character run without a space."""
    import random

    parts = [" ".join(sentences(4, seed=i)) for i in range(n)] + _LONG_TEXT_PARTS * 3
    random.Random(0).shuffle(parts)
    parts.insert(len(parts) // 2, "x" * 200)
    return " ".join(parts)


def _trained(kind: str, text: str):
    from pretrain.data.tokenizer import char_tokenizer, train_bpe, train_unigram, train_wordpiece

    corpus = _docs(40) + _LONG_TEXT_PARTS
    return {"byte": byte_tokenizer, "char": lambda: char_tokenizer(set(text[: len(text) // 2])),
            "bpe": lambda: train_bpe(corpus, 500), "wordpiece": lambda: train_wordpiece(corpus, 300),
            "unigram": lambda: train_unigram(corpus, 200)}[kind]()


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "wordpiece", "unigram"])
def test_a_long_text_is_tokenized_in_pieces_to_the_whole_texts_ids(kind, monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer

    from pretrain.data import encode

    monkeypatch.setattr(encode, "PIECE_CHARS", 64)
    monkeypatch.setattr(encode, "ENCODE_CHARS", 256)
    monkeypatch.setattr(encode, "CHECK_CHARS", 300)  # the fast paths' self-check on the first pieces only
    text = _long_text()
    tok = _trained(kind, text)
    whole = HFTokenizer.from_str(tok.to_str())
    whole.encode_special_tokens = True  # as prepare encodes: a written-out special token is text
    enc = encode.IdsEncoder(HFTokenizer.from_str(tok.to_str()), np.int64)
    assert enc.chunker.rule == encode.KIND_RULES[kind]
    spans = list(enc.chunker.spans(text))
    assert len(spans) > len(text) // 100 and max(hi - lo for lo, hi in spans) <= 64  # many pieces
    assert "".join(text[lo:hi] for lo, hi in spans) == text
    if kind not in ("byte", "char"):  # every cut is a rule cut, but in the 200-character run without a space
        ch = enc.chunker
        fallback = [hi for lo, hi in spans
                    if hi < len(text) and not (text[hi] in ch.chars and ch._ok(text, hi, 0, len(text)))]
        assert 1 <= len(fallback) <= 3 and all(text[hi - 1] == text[hi] == "x" for hi in fallback)
        text = text.replace("x" * 200, "x")  # (the documented rule's case: the next test)
    texts = [text, "short", "", text[: len(text) // 3]]
    ids, lens = enc.encode(texts)
    assert enc.fast == (kind in ("byte", "char", "bpe"))  # the self-check kept the fast path
    want = [whole.encode(t, add_special_tokens=False).ids for t in texts]
    assert lens.tolist() == [len(w) for w in want]
    assert ids.tolist() == [i for w in want for i in w]


def test_where_no_safe_cut_exists_the_documented_rule_holds(monkeypatch):
    """bpe: a piece with no space between non-spaces within PIECE_CHARS characters is cut after exactly that
    many (the cut is safe for normalisation: before an ASCII character); its ids are those of the pieces,
    which may differ from the whole text's at that cut (and only there)."""
    from tokenizers import Tokenizer as HFTokenizer

    from pretrain.data import encode
    from pretrain.data.tokenizer import train_bpe

    monkeypatch.setattr(encode, "PIECE_CHARS", 50)
    monkeypatch.setattr(encode, "ENCODE_CHARS", 200)
    tok = train_bpe(["abcdefgh" * 40, "some words here"] * 5, 300)
    text = "some words here " + "abcdefgh" * 20 + " some words here"  # a 160-character run, no space
    enc = encode.IdsEncoder(HFTokenizer.from_str(tok.to_str()), np.int64)
    spans = list(enc.chunker.spans(text))
    assert spans[:3] == [(0, 15), (15, 65), (65, 115)]  # a rule cut, then cuts after exactly 50 characters
    pieces = [text[lo:hi] for lo, hi in spans]
    got = enc.encode([text])[0].tolist()
    assert got == [i for p in pieces for i in tok.encode(p, text_only=True)]
    assert got != tok.encode(text, text_only=True)  # "abcdefgh" cut in two: a different encoding there
    assert tok.decode(got) == text  # the text itself is intact


def test_tokenizer_training_text_in_pieces_gives_the_same_words():
    """The trainers count pre-tokenized words: the pieces give the same ones (bpe: the same tokenizer; the
    wordpiece and unigram trainers are not deterministic run to run, so their words are compared)."""
    from pretrain.data.encode import Chunker
    from pretrain.data.tokenizer import train_bpe

    text = _long_text().replace("x" * 200, "x")  # (a cut in a run without a space: a word cut in two)
    for kind in ("bpe", "wordpiece", "unigram"):
        pieces = list(Chunker.for_kind(kind).pieces(text, 64))
        assert len(pieces) > 50 and "".join(pieces) == text
        tk = _trained(kind, text).tk

        def words(texts, tk=tk):
            norm = tk.normalizer.normalize_str if tk.normalizer is not None else (lambda s: s)
            return sorted(w for t in texts for w, _ in tk.pre_tokenizer.pre_tokenize_str(norm(t)))

        assert words(pieces) == words([text]), kind
    in_pieces = train_bpe(Chunker.for_kind("bpe").pieces(text, 64), 400)
    assert in_pieces.to_str() == train_bpe([text], 400).to_str()


def test_long_document_cleaning_checks_match_the_whole_text(tmp_path, monkeypatch):
    """Filters, exact and near-duplicate hashes, decontamination, split hash: slice by slice, the same."""
    from pretrain.data import prepare as prep

    (tmp_path / "eval.txt").write_text(" ".join(sentences(3, seed=7)) + "\n", encoding="utf-8")
    monkeypatch.setattr(prep, "SLICE_CHARS", 40)
    configs = [CleanConfig(dedup_exact=True, near_dup_threshold=0.7, max_symbol_ratio=0.9,
                           min_alpha_ratio=0.1, max_repeated_line_ratio=0.3,
                           decontaminate=[str(tmp_path / "eval.txt")], ngram=4),
               CleanConfig(max_repeated_line_ratio=0.2), CleanConfig(max_symbol_ratio=0.2),
               CleanConfig(near_dup_threshold=0.5)]
    texts = [_long_text(10), "line one\nline one\r\n  line two  \n\nline one\n" * 5, "ΑΣ. " * 30,
             " ".join(sentences(3, seed=7)) + " then more words after it", "   \n\t  " * 20, "x" * 100,
             "one two three four " + "-" * 80]
    seen = set()
    for cfg in configs:
        c = Cleaner(cfg)
        for t in texts:
            want, got = c.analyze(t), prep._analyze(c, t)
            assert got[:3] == want[:3] and got[4] == want[4], (cfg, t[:40])
            assert (got[3] is None) == (want[3] is None)
            assert want[3] is None or np.array_equal(got[3], want[3])
            seen.add(want[0] or ("contaminated" if want[2] else "kept"))
    assert {1, 4, 6, "contaminated", "kept"} <= seen  # the filters fired: empty, symbol ratio, repeated lines
    t = _long_text(10)
    assert prep._is_val(t, 0.5) == (int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(),
                                                   "little") / 2**64 < 0.5)
    c = Cleaner(CleanConfig(normalize="NFKC"))
    raw = ("ﬁ e\u0301 \x01 ①" + _long_text(5)) * 3
    assert prep._transform_long(c, raw) == c.transform(raw)


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_a_long_single_line_document_prepares_correctly(tmp_path, monkeypatch, tokenizer):
    """One long line, cleaned by the main process in slices and tokenized in pieces by the workers: the shards
    decode back to the text (cut at its tail), and are those of the whole-document path."""
    from pretrain.data import encode
    from pretrain.data import prepare as prep

    raw = _long_text(120).replace("\n", " ").replace("\r", " ")  # ~16k characters, one line
    assert "\n" not in raw and len(raw) > 15_000
    text = Cleaner(CleanConfig()).transform(raw)  # what is tokenized (NFC: e + U+0301 is é)
    assert text != raw
    src = tmp_path / "line.txt"
    src.write_text(raw + "\x01", encoding="utf-8")  # a control character, stripped by cleaning
    outs = {}
    for name, long_chars, workers in (("whole", 1 << 22, 0), ("pieces", 2000, 0), ("pool", 2000, 2)):
        monkeypatch.setattr(prep, "LONG_DOC_CHARS", long_chars)
        monkeypatch.setattr(prep, "SLICE_CHARS", 500)
        monkeypatch.setattr(encode, "PIECE_CHARS", 300)
        outs[name] = prepare([str(src)], tmp_path / name, tokenizer=tokenizer, val_fraction=0.1, log=quiet,
                             workers=workers, batch_chars=1000)
        tok = Tokenizer.load(tmp_path / name)
        train, val = read_split(tmp_path / name, "train"), read_split(tmp_path / name, "val")
        cut = int(len(text) * 0.9)
        assert tok.decode(train.tolist()) == text[:cut] and tok.decode(val.tolist()) == text[cut:]
        if tokenizer == "byte":
            assert train.tolist() == list(text[:cut].encode())
        assert outs[name]["splits"]["train"]["documents"] == outs[name]["splits"]["val"]["documents"] == 1
        assert outs[name]["splits"]["train"]["bytes"] == len(text[:cut].encode())
        assert _bins(tmp_path / name) == _bins(tmp_path / "whole")
        _same_meta(outs["whole"], outs[name])


_HWM_SCRIPT = """
import sys
from pretrain.data.prepare import prepare
prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], workers=0, log=lambda *a: None)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_peak_memory_of_a_huge_single_line_is_bounded(tmp_path, tokenizer):
    """A 6 MB single-line document: 0.9-1.5 GB before (150-250 bytes per character), now ~100 MB. (VmHWM: the
    process's own peak; ru_maxrss would carry over the pytest process's, from before the exec.)"""
    line = ((" ".join(sentences(20_000, seed=3)) + " ") * 7)[:6_000_000]
    (tmp_path / "line.txt").write_text(line, encoding="utf-8")
    res = subprocess.run([sys.executable, "-c", _HWM_SCRIPT, str(tmp_path / "line.txt"), str(tmp_path / "d"),
                          tokenizer], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) / 1024 < 250  # MB (about 80 of them the interpreter and libraries)
    assert load_meta(tmp_path / "d")["splits"]["train"]["bytes"] == int(len(line) * 0.9)


def test_a_full_disk_while_preparing_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """An OS error while writing the shards ends with one error naming what, where and the space free; no
    partial folder stays, and an earlier prepared directory is as it was."""
    import errno

    import pretrain.data.prepare as prep
    from pretrain import PretrainError

    src = tmp_path / "corpus.txt"
    src.write_text("The river ran past the old stone wall. " * 200, encoding="utf-8")
    out = tmp_path / "data"
    prepare([str(src)], out, tokenizer="byte", log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.ShardWriter, "write", full)
    with pytest.raises(PretrainError,
                       match="could not write the prepared data .*No space left on device.*free"):
        prepare([str(src)], out, tokenizer="byte", log=quiet, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
