"""Masked language modelling (BERT-style): masking statistics, the bidirectional encoder, and the CLI
end to end (prepare with WordPiece → train --objective mlm → eval / fill-mask), with its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from _corpus import TINY_TRAIN, overrides, sentences, write_corpus

from pretrain.cli import main
from pretrain.config import MLMConfig, ModelConfig
from pretrain.data.tokenizer import train_wordpiece
from pretrain.objectives import build_objective
from pretrain.objectives.mlm import IGNORE, MaskingSpec, add_cls, loss_and_accuracy, mask_tokens

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MLM_ARGS = ["--objective", "mlm", "--model.arch", "bert"]

# a synthetic vocabulary: ids 0..4 are special ([PAD] [UNK] [CLS] [SEP] [MASK]), the rest ordinary
PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
V = 1000


def spec(**kw) -> MaskingSpec:
    base = dict(mask_id=MASK, cls_id=CLS, vocab_size=V, special_ids=SPECIALS)
    base.update(kw)
    return MaskingSpec(**base)


def random_ids(B: int = 64, T: int = 256, seed: int = 0, lo: int = 5, hi: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (B, T), generator=g)


def gen(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outcome(ids, inputs, labels):
    """Boolean masks: selected, and among them replaced by [MASK], by another token, left unchanged."""
    sel = labels != IGNORE
    to_mask = sel & (inputs == MASK)
    unchanged = sel & (inputs == ids)
    to_random = sel & ~to_mask & ~unchanged
    return sel, to_mask, to_random, unchanged


# ---------------------------------------------------------------------------------------------------------
# masking


@pytest.mark.parametrize("p", [0.15, 0.30])
def test_selection_rate_and_80_10_10_split(p):
    ids = random_ids()
    inputs, labels = mask_tokens(ids, spec(mask_prob=p), gen())
    sel, to_mask, to_random, unchanged = outcome(ids, inputs, labels)
    n = int(sel.sum())
    # 16,384 candidates: the std of the selected fraction is < 0.004
    assert sel.float().mean().item() == pytest.approx(p, abs=0.012)
    # ~2,500-5,000 selected: std of each share < 0.01
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.03)
    assert to_random.sum().item() / n == pytest.approx(0.1, abs=0.025)
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.025)
    # nothing changes outside the selection
    assert torch.equal(inputs[~sel], ids[~sel])
    # labels: the original id exactly where selected, IGNORE everywhere else
    assert torch.equal(labels[sel], ids[sel])
    assert (labels[~sel] == IGNORE).all()
    assert inputs.shape == ids.shape and inputs.dtype == ids.dtype


@pytest.mark.parametrize("fracs", [(0.5, 0.3), (1.0, 0.0), (0.0, 0.0), (0.0, 1.0)])
def test_custom_replacement_fractions(fracs):
    mask_frac, rand_frac = fracs
    ids = random_ids()
    inputs, labels = mask_tokens(ids, spec(mask_prob=0.2, mask_token_frac=mask_frac,
                                           random_token_frac=rand_frac), gen())
    sel, to_mask, to_random, unchanged = outcome(ids, inputs, labels)
    n = int(sel.sum())
    assert n > 2000
    keep_frac = 1.0 - mask_frac - rand_frac
    assert to_mask.sum().item() / n == pytest.approx(mask_frac, abs=0.03)
    # a random replacement equals the original with probability ~1/995: counted as unchanged
    assert to_random.sum().item() / n == pytest.approx(rand_frac, abs=0.03)
    assert unchanged.sum().item() / n == pytest.approx(keep_frac, abs=0.03)
    if mask_frac == 1.0:
        assert (inputs[sel] == MASK).all()
    if mask_frac == 0.0:
        assert not (inputs == MASK).any()
    if rand_frac == 0.0:
        assert int(to_random.sum()) == 0


def test_special_tokens_never_selected_nor_produced():
    ids = random_ids(seed=3)
    # sprinkle every special token (including [MASK] itself) over 20% of the positions
    g = torch.Generator().manual_seed(7)
    where = torch.rand(ids.shape, generator=g) < 0.2
    ids = torch.where(where, torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), ids.shape, generator=g)],
                      ids)
    s = spec(mask_prob=0.5, mask_token_frac=0.2, random_token_frac=0.6)  # many random replacements
    inputs, labels = mask_tokens(ids, s, gen())
    is_special = torch.isin(ids, torch.tensor(SPECIALS))
    assert (labels[is_special] == IGNORE).all()  # never selected ...
    assert torch.equal(inputs[is_special], ids[is_special])  # ... and left as they are
    sel, to_mask, to_random, _ = outcome(ids, inputs, labels)
    assert sel[~is_special].float().mean().item() == pytest.approx(0.5, abs=0.02)  # the others still are
    # random replacements are ordinary tokens, drawn from the whole ordinary vocabulary
    repl = inputs[to_random]
    assert repl.numel() > 3000
    assert not torch.isin(repl, torch.tensor(SPECIALS)).any()
    assert repl.min().item() >= 5 and len(repl.unique()) > 900
    # the only special token the masking introduces is [MASK], at selected positions
    new_special = torch.isin(inputs, torch.tensor(SPECIALS)) & ~is_special
    assert torch.equal(new_special, to_mask)


def test_random_replacements_span_vocab_beyond_the_inputs():
    ids = random_ids(lo=5, hi=20)  # inputs use 15 ids; replacements come from all 995 ordinary ones
    inputs, labels = mask_tokens(ids, spec(mask_prob=0.5, mask_token_frac=0.0, random_token_frac=1.0), gen())
    repl = inputs[labels != IGNORE]
    assert (repl >= 20).float().mean().item() > 0.95
    assert not torch.isin(repl, torch.tensor(SPECIALS)).any()


def test_padding_positions_never_selected():
    ids = random_ids(seed=5)
    lengths = torch.randint(1, ids.size(1) + 1, (ids.size(0),), generator=gen(9))
    attn = (torch.arange(ids.size(1))[None, :] < lengths[:, None]).long()
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, PAD))
    # also zero out a few real-looking tokens in the middle: the attention mask, not [PAD], decides
    attn[:, 10:20] = 0
    inputs, labels = mask_tokens(ids, spec(mask_prob=0.3), gen(), attention_mask=attn)
    off = attn == 0
    assert (labels[off] == IGNORE).all()
    assert torch.equal(inputs[off], ids[off])
    assert (labels[~off] != IGNORE).float().mean().item() == pytest.approx(0.3, abs=0.02)


def test_same_seed_same_masks_other_seed_other_masks():
    ids = random_ids()
    a = mask_tokens(ids, spec(), gen(42))
    b = mask_tokens(ids, spec(), gen(42))
    c = mask_tokens(ids, spec(), gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(ids, random_ids())  # the input is not modified in place


def _word_starts(cont: torch.Tensor) -> torch.Tensor:
    """For each position, the position of its word's first piece (rows must start with a first piece)."""
    B, T = cont.shape
    out = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        start = 0
        for t in range(T):
            if not cont[b, t]:
                start = t
            out[b, t] = start
    return out


