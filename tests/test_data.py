"""Data pipeline: input sources, tokenizers, prepare (shards + meta.json) and the batch loaders."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.loader import TokenSplit, TrainLoader, eval_batches
from pretrain.data.manifest import load_meta, token_dtype
from pretrain.data.prepare import _is_val, prepare
from pretrain.data.sources import DataError, Source, expand_inputs, iter_documents, read_documents
from pretrain.data.tokenizer import (
    EOT,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    byte_tokenizer,
    char_tokenizer,
    train_bpe,
)


def quiet(*_a, **_k):
    pass


def read_split(data_dir: Path, split: str) -> np.ndarray:
    """All token ids of a split (its shards concatenated), read independently of the loader."""
    meta = json.loads((data_dir / "meta.json").read_text())
    parts = [np.fromfile(data_dir / sh["file"], dtype=meta["dtype"])
             for sh in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def split_on(ids: np.ndarray, sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids.tolist():
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out


def is_slice_of(row: np.ndarray, stream: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(row))
    return bool((windows == row).all(axis=1).any())


# ================================================================================================ sources


def test_single_text_file(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("hello world\n", encoding="utf-8")
    (src,) = expand_inputs([str(p)])
    assert src.kind == "text" and src.path == p.resolve()
    assert read_documents(src) == ["hello world\n"]


def test_folder_is_recursive_and_filters_extensions(tiny_corpus):
    root = tiny_corpus["root"]
    sources = expand_inputs([str(root)])
    rel = [s.path.relative_to(root.resolve()).as_posix() for s in sources]
    assert rel == ["a.txt", "b.md", "d.jsonl", "sub/c.txt"]  # no notes.log, nothing from .hidden/
    assert [s.kind for s in sources] == ["text", "text", "jsonl", "text"]
    docs = list(iter_documents(sources))
    d = tiny_corpus["docs"]
    assert docs == d["a.txt"] + d["b.md"] + d["d.jsonl"] + d["sub/c.txt"]


def test_glob_and_explicit_other_extension(tiny_corpus):
    root = tiny_corpus["root"]
    rel = sorted(s.path.relative_to(root.resolve()).as_posix()
                 for s in expand_inputs([str(root / "**" / "*.txt")]))
    assert rel == ["a.txt", "sub/c.txt"]
    (log,) = expand_inputs([str(root / "notes.log")])  # named explicitly: read whatever the extension
    assert log.kind == "text" and read_documents(log) == ["a,b\n1,2\n"]


def test_inputs_are_deduplicated(tiny_corpus):
    root = tiny_corpus["root"]
    sources = expand_inputs([str(root / "a.txt"), str(root), str(root / "*.txt")])
    paths = [s.path for s in sources]
    assert len(paths) == len(set(paths)) == 4
    assert paths[0] == (root / "a.txt").resolve()


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n{"text": null}\n{"text": "   "}\n'
                 '{"body": "b", "text": "3"}\n', encoding="utf-8")
    (src,) = expand_inputs([str(p)])
    assert src.kind == "jsonl"
    assert read_documents(src) == ["one", "two", "3"]  # null and blank documents are dropped


def test_jsonl_other_text_field(tmp_path):
    p = tmp_path / "d.ndjson"
    p.write_text('{"content": "alpha"}\n{"content": "beta"}\n', encoding="utf-8")
    assert list(iter_documents(expand_inputs([str(p)]), text_field="content")) == ["alpha", "beta"]


def test_no_inputs():
    with pytest.raises(DataError, match="no input"):
        expand_inputs([])


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="input not found") as e:
        expand_inputs([str(tmp_path / "nope.txt")])
    assert "nope.txt" in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="has no .txt"):
        expand_inputs([str(tmp_path / "empty")])


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="matched no files"):
        expand_inputs([str(tmp_path / "*.txt")])


def test_binary_file(tmp_path):
    p = tmp_path / "blob.txt"
    p.write_bytes(b"abc\x00\x01\x02def")
    with pytest.raises(DataError, match="binary") as e:
        list(iter_documents(expand_inputs([str(p)])))
    assert "blob.txt" in str(e.value)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        list(iter_documents(expand_inputs([str(p)])))
    msg = str(e.value)
    assert "latin1.txt" in msg and "byte 3" in msg and "\n" not in msg


def test_utf8_bom_is_stripped(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello".encode())
    assert read_documents(expand_inputs([str(p)])[0]) == ["hello"]


def test_bad_files_skip(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("good text", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa broken")
    sources = expand_inputs([str(bad), str(good)])
    with pytest.warns(UserWarning, match="skipping .*bad.txt"):
        docs = list(iter_documents(sources, bad_files="skip", record=True))
    assert docs == ["good text"]
    bad_src = next(s for s in sources if s.path.name == "bad.txt")
    assert "UTF-8" in bad_src.skipped and bad_src.manifest()["skipped"] == bad_src.skipped
    good_src = next(s for s in sources if s.path.name == "good.txt")
    assert good_src.documents == 1 and not good_src.skipped
    # with the default policy the same input is an error
    with pytest.raises(DataError):
        list(iter_documents(expand_inputs([str(bad), str(good)])))


def test_bad_files_policy_is_validated(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="bad_files"):
        list(iter_documents(expand_inputs([str(p)]), bad_files="ignore"))


def test_jsonl_missing_field_names_existing_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"title": "t", "body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(iter_documents(expand_inputs([str(p)])))
    msg = str(e.value)
    assert "d.jsonl:2" in msg and "'text'" in msg and "body, title" in msg


def test_jsonl_invalid_json_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        list(iter_documents(expand_inputs([str(p)])))


@pytest.mark.parametrize("line, msg", [('["a list"]', "expected a JSON object"),
                                       ('{"text": 5}', "not a string")])
def test_jsonl_wrong_shapes(tmp_path, line, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=msg):
        list(iter_documents(expand_inputs([str(p)])))


def test_record_fills_manifest(tiny_corpus):
    sources = expand_inputs([str(tiny_corpus["root"])])
    list(iter_documents(sources, record=True))
    for s in sources:
        raw = s.path.read_bytes()
        assert s.sha256 == hashlib.sha256(raw).hexdigest()
        assert s.bytes == len(raw)
    assert [s.documents for s in sources] == [1, 1, 3, 1]
    assert set(Source(path=Path("x"), kind="text").manifest()) == {"path", "format", "sha256", "bytes",
                                                                    "documents"}


# ================================================================================================ tokenizers

UNICODE_SAMPLES = [
    "plain ascii text",
    "héllo wörld — ünïcödé ½ ∑ ∞",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and \u200b zero width",
    "whitespace\t\ttabs\r\nCRLF\n\n  double  spaces ",
    "<unk> <|endoftext|x> [not special]",
    "",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text


def test_byte_tokenizer_vocab():
    tok = byte_tokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256 and tok.unk_id is None
    assert tok.encode("AZ az") == [65, 90, 32, 97, 122]
    assert tok.unknown_chars("anything ✓") == []
    assert tok.decode(tok.encode("a") + [tok.eot_id], skip_special_tokens=True) == "a"


def test_char_tokenizer_round_trip_and_unknown():
    corpus = "hello world\nthe quick brown fox — ünï\t"
    tok = build_tokenizer("char", [corpus[:10], corpus[10:]])
    chars = sorted(set(corpus))
    assert tok.vocab_size == len(chars) + 2  # + EOT, <unk>
    assert tok.eot_id == len(chars) and tok.unk_id == len(chars) + 1
    assert tok.encode(corpus) == [chars.index(c) for c in corpus]  # sorted-character ids
    assert tok.decode(tok.encode(corpus)) == corpus
    assert tok.unknown_chars(corpus) == []
    assert tok.unknown_chars("hello, WORLD!") == ["!", ",", "D", "L", "O", "R", "W"]
    assert tok.unk_id in tok.encode("hello?")
    assert char_tokenizer("ba").encode("ab") == [0, 1]  # ids follow sorted character order


def test_char_tokenizer_needs_text():
    with pytest.raises(TokenizerError):
        build_tokenizer("char", None)
    with pytest.raises(TokenizerError):
        build_tokenizer("bpe", None)


def test_unknown_tokenizer_spec(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        build_tokenizer(str(tmp_path / "nope.json"))


def test_bpe_trains_and_round_trips(text_factory):
    texts = [text_factory(300, seed=s) for s in range(5)]
    tok = train_bpe(texts, vocab_size=320)
    assert 258 <= tok.vocab_size <= 320
    assert tok.tk.token_to_id(EOT) == tok.eot_id
    sample = texts[0][:400]
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode("utf-8"))  # merges were learned: fewer tokens than bytes
    for text in [sample, *UNICODE_SAMPLES]:
        assert tok.decode(tok.encode(text)) == text  # byte-level: anything round-trips


def test_bpe_vocab_too_small():
    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe(["abc"], vocab_size=200)


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_round_trip(tmp_path, kind, text_factory):
    texts = [text_factory(200, seed=7)]
    tok = build_tokenizer(kind, texts, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    for target in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the folder holding it
        again = Tokenizer.load(target)
        assert again.vocab_size == tok.vocab_size
        assert again.eot_id == tok.eot_id and again.unk_id == tok.unk_id
        assert again.sha256() == tok.sha256()
        sample = texts[0][:300]
        assert again.encode(sample) == tok.encode(sample)
        assert again.decode(again.encode(sample)) == sample
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).encode("the king") == tok.encode("the king")


def test_load_garbage_tokenizer(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("this is not json {", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.load(p)
    p.write_text('{"version": "1.0", "model": 42}', encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.load(p)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")


def test_load_adds_missing_eot(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.eot_id == 3 and tok.vocab_size == 4
    assert "added <|endoftext|> as id 3" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="end-of-document"):
        Tokenizer(hf)
    for end in ("<|end_of_text|>", "<eos>"):  # Llama 3's and Gemma's end tokens are used as they are
        hf2 = HFTokenizer(models.WordLevel({"a": 0, end: 1, "[UNK]": 2}, unk_token="[UNK]"))
        hf2.add_special_tokens([end])
        hf2.save(str(tmp_path / "tokenizer.json"))
        tok = Tokenizer.load(tmp_path)
        assert tok.eot_id == 1 and tok.vocab_size == 3 and capsys.readouterr().err == ""


# ================================================================================================ prepare


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


# ================================================================================================ loader


def test_train_batches_are_contiguous_slices(prepared_data):
    split = TokenSplit(prepared_data, "train")
    stream = read_split(prepared_data, "train").astype(np.int64)
    assert (split.tokens == len(stream)
            and split.vocab_size == load_meta(prepared_data)["tokenizer"]["vocab_size"])
    loader = TrainLoader(split, seq_len=16, batch_size=4, seed=3)
    for _ in range(5):
        batch = loader.next_batch()
        assert batch.shape == (4, 17) and batch.dtype == torch.int64
        for row in batch.numpy():
            assert is_slice_of(row, stream)
    assert loader.samples_seen == 20


def test_train_batches_with_several_shards(corpus_file, tmp_path):
    out = tmp_path / "sharded"
    prepare([str(corpus_file)], out, tokenizer="char", val_fraction=0.2, shard_tokens=700, log=quiet)
    split = TokenSplit(out, "train")
    assert len(split.shards) > 2
    stream = read_split(out, "train").astype(np.int64)
    loader = TrainLoader(split, seq_len=24, batch_size=8, seed=0)
    for _ in range(4):
        for row in loader.next_batch().numpy():
            assert is_slice_of(row, stream)


def test_epoch_visits_every_window_once(token_dir):
    shards = [np.arange(0, 203), np.arange(10_000, 10_150), np.arange(20_000, 20_025)]
    split = TokenSplit(token_dir({"train": shards}), "train")
    seq = 10
    loader = TrainLoader(split, seq_len=seq, batch_size=1, seed=5)
    assert loader.n_windows == sum((len(s) - seq) // seq for s in shards) == 19 + 14 + 1
    for epoch in range(2):
        rows = [loader.sample(epoch * loader.n_windows + i) for i in range(loader.n_windows)]
        starts = []
        for row in rows:
            assert len(row) == seq + 1
            assert np.array_equal(np.diff(row.astype(np.int64)), np.ones(seq))  # never crosses a shard
            starts.append(int(row[0]))
        assert len(set(starts)) == loader.n_windows  # each window once
        offsets = {(s % 10_000) % seq for s in starts}
        assert len(offsets) == 1  # one epoch-wide offset ...
        (off,) = offsets
        expected = {int(sh[0]) + off + k * seq for sh in shards for k in range((len(sh) - seq) // seq)}
        assert set(starts) == expected  # ... and exactly the windows at stride seq_len
        assert starts != sorted(starts)  # visited in shuffled order


def test_different_epochs_shuffle_differently(token_dir):
    split = TokenSplit(token_dir({"train": [np.arange(5000)]}), "train")
    loader = TrainLoader(split, seq_len=16, batch_size=1, seed=0)
    n = loader.n_windows
    e0 = [int(loader.sample(i)[0]) for i in range(n)]
    e1 = [int(loader.sample(n + i)[0]) for i in range(n)]
    assert e0 != e1


def test_loader_determinism(prepared_data):
    split = TokenSplit(prepared_data, "train")

    def batches(seed, n=4):
        loader = TrainLoader(split, seq_len=16, batch_size=4, seed=seed)
        return [loader.next_batch() for _ in range(n)]

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_state_dict_resume_is_exact_and_o1(prepared_data, monkeypatch):
    split = TokenSplit(prepared_data, "train")
    a = TrainLoader(split, seq_len=16, batch_size=4, seed=7)
    for _ in range(50):  # past one epoch (~300 windows / 4 per batch = 75 batches)
        a.next_batch()
    state = a.state_dict()
    assert state == {"samples_seen": 200, "seed": 7, "seq_len": 16}
    json.dumps(state)  # plain data, storable anywhere
    expected = [a.next_batch() for _ in range(40)]  # crosses into the second epoch

    b = TrainLoader(split, seq_len=16, batch_size=4, seed=7)
    calls = []
    original = TrainLoader.sample
    monkeypatch.setattr(TrainLoader, "sample", lambda self, i: calls.append(i) or original(self, i))
    b.load_state_dict(state)
    assert calls == []  # restoring reads nothing
    got = [b.next_batch() for _ in range(40)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert sorted(calls) == list(range(200, 360))  # only the new samples were drawn: no replay


def test_load_state_dict_rejects_mismatch(prepared_data):
    split = TokenSplit(prepared_data, "train")
    state = TrainLoader(split, seq_len=16, batch_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        TrainLoader(split, seq_len=16, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        TrainLoader(split, seq_len=32, batch_size=2, seed=1).load_state_dict(state)


def test_two_ranks_partition_the_global_batch(token_dir):
    split = TokenSplit(token_dir({"train": [np.arange(3000), np.arange(50_000, 51_000)]}), "train")
    single = TrainLoader(split, seq_len=16, batch_size=6, seed=11)
    r0 = TrainLoader(split, seq_len=16, batch_size=3, seed=11, rank=0, world_size=2)
    r1 = TrainLoader(split, seq_len=16, batch_size=3, seed=11, rank=1, world_size=2)
    seen: set[int] = set()
    for _ in range(10):
        b0, b1 = r0.next_batch(), r1.next_batch()
        starts0, starts1 = set(b0[:, 0].tolist()), set(b1[:, 0].tolist())
        assert not starts0 & starts1  # disjoint
        assert torch.equal(torch.cat([b0, b1]), single.next_batch())  # union == the global batch, in order
        assert not (starts0 | starts1) & seen  # and no sample repeats within the epoch
        seen |= starts0 | starts1
    assert r0.samples_seen == r1.samples_seen == single.samples_seen == 60


@pytest.mark.parametrize("tokens, ok", [(31, False), (32, True)])
def test_too_short_split(token_dir, tokens, ok):
    split = TokenSplit(token_dir({"train": [np.arange(tokens)]}), "train")
    if ok:
        loader = TrainLoader(split, seq_len=16, batch_size=2)
        assert loader.n_windows == 1
        assert loader.next_batch().shape == (2, 17)
    else:
        with pytest.raises(DataError, match="too few"):
            TrainLoader(split, seq_len=16, batch_size=2)


def test_eval_batches_cover_split(token_dir):
    shards = [np.arange(0, 100), np.arange(1000, 1045)]
    split = TokenSplit(token_dir({"train": [np.arange(100)], "val": shards}), "val")
    seq = 8
    batches = list(eval_batches(split, seq_len=seq, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 4, 4, 1]  # 12 + 5 windows
    rows = torch.cat(batches)
    expected = [k * seq for k in range((100 - 1) // seq)] + [1000 + k * seq for k in range((45 - 1) // seq)]
    assert rows[:, 0].tolist() == expected  # every non-overlapping window from offset 0, in order
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(len(expected), seq, dtype=torch.int64))
    again = torch.cat(list(eval_batches(split, seq_len=seq, batch_size=4)))
    assert torch.equal(rows, again)


def test_eval_batches_limited(prepared_data):
    split = TokenSplit(prepared_data, "val")
    stream = read_split(prepared_data, "val").astype(np.int64)
    total = (len(stream) - 1) // 16
    batches = list(eval_batches(split, seq_len=16, batch_size=3, max_batches=2))
    assert len(batches) == 2 and all(b.shape == (3, 17) for b in batches)
    rows = torch.cat(batches).numpy()
    assert np.array_equal(rows[0], stream[:17])  # first window
    assert np.array_equal(rows[-1], stream[(total - 1) * 16:(total - 1) * 16 + 17])  # ... spread to the last
    assert all(is_slice_of(r, stream) for r in rows)
    again = torch.cat(list(eval_batches(split, seq_len=16, batch_size=3, max_batches=2))).numpy()
    assert np.array_equal(rows, again)


def test_eval_batches_too_short(token_dir):
    split = TokenSplit(token_dir({"train": [np.arange(100)], "val": [np.arange(8)]}), "val")
    with pytest.raises(DataError, match="too few"):
        list(eval_batches(split, seq_len=8, batch_size=2))


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_shard_size_mismatch(prepared_data, change):
    shard = prepared_data / "train_000000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2] if change == "truncate" else data + b"\x00\x00")
    with pytest.raises(DataError, match="meta.json says"):
        TokenSplit(prepared_data, "train")
    TokenSplit(prepared_data, "val")  # the other split is fine


def test_incomplete_data_dirs(prepared_data, tmp_path):
    (prepared_data / "val_000000.bin").unlink()
    with pytest.raises(DataError, match="missing shard"):
        TokenSplit(prepared_data, "val")
    with pytest.raises(DataError, match="no 'test' split"):
        TokenSplit(prepared_data, "test")
    with pytest.raises(DataError, match="not found"):
        TokenSplit(tmp_path / "nowhere", "train")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="no meta.json"):
        TokenSplit(tmp_path / "half", "train")
    meta = json.loads((prepared_data / "meta.json").read_text())
    meta["format"] = 99
    (prepared_data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="unsupported data format"):
        TokenSplit(prepared_data, "train")
    (prepared_data / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_meta(prepared_data)


def test_uint32_shards_load(token_dir):
    big = np.arange(70_000, 70_000 + 200)
    split = TokenSplit(token_dir({"train": [big]}, dtype="uint32", vocab_size=80_000), "train")
    assert split.dtype == np.uint32 and split.vocab_size == 80_000
    batch = TrainLoader(split, seq_len=8, batch_size=2).next_batch()
    assert int(batch.min()) >= 70_000  # values above 65535 survive


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


def test_utf16_file_is_named_as_such(tmp_path):
    (tmp_path / "u.txt").write_bytes("some text\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16/32 encoded"):
        prepare([str(tmp_path / "u.txt")], tmp_path / "o", tokenizer="byte", log=quiet)


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


def test_text_only_encoding_matches_prepare():
    """User text (fine-tuning, embeddings) is encoded as prepare encodes documents: a written-out special
    token is text; the default (prompts, fill-mask) still reads it as the token, and the flag does not
    stick."""
    from pretrain.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "a <|endoftext|> b"
    assert tok.eot_id in tok.encode(text) and tok.eot_id not in tok.encode(text, text_only=True)
    assert tok.decode(tok.encode(text, text_only=True)) == text
    assert tok.eot_id in tok.encode_batch([text])[0]
