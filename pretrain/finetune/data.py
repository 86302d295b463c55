"""Labelled data for fine-tuning: rows of text (or text pairs) with a label, and CoNLL token labels.

Tables: CSV, TSV, JSONL/JSON or Parquet (optionally gzip/zstd), read by the reader `pretrain prepare` uses
(:func:`pretrain.data.sources.iter_records`). Columns are named by the user; a missing column is an error
that lists the columns that exist. Labels are checked once, here: empty text, missing labels (empty, null
or NaN: never a class of their own), and a label column mixing numbers and words are errors.

Token classification reads CoNLL-style files: one token per line with its tag in the last
whitespace-separated column, sentences separated by blank lines, ``-DOCSTART-`` lines ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain import PretrainError
from pretrain.data.sources import DataError, column_error, expand_inputs, iter_records, kind_of, read_text

TABLE_KINDS = ("csv", "tsv", "jsonl", "json", "parquet")


class TaskDataError(PretrainError):
    """Labelled data that cannot be used as given."""


@dataclass
class Examples:
    """Row-aligned task inputs: ``texts[i]`` (and ``pairs[i]``) with ``labels[i]`` (None without labels)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[Any] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Examples:
        return Examples([self.texts[i] for i in idx],
                        None if self.pairs is None else [self.pairs[i] for i in idx],
                        None if self.labels is None else [self.labels[i] for i in idx], self.source)


@dataclass
class TokenExamples:
    """CoNLL sentences: ``words[i]`` with one tag per word in ``tags[i]`` (None without tags)."""

    words: list[list[str]]
    tags: list[list[str]] | None
    source: str

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, idx: list[int]) -> TokenExamples:
        return TokenExamples([self.words[i] for i in idx],
                             None if self.tags is None else [self.tags[i] for i in idx], self.source)


