"""Replaced-token detection (ELECTRA, Clark et al. 2020): a small masked-LM generator fills selected positions
with plausible tokens, and the discriminator tells, for every token, whether it is the original.

One step, for a batch of ids (a model of architecture 'electra', models/electra.py):

1. select positions as the masked LM does (``mlm.mask_tokens``: ``mlm.mask_prob``, whole words with
   ``mlm.whole_word``, never special tokens nor padding) and put [MASK] at every one of them (ELECTRA: no
   80/10/10 split);
2. the generator's masked-LM loss on the selected positions (cross-entropy, head fused with the loss);
3. replacements sampled from the generator's distribution, without gradient (the discriminator's loss does
   not flow into the generator). The draw is an inverse-CDF sample with one uniform number per position,
   drawn on the CPU from the batch's seeded generator, so the samples depend only on the seed and the
   weights: an exactly resumed run draws the same ones. Special tokens are never sampled;
4. the discriminator sees the corrupted sequence and predicts, for every real (non-padding) token, whether
   it was replaced: binary cross-entropy on one logit per token. A sample equal to the original counts as
   original (label 0), as in ELECTRA;
5. total = generator loss + ``rtd.weight`` (lambda, 50) x discriminator loss, each a mean per token.

The trainer's contract (objectives/__init__.py) sums ``loss_sum`` over micro-batches and divides by the summed
``targets``. Targets are the real tokens (the discriminator's predictions); a micro-batch's ``loss_sum`` is
``weight x (BCE summed over its real tokens) + (generator CE summed over its masked tokens) x (its real tokens
/ its masked tokens)``. Divided by the real tokens of the step, that is the discriminator's mean BCE (every
real token alike) times the weight, plus the generator's per-micro-batch mean CE averaged with weights
proportional to each micro-batch's real tokens: with one micro-batch, exactly ELECTRA's loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.losses import linear_cross_entropy, unwrap_compiled
from pretrain.objectives.mlm import IGNORE

SAMPLE_ROWS = 4096  # rows of generator logits sampled at a time (bounds the (rows, V) fp32 softmax)


def sample_tokens(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  uniform: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """One token per row of ``features`` (N, C), drawn from softmax(features @ weight.T + bias) with the
    ``banned`` (V,) ids left out, by inverse CDF with ``uniform`` (N,) numbers in [0, 1). No gradient."""
    out = torch.empty(features.size(0), dtype=torch.long, device=features.device)
    with torch.no_grad():
        for s in range(0, features.size(0), SAMPLE_ROWS):
            logits = F.linear(features[s:s + SAMPLE_ROWS], weight, bias).float()
            probs = logits.masked_fill(banned, float("-inf")).softmax(dim=-1)
            cdf = probs.cumsum(dim=-1)
            u = (uniform[s:s + SAMPLE_ROWS].to(cdf.dtype) * cdf[:, -1])[:, None].contiguous()
            # the first id whose cumulative probability exceeds u: never one of probability 0
            out[s:s + SAMPLE_ROWS] = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.size(1) - 1)
    return out


def banned_ids(vocab: int, special_ids: list[int], tokenizer_vocab: int,
               device: torch.device) -> torch.Tensor:
    """(vocab,) bool: the ids a replacement may not take (special tokens, ids beyond the tokenizer's)."""
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[torch.tensor(special_ids, dtype=torch.long, device=device)] = True
    banned[tokenizer_vocab:] = True
    return banned


def losses(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
           doc_ids: torch.Tensor | None, ids: torch.Tensor, uniform: torch.Tensor,
           banned: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """The sums of one batch: ``gen_sum`` (generator CE over the masked positions), ``gen_correct``,
    ``masked``; ``disc_sum`` (BCE over the real tokens), ``disc_correct``, ``real``, ``replaced`` (how many
    real tokens differ from the original); and ``corrupted`` (B, T) ids, ``disc_labels`` (B, T) (1 = replaced)
    and ``disc_logits`` (B, T).

    inputs: ``ids`` with [MASK] at the selected positions; labels: the original ids there, IGNORE elsewhere;
    uniform (B, T): the sampling draw of each position."""
    m = unwrap_compiled(model)
    extra = {} if doc_ids is None else {"doc_ids": doc_ids}
    sel = labels != IGNORE
    n_masked = int(sel.sum())
    dec = m.generator.decoder
    if n_masked:
        h = model(inputs, attention_mask=attention_mask, return_hidden=True, select=sel, part="generator",
                  **extra)  # (N, C): the generator's last block runs on the selected positions only
        feats = m.generator_features(h)
        gen_sum, gen_correct = linear_cross_entropy(feats, dec.weight, labels[sel], bias=dec.bias,
                                                    reduction="sum", return_correct=True)
        sampled = sample_tokens(feats.detach(), dec.weight.detach(), dec.bias.detach(), uniform[sel], banned)
        corrupted = ids.masked_scatter(sel, sampled)  # (row-major, the order of ``select``)
    else:  # nothing to fill: a zero that still reaches every generator parameter (DDP waits for each)
        h = model(inputs, attention_mask=attention_mask, return_hidden=True, part="generator", **extra)
        gen_sum = dec(m.generator_features(h[:, :1])).sum() * 0.0
        gen_correct = torch.zeros((), dtype=torch.long, device=ids.device)
        corrupted = ids
    replaced = corrupted != ids  # a sample equal to the original is an original
    logits = model(corrupted, attention_mask=attention_mask, **extra).float()  # (B, T) replaced-token logits
    real = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool())
    target = replaced.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    disc_sum = bce[real].sum()
    disc_correct = ((logits > 0) == replaced)[real].sum()
    return {"gen_sum": gen_sum, "gen_correct": gen_correct, "masked": n_masked, "disc_sum": disc_sum,
            "disc_correct": disc_correct, "real": int(real.sum()), "replaced": int((replaced & real).sum()),
            "corrupted": corrupted, "disc_labels": replaced.long(), "disc_logits": logits.detach()}


def total_sum(terms: dict, weight: float) -> torch.Tensor:
    """weight x discriminator BCE sum + generator CE sum x (real / masked tokens): divided by the real
    tokens, the step's loss (see the module's docstring)."""
    gen = terms["gen_sum"] * (terms["real"] / terms["masked"]) if terms["masked"] else terms["gen_sum"]
    return weight * terms["disc_sum"] + gen
