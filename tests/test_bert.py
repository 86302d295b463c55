"""The bidirectional encoder (BERT-style): every position sees the whole sequence, padding is masked out,
the decoder is tied to the embeddings."""

from __future__ import annotations

import pytest
import torch
from conftest import bert_cfg, encoder

from pretrain.config import ModelConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAD = 0  # the [PAD] id of the synthetic vocabulary (as in test_mlm.py)


def test_build_model_bert_is_encoder():
    from pretrain.models import build_model
    from pretrain.models.bert import Encoder

    assert isinstance(build_model(bert_cfg()), Encoder)


def test_encoder_is_bidirectional_gpt_is_not():
    from pretrain.models.gpt import GPT

    torch.manual_seed(0)
    x = torch.randint(5, 50, (2, 16))
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1 - 5) % 45 + 5  # change only the last token
    enc = encoder()
    with torch.no_grad():
        a, b = enc(x), enc(y)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # the first position sees the last token
    assert ((a - b).abs().amax(dim=-1) > 1e-4).all()  # ... and so does every position
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=50, max_seq_len=32)).eval()
    with torch.no_grad():
        a, b = gpt(x), gpt(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def test_encoder_padding_invariance():
    enc = encoder(seed=1)
    g = torch.Generator().manual_seed(2)
    short = torch.randint(5, 50, (1, 10), generator=g)
    full = torch.randint(5, 50, (1, 16), generator=g)
    with torch.no_grad():
        h_short = enc(short, return_hidden=True)
        l_short = enc(short)
        h_full = enc(full, return_hidden=True)
        # batch: a full-length row and the short row right-padded with [PAD]
        padded = torch.cat([full, torch.cat([short, torch.full((1, 6), PAD)], 1)])
        attn = torch.ones_like(padded)
        attn[1, 10:] = 0
        h = enc(padded, attention_mask=attn, return_hidden=True)
        lg = enc(padded, attention_mask=attn)
        # an all-ones mask is the same as no mask
        h_ones = enc(full, attention_mask=torch.ones_like(full), return_hidden=True)
        # the pad positions' content does not matter either
        padded2 = padded.clone()
        padded2[1, 10:] = 17
        h2 = enc(padded2, attention_mask=attn, return_hidden=True)
        # without the mask the padding does leak into the real positions
        h_nomask = enc(padded, return_hidden=True)
    torch.testing.assert_close(h[1, :10], h_short[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(lg[1, :10], l_short[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(h[0], h_full[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(h_ones, h_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(h2[1, :10], h_short[0], rtol=0, atol=1e-5)
    assert (h_nomask[1, :10] - h_short[0]).abs().max() > 1e-4


def test_encoder_tied_decoder_and_logits_shape():
    enc = encoder()
    assert enc.decoder.weight is enc.tok_embeddings.weight
    assert enc.decoder.weight.data_ptr() == enc.tok_embeddings.weight.data_ptr()
    assert enc.decoder.bias is not None and enc.decoder.bias.shape == (50,)
    assert len(list(enc.parameters())) == len({id(p) for p in enc.parameters()})  # counted once
    untied = encoder(tie_embeddings=False)
    assert untied.decoder.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_params() == enc.num_params() + 50 * 32

    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        hidden = enc(x, return_hidden=True)
        assert hidden.shape == (3, 12, 32)
        logits = enc(x)
        assert logits.shape == (3, 12, 50)
        torch.testing.assert_close(enc.logits(hidden), logits)
        assert enc.logits(hidden[0, :5]).shape == (5, 50)  # (N, C) → (N, V), e.g. only masked positions
    with pytest.raises(ValueError, match="max_seq_len"):
        enc(torch.zeros(1, 33, dtype=torch.long))


def test_tied_weights_get_gradient_from_both_uses():
    enc = encoder().train()
    x = torch.randint(5, 50, (2, 8))
    enc(x).sum().backward()
    g_tied = enc.tok_embeddings.weight.grad.clone()
    # rows of tokens that never appear in the input still get a gradient, through the decoder
    unused = sorted(set(range(50)) - set(x.flatten().tolist()))
    assert g_tied[unused].abs().sum() > 0
