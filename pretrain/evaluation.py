"""Validation: the mean loss of a model on (part of) a prepared split, with perplexity, and bits per byte
(causal LM) or accuracy (masked LM); image losses and k-NN accuracy; ranking metrics of held-out items
(item sequences). Used by the training loop, ``pretrain eval`` and the benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from pretrain import PretrainError
from pretrain.data.interactions import SPECIALS, Interactions
from pretrain.data.loader import TokenSplit, eval_batches
from pretrain.hardware import autocast_context
from pretrain.models import spec_of
from pretrain.objectives import CausalLM

K_DEFAULT = 10


def evaluate(model: nn.Module, split: TokenSplit, seq_len: int, batch_size: int, device: torch.device,
             dtype: str = "auto", max_batches: int | None = None, objective=None,
             documents: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Mean loss over (part of) a split with perplexity, and bits per byte (causal LM) or accuracy (masked
    LM)."""
    objective = objective or CausalLM()
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(eval_batches(split, seq_len, batch_size, max_batches, documents)):
            batch = batch.to(device, non_blocking=True)
            with autocast_context(device, dtype):
                loss_sum, count, right = objective.eval_batch(model, batch, i)
            total, n = total + loss_sum, n + count
            correct = None if right is None else correct + right
    model.train(was_training)
    mean = total / max(n, 1)
    out = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": n}
    if correct is not None:
        out["accuracy"] = correct / max(n, 1)
    if objective.reports_bpb and split.bytes:
        out["bpb"] = mean / math.log(2) * split.tokens / split.bytes
    return out


def _batch_on(split, idx, device: torch.device):
    from pretrain.data.loader import image_batch

    images, labels = image_batch(split, idx)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def evaluate_images(model: nn.Module, split, batch_size: int, device: torch.device, dtype: str = "auto",
                    max_batches: int | None = None, objective=None) -> dict[str, float]:
    """The objective's mean validation loss per image over (part of) an image split (the same images and
    masks at every evaluation), and accuracy for objectives that classify."""
    from pretrain.data.loader import eval_image_indices

    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, idx in enumerate(eval_image_indices(len(split), batch_size, max_batches)):
            with autocast_context(device, dtype):
                loss_sum, count, right = objective.eval_batch(model, _batch_on(split, idx, device), i)
            total, n = total + loss_sum, n + count
            correct = None if right is None else correct + right
    model.train(was_training)
    out = {"loss": total / max(n, 1), "images": n}
    if correct is not None:
        out["accuracy"] = correct / max(n, 1)
    return out


