"""Image data: every input format (IDX raw and gzip'ed, npz, npy, folders of PNG / BMP / WebP / JPEG) prepared
to the same pixels, labels, class counts and statistics; resizing, channel conversion, the carved validation
split; one clear error naming the file for each kind of bad input; --bad-files skip; the overwrite rule; the
reader (ImageSplit) and its checks; the CLI end to end."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.cli import main
from pretrain.data.images import (
    ImageSplit,
    image_identity,
    is_image_input,
    prepare_images,
    write_prepared,
)
from pretrain.data.manifest import data_fingerprint, load_meta
from pretrain.data.sources import DataError


def _pixels(n: int = 20, h: int = 8, w: int = 8, c: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w) + ((c,) if c else ()), dtype=np.uint8)


def _write_idx(path: Path, a: np.ndarray) -> Path:
    data = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _all(split: ImageSplit) -> np.ndarray:
    return split.images(np.arange(len(split)))


def _train_and_val(out: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Train and val back together in source order (carving keeps the order within each split)."""
    tr, va = ImageSplit(out, "train"), ImageSplit(out, "val")
    x = np.concatenate([_all(tr), _all(va)])
    y = None if tr.labels is None else np.concatenate([tr.labels, va.labels])
    return x, y


def _same_set(prepared: np.ndarray, labels: np.ndarray | None, src: np.ndarray, src_labels) -> None:
    """The prepared images (and labels) are the source ones, in some order."""
    key = [bytes(a) for a in prepared]
    ref = [bytes(a) for a in src]
    assert sorted(key) == sorted(ref)
    if labels is not None:
        got = dict(zip(key, labels.tolist()))
        assert all(got[k] == int(v) for k, v in zip(ref, src_labels))


def _folder(root: Path, arrays: dict[str, np.ndarray], ext: str = "png", **save) -> Path:
    """root/CLASS/00.EXT ... (arrays: class → (n, H, W[, C])); class "" → images directly in root."""
    for cls, imgs in arrays.items():
        d = root / cls if cls else root
        d.mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(d / f"{i:02d}.{ext}", **save)
    return root


# ==================================================================================================== formats


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_with_labels_and_a_test_split(tmp_path, gz):
    x, y = _pixels(20), np.arange(20, dtype=np.uint8) % 3
    xt, yt = _pixels(6, seed=1), np.array([0, 1, 2, 2, 1, 0], np.uint8)
    sfx = ".gz" if gz else ""
    src = tmp_path / "src"
    src.mkdir()
    _write_idx(src / f"train-images-idx3-ubyte{sfx}", x)
    _write_idx(src / f"train-labels-idx1-ubyte{sfx}", y)
    _write_idx(src / f"t10k-images-idx3-ubyte{sfx}", xt)
    _write_idx(src / f"t10k-labels-idx1-ubyte{sfx}", yt)
    (src / "README.txt").write_text("about the data\n")
    assert is_image_input(src)
    res = prepare_images([str(src)], tmp_path / "out", val_fraction=0.25, quiet=True)
    assert res["images"] == {"train": 15, "val": 5, "test": 6}
    meta = load_meta(tmp_path / "out")
    assert meta["kind"] == "images" and meta["tokenizer"] is None and meta["dtype"] == "uint8"
    assert meta["image"]["height"] == meta["image"]["width"] == 8 and meta["image"]["channels"] == 1
    assert meta["classes"] == ["0", "1", "2"]
    assert {s["format"] for s in meta["sources"]} == {"idx"} and len(meta["sources"]) == 4
    test = ImageSplit(tmp_path / "out", "test")
    assert np.array_equal(_all(test)[..., 0], xt) and test.labels.tolist() == yt.tolist()
    both, labels = _train_and_val(tmp_path / "out")
    _same_set(both[..., 0], labels, x, y)
    tr = ImageSplit(tmp_path / "out", "train")
    assert meta["splits"]["train"]["class_counts"] == {str(k): int((tr.labels == k).sum()) for k in range(3)}


