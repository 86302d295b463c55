"""The GPT model (shapes, causality, KV cache, generation, tied weights), sampling, LR schedules and the
optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import TrainConfig
from pretrain.models import build_model
from pretrain.models.gpt import GPT, KVCache, sample_next
from pretrain.objectives import clm
from pretrain.optim import build_optimizer, lr_at

pytestmark = pytest.mark.usefixtures("torch_single_thread")

V = 50  # vocab of the tiny model
CTX = 32  # its max_seq_len


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


# ================================================================================================ forward


def test_output_shape_and_dtype(tiny_model):
    model = tiny_model()
    x = tokens(3, 20)
    logits = model(x)
    assert logits.shape == (3, 20, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (3, 20, 32)


def test_build_model_and_errors(tiny_model_cfg):
    assert isinstance(build_model(tiny_model_cfg()), GPT)
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny_model_cfg(vocab_size=0))
    model = GPT(tiny_model_cfg())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, CTX + 1))
    model(tokens(1, CTX))  # exactly the context is fine


def test_init_is_seeded_and_scaled(tiny_model):
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    assert torch.equal(a.norm.weight, torch.ones(32))
    o = a.layers[0].self_attn.o_proj.weight.std().item()
    q = a.layers[0].self_attn.qkv_proj.weight.std().item()
    assert q == pytest.approx(0.02, rel=0.15)
    assert o == pytest.approx(0.02 / math.sqrt(4), rel=0.2)  # residual projections scaled by 1/sqrt(2L)


@pytest.mark.parametrize("kv", [0, 2, 1])
def test_causal_masking(tiny_model, kv):
    model = tiny_model(n_kv_head=kv)
    x = tokens(2, 24, seed=3)
    base = model(x)
    for t in (0, 5, 23):
        y = x.clone()
        y[:, t] = (y[:, t] + 1 + torch.arange(2)) % V
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t])  # the past never sees the future
        assert not torch.allclose(out[:, t], base[:, t])  # ... while position t itself does change


def test_batch_rows_are_independent(tiny_model):
    model = tiny_model()
    x = tokens(4, 16, seed=4)
    full = model(x)
    for i in range(4):
        torch.testing.assert_close(model(x[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)


# ================================================================================================ KV cache


@pytest.mark.parametrize("kv", [0, 2])
@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 1, 3, 4, 6], [20]])
def test_kv_cache_matches_full_forward(tiny_model, kv, chunks):
    model = tiny_model(seed=5, n_kv_head=kv)
    x = tokens(2, sum(chunks), seed=6)
    full = model(x)
    cache = KVCache(model.cfg, 2, CTX)
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(x[:, pos:pos + n], cache))
        pos += n
        assert cache.pos == pos
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_shapes_with_gqa(tiny_model_cfg):
    cfg = tiny_model_cfg(n_kv_head=2)
    model = GPT(cfg)
    assert model.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 8, 32)
    cache = KVCache(cfg, 3, 10)
    model(torch.zeros(3, 4, dtype=torch.long), cache)  # allocated on first use
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 10, 8) and cache.pos == 4


def test_kv_cache_respects_context(tiny_model):
    model = tiny_model()
    cache = KVCache(model.cfg, 1, CTX)
    model(tokens(1, CTX - 2), cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 3), cache)


# ================================================================================================ generation


def greedy_rollout(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = prompt
    for _ in range(n):
        nxt = model(out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out


@pytest.mark.parametrize("kv", [0, 2])
def test_greedy_generate_equals_uncached_argmax(tiny_model, kv):
    model = tiny_model(seed=7, n_kv_head=kv)
    prompt = tokens(2, 6, seed=8)
    a = model.generate(prompt, 20, temperature=0.0)
    b = model.generate(prompt, 20, temperature=0.0)
    assert a.shape == (2, 26)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], prompt)
    assert torch.equal(a, greedy_rollout(model, prompt, 20))


def test_generate_restores_training_mode(tiny_model):
    model = tiny_model().train()
    model.generate(tokens(1, 3), 2, temperature=0.0)
    assert model.training
    model.eval()
    model.generate(tokens(1, 3), 2, temperature=0.0)
    assert not model.training


@pytest.mark.parametrize("prompt_len", [5, CTX, CTX + 9])
def test_generate_beyond_context(tiny_model, prompt_len):
    model = tiny_model(seed=9)
    prompt = tokens(2, prompt_len, seed=10)
    out = model.generate(prompt, 3 * CTX, temperature=0.0)
    assert out.shape == (2, prompt_len + 3 * CTX)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < V
    # until the context is full the sliding window changes nothing
    within = max(0, CTX - prompt_len)
    if within:
        assert torch.equal(out[:, :prompt_len + within], greedy_rollout(model, prompt, within))


def test_sampled_generation_is_seeded(tiny_model):
    model = tiny_model(seed=11)
    prompt = tokens(1, 4)

    def run(seed):
        return model.generate(prompt, 40, temperature=1.0, top_k=10, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_generate_stop_token(tiny_model):
    model = tiny_model(seed=12)
    prompt = tokens(1, 4)
    first = model.generate(prompt, 1, temperature=0.0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0.0, stop_token=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


# ================================================================================================ sampling


def test_sample_next_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(4, V) * 30
    for t in (1e-45, 1e-300, 1e-8):
        assert torch.equal(sample_next(logits, t), logits.argmax(-1, keepdim=True))


def test_sample_next_greedy_and_top_k_1():
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    argmax = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next(logits, 0.0), argmax)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), argmax)
        assert torch.equal(sample_next(logits, 2.0, top_p=1e-6, generator=g), argmax)
        assert torch.equal(sample_next(logits, 0.7, top_k=5, top_p=1e-9, generator=g), argmax)


def test_sample_next_top_k_restricts_support():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    top3 = logits.topk(3, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        s = sample_next(logits, 5.0, top_k=3, generator=g)
        assert (s == top3).any(dim=-1).all()


def test_sample_next_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(2)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3
    draws = {int(sample_next(logits, 1.0, generator=g)) for _ in range(500)}
    assert draws == {0, 1, 2, 3}


# ================================================================================================ weights


def test_tied_embeddings_share_storage(tiny_model):
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    n_tied = model.num_params()
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)
    assert untied.num_params() == n_tied + V * 32
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0


def test_loss_and_backward(tiny_model):
    model = tiny_model(seed=13).train()
    batch = tokens(2, 17, seed=14)
    inputs, targets = clm.split_batch(batch)
    assert torch.equal(inputs, batch[:, :-1]) and torch.equal(targets, batch[:, 1:])
    loss = clm.loss(model, batch)
    assert loss.ndim == 0 and abs(loss.item() - math.log(V)) < 0.5  # ~uniform at init
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters())


def test_clm_loss_is_cross_entropy_on_the_logits(tiny_model):
    """The fused head + loss gives what F.cross_entropy on the model's logits gives: value and every
    gradient."""
    import torch.nn.functional as F

    batch = tokens(3, 21, seed=5)
    fused, plain = tiny_model(seed=2).train(), tiny_model(seed=2).train()
    clm.loss(fused, batch, reduction="sum").backward()
    inputs, targets = clm.split_batch(batch)
    logits = plain(inputs)
    F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum").backward()
    assert torch.allclose(clm.loss(fused, batch), F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_the_plain_loss(bf16, bias):
    import torch.nn.functional as F

    from pretrain.objectives.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 50, 16, generator=g).requires_grad_()
    w = (torch.randn(37, 16, generator=g) * 0.5).requires_grad_()
    b = torch.randn(37, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, 37, (2, 50), generator=g)
    t[0, ::3] = -100  # ignored positions take no loss and give no gradient
    params = [x for x in (h, w, b) if x is not None]
    tol = 1e-2 if bf16 else 1e-5  # relative error of a whole gradient (bf16: its rounding)
    for reduction in ("mean", "sum"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ref = F.cross_entropy(F.linear(h, w, b).float().reshape(-1, 37), t.reshape(-1),
                                  reduction=reduction)
        want = torch.autograd.grad(ref, params)
        for chunk in (1, 7, 100, 1000):  # chunks that do and do not divide the 100 rows
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                got = linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_rows=chunk)
            assert torch.allclose(got, ref, rtol=1e-5 if not bf16 else 1e-3), (reduction, chunk)
            for a, c in zip(torch.autograd.grad(got * 3.0, params), want):
                assert (a - 3.0 * c).norm() <= tol * (3.0 * c).norm(), (reduction, chunk)
    with torch.no_grad():  # evaluation: no gradient work, the same value
        assert torch.allclose(linear_cross_entropy(h, w, t, bias=b), F.cross_entropy(
            F.linear(h, w, b).reshape(-1, 37), t.reshape(-1)), rtol=1e-5 if not bf16 else 1e-2)
    loss, correct = linear_cross_entropy(h, w, t, bias=b, chunk_rows=7, return_correct=True)
    want_correct = ((F.linear(h, w, b).argmax(-1) == t) & (t != -100)).sum()
    assert correct.item() == want_correct.item() and not correct.requires_grad
    twice = linear_cross_entropy(h, w, t, bias=b)
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # its gradients were used up, not summed again silently
        twice.backward()
    none = torch.full_like(t, -100)
    assert linear_cross_entropy(h, w, none).item() == 0.0  # nothing to score: 0, not NaN
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_linear_cross_entropy_on_cuda_in_bf16():
    import torch.nn.functional as F

    from pretrain.objectives.losses import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 128, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(50304, 128, device="cuda", generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, 50304, (4096,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    want = torch.autograd.grad(ref, [h, w])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t)  # default chunks: 667 rows of 50,304 logits
    assert torch.allclose(got, ref, rtol=1e-3)
    for a, c in zip(torch.autograd.grad(got, [h, w]), want):
        assert (a - c).norm() <= 1e-2 * c.norm()


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


# ================================================================================================ schedules


def tc(**kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    base.update(kw)
    return TrainConfig(**base)


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


# ================================================================================================ optimizer


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
