"""Tokenizers, all as Hugging Face `tokenizers` objects saved to one ``tokenizer.json``.

Kinds: ``byte`` (256 byte tokens, id == byte value), ``char`` (one token per character seen in the
corpus), ``bpe`` (byte-level BPE trained on the corpus), ``wordpiece`` (BERT-style, lower-cased, with
[PAD] [UNK] [CLS] [SEP] [MASK]), ``unigram`` (SentencePiece-style Unigram LM over Metaspace pieces),
or a path to an existing tokenizer.json. Every tokenizer has an
end-of-document token: ``<|endoftext|>``, or ``[SEP]`` for BERT-style vocabularies.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pretrain import PretrainError

EOT = "<|endoftext|>"
UNK = "<unk>"
# the end-of-document token, the first of these a tokenizer has: GPT-2 / ours, BERT, Llama 2 / T5 / RoBERTa,
# Llama 3, Gemma
EOT_CANDIDATES = (EOT, "[SEP]", "</s>", "<|end_of_text|>", "<eos>")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
KINDS = ("byte", "char", "bpe", "wordpiece", "unigram")
TRAINED = ("bpe", "wordpiece", "unigram")  # kinds learned from a sample of the corpus


class TokenizerError(PretrainError):
    """A tokenizer could not be built, loaded or used."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the project's conventions (EOT token, checks)."""

    def __init__(self, tk: HFTokenizer, kind: str = "custom"):
        self.tk = tk
        self.kind = kind
        eot = next((tk.token_to_id(t) for t in EOT_CANDIDATES if tk.token_to_id(t) is not None), None)
        if eot is None:
            raise TokenizerError("tokenizer has no end-of-document token "
                                 f"(one of {', '.join(EOT_CANDIDATES)})")
        self.eot_id: int = eot
        self.mask_id: int | None = next((tk.token_to_id(t) for t in ("[MASK]", "<mask>")
                                         if tk.token_to_id(t) is not None), None)
        self.pad_id: int | None = next((tk.token_to_id(t) for t in ("[PAD]", "<pad>")
                                        if tk.token_to_id(t) is not None), None)
        self.cls_id: int | None = next((tk.token_to_id(t) for t in ("[CLS]", "<s>")
                                        if tk.token_to_id(t) is not None), None)
        unk = UNK
        try:  # the model's own unknown token, whatever its name ([UNK], <unk>, ...)
            import json

            unk = json.loads(tk.to_str())["model"].get("unk_token") or UNK
        except (ValueError, KeyError, TypeError):
            pass
        self.unk_id: int | None = tk.token_to_id(unk)

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id (a loaded tokenizer.json may have gaps in its ids)."""
        return max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str, text_only: bool = False) -> list[int]:
        """Token ids, no specials added. ``text_only``: a special token written out in ``text``
        (``<|endoftext|>``, ``[MASK]``) is encoded as the text it is, as `pretrain prepare` encodes
        documents — for user text."""
        return self.encode_batch([text], text_only)[0]

    def encode_batch(self, texts: list[str], text_only: bool = False) -> list[list[int]]:
        self.tk.encode_special_tokens = text_only
        try:
            return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tk.encode_special_tokens = False

    def encode_offsets(self, texts: list[str], text_only: bool = False,
                       ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids of each text (no specials) with each token's character offsets in that text:
        ``text[s:e]`` is what the token stands for (a byte token of a multi-byte character: the whole
        character; a BPE token with its leading space: the space too)."""
        self.tk.encode_special_tokens = text_only
        try:
            return [(e.ids, [tuple(o) for o in e.offsets])
                    for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tk.encode_special_tokens = False

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def special_ids(self) -> list[int]:
        """Ids of every added special token (EOT, [CLS], [MASK], [PAD], ...)."""
        return sorted({t.content and self.tk.token_to_id(t.content)
                       for t in self.tk.get_added_tokens_decoder().values() if t.special} - {None})

    def continuation_mask(self) -> list[bool]:
        """Per id: True where the token continues a word (WordPiece '##' pieces), for whole-word masking."""
        out = [False] * self.vocab_size
        for tok, i in self.tk.get_vocab(with_added_tokens=False).items():
            out[i] = tok.startswith("##")
        return out

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` that this tokenizer cannot represent (map to <unk>)."""
        if self.unk_id is None:
            return []
        enc = self.tk.encode(text, add_special_tokens=False)
        return sorted({text[s:e] for i, (s, e) in zip(enc.ids, enc.offsets) if i == self.unk_id})

    def to_str(self) -> str:
        return self.tk.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        self.tk.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p}")
        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot load tokenizer {p}: {str(e).splitlines()[0][:200]}") from None
        if all(tk.token_to_id(t) is None for t in EOT_CANDIDATES):
            tk.add_special_tokens([EOT])
            print(f"warning: {p} has no end-of-document token ({', '.join(EOT_CANDIDATES)}); added {EOT} as "
                  f"id {tk.token_to_id(EOT)}", file=sys.stderr)
        return cls(tk, kind="file")


def byte_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in sorted(bytes_to_unicode().items())}
    vocab[EOT] = 256
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOT])
    return Tokenizer(tk, kind="byte")


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One token per character (sorted, as nanoGPT's char model), then EOT and <unk>."""
    vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
    vocab[EOT] = len(vocab)
    vocab[UNK] = len(vocab)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([EOT, UNK])
    return Tokenizer(tk, kind="char")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on ``texts``."""
    if vocab_size < 257 + 1:
        raise TokenizerError("bpe vocab size must be at least 258 (256 bytes + EOT + merges), "
                             f"got {vocab_size}")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, kind="bpe")


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """BERT-style uncased WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK] ([SEP] ends documents)."""
    from tokenizers import normalizers, processors

    if vocab_size < 100:
        raise TokenizerError(f"wordpiece vocab size must be at least 100, got {vocab_size}")
    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                        show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(  # used by Hugging Face loaders, not by prepare
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return Tokenizer(tk, kind="wordpiece")


def train_unigram(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """SentencePiece-style Unigram language model: spaces become '▁' (Metaspace), case is kept; characters
    never seen in training map to <unk>."""
    if vocab_size < 100:
        raise TokenizerError(f"unigram vocab size must be at least 100, got {vocab_size}")
    tk = HFTokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[EOT, UNK], unk_token=UNK,
                                      show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    # the trainer gives its special tokens the best score (0), so the model itself would segment a written-out
    # "<|endoftext|>" as the end token; with a score below any sum of piece scores it never does
    spec = json.loads(tk.to_str())
    low = min(score for _, score in spec["model"]["vocab"]) - 1e6
    for entry in spec["model"]["vocab"]:
        if entry[0] == EOT:
            entry[1] = low
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), kind="unigram")


def build_tokenizer(spec: str, texts: Iterable[str] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """``spec`` is a kind (byte/char/bpe/wordpiece/unigram) or a path to a tokenizer.json (or a folder
    holding one)."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "char":
        if texts is None:
            raise TokenizerError("char tokenizer needs the corpus text")
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return char_tokenizer(chars)
    if spec in TRAINED:
        if texts is None:
            raise TokenizerError(f"{spec} tokenizer needs the corpus text")
        return {"bpe": train_bpe, "wordpiece": train_wordpiece,
                "unigram": train_unigram}[spec](texts, vocab_size)
    p = Path(spec)
    if p.exists():
        return Tokenizer.load(p)
    raise TokenizerError(f"unknown tokenizer {spec!r}: use one of {', '.join(KINDS)} or a path to "
                         "tokenizer.json")
