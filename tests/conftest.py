"""Shared fixtures and helpers for the test suite.

Everything is generated under pytest's ``tmp_path`` (no network, no data outside the test's own folder)
and is small: the whole suite runs in a few minutes on 2 CPU cores, `-m "not slow"` in about one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import _docs, _jsonl

from pretrain.config import ModelConfig
from pretrain.data.prepare import prepare

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more time can out up "
    "into only about like other could some king queen river stone light night morning garden window letter"
).split()


def make_text(n_words: int = 200, seed: int = 0) -> str:
    """Deterministic English-like prose: ``n_words`` words in capitalised sentences and short paragraphs."""
    rng = random.Random(seed)
    out: list[str] = []
    sentence: list[str] = []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(5, 12):
            s = " ".join(sentence)
            out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ","]))
            sentence = []
            if rng.random() < 0.2:
                out.append("\n\n")
    if sentence:
        out.append(" ".join(sentence) + ".")
    text = " ".join(out).replace(" \n\n ", "\n\n")
    return text.strip() + "\n"


def quiet(*_args, **_kwargs) -> None:
    """A ``log`` that prints nothing."""


@pytest.fixture
def text_factory() -> Callable[..., str]:
    """The :func:`make_text` generator: ``text_factory(n_words=200, seed=0)`` → deterministic English-like
    text."""
    return make_text


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> dict:
    """A small mixed-format corpus under ``tmp_path / "corpus"``.

    Layout (every file is valid UTF-8)::

        corpus/a.txt            one document
        corpus/b.md             one document
        corpus/sub/c.txt        one document (tests recursion)
        corpus/d.jsonl          three documents in the "text" field (plus an "id" field)
        corpus/notes.log        ignored when the folder is read (extension filter)
        corpus/.hidden/e.txt    ignored when the folder is read (hidden folder)

    Returns a dict with ``root`` (the folder), ``files`` (name → Path) and ``docs`` (name → the list of
    documents that file holds, in order).
    """
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    docs = {
        "a.txt": [make_text(60, seed=1)],
        "b.md": [make_text(50, seed=2)],
        "sub/c.txt": [make_text(40, seed=3)],
        "d.jsonl": [make_text(30, seed=10 + i) for i in range(3)],
    }
    files: dict[str, Path] = {}
    for name, texts in docs.items():
        p = root / name
        if name.endswith(".jsonl"):
            p.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)),
                         encoding="utf-8")
        else:
            p.write_text(texts[0], encoding="utf-8")
        files[name] = p
    (root / "notes.log").write_text("a,b\n1,2\n", encoding="utf-8")
    (root / ".hidden" / "e.txt").write_text("hidden text\n", encoding="utf-8")
    return {"root": root, "files": files, "docs": docs}


@pytest.fixture
def prepare_corpus(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``prepare_corpus(docs, name="data", fmt="txt", **prepare_kwargs)`` → prepared data directory.

    ``docs`` is a list of document strings. With ``fmt="txt"`` each document is written to its own
    ``doc_NNN.txt`` in a fresh folder (read back in that order); with ``fmt="jsonl"`` they all go to one
    ``docs.jsonl`` (field "text"). The folder is prepared with :func:`pretrain.data.prepare.prepare`
    into ``tmp_path / name`` (defaults: ``tokenizer="char"``, ``val_fraction=0.2``, silent log).
    """
    def factory(docs: list[str], name: str = "data", fmt: str = "txt", **kwargs) -> Path:
        src = tmp_path / f"{name}_src"
        src.mkdir()
        if fmt == "txt":
            for i, d in enumerate(docs):
                (src / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
        elif fmt == "jsonl":
            (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs),
                                            encoding="utf-8")
        else:
            raise ValueError(fmt)
        kwargs.setdefault("tokenizer", "char")
        kwargs.setdefault("val_fraction", 0.2)
        kwargs.setdefault("log", quiet)
        out = tmp_path / name
        prepare([str(src)], out, **kwargs)
        return out

    return factory


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """One ``corpus.txt`` (about 6 KB of English-like text, a single document) in ``tmp_path / "raw"``."""
    raw = tmp_path / "raw"
    raw.mkdir()
    p = raw / "corpus.txt"
    p.write_text(make_text(1100, seed=42), encoding="utf-8")
    return p


