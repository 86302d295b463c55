"""One table reader: `pretrain.data.sources.iter_records` reads every CSV/TSV/JSONL/JSON/Parquet file, for
pre-training (a text column) and for fine-tuning (text, text-pair and label columns) alike, with the same
errors."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data.sources import DataError, expand_inputs, iter_records, iter_rows, read_documents
from pretrain.finetune.data import TaskDataError, read_examples

ROWS = [{"a": f"text {i}, with a comma and a \"quote\"", "b": f"pair {i}", "y": ["neg", "pos"][i % 2]}
        for i in range(5)]
FORMATS = ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz", "jsonl.zst", "parquet.gz"]


def _table(path, rows=ROWS):
    """Write ``rows`` in the format ``path``'s name says."""
    name = path.name
    if name.endswith((".csv", ".tsv", ".csv.gz")):
        buf = io.StringIO()
        tsv = name.endswith(".tsv")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t" if tsv else ",", quotechar=None
                           if tsv else '"', quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
    elif ".jsonl" in name:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif ".json" in name:
        data = json.dumps(rows).encode()
    else:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_records(tmp_path, fmt):
    path = _table(tmp_path / f"t.{fmt}")
    assert list(iter_records(path)) == ROWS
    assert list(iter_records(path, columns=["y", "a"])) == [{"y": r["y"], "a": r["a"]} for r in ROWS]
    assert list(iter_rows(path, expand_inputs([str(path)])[0].kind, "b")) == [r["b"] for r in ROWS]
    ex = read_examples(path, "a", "y", pair_column="b")
    assert (ex.texts, ex.pairs, ex.labels) == tuple([r[c] for r in ROWS] for c in "aby")


def test_values_are_as_stored_and_records_fill_in_the_source(tmp_path):
    rows = [{"text": "a", "label": 1, "score": 0.5}, {"text": None, "label": 2, "score": None}]
    for name in ("v.jsonl", "v.parquet"):
        path = _table(tmp_path / name, rows)
        assert list(iter_records(path)) == rows
        (src,) = expand_inputs([str(path)])
        assert list(iter_records(path, src=src)) == rows
        assert src.bytes == path.stat().st_size and len(src.sha256) == 64
    # CSV: every value is a string; a name repeated in the header means its first column
    (tmp_path / "dup.csv").write_text("text,label,text\na,1,b\n")
    assert list(iter_records(tmp_path / "dup.csv")) == [{"text": "a", "label": "1"}]
    assert list(iter_records(tmp_path / "dup.csv", columns=["text"])) == [{"text": "a"}]
    assert read_examples(tmp_path / "dup.csv", "text", "label").texts == ["a"]


