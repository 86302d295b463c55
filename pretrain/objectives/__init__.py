"""Self-supervised objectives: build inputs/labels from a token batch and compute the loss.

An objective turns a (B, T+1) batch of packed token ids into a training loss (``loss``) and into
evaluation sums (``eval_batch``: summed loss, number of predicted tokens, number correct or None).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.objectives import clm, mlm


class CausalLM:
    name = "clm"
    reports_bpb = True

    def loss(self, model: nn.Module, batch: torch.Tensor, seed: int) -> torch.Tensor:
        return clm.loss(model, batch)

    def eval_batch(self, model: nn.Module, batch: torch.Tensor, index: int):
        n = batch[:, 1:].numel()
        return clm.loss(model, batch).item() * n, n, None


class MaskedLM:
    name = "mlm"
    reports_bpb = False

    def __init__(self, spec: mlm.MaskingSpec, seed: int):
        self.spec, self.seed = spec, seed

    def _mask(self, batch: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = mlm.add_cls(batch, self.spec.cls_id)
        attn = None
        if self.spec.pad_id is not None and bool((ids == self.spec.pad_id).any()):
            attn = ids != self.spec.pad_id  # padded documents (data.packing false)
        inputs, labels = mlm.mask_tokens(ids, self.spec, gen, attn)
        return inputs, labels, attn

    def loss(self, model: nn.Module, batch: torch.Tensor, seed: int) -> torch.Tensor:
        inputs, labels, attn = self._mask(batch, seed)
        return mlm.loss_and_accuracy(model, inputs, labels, attn)[0]

    def eval_batch(self, model: nn.Module, batch: torch.Tensor, index: int):
        inputs, labels, attn = self._mask(batch, 0x5EED + index)  # the same masks at every evaluation
        loss, correct, n = mlm.loss_and_accuracy(model, inputs, labels, attn)
        return loss.item() * n, n, int(correct)


def build_objective(name: str, tokenizer, mlm_cfg=None, seed: int = 0):
    """The objective ``name`` ('clm' or 'mlm') for data tokenized with ``tokenizer``."""
    if name == "clm":
        return CausalLM()  # (padded documents are refused for clm by the trainer)
    if name == "mlm":
        from pretrain import PretrainError

        if tokenizer.mask_id is None:
            raise PretrainError("objective 'mlm' needs a tokenizer with a [MASK] token: prepare the data with "
                                "--tokenizer wordpiece (or a tokenizer.json that has [MASK])")
        cont = torch.tensor(tokenizer.continuation_mask()) if mlm_cfg.whole_word else None
        spec = mlm.MaskingSpec(mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id, vocab_size=tokenizer.vocab_size,
                               special_ids=tokenizer.special_ids, mask_prob=mlm_cfg.mask_prob,
                               mask_token_frac=mlm_cfg.mask_token_frac,
                               random_token_frac=mlm_cfg.random_token_frac, continuation=cont,
                               pad_id=tokenizer.pad_id)
        return MaskedLM(spec, seed)
    raise ValueError(f"unknown objective {name!r}")