def _rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of a table file as dicts, and the column names (a JSON file's: every field of any row)."""
    if not path.is_file():
        raise TaskDataError(f"file not found: {path}")
    (src,) = expand_inputs([str(path)])
    if src.kind not in TABLE_KINDS:
        raise TaskDataError(f"{path}: labelled data must be CSV, TSV, JSONL, JSON or Parquet "
                            f"(got {src.kind})")
    try:  # read as pre-training reads them: CSV strictly quoted, TSV unquoted, a row's fields checked
        rows = list(iter_records(path, src.kind))
    except DataError as e:
        raise TaskDataError(str(e)) from None
    if src.kind in ("jsonl", "json"):
        return rows, sorted({k for r in rows for k in r})
    return rows, list(rows[0]) if rows else []


def _column(rows: list[dict[str, Any]], columns: list[str], name: str, path: Path, flag: str) -> list[Any]:
    if name not in columns:
        raise TaskDataError(str(column_error(path, name, columns, flag)))
    return [r.get(name) for r in rows]


def read_examples(path: str | Path, text_column: str = "text", label_column: str | None = "label",
                  pair_column: str | None = None, task: str | None = None) -> Examples:
    """Read a table of examples; ``label_column=None`` for unlabelled input (prediction). Every row needs a
    label: an empty one, a null (JSON ``null``, a Parquet null) or NaN (a CSV ``nan``, a float NaN) is an
    error naming the file, the row and the column, never a class of its own; so is, with
    ``task="regression"``, one that is not a finite number."""
    path = Path(path)
    rows, columns = _rows(path)
    if not rows:
        raise TaskDataError(f"{path} has no rows")
    texts = _column(rows, columns, text_column, path, "--text-column")
    pairs = _column(rows, columns, pair_column, path, "--text-pair-column") if pair_column else None
    for name, col in ((text_column, texts), (pair_column, pairs)):
        for i, t in enumerate(col or []):
            if not isinstance(t, str) or not t.strip():
                raise TaskDataError(f"{path}: row {i + 1} has no text in column {name!r} "
                                    "(empty or not a string)")
    labels = None
    if label_column:
        labels = _column(rows, columns, label_column, path, "--label-column")
        for i, v in enumerate(labels):
            _check_label(v, i, path, label_column, task)
        labels = _normalise_labels(labels, path, label_column)
    return Examples(texts, pairs, labels, str(path))


def _missing(v: Any) -> str | None:
    """Why ``v`` is no label (``'empty'``, ``'null'``, ``'NaN'``, ...), or None when it is one."""
    if v is None:
        return "null"
    if isinstance(v, str) and not v.strip():
        return "empty"
    if _is_number(v):
        try:
            f = float(v)
        except OverflowError:  # an integer too large for a float is still a label
            return None
        if math.isnan(f):
            return f"NaN ({v!r})" if isinstance(v, str) else "NaN"
        if math.isinf(f):
            return f"infinite ({v!r})"
    return None


def _check_label(v: Any, i: int, path: Path, column: str, task: str | None) -> None:
    why = _missing(v)
    if why is not None:
        raise TaskDataError(f"{path}: row {i + 1} has no label in column {column!r} (the value is {why}); "
                            "give every row a label, or remove the rows without one")
    if task == "regression" and not _is_number(v):
        raise TaskDataError(f"{path}: row {i + 1}: the label {v!r} in column {column!r} is not a number "
                            "(task regression needs a number in every row)")


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _normalise_labels(values: list[Any], path: Path, column: str) -> list[Any]:
    """Numbers stay numbers (ints where integral), words stay strings; a mix of the two is an error."""
    numeric = [_is_number(v) for v in values]
    if any(numeric) and not all(numeric):
        i_num, i_word = numeric.index(True), numeric.index(False)
        raise TaskDataError(f"{path}: label column {column!r} mixes numbers and text (row {i_num + 1}: "
                            f"{values[i_num]!r}, row {i_word + 1}: {values[i_word]!r}); "
                            "use one kind of label")
    if not all(numeric):
        return [str(v).strip() for v in values]
    out = []
    for v in values:
        f = float(v)
        out.append(int(f) if f.is_integer() else f)
    return out


def read_conll(path: str | Path, with_tags: bool = True) -> TokenExamples:
    """CoNLL-style token file: ``token ... tag`` per line, blank line between sentences."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"file not found: {path}")
    if kind_of(path) != "text":  # a table read as 'token tag' lines would train on garbage
        raise TaskDataError(f"{path}: --task token reads CoNLL text files (one 'token tag' per line, a blank "
                            f"line between sentences), not {kind_of(path).upper()}")
    words: list[list[str]] = []
    tags: list[list[str]] = []
    cur_w: list[str] = []
    cur_t: list[str] = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if cur_w:
                words.append(cur_w)
                tags.append(cur_t)
                cur_w, cur_t = [], []
            continue
        if with_tags and len(parts) < 2:
            raise TaskDataError(f"{path}:{lineno}: expected 'token tag' (the tag in the last column), "
                                f"got {line!r}")
        cur_w.append(parts[0])
        cur_t.append(parts[-1] if with_tags else "")
    if cur_w:
        words.append(cur_w)
        tags.append(cur_t)
    if not words:
        raise TaskDataError(f"{path} has no sentences (expected CoNLL: one 'token tag' per line)")
    return TokenExamples(words, tags if with_tags else None, str(path))


def label_names(labels: list[Any]) -> list[Any]:
    """The sorted distinct labels (numbers numerically, words alphabetically)."""
    return sorted(set(labels))


def check_known(labels: list[Any], names: list[Any], where: str) -> None:
    unseen = sorted({str(v) for v in labels} - {str(n) for n in names})
    if unseen:
        raise TaskDataError(f"{where} has labels never seen in the training data: {', '.join(unseen[:10])}"
                            f"{' …' if len(unseen) > 10 else ''} "
                            f"(training labels: {', '.join(map(str, names[:20]))})")
