"""The GPT model: shapes, causality, KV cache, generation, sampling, tied weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CTX, V, tokens

from pretrain.models import build_model
from pretrain.models.gpt import GPT, KVCache, sample_next

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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


# =============================================================================================== KV cache


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


# ============================================================================================= generation


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


# =============================================================================================== sampling


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