@torch.no_grad()
def image_features(model: nn.Module, images, idx, pixels, batch_size: int, device: torch.device,
                   dtype: str = "auto", pooling: str = "cls") -> torch.Tensor:
    """(len(idx), D) float features (``model.features``) of images ``idx`` of ``images`` (anything with
    ``images(index) -> (k, H, W, C) uint8``: an ImageSplit), batch by batch; ``pixels``: uint8 array → the
    model's normalised input on ``device``."""
    out = []
    for i in range(0, len(idx), batch_size):
        with autocast_context(device, dtype):
            out.append(model.features(pixels(images.images(idx[i:i + batch_size])), pooling).float())
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "feature_dim", 0), device=device)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, labels: torch.Tensor,
                 n_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Accuracy of a weighted k-nearest-neighbour vote (cosine similarity; each neighbour's vote exp(sim /
    temperature), as in Wu et al. 2018 / DINO) of ``query`` features among ``bank`` features."""
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    query = torch.nn.functional.normalize(query.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(query), 1024):
        sim = query[i:i + 1024] @ bank.T
        top, where = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), n_classes, device=top.device)
        votes.scatter_add_(1, bank_labels[where], (top / temperature).exp())
        correct += int((votes.argmax(1) == labels[i:i + 1024]).sum())
    return correct / max(len(query), 1)


def knn_monitor(model: nn.Module, train_split, val_split, objective, batch_size: int, device: torch.device,
                dtype: str = "auto", k: int = 20, bank_size: int = 5000, max_batches: int | None = None,
                seed: int = 0) -> float | None:
    """The self-supervised monitor: k-NN accuracy of the (frozen) features of the validation images used in
    evaluation among those of ``bank_size`` training images (a fixed seeded sample). None when the data has
    no labels."""
    import numpy as np

    from pretrain.data.loader import eval_image_indices

    if train_split.labels is None or val_split.labels is None or k <= 0:
        return None
    n = len(train_split)
    bank_idx = np.sort(np.random.default_rng([seed, 0xB4A7]).permutation(n)[:min(bank_size, n)])
    val_idx = np.concatenate(eval_image_indices(len(val_split), batch_size, max_batches)
                             or [np.zeros(0, np.int64)])
    was_training = model.training
    model.eval()
    try:
        def pixels(a):
            return objective.pixels(torch.from_numpy(np.ascontiguousarray(a)).to(device))

        bank = image_features(model, train_split, bank_idx, pixels, batch_size, device, dtype)
        query = image_features(model, val_split, val_idx, pixels, batch_size, device, dtype)
    finally:
        model.train(was_training)
    n_classes = int(max(train_split.labels.max(), val_split.labels.max())) + 1
    return knn_accuracy(bank, torch.from_numpy(train_split.labels[bank_idx]).to(bank.device), query,
                        torch.from_numpy(val_split.labels[val_idx]).to(query.device), n_classes, k)


# ----------------------------------------------------------------------------------------------------------
# ranking: items after a history (item sequences; see recommend.py)


def rank_of_target(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray] | None = None,
                   ) -> np.ndarray:
    """1-based rank of ``targets[b]`` among the candidates of row b of ``scores`` (B, V): every id except
    those in ``excluded[b]`` (the target itself always stays a candidate). Ties: the lower id ranks first."""
    s = np.array(scores, dtype=np.float64, copy=True)
    rows = np.arange(len(targets))
    t = s[rows, targets]
    if excluded is not None:
        for b, ex in enumerate(excluded):
            s[b, ex] = -np.inf
    s[rows, targets] = np.inf  # not counted against itself
    ids = np.arange(s.shape[1])
    above = (s > t[:, None]).sum(1) - 1  # (minus the target, now +inf)
    ties = ((s == t[:, None]) & (ids[None, :] < targets[:, None])).sum(1)
    return (1 + above + ties).astype(np.int64)


def ranking_metrics(ranks: np.ndarray, k: int = K_DEFAULT) -> dict[str, float]:
    """HR@k (the target in the top k), NDCG@k (1 / log2(rank + 1) within the top k: one relevant item, so
    the ideal DCG is 1) and MRR (mean 1 / rank over the whole ranking) of 1-based ``ranks``."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise PretrainError("no users to rank")
    top = r <= k
    ndcg = np.where(top, 1.0 / np.log2(r + 1.0), 0.0)
    return {f"hr@{k}": float(top.mean()), f"ndcg@{k}": float(ndcg.mean()), "mrr": float((1.0 / r).mean())}


@dataclass
class ItemScorer:
    """Scores every vocabulary id as what comes after a history, with a run's model: a causal LM at the last
    position (of the history's last ``context`` items), a masked LM at a [MASK] appended and followed by the
    end-of-sequence token, as every user's sequence ends in training (the last ``context - 2`` items)."""

    model: torch.nn.Module
    masked: bool
    context: int
    pad_id: int
    mask_id: int | None
    eot_id: int
    device: torch.device
    dtype: str = "fp32"

    @torch.no_grad()
    def scores(self, histories: list[np.ndarray]) -> torch.Tensor:
        room = self.context - (2 if self.masked else 0)
        if any(len(h) == 0 for h in histories):
            raise PretrainError("an empty history has nothing to recommend from")
        rows = [np.asarray(h[-room:], np.int64) for h in histories]
        if self.masked:
            rows = [np.concatenate([r, [self.mask_id, self.eot_id]]) for r in rows]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(r)] = torch.from_numpy(r)
        lengths = torch.tensor([len(r) for r in rows])
        x = x.to(self.device)
        m = self.model
        with autocast_context(self.device, self.dtype):
            if spec_of(m).bidirectional:
                mask = (torch.arange(width)[None, :] < lengths[:, None]).to(self.device)
                hidden = m(x, attention_mask=mask, return_hidden=True)
            else:  # causal: right padding never reaches the real positions
                hidden = m(x, return_hidden=True)
            at = lengths - (2 if self.masked else 1)  # the [MASK], or the last item
            h = hidden[torch.arange(len(rows), device=self.device), at.to(self.device)]
            if hasattr(m, "head_features"):  # (a masked LM's head transform before its projection)
                h = m.head_features(h)
            head = spec_of(m).output_head(m)
            logits = torch.nn.functional.linear(h, head.weight, head.bias)
        return logits.float().cpu()