@pytest.mark.parametrize("labels_first", [False, True])
def test_idx_images_and_labels_files_named_one_by_one_pair_up(tmp_path, labels_first):
    x, y = _pixels(10), np.arange(10, dtype=np.uint8) % 2
    f = _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    lf = _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    prepare_images([str(lf), str(f)] if labels_first else [str(f), str(lf)], tmp_path / "out",
                   val_fraction=0.2, quiet=True)
    both, labels = _train_and_val(tmp_path / "out")
    _same_set(both[..., 0], labels, x, y)


def test_idx_files_named_one_by_one_and_unlabelled(tmp_path):
    x = _pixels(10)
    f = _write_idx(tmp_path / "imgs-idx3-ubyte", x)
    assert is_image_input(f)
    prepare_images([str(f)], tmp_path / "out", val_fraction=0.2, quiet=True)
    meta = load_meta(tmp_path / "out")
    assert meta["classes"] == [] and meta["splits"]["train"]["labels"] is None
    assert meta["splits"]["train"]["class_counts"] == {}
    both, labels = _train_and_val(tmp_path / "out")
    assert labels is None
    _same_set(both[..., 0], None, x, None)


def test_npz_medmnist_layout_keeps_its_splits(tmp_path):
    x, xv, xt = _pixels(12, c=3), _pixels(4, c=3, seed=1), _pixels(5, c=3, seed=2)
    y, yv, yt = (np.arange(12) % 2)[:, None], np.array([[0], [1], [1], [0]]), np.array([[1]] * 5)
    f = tmp_path / "med.npz"
    np.savez_compressed(f, train_images=x, train_labels=y.astype(np.uint8), val_images=xv,
                        val_labels=yv.astype(np.uint8), test_images=xt, test_labels=yt.astype(np.uint8))
    res = prepare_images([str(f)], tmp_path / "out", quiet=True)
    assert res["images"] == {"train": 12, "val": 4, "test": 5} and res["channels"] == 3
    for split, a, lab in (("train", x, y), ("val", xv, yv), ("test", xt, yt)):
        s = ImageSplit(tmp_path / "out", split)
        assert np.array_equal(_all(s), a) and s.labels.tolist() == lab[:, 0].tolist()
        assert s.labels.dtype == np.int64
    meta = load_meta(tmp_path / "out")
    assert meta["classes"] == ["0", "1"] and meta["split_rule"] == "source"
    mean = x.reshape(-1, 3).mean(axis=0) / 255
    std = x.reshape(-1, 3).std(axis=0) / 255
    assert np.allclose(meta["image"]["mean"], mean, atol=1e-9) and np.allclose(meta["image"]["std"], std)


def test_npy_unlabelled_labelled_and_float(tmp_path):
    x = _pixels(10, c=3)
    np.save(tmp_path / "a.npy", x)
    prepare_images([str(tmp_path / "a.npy")], tmp_path / "o1", val_fraction=0.0, quiet=True)
    assert np.array_equal(_all(ImageSplit(tmp_path / "o1", "train")), x)
    assert len(ImageSplit(tmp_path / "o1", "val")) == 0
    y = np.arange(10) % 4
    np.save(tmp_path / "b_images.npy", (x / 255.0).astype(np.float32))  # floats in [0, 1]
    np.save(tmp_path / "b_labels.npy", y)
    assert is_image_input(tmp_path / "b_images.npy")
    prepare_images([str(tmp_path / "b_images.npy")], tmp_path / "o2", val_fraction=0.0, quiet=True)
    s = ImageSplit(tmp_path / "o2", "train")
    assert np.array_equal(_all(s), x) and s.labels.tolist() == y.tolist() and s.classes == list("0123")


@pytest.mark.parametrize("ext,save", [("png", {}), ("bmp", {}), ("webp", {"lossless": True})])
def test_labelled_folders_round_trip(tmp_path, ext, save):
    cats, dogs = _pixels(5, c=3), _pixels(3, c=3, seed=1)
    root = _folder(tmp_path / "pets", {"dog": dogs, "cat": cats}, ext, **save)
    (root / "notes.txt").write_text("not an image")
    assert is_image_input(root)
    res = prepare_images([str(root)], tmp_path / "out", val_fraction=0.0, quiet=True, workers=0)
    assert res["channels"] == 3 and res["classes"] == 2
    s = ImageSplit(tmp_path / "out", "train")
    assert s.classes == ["cat", "dog"]  # sorted folder names
    assert np.array_equal(_all(s), np.concatenate([cats, dogs])) and s.labels.tolist() == [0] * 5 + [1] * 3
    meta = load_meta(tmp_path / "out")
    assert meta["splits"]["train"]["class_counts"] == {"cat": 5, "dog": 3}
    assert meta["sources"][0]["format"] == "folder" and meta["sources"][0]["images"] == 8
    assert len(meta["sources"][0]["sha256"]) == 64


