"""The fused head + cross-entropy (linear_cross_entropy): the plain loss's value and gradients, in chunks."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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