def item_scorer(model: torch.nn.Module, cfg, tok, device: torch.device) -> ItemScorer:
    """The :class:`ItemScorer` of a run (its objective says causal or masked)."""
    if cfg.objective not in ("clm", "mlm"):
        raise PretrainError(f"recommendations need a run trained with objective clm (next item) or mlm "
                            f"(masked items), not {cfg.objective!r}")
    return ItemScorer(model, cfg.objective == "mlm", cfg.model.max_seq_len, tok.pad_id or 0, tok.mask_id,
                      tok.eot_id, device, cfg.train.dtype)


def evaluate_scores(score_fn, histories: list[np.ndarray], targets: np.ndarray, vocab_size: int,
                    k: int = K_DEFAULT, negatives: int = 0, seed: int = 0, batch: int = 256,
                    ) -> dict[str, float]:
    """Ranking metrics (:func:`ranking_metrics`) of :func:`target_ranks`."""
    return ranking_metrics(target_ranks(score_fn, histories, targets, vocab_size, negatives, seed, batch), k)


def ndcg_at(ranks: np.ndarray, k: int = K_DEFAULT) -> np.ndarray:
    """Per pair: 1 / log2(rank + 1) when the rank is within ``k``, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0,
                      ) -> dict[str, float]:
    """Mean of ``a - b`` over paired observations (per-user metrics of two rankers on the same users) with
    a 95% bootstrap interval (users resampled with replacement, seeded)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)]}


def target_ranks(score_fn, histories: list[np.ndarray], targets: np.ndarray, vocab_size: int,
                 negatives: int = 0, seed: int = 0, batch: int = 256) -> np.ndarray:
    """1-based rank of each target under ``score_fn`` (histories → (B, V) scores): full ranking over every
    non-special id with the history excluded (the target kept); with ``negatives`` > 0, the target among
    that many ids drawn at random (seeded) from the items outside the history instead."""
    n_special = len(SPECIALS)
    ranks = []
    rng = np.random.default_rng(seed)
    for lo in range(0, len(histories), batch):
        hs, ts = histories[lo:lo + batch], targets[lo:lo + batch]
        s = np.asarray(score_fn(hs), dtype=np.float64)
        excluded = [np.concatenate([np.arange(n_special), np.setdiff1d(h, [t])]) for h, t in zip(hs, ts)]
        if negatives:
            sub = np.full_like(s, -np.inf)
            for b, (ex, t) in enumerate(zip(excluded, ts)):
                pool = np.setdiff1d(np.arange(vocab_size), np.concatenate([ex, [t]]))
                pick = rng.choice(pool, size=min(negatives, len(pool)), replace=False)
                sub[b, pick] = s[b, pick]
                sub[b, t] = s[b, t]
            s, excluded = sub, None
        ranks.append(rank_of_target(s, ts, excluded))
    return np.concatenate(ranks)


def validation_ranking(cfg, tokenizer, max_users: int = 0, k: int = K_DEFAULT):
    """For the training loop (an item-sequence run): model → ranking metrics (HR@k, NDCG@k, MRR) of the
    validation items of ``cfg.data.path``, full ranking, for an evenly spread ``max_users`` users (0: all)."""
    data = Interactions(cfg.data.path)
    histories, targets = data.held_out("val", data.users_spread(max_users))

    def monitor(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            scorer = item_scorer(model, cfg, tokenizer, next(model.parameters()).device)
            return evaluate_scores(lambda hs: scorer.scores(hs).numpy(), histories, targets,
                                   tokenizer.vocab_size, k)
        finally:
            model.train(was)

    return monitor
