"""Output head and cross-entropy in one pass, chunk by chunk (a "fused linear cross-entropy").

The plain way, ``F.cross_entropy(hidden @ W.T, targets)``, materializes the (N, V) logits, keeps them for
backward, and walks them several more times: an fp32 copy, log-softmax, its saved output, the zero-filled
gradient of the gather, the log-softmax backward. At N = 2,048 tokens and V = 8,192 that is 64 MiB per pass,
far beyond a CPU's caches, and on a small model those passes cost as much as the head's matrix products.

Here the rows go through in chunks of a few MiB of logits: for each chunk, its logits, their log-sum-exp and
the loss, and right away (when a gradient is wanted) the gradient of the logits, ``softmax - one_hot``, which
goes straight into the gradients of the hidden states (``G @ W``) and of the head (``G.T @ h``, summed over
chunks in fp32, as micro-batches of a step sum into ``.grad``). Backward then only scales those by the
incoming gradient. The arithmetic is that of the plain way (three products of the head's size); what goes is
the traffic and the (N, V) memory. Under autocast the products run in the autocast dtype (bf16), the softmax
in fp32, exactly as autocast runs ``F.linear`` and ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

# logits per chunk (elements): a few MiB on a CPU, so a chunk's softmax stays in cache; larger on a GPU,
# where the point is the memory, and chunks must stay big enough to keep the products efficient. A chunk
# has at least as many rows as the head has columns (C): each chunk adds a (V, C) partial gradient into
# the head's, which must not cost more than the chunk's own (rows, V) logits (at GPT-2's 50,304 x 768, a
# 41-row chunk made the step 1.25x slower on a CPU)
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``-d model wraps (the model itself otherwise), for its head."""
    return getattr(model, "_orig_mod", model)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, dtype: torch.dtype, chunk: int,
                need_h: bool, need_w: bool, count_correct: bool):
        n = hidden.size(0)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)  # argmax == target, if counted
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_w and bias is not None else None
        # buffers reused by every chunk: fresh (c, V) and (V, C) tensors per chunk would each be new memory
        # the kernel has to fault in page by page, which on a CPU costs more than the arithmetic on them
        v = weight.size(0)
        rows = min(chunk, n)
        low = dtype != torch.float32
        z_buf = torch.empty(rows, v, dtype=torch.float32, device=h.device)
        low_buf = torch.empty(rows, v, dtype=dtype, device=h.device) if low else None  # bf16 logits, then g
        part = torch.empty(weight.shape, dtype=dtype, device=h.device) if need_w and low else None
        part32 = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_w and low else None
        wt = w.t()
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            c = hc.size(0)
            z = z_buf[:c]
            out = low_buf[:c] if low else z
            if b is None:
                torch.mm(hc, wt, out=out)  # (c, V) logits
            else:
                torch.addmm(b, hc, wt, out=out)
            if low:
                z.copy_(out)  # the softmax in fp32
            valid = tc != ignore_index
            t = torch.where(valid, tc, torch.zeros_like(tc))[:, None]
            target_logit = z.gather(1, t).squeeze(1)
            if count_correct:
                correct += ((z.argmax(dim=1) == tc) & valid).sum()
            top = z.amax(dim=1, keepdim=True)
            e = z.sub_(top).exp_()  # in place of the logits: one pass for the loss and the softmax
            total_exp = e.sum(dim=1)
            lse = top.squeeze(1) + total_exp.log()
            total += ((lse - target_logit) * valid).sum()
            if need_h or need_w:
                g = e.mul_((valid / total_exp)[:, None])  # softmax; ignored rows: no gradient
                g.scatter_add_(1, t, -valid[:, None].to(g.dtype))  # minus the one-hot target
                if grad_b is not None:
                    grad_b += g.sum(0)  # from the fp32 gradient of the logits
                if low:
                    g = out.copy_(g)  # back to the product dtype, in the logits' buffer
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + c])
                if need_w:
                    if low:  # bf16 products, summed in fp32
                        grad_w.add_(part32.copy_(torch.mm(g.t(), hc, out=part)))
                    else:
                        grad_w.addmm_(g.t(), hc)
        # kept on ctx, not saved for backward: they are neither inputs nor outputs, and backward scales
        # them in place (no new (V, C) tensors); a second backward through the same loss is an error, not
        # a wrong sum
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_correct):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dt in zip(grads, ctx.dtypes):  # scaled in fp32 (in place where the gradient is fp32 already)
            out.append(None if g is None
                       else (g if g.dtype == torch.float32 else g.float()).mul_(grad_out).to(dt))
        return (*out, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, reduction: str = "mean",
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None,
                         return_correct: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, without the full logits.

    hidden (..., C), weight (V, C), targets (...) with ``ignore_index`` where no loss is taken. ``reduction``
    "mean" (over the targets that count; 0 when none do) or "sum". Equal to
    ``F.cross_entropy((hidden @ weight.T).float(), targets)`` in value and gradients, up to rounding.
    ``return_correct``: also the number of counted targets that are their row's argmax (accuracy)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    if h.size(0) != t.size(0):
        raise ValueError(f"{h.size(0)} hidden rows but {t.size(0)} targets")
    dtype = _compute_dtype(h)
    grad = torch.is_grad_enabled()
    need_h = grad and h.requires_grad
    need_w = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if chunk_rows is None:
        per = CHUNK_ELEMENTS.get(h.device.type, CHUNK_ELEMENTS["cuda"])
        chunk_rows = max(16, per // weight.size(0), weight.size(1))
    with torch.autocast(h.device.type, enabled=False):
        total, correct = _LinearCrossEntropy.apply(h, weight, bias, t, ignore_index, dtype,
                                                   max(1, chunk_rows), need_h, need_w, return_correct)
    if reduction == "mean":
        total = total / (t != ignore_index).sum().clamp(min=1)
    return (total, correct) if return_correct else total
