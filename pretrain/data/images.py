"""Images → image shards + meta.json (``pretrain prepare`` with image inputs), and their reader.

Inputs (each a file, a folder or a glob; several may be given):

- IDX files, raw or gzip'ed (the MNIST / Fashion-MNIST layout: magic 0x00000803 images (N, H, W) uint8,
  0x00000801 labels). An images file is paired with its labels file by name (``train-images-idx3-ubyte.gz``
  ↔ ``train-labels-idx1-ubyte.gz``); one named t10k* or test* is the "test" split, any other "train"; images
  without a labels file are unlabelled.
- .npz in the MedMNIST layout (``{train,val,test}_{images,labels}``; also Keras' ``x_train``/``y_train``/
  ``x_test``/``y_test`` and a plain ``images``/``labels``): the splits come from the keys.
- .npy arrays (N, H, W) or (N, H, W, C) of uint8 (floats in [0, 1] are scaled to 0..255), unlabelled or
  labelled by a sibling ``NAME_labels.npy`` (``X_images.npy`` ↔ ``X_labels.npy``).
- folders of PNG / JPEG / WebP / BMP (/ GIF / TIFF) images, decoded with Pillow: one sub-folder per class
  (class names are the sub-folder names, sorted), or a flat folder of images (unlabelled). A folder whose
  sub-folders are named train / val (valid, validation) / test holds one such layout per split.

Every image is converted to one channel count (``channels``: 1 or 3; by default that of the first image:
L / LA / I / 1 / F → 1, any other mode → 3) and, with ``image_size`` N, resized (shorter side to N, bicubic)
and centre-cropped to N×N; without it every image must have the first one's size. Labels from arrays are
class indices, named "0", "1", ...; labels from folders index the sorted class names.

Splits: those of the source (npz keys, IDX t10k/test names, train/val/test folders); without a "val" split
one is carved from train: a seeded random ``val_fraction`` of its images (deterministic in ``seed``). The
"val" split is always written (empty with ``val_fraction`` 0), "test" only when the source has one.

The prepared format (``meta.json`` ``"kind": "images"``)::

    OUT/meta.json           format, kind, dtype uint8, image {height, width, channels, mean, std}
                            (per channel, of the train pixels / 255), classes ([] when unlabelled),
                            splits {train, val[, test]}: {images, shards [{file, images}],
                            labels (FILE or null), class_counts}, sources, skipped, licence, created,
                            pretrain_version
    OUT/train_000000.u8     raw uint8, C order, shape (n, H, W, C) (C = 1 for grayscale)
    OUT/train_labels.npy    int64, one class index per image of the split, in shard order

Guarantees (those of text prepare): streaming with bounded memory (at most ``2 × workers`` batches of images
in flight, arrays read in slices, shards written as they fill), decoding in worker processes, everything
written inside a hidden ``.NAME.partial`` directory renamed into place at the end, one lock per output, and
no replacing of what prepare did not write without ``overwrite``. Bad input is one :class:`DataError` naming
the file: an undecodable or truncated image (or, with ``bad_files="skip"``, a warning, the image left out and
counted in meta.json's "skipped"), images of different sizes without ``image_size``, an .npz without the keys
(those present are listed), images and labels of different lengths, a bad or truncated IDX file, an empty
folder, zero images.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import struct
import sys
import time
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.manifest import (
    FORMAT_VERSION,
    META,
    ShardWriter,
    check_prepared_out,
    load_meta,
    writing_prepared,
)
from pretrain.data.sources import (
    JSONL_EXTS,
    SKIP_HINT,
    TABLE_EXTS,
    TEXT_EXTS,
    DataError,
    _split_suffix,
    glob_files,
    sha256_file,
)
from pretrain.io import fsync_file, write_json_atomic

KIND = "images"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ARRAY_EXTS = (".npz", ".npy")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
SHARD_BYTES = 256 << 20  # pixels per shard file by default
JOB_BYTES = 8 << 20  # decoded pixels per batch handed to a worker (bounds memory with 2 × workers in flight)
JOB_FILES = 64  # image files per worker batch at most
ARRAY_BATCH_BYTES = 4 << 20  # array bytes read at a time
AUTO_WORKERS_IMAGES = 2000  # with workers=None, fewer images to decode or resize than this: in-process
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_ONE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "F")


# ----------------------------------------------------------------------------------------------- detection


def _name_kind(p: Path) -> str | None:
    """What a path is by its name alone: "npz", "npy", "image", "idx" (``*-idx3-ubyte``, ``*.idx``) or
    None."""
    name = p.name.lower()
    ext, _ = _split_suffix(p)
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(IMAGE_EXTS):
        return "image"
    if re.search(r"idx\d[-_.]ubyte", name) or ext in (".idx", ".idx1", ".idx3"):
        return "idx"
    return None


def _is_text_name(p: Path) -> bool:
    ext, _ = _split_suffix(p)
    return ext in TEXT_EXTS | JSONL_EXTS | set(TABLE_EXTS)


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _sniff_idx(path: Path) -> bool:
    """Whether ``path`` starts with an IDX magic number (0x0000TTDD: two zero bytes, a type, 1-4 dims)."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and 1 <= head[3] <= 4


def _file_kind(p: Path) -> str | None:
    kind = _name_kind(p)
    if kind is not None or _is_text_name(p):
        return kind
    return "idx" if _sniff_idx(p) else None


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _dir_is_images(d: Path, limit: int = 10_000) -> bool:
    """A folder is an image input when it holds more image or array files than text files."""
    n_img = n_text = seen = 0
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if _file_kind(f) is not None:
                n_img += 1
            elif _is_text_name(f):
                n_text += 1
            seen += 1
            if (n_img >= 100 and n_img > 10 * n_text) or (n_text >= 100 and n_text > 10 * n_img) \
                    or seen >= limit:
                return n_img > n_text
    return n_img > n_text


def is_image_input(path: str | Path) -> bool:
    """Whether a ``pretrain prepare`` input is image data: an IDX / .npz / .npy file (by name or magic
    number), a glob of them, or a folder holding more image or array files than text files. A missing path
    counts by its name (the error comes later)."""
    s = str(path)
    if s.startswith("hf:"):
        return False
    p = Path(s).expanduser()
    if p.is_dir():
        return _dir_is_images(p)
    if p.is_file():
        return _file_kind(p) is not None
    if "::" in s:  # a weighted (mixture) input: text
        return False
    if any(ch in s for ch in "*?["):
        matches = [Path(m) for m in globlib.glob(str(p), recursive=True) if Path(m).is_file()]
        return bool(matches) and all(_file_kind(m) is not None for m in matches)
    return _name_kind(p) is not None


