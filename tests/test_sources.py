"""Reading inputs: files, folders and globs expanded; every source format round-trips (the same documents
in → the same token ids out); text units; mixture weights and Hugging Face datasets in the input list
(tested on local files, no network); damaged files, bad encodings and missing columns give clear
errors."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from _corpus import _docs, _jsonl, sentences
from conftest import _bins, quiet

from pretrain.cli import main
from pretrain.data.manifest import load_meta
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError, HubSpec, Source, expand_inputs, iter_documents, read_documents

DOCS = [" ".join(sentences(6, seed=i)) + (" — naïve café, 日本語 🙂, a \"quote\", a,comma" if i % 2 else "")
        for i in range(9)]


def _write(fmt: str, root, docs=DOCS):
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        for i, d in enumerate(docs):
            (root / f"d{i:02d}.txt").write_text(d, encoding="utf-8")
        return [str(root)]
    path = root / f"docs.{fmt}"
    lines = "".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    if fmt == "jsonl":
        path.write_text(lines, encoding="utf-8")
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines.encode()))
    elif fmt == "jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif fmt == "json":
        path.write_text(json.dumps([{"text": d} for d in docs], ensure_ascii=False), encoding="utf-8")
    elif fmt in ("csv", "tsv", "csv.gz"):
        import io

        buf = io.StringIO()
        # TSV as GLUE-style files are written: no quoting (a '"' is text; texts hold no tab or newline)
        w = (csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None) if fmt == "tsv"
             else csv.writer(buf))
        w.writerow(["id", "text"])
        for i, d in enumerate(docs):
            w.writerow([i, d])
        data = buf.getvalue().encode()
        path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    elif fmt in ("parquet", "parquet.gz"):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), buf, row_group_size=4)
        path.write_bytes(gzip.compress(buf.getvalue()) if fmt.endswith(".gz") else buf.getvalue())
    return [str(path)]


FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "json", "csv", "tsv", "csv.gz", "parquet", "parquet.gz"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_the_same_documents(tmp_path, fmt):
    sources = expand_inputs(_write(fmt, tmp_path / fmt))
    docs = [d for s in sources for d in read_documents(s)]
    assert docs == DOCS


def test_same_documents_same_token_ids_in_every_format(tmp_path):
    from pretrain.data.tokenizer import byte_tokenizer

    tok_path = tmp_path / "tok.json"
    byte_tokenizer().save(tok_path)
    streams = {}
    for fmt in FORMATS:
        out = tmp_path / f"data_{fmt.replace('.', '_')}"
        prepare(_write(fmt, tmp_path / f"in_{fmt}"), out, tokenizer=str(tok_path), val_fraction=0.3,
                log=lambda *a: None)
        streams[fmt] = {s: np.fromfile(out / f"{s}_000000.bin", dtype=np.uint16).tolist()
                        for s in ("train", "val")}
    first = streams["txt"]
    assert first["train"] and first["val"]
    for fmt, ids in streams.items():
        assert ids == first, fmt


def test_missing_column_names_the_columns(tmp_path):
    for fmt in ("csv", "parquet", "jsonl"):
        (path,) = _write(fmt, tmp_path / fmt)
        with pytest.raises(DataError, match=r"id.*text|text.*id") as e:
            read_documents(Source(path=__import__("pathlib").Path(path),
                                  kind=fmt if fmt != "jsonl" else "jsonl"), text_field="body")
        assert "body" in str(e.value)


def test_corrupt_gzip_and_parquet(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n')[:-8] + b"garbage!")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    for name, needle in (("bad.jsonl.gz", "gzip"), ("bad.parquet", "Parquet")):
        (src,) = expand_inputs([str(tmp_path / name)])
        with pytest.raises(DataError, match=needle):
            read_documents(src)


def test_streamed_reading_across_chunk_boundaries(tmp_path, monkeypatch):
    """Files are read in chunks: lines, multi-byte characters and CSV quotes split across chunks come out
    whole, and a decoding error reports its byte offset in the whole file."""
    import pretrain.data.sources as S

    monkeypatch.setattr(S, "CHUNK", 7)
    for fmt in ("jsonl", "jsonl.gz", "jsonl.zst", "csv", "tsv", "csv.gz"):
        sources = expand_inputs(_write(fmt, tmp_path / fmt))
        assert [d for s in sources for d in read_documents(s)] == DOCS, fmt
    good = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS).encode()
    (tmp_path / "mixed.jsonl").write_bytes(good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (src,) = expand_inputs([str(tmp_path / "mixed.jsonl")])
    with pytest.raises(DataError,
                       match=rf"mixed\.jsonl is not valid UTF-8 \(byte {len(good) + 13}: b'\\xe9") as e:
        read_documents(src)
    assert "\n" not in str(e.value)


def test_truncated_compressed_files(tmp_path):
    import zstandard

    payload = "".join(json.dumps({"text": d}) + "\n" for d in DOCS * 50).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(payload)[: len(gzip.compress(payload)) // 2])
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload)[:200])
    for name, needle in (("cut.jsonl.gz", "not a valid gzip file"), ("cut.jsonl.zst", "zstd|invalid JSON")):
        (src,) = expand_inputs([str(tmp_path / name)])
        with pytest.raises(DataError, match=needle):
            read_documents(src)


def test_zero_documents_after_cleaning_names_the_problem(tmp_path):
    from pretrain.data.clean import CleanConfig

    (tmp_path / "a.jsonl").write_text('{"text": "tiny"}\n{"text": "also tiny"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no documents left after cleaning \(2 read\)"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "d", tokenizer="byte",
                clean=CleanConfig(min_chars=50), log=lambda *a: None)
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_table_rows_are_read_exactly_or_rejected(tmp_path, capsys):
    # TSV: no quoting, so a text that starts with a quote stays as written and swallows no rows
    (tmp_path / "q.tsv").write_text('id\ttext\n1\t"Hello," she said.\n2\t"open\n3\tlast\n', encoding="utf-8")
    assert [d for s in expand_inputs([str(tmp_path / "q.tsv")]) for d in read_documents(s)] == \
        ['"Hello," she said.', '"open', "last"]
    # CSV: a field longer than the csv module's 128 KiB default is a document like any other
    long = "word " * 40_000
    (tmp_path / "long.csv").write_text(f"text\n{long}\nshort\n", encoding="utf-8")
    assert [d for s in expand_inputs([str(tmp_path / "long.csv")])
            for d in read_documents(s)] == [long, "short"]
    bad = {
        "unbalanced.csv": ('id,text\n1,"a stray quote\n2,fine\n', "malformed CSV"),
        "ragged.csv": ("id,text\n1,one\n2\n", "ragged.csv:3: row has 1 field(s), the header 2"),
        "comma.csv": ("id,text\n1,hello, world\n", "row has 3 field(s), the header 2 (a field with a comma"),
        "tab.tsv": ("text\tid\nsome\ttext\t1\n", "tab.tsv:2: row has 3 field(s), the header 2"),
        "ints.json": ('[{"text": "ok"}, {"text": 5}]', "item 1: field 'text' is int, not a string"),
        "surrogate.json": ('[{"text": "a \\ud83d b"}]', "lone surrogate"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=re.escape(message)):
            [d for s in expand_inputs([str(tmp_path / name)]) for d in read_documents(s)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="column 'text' is int64, not a string column"):
        [d for s in expand_inputs([str(tmp_path / "ints.parquet")]) for d in read_documents(s)]


# ================================================================================== files, folders, globs


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


def test_utf16_file_is_named_as_such(tmp_path):
    (tmp_path / "u.txt").write_bytes("some text\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16/32 encoded"):
        prepare([str(tmp_path / "u.txt")], tmp_path / "o", tokenizer="byte", log=quiet)


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


# =========================================================================================== Hugging Face


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