def test_whole_word_masking_synthetic():
    # ids 5..499 begin a word, 500..999 are '##' continuation pieces
    continuation = torch.zeros(V, dtype=torch.bool)
    continuation[500:] = True
    B, T = 32, 128
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(5, 500, (B, T), generator=g)
    is_cont = torch.rand(B, T, generator=g) < 0.5
    is_cont[:, 0] = False
    ids = torch.where(is_cont, torch.randint(500, V, (B, T), generator=g), ids)
    # some [SEP]s between words
    sep = (torch.rand(B, T, generator=g) < 0.03) & ~is_cont
    sep &= ~torch.roll(is_cont, -1, dims=1)  # keep them off words that continue after them
    ids = torch.where(sep, torch.full_like(ids, SEP), ids)
    s = spec(mask_prob=0.3, continuation=continuation)
    inputs, labels = mask_tokens(ids, s, gen())
    sel = labels != IGNORE
    starts = _word_starts(continuation[ids])
    first_sel = torch.gather(sel, 1, starts)
    cont = continuation[ids]
    assert cont.sum() > 1000
    assert torch.equal(sel[cont], first_sel[cont])  # a '##' piece is selected iff its word's first piece is
    assert not sel[ids == SEP].any()
    word_first = ~cont & (ids != SEP)
    assert sel[word_first].float().mean().item() == pytest.approx(0.3, abs=0.03)  # per word, not per piece
    # without whole-word masking, pieces are selected independently of their word's first piece
    sel2 = mask_tokens(ids, spec(mask_prob=0.3), gen())[1] != IGNORE
    assert not torch.equal(sel2[cont], torch.gather(sel2, 1, starts)[cont])


