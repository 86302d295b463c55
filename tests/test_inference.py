"""Using a run (generate, eval): nothing is cut or mapped to the unknown token silently — it is counted and
warned about. Runs are made by hand (a tiny random model saved as a checkpoint): no training needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.checkpoint import save_checkpoint
from pretrain.config import Config, DataConfig, ModelConfig, TrainConfig
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import Tokenizer, char_tokenizer
from pretrain.inference import evaluate_run, generate_text
from pretrain.models.gpt import GPT

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _quiet(*_a, **_k) -> None:
    pass


def make_run(root: Path, tok: Tokenizer, data: Path | None = None, ctx: int = 32) -> Path:
    """A run directory holding a tiny random GPT (context ``ctx``) saved as its only checkpoint, with ``tok``
    as its tokenizer.json and its sha256 recorded as training records it."""
    import torch

    torch.manual_seed(0)
    mcfg = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=max(tok.vocab_size, 8), max_seq_len=ctx)
    cfg = Config(data=DataConfig(path=str(data or ""), seq_len=ctx), model=mcfg,
                 train=TrainConfig(batch_size=2, dtype="fp32"))
    run = root / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 1, GPT(mcfg).eval(), {}, {"config": cfg.to_dict(), "tokenizer_sha256": tok.sha256()})
    return run


def test_generate_warns_with_the_count_when_the_prompt_is_longer_than_the_context(tmp_path):
    run = make_run(tmp_path, char_tokenizer("abcd"), ctx=16)
    want = (r"the prompt is 40 tokens, longer than the model's context of 16: the model sees only its last "
            r"16 tokens \(the first 24 are dropped\)")
    with pytest.warns(UserWarning, match=want):
        out = generate_text(run, "abcd" * 10, max_new_tokens=3, temperature=0, device="cpu")
    assert out[0].startswith("abcd" * 10)  # the whole prompt is still returned
    import warnings

    with warnings.catch_warnings():  # a prompt that fits: no warning
        warnings.simplefilter("error")
        generate_text(run, "abc" * 5, max_new_tokens=3, temperature=0, device="cpu")
    # characters the char vocabulary lacks stay an error, never a silent <unk>
    from pretrain import PretrainError

    with pytest.raises(PretrainError, match="outside the tokenizer's vocabulary: 'z'"):
        generate_text(run, "abz", max_new_tokens=1, device="cpu")


def test_eval_counts_and_warns_about_unknown_tokens_in_the_data(tmp_path):
    tok = char_tokenizer("abc \n")  # the corpus also holds 'x', which this vocabulary cannot represent
    tok.save(tmp_path / "tok.json")
    src = tmp_path / "corpus.txt"
    src.write_text("abc cab bca " * 60 + "x" * 7 + " abc" * 20, encoding="utf-8")
    data = tmp_path / "data"
    prepare([str(src)], data, tokenizer=str(tmp_path / "tok.json"), val_fraction=0.5, log=_quiet)
    run = make_run(tmp_path, Tokenizer.load(tmp_path / "tok.json"), data, ctx=16)
    with pytest.warns(UserWarning, match=r"7 of [\d,]+ tokens of the val split of .* are the unknown token "
                                         r"'<unk>'"):
        res = evaluate_run(run, device="cpu")
    assert res["unknown_tokens"] == 7
