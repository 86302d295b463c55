"""The ids-only encoder of prepare: the fast byte-level BPE path gives the tokenizer's own ids, token for
token."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_text

from pretrain.data import encode
from pretrain.data.encode import IdsEncoder, fast_path_pattern
from pretrain.data.tokenizer import byte_tokenizer, train_bpe, train_unigram, train_wordpiece

TRICKY = [
    "Hello, world! It's 2026; we'll see what's what, isn't it?",
    "  leading spaces,\ttabs\t\tand   runs of   spaces  \n\n\n  then lines \r\n windows\r\n",
    "numbers 3.14159 1,000,000 and 12ab34 and ½ ² ٣ (Arabic-Indic three)",
    ("Ünïcödé: naïve café — “quotes” ‘single’ … ellipsis; CJK 漢字かな交じり文; "
     "emoji 🙂👍🏽; Ελληνικά; русский"),
    "combining: e\u0301 a\u0308; zero-width\u200bjoiner; no-break\u00a0space; ideographic\u3000space",
    "SHOUTING'S FINE'LL 'RE 'VE 'M 'D 'T 'S ''' \"\" ---- ==== !!!!",
    "a document with the end token <|endoftext|> written out in the middle",
    "",
    " ",
    "\n",
    "x",
]


@pytest.fixture(scope="module")
def bpe():
    corpus = [make_text(400, seed=s) for s in range(20)] + TRICKY[:4]
    return train_bpe(corpus, 600).tk


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_fast_path_matches_tokenizer_on_tricky_text(bpe):
    enc = IdsEncoder(bpe, np.uint32)
    assert enc.fast
    texts = TRICKY + [make_text(300, seed=99), TRICKY[0] + " " + TRICKY[3]]
    got = enc.encode(texts)
    assert enc.fast, "the first-batch self-check turned the fast path off"
    want = [e.ids for e in bpe.encode_batch(texts, add_special_tokens=False)]
    assert got[1].tolist() == [len(w) for w in want]
    assert got[0].tolist() == [i for w in want for i in w]
    assert got[0].dtype == np.uint32
    # a second batch: memoized pieces are reused; the added-token document keeps its place
    texts2 = [TRICKY[6], make_text(50, seed=1), TRICKY[6] + TRICKY[5], ""]
    assert _same(enc.encode(texts2), enc.reference(texts2))
    assert len(enc.memo) > 0
    eot = bpe.token_to_id("<|endoftext|>")
    ids = enc.encode([TRICKY[6]])[0].tolist()  # the written-out token is text, not a document boundary
    assert eot not in ids and bpe.decode(ids) == TRICKY[6]


def test_memo_full_still_exact(bpe, monkeypatch):
    monkeypatch.setattr(encode, "MEMO_PIECES", 5)
    enc = IdsEncoder(bpe)
    texts = [make_text(200, seed=s) for s in range(5)] + TRICKY
    for _ in range(2):
        assert _same(enc.encode(texts), enc.reference(texts))
    assert len(enc.memo) == 5


def test_long_pieces_are_encoded_but_not_remembered(bpe):
    enc = IdsEncoder(bpe)
    long_word, long_run = " " + "abc" * 100, "=" * 500
    texts = [f"before{long_word} after {long_run} end", make_text(50, seed=4)]
    for _ in range(2):
        assert _same(enc.encode(texts), enc.reference(texts))
    assert long_word not in enc.memo and long_run not in enc.memo
    assert " after" in enc.memo
    assert max(map(len, enc.memo)) <= encode.MEMO_PIECE_CHARS


def test_self_check_falls_back_when_the_split_disagrees(bpe):
    enc = IdsEncoder(bpe)
    enc.split = str.split  # a splitter that drops whitespace: differs from the tokenizer
    texts = [make_text(100, seed=3), TRICKY[1]]
    with pytest.warns(RuntimeWarning, match="disagrees"):
        got = enc.encode(texts)
    assert not enc.fast
    assert _same(got, enc.reference(texts))


def test_fast_path_only_where_exact(bpe):
    corpus = [make_text(300, seed=s) for s in range(5)]
    assert fast_path_pattern(bpe) is not None
    assert fast_path_pattern(byte_tokenizer().tk) is None  # ByteLevel without its regex
    assert fast_path_pattern(train_wordpiece(corpus, 200).tk) is None  # a normalizer, WordPiece
    assert fast_path_pattern(train_unigram(corpus, 150).tk) is None
    assert not IdsEncoder(bpe, fast=False).fast
    dropout = train_bpe(corpus, 400).tk
    dropout.model.dropout = 0.1
    assert fast_path_pattern(dropout) is None  # stochastic: no memo
    for tk in (byte_tokenizer().tk, train_wordpiece(corpus, 200).tk):  # the other paths still encode
        enc = IdsEncoder(tk)
        assert _same(enc.encode(TRICKY), enc.reference(TRICKY))