# ------------------------------------------------------------------------------------------- array helpers


def _to_uint8(a: np.ndarray, path: Path) -> np.ndarray:
    """Pixels as uint8: uint8 as is, floats in [0, 1] scaled by 255 (rounded), integers in 0..255 cast."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        if a.size and (not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0):
            raise DataError(f"{path}: float pixels must lie in [0, 1] (found {float(np.nanmin(a)):g} .. "
                            f"{float(np.nanmax(a)):g}); save them as uint8 0..255 or scale them to [0, 1]")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    if a.dtype.kind in "iub":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{path}: {a.dtype} pixels must lie in 0..255 (found {a.min()} .. {a.max()})")
        return a.astype(np.uint8)
    raise DataError(f"{path}: pixels of dtype {a.dtype} are not supported (uint8, or floats in [0, 1])")


def _image_shape(shape: tuple[int, ...], path: Path, what: str = "images") -> tuple[int, int, int, int]:
    """(N, H, W, C) of an image array shape (N, H, W) or (N, H, W, C), C in 1..4."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2], 1
    if len(shape) == 4 and 1 <= shape[3] <= 4:
        return shape[0], shape[1], shape[2], shape[3]
    hint = " (channels first? transpose to (N, H, W, C))" if len(shape) == 4 and shape[1] in (1, 3) else ""
    raise DataError(f"{path}: {what} must have shape (N, H, W) or (N, H, W, C) with C 1..4, got "
                    f"{tuple(shape)}{hint}")


def _labels_array(raw: np.ndarray, labels_path: str, images_path: str, n: int) -> np.ndarray:
    """Class indices (N,) int64 from labels (N,) or (N, 1), checked: integers >= 0, one per image."""
    a = np.asarray(raw)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"{labels_path}: labels must have shape (N,) or (N, 1), got {a.shape}"
                        + (" (multi-label data is not supported)" if a.ndim == 2 else ""))
    if a.dtype.kind == "f":
        if a.size and not np.array_equal(a, np.round(a)):
            raise DataError(f"{labels_path}: labels must be class indices (integers), found fractions")
    elif a.dtype.kind not in "iub":
        raise DataError(f"{labels_path}: labels of dtype {a.dtype} are not class indices")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise DataError(f"{labels_path}: labels must be class indices >= 0, found {int(a.min())}")
    if len(a) != n:
        raise DataError(f"{images_path} has {n:,} images but {labels_path} has {len(a):,} labels: "
                        "images and labels must have the same length")
    return a