def test_whole_word_masking_with_a_trained_wordpiece_tokenizer():
    tok = train_wordpiece(sentences(300, seed=1), vocab_size=120)  # small vocab: many '##' pieces
    assert tok.mask_id is not None and tok.cls_id is not None and tok.pad_id is not None
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.special_ids == sorted(tok.tk.token_to_id(t) for t in names)
    obj = build_objective("mlm", tok, MLMConfig(mask_prob=0.3, whole_word=True), seed=0)
    s = obj.spec
    assert s.continuation is not None and s.mask_id == tok.mask_id and s.cls_id == tok.cls_id
    texts = sentences(64, seed=2)
    encs = [tok.tk.encode(t, add_special_tokens=False) for t in texts]
    T = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), T), tok.pad_id)
    attn = torch.zeros(len(encs), T, dtype=torch.long)
    word = torch.full((len(encs), T), -1)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        attn[i, :len(e.ids)] = 1
        word[i, :len(e.ids)] = torch.tensor([-1 if w is None else w for w in e.word_ids])
    assert s.continuation[ids].sum() > 200  # the corpus really is split into pieces
    for seed in range(3):
        _, labels = mask_tokens(ids, s, gen(seed), attention_mask=attn)
        sel = labels != IGNORE
        n_words = n_selected = 0
        for i in range(len(encs)):
            for w in word[i].unique().tolist():
                if w < 0:
                    continue
                pieces = sel[i][word[i] == w]
                assert pieces.all() or not pieces.any(), (texts[i], w, pieces)
                n_words += 1
                n_selected += int(pieces.all())
        assert n_selected / n_words == pytest.approx(0.3, abs=0.08)
        assert sel[attn == 0].sum() == 0


def test_add_cls():
    batch = torch.arange(2 * 9).view(2, 9)  # (B, T+1)
    x = add_cls(batch, CLS)
    assert x.shape == (2, 8)
    assert (x[:, 0] == CLS).all() and torch.equal(x[:, 1:], batch[:, :7])
    assert torch.equal(add_cls(batch, None), batch[:, :-1])


# ---------------------------------------------------------------------------------------------------------
# the encoder


