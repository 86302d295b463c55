"""Streaming prepare at scale: worker processes give the same bytes as in-process, memory does not grow with
the corpus, an interrupted (SIGKILL'ed) prepare restarts cleanly, mixtures are recorded and honoured by the
loaders, Hugging Face datasets go through the same path (tested on local files, no network)."""

from __future__ import annotations

import collections
import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _corpus import sentences

import pretrain.data.loader as loader_mod
from pretrain.cli import main
from pretrain.data.clean import CleanConfig, Cleaner
from pretrain.data.loader import DocumentLoader, TokenSplit, TrainLoader
from pretrain.data.manifest import load_meta
from pretrain.data.prepare import _scan_batch, _Workers, prepare
from pretrain.data.sources import DataError, HubSpec, expand_inputs, read_documents
from pretrain.data.tokenizer import Tokenizer, byte_tokenizer
from pretrain.io import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_a, **_k):
    pass


def _docs(n: int, seed: int = 0, sents: int = 6) -> list[str]:
    return [" ".join(sentences(sents, seed=seed * 10_000 + i)) for i in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _bins(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


def _same_meta(a: dict, b: dict) -> None:
    for key in ("splits", "tokenizer", "cleaning", "sources", "split_rule", "dtype"):
        assert a[key] == b[key], key


# ================================================================================================ parallel


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


# ============================================================================================== crash safety

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


# ================================================================================================ mixtures


@pytest.fixture
def mixture(tmp_path):
    """Two inputs: 'a' (big, weight 1) and 'b' (small, weight 3)."""
    a = _jsonl(tmp_path / "a" / "a.jsonl", _docs(60, seed=1))
    for i, d in enumerate(_docs(8, seed=2)):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"{i}.txt").write_text(d.upper(), encoding="utf-8")  # recognisable: upper case
    out = tmp_path / "mix"
    meta = prepare([f"{a}::1", f"{tmp_path / 'b'}::3"], out, tokenizer="byte", val_fraction=0.1, log=quiet)
    return out, meta


def _group_of_row(row: np.ndarray) -> int:
    text = bytes(int(t) for t in row if t < 256).decode("utf-8", "replace")
    letters = [c for c in text if c.isalpha()]
    return int(sum(c.isupper() for c in letters) > len(letters) / 2)


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


def test_drawn_batches_follow_the_weights(mixture, monkeypatch):
    out, _ = mixture
    split = TokenSplit(out, "train")
    natural = sum(len(s) for s, g in zip(split.shards, split.groups) if g == 1) / split.tokens
    assert natural < 0.25  # b is small: without weights it would be drawn rarely
    loader = TrainLoader(split, seq_len=32, batch_size=50, seed=0)
    counts = collections.Counter(_group_of_row(r) for _ in range(40) for r in loader.next_batch().numpy())
    assert abs(counts[1] / 2000 - 0.75) < 0.04, counts  # 3:1 (random within a partial block)
    monkeypatch.setattr(loader_mod, "MIX_BLOCK", 400)  # exact within every full block
    loader = TrainLoader(split, seq_len=32, batch_size=40, seed=5)
    counts = collections.Counter(_group_of_row(r) for _ in range(20) for r in loader.next_batch().numpy())
    assert counts == {1: 600, 0: 200}
    # a document per row
    docs = DocumentLoader(split, seq_len=1024, batch_size=40, eot_id=256, pad_id=0, seed=1)
    counts = collections.Counter(_group_of_row(r) for _ in range(20) for r in docs.next_batch().numpy())
    assert counts == {1: 600, 0: 200}


def test_mixture_resume_and_ranks(mixture):
    out, _ = mixture
    split = TokenSplit(out, "train")
    full = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    batches = [full.next_batch() for _ in range(12)]
    assert full.state_dict()["mixture"] == [1.0, 3.0]
    resumed = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    probe = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    for _ in range(5):
        probe.next_batch()
    resumed.load_state_dict(probe.state_dict())
    for b in batches[5:]:
        assert np.array_equal(resumed.next_batch().numpy(), b.numpy())
    ranks = [TrainLoader(split, seq_len=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for b in batches[:6]:
        assert np.array_equal(np.concatenate([r.next_batch().numpy() for r in ranks]), b.numpy())
    bad = dict(full.state_dict(), mixture=[1.0, 1.0])
    with pytest.raises(DataError, match="mixture"):
        resumed.load_state_dict(bad)


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


# ============================================================================================== Hugging Face


def test_hub_path_on_local_parquet_gives_the_same_ids(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(25)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=6)
    local = prepare([str(path)], tmp_path / "local", tokenizer="byte", log=quiet)
    hub = prepare([HubSpec("parquet", data_files=str(path), weight=2.0)], tmp_path / "hub", tokenizer="byte",
                  log=quiet)
    assert _bins(tmp_path / "local") == {k.replace("train_g000", "train").replace("val_g000", "val"): v
                                         for k, v in _bins(tmp_path / "hub").items()}
    assert local["splits"]["train"]["tokens"] == hub["splits"]["train"]["tokens"]
    (src,) = hub["sources"]
    assert src["format"] == "hub" and src["name"] == "parquet" and src["split"] == "train"
    assert src["documents"] == 25 and len(src["fingerprint"]) >= 16 and src["weight"] == 2.0
    assert src["sha256"] == [local["sources"][0]["sha256"]]
    with pytest.raises(DataError, match="no column 'body'; columns present: id, text"):
        prepare([HubSpec("parquet", data_files=str(path))], tmp_path / "x", tokenizer="byte",
                text_field="body", log=quiet)


def test_hub_cli_on_local_jsonl(tmp_path):
    pytest.importorskip("datasets")
    src = _jsonl(tmp_path / "docs.jsonl", _docs(20))
    assert main(["prepare", "hf:json", "--hf-data-files", str(src), "--out", str(tmp_path / "hub"),
                 "--tokenizer", "byte"]) == 0
    assert main(["prepare", str(src), "--out", str(tmp_path / "local"), "--tokenizer", "byte"]) == 0
    assert _bins(tmp_path / "hub") == _bins(tmp_path / "local")
    assert load_meta(tmp_path / "hub")["sources"][0]["name"] == "json"


def test_hub_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"pip install 'pretrain\[hf\]'"):
        prepare(["hf:someone/corpus"], tmp_path / "d", tokenizer="byte", log=quiet)


# ================================================================================================ formats


def test_text_units(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first line\nsecond line\n\n\nthird para line one\nline two\n", encoding="utf-8")
    (src,) = expand_inputs([str(p)])
    assert read_documents(src, text_unit="line") == ["first line", "second line", "third para line one",
                                                     "line two"]
    assert read_documents(src, text_unit="paragraph") == ["first line\nsecond line",
                                                          "third para line one\nline two"]
    assert read_documents(src) == [p.read_text()]
    meta = prepare([str(p)], tmp_path / "d", tokenizer="byte", text_unit="line", val_fraction=0.0, log=quiet)
    assert meta["splits"]["train"]["documents"] == 4 and meta["settings"]["text_unit"] == "line"


def test_unigram_tokenizer(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", _docs(40))
    meta = prepare([str(src)], tmp_path / "d", tokenizer="unigram", vocab_size=150, log=quiet)
    tok = Tokenizer.load(tmp_path / "d")
    assert meta["tokenizer"]["kind"] == "unigram" and tok.vocab_size <= 150
    text = _docs(1, seed=99)[0]
    assert tok.decode(tok.encode(text)) == text


def test_input_spec_parsing(tmp_path):
    from pretrain.data.sources import HubSource, parse_hub, parse_weight

    assert parse_weight("wiki/::3") == ("wiki/", 3.0) and parse_weight("wiki/") == ("wiki/", None)
    spec = parse_hub("hf:allenai/c4:en", split="validation", revision="abc")
    assert (spec.name, spec.config, spec.split, spec.revision) == ("allenai/c4", "en", "validation", "abc")
    a = _jsonl(tmp_path / "a.jsonl", _docs(2))
    srcs = expand_inputs([str(a), "hf:someone/corpus:cfg::0.5"])
    assert srcs[0].weight == 1.0 and isinstance(srcs[1], HubSource)  # one weight given: the others get 1
    assert ((srcs[1].spec.name, srcs[1].spec.config, srcs[1].weight, srcs[1].group)
            == ("someone/corpus", "cfg", 0.5, 1))
    assert srcs[1].label == "hf:someone/corpus:cfg"


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
