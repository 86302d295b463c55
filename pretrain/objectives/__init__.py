"""Self-supervised objectives: build inputs/labels from a token batch and compute the loss.

An objective turns a (B, T+1) batch of packed token ids into a training loss (``loss``: the mean over the
batch's predicted tokens) and into evaluation sums (``eval_batch``: summed loss, number of predicted tokens,
number correct or None).

The trainer weighs every predicted token alike across the micro-batches of a step and across processes
(not a mean of per-micro-batch means, which over-weighs the tokens of a micro-batch with few targets, e.g.
masked LM): it first ``prepare``-s all micro-batches of the step (inputs, labels, masks), counts their targets
(``targets``; summed over processes), then back-propagates ``loss_sum`` of each scaled by one common factor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pretrain.config import Config, ConfigError
from pretrain.models.layers import document_ids
from pretrain.objectives import clm, mlm

if TYPE_CHECKING:
    from pretrain.data.tokenizer import Tokenizer


class CausalLM:
    name = "clm"
    reports_bpb = True

    def __init__(self, eot_id: int | None = None):
        self.eot_id = eot_id  # set: document masking (attention within each packed document)

    def loss(self, model: nn.Module, batch: torch.Tensor, seed: int) -> torch.Tensor:
        return clm.loss(model, batch, self.eot_id)

    def prepare(self, batch: torch.Tensor, seed: int) -> tuple:
        return (batch,)

    def targets(self, prepared: tuple) -> torch.Tensor:
        batch = prepared[0]
        return torch.tensor((batch.size(1) - 1) * batch.size(0), device=batch.device)

    def loss_sum(self, model: nn.Module, prepared: tuple) -> torch.Tensor:
        return clm.loss(model, prepared[0], self.eot_id, reduction="sum")

    def eval_batch(self, model: nn.Module, batch: torch.Tensor, index: int):
        n = batch[:, 1:].numel()
        return clm.loss(model, batch, self.eot_id).item() * n, n, None


class MaskedLM:
    name = "mlm"
    reports_bpb = False

    def __init__(self, spec: mlm.MaskingSpec, seed: int, eot_id: int | None = None):
        self.spec, self.seed = spec, seed
        self.eot_id = eot_id  # set: document masking (attention within each packed document)

    def _docs(self, inputs_ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.eot_id is None else document_ids(inputs_ids, self.eot_id)

    def _mask(self, batch: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = mlm.add_cls(batch, self.spec.cls_id)
        attn = None
        if self.spec.pad_id is not None and bool((ids == self.spec.pad_id).any()):
            attn = ids != self.spec.pad_id  # padded documents (data.packing false)
        inputs, labels = mlm.mask_tokens(ids, self.spec, gen, attn)
        return inputs, labels, attn, self._docs(ids)  # documents from the uncorrupted ids

    def loss(self, model: nn.Module, batch: torch.Tensor, seed: int) -> torch.Tensor:
        inputs, labels, attn, docs = self._mask(batch, seed)
        return mlm.loss_and_accuracy(model, inputs, labels, attn, docs)[0]

    def prepare(self, batch: torch.Tensor, seed: int) -> tuple:
        return self._mask(batch, seed)  # (inputs, labels, attention mask, document ids)

    def targets(self, prepared: tuple) -> torch.Tensor:
        return (prepared[1] != mlm.IGNORE).sum()

    def loss_sum(self, model: nn.Module, prepared: tuple) -> torch.Tensor:
        return mlm.loss_and_accuracy(model, *prepared, reduction="sum")[0]

    def eval_batch(self, model: nn.Module, batch: torch.Tensor, index: int):
        inputs, labels, attn, docs = self._mask(batch, 0x5EED + index)  # the same masks at every evaluation
        loss, correct, n = mlm.loss_and_accuracy(model, inputs, labels, attn, docs)
        return loss.item() * n, n, int(correct)


def build_objective(name: str, tokenizer, mlm_cfg=None, seed: int = 0, doc_mask: bool = False):
    """The objective ``name`` ('clm' or 'mlm') for data tokenized with ``tokenizer``; ``doc_mask``: attention
    within each document of a packed sequence (documents end with the tokenizer's end-of-text token)."""
    eot = tokenizer.eot_id if doc_mask else None
    if name == "clm":
        return CausalLM(eot)  # (padded documents are refused for clm by the trainer)
    if name == "mlm":
        from pretrain import PretrainError

        if tokenizer.mask_id is None:
            raise PretrainError("objective 'mlm' needs a tokenizer with a [MASK] token: prepare the data "
                                "with --tokenizer wordpiece (or a tokenizer.json that has [MASK])")
        cont = torch.tensor(tokenizer.continuation_mask()) if mlm_cfg.whole_word else None
        spec = mlm.MaskingSpec(mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id,
                               vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                               mask_prob=mlm_cfg.mask_prob,
                               mask_token_frac=mlm_cfg.mask_token_frac,
                               random_token_frac=mlm_cfg.random_token_frac, continuation=cont,
                               pad_id=tokenizer.pad_id)
        return MaskedLM(spec, seed, eot)
    raise ValueError(f"unknown objective {name!r}")


def padded_documents(cfg: Config, tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """(eot_id, pad_id, piece_len) when sequences are single padded documents (data.packing false), else None.
    ``piece_len``: the tokens of a document a row holds, the ones the model sees (a longer document is cut
    into pieces of that many): seq_len, or seq_len - 1 when the masked LM puts [CLS] in front."""
    if cfg.data.packing:
        return None
    if cfg.objective != "mlm" or tokenizer.pad_id is None:
        raise ConfigError("data.packing false (one padded document per sequence) needs objective mlm and a "
                          "tokenizer with a [PAD] token (prepare with --tokenizer wordpiece)")
    return tokenizer.eot_id, tokenizer.pad_id, cfg.data.seq_len - (tokenizer.cls_id is not None)
