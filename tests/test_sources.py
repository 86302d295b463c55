"""Every source format round-trips: the same documents in → the same token ids out; damaged files and
missing columns give clear errors."""

from __future__ import annotations

import csv
import gzip
import json
import re

import numpy as np
import pytest
from _corpus import sentences

from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError, Source, expand_inputs, read_documents

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
