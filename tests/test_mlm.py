"""Masked language modelling (BERT-style): masking statistics, the masked-LM loss and objective, and the CLI
end to end (prepare with WordPiece → train --objective mlm → eval / fill-mask), with its errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from _corpus import TINY_TRAIN, overrides, prepared_wordpiece, sentences
from conftest import encoder

from pretrain.cli import main
from pretrain.config import MLMConfig
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


def test_end_frac_masks_only_each_documents_last_token_in_its_rows():
    ids = random_ids(seed=5)
    ids[:, 9::10] = SEP  # documents of 9 tokens, [SEP] after each
    base = mask_tokens(ids, spec(), gen())
    inputs, labels = mask_tokens(ids, spec(end_frac=0.5, eot_id=SEP), gen())
    before_end = torch.zeros_like(ids, dtype=torch.bool)
    before_end[:, :-1] = ids[:, 1:] == SEP
    end_rows = (labels != IGNORE).any(1) & ((labels != IGNORE) == before_end).all(1)
    assert 0.35 < end_rows.float().mean().item() < 0.65  # about half the rows
    assert (inputs[end_rows][before_end[end_rows]] == MASK).all()  # every last token masked, only them
    assert torch.equal(inputs[end_rows][~before_end[end_rows]], ids[end_rows][~before_end[end_rows]])
    # the other rows keep exactly the masks they had without end_frac
    assert torch.equal(labels[~end_rows], base[1][~end_rows])
    assert torch.equal(inputs[~end_rows], base[0][~end_rows])


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
# the loss and the objective


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
    prepared_wordpiece(root)
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

    def load_sharp(run, device, part="encoder"):
        model, cfg, tok, meta = load_pretrained(run, device, part)
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


def test_fill_mask_text_over_the_context_is_an_error_not_cut(mlm_run, capsys):
    _, run = mlm_run
    err = error_of(capsys, "fill-mask", str(run), "the king took the crown " * 10 + "[MASK]")
    assert "tokens with [CLS] and [SEP]" in err and "more than the model's context of 32" in err


def test_every_command_refuses_a_run_whose_tokenizer_was_swapped(mlm_run, tmp_path, capsys):
    import shutil

    root, run = mlm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]  # the same tokens, two of them trading ids: the same size, other ids
    vocab["king"], vocab["crown"] = vocab["crown"], vocab["king"]
    (copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    table = tmp_path / "t.csv"
    table.write_text("text,label\nthe king,a\nthe crown,b\n", encoding="utf-8")
    for args in (["eval", str(copy)], ["fill-mask", str(copy), "the king [MASK] the crown"],
                 ["embed", str(copy), "--input", str(root / "corpus" / "doc_000.txt"),
                  "--out", str(tmp_path / "f.npy")],
                 ["finetune", str(copy), "--train", str(table), "--valid", str(table),
                  "--out", str(tmp_path / "ft")]):
        err = error_of(capsys, *args)
        assert err.startswith(f"error: {copy / 'tokenizer.json'} is not the tokenizer this run was trained "
                              "with: its sha256 is "), args
        assert f"copy {root / 'data' / 'tokenizer.json'}" in err
    shutil.copyfile(root / "data" / "tokenizer.json", copy / "tokenizer.json")  # as the error says
    assert main(["eval", str(copy), "--json"]) == 0
