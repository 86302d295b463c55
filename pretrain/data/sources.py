"""Raw documents, streamed: files, folders and globs of .txt (one document per file, per blank-line paragraph
or per line), .jsonl/.json (one per line or array item, a field), .csv/.tsv (one per row, a column) and
.parquet (one per row, a column, read in record batches); text formats may be gzip (.gz) or zstd (.zst)
compressed. Hugging Face datasets (``hf:NAME[:CONFIG]`` or a :class:`HubSpec`) stream through
``datasets`` when it is installed (``pip install 'pretrain[hf]'``) — the same code path reads local
Parquet/JSONL files with ``HubSpec("parquet", data_files=...)``.

Every reader yields plain ``str`` documents one at a time: memory does not grow with a file's size
(except for a .txt file read as one document, and a .json array, which are read whole). Problems with
the input (nothing matched, a binary or non-UTF-8 file, a JSONL line without the text field) raise
:class:`DataError` with a one-line message, or, with ``bad_files="skip"``, skip the file with a warning.

An input may carry a mixture weight: ``PATH::WEIGHT`` (e.g. ``wiki/::3 code/::1``); every file it
expands to belongs to that mixture component.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain import PretrainError

TEXT_EXTS = {".txt", ".text", ".md", ".rst"}
JSONL_EXTS = {".jsonl", ".ndjson"}
TABLE_EXTS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
BAD_FILE_POLICIES = ("error", "skip")
TEXT_UNITS = ("file", "paragraph", "line")
HUB_PREFIX = "hf:"
CHUNK = 1 << 20  # bytes read at a time from a (decompressed) file


class DataError(PretrainError):
    """Bad or missing input data."""


@dataclass
class Source:
    """One input file and what was read from it."""

    path: Path
    kind: str  # "text" | "jsonl" | "json" | "csv" | "tsv" | "parquet"
    sha256: str = ""
    bytes: int = 0
    documents: int = 0
    skipped: str = ""  # reason, if the file was skipped
    group: int = 0  # index of the input (mixture component) it came from
    weight: float | None = None  # that component's mixture weight, when weights were given
    checked: bool = field(default=False, repr=False)  # read once without error (bad_files="skip")

    @property
    def label(self) -> str:
        return str(self.path)

    def manifest(self) -> dict:
        out = {"path": str(self.path), "format": self.kind, "sha256": self.sha256, "bytes": self.bytes,
               "documents": self.documents}
        if self.weight is not None:
            out.update(weight=self.weight, group=self.group)
        if self.skipped:
            out["skipped"] = self.skipped
        return out


@dataclass
class HubSpec:
    """A Hugging Face dataset, streamed with ``datasets`` (``name`` may also be a builder such as "parquet"
    or "json" with local or remote ``data_files``)."""

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: Any = None
    weight: float | None = None


@dataclass
class HubSource:
    """A Hugging Face dataset as a source; ``fingerprint`` is the ``datasets`` builder hash (for a Hub
    repository, derived from the resolved commit) and ``resolved_revision`` the commit sha when known."""

    spec: HubSpec
    kind: str = "hub"
    documents: int = 0
    skipped: str = ""
    group: int = 0
    weight: float | None = None
    fingerprint: str = ""
    resolved_revision: str = ""
    checked: bool = field(default=True, repr=False)
    _builder: Any = field(default=None, repr=False)

    path = None  # not a file

    @property
    def label(self) -> str:
        return HUB_PREFIX + self.spec.name + (f":{self.spec.config}" if self.spec.config else "")

    def manifest(self) -> dict:
        s = self.spec
        out = {"name": s.name, "config": s.config, "split": s.split, "format": "hub", "revision": s.revision,
               "resolved_revision": self.resolved_revision or None, "fingerprint": self.fingerprint,
               "documents": self.documents}
        if s.data_files is not None:
            files = s.data_files if isinstance(s.data_files, (list, tuple)) else [s.data_files]
            out["data_files"] = [str(f) for f in files]
            local = [Path(f) for f in files if isinstance(f, (str, Path)) and Path(f).is_file()]
            if local and len(local) == len(files):
                out["sha256"] = [sha256_file(p) for p in local]
        if self.weight is not None:
            out.update(weight=self.weight, group=self.group)
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


def parse_weight(item: str) -> tuple[str, float | None]:
    """'wiki/::3' → ('wiki/', 3.0); 'wiki/' → ('wiki/', None)."""
    if "::" not in item or Path(item).exists():
        return item, None
    spec, w = item.rsplit("::", 1)
    try:
        weight = float(w)
    except ValueError:
        raise DataError(f"input {item!r}: the weight after '::' must be a number, got {w!r}") from None
    if not weight >= 0 or weight == float("inf"):
        raise DataError(f"input {item!r}: the weight must be a finite number >= 0")
    return spec, weight


def parse_hub(item: str, split: str = "train", revision: str | None = None,
              data_files: Any = None) -> HubSpec:
    """'hf:NAME[:CONFIG]' → HubSpec."""
    rest = item[len(HUB_PREFIX):]
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"input {item!r}: expected hf:NAME or hf:NAME:CONFIG")
    return HubSpec(name=name, config=config or None, split=split, revision=revision, data_files=data_files)


def glob_files(pattern: str) -> list[Path]:
    """The files a glob matches (``**`` recursive, ``~`` expanded), sorted; an error when it matches none."""
    files = sorted(Path(m) for m in glob.glob(str(Path(pattern).expanduser()), recursive=True)
                   if Path(m).is_file())
    if not files:
        raise DataError(f"glob {pattern!r} matched no files")
    return files


def expand_inputs(inputs: list, hf_split: str = "train", hf_revision: str | None = None,
                  hf_data_files: Any = None) -> list:
    """Files, folders, globs (each optionally ``::WEIGHT``), ``hf:NAME[:CONFIG]`` strings and
    :class:`HubSpec` objects → sources, de-duplicated (a file named twice belongs to its first input).

    Explicitly named files and glob matches are read whatever their extension (by their extension if it
    is a known one, else as text); folders contribute only files with known extensions. When any input
    has a weight, every input gets one (1.0 if not given) and its sources carry it.
    """
    if not inputs:
        raise DataError("no input given: name at least one file, folder or glob")
    parsed: list[tuple[Any, float | None]] = []
    for item in inputs:
        if isinstance(item, HubSpec):
            parsed.append((item, item.weight))
            continue
        item, weight = parse_weight(str(item))
        if item.startswith(HUB_PREFIX):
            parsed.append((parse_hub(item, hf_split, hf_revision, hf_data_files), weight))
        else:
            parsed.append((item, weight))
    weighted = any(w is not None for _, w in parsed)
    if weighted and all(w == 0 for _, w in parsed):  # before any file is read, not after tokenizing them all
        raise DataError("every mixture weight is 0: give at least one input a positive weight")
    seen: dict[Path, Source] = {}
    out: list = []
    for group, (item, weight) in enumerate(parsed):
        if weighted and weight is None:
            weight = 1.0
        if isinstance(item, HubSpec):
            out.append(HubSource(spec=item, group=group, weight=weight))
            continue
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
            matches = glob_files(item)
        else:
            raise DataError(f"input not found: {item}")
        for m in matches:
            m = m.resolve()
            if m not in seen:
                seen[m] = Source(path=m, kind=kind_of(m), group=group, weight=weight)
                out.append(seen[m])
    return out


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ raw bytes


class _HashingReader(io.RawIOBase):
    """Reads a file and feeds everything read into a sha256 (the manifest's checksum costs no extra pass)."""

    def __init__(self, f, h):
        self.f, self.h, self.n = f, h, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
            self.n += n
        return n

    def drain(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass


def _zstd_blocks(raw: _HashingReader, path: Path) -> Iterator[bytes]:
    """Decompress a (multi-frame) zstd stream; a truncated last frame is an error, not a silent end."""
    import zstandard

    d, fed = zstandard.ZstdDecompressor().decompressobj(), False
    while block := raw.read(CHUNK):
        while block:
            fed = True
            if out := d.decompress(block):
                yield out
            if d.eof:  # a frame ended: the rest of the block starts the next one
                block, d, fed = d.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
            else:
                block = b""
    if fed and not d.eof:
        raise DataError(f"{path} is not a valid zstd file: it ends in the middle of a frame (truncated?)")


def _chunks(path: Path, src: Source | None = None) -> Iterator[bytes]:
    """The decompressed bytes of ``path`` in chunks; with ``src``, fills in its sha256 and size on the way."""
    _, comp = _split_suffix(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        raw = _HashingReader(f, h)
        try:
            if comp == "gzip":
                import gzip

                stream = gzip.GzipFile(fileobj=raw, mode="rb")
                while block := stream.read(CHUNK):
                    yield block
            elif comp == "zstd":
                yield from _zstd_blocks(raw, path)
            else:
                while block := raw.read(CHUNK):
                    yield block
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            if comp is None:
                raise
            raise DataError(f"{path} is not a valid {comp} file: {e}") from None
        except DataError:
            raise
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise DataError(f"{path} is not a valid zstd file: {e}") from None
            raise
        if src is not None:
            raw.drain()
            src.sha256, src.bytes = h.hexdigest(), raw.n


def _read_bytes(path: Path) -> bytes:
    return b"".join(_chunks(path))


def _binary_error(path: Path, head: bytes = b"") -> DataError:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 (or UTF-32) with a byte-order mark
        return DataError(f"{path} is UTF-16/32 encoded (it starts with a byte-order mark); re-encode it as "
                         "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    return DataError(f"{path} looks like a binary file (NUL bytes); not text")


# prepare's errors about one file end with it
SKIP_HINT = " (or pass --bad-files skip to leave such files out)"


def _utf8_error(path: Path, e: UnicodeDecodeError, raw: bytes, offset: int = 0) -> DataError:
    return DataError(f"{path} is not valid UTF-8 (byte {offset + e.start}: {raw[e.start:e.start + 4]!r}); "
                     "re-encode it as UTF-8")


def _decode(path: Path, raw: bytes) -> str:
    if b"\x00" in raw[:8192]:
        raise _binary_error(path, raw[:4])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, raw) from None


def read_text(path: Path) -> str:
    return _decode(path, _read_bytes(path))


def _lines(path: Path, src: Source | None = None, keepends: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line of a text file (with its '\\n' if ``keepends``), decoded as UTF-8
    one line at a time (errors give the byte offset in the file)."""
    nl = "\n" if keepends else ""
    offset, lineno, rest, first = 0, 0, b"", True
    for block in _chunks(path, src):
        if first:
            if b"\x00" in block[:8192]:
                raise _binary_error(path, block[:4])
            if block.startswith(b"\xef\xbb\xbf"):
                block, offset = block[3:], 3
            first = False
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for raw in parts:
            lineno += 1
            try:
                yield lineno, raw.decode("utf-8") + nl
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, raw, offset) from None
            offset += len(raw) + 1
    if rest:
        try:
            yield lineno + 1, rest.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(path, e, rest, offset) from None


# ------------------------------------------------------------------------------------------------ tables


def column_error(path: Path, name: str, present: list[str], flag: str = "--text-column") -> DataError:
    """The error for a column that ``path`` lacks: it lists the ``present`` ones and names ``flag``."""
    return DataError(f"{path}: no column {name!r}; columns present: {', '.join(present) or '(none)'} "
                     f"(choose one with {flag})")


def _text_value(path: Path, where: str, name: str, value: Any) -> str | None:
    """A JSON value that must be text (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{where}: field {name!r} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path}:{where}: field {name!r} holds a lone surrogate escape (e.g. a "
                        "truncated emoji), which is not valid Unicode text") from None
    return value


def _json_record(path: Path, where: str, obj: Any, columns: list[str] | None, text: bool,
                 flag: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{where}: expected a JSON object, got {type(obj).__name__}")
    row: dict[str, Any] = {}
    for name in obj if columns is None else columns:
        if name not in obj:
            raise DataError(f"{path}:{where}: no field {name!r}; fields present: "
                            f"{', '.join(sorted(obj)) or '(none)'} (choose one with {flag})")
        row[name] = _text_value(path, where, name, obj[name]) if text else obj[name]
    return row


def _json_records(path: Path, kind: str, columns: list[str] | None, text: bool, flag: str,
                  src: Source | None) -> Iterator[dict[str, Any]]:
    lines: Iterator[tuple[int, str]]
    if kind == "json":  # a JSON array of objects (or one object, or one object per line); read whole
        doc = _decode(path, b"".join(_chunks(path, src)))
        try:
            data = json.loads(doc)
        except json.JSONDecodeError:
            lines = enumerate(doc.split("\n"), 1)
        else:
            for i, obj in enumerate(data if isinstance(data, list) else [data]):
                yield _json_record(path, f"item {i}", obj, columns, text, flag)
            return
    else:  # lines end at '\n' only (not str.splitlines()): JSON strings may hold U+2028
        lines = _lines(path, src, keepends=False)
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        yield _json_record(path, str(lineno), obj, columns, text, flag)


def _csv_records(path: Path, kind: str, columns: list[str] | None, flag: str,
                 src: Source | None) -> Iterator[dict[str, Any]]:
    import csv

    lines = (line for _, line in _lines(path, src))
    csv.field_size_limit(2**31 - 1)  # a document may be longer than the module's 128 KiB default
    # CSV: RFC 4180 quoting, strict (an unbalanced quote is an error, not rows silently merged); TSV: no
    # quoting at all, as GLUE-style TSV files are written (a '"' is text)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else \
        csv.reader(lines, strict=True)
    try:
        header = next(reader, None) or []  # an empty file has no columns (and no rows)
        for name in columns or ():
            if name not in header:
                raise column_error(path, name, header, flag)
        index = {name: header.index(name) for name in (header if columns is None else columns)}
        for row in reader:
            if not row:  # blank lines are not rows
                continue
            if len(row) != len(header):  # a stray delimiter (unquoted comma, tab in a TSV text) shifts fields
                raise DataError(f"{path}:{reader.line_num}: row has {len(row)} field(s), the header "
                                f"{len(header)}" + ("" if kind == "tsv" else
                                                    " (a field with a comma in it must be in double quotes)"))
            yield {name: row[i] for name, i in index.items()}
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {kind.upper()} ({e})") from None


def _parquet_records(path: Path, columns: list[str] | None, text: bool, flag: str,
                     src: Source | None) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if _split_suffix(path)[1]:  # .parquet.gz / .zst: Parquet needs random access, so decompress in memory
            pf = pq.ParquetFile(pa.BufferReader(b"".join(_chunks(path))))
        else:
            pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        is_view = getattr(pa.types, "is_string_view", lambda _t: False)
        for name in columns or ():
            if name not in schema.names:
                raise column_error(path, name, schema.names, flag)
        for name in (schema.names if columns is None else columns) if text else []:
            tp = schema.field(name).type
            if pa.types.is_dictionary(tp):  # a categorical column: its values' type
                tp = tp.value_type
            if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or is_view(tp)
                    or pa.types.is_null(tp)):
                raise DataError(f"{path}: column {name!r} is {tp}, not a string column (choose the text "
                                f"column with {flag})")
        for batch in pf.iter_batches(columns=columns, batch_size=8192):
            yield from batch.to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise DataError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None
    if src is not None:
        src.sha256, src.bytes = sha256_file(path), path.stat().st_size


def iter_records(path: Path, kind: str | None = None, columns: Sequence[str] | None = None, *,
                 text: bool = False, flag: str = "--text-column",
                 src: Source | None = None) -> Iterator[dict[str, Any]]:
    """Every row of a CSV, TSV, JSONL, JSON or Parquet file as a dict (column → value), in file order,
    streamed (a .json file is read whole); gzip/zstd-compressed files are read as the format inside.

    ``kind`` is the format (by default from the extension, as :func:`kind_of` says). ``columns`` are the
    columns to read (default: all). A column the file lacks is a :class:`DataError` that lists the columns
    it has and suggests ``flag``: before any row for CSV/TSV/Parquet (their header or schema), at the row
    for JSON/JSONL (each object names its own fields). With ``text=True`` every column read must hold
    text: a JSON value that is not a string (or holds a lone surrogate) or a Parquet column of another
    type is an error; nulls come out as None.

    Values are as stored: strings for CSV/TSV, JSON values, Python values for Parquet. A name repeated in
    a CSV/TSV header means its first column. Blank lines are not rows. CSV is RFC 4180 quoted, strictly;
    TSV is not quoted at all (GLUE-style). Damaged input raises DataError naming the file and, where there
    is one, the line (``path:LINE:``) or JSON array item (``path:item N:``): a binary file, a non-UTF-8
    (or UTF-16) one, a damaged gzip/zstd stream, malformed CSV or JSON, a row with more or fewer fields
    than the header, a JSON row that is not an object, an unreadable Parquet file. With ``src``, its
    sha256 and size are filled in once the file has been read to the end.
    """
    kind = kind or kind_of(path)
    cols = None if columns is None else list(columns)
    if kind in ("csv", "tsv"):
        yield from _csv_records(path, kind, cols, flag, src)
    elif kind in ("jsonl", "json"):
        yield from _json_records(path, kind, cols, text, flag, src)
    elif kind == "parquet":
        yield from _parquet_records(path, cols, text, flag, src)
    else:
        raise DataError(f"{path}: not a table (CSV, TSV, JSONL, JSON or Parquet), but {kind}")


def iter_rows(path: Path, kind: str, field: str, src: Source | None = None) -> Iterator[str | None]:
    """The ``field`` value of every row of a JSONL/JSON/CSV/TSV/Parquet file, in order, empty ones included
    (so callers that need row alignment, like `pretrain embed`, can keep it): :func:`iter_records` of that
    one text column."""
    for row in iter_records(path, kind, [field], text=True, src=src):
        yield row[field]


# ------------------------------------------------------------------------------------------------ text


def _iter_text(path: Path, unit: str, src: Source | None = None) -> Iterator[str]:
    if unit == "file":
        yield _decode(path, b"".join(_chunks(path, src)))
        return
    para: list[str] = []
    for _, line in _lines(path, src):
        if unit == "line":
            yield line.rstrip("\r\n")
        elif line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\r\n")
            para = []
    if para:
        yield "".join(para).rstrip("\r\n")


# ------------------------------------------------------------------------------------------------ hub


def _hub_builder(src: HubSource):
    """The ``datasets`` builder of a hub source (created once, so every pass reads the same revision)."""
    if src._builder is None:
        try:
            import datasets
        except ImportError:
            raise DataError(f"{src.label}: reading Hugging Face datasets needs the `datasets` package: "
                            "pip install 'pretrain[hf]'") from None
        s = src.spec
        try:
            b = datasets.load_dataset_builder(s.name, s.config, revision=s.revision, data_files=s.data_files)
        except Exception as e:  # offline, unknown name, bad config: datasets raises many types
            raise DataError(f"cannot load Hugging Face dataset {src.label}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        src._builder = b
        src.fingerprint = str(getattr(b, "hash", "") or "")
        if s.data_files is None:  # a Hub repository: record the commit it resolved to, when reachable
            try:
                from huggingface_hub import HfApi

                src.resolved_revision = HfApi().dataset_info(s.name, revision=s.revision).sha or ""
            except Exception:
                src.resolved_revision = ""
    return src._builder


def _iter_hub(src: HubSource, text_field: str) -> Iterator[str | None]:
    b = _hub_builder(src)
    try:
        ds = b.as_streaming_dataset(split=src.spec.split)
    except Exception as e:
        raise DataError(f"{src.label}: cannot stream split {src.spec.split!r}: "
                        f"{str(e).splitlines()[0]}") from None
    names = ds.column_names
    if names is not None and text_field not in names:
        raise DataError(f"{src.label}: no column {text_field!r}; columns present: "
                        f"{', '.join(names) or '(none)'} (choose one with --text-column)")
    try:
        for batch in ds.iter(batch_size=1000):
            if text_field not in batch:
                raise DataError(f"{src.label}: no column {text_field!r}; columns present: "
                                f"{', '.join(batch) or '(none)'} (choose one with --text-column)")
            for value in batch[text_field]:
                yield value if isinstance(value, str) else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{src.label}: reading failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


# ------------------------------------------------------------------------------------------------ documents


def iter_source(src, text_field: str = "text", text_unit: str = "file",
                record: bool = False) -> Iterator[str]:
    """The non-empty documents of one source, streamed."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    rec = src if record and src.kind != "hub" else None
    n = 0
    if src.kind == "hub":
        docs: Iterator[str | None] = _iter_hub(src, text_field)
    elif src.kind == "text":
        docs = _iter_text(src.path, text_unit, rec)
    else:
        docs = iter_rows(src.path, src.kind, text_field, rec)
    for d in docs:
        if d and d.strip():
            n += 1
            yield d
    if record:
        src.documents = n


def read_documents(source, text_field: str = "text", text_unit: str = "file") -> list[str]:
    """All non-empty documents of one source (raises DataError on bad content)."""
    return list(iter_source(source, text_field, text_unit))


def iter_documents(sources: list, text_field: str = "text", bad_files: str = "error", record: bool = False,
                   with_source: bool = False, text_unit: str = "file") -> Iterator:
    """Yield the documents of every usable source in order, streaming.

    With ``record=True`` each source's sha256, bytes and document count are filled in (and skipped
    files are marked), so one pass both reads and describes the corpus. With ``with_source=True`` it
    yields (source index, document) pairs. With ``bad_files="skip"`` a file is first read through once
    (a file that fails part-way is skipped whole, never cut), so skipping costs one extra read per file.
    """
    if bad_files not in BAD_FILE_POLICIES:
        raise DataError(f"bad_files must be one of {BAD_FILE_POLICIES}, got {bad_files!r}")
    for index, src in enumerate(sources):
        if src.skipped:
            continue
        if bad_files == "skip" and not src.checked:
            try:
                for _ in iter_source(src, text_field, text_unit):
                    pass
            except DataError as e:
                reason = str(e)
                warnings.warn(f"skipping {src.label}: {reason}", stacklevel=2)
                src.skipped = reason
                continue
            src.checked = True
        docs = iter_source(src, text_field, text_unit, record=record)
        try:
            if with_source:
                yield from ((index, d) for d in docs)
            else:
                yield from docs
        except DataError as e:  # a file that cannot be read: name the way round it
            raise DataError(f"{e}{SKIP_HINT}" if bad_files == "error" and src.path is not None
                            else str(e)) from None
