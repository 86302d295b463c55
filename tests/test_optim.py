"""Optimizers and learning-rate schedules: AdamW's parameter groups, Muon (which parameters it takes, its
Newton-Schulz orthogonalisation), warmup, cosine, WSD, constant and the time-based schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import encoder, tokens

from pretrain.config import TrainConfig
from pretrain.objectives import clm
from pretrain.optim import build_optimizer, lr_at

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tc(**kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    base.update(kw)
    return TrainConfig(**base)


# ============================================================================================== schedules


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    cfg = tc(schedule=schedule)
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak right after warmup


def test_cosine():
    cfg = tc(schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing after warmup
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway
    assert lr_at(110, cfg) == pytest.approx(1e-4)  # ends at min_lr_ratio * lr
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # and stays there
    assert lr_at(109, cfg) > 1e-4


def test_wsd():
    cfg = tc(schedule="wsd", decay_frac=0.2)  # decay over the last 22 of 110 steps → from step 88
    assert all(lr_at(s, cfg) == pytest.approx(1e-3) for s in range(10, 89))
    assert lr_at(99, cfg) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 11 / 22)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(88, 111)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_constant_and_no_warmup():
    cfg = tc(schedule="constant", warmup_steps=0)
    assert [lr_at(s, cfg) for s in (0, 1, 50, 1000)] == [1e-3] * 4
    assert lr_at(0, tc(schedule="cosine", warmup_steps=0)) == pytest.approx(1e-3)


def test_time_fraction_moves_the_decay_on():
    """train.time_schedule: after the (step) warmup the lr is the lower of the schedule by steps and by
    time."""
    cfg = tc(schedule="cosine", max_steps=100_000)
    assert [lr_at(s, cfg, 0.5) for s in range(10)] == [lr_at(s, cfg) for s in range(10)]  # warmup in steps
    assert lr_at(20, cfg, 0.5) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the time budget
    assert lr_at(20, cfg, 1.0) == pytest.approx(1e-4)
    assert lr_at(20, cfg, 0.0) == lr_at(20, cfg)  # no time fraction: by steps alone
    short = tc(schedule="cosine")  # 110 steps: the steps run out first, time does not slow the decay
    assert lr_at(110, short, 0.1) == pytest.approx(1e-4)
    wsd = tc(schedule="wsd", decay_frac=0.2, max_steps=100_000)
    assert lr_at(20, wsd, 0.79) == pytest.approx(1e-3)
    assert lr_at(20, wsd, 0.9) == pytest.approx((1e-3 + 1e-4) / 2)


# ================================================================================================== AdamW


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizer_groups(tiny_model, tie):
    model = tiny_model(tie_embeddings=tie)
    opt = build_optimizer(model, tc(weight_decay=0.1), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice, even when tied
    assert set(ids) == {id(p) for p in model.parameters()}  # ... and none left out
    assert any(p is model.embed_tokens.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == pytest.approx(1e-3)


def test_build_optimizer_skips_frozen(tiny_model):
    model = tiny_model()
    model.norm.weight.requires_grad_(False)
    opt = build_optimizer(model, tc(), "cpu")
    assert all(p is not model.norm.weight for g in opt.param_groups for p in g["params"])


def test_optimizer_step_reduces_loss(tiny_model):
    model = tiny_model(seed=15).train()
    opt = build_optimizer(model, tc(lr=1e-2, weight_decay=0.0), "cpu")
    batch = tokens(4, 17, seed=16)
    first = clm.loss(model, batch).item()
    for _ in range(15):
        opt.zero_grad()
        clm.loss(model, batch).backward()
        opt.step()
    assert clm.loss(model, batch).item() < first - 0.5  # it can overfit one batch


# =================================================================================================== Muon


@pytest.mark.parametrize("native_bf16", [False, True])
def test_newton_schulz_orthogonalizes_in_the_dtype_the_cpu_has(native_bf16, monkeypatch):
    """Muon's update is close to U V^T of the gradient's SVD (singular values near 1, same singular vectors),
    computed in bf16 where the CPU has native bf16 and in fp32 elsewhere."""
    import pretrain.hardware as hardware
    from pretrain.optim import zeropower_newton_schulz

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)
    seen = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: seen.append(a.dtype) or real_mm(a, b))
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    out = zeropower_newton_schulz(g)
    assert out.dtype == g.dtype and set(seen) == {torch.bfloat16 if native_bf16 else torch.float32}
    s = torch.linalg.svdvals(out.float())
    assert s.min() > 0.5 and s.max() < 1.3  # Muon's quintic: singular values pushed into ~[0.7, 1.2]
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), out.float().flatten(), dim=0) > 0.95


@pytest.mark.parametrize("batch_elements", [0, 24 * 16])  # 0: the default; 24 * 16: one matrix a batch
def test_muon_orthogonalizes_same_shaped_matrices_together_with_the_same_result(batch_elements, monkeypatch):
    """Muon stacks the updates of same-shaped matrices into one batched Newton-Schulz: each matrix moves
    exactly as Muon's rule applied to it alone (Nesterov momentum, orthogonalize, scale, decay)."""
    import pretrain.hardware as hardware
    from pretrain.optim import Muon, zeropower_newton_schulz

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)  # fp32: rounding far below atol

    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16, 16), (24, 16), (16, 40)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    lr, mom, wd = 0.02, 0.95, 0.1
    opt = Muon(params, lr=lr, momentum=mom, weight_decay=wd)
    if batch_elements:
        opt.BATCH_ELEMENTS = batch_elements
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # the rule, one matrix at a time
            bufs[i].lerp_(g, 1 - mom)
            u = zeropower_newton_schulz(g.lerp(bufs[i], mom)) * max(1.0, g.size(0) / g.size(1)) ** 0.5
            ref[i] = ref[i] * (1 - lr * wd) - lr * u
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


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