def test_a_missing_column_lists_the_columns_present(tmp_path):
    for name in ("m.csv", "m.parquet"):  # a header or schema: checked before any row
        path = _table(tmp_path / name)
        with pytest.raises(DataError, match=re.escape(f"{path}: no column 'body'; columns present: a, b, y "
                                                      "(choose one with --field)")):
            next(iter_records(path, columns=["a", "body"], flag="--field"))
        with pytest.raises(TaskDataError, match=re.escape("no column 'body'; columns present: a, b, y "
                                                          "(choose one with --label-column)")):
            read_examples(path, "a", "body")
    # JSON Lines: every object names its own fields, so the row that lacks one is the error
    path = _table(tmp_path / "m.jsonl", ROWS[:2] + [{"a": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: no field 'y'; fields present: a "
                                                  "(choose one with --text-column)")):
        list(iter_records(path, columns=["y"]))
    # fine-tuning: a JSON column exists if any row has it; a row without it has no label
    with pytest.raises(TaskDataError, match=re.escape("row 3 has no label in column 'y'")):
        read_examples(path, "a", "y")
    with pytest.raises(TaskDataError, match=re.escape("no column 'sentiment'; columns present: a, b, y")):
        read_examples(path, "a", "sentiment")


def test_damaged_files_give_the_same_error_to_pre_training_and_fine_tuning(tmp_path):
    bad = {
        "empty.csv": (b"", "has no rows"),
        "header.csv": (b"a,y\n", "has no rows"),
        "binary.csv": (b"\x00\x01a,y\n", "looks like a binary file (NUL bytes)"),
        "latin1.tsv": ("a\ty\ncaf\u00e9\tpos\n".encode("latin-1"), "not valid UTF-8 (byte 7: b'\\xe9\\tpo')"),
        "utf16.csv": ("a,y\nx,pos\n".encode("utf-16"), "is UTF-16/32 encoded"),
        "ragged.csv": (b"a,y\nx,pos\nz\n", "ragged.csv:3: row has 1 field(s), the header 2"),
        "comma.csv": (b"a,y\nx, y,pos\n", "comma.csv:2: row has 3 field(s), the header 2 (a field with"),
        "quote.csv": (b'a,y\n"x,pos\nz,neg\n', "quote.csv:3: malformed CSV"),
        "bad.jsonl": (b'{"a": "x", "y": "pos"}\n{"a": \n', "bad.jsonl:2: invalid JSON"),
        "list.jsonl": (b'{"a": "x", "y": "pos"}\n["a"]\n', "list.jsonl:2: expected a JSON object, got list"),
        "items.json": (b'[{"a": "x", "y": "pos"}, 5]', "items.json:item 1: expected a JSON object, got int"),
        "cut.csv.gz": (gzip.compress(b"a,y\nx,pos\n" * 1000)[:40], "is not a valid gzip file"),
        "bad.parquet": (b"PAR1 not parquet PAR1", "bad.parquet is not a readable Parquet file"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TaskDataError, match=re.escape(message)):
            read_examples(tmp_path / name, "a", "y")
        if message != "has no rows":
            (src,) = expand_inputs([str(tmp_path / name)])
            with pytest.raises(DataError, match=re.escape(message)):
                read_documents(src, text_field="a")


def test_fine_tuning_reads_what_pre_training_reads(tmp_path):
    # a field longer than the csv module's 128 KiB default, whatever was read before in this process
    long = "word " * 40_000
    (tmp_path / "long.csv").write_text(f"a,y\n{long},pos\nshort,neg\n")
    previous = csv.field_size_limit(131072)
    try:
        assert read_examples(tmp_path / "long.csv", "a", "y").texts == [long, "short"]
    finally:
        csv.field_size_limit(max(previous, csv.field_size_limit()))
    # TSV is unquoted (a '"' is text); CRLF line ends and a UTF-8 byte-order mark are fine; blank lines are no
    # rows
    (tmp_path / "q.tsv").write_bytes(b'\xef\xbb\xbfa\ty\r\n"Hello," she said.\tpos\r\n\r\n"open\tneg\r\n')
    ex = read_examples(tmp_path / "q.tsv", "a", "y")
    assert (ex.texts, ex.labels) == (['"Hello," she said.', '"open'], ["pos", "neg"])
    (src,) = expand_inputs([str(tmp_path / "q.tsv")])
    assert read_documents(src, text_field="a") == ex.texts
    # numbers in a JSON or Parquet label column stay numbers, as in a CSV one
    for name in ("n.jsonl", "n.parquet"):
        path = _table(tmp_path / name, [{"a": "x", "y": 1}, {"a": "z", "y": 0.5}])
        assert read_examples(path, "a", "y").labels == [1, 0.5]


def test_text_columns_and_other_files(tmp_path):
    path = _table(tmp_path / "t.jsonl", [{"a": "x", "y": 1}])
    with pytest.raises(DataError, match=re.escape("t.jsonl:1: field 'y' is int, not a string")):
        list(iter_records(path, columns=["a", "y"], text=True))
    path = _table(tmp_path / "t.parquet", [{"a": "x", "y": 1}])
    with pytest.raises(DataError, match=re.escape("column 'y' is int64, not a string column (choose the text "
                                                  "column with --text-column)")):
        list(iter_records(path, columns=["y"], text=True))
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match="not a table"):
        list(iter_records(tmp_path / "notes.txt"))
    with pytest.raises(TaskDataError, match="labelled data must be CSV, TSV, JSONL, JSON or Parquet"):
        read_examples(tmp_path / "notes.txt")
    with pytest.raises(TaskDataError, match="file not found"):
        read_examples(tmp_path / "absent.csv")


# ------------------------------------------------------------------ labels: never NaN, null or empty


@pytest.mark.parametrize("name,content,why", [
    ("nan.csv", "text,label\nfine,pos\nalso fine,nan\n", "NaN ('nan')"),
    ("empty.csv", "text,label\nfine,pos\nalso fine,\n", "empty"),
    ("blank.tsv", "text\tlabel\nfine\tpos\nalso fine\t  \n", "empty"),
    ("nan.jsonl", '{"text": "fine", "label": 1}\n{"text": "also fine", "label": NaN}\n', "NaN"),
    ("null.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "also fine", "label": null}\n', "null"),
    ("null.json", '[{"text": "fine", "label": 0.5}, {"text": "also fine", "label": null}]', "null"),
])
def test_a_missing_label_is_an_error_naming_file_row_and_column(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskDataError) as e:
        read_examples(path)
    assert str(e.value) == (f"{path}: row 2 has no label in column 'label' (the value is {why}); give every "
                            "row a label, or remove the rows without one")


@pytest.mark.parametrize("value,why", [(None, "null"), (float("nan"), "NaN")])
def test_a_parquet_null_or_nan_label_is_an_error(tmp_path, value, why):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "y": [1.0, 2.0, value]}), path)
    want = f"row 3 has no label in column 'y' (the value is {why})"
    with pytest.raises(TaskDataError, match=re.escape(want)):
        read_examples(path, label_column="y")
    assert read_examples(path, label_column=None).labels is None  # unlabelled input (predict) is not checked


def test_regression_labels_must_be_numbers(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,score\na,low\nb,high\n", encoding="utf-8")
    assert read_examples(path, label_column="score").labels == ["low", "high"]  # fine for classification
    with pytest.raises(TaskDataError) as e:
        read_examples(path, label_column="score", task="regression")
    assert str(e.value) == (f"{path}: row 1: the label 'low' in column 'score' is not a number (task "
                            "regression needs a number in every row)")
    path.write_text("text,score\na,0.5\nb,inf\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"row 2 has no label in column 'score' \(the value is infinite"):
        read_examples(path, label_column="score", task="regression")