def _idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, header bytes) of an IDX file; a DataError for a bad magic number."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or not 1 <= head[3] <= 4:
                raise DataError(f"{path}: not an IDX file (magic number 0x{head.hex() or 'empty'}; expected "
                                "0x00000803 for images, 0x00000801 for labels)")
            ndim = head[3]
            raw = f.read(4 * ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read it as {'gzip' if path.suffix.lower() == '.gz' else 'IDX'}: "
                        f"{e}") from None
    if len(raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX file (the header ends early)")
    return np.dtype(_IDX_DTYPES[head[2]]), struct.unpack(f">{ndim}I", raw), 4 + 4 * ndim


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        buf = f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt {what} ({e})") from None
    if len(buf) < n:
        raise DataError(f"{path}: truncated {what}: it ends {n - len(buf):,} bytes early")
    return buf


def _read_idx_labels(path: Path) -> np.ndarray:
    dtype, dims, hl = _idx_header(path)
    if len(dims) != 1:
        raise DataError(f"{path}: an IDX labels file has one dimension, this one {len(dims)}")
    with _open_maybe_gz(path) as f:
        f.read(hl)
        buf = _read_exact(f, dims[0] * dtype.itemsize, path, "IDX file")
    return np.frombuffer(buf, dtype=dtype)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # (3, 0)


# ------------------------------------------------------------------------------------------------ parts


@dataclass
class _Part:
    """One stream of images of one split: an array (IDX, an npz member, .npy) or image files of a folder."""

    fmt: str  # idx | npz | npy | folder
    path: Path  # the file, or the folder, for messages
    split: str
    count: int
    source: dict[str, Any]  # its manifest entry (images counted, a folder's sha256 filled in)
    labels: np.ndarray | None = None  # int64 per image (folder: index into ``classes``)
    classes: list[str] | None = None  # folder class names; None for integer labels
    hw: tuple[int, int] | None = None  # arrays: (H, W)
    channels: int = 0  # arrays: channels stored (1..4)
    batches: Callable[[int], Iterator[np.ndarray]] | None = None  # arrays: (b, H, W, C) slices in order
    files: list[Path] = field(default_factory=list)  # folder
    root: Path | None = None  # folder: the input folder (relative paths in its hash)
    label: str = ""  # for messages: "path" or "path (member)"
    sources: list[dict[str, Any]] = field(default_factory=list)  # its manifest entries (with a labels file)

    def __post_init__(self):
        self.label = self.label or str(self.path)
        self.sources = self.sources or [self.source]


def _source(path: Path, fmt: str, content: str = "images") -> dict[str, Any]:
    return {"path": str(path), "sha256": "", "bytes": 0, "format": fmt, "content": content, "images": 0,
            "licence": None}


def _idx_part(path: Path, labels_path: Path | None, split: str) -> list[_Part]:
    dtype, dims, hl = _idx_header(path)
    if len(dims) not in (3, 4):
        raise DataError(f"{path}: an IDX images file has 3 dimensions (N, H, W) (or 4 with channels last); "
                        f"this one has {len(dims)}")
    n, h, w, c = _image_shape(tuple(dims), path)
    item = h * w * c * dtype.itemsize
    gz = path.name.lower().endswith(".gz")
    if not gz and path.stat().st_size != hl + n * item:
        short = path.stat().st_size < hl + n * item
        raise DataError(f"{path}: {'truncated' if short else 'corrupt'} IDX file: {path.stat().st_size:,} "
                        f"bytes, its header says {hl + n * item:,}")

    def batches(b: int) -> Iterator[np.ndarray]:
        if not gz:
            mm = np.memmap(path, dtype=dtype, mode="r", offset=hl, shape=(n, h, w, c))
            for i in range(0, n, b):
                yield _to_uint8(np.asarray(mm[i:i + b]).astype(dtype.newbyteorder("="), copy=False), path)
            return
        with gzip.open(path, "rb") as f:
            _read_exact(f, hl, path, "gzip'ed IDX file")
            for i in range(0, n, b):
                k = min(b, n - i)
                buf = _read_exact(f, k * item, path, "gzip'ed IDX file")
                yield _to_uint8(np.frombuffer(buf, dtype=dtype).reshape(k, h, w, c), path)
            try:
                extra = f.read(1)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: corrupt gzip'ed IDX file ({e})") from None
            if extra:
                raise DataError(f"{path}: corrupt IDX file: more data than its header says")

    src = _source(path, "idx")
    labels = None
    out_sources = [src]
    if labels_path is not None:
        labels = _labels_array(_read_idx_labels(labels_path), str(labels_path), str(path), n)
        lsrc = _source(labels_path, "idx", "labels")
        lsrc["images"] = n
        out_sources.append(lsrc)
    return [_Part("idx", path, split, n, src, labels, None, (h, w), c, batches, sources=out_sources)]


_NPZ_LAYOUTS = (  # (images key, labels key, split); the first layout with any images key present is used
    (("train_images", "train_labels", "train"), ("val_images", "val_labels", "val"),
     ("test_images", "test_labels", "test")),
    (("x_train", "y_train", "train"), ("x_val", "y_val", "val"), ("x_test", "y_test", "test")),
    (("images", "labels", None),),
)


def _npz_parts(path: Path) -> list[_Part]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        layout = next((lay for lay in _NPZ_LAYOUTS if any(k in names for k, _, _ in lay)), None)
        if layout is None:
            present = ", ".join(names) or "(none)"
            raise DataError(f"{path}: no image arrays: expected the MedMNIST keys train_images/"
                            "train_labels, val_images/val_labels, test_images/test_labels (or x_train/"
                            f"y_train, x_test/y_test, or images/labels); keys present: {present}")
        src = _source(path, "npz")
        parts = []
        for key, lkey, split in layout:
            if key not in names:
                continue
            split = split or _split_of_name(path.name)
            try:
                with zf.open(key + ".npy") as f:
                    shape, fortran, dtype = _npy_header(f)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
                raise DataError(f"{path}: member {key} is not a readable array: {e}") from None
            label = f"{path} ({key})"
            n, h, w, c = _image_shape(shape, Path(label))
            labels = None
            if lkey in names:
                try:
                    with zf.open(lkey + ".npy") as f:
                        raw = np.lib.format.read_array(f, allow_pickle=False)
                except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
                    raise DataError(f"{path}: member {lkey} is not a readable array: {e}") from None
                labels = _labels_array(raw, f"{path} ({lkey})", label, n)

            def batches(b: int, key=key, shape=shape, fortran=fortran, dtype=dtype, label=label,
                        n=n, h=h, w=w, c=c) -> Iterator[np.ndarray]:
                try:
                    with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
                        _npy_header(f)
                        if fortran or dtype.hasobject:
                            a = np.lib.format.read_array(f, allow_pickle=False).reshape(n, h, w, c)
                            for i in range(0, n, b):
                                yield _to_uint8(np.ascontiguousarray(a[i:i + b]), Path(label))
                            return
                        item = h * w * c * dtype.itemsize
                        for i in range(0, n, b):
                            k = min(b, n - i)
                            buf = _read_exact(f, k * item, Path(label), "array")
                            yield _to_uint8(np.frombuffer(buf, dtype=dtype).reshape(k, h, w, c), Path(label))
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
                    raise DataError(f"{label}: truncated or corrupt array ({e})") from None

            parts.append(_Part("npz", path, split, n, src, labels, None, (h, w), c, batches, label=label))
        return parts


def _npy_part(path: Path, labels_path: Path | None) -> list[_Part]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy array (truncated or corrupt?): {e}") from None
    n, h, w, c = _image_shape(arr.shape, path)
    labels = None
    sources = [_source(path, "npy")]
    if labels_path is not None:
        try:
            raw = np.load(labels_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{labels_path} is not a readable .npy array: {e}") from None
        labels = _labels_array(raw, str(labels_path), str(path), n)
        lsrc = _source(labels_path, "npy", "labels")
        lsrc["images"] = n
        sources.append(lsrc)

    def batches(b: int) -> Iterator[np.ndarray]:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        for i in range(0, n, b):
            yield _to_uint8(np.ascontiguousarray(mm[i:i + b]).reshape(-1, h, w, c), path)

    return [_Part("npy", path, _split_of_name(path.name), n, sources[0], labels, None, (h, w), c, batches,
                  sources=sources)]


def _split_of_name(name: str) -> str:
    """A file named t10k* / test* is the test split, val* / valid* the validation split, any other train."""
    low = name.lower()
    if low.startswith(("t10k", "test")):
        return "test"
    if low.startswith(("val", "valid")):
        return "val"
    return "train"


def _labels_partner(path: Path, kind: str) -> Path | None:
    """The labels file named after an images file, if it exists."""
    name = path.name
    cands: list[str] = []
    if kind == "idx":
        base = re.sub(r"idx\d", "idx1", name.replace("images", "labels").replace("Images", "Labels"))
        if base != name:
            cands += [base, base[:-3] if base.lower().endswith(".gz") else base + ".gz"]
    elif kind == "npy":
        stem = name[:-4]
        cands.append((stem[:-7] + "_labels" if stem.endswith("_images") else stem + "_labels") + ".npy")
    for c in cands:
        p = path.with_name(c)
        if c != name and p.is_file():
            return p
    return None


def _is_labels_file(p: Path, kind: str) -> bool:
    if kind == "npy":
        return p.name[:-4].endswith("_labels")
    if kind == "idx":
        try:
            return len(_idx_header(p)[1]) == 1
        except DataError:
            return False
    return False


def _array_parts(files: list[Path], explicit: bool, log: Callable[[str], None]) -> list[_Part]:
    """Parts of IDX / .npz / .npy files (images paired with their labels files by name)."""
    kinds = {f: _file_kind(f) for f in files}
    for f, k in kinds.items():
        if k == "image":
            raise DataError(f"{f} is a single image file: give the folder that holds the images (one "
                            "sub-folder per class, or a flat folder for unlabelled images)")
        if k is None and explicit:
            raise DataError(f"{f} is not image data (IDX, .npz, .npy or a folder of images)")
    labels_files = {f for f, k in kinds.items() if k in ("idx", "npy") and _is_labels_file(f, k)}
    used: set[Path] = set()
    parts: list[_Part] = []
    for f, k in kinds.items():
        if k is None or f in labels_files:
            continue
        if k == "npz":
            parts += _npz_parts(f)
            continue
        lp = _labels_partner(f, k)
        if lp is not None:
            used.add(lp.resolve())
        parts += _idx_part(f, lp, _split_of_name(f.name)) if k == "idx" else _npy_part(f, lp)
    for f in sorted(labels_files):
        if f.resolve() not in used:
            msg = f"{f} is a labels file without its images file (expected by name beside it)"
            if explicit:
                raise DataError(msg)
            log(f"note: {msg}; ignored")
    return parts


def _images_under(d: Path, exclude: list[Path]) -> list[Path]:
    """Image files under folder ``d`` (recursively, hidden entries and ``exclude`` left out), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dp = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames
                             if not n.startswith(".") and (dp / n).resolve() not in exclude)
        out += [dp / n for n in filenames if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS)]
    return sorted(out, key=lambda p: p.relative_to(d).parts)


def _has_images(d: Path, exclude: list[Path]) -> bool:
    for dirpath, dirnames, filenames in os.walk(d):
        dp = Path(dirpath)
        if any(not n.startswith(".") and n.lower().endswith(IMAGE_EXTS) for n in filenames):
            return True
        dirnames[:] = [n for n in dirnames if not n.startswith(".") and (dp / n).resolve() not in exclude]
    return False


def _class_layout(d: Path, exclude: list[Path]) -> tuple[list[Path], list[str] | None, list[int] | None]:
    """(files, class names, class index per file) of a folder: class sub-folders, or flat (None, None)."""
    children = sorted(c for c in d.iterdir() if not c.name.startswith(".") and c.resolve() not in exclude)
    top = [c for c in children if c.is_file() and c.name.lower().endswith(IMAGE_EXTS)]
    subs = [(c, _images_under(c, exclude)) for c in children if c.is_dir()]
    subs = [(c, fs) for c, fs in subs if fs]
    if subs and top:
        raise DataError(f"{d} holds both images ({top[0].name}, ...) and sub-folders of images "
                        f"({subs[0][0].name}/, ...): put every image in a class sub-folder (labelled) or "
                        "none (unlabelled)")
    if not subs:
        return top, None, None
    files, idx = [], []
    for k, (_, fs) in enumerate(subs):
        files += fs
        idx += [k] * len(fs)
    return files, [c.name for c, _ in subs], idx


def _folder_parts(root: Path, exclude: list[Path], log: Callable[[str], None]) -> list[_Part]:
    children = sorted(c for c in root.iterdir() if not c.name.startswith(".") and c.resolve() not in exclude)
    sub_dirs = [c for c in children if c.is_dir() and _has_images(c, exclude)]
    top = [c for c in children if c.is_file() and c.name.lower().endswith(IMAGE_EXTS)]
    src = _source(root, "folder")
    if sub_dirs and not top and all(c.name.lower() in SPLIT_NAMES for c in sub_dirs):
        layouts = [(SPLIT_NAMES[c.name.lower()], c) for c in sub_dirs]
    else:
        layouts = [("train", root)]
    parts = []
    for split, d in layouts:
        files, classes, idx = _class_layout(d, exclude)
        if files:
            labels = None if idx is None else np.asarray(idx, dtype=np.int64)
            parts.append(_Part("folder", d, split, len(files), src, labels, classes, files=files, root=root))
    if not parts:
        raise DataError(f"folder {root} holds no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) and no IDX, "
                        ".npz or .npy files")
    n_all = sum(1 for f in root.rglob("*") if f.is_file() and _visible(f, root))
    n_img = sum(p.count for p in parts)
    if n_all > n_img:
        log(f"note: {root}: {n_all - n_img:,} files that are not images ignored")
    src["bytes"] = sum(f.stat().st_size for p in parts for f in p.files)
    return parts


def _plan(inputs: list, exclude: list[Path], log: Callable[[str], None]) -> list[_Part]:
    """Every input → parts, in input order (a folder's files, an npz's splits in order)."""
    if not inputs:
        raise DataError("no input given: name at least one file, folder or glob")
    parts: list[_Part] = []
    seen: set[Path] = set()
    explicit: list[Path] = []  # files named (or globbed) on their own: read together, so an images file
    at = -1                    # and its labels file pair up whichever order they come in
    for item in inputs:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            arrays = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                            and _file_kind(f) in ("idx", "npz", "npy"))
            if arrays:
                if _has_images(p, exclude):
                    log(f"note: {p} holds IDX/.npz/.npy files: they are read, its image files are not")
                parts += _array_parts(arrays, False, log)
            else:
                parts += _folder_parts(p, exclude, log)
            continue
        if p.is_file():
            files = [p]
        elif any(ch in s for ch in "*?["):
            files = glob_files(s)
        else:
            raise DataError(f"input not found: {s}")
        files = [f for f in files if f.resolve() not in seen]
        seen.update(f.resolve() for f in files)
        if at < 0:
            at = len(parts)
        explicit += files
    if explicit:
        parts[at:at] = _array_parts(explicit, True, log)
    return parts


# ------------------------------------------------------------------------------------------------ pixels


def _mode_channels(mode: str) -> int:
    return 1 if mode in _ONE_CHANNEL_MODES or mode.startswith("I;16") else 3


def _to_mode(img, channels: int):
    """A Pillow image as mode L (channels 1) or RGB (3); 16/32-bit and float grey scaled to 8 bits."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a.astype(np.int64) >> 8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    want = "L" if channels == 1 else "RGB"
    if img.mode == want:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(want)


def _resize_crop(img, n: int):
    """Shorter side to ``n`` (bicubic, antialiased when shrinking), then the centre n×n."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (n, n):
        return img
    if w <= h:
        nw, nh = n, max(n, round(h * n / w))
    else:
        nw, nh = max(n, round(w * n / h)), n
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - n) // 2, (nh - n) // 2
    return img.crop((left, top, left + n, top + n))


def _convert_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """(b, H, W, Cs) uint8 → (b, H, W, channels): grey repeated to RGB, alpha dropped, RGB to grey as Pillow
    does (ITU-R 601-2 luma)."""
    from PIL import Image

    cs = a.shape[3]
    if cs in (2, 4):  # LA / RGBA: drop alpha (as Pillow's convert does)
        a = a[..., : cs - 1]
        cs -= 1
    if cs == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=3)
    b, h, w, _ = a.shape
    if a.size == 0:
        return np.zeros((b, h, w, 1), np.uint8)
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(a.reshape(b * h, w, 3)), "RGB").convert("L"))
    return grey.reshape(b, h, w, 1)


def _transform_arrays(a: np.ndarray, channels: int, size: int) -> np.ndarray:
    """An array batch to the target channels and (with ``size``) resized and centre-cropped."""
    from PIL import Image

    a = _convert_channels(a, channels)
    if not size or a.shape[1:3] == (size, size):
        return np.ascontiguousarray(a)
    out = np.empty((a.shape[0], size, size, channels), np.uint8)
    for i in range(a.shape[0]):
        img = Image.fromarray(a[i, :, :, 0] if channels == 1 else a[i], "L" if channels == 1 else "RGB")
        out[i] = np.asarray(_resize_crop(img, size)).reshape(size, size, channels)
    return out


def _unreadable(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not a readable image (an unknown or corrupt image format)"
    return f"not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def _decode_file(path: str, channels: int, size: int, hw: tuple[int, int]) -> tuple:
    """("ok", pixels (H, W, C), sha256, bytes), ("bad", reason, sha256, bytes) or ("size", (w, h), sha256,
    bytes)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "bad", f"cannot read it: {e.strerror or e}", "", 0
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = _to_mode(img, channels)
        if size:
            img = _resize_crop(img, size)
        elif (img.size[1], img.size[0]) != hw:
            return "size", img.size, sha, len(data)
        pixels = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
        return "ok", pixels, sha, len(data)
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBomb)
        return "bad", _unreadable(e), sha, len(data)


@dataclass
class _Job:
    part: int
    start: int
    local: bool  # run in this process (no decoding or resizing to do)
    array: np.ndarray | None = None
    files: list[str] | None = None
    channels: int = 1
    size: int = 0
    hw: tuple[int, int] = (0, 0)


def _run_job(job: _Job) -> tuple:
    """(part, start, pixels (k, H, W, C), positions kept (k,), problems [(position, kind, detail)],
    per file: sha256 and bytes)."""
    if job.array is not None:
        a = _transform_arrays(job.array, job.channels, job.size)
        return job.part, job.start, a, np.arange(len(a)), [], [], []
    h, w = (job.size, job.size) if job.size else job.hw
    out = np.empty((len(job.files), h, w, job.channels), np.uint8)
    kept, problems, shas, sizes = [], [], [], []
    for i, f in enumerate(job.files):
        status, val, sha, nb = _decode_file(f, job.channels, job.size, job.hw)
        shas.append(sha)
        sizes.append(nb)
        if status == "ok":
            out[len(kept)] = val
            kept.append(i)
        else:
            problems.append((i, status, val))
    return job.part, job.start, out[:len(kept)], np.asarray(kept, np.int64), problems, shas, sizes


def _init_child() -> None:  # Ctrl-C and SIGTERM are the main process's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Ready:
    def __init__(self, value: Any):
        self.value = value

    def get(self) -> Any:
        return self.value


class _Pool:
    """Jobs run by ``workers`` processes (or here), results in order, at most ``2 × workers`` in flight."""

    def __init__(self, workers: int, start_method: str | None):
        self.workers, self.pool = workers, None
        if workers > 0:
            if start_method is None:
                fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux"
                start_method = "fork" if fork else "spawn"
            self.pool = multiprocessing.get_context(start_method).Pool(workers, _init_child)

    def map(self, jobs: Iterator[_Job]) -> Iterator[tuple]:
        pending: deque = deque()
        limit = 2 * max(1, self.workers)
        for job in jobs:
            if self.pool is None or job.local:
                pending.append(_Ready(_run_job(job)))
            else:
                pending.append(self.pool.apply_async(_run_job, (job,)))
            while len(pending) >= limit or (pending and isinstance(pending[0], _Ready)):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self, ok: bool = True) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


