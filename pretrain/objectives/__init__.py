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
from pretrain.objectives import clm, mlm, rtd
from pretrain.objectives.losses import unwrap_compiled

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


class ReplacedTokenDetection:
    """ELECTRA's objective (objectives/rtd.py) for an 'electra' model. ``targets``: the real (non-padding)
    tokens, each of which the discriminator predicts; ``loss_sum``: rtd.total_sum (its docstring says how it
    meets the trainer's contract); ``eval_batch``: (loss sum, real tokens, discriminator's correct
    predictions), so a validation accuracy is the discriminator's."""

    name = "rtd"
    reports_bpb = False

    def __init__(self, spec: mlm.MaskingSpec, seed: int, weight: float, eot_id: int | None = None):
        self.spec, self.seed, self.weight = spec, seed, weight
        self.eot_id = eot_id  # set: document masking (attention within each packed document)
        self._banned: torch.Tensor | None = None

    def _prepare(self, batch: torch.Tensor, seed: int) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        ids = mlm.add_cls(batch, self.spec.cls_id)
        attn = None
        if self.spec.pad_id is not None and bool((ids == self.spec.pad_id).any()):
            attn = ids != self.spec.pad_id  # padded documents (data.packing false)
        inputs, labels = mlm.mask_tokens(ids, self.spec, gen, attn)  # every selected position [MASK]
        uniform = torch.rand(ids.shape, generator=gen, device="cpu").to(ids.device)  # the sampling draws
        docs = None if self.eot_id is None else document_ids(ids, self.eot_id)
        return inputs, labels, attn, docs, ids, uniform

    def banned(self, model: nn.Module) -> torch.Tensor:
        """(V,) bool over the model's vocabulary: ids never sampled as replacements."""
        w = unwrap_compiled(model).generator.decoder.weight
        if self._banned is None or self._banned.device != w.device or len(self._banned) != w.size(0):
            self._banned = rtd.banned_ids(w.size(0), self.spec.special_ids, self.spec.vocab_size, w.device)
        return self._banned

    def terms(self, model: nn.Module, prepared: tuple) -> dict:
        """rtd.losses of a prepared batch (the sums, the corrupted ids, the discriminator's labels)."""
        return rtd.losses(model, *prepared, self.banned(model))

    def loss(self, model: nn.Module, batch: torch.Tensor, seed: int) -> torch.Tensor:
        prepared = self.prepare(batch, seed)
        return self.loss_sum(model, prepared) / self.targets(prepared).clamp(min=1)

    def prepare(self, batch: torch.Tensor, seed: int) -> tuple:
        # (generator inputs, labels, attention mask, document ids, original ids, sampling draws)
        return self._prepare(batch, seed)

    def targets(self, prepared: tuple) -> torch.Tensor:
        ids, attn = prepared[4], prepared[2]
        return attn.sum() if attn is not None else torch.tensor(ids.numel(), device=ids.device)

    def loss_sum(self, model: nn.Module, prepared: tuple) -> torch.Tensor:
        return rtd.total_sum(self.terms(model, prepared), self.weight)

    def eval_batch(self, model: nn.Module, batch: torch.Tensor, index: int):
        terms = self.terms(model, self._prepare(batch, 0x5EED + index))  # the same draws at every evaluation
        return rtd.total_sum(terms, self.weight).item(), terms["real"], int(terms["disc_correct"])


def _masking(name: str, tokenizer, mlm_cfg, whole_model_masks: bool) -> mlm.MaskingSpec:
    from pretrain import PretrainError

    if tokenizer.mask_id is None:
        raise PretrainError(f"objective {name!r} needs a tokenizer with a [MASK] token: prepare the data "
                            "with --tokenizer wordpiece (or a tokenizer.json that has [MASK])")
    cont = torch.tensor(tokenizer.continuation_mask()) if mlm_cfg.whole_word else None
    fracs = ({"mask_token_frac": 1.0, "random_token_frac": 0.0} if whole_model_masks else
             {"mask_token_frac": mlm_cfg.mask_token_frac, "random_token_frac": mlm_cfg.random_token_frac})
    return mlm.MaskingSpec(mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id,
                           vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                           mask_prob=mlm_cfg.mask_prob, continuation=cont, pad_id=tokenizer.pad_id,
                           end_frac=mlm_cfg.end_frac, eot_id=tokenizer.eot_id, **fracs)


def build_objective(name: str, tokenizer, mlm_cfg=None, seed: int = 0, doc_mask: bool = False,
                    rtd_cfg=None):
    """The objective ``name`` ('clm', 'mlm' or 'rtd') for data tokenized with ``tokenizer``; ``doc_mask``:
    attention within each document of a packed sequence (documents end with the tokenizer's end-of-text
    token). ``mlm_cfg`` (MLMConfig): the masking of 'mlm' and the positions the generator fills for 'rtd';
    ``rtd_cfg`` (RTDConfig; default: its defaults): the rest of 'rtd'."""
    eot = tokenizer.eot_id if doc_mask else None
    if name == "clm":
        return CausalLM(eot)  # (padded documents are refused for clm by the trainer)
    if name in ("mlm", "rtd") and mlm_cfg is None:
        from pretrain.config import MLMConfig

        mlm_cfg = MLMConfig()
    if name == "mlm":
        return MaskedLM(_masking(name, tokenizer, mlm_cfg, False), seed, eot)
    if name == "rtd":
        from pretrain.config import RTDConfig

        rtd_cfg = rtd_cfg or RTDConfig()
        return ReplacedTokenDetection(_masking(name, tokenizer, mlm_cfg, True), seed, rtd_cfg.weight, eot)
    raise ValueError(f"unknown objective {name!r}")


def build_image_objective(cfg: Config):
    """The image objective ``cfg.objective`` ('mae' or 'supervised') of a resolved run config (its model
    section carries the data's image size and pixel statistics)."""
    from pretrain.objectives.image import MaskedAutoencoding, SupervisedClassification

    m, im = cfg.model, cfg.image
    if cfg.objective == "mae":
        n_patches = (m.image_size // m.patch_size) ** 2
        return MaskedAutoencoding(m.image_mean, m.image_std, im.crop_scale, im.flip, im.mask_ratio,
                                  im.norm_pix_loss, n_patches)
    if cfg.objective == "supervised":
        return SupervisedClassification(m.image_mean, m.image_std, im.crop_scale, im.flip, im.label_smoothing)
    raise ValueError(f"{cfg.objective!r} is not an image objective")


def padded_documents(cfg: Config, tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """(eot_id, pad_id, piece_len) when sequences are single padded documents (data.packing false), else None.
    ``piece_len``: the tokens of a document a row holds, the ones the model sees (a longer document is cut
    into pieces of that many): seq_len, or seq_len - 1 when the masked LM puts [CLS] in front."""
    if cfg.data.packing:
        return None
    if cfg.objective not in ("mlm", "rtd") or tokenizer.pad_id is None:
        raise ConfigError("data.packing false (one padded document per sequence) needs objective mlm (or "
                          "rtd) and a tokenizer with a [PAD] token (prepare with --tokenizer wordpiece)")
    return tokenizer.eot_id, tokenizer.pad_id, cfg.data.seq_len - (tokenizer.cls_id is not None)
