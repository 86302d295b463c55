"""Forgetting: how much of what pre-training taught a backbone is lost while it is fine-tuned, and replay of
pre-training batches to limit it.

The measure is the backbone's own pre-training objective (the causal or masked LM loss, masks fixed as in
``pretrain eval``) on the validation split of the data it was pre-trained on, before fine-tuning and on the
model the fine-tune keeps (its best evaluation): ``finetune.json``'s ``forgetting``. Measured when that data
is still there, tokenized with the run's tokenizer, and the backbone is a language model with its LM head
(causal or masked LM runs; not ELECTRA's discriminator, whose LM head pre-training never trained, nor image
runs); otherwise ``forgetting`` says why not.

Replay (``replay`` = a prepared data directory, ``replay_frac``): that share of the optimizer steps are
pre-training steps — a batch of the directory's train split under the pre-training objective, on the same
optimizer and learning-rate schedule — interleaved evenly with the task's (0.1: one replay step after every
nine task steps). A form of rehearsal (Robins 1995; used for LMs as "pre-training mix" by Ouyang et al.
2022's PPO-ptx, here as whole steps rather than a weighted loss term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain import PretrainError
from pretrain.config import Config, FinetuneConfig

LM_OBJECTIVES = ("clm", "mlm")


def pretraining_objective(ckpt: str | Path, pcfg: Config) -> str:
    """The objective the backbone's run was pre-trained with (``pcfg`` describes the part that transfers,
    whose objective is that part's own: an ELECTRA run's discriminator reads as 'mlm'). A fine-tuned model's
    directory carries it in finetune.json."""
    from pretrain.checkpoint import read_meta
    from pretrain.finetune.model import is_finetuned

    if is_finetuned(ckpt):
        import json

        from pretrain.finetune.predict import FT_FILE

        info = json.loads((Path(ckpt) / FT_FILE).read_text(encoding="utf-8"))
        return str(info.get("pretraining_objective") or pcfg.objective)
    return str(read_meta(Path(ckpt)).get("config", {}).get("objective", pcfg.objective))


def _check_tokens(data_dir: Path, tok, what: str) -> dict[str, Any]:
    """``data_dir``'s meta.json, checked to be text tokenized with ``tok``."""
    from pretrain.data.manifest import load_meta

    meta = load_meta(data_dir)
    if meta.get("kind") in ("images", "interactions") or "tokenizer" not in meta:
        raise PretrainError(f"{what} {data_dir} is not prepared text (kind {meta.get('kind')!r})")
    if meta["tokenizer"].get("sha256") != tok.sha256():
        raise PretrainError(f"{what} {data_dir} was tokenized with another tokenizer than the backbone's; "
                            "prepare it with --tokenizer RUN/tokenizer.json")
    return meta


@dataclass
class Probe:
    """The backbone's pre-training objective on its pre-training data's validation split."""

    objective: Any
    split: Any
    seq_len: int
    batch_size: int
    max_batches: int
    documents: tuple[int, int, int] | None
    data: str

    def loss(self, backbone: nn.Module, device: torch.device, dtype: str) -> dict[str, float]:
        from pretrain.evaluation import evaluate

        return evaluate(backbone, self.split, self.seq_len, self.batch_size, device, dtype, self.max_batches,
                        self.objective, self.documents)


def _objective(pcfg: Config, tok, objective: str):
    from pretrain.objectives import build_objective

    return build_objective(objective, tok, pcfg.mlm, pcfg.train.seed, pcfg.data.doc_mask, pcfg.rtd)


def probe(pcfg: Config, tok, objective: str, cfg: FinetuneConfig) -> tuple[Probe | None, str]:
    """(the :class:`Probe`, '') where forgetting can be measured, else (None, why not)."""
    from pretrain.data.loader import TokenSplit, eval_windows
    from pretrain.objectives import padded_documents

    if cfg.forgetting_batches == 0:
        return None, "not asked (forgetting_batches 0)"
    if tok is None:
        return None, "image runs: not measured"
    if objective not in LM_OBJECTIVES or pcfg.objective != objective:
        return None, (f"the backbone was pre-trained with objective {objective!r}: only causal and masked LM "
                      "backbones carry their pre-training head")
    if cfg.from_scratch:
        return None, "from scratch: there is no pre-training to forget"
    data = Path(pcfg.data.path)
    if not (data / "meta.json").is_file():
        return None, f"the run's pre-training data {data} is not there"
    try:
        _check_tokens(data, tok, "the run's pre-training data")
        split = TokenSplit(data, "val")
    except Exception as e:  # (a changed or damaged folder: say so, fine-tune anyway)
        return None, f"the run's pre-training data cannot be used: {e}"
    if not eval_windows(split, pcfg.data.seq_len):
        return None, f"the validation split of {data} is too short for one sequence"
    return Probe(_objective(pcfg, tok, objective), split, pcfg.data.seq_len, 8, cfg.forgetting_batches,
                 padded_documents(pcfg, tok), str(data)), ""


class Replay:
    """Pre-training batches (the train split of ``cfg.replay``) and the credit that spaces them: after each
    task step, :meth:`due` says how many replay steps follow."""

    def __init__(self, cfg: FinetuneConfig, pcfg: Config, tok, objective: str, encoder_frozen: bool):
        from pretrain.data.loader import TokenSplit, train_loader
        from pretrain.objectives import padded_documents

        if tok is None:
            raise PretrainError("replay mixes pre-training text batches in: image runs have none")
        if objective not in LM_OBJECTIVES or pcfg.objective != objective:
            raise PretrainError(f"replay needs a causal or masked LM backbone; this one was pre-trained with "
                                f"objective {objective!r}")
        if encoder_frozen:
            raise PretrainError("replay trains the backbone; with head_only it has nothing to train")
        data = Path(cfg.replay)
        if not (data / "meta.json").is_file():
            raise PretrainError(f"replay data {data} is not a prepared data directory (no meta.json)")
        _check_tokens(data, tok, "replay data")
        self.loader = train_loader(TokenSplit(data, "train"), pcfg.data.seq_len, cfg.batch_size,
                                   padded_documents(pcfg, tok), seed=cfg.seed)
        self.objective = _objective(pcfg, tok, objective)
        self.ratio = cfg.replay_frac / (1 - cfg.replay_frac)
        self.credit, self.steps, self.loss_sum = 0.0, 0, 0.0

    def due(self) -> int:
        self.credit += self.ratio
        n = int(math.floor(self.credit + 1e-9))
        self.credit -= n
        return n

    def summary(self, cfg: FinetuneConfig) -> dict[str, Any]:
        return {"data": cfg.replay, "frac": cfg.replay_frac, "steps": self.steps,
                "mean_loss": self.loss_sum / self.steps if self.steps else None}

    def loss(self, backbone: nn.Module, device: torch.device, dtype: str) -> torch.Tensor:
        from pretrain.hardware import autocast_context

        batch = self.loader.next_batch().to(device)
        with autocast_context(device, dtype):
            loss = self.objective.loss(backbone, batch, self.steps)
        self.steps += 1
        return loss


def report(before: dict[str, float], after: dict[str, float], p: Probe, replay: Replay | None,
           cfg: FinetuneConfig) -> dict[str, Any]:
    """finetune.json's ``forgetting``: the pre-training validation loss before and after, and its change."""
    return {"data": p.data, "split": "val", "tokens": before["tokens"], "before": before["loss"],
            "after": after["loss"], "change": after["loss"] - before["loss"],
            "relative": after["loss"] / before["loss"] - 1 if before["loss"] else None,
            "replay": None if replay is None else replay.summary(cfg)}