def bert_cfg(**kw) -> ModelConfig:
    base = dict(arch="bert", n_layer=2, n_head=2, d_model=32, vocab_size=50, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def encoder(seed: int = 0, **kw):
    from pretrain.models.bert import Encoder

    torch.manual_seed(seed)
    return Encoder(bert_cfg(**kw)).eval()


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


def _optimizer_split(enc):
    """The encoder's parameters that Muon / AdamW update under train.optimizer muon (by id)."""
    from pretrain.config import TrainConfig
    from pretrain.optim import build_optimizer

    opt = build_optimizer(enc, TrainConfig(optimizer="muon"), "cpu")
    adamw, muon = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == {id(p) for p in enc.parameters()}
    return in_muon, in_adamw


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices(tie):
    enc = encoder(tie_embeddings=tie)
    in_muon, in_adamw = _optimizer_split(enc)
    assert id(enc.tok_embeddings.weight) in in_adamw
    for block in enc.layers:
        for w in (block.attn.Wqkv.weight, block.attn.Wo.weight, block.mlp.Wi.weight, block.mlp.Wo.weight):
            assert id(w) in in_muon
    assert id(enc.decoder.bias) in in_adamw


def test_muon_leaves_the_untied_mlm_output_head_to_adamw():
    enc = encoder(tie_embeddings=False)
    _, in_adamw = _optimizer_split(enc)
    assert id(enc.decoder.weight) in in_adamw


def test_tied_weights_get_gradient_from_both_uses():
    enc = encoder().train()
    x = torch.randint(5, 50, (2, 8))
    enc(x).sum().backward()
    g_tied = enc.tok_embeddings.weight.grad.clone()
    # rows of tokens that never appear in the input still get a gradient, through the decoder
    unused = sorted(set(range(50)) - set(x.flatten().tolist()))
    assert g_tied[unused].abs().sum() > 0


def test_loss_and_accuracy_on_selected_positions_only():
    enc = encoder()
    g = torch.Generator().manual_seed(4)
    inputs = torch.randint(5, 50, (2, 16), generator=g)
    labels = torch.full_like(inputs, IGNORE)
    labels[0, 3], labels[1, 0], labels[1, 15] = 7, 9, 11
    with torch.no_grad():
        loss, correct, n = loss_and_accuracy(enc, inputs, labels)
        logits = enc(inputs)
    sel = labels != IGNORE
    assert n == 3
    torch.testing.assert_close(loss, F.cross_entropy(logits[sel], labels[sel]))
    assert int(correct) == int((logits[sel].argmax(-1) == labels[sel]).sum())
    # nothing selected: zero loss that still back-propagates, zero counts
    enc.train()
    loss, correct, n = loss_and_accuracy(enc, inputs, torch.full_like(inputs, IGNORE))
    assert n == 0 and loss.item() == 0.0 and int(correct) == 0
    loss.backward()


def test_step_weighs_every_masked_token_alike_however_the_batch_is_split():
    """Gradient accumulation over micro-batches with different numbers of masked tokens gives the gradient of
    the one batch they make up (token-weighted), not a mean of the micro-batches' means."""
    from pretrain.objectives import MaskedLM
    from pretrain.train import backward_step

    enc = encoder().train()
    obj = MaskedLM(spec(vocab_size=50), seed=0)
    g = torch.Generator().manual_seed(5)
    inputs = torch.randint(5, 50, (4, 16), generator=g)
    labels = torch.full_like(inputs, IGNORE)
    labels[0, [1, 4, 9]] = inputs[0, [1, 4, 9]]  # micro-batch 1 (rows 0-1): 4 targets
    labels[1, 2] = inputs[1, 2]
    labels[2:, ::2] = inputs[2:, ::2]  # micro-batch 2 (rows 2-3): 16 targets
    parts = [(inputs[:2], labels[:2], None, None), (inputs[2:], labels[2:], None, None)]

    def grads(fn) -> list[torch.Tensor]:
        enc.zero_grad(set_to_none=True)
        fn()
        return [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    whole = grads(lambda: loss_and_accuracy(enc, inputs, labels)[0].backward())
    step_loss = []
    split = grads(lambda: step_loss.append(backward_step(enc, enc, obj, parts, 1, torch.device("cpu"),
                                                         "fp32")))
    means = grads(lambda: sum(loss_and_accuracy(enc, *p)[0] / 2 for p in parts).backward())
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(float((a - c).norm() / a.norm()) for a, c in zip(whole, means)) > 0.05  # what it used to be
    with torch.no_grad():  # the step's loss is the whole batch's mean too
        torch.testing.assert_close(step_loss[0], loss_and_accuracy(enc, inputs, labels)[0], rtol=1e-5,
                                   atol=1e-6)


def test_masked_lm_objective_is_deterministic_per_seed():
    tok = train_wordpiece(sentences(100, seed=1), vocab_size=150)
    obj = build_objective("mlm", tok, MLMConfig(), seed=0)
    assert obj.name == "mlm" and not obj.reports_bpb
    enc = encoder(vocab_size=tok.vocab_size)
    batch = torch.randint(5, tok.vocab_size, (4, 17))
    with torch.no_grad():
        assert obj.loss(enc, batch, seed=5).item() == obj.loss(enc, batch, seed=5).item()
        assert obj.loss(enc, batch, seed=5).item() != obj.loss(enc, batch, seed=6).item()
        # the same masks every evaluation
        assert obj.eval_batch(enc, batch, 0) == obj.eval_batch(enc, batch, 0)


def test_mlm_objective_needs_a_mask_token():
    from pretrain import PretrainError
    from pretrain.data.tokenizer import char_tokenizer

    with pytest.raises(PretrainError, match="wordpiece"):
        build_objective("mlm", char_tokenizer("abc "), MLMConfig())


# ---------------------------------------------------------------------------------------------------------
# end to end through the CLI


def error_of(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    write_corpus(root / "corpus")
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "wordpiece",
                 "--vocab-size", "300", "--val-fraction", "0.2"]) == 0
    run = root / "run"
    assert main(["train", "--out", str(run), *MLM_ARGS, *overrides(TINY_TRAIN),
                 "--data.path", str(root / "data"), "--quiet"]) == 0
    return root, run


def test_mlm_train_and_eval(mlm_run, capsys):
    root, run = mlm_run
    meta = json.loads((root / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["tokenizer"]["mask_id"] is not None
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and "val_bpb" not in r
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3  # it learns
    saved = (run / "config.yaml").read_text()
    assert "objective: mlm" in saved and "arch: bert" in saved

    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["objective"] == "mlm" and ev["step"] == 30
    assert 0.0 <= ev["accuracy"] <= 1.0
    assert ev["bits_per_byte"] is None
    assert ev["tokens"] > 0 and ev["loss"] > 0 and ev["perplexity"] > 1
    # evaluation masks are fixed: the same numbers twice
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ev
    # human-readable output mentions the accuracy
    assert main(["eval", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_fill_mask(mlm_run, capsys):
    _, run = mlm_run
    capsys.readouterr()
    assert main(["fill-mask", str(run), "the king [MASK] the crown", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["text"] == "the king [MASK] the crown"
    assert len(res["masks"]) == 1
    options = res["masks"][0]
    assert len(options) == 5
    probs = [o["prob"] for o in options]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert sum(probs) <= 1.0 + 1e-3  # rounded to 4 decimals
    assert probs == sorted(probs, reverse=True)
    assert all(isinstance(o["token"], str) and o["token"] for o in options)
    assert len({o["id"] for o in options}) == 5
    # two masks, another k
    assert main(["fill-mask", str(run), "[MASK] king [MASK] the crown", "--top-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [len(m) for m in res["masks"]] == [3, 3]
    assert main(["fill-mask", str(run), "the king [MASK] the crown"]) == 0
    assert capsys.readouterr().out.startswith("[MASK] 1: ")
    # top-k beyond the vocabulary: every token once, a distribution over the vocabulary
    assert main(["fill-mask", str(run), "the king [MASK] the crown", "--top-k", "100000", "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)["masks"][0]
    vocab = yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"]
    assert sorted(o["id"] for o in everything) == list(range(vocab))
    assert sum(o["prob"] for o in everything) == pytest.approx(1.0, abs=vocab * 5e-5 + 1e-6)
    assert everything[:5] == options
    # a character the tokenizer cannot represent is an error, as for generate, not a silent [UNK]
    assert main(["fill-mask", str(run), "the king \u20ac [MASK]"]) == 2
    assert "outside the tokenizer's vocabulary" in capsys.readouterr().err


def test_fill_mask_scores_the_text_as_training_frames_it(mlm_run, monkeypatch):
    # training inputs start with [CLS] (add_cls) and documents end with [SEP]: fill-mask must frame the
    # text the same way, and its numbers are the model's softmax at the [MASK] position. The tiny trained
    # model barely uses its context, so its weights are replaced by large random ones that do.
    import pretrain.inference as inference
    from pretrain.checkpoint import load_pretrained

    def load_sharp(run, device):
        model, cfg, tok, meta = load_pretrained(run, device)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model, cfg, tok, meta

    _, run = mlm_run
    monkeypatch.setattr(inference, "load_pretrained", load_sharp)
    model, _cfg, tok, _ = load_sharp(run, "cpu")
    text = "the king [MASK] the crown"
    ids = [tok.cls_id, *tok.encode(text), tok.eot_id]
    assert tok.decode([tok.eot_id]) == "[SEP]"
    from pretrain.hardware import autocast_context

    with torch.no_grad(), autocast_context(torch.device("cpu"), "auto"):  # the dtype fill-mask runs in
        probs = model(torch.tensor([ids]))[0, ids.index(tok.mask_id)].float().softmax(-1)
    p, i = probs.topk(3)
    got = inference.fill_mask(run, text, top_k=3, device="cpu")[0]
    assert [o["id"] for o in got] == i.tolist()
    assert [o["prob"] for o in got] == pytest.approx(p.tolist(), abs=1e-4)
    assert got[0]["prob"] > 0.05  # the check can tell framings apart


def test_fill_mask_and_generate_errors(mlm_run, capsys):
    root, run = mlm_run
    err = error_of(capsys, "fill-mask", str(run), "the king took the crown")
    assert "[MASK]" in err
    assert "top_k" in error_of(capsys, "fill-mask", str(run), "the [MASK]", "--top-k", "0")
    err = error_of(capsys, "generate", str(run), "--prompt", "the king")
    assert "masked-LM" in err and "fill-mask" in err
    # a causal-LM run cannot fill masks (trained here on the same WordPiece data, 2 steps)
    clm = root / "clm_run"
    assert main(["train", "--out", str(clm), *overrides(TINY_TRAIN), "--data.path", str(root / "data"),
                 "--train.max_steps", "2", "--quiet"]) == 0
    err = error_of(capsys, "fill-mask", str(clm), "the king [MASK] the crown")
    assert "mlm" in err


def test_mlm_config_errors(mlm_run, tmp_path, capsys):
    root, _ = mlm_run
    base = [*overrides(TINY_TRAIN), "--data.path", str(root / "data"), "--quiet"]
    err = error_of(capsys, "train", "--out", str(tmp_path / "a"), "--objective", "mlm", *base)
    assert "model.arch" in err
    err = error_of(capsys, "train", "--out", str(tmp_path / "b"), "--model.arch", "bert", *base)
    assert "model.arch" in err
    assert "mask_prob" in error_of(capsys, "train", "--out", str(tmp_path / "c"), *MLM_ARGS, *base,
                                   "--mlm.mask_prob", "1.5")
    # char data has no [MASK] token
    assert main(["prepare", str(root / "corpus"), "--out", str(tmp_path / "char"),
                 "--tokenizer", "char"]) == 0
    err = error_of(capsys, "train", "--out", str(tmp_path / "d"), *MLM_ARGS, *overrides(TINY_TRAIN),
                   "--data.path", str(tmp_path / "char"), "--quiet")
    assert "wordpiece" in err
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_mlm_whole_word_training_runs(mlm_run, tmp_path, capsys):
    root, _ = mlm_run
    run = tmp_path / "wwm"
    assert main(["train", "--out", str(run), *MLM_ARGS, *overrides(TINY_TRAIN),
                 "--data.path", str(root / "data"),
                 "--mlm.whole_word", "true", "--mlm.mask_prob", "0.3", "--train.max_steps", "3",
                 "--train.eval_interval", "3", "--quiet"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and 0.0 <= rows[-1]["val_accuracy"] <= 1.0



# ======================================================================== padded documents (packing false)


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


def test_mlm_padded_documents_train_and_eval(mlm_run, tmp_path, capsys):
    root, _ = mlm_run
    run = tmp_path / "padded"
    assert main(["train", "--out", str(run), *MLM_ARGS, *overrides(TINY_TRAIN),
                 "--data.path", str(root / "data"), "--data.packing", "false", "--train.max_steps", "4",
                 "--train.eval_interval", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["objective"] == "mlm" and 0.0 <= ev["accuracy"] <= 1.0
    # a causal LM cannot be trained on padded documents
    err = error_of(capsys, "train", "--out", str(tmp_path / "clm"), *overrides(TINY_TRAIN), "--data.path",
                   str(root / "data"), "--data.packing", "false")
    assert "packing" in err