@pytest.fixture
def prepared_data(tmp_path: Path, corpus_file: Path) -> Path:
    """A prepared data directory (``tmp_path / "data"``) made from :func:`corpus_file` with the char tokenizer
    and ``val_fraction=0.2``: a single document, so validation is the last 20% of the text.

    About 4,800 train and 1,200 val tokens, a vocabulary of a few dozen characters (+ EOT, <unk>): enough
    for ``seq_len`` 16-32 and batch sizes up to ~8.
    """
    out = tmp_path / "data"
    prepare([str(corpus_file)], out, tokenizer="char", val_fraction=0.2, log=quiet)
    return out


def write_token_dir(path: Path, splits: dict[str, list[np.ndarray]], dtype: str = "uint32",
                    vocab_size: int | None = None) -> Path:
    """Write a prepared-data directory by hand (meta.json + shards) holding exactly the given token arrays.

    ``splits`` maps a split name to its list of shards. Useful to test the loader with recognisable token
    streams (e.g. ``np.arange``) where every token value identifies its position.
    """
    path.mkdir(parents=True, exist_ok=True)
    dt = np.dtype(dtype)
    meta_splits = {}
    for split, shards in splits.items():
        entries = []
        for k, arr in enumerate(shards):
            name = f"{split}_{k:06d}.bin"
            np.asarray(arr, dtype=dt).tofile(path / name)
            entries.append({"file": name, "tokens": int(len(arr))})
        meta_splits[split] = {"tokens": int(sum(len(a) for a in shards)), "documents": 1, "bytes": 0,
                              "shards": entries}
    top = max((int(np.max(a)) for shards in splits.values() for a in shards if len(a)), default=0)
    meta = {"format": 1, "dtype": dt.name, "splits": meta_splits,
            "tokenizer": {"kind": "test", "file": "tokenizer.json", "vocab_size": vocab_size or top + 1,
                          "eot_id": 0, "sha256": ""}}
    (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture
def token_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory around :func:`write_token_dir`:
    ``token_dir({"train": [arr, ...], "val": [...]}, name="tok")``."""
    def factory(splits: dict[str, list[np.ndarray]], name: str = "tok", **kwargs) -> Path:
        return write_token_dir(tmp_path / name, splits, **kwargs)

    return factory


def read_split(data_dir: Path, split: str) -> np.ndarray:
    """All token ids of a split (its shards concatenated), read independently of the loader."""
    meta = json.loads((data_dir / "meta.json").read_text())
    parts = [np.fromfile(data_dir / sh["file"], dtype=meta["dtype"])
             for sh in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def _bins(d: Path) -> dict[str, bytes]:
    """The bytes of every shard of a prepared directory, by file name."""
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


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


V = 50  # vocab of the tiny model (tiny_model_cfg)
CTX = 32  # its max_seq_len


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """A seeded ``(b, t)`` batch of token ids in the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


@pytest.fixture
def tiny_model_cfg() -> Callable[..., ModelConfig]:
    """Factory for a tiny :class:`ModelConfig` (2 layers, d_model 32, 4 heads, vocab 50, max_seq_len 32);
    keyword arguments override any field, e.g. ``tiny_model_cfg(n_kv_head=2, tie_embeddings=False)``."""
    def factory(**kw) -> ModelConfig:
        base = dict(n_layer=2, d_model=32, n_head=4, vocab_size=50, max_seq_len=32)
        base.update(kw)
        return ModelConfig(**base)

    return factory


@pytest.fixture
def tiny_model(tiny_model_cfg):
    """Factory: ``tiny_model(seed=0, **cfg_overrides)`` → a :class:`pretrain.models.gpt.GPT` in eval mode,
    initialised under ``torch.manual_seed(seed)``."""
    from pretrain.models.gpt import GPT

    def factory(seed: int = 0, **kw):
        torch.manual_seed(seed)
        return GPT(tiny_model_cfg(**kw)).eval()

    return factory


def bert_cfg(**kw) -> ModelConfig:
    """A tiny encoder config (2 layers, d_model 32, 2 heads, vocab 50, max_seq_len 32); ``kw`` overrides."""
    base = dict(arch="bert", n_layer=2, n_head=2, d_model=32, vocab_size=50, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def encoder(seed: int = 0, **kw):
    """A tiny :class:`pretrain.models.bert.Encoder` (see :func:`bert_cfg`) in eval mode, seeded."""
    from pretrain.models.bert import Encoder

    torch.manual_seed(seed)
    return Encoder(bert_cfg(**kw)).eval()


@pytest.fixture
def torch_single_thread():
    """Run the test with one torch CPU thread (restored afterwards).

    Tiny tensors gain nothing from intra-op threads, and on a loaded machine thread contention can make a
    tiny forward pass 100x slower. Use with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
