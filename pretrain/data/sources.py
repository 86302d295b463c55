"""Raw documents from files, folders and globs: .txt (one document per file), .jsonl/.json (one per line
or array item, a field), .csv/.tsv (one per row, a column) and .parquet (one per row, a column, read in
record batches); text formats may be gzip (.gz) or zstd (.zst) compressed.

Every reader yields plain ``str`` documents. Problems with the input (nothing matched, a binary or
non-UTF-8 file, a JSONL line without the text field) raise :class:`DataError` with a one-line message,
or, with ``bad_files="skip"``, skip the file with a warning.
"""

from __future__ import annotations

import glob
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrain import PretrainError

TEXT_EXTS = {".txt", ".text", ".md", ".rst"}
JSONL_EXTS = {".jsonl", ".ndjson"}
TABLE_EXTS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
BAD_FILE_POLICIES = ("error", "skip")


class DataError(PretrainError):
    """Bad or missing input data."""


@dataclass
class Source:
    """One input file and what was read from it."""

    path: Path
    kind: str  # "text" | "jsonl"
    sha256: str = ""
    bytes: int = 0
    documents: int = 0
    skipped: str = ""  # reason, if the file was skipped

    def manifest(self) -> dict:
        out = {"path": str(self.path), "format": self.kind, "sha256": self.sha256, "bytes": self.bytes,
               "documents": self.documents}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _split_suffix(path: Path) -> tuple[str, str | None]:
    """('.jsonl', 'gzip') for data.jsonl.gz; ('.txt', None) for notes.txt."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSED.get(suffixes[-1]) if suffixes else None
    if comp:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), comp


def kind_of(path: Path) -> str:
    ext, _ = _split_suffix(path)
    if ext in JSONL_EXTS:
        return "jsonl"
    return TABLE_EXTS.get(ext, "text")


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Files, folders (recursively: .txt/.text/.md/.rst and .jsonl) and globs → sorted, de-duplicated sources.

    Explicitly named files and glob matches are read whatever their extension (as JSONL if they end in
    .jsonl/.ndjson, else as text); folders contribute only files with the extensions above.
    """
    if not inputs:
        raise DataError("no input given: name at least one file, folder or glob")
    seen: dict[Path, Source] = {}
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts)
                and _split_suffix(f)[0] in TEXT_EXTS | JSONL_EXTS | set(TABLE_EXTS))
            if not matches:
                raise DataError(f"folder {p} has no .txt/.md/.rst/.jsonl/.json/.csv/.tsv/.parquet files "
                                "(optionally .gz/.zst; name files or a glob to read other extensions)")
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"glob {item!r} matched no files")
        else:
            raise DataError(f"input not found: {item}")
        for m in matches:
            m = m.resolve()
            if m not in seen:
                seen[m] = Source(path=m, kind=kind_of(m))
    return list(seen.values())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    _, comp = _split_suffix(path)
    try:
        if comp == "gzip":
            import gzip

            return gzip.decompress(path.read_bytes())
        if comp == "zstd":
            import zstandard

            with open(path, "rb") as f:
                return zstandard.ZstdDecompressor().stream_reader(f).read()
    except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile is an OSError; zstandard raises ZstdError
        raise DataError(f"{path} is not a valid {comp} file: {e}") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path} is not a valid zstd file: {e}") from None
        raise
    return path.read_bytes()


def read_text(path: Path) -> str:
    raw = _read_bytes(path)
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks like a binary file (NUL bytes); not text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                        "re-encode it as UTF-8 or pass --bad-files skip") from None


def _iter_jsonl(path: Path, text_field: str, text: str | None = None) -> Iterator[str | None]:
    text = read_text(path) if text is None else text
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        if text_field not in obj:
            raise DataError(f"{path}:{lineno}: no field {text_field!r}; fields present: "
                            f"{', '.join(sorted(obj)) or '(none)'} (choose one with --text-field)")
        value = obj[text_field]
        if value is None:
            yield None
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{path}:{lineno}: field {text_field!r} holds a lone surrogate escape (e.g. a "
                            "truncated emoji), which is not valid Unicode text") from None
        yield value


def _column_error(path: Path, field: str, present: list[str]) -> DataError:
    return DataError(f"{path}: no column {field!r}; columns present: {', '.join(present) or '(none)'} "
                     "(choose one with --text-field)")


def iter_rows(path: Path, kind: str, field: str) -> Iterator[str | None]:
    """The ``field`` value of every row of a JSONL/JSON/CSV/TSV/Parquet file, in order, empty ones included
    (so callers that need row alignment, like `pretrain embed`, can keep it)."""
    if kind == "jsonl":
        yield from _iter_jsonl(path, field)
    else:
        yield from _iter_table(path, kind, field)


def _iter_table(path: Path, kind: str, field: str) -> Iterator[str | None]:
    if kind in ("csv", "tsv"):
        import csv
        import io

        reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t" if kind == "tsv" else ",")
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise _column_error(path, field, list(reader.fieldnames or []))
        for row in reader:
            yield row.get(field)
        return
    if kind == "json":  # a JSON array of objects (or one object per line)
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(path, field, text)
            return
        rows = data if isinstance(data, list) else [data]
        for i, obj in enumerate(rows):
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(f"{path}: item {i} has no field {field!r}; fields present: "
                                f"{', '.join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__}")
            yield obj[field] if isinstance(obj[field], str) else None
        return
    # parquet, read in record batches
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if field not in names:
            raise _column_error(path, field, names)
        for batch in pf.iter_batches(columns=[field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                yield value if isinstance(value, str) else None
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise DataError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None


def read_documents(source: Source, text_field: str = "text") -> list[str]:
    """All non-empty documents of one source (raises DataError on bad content)."""
    if source.kind == "text":
        docs: list[str | None] = [read_text(source.path)]
    else:
        docs = list(iter_rows(source.path, source.kind, text_field))
    return [d for d in docs if d and d.strip()]


def iter_documents(sources: list[Source], text_field: str = "text", bad_files: str = "error",
                   record: bool = False, with_source: bool = False) -> Iterator:
    """Yield the documents of every usable source in order.

    With ``record=True`` each source's sha256, bytes and document count are filled in (and skipped
    files are marked), so one pass both reads and describes the corpus. With ``with_source=True`` it
    yields (source index, document) pairs.
    """
    if bad_files not in BAD_FILE_POLICIES:
        raise DataError(f"bad_files must be one of {BAD_FILE_POLICIES}, got {bad_files!r}")
    for index, src in enumerate(sources):
        if src.skipped:
            continue
        try:
            docs = read_documents(src, text_field)
        except DataError as e:
            if bad_files == "skip":
                warnings.warn(f"skipping {src.path}: {e}", stacklevel=2)
                src.skipped = str(e)
                continue
            raise
        if record:
            src.sha256 = sha256_file(src.path)
            src.bytes = src.path.stat().st_size
            src.documents = len(docs)
        if with_source:
            yield from ((index, d) for d in docs)
        else:
            yield from docs