# ------------------------------------------------------------------------------------------------ writing


class _Collector:
    """The shard writers, labels and train pixel statistics of one prepared directory."""

    def __init__(self, out_dir: Path, hwc: tuple[int, int, int], splits: list[str], labelled: bool,
                 shard_images: int = 0):
        self.out_dir, self.hwc, self.labelled = out_dir, hwc, labelled
        per_image = hwc[0] * hwc[1] * hwc[2]
        self.shard_images = shard_images or max(1, SHARD_BYTES // per_image)
        self.writers = {sp: ShardWriter(out_dir, sp, np.dtype(np.uint8), self.shard_images, unit="images",
                                        suffix=".u8") for sp in splits}
        self.labels: dict[str, list[np.ndarray]] = {sp: [] for sp in splits}
        self.hist = np.zeros((hwc[2], 256), np.int64)

    def add(self, split: str, images: np.ndarray, labels: np.ndarray | None) -> None:
        if not len(images):
            return
        self.writers[split].write(images)
        if self.labelled:
            self.labels[split].append(np.asarray(labels, np.int64))
        if split == "train":
            for ch in range(self.hwc[2]):
                self.hist[ch] += np.bincount(images[..., ch].reshape(-1), minlength=256)

    def stats(self) -> tuple[list[float], list[float]]:
        v = np.arange(256, dtype=np.float64)
        n = np.maximum(self.hist.sum(axis=1), 1).astype(np.float64)
        mean = (self.hist @ v) / n
        var = np.maximum((self.hist @ (v * v)) / n - mean * mean, 0.0)
        return [float(m / 255.0) for m in mean], [float(s / 255.0) for s in np.sqrt(var)]

    def finish(self, classes: list[str]) -> dict[str, Any]:
        splits: dict[str, Any] = {}
        for sp, w in self.writers.items():
            shards = w.close()["shards"]
            info: dict[str, Any] = {"images": w.count, "shards": shards, "labels": None, "class_counts": {}}
            if self.labelled:
                lab = np.concatenate(self.labels[sp]) if self.labels[sp] else np.zeros(0, np.int64)
                name = f"{sp}_labels.npy"
                np.save(self.out_dir / name, lab)
                fsync_file(self.out_dir / name)
                counts = np.bincount(lab, minlength=len(classes))
                info["labels"] = name
                info["class_counts"] = {c: int(k) for c, k in zip(classes, counts)}
            splits[sp] = info
        return splits


def _meta(hwc: tuple[int, int, int], mean: list[float], std: list[float], classes: list[str],
          splits: dict[str, Any], sources: list[dict[str, Any]], skipped: list[dict[str, Any]], licence: str,
          extra: dict[str, Any]) -> dict[str, Any]:
    from pretrain import __version__

    return {"format": FORMAT_VERSION, "kind": KIND, "dtype": "uint8", "tokenizer": None,
            "image": {"height": hwc[0], "width": hwc[1], "channels": hwc[2], "mean": mean, "std": std},
            "classes": list(classes), "splits": splits, "sources": list(sources), "skipped": skipped,
            "licence": licence or None, **extra,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pretrain_version": __version__}


def write_prepared(out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
                   classes: list[str], sources: list[dict] = (), licence: str = "",
                   overwrite: bool = False) -> dict[str, Any]:
    """Write in-memory image arrays as a prepared image directory (the format and the atomic write of
    :func:`prepare_images`): ``splits`` maps a split name ("train" required; "val", "test") to (images
    (N, H, W) or (N, H, W, C) uint8, or floats in [0, 1]; labels (N,) class indices into ``classes``, or
    None when ``classes`` is empty). Returns the meta dict."""
    out = Path(out)
    if "train" not in splits:
        raise DataError(f"write_prepared needs a 'train' split (got {', '.join(splits) or 'none'})")
    check_prepared_out(out, overwrite)
    arrays: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    hwc = None
    for sp, (images, labels) in splits.items():
        a = np.asarray(images)
        n, h, w, c = _image_shape(a.shape, Path(f"split {sp}"))
        if c not in (1, 3):
            raise DataError(f"split {sp}: images must have 1 or 3 channels, got {c}")
        a = _to_uint8(a.reshape(n, h, w, c), Path(f"split {sp}"))
        if hwc is None:
            hwc = (h, w, c)
        elif (h, w, c) != hwc:
            raise DataError(f"split {sp} holds {h}x{w}x{c} images, split {next(iter(splits))} {hwc[0]}x"
                            f"{hwc[1]}x{hwc[2]}: every split must have the same image shape")
        if classes and labels is None:
            raise DataError(f"split {sp} has no labels, but classes were given")
        if not classes and labels is not None:
            raise DataError(f"split {sp} has labels but no classes were given")
        lab = None
        if labels is not None:
            lab = _labels_array(np.asarray(labels), f"split {sp} labels", f"split {sp}", n)
            if lab.size and lab.max() >= len(classes):
                raise DataError(f"split {sp}: label {int(lab.max())} is out of range for {len(classes)} "
                                "classes")
        arrays[sp] = (a, lab)
    order = [sp for sp in SPLIT_ORDER if sp in arrays] + [sp for sp in arrays if sp not in SPLIT_ORDER]
    with writing_prepared(out, overwrite, lambda m: None) as partial:
        col = _Collector(partial, hwc, order, bool(classes))
        for sp in order:
            col.add(sp, *arrays[sp])
        split_info = col.finish(list(classes))
        if split_info["train"]["images"] == 0:
            raise DataError("the train split has no images")
        mean, std = col.stats()
        meta = _meta(hwc, mean, std, classes, split_info, [dict(s) for s in sources], [], licence, {})
        write_json_atomic(partial / META, meta)
    return meta


# ------------------------------------------------------------------------------------------------ prepare


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_image(part: _Part, bad_files: str) -> tuple[int, int, int, Path]:
    """(height, width, channels, path) of the first readable image of a folder part (header only)."""
    from PIL import Image

    for f in part.files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(f) as img:
                    return img.size[1], img.size[0], _mode_channels(img.mode), f
        except Exception as e:
            if bad_files == "error":
                raise DataError(f"{f}: {_unreadable(e)}{SKIP_HINT}") from None
    raise DataError(f"{part.path}: none of its {part.count:,} image files is readable")


def _classes(parts: list[_Part]) -> tuple[list[str], list[np.ndarray | None]]:
    """The class names of the whole input and each part's labels as indices into them."""
    labelled = [p for p in parts if p.labels is not None]
    if not labelled:
        return [], [None] * len(parts)
    if len(labelled) != len(parts):
        a = next(p for p in parts if p.labels is not None)
        b = next(p for p in parts if p.labels is None)
        raise DataError(f"{a.label} is labelled but {b.label} is not: give only labelled or only unlabelled "
                        "inputs (an IDX/.npy images file is labelled by its labels file beside it)")
    named = [p for p in labelled if p.classes is not None]
    if named and len(named) != len(labelled):
        a = named[0]
        b = next(p for p in labelled if p.classes is None)
        raise DataError(f"{a.label} names its classes by folder, {b.label} by number: give inputs of one "
                        "kind")
    if named:
        classes = sorted({c for p in named for c in p.classes})
        pos = {c: i for i, c in enumerate(classes)}
        return classes, [np.asarray([pos[c] for c in p.classes], np.int64)[p.labels] for p in parts]
    k = max(int(p.labels.max()) + 1 if p.labels.size else 0 for p in parts)
    return [str(i) for i in range(k)], [p.labels for p in parts]


def prepare_images(inputs: list[str], out: str | Path, *, image_size: int = 0, channels: int = 0,
                   val_fraction: float = 0.1, bad_files: str = "error", licence: str = "",
                   overwrite: bool = False, workers: int | None = None, seed: int = 0, quiet: bool = False,
                   shard_images: int = 0, start_method: str | None = None,
                   progress_s: float = 30.0) -> dict[str, Any]:
    """Read image ``inputs`` (see the module docstring) and write ``out``: shards, labels and meta.json.

    ``image_size``: resize (shorter side) and centre-crop every image to N×N (0: keep sizes, which must then
    agree). ``channels``: 1 or 3 (0: those of the first image). ``val_fraction``: the share of train carved
    into "val" (seeded by ``seed``) when the source has no val split. ``bad_files``: "error" or "skip"
    (undecodable images skipped with a warning, counted in meta.json "skipped"). ``workers``: decoding
    processes (0: this process; None: one per CPU when there are at least 2,000 images to decode or resize).
    ``shard_images``: images per shard file (0: about 256 MiB of pixels). ``start_method``: how workers start
    (default fork on Linux; the CLI uses spawn). Returns a summary (the meta dict is in ``out``/meta.json).
    """
    t0 = time.time()
    out = Path(out)
    log = (lambda m: None) if quiet else _stderr
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if bad_files not in ("error", "skip"):
        raise DataError(f"bad_files must be 'error' or 'skip', got {bad_files!r}")
    if image_size < 0:
        raise DataError(f"image_size must be >= 1 (0: keep the images' size), got {image_size}")
    if channels not in (0, 1, 3):
        raise DataError(f"channels must be 1 or 3 (0: those of the first image), got {channels}")
    if workers is not None and workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    if shard_images < 0:
        raise DataError(f"shard_images must be >= 1 (0: about 256 MiB per shard), got {shard_images}")
    check_prepared_out(out, overwrite)
    exclude = [p.resolve() for p in (out, out.parent / f".{out.name}.partial",
                                     out.parent / f".{out.name}.old")]
    parts = _plan(inputs, exclude, log)
    if not parts:
        raise DataError("no image data found in the inputs")
    if sum(p.count for p in parts) == 0:
        raise DataError("the inputs hold zero images")
    classes, part_labels = _classes(parts)

    # the target geometry: that of the first part (its first readable image for a folder), or forced
    first = parts[0]
    if first.fmt == "folder":
        fh, fw, fc, first_path = _first_image(first, bad_files)
        first_label = str(first_path)
    else:
        (fh, fw), fc, first_label = first.hw, {1: 1, 2: 1, 3: 3, 4: 3}[first.channels], first.label
    c = channels or fc
    ref_hw = (fh, fw)
    h, w = (image_size, image_size) if image_size else ref_hw
    if not image_size:
        for p in parts:
            if p.hw is not None and p.hw != ref_hw:
                raise DataError(f"{p.label} holds {p.hw[1]}x{p.hw[0]} images but {first_label} is {fw}x{fh} "
                                "(width x height): images differ in size; pass --image-size N to resize and "
                                "centre-crop every image to NxN")

    # splits: the source's; without a val split, carve one from train (a seeded random val_fraction)
    present = {p.split for p in parts}
    carve = "val" not in present and val_fraction > 0
    n_train = sum(p.count for p in parts if p.split == "train")
    if n_train == 0:
        raise DataError("no training images: every input is a " + "/".join(sorted(present)) + " split "
                        "(files named t10k*/test* are test data); add the training images")
    val_mask = np.zeros(n_train, np.bool_)
    if carve:
        n_val = min(max(round(n_train * val_fraction), 1), n_train - 1) if n_train > 1 else 0
        val_mask[np.random.default_rng(seed).permutation(n_train)[:n_val]] = True
    train_offset, off = [], 0
    for p in parts:
        train_offset.append(off)
        off += p.count if p.split == "train" else 0
    splits = [sp for sp in SPLIT_ORDER if sp in present or sp == "val"]

    def needs_work(p: _Part) -> bool:
        return p.fmt == "folder" or bool(image_size and p.hw != (image_size, image_size))

    work = sum(p.count for p in parts if needs_work(p))
    if workers is None:
        workers = _usable_cpus() if _usable_cpus() > 1 and work >= AUTO_WORKERS_IMAGES else 0
    per_image = max(1, max(fh * fw, h * w) * max(c, fc))

    def jobs() -> Iterator[_Job]:
        for i, p in enumerate(parts):
            if p.fmt == "folder":
                step = max(1, min(JOB_FILES, JOB_BYTES // per_image))
                for s in range(0, p.count, step):
                    yield _Job(i, s, False, files=[str(f) for f in p.files[s:s + step]], channels=c,
                               size=image_size, hw=ref_hw)
            else:
                local = not needs_work(p)
                step = max(1, (ARRAY_BATCH_BYTES if local else JOB_BYTES) // per_image)
                s = 0
                for a in p.batches(step):
                    yield _Job(i, s, local, array=a, channels=c, size=image_size)
                    s += len(a)

    sources: list[dict[str, Any]] = []
    for p in parts:
        for s in p.sources:
            if not any(s is t for t in sources):
                sources.append(s)
    folder_hash = {id(p.source): hashlib.sha256() for p in parts if p.fmt == "folder"}
    skipped: list[dict[str, Any]] = []
    done = 0
    t_log = time.time()
    log(f"preparing {sum(p.count for p in parts):,} images from {len(sources)} "
        f"{'source' if len(sources) == 1 else 'sources'} as {h}x{w}x{c}"
        + (f" ({workers} worker processes)" if workers else ""))
    pool: _Pool | None = None
    try:
        with writing_prepared(out, overwrite, log) as partial:
            col = _Collector(partial, (h, w, c), splits, bool(classes), shard_images)
            pool = _Pool(workers, start_method)
            for pi, start, imgs, kept, problems, shas, _ in pool.map(jobs()):
                p = parts[pi]
                for pos, kind, detail in problems:
                    f = p.files[start + pos]
                    if kind == "size":
                        raise DataError(f"{f} is {detail[0]}x{detail[1]} but {first_label} is {fw}x{fh} "
                                        "(width x height): images differ in size; pass --image-size N to "
                                        "resize and centre-crop every image to NxN")
                    if bad_files == "error":
                        raise DataError(f"{f}: {detail}{SKIP_HINT}")
                    warnings.warn(f"skipping {f}: {detail}", stacklevel=2)
                    skipped.append({"path": str(f), "reason": detail})
                if p.fmt == "folder":
                    hsh = folder_hash[id(p.source)]
                    for j, sha in enumerate(shas):
                        rel = p.files[start + j].relative_to(p.root).as_posix()
                        hsh.update(f"{rel}\t{sha}\n".encode())
                idx = start + kept
                labels = part_labels[pi][idx] if part_labels[pi] is not None else None
                p.source["images"] += len(kept)
                if p.split == "train":
                    to_val = val_mask[train_offset[pi] + idx]
                    col.add("val", imgs[to_val], None if labels is None else labels[to_val])
                    col.add("train", imgs[~to_val], None if labels is None else labels[~to_val])
                else:
                    col.add(p.split, imgs, labels)
                done += len(kept)
                if progress_s and time.time() - t_log >= progress_s:
                    t_log = time.time()
                    log(f"prepared {done:,} images ({done / (t_log - t0):,.0f} images/s)")
            pool.close()
            if done == 0:
                raise DataError(f"no images left: all {len(skipped):,} were skipped as unreadable")
            split_info = col.finish(classes)
            if split_info["train"]["images"] == 0:
                raise DataError("the train split has no images (every training image was skipped)")
            mean, std = col.stats()
            for s in sources:
                if s["format"] == "folder":
                    s["sha256"] = folder_hash[id(s)].hexdigest()
                else:
                    s["sha256"], s["bytes"] = sha256_file(Path(s["path"])), Path(s["path"]).stat().st_size
                s["licence"] = licence or None
            extra = {"val_fraction": val_fraction if carve else None,
                     "split_rule": f"carved: seeded random val_fraction of train (seed {seed})" if carve
                     else "source",
                     "settings": {"image_size": image_size, "channels": channels, "seed": seed,
                                  "bad_files": bad_files, "shard_images": col.shard_images,
                                  "workers": workers},
                     "seconds": round(time.time() - t0, 3)}
            meta = _meta((h, w, c), mean, std, classes, split_info, sources, skipped, licence, extra)
            write_json_atomic(partial / META, meta)
    except BaseException:
        if pool is not None:
            pool.close(ok=False)
        raise
    for sp, info in split_info.items():
        log(f"{sp}: {info['images']:,} images in {len(info['shards'])} "
            f"{'shard' if len(info['shards']) == 1 else 'shards'}")
    return {"out": str(out), "kind": KIND, "height": h, "width": w, "channels": c, "classes": len(classes),
            "images": {sp: info["images"] for sp, info in split_info.items()},
            "train_images": split_info["train"]["images"], "val_images": split_info["val"]["images"],
            "test_images": split_info["test"]["images"] if "test" in split_info else None,
            "skipped": len(skipped), "mean": mean, "std": std, "seconds": meta["seconds"]}


# ------------------------------------------------------------------------------------------------ reading


def image_identity(meta: dict[str, Any]) -> str:
    """A short sha256 of what a model trained on the data depends on: image height, width, channels, the
    normalisation mean and std, and the class names (for images what the tokenizer's sha is for text)."""
    im = meta["image"]
    ident = {"height": int(im["height"]), "width": int(im["width"]), "channels": int(im["channels"]),
             "mean": [float(v) for v in im["mean"]], "std": [float(v) for v in im["std"]],
             "classes": list(meta.get("classes") or [])}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class ImageSplit:
    """The memory-mapped shards (and labels) of one split of a prepared image directory.

    ``count`` images of ``height`` × ``width`` × ``channels`` uint8; ``labels`` int64 class indices into
    ``classes`` (None when unlabelled); ``mean`` / ``std`` the per-channel train statistics in [0, 1].
    :meth:`images` gathers any images by index across shards."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir, kind=KIND)
        splits = self.meta["splits"]
        if split not in splits:
            raise DataError(f"{self.data_dir} has no {split!r} split (it has {', '.join(splits)})")
        self.split = split
        im = self.meta["image"]
        self.height, self.width, self.channels = int(im["height"]), int(im["width"]), int(im["channels"])
        self.mean, self.std = [float(v) for v in im["mean"]], [float(v) for v in im["std"]]
        self.classes = list(self.meta.get("classes") or [])
        info = splits[split]
        per_image = self.height * self.width * self.channels
        self.shards: list[np.memmap] = []
        starts = [0]
        for sh in info["shards"]:
            p = self.data_dir / sh["file"]
            if not p.is_file():
                raise DataError(f"missing shard {p} (the data directory is incomplete; run `pretrain "
                                "prepare` again)")
            expected = int(sh["images"]) * per_image
            if p.stat().st_size != expected:
                raise DataError(f"shard {p} has {p.stat().st_size:,} bytes, meta.json says {expected:,}: the "
                                "data directory is corrupt; run `pretrain prepare` again")
            if sh["images"]:
                shape = (int(sh["images"]), self.height, self.width, self.channels)
                self.shards.append(np.memmap(p, dtype=np.uint8, mode="r", shape=shape))
                starts.append(starts[-1] + int(sh["images"]))
        self._starts = np.asarray(starts, np.int64)
        self.count = int(self._starts[-1])
        if self.count != int(info["images"]):
            raise DataError(f"{self.data_dir}: the {split} shards hold {self.count:,} images, meta.json says "
                            f"{int(info['images']):,}; run `pretrain prepare` again")
        self.labels: np.ndarray | None = None
        if info.get("labels"):
            p = self.data_dir / info["labels"]
            try:
                lab = np.load(p, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"labels {p} are missing or corrupt ({e}); run `pretrain prepare` "
                                "again") from None
            if lab.shape != (self.count,):
                raise DataError(f"labels {p} hold {lab.shape} values for {self.count:,} images: the data "
                                "directory is corrupt; run `pretrain prepare` again")
            self.labels = lab.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return self.count

    def images(self, index: np.ndarray) -> np.ndarray:
        """Images ``index`` (k,) as (k, H, W, C) uint8, gathered across shards (any order, repeats
        allowed)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.height, self.width, self.channels), np.uint8)
        if not len(idx):
            return out
        if idx.min() < 0 or idx.max() >= self.count:
            bad = int(idx[(idx < 0) | (idx >= self.count)][0])
            raise IndexError(f"image index {bad} out of range for the {self.split} split of {self.count:,}")
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k][idx[sel] - self._starts[k]]
        return out
