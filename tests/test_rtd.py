"""Replaced-token detection (ELECTRA): the 'electra' architecture (a generator and a discriminator sharing one
embedding Parameter), the 'rtd' objective (labels, sampling, losses), and a run through the whole system:
training, exact resume, evaluation, features, fine-tuning and export of the discriminator as a plain
encoder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _corpus import TINY_TRAIN, overrides, prepared_wordpiece

from pretrain.cli import main
from pretrain.config import ConfigError, MLMConfig, ModelConfig, RTDConfig, load_config
from pretrain.models import build_model, get_spec, spec_of
from pretrain.models.bert import Encoder
from pretrain.models.electra import Electra
from pretrain.objectives import build_objective, rtd
from pretrain.objectives.mlm import IGNORE

pytestmark = pytest.mark.usefixtures("torch_single_thread")

V, PAD, CLS, MASK, EOT = 50, 0, 1, 2, 3


def electra_cfg(**kw) -> ModelConfig:
    base = dict(arch="electra", n_layer=2, n_head=2, d_model=32, vocab_size=V, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def fake_tokenizer() -> SimpleNamespace:
    return SimpleNamespace(mask_id=MASK, cls_id=CLS, pad_id=PAD, eot_id=EOT, unk_id=4, vocab_size=V,
                           special_ids=[PAD, CLS, MASK, EOT, 4], continuation_mask=lambda: [False] * V)


def test_generator_and_discriminator_share_one_embedding_parameter():
    torch.manual_seed(0)
    model = build_model(electra_cfg())
    assert isinstance(model, Electra) and spec_of(model) is get_spec("electra")
    d, g = model.discriminator, model.generator
    assert isinstance(d, Encoder) and isinstance(g, Encoder)
    emb = d.tok_embeddings.weight
    assert g.tok_embeddings.weight is emb and g.decoder.weight is emb and d.decoder.weight is emb
    assert sum(p is emb for p in model.parameters()) == 1  # one Parameter, counted (and optimized) once
    # a smaller generator of the same width; the discriminator is the run's size, as a bert encoder
    assert (g.cfg.d_model, g.cfg.n_layer, g.cfg.ff_dim) == (32, 1, 64)
    assert d.cfg.arch == g.cfg.arch == "bert" and d.cfg.n_layer == 2 and d.cfg.ff_dim == 128
    assert len(get_spec("electra").block_list(model)) == 3  # both encoders' blocks (FSDP, checkpointing)
    # the discriminator's MLM output is unused by RTD: no gradient is expected of it (DDP)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["discriminator.decoder.bias"]
    # forward: the discriminator's hidden states, or one replaced-token logit per position
    x = torch.randint(5, V, (2, 10))
    assert model(x, return_hidden=True).shape == (2, 10, 32) and model(x).shape == (2, 10)
    torch.testing.assert_close(model(x, return_hidden=True), d(x, return_hidden=True))
    # the state dict round-trips (the shared weight saved under one name is enough)
    again = build_model(electra_cfg())
    again.load_state_dict(model.state_dict())
    assert again.generator.tok_embeddings.weight is again.discriminator.tok_embeddings.weight


def test_generator_size_from_the_config():
    model = build_model(electra_cfg(n_layer=8, generator_layers=3, generator_heads=1, generator_ff=96))
    assert (model.generator.cfg.n_layer, model.generator.cfg.n_head, model.generator.cfg.ff_dim) == (3, 1, 96)
    assert build_model(electra_cfg(n_layer=8)).generator.cfg.n_layer == 2  # n_layer // 4
    with pytest.raises(ConfigError, match="generator_heads"):
        electra_cfg(generator_heads=3)


def test_sampling_follows_the_generator_and_skips_banned_ids():
    feats = torch.eye(4)[:3]  # logits = weight rows' first 3 columns
    probs = torch.tensor([[0.2, 0.0, 0.0], [0.5, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weight = torch.log(probs + 1e-30)
    weight = torch.cat([weight, torch.zeros(4, 1)], 1)  # (V=4, C=4)
    h = feats[:1].expand(20000, 4)  # every row: logits log([0.2, 0.5, 0.3, ~0])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    banned = torch.tensor([False, False, False, True])
    out = rtd.sample_tokens(h, weight, None, u, banned)
    freq = torch.bincount(out, minlength=4).float() / len(out)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3, 0.0]), atol=0.015, rtol=0)
    assert torch.equal(out, rtd.sample_tokens(h, weight, None, u, banned))  # the draws decide: deterministic
    banned = torch.tensor([False, True, False, False])
    assert not (rtd.sample_tokens(h, weight, None, u, banned) == 1).any()


def test_labels_replaced_sampled_equal_original_and_padding():
    torch.manual_seed(0)
    model = build_model(electra_cfg()).eval()
    obj = build_objective("rtd", fake_tokenizer(), MLMConfig(mask_prob=0.5), 0, False, RTDConfig(weight=50))
    k = 7  # the generator always samples token k
    with torch.no_grad():
        model.generator.decoder.bias[k] = 1e4
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(5, 12, (3, 25), generator=g)  # small ids: many originals equal k
    batch[2, 15:] = PAD  # a padded document
    prepared = obj.prepare(batch, seed=5)
    inputs, labels, attn, docs, ids, uniform = prepared
    sel = labels != IGNORE
    assert attn is not None and not sel[~attn].any() and (inputs[sel] == MASK).all()
    with torch.no_grad():
        t = obj.terms(model, prepared)
    corrupted, lab = t["corrupted"], t["disc_labels"]
    assert (corrupted[sel] == k).all() and torch.equal(corrupted[~sel], ids[~sel])
    assert (lab[sel & (ids != k)] == 1).all()  # replaced ↔ 1
    assert (lab[sel & (ids == k)] == 0).all() and bool((sel & (ids == k)).any())  # sampled = original ↔ 0
    assert (lab[~sel] == 0).all()
    real = attn.bool()
    assert t["real"] == int(real.sum()) == int(obj.targets(prepared))
    assert t["replaced"] == int((sel & (ids != k)).sum())
    # the discriminator's loss is over the real tokens only (padding excluded)
    with torch.no_grad():
        logits = model(corrupted, attention_mask=attn).float()
    want = F.binary_cross_entropy_with_logits(logits[real], lab[real].float(), reduction="sum")
    torch.testing.assert_close(t["disc_sum"], want, rtol=1e-5, atol=1e-4)
    assert int(t["disc_correct"]) == int(((logits > 0) == lab.bool())[real].sum())
    # total = weight x BCE sum + generator CE sum x real / masked; its mean per real token is the loss
    with torch.no_grad():
        total = obj.loss_sum(model, prepared)
        mean = obj.loss(model, batch, seed=5)
    assert float(total) == pytest.approx(50 * float(want) + float(t["gen_sum"]) * t["real"] / t["masked"],
                                         rel=1e-5)
    assert float(mean) == pytest.approx(float(total) / t["real"], rel=1e-6)
    loss_sum, n, correct = obj.eval_batch(model, batch, 0)
    assert n == t["real"] and 0 <= correct <= n and loss_sum > 0


def test_loss_is_finite_and_decreases_and_reaches_every_trained_parameter():
    torch.manual_seed(0)
    model = build_model(electra_cfg())
    obj = build_objective("rtd", fake_tokenizer(), MLMConfig(mask_prob=0.25), 0, False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    # a structured corpus: each row counts upwards from a random start (the generator can learn it)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(120):
        start = torch.randint(5, 30, (8, 1), generator=g)
        batch = start + torch.arange(21)[None]
        loss = obj.loss(model, batch, seed=step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter that requires a gradient gets one (DDP needs no unused parameter)
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_rtd_with_a_bert_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="set model.arch: electra"):
        load_config(None, ["--objective", "rtd", "--model.arch", "bert"])
    with pytest.raises(ConfigError, match="trains a 'bert' model"):
        load_config(None, ["--objective", "mlm", "--model.arch", "electra"])
    with pytest.raises(ConfigError, match="mask_token_frac"):
        load_config(None, ["--objective", "rtd", "--model.arch", "electra", "--mlm.mask_token_frac", "0.5"])
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        load_config(None, ["--objective", "rtd", "--model.arch", "electra", "--rtd.wieght", "3"])


# ---------------------------------------------------------------------------------------- through the system

ARGS = ["--objective", "rtd", "--model.arch", "electra"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtd_data")
    return prepared_wordpiece(root, n_docs=8)


def train_args(data_dir) -> list[str]:
    return [*overrides(TINY_TRAIN), *ARGS, "--data.path", str(data_dir), "--quiet"]


def losses(run) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("rtd_run") / "run"
    assert main(["train", "--out", str(out), *train_args(data_dir)]) == 0
    return out


def test_run_trains_and_evaluates_the_whole_model(run):
    from pretrain.checkpoint import load_pretrained
    from pretrain.inference import evaluate_run

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert all(map(torch.isfinite, torch.tensor(train))) and train[-1] < train[0]
    val = [r for r in rows if "val_accuracy" in r]
    assert val and 0.5 < val[-1]["val_accuracy"] <= 1.0  # the discriminator's accuracy
    res = evaluate_run(run, max_batches=2)
    assert res["objective"] == "rtd" and 0.5 < res["accuracy"] <= 1.0
    whole, cfg, _, _ = load_pretrained(run, part="whole")
    assert isinstance(whole, Electra) and cfg.objective == "rtd"
    part, pcfg, _, _ = load_pretrained(run)  # the default: the part that transfers
    assert type(part) is Encoder and pcfg.model.arch == "bert" and pcfg.objective == "mlm"
    assert pcfg.model.n_layer == cfg.model.n_layer and pcfg.model.generator_layers == 0
    assert all(torch.equal(v, whole.discriminator.state_dict()[k]) for k, v in part.state_dict().items())


def test_stop_and_resume_is_exact(tmp_path, data_dir, run):
    cut = tmp_path / "cut"
    assert main(["train", "--out", str(cut), *train_args(data_dir), "--train.stop_at_step", "13"]) == 0
    assert max(losses(cut)) == 13
    assert main(["train", "--resume", str(cut), "--train.stop_at_step", "0", "--quiet"]) == 0
    assert losses(cut) == losses(run)


def test_features_and_fine_tuning_use_the_discriminator(run, tmp_path):
    import numpy as np

    from pretrain.checkpoint import load_pretrained
    from pretrain.config import FinetuneConfig
    from pretrain.features import embed
    from pretrain.finetune.loop import finetune
    from pretrain.finetune.predict import load_finetuned

    texts = tmp_path / "texts.jsonl"
    rows = [{"text": "the king saw the river", "label": "a"},
            {"text": "a queen held the crown", "label": "b"}]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows * 20), encoding="utf-8")
    res = embed(run, texts, tmp_path / "emb.npy", pooling="cls")
    vecs = np.load(tmp_path / "emb.npy")
    assert res["dim"] == 32 and vecs.shape == (40, 32) and np.isfinite(vecs).all()
    disc, cfg, tok, _ = load_pretrained(run)
    ids = torch.tensor([[tok.cls_id, *tok.encode(rows[0]["text"]), tok.eot_id]])
    with torch.no_grad():
        want = disc(ids, attention_mask=torch.ones_like(ids), return_hidden=True)[0, 0]
    np.testing.assert_allclose(vecs[0], want.numpy(), atol=1e-4)

    ft = finetune(run, texts, texts, tmp_path / "ft",
                  FinetuneConfig(epochs=1, batch_size=8, lr=3e-3, patience=0), quiet=True)
    assert ft["steps"] >= 1
    model, info, _ = load_finetuned(tmp_path / "ft")
    assert type(model.backbone) is Encoder and info["backbone"]["model"]["arch"] == "bert"
    assert info["encoder"] and info["pooling"] == "cls"


def test_export_writes_the_discriminator_as_modernbert(run, tmp_path):
    from pretrain.checkpoint import load_pretrained
    from pretrain.export import export_hf

    res = export_hf(run, tmp_path / "hf")
    assert res["architecture"] == "ModernBertForMaskedLM"
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "modernbert" and conf["num_hidden_layers"] == 2
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "objective `rtd`" in card and "part of the trained `electra` model" in card
    transformers = pytest.importorskip("transformers")
    disc, _, _, _ = load_pretrained(run)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        ours, ours_logits = disc(x, attention_mask=mask, return_hidden=True), disc(x, attention_mask=mask)
        theirs = hf.model(input_ids=x, attention_mask=mask).last_hidden_state  # after the final norm
        theirs_logits = hf(input_ids=x, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
    assert (ours_logits[real] - theirs_logits[real]).abs().max().item() <= 1e-4
