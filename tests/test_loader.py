"""The batch loaders: TokenSplit (a prepared split, verified against meta.json), TrainLoader (shuffled
windows, exact O(1) resume, ranks, mixture weights), DocumentLoader (one padded document per row) and
the evaluation batches."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from conftest import quiet, read_split

import pretrain.data.loader as loader_mod
from pretrain.data.loader import DocumentLoader, TokenSplit, TrainLoader, eval_batches
from pretrain.data.manifest import load_meta
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError


def is_slice_of(row: np.ndarray, stream: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(row))
    return bool((windows == row).all(axis=1).any())


# ============================================================================================ TrainLoader


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


# =============================================================================================== mixtures


def _group_of_row(row: np.ndarray) -> int:
    text = bytes(int(t) for t in row if t < 256).decode("utf-8", "replace")
    letters = [c for c in text if c.isalpha()]
    return int(sum(c.isupper() for c in letters) > len(letters) / 2)


def test_drawn_batches_follow_the_weights(mixture, monkeypatch):
    out, _ = mixture
    split = TokenSplit(out, "train")
    natural = sum(len(s) for s, g in zip(split.shards, split.groups) if g == 1) / split.tokens
    assert natural < 0.25  # b is small: without weights it would be drawn rarely
    loader = TrainLoader(split, seq_len=32, batch_size=50, seed=0)
    counts = collections.Counter(_group_of_row(r) for _ in range(40) for r in loader.next_batch().numpy())
    assert abs(counts[1] / 2000 - 0.75) < 0.04, counts  # 3:1 (random within a partial block)
    monkeypatch.setattr(loader_mod, "MIX_BLOCK", 400)  # exact within every full block
    loader = TrainLoader(split, seq_len=32, batch_size=40, seed=5)
    counts = collections.Counter(_group_of_row(r) for _ in range(20) for r in loader.next_batch().numpy())
    assert counts == {1: 600, 0: 200}
    # a document per row
    docs = DocumentLoader(split, seq_len=1024, batch_size=40, eot_id=256, pad_id=0, seed=1)
    counts = collections.Counter(_group_of_row(r) for _ in range(20) for r in docs.next_batch().numpy())
    assert counts == {1: 600, 0: 200}


def test_mixture_resume_and_ranks(mixture):
    out, _ = mixture
    split = TokenSplit(out, "train")
    full = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    batches = [full.next_batch() for _ in range(12)]
    assert full.state_dict()["mixture"] == [1.0, 3.0]
    resumed = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    probe = TrainLoader(split, seq_len=16, batch_size=8, seed=3)
    for _ in range(5):
        probe.next_batch()
    resumed.load_state_dict(probe.state_dict())
    for b in batches[5:]:
        assert np.array_equal(resumed.next_batch().numpy(), b.numpy())
    ranks = [TrainLoader(split, seq_len=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for b in batches[:6]:
        assert np.array_equal(np.concatenate([r.next_batch().numpy() for r in ranks]), b.numpy())
    bad = dict(full.state_dict(), mixture=[1.0, 1.0])
    with pytest.raises(DataError, match="mixture"):
        resumed.load_state_dict(bad)


# ===================================================================================== evaluation batches


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


# ======================================================================= padded documents (packing false)


def test_document_spans_cut_long_documents(token_dir):
    from pretrain.data.loader import TokenSplit, document_spans

    eot = 99
    stream = np.array([1, 2, eot, 3, 4, 5, 6, 7, eot, 8])
    split = TokenSplit(token_dir({"train": [stream], "val": [stream]}), "train")
    spans = document_spans(split, eot, max_len=3)
    assert spans.tolist() == [[0, 0, 3], [0, 3, 3], [0, 6, 3], [0, 9, 1]]
    pieces = [stream[s:s + n].tolist() for _, s, n in spans]
    assert sum(pieces, []) == stream.tolist()  # every token exactly once, in order


def test_document_loader_rows_are_single_padded_documents(token_dir):
    from pretrain.data.loader import DocumentLoader, TokenSplit

    eot, pad = 99, 98
    docs = [np.arange(10 * k + 1, 10 * k + 1 + n) for k, n in enumerate([3, 7, 1, 5, 2])]
    stream = np.concatenate(sum(([d, [eot]] for d in docs), [])[:-1])
    split = TokenSplit(token_dir({"train": [stream], "val": [stream]}), "train")
    loader = DocumentLoader(split, seq_len=7, batch_size=5, eot_id=eot, pad_id=pad, seed=3)
    assert loader.n_windows == len(docs)  # every document with its EOT fits in seq_len + 1 = 8 tokens
    rows = loader.next_batch().tolist()
    seen = []
    for row in rows:
        real = [t for t in row if t != pad]
        assert row[len(real):] == [pad] * (len(row) - len(real))  # padding only at the end
        body = [t for t in real if t != eot]
        assert any(body == d.tolist() for d in docs)  # exactly one whole document per row
        seen.append(tuple(body))
    assert len(set(seen)) == len(docs)  # an epoch visits each document once
    state = loader.state_dict()
    nxt = loader.next_batch()
    loader.load_state_dict(state)
    assert torch.equal(loader.next_batch(), nxt)  # O(1) resume


def test_mlm_padded_documents_lose_no_token_to_cls(token_dir):
    """With [CLS] in front, a masked-LM row shows the model seq_len - 1 of its tokens: documents are cut into
    pieces of that length, so every token of a long document is in some model input (none dropped for
    good)."""
    from pretrain.data.loader import DocumentLoader, TokenSplit, eval_batches
    from pretrain.objectives.mlm import add_cls

    eot, pad, cls, seq_len = 99, 98, 97, 8
    docs = [np.arange(1, 24), np.arange(30, 39), np.arange(40, 43)]  # 23, 9 and 3 tokens (+ EOT)
    stream = np.concatenate(sum(([d, [eot]] for d in docs), []))
    split = TokenSplit(token_dir({"train": [stream], "val": [stream]}), "train")
    loader = DocumentLoader(split, seq_len, batch_size=1, eot_id=eot, pad_id=pad, piece_len=seq_len - 1)
    seen = []
    for _ in range(loader.n_windows):  # one epoch
        row = add_cls(loader.next_batch(), cls)[0].tolist()
        assert row[0] == cls and len(row) == seq_len
        seen += [t for t in row[1:] if t != pad]
    assert sorted(seen) == sorted(stream.tolist())  # every token (EOTs included) exactly once
    rows = torch.cat(list(eval_batches(split, seq_len, 2, documents=(eot, pad, seq_len - 1))))
    evald = [t for r in add_cls(rows, cls)[:, 1:].tolist() for t in r if t != pad]
    assert sorted(evald) == sorted(stream.tolist())


# =========================================================================================== damaged data


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
