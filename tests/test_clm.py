"""The causal-LM objective: next-token targets, its loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import V, tokens

from pretrain.objectives import clm

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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