def test_jpeg_matches_pillows_own_decode_and_grey_stays_one_channel(tmp_path):
    a = _pixels(4, 16, 16)  # grey
    root = _folder(tmp_path / "jpg", {"": a}, "jpg", quality=80)
    prepare_images([str(root)], tmp_path / "out", val_fraction=0.0, quiet=True)
    s = ImageSplit(tmp_path / "out", "train")
    assert s.channels == 1 and s.labels is None and s.classes == []
    ref = np.stack([np.asarray(Image.open(root / f"{i:02d}.jpg").convert("L")) for i in range(4)])
    assert np.array_equal(_all(s)[..., 0], ref)


def test_channels_forced(tmp_path):
    grey, rgb = _pixels(3), _pixels(3, c=3, seed=1)
    g = _folder(tmp_path / "g", {"": grey})
    r = _folder(tmp_path / "r", {"": rgb})
    prepare_images([str(g)], tmp_path / "o3", channels=3, val_fraction=0.0, quiet=True)
    assert np.array_equal(_all(ImageSplit(tmp_path / "o3", "train")), np.repeat(grey[..., None], 3, axis=3))
    prepare_images([str(r)], tmp_path / "o1", channels=1, val_fraction=0.0, quiet=True)
    ref = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])
    assert np.array_equal(_all(ImageSplit(tmp_path / "o1", "train"))[..., 0], ref)
    # arrays convert the same way
    np.save(tmp_path / "rgb.npy", rgb)
    prepare_images([str(tmp_path / "rgb.npy")], tmp_path / "o1n", channels=1, val_fraction=0.0, quiet=True)
    assert np.array_equal(_all(ImageSplit(tmp_path / "o1n", "train"))[..., 0], ref)


def test_image_size_resizes_the_shorter_side_and_centre_crops(tmp_path):
    wide = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)  # H 12, W 20
    tall = np.random.default_rng(1).integers(0, 256, (30, 10, 3), dtype=np.uint8)
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(wide).save(root / "a.png")
    Image.fromarray(tall).save(root / "b.png")
    with pytest.raises(DataError, match=r"b\.png.*--image-size"):
        prepare_images([str(root)], tmp_path / "no", val_fraction=0.0, quiet=True)
    assert not (tmp_path / "no").exists()
    prepare_images([str(root)], tmp_path / "out", image_size=6, val_fraction=0.0, quiet=True)
    s = ImageSplit(tmp_path / "out", "train")
    assert (s.height, s.width, s.channels) == (6, 6, 3)
    ref_a = Image.fromarray(wide).resize((10, 6), Image.Resampling.BICUBIC).crop((2, 0, 8, 6))
    ref_b = Image.fromarray(tall).resize((6, 18), Image.Resampling.BICUBIC).crop((0, 6, 6, 12))
    assert np.array_equal(_all(s), np.stack([np.asarray(ref_a), np.asarray(ref_b)]))
    # arrays are resized the same way
    np.save(tmp_path / "w.npy", wide[None])
    prepare_images([str(tmp_path / "w.npy")], tmp_path / "outn", image_size=6, val_fraction=0.0, quiet=True)
    assert np.array_equal(_all(ImageSplit(tmp_path / "outn", "train"))[0], np.asarray(ref_a))


def test_split_folders(tmp_path):
    root = tmp_path / "ds"
    _folder(root / "train", {"a": _pixels(4), "b": _pixels(2, seed=1)})
    _folder(root / "val", {"b": _pixels(2, seed=2)})
    _folder(root / "test", {"a": _pixels(1, seed=3), "c": _pixels(1, seed=4)})
    res = prepare_images([str(root)], tmp_path / "out", quiet=True)
    assert res["images"] == {"train": 6, "val": 2, "test": 2}
    meta = load_meta(tmp_path / "out")
    assert meta["classes"] == ["a", "b", "c"]
    assert ImageSplit(tmp_path / "out", "val").labels.tolist() == [1, 1]
    assert ImageSplit(tmp_path / "out", "test").labels.tolist() == [0, 2]
    assert meta["splits"]["train"]["class_counts"] == {"a": 4, "b": 2, "c": 0}


