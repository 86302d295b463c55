"""Tokenizers: byte, char, BPE, unigram; round trips, save / load, special tokens."""

from __future__ import annotations

import pytest
from _corpus import _docs, _jsonl
from conftest import quiet

from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import (
    EOT,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    byte_tokenizer,
    char_tokenizer,
    train_bpe,
)

UNICODE_SAMPLES = [
    "plain ascii text",
    "héllo wörld — ünïcödé ½ ∑ ∞",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and \u200b zero width",
    "whitespace\t\ttabs\r\nCRLF\n\n  double  spaces ",
    "<unk> <|endoftext|x> [not special]",
    "",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text


def test_byte_tokenizer_vocab():
    tok = byte_tokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256 and tok.unk_id is None
    assert tok.encode("AZ az") == [65, 90, 32, 97, 122]
    assert tok.unknown_chars("anything ✓") == []
    assert tok.decode(tok.encode("a") + [tok.eot_id], skip_special_tokens=True) == "a"


def test_char_tokenizer_round_trip_and_unknown():
    corpus = "hello world\nthe quick brown fox — ünï\t"
    tok = build_tokenizer("char", [corpus[:10], corpus[10:]])
    chars = sorted(set(corpus))
    assert tok.vocab_size == len(chars) + 2  # + EOT, <unk>
    assert tok.eot_id == len(chars) and tok.unk_id == len(chars) + 1
    assert tok.encode(corpus) == [chars.index(c) for c in corpus]  # sorted-character ids
    assert tok.decode(tok.encode(corpus)) == corpus
    assert tok.unknown_chars(corpus) == []
    assert tok.unknown_chars("hello, WORLD!") == ["!", ",", "D", "L", "O", "R", "W"]
    assert tok.unk_id in tok.encode("hello?")
    assert char_tokenizer("ba").encode("ab") == [0, 1]  # ids follow sorted character order


def test_char_tokenizer_needs_text():
    with pytest.raises(TokenizerError):
        build_tokenizer("char", None)
    with pytest.raises(TokenizerError):
        build_tokenizer("bpe", None)


def test_unknown_tokenizer_spec(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        build_tokenizer(str(tmp_path / "nope.json"))


def test_bpe_trains_and_round_trips(text_factory):
    texts = [text_factory(300, seed=s) for s in range(5)]
    tok = train_bpe(texts, vocab_size=320)
    assert 258 <= tok.vocab_size <= 320
    assert tok.tk.token_to_id(EOT) == tok.eot_id
    sample = texts[0][:400]
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode("utf-8"))  # merges were learned: fewer tokens than bytes
    for text in [sample, *UNICODE_SAMPLES]:
        assert tok.decode(tok.encode(text)) == text  # byte-level: anything round-trips


def test_bpe_vocab_too_small():
    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe(["abc"], vocab_size=200)


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_round_trip(tmp_path, kind, text_factory):
    texts = [text_factory(200, seed=7)]
    tok = build_tokenizer(kind, texts, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    for target in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the folder holding it
        again = Tokenizer.load(target)
        assert again.vocab_size == tok.vocab_size
        assert again.eot_id == tok.eot_id and again.unk_id == tok.unk_id
        assert again.sha256() == tok.sha256()
        sample = texts[0][:300]
        assert again.encode(sample) == tok.encode(sample)
        assert again.decode(again.encode(sample)) == sample
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).encode("the king") == tok.encode("the king")


def test_load_garbage_tokenizer(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("this is not json {", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.load(p)
    p.write_text('{"version": "1.0", "model": 42}', encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.load(p)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")


def test_load_adds_missing_eot(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.eot_id == 3 and tok.vocab_size == 4
    assert "added <|endoftext|> as id 3" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="end-of-document"):
        Tokenizer(hf)
    for end in ("<|end_of_text|>", "<eos>"):  # Llama 3's and Gemma's end tokens are used as they are
        hf2 = HFTokenizer(models.WordLevel({"a": 0, end: 1, "[UNK]": 2}, unk_token="[UNK]"))
        hf2.add_special_tokens([end])
        hf2.save(str(tmp_path / "tokenizer.json"))
        tok = Tokenizer.load(tmp_path)
        assert tok.eot_id == 1 and tok.vocab_size == 3 and capsys.readouterr().err == ""


def test_unigram_tokenizer(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", _docs(40))
    meta = prepare([str(src)], tmp_path / "d", tokenizer="unigram", vocab_size=150, log=quiet)
    tok = Tokenizer.load(tmp_path / "d")
    assert meta["tokenizer"]["kind"] == "unigram" and tok.vocab_size <= 150
    text = _docs(1, seed=99)[0]
    assert tok.decode(tok.encode(text)) == text


def test_text_only_encoding_matches_prepare():
    """User text (fine-tuning, embeddings) is encoded as prepare encodes documents: a written-out special
    token is text; the default (prompts, fill-mask) still reads it as the token, and the flag does not
    stick."""
    from pretrain.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "a <|endoftext|> b"
    assert tok.eot_id in tok.encode(text) and tok.eot_id not in tok.encode(text, text_only=True)
    assert tok.decode(tok.encode(text, text_only=True)) == text
    assert tok.eot_id in tok.encode_batch([text])[0]