def test_val_carving_is_seeded_and_deterministic(tmp_path):
    x = _pixels(40)
    np.save(tmp_path / "x.npy", x)

    def val(seed: int, name: str) -> np.ndarray:
        prepare_images([str(tmp_path / "x.npy")], tmp_path / name, val_fraction=0.2, seed=seed, quiet=True)
        return _all(ImageSplit(tmp_path / name, "val"))

    a, b, c = val(0, "a"), val(0, "b"), val(1, "c")
    assert len(a) == 8 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (tmp_path / "a" / "val_000000.u8").read_bytes() == (tmp_path / "b" / "val_000000.u8").read_bytes()
    assert len(ImageSplit(tmp_path / "a", "train")) == 32


def test_shards_and_gather_across_them_and_parallel_decode(tmp_path):
    x = _pixels(23, c=3)
    root = _folder(tmp_path / "f", {"": x})
    prepare_images([str(root)], tmp_path / "o0", val_fraction=0.0, shard_images=5, workers=0, quiet=True)
    prepare_images([str(root)], tmp_path / "o2", val_fraction=0.0, shard_images=5, workers=2, quiet=True)
    for name in ("o0", "o2"):
        meta = load_meta(tmp_path / name)
        assert [s["images"] for s in meta["splits"]["train"]["shards"]] == [5, 5, 5, 5, 3]
    assert all((tmp_path / "o0" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes()
               for f in ("train_000000.u8", "train_000004.u8"))
    s = ImageSplit(tmp_path / "o2", "train")
    idx = np.array([22, 0, 7, 7, 14, 3])
    assert np.array_equal(s.images(idx), x[idx])
    with pytest.raises(IndexError):
        s.images(np.array([23]))


# ================================================================================================= bad input


def _prep_error(tmp_path, inputs, match, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as e:
        prepare_images([str(i) for i in inputs], tmp_path / "out", quiet=True, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    return e.value


def test_corrupt_images_name_the_file(tmp_path):
    root = _folder(tmp_path / "t", {"": _pixels(3, c=3)})
    data = (root / "01.png").read_bytes()
    (root / "01.png").write_bytes(data[: len(data) // 2])  # truncated
    _prep_error(tmp_path, [root], r"01\.png.*--bad-files skip")
    root2 = _folder(tmp_path / "g", {"": _pixels(3, c=3)})
    (root2 / "02.png").write_bytes(b"this is not a png at all" * 10)
    _prep_error(tmp_path, [root2], r"02\.png")


def test_bad_files_skip_counts_and_warns(tmp_path):
    root = _folder(tmp_path / "t", {"a": _pixels(4, c=3), "b": _pixels(4, c=3, seed=1)})
    (root / "a" / "01.png").write_bytes(b"garbage")
    (root / "b" / "03.png").write_bytes((root / "b" / "02.png").read_bytes()[:60])
    with pytest.warns(UserWarning, match="skipping"):
        res = prepare_images([str(root)], tmp_path / "out", bad_files="skip", val_fraction=0.0, quiet=True)
    assert res["skipped"] == 2 and res["images"]["train"] == 6
    meta = load_meta(tmp_path / "out")
    assert sorted(Path(s["path"]).name for s in meta["skipped"]) == ["01.png", "03.png"]
    assert meta["splits"]["train"]["class_counts"] == {"a": 3, "b": 3}
    assert ImageSplit(tmp_path / "out", "train").labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_arrays_name_the_file(tmp_path):
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x07" + b"\x00" * 40)
    _prep_error(tmp_path, [tmp_path / "bad-images-idx3-ubyte"], r"bad-images-idx3-ubyte.*not an IDX")
    f = _write_idx(tmp_path / "short-images-idx3-ubyte", _pixels(5))
    f.write_bytes(f.read_bytes()[:-10])
    _prep_error(tmp_path, [f], r"short-images-idx3-ubyte.*truncated")
    g = _write_idx(tmp_path / "gz-images-idx3-ubyte.gz", _pixels(5))
    g.write_bytes(gzip.compress(gzip.decompress(g.read_bytes())[:-10]))
    _prep_error(tmp_path, [g], r"gz-images-idx3-ubyte\.gz.*truncated")
    np.savez(tmp_path / "odd.npz", pictures=_pixels(3), targets=np.zeros(3))
    e = _prep_error(tmp_path, [tmp_path / "odd.npz"], r"odd\.npz.*train_images")
    assert "keys present: pictures, targets" in str(e)
    np.savez(tmp_path / "len.npz", train_images=_pixels(5), train_labels=np.zeros(4, np.uint8))
    _prep_error(tmp_path, [tmp_path / "len.npz"], r"len\.npz.*5 images.*4 labels")
    _write_idx(tmp_path / "m-images-idx3-ubyte", _pixels(5))
    _write_idx(tmp_path / "m-labels-idx1-ubyte", np.zeros(6, np.uint8))
    _prep_error(tmp_path, [tmp_path / "m-images-idx3-ubyte"], r"m-images-idx3-ubyte has 5 images.*6 labels")
    np.save(tmp_path / "a.npy", _pixels(3, 8, 8))
    np.save(tmp_path / "b.npy", _pixels(3, 9, 9))
    _prep_error(tmp_path, [tmp_path / "a.npy", tmp_path / "b.npy"], r"b\.npy.*differ in size.*--image-size")
    np.save(tmp_path / "f.npy", np.full((2, 4, 4), 3.0))
    _prep_error(tmp_path, [tmp_path / "f.npy"], r"f\.npy.*\[0, 1\]")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    _prep_error(tmp_path, [tmp_path / "empty"], r"empty holds no images")
    np.save(tmp_path / "zero.npy", np.zeros((0, 4, 4), np.uint8))
    _prep_error(tmp_path, [tmp_path / "zero.npy"], "zero images")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", _pixels(3))
    _prep_error(tmp_path, [tmp_path / "t10k-images-idx3-ubyte"], "no training images")
    _prep_error(tmp_path, [tmp_path / "missing.npz"], "input not found")


def test_overwrite_protection(tmp_path):
    np.save(tmp_path / "x.npy", _pixels(6))
    np.save(tmp_path / "y.npy", _pixels(6, seed=1))
    prepare_images([str(tmp_path / "x.npy")], tmp_path / "out", val_fraction=0.0, quiet=True)
    before = (tmp_path / "out" / "train_000000.u8").read_bytes()
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_images([str(tmp_path / "y.npy")], tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "train_000000.u8").read_bytes() == before
    prepare_images([str(tmp_path / "y.npy")], tmp_path / "out", val_fraction=0.0, overwrite=True, quiet=True)
    assert (tmp_path / "out" / "train_000000.u8").read_bytes() != before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared data directory"):
        prepare_images([str(tmp_path / "x.npy")], other, overwrite=True, quiet=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock/partial/old left


# ===================================================================================================== reader


def test_write_prepared_reader_and_identity(tmp_path):
    x, xv = _pixels(10, c=3), _pixels(4, c=3, seed=1)
    splits = {"train": (x, np.arange(10) % 2), "val": (xv, np.array([0, 1, 1, 0]))}
    meta = write_prepared(tmp_path / "d", splits, ["no", "yes"], sources=[{"path": "digits", "sha256": "x"}],
                          licence="CC0")
    assert meta == load_meta(tmp_path / "d")
    tr = ImageSplit(tmp_path / "d", "train")
    assert np.array_equal(_all(tr), x) and tr.classes == ["no", "yes"] and len(tr) == tr.count == 10
    assert meta["splits"]["val"]["class_counts"] == {"no": 2, "yes": 2}
    assert np.allclose(tr.mean, x.reshape(-1, 3).mean(0) / 255)
    assert np.allclose(tr.std, x.reshape(-1, 3).std(0) / 255)
    ident = image_identity(meta)
    assert len(ident) == 16 and ident == image_identity(json.loads(json.dumps(meta)))
    assert image_identity({**meta, "classes": ["a", "b"]}) != ident
    assert len(data_fingerprint(meta)) == 16
    with pytest.raises(DataError, match=r"no 'test' split \(it has train, val\)"):
        ImageSplit(tmp_path / "d", "test")
    with pytest.raises(DataError, match="already holds"):
        write_prepared(tmp_path / "d", {"train": (x, None)}, [])
    write_prepared(tmp_path / "d", {"train": (x[..., :1], None)}, [], overwrite=True)
    assert ImageSplit(tmp_path / "d", "train").labels is None


def test_reader_refuses_a_truncated_shard_or_labels(tmp_path):
    write_prepared(tmp_path / "d", {"train": (_pixels(6), np.zeros(6, int))}, ["only"])
    shard = tmp_path / "d" / "train_000000.u8"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(DataError, match="run `pretrain prepare` again"):
        ImageSplit(tmp_path / "d", "train")
    write_prepared(tmp_path / "e", {"train": (_pixels(6), np.zeros(6, int))}, ["only"])
    np.save(tmp_path / "e" / "train_labels.npy", np.zeros(5, np.int64))
    with pytest.raises(DataError, match="corrupt"):
        ImageSplit(tmp_path / "e", "train")


def test_load_meta_kinds(tmp_path):
    write_prepared(tmp_path / "d", {"train": (_pixels(3), None)}, [])
    assert load_meta(tmp_path / "d", kind="images")["kind"] == "images"
    with pytest.raises(DataError, match="holds images, not text"):
        load_meta(tmp_path / "d", kind="text")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    del meta["image"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="expected keys image, dtype, splits"):
        load_meta(tmp_path / "d")


def test_is_image_input(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    assert not is_image_input(tmp_path / "a.txt") and not is_image_input(tmp_path / "b.jsonl.gz")
    assert not is_image_input(tmp_path) and not is_image_input("hf:wikitext") and not is_image_input("x.txt")
    assert is_image_input(tmp_path / "missing.npz")
    _folder(tmp_path / "imgs", {"": _pixels(2)})
    assert is_image_input(tmp_path / "imgs")
    _write_idx(tmp_path / "data.bin", _pixels(2))  # by its magic number
    assert is_image_input(tmp_path / "data.bin")


# ======================================================================================================== CLI


def test_cli_end_to_end(tmp_path, capsys):
    root = _folder(tmp_path / "pets", {"cat": _pixels(6, c=3), "dog": _pixels(6, c=3, seed=1)})
    out = tmp_path / "data"
    assert main(["prepare", str(root), "--out", str(out), "--image-size", "4", "--val-fraction", "0.25",
                 "--workers", "0", "--licence", "CC0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "images" and res["images"] == {"train": 9, "val": 3} and res["classes"] == 2
    assert (res["height"], res["width"], res["channels"]) == (4, 4, 3)
    meta = load_meta(out)
    assert meta["licence"] == "CC0" and meta["sources"][0]["licence"] == "CC0"
    assert main(["data", "inspect", str(out), "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert ins["splits"]["val"]["images"] == 3 and ins["classes"] == ["cat", "dog"]
    assert main(["data", "inspect", str(out)]) == 0
    assert "4x4x3" in capsys.readouterr().out
    # one error line each: existing output, text-only flags, mixed inputs, a bad image
    assert main(["prepare", str(root), "--out", str(out)]) == 2
    assert "already holds prepared data" in capsys.readouterr().err
    assert main(["prepare", str(root), "--out", str(tmp_path / "o2"), "--tokenizer", "byte"]) == 2
    assert "--tokenizer applies to text inputs only" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("some text\n")
    assert main(["prepare", str(root), str(tmp_path / "t.txt"), "--out", str(tmp_path / "o3")]) == 2
    assert "is image data but" in capsys.readouterr().err
    (root / "cat" / "00.png").write_bytes(b"broken")
    assert main(["prepare", str(root), "--out", str(tmp_path / "o4"), "--image-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "00.png" in err[0]
    with pytest.warns(UserWarning, match=r"skipping .*00\.png: not a readable image"):
        assert main(["prepare", str(root), "--out", str(tmp_path / "o4"), "--image-size", "4", "--bad-files",
                     "skip", "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1
