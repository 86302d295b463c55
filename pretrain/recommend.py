"""Recommendations from a run pre-trained on item sequences (data/interactions.py), and how good they are.

A causal LM (``objective: clm``, SASRec's task) scores every item as the next one after a user's history: the
output head at the history's last position. A masked LM (``objective: mlm``, BERT4Rec's task) scores them at
a [MASK] put after the history. Either way the scores are logits over the whole vocabulary; the special
tokens and, for recommendations, the items already in the history never come out.

Evaluation (``pretrain eval RUN --rec``) follows the leave-one-out protocol: for the split ``val`` the history
is each user's training items and the target the next one; for ``test`` the history includes the validation
item. Every target is ranked against **every** item (full ranking; the other items of the user's history
excluded, the target itself always a candidate; ties go to the more frequent item, the lower id), and the
same users are ranked by two baselines fitted on the same histories: popularity (how many histories hold the
item) and item-kNN (item-to-item cosine similarity of co-occurrence in histories, summed over the user's
items). Sampled-negative metrics (the target among ``negatives`` random unseen items, as SASRec and BERT4Rec
report them) are an explicit option, never the default: they inflate every figure and can reorder models
(Krichene & Rendle, KDD 2020).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import PretrainError
from pretrain.data.interactions import SPECIALS, Interactions
from pretrain.evaluation import (
    K_DEFAULT,
    evaluate_scores,
    item_scorer,
    ndcg_at,
    paired_difference,
    ranking_metrics,
    target_ranks,
)

# ----------------------------------------------------------------------------------------------------------
# baselines


def popularity_scores(histories: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """(V,) how many of ``histories`` hold each item (each history counts an item once)."""
    counts = np.zeros(vocab_size, np.float64)
    for h in histories:
        counts[np.unique(h)] += 1
    return counts


KNN_DECAYS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
"""Recency decays the item-kNN baseline is tuned over (on the validation items)."""
KNN_ALL_ITEMS = 20_000
"""``neighbours`` 0 keeps every neighbour up to this many items; a larger catalogue keeps 500."""


class ItemKNN:
    """Item-to-item collaborative filtering (Sarwar et al. 2001): cosine similarity between items' columns
    of the binary user × item matrix of ``histories``, the ``neighbours`` most similar kept per item (0: all,
    up to KNN_ALL_ITEMS items); a user's score for item j is the sum of w(h) sim(h, j) over the items h of
    the user's history, w = ``decay`` ** (how many items ago h was last seen): 1.0 weighs the whole history
    alike, as the classic method does; a smaller decay favours the latest items, which is what a sequence
    model exploits (a fair baseline for one)."""

    def __init__(self, histories: list[np.ndarray], vocab_size: int, neighbours: int = 0, decay: float = 1.0,
                 block: int = 1024):
        from scipy import sparse

        if not neighbours and vocab_size > KNN_ALL_ITEMS:
            neighbours = 500
        self.vocab_size, self.decay, self.neighbours = vocab_size, decay, neighbours or vocab_size - 1
        rows = np.concatenate([np.full(len(np.unique(h)), u) for u, h in enumerate(histories)])
        cols = np.concatenate([np.unique(h) for h in histories])
        x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                              shape=(len(histories), vocab_size))
        norms = np.sqrt(np.asarray(x.sum(0)).ravel())
        xn = (x @ sparse.diags(1.0 / np.maximum(norms, 1e-12))).tocsc().astype(np.float32)
        xt = xn.T.tocsr()
        out_r, out_c, out_v = [], [], []
        k = min(self.neighbours, vocab_size - 1)
        for lo in range(0, vocab_size, block):  # (block, V) dense similarities at a time: bounded memory
            hi = min(vocab_size, lo + block)
            sim = np.asarray((xt[lo:hi] @ xn).todense())
            sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # not its own neighbour
            if k < vocab_size - 1:
                keep = np.argpartition(-sim, k, axis=1)[:, :k]
                vals = np.take_along_axis(sim, keep, 1)
            else:
                keep = np.broadcast_to(np.arange(vocab_size), sim.shape)
                vals = sim
            nz = vals > 0
            out_r.append(np.nonzero(nz)[0] + lo)
            out_c.append(keep[nz])
            out_v.append(vals[nz])
        self.sim = sparse.csr_matrix((np.concatenate(out_v), (np.concatenate(out_r), np.concatenate(out_c))),
                                     shape=(vocab_size, vocab_size))

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, V) scores of every item for each history."""
        from scipy import sparse

        rows, cols, vals = [], [], []
        for b, h in enumerate(histories):
            last: dict[int, int] = {}  # item → how many items ago it was last seen
            for age, item in enumerate(np.asarray(h)[::-1].tolist()):
                last.setdefault(item, age)
            items = np.fromiter(last.keys(), np.int64, len(last))
            rows.append(np.full(len(items), b))
            cols.append(items)
            vals.append(self.decay ** np.fromiter(last.values(), np.float64, len(last)))
        q = sparse.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows),
                                                                          np.concatenate(cols))),
                              shape=(len(histories), self.vocab_size))
        return np.asarray((q @ self.sim).todense(), dtype=np.float64)


def is_item_vocabulary(tok) -> bool:
    """Whether a tokenizer is an item vocabulary made by ``prepare --interactions`` (WordLevel, our
    specials first)."""
    import json

    spec = json.loads(tok.to_str())
    return (spec.get("model", {}).get("type") == "WordLevel"
            and [tok.tk.id_to_token(i) for i in range(len(SPECIALS))] == SPECIALS)


def load_item_run(run: str | Path, device: str = "auto"):
    """(model in eval mode, Config, Tokenizer, checkpoint meta) of a run trained on item sequences."""
    from pretrain.checkpoint import CheckpointError, load_pretrained
    from pretrain.hardware import resolve_device

    dev = resolve_device(device)
    try:
        model, cfg, tok, meta = load_pretrained(run, dev, part="whole")
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    if tok is None or not is_item_vocabulary(tok):
        raise PretrainError(f"{run} was not trained on item sequences (prepare an interaction log with "
                            "`pretrain prepare LOG --interactions` and train on it)")
    return model, cfg, tok, meta, dev


# ----------------------------------------------------------------------------------------------------------
# evaluation


def tuned_knn(data: Interactions, vocab_size: int, users: np.ndarray, neighbours: int = 0, k: int = K_DEFAULT,
              decays: tuple[float, ...] = KNN_DECAYS) -> tuple[float, dict[str, float]]:
    """The recency decay of :class:`ItemKNN` with the best NDCG@k on the validation items of ``users``
    (fitted on every user's training items), and the validation metrics of each decay tried."""
    hist, _ = data.held_out("val")
    qh, qt = data.held_out("val", users)
    knn = ItemKNN(hist, vocab_size, neighbours)
    tried = {}
    for d in decays:
        knn.decay = d
        tried[str(d)] = evaluate_scores(knn.scores, qh, qt, vocab_size, k)[f"ndcg@{k}"]
    return float(max(tried, key=lambda d: tried[d])), tried


def evaluate_rec(run: str | Path, data_dir: str | Path | None = None, split: str = "test", k: int = K_DEFAULT,
                 negatives: int = 0, max_users: int = 0, neighbours: int = 0, device: str = "auto",
                 batch_size: int = 128, baselines: bool = True) -> dict[str, Any]:
    """HR@k, NDCG@k and MRR of a run's recommendations on the held-out items of ``split`` of its prepared
    interactions (``data_dir``; default: the run's), beside the popularity and item-kNN baselines on the same
    users and histories, each fitted on every user's histories of that split (item-kNN's recency decay tuned
    on the validation items, :func:`tuned_knn`). ``max_users``: an evenly spread subset of the users (0:
    all)."""
    model, cfg, tok, meta, dev = load_item_run(run, device)
    data = Interactions(data_dir or cfg.data.path)
    if data.tokenizer.sha256() != tok.sha256():
        raise PretrainError(f"{data.data_dir} has another item vocabulary than {run} was trained on: "
                            "evaluate on the data the run was prepared from")
    if split not in ("val", "test"):
        raise PretrainError(f"--split must be val or test for ranking (the held-out items), not {split!r}")
    users = data.users_spread(max_users)
    histories, targets = data.held_out(split, users)
    scorer = item_scorer(model, cfg, tok, dev)
    res: dict[str, Any] = {"split": split, "users": len(users), "items": data.meta["interactions"]["items"],
                           "k": k, "ranking": f"sampled ({negatives} negatives)" if negatives else "full",
                           "objective": cfg.objective, "step": meta.get("step")}
    common = {"vocab_size": tok.vocab_size, "negatives": negatives}
    ranks = {"model": target_ranks(lambda hs: scorer.scores(hs).numpy(), histories, targets,
                                   batch=batch_size, **common)}
    if baselines:
        all_hist, _ = data.held_out(split)  # (every user's, not only the evaluated ones)
        pop = popularity_scores(all_hist, tok.vocab_size)
        ranks["popularity"] = target_ranks(lambda hs: np.broadcast_to(pop, (len(hs), len(pop))), histories,
                                           targets, **common)
        decay, tried = tuned_knn(data, tok.vocab_size, users, neighbours, k)
        knn = ItemKNN(all_hist, tok.vocab_size, neighbours, decay)
        ranks["item_knn"] = target_ranks(knn.scores, histories, targets, **common)
        res["item_knn_settings"] = {"neighbours": knn.neighbours, "decay": decay,
                                    f"val_ndcg@{k}_by_decay": tried}
    for name, r in ranks.items():
        res[name] = ranking_metrics(r, k)
    # the model minus each baseline, user by user: is the difference more than the luck of these users?
    res["paired"] = {f"ndcg@{k}_minus_{name}": paired_difference(ndcg_at(ranks["model"], k), ndcg_at(r, k))
                     for name, r in ranks.items() if name != "model"}
    return res


# ----------------------------------------------------------------------------------------------------------
# recommending


def parse_history(history: str | list, tok) -> tuple[list[str], np.ndarray]:
    """'1,29,32' (or a list of ids) → (the item ids, their token ids); unknown ids are one error naming
    them."""
    ids = [str(x).strip() for x in (history.split(",") if isinstance(history, str) else history)]
    ids = [x for x in ids if x]
    if not ids:
        raise PretrainError("--history is empty: give item ids, comma-separated (e.g. --history 1,29,32)")
    vocab = tok.tk.get_vocab()
    unknown = [x for x in ids if x not in vocab or vocab[x] < len(SPECIALS)]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise PretrainError(f"unknown item id{'s' if len(unknown) > 1 else ''} in --history: {shown} (not in "
                            f"the run's vocabulary of {tok.vocab_size - len(SPECIALS):,} items)")
    return ids, np.array([vocab[x] for x in ids], np.int64)


def _metadata(run: Path, cfg) -> dict[str, Any] | None:
    """The item metadata saved with the run (items.json), else the prepared data's, if any."""
    import json

    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.data.interactions import ITEMS_FILE

    ckpt = resolve_checkpoint(run)
    for p in (ckpt.parent.parent / ITEMS_FILE, Path(run) / ITEMS_FILE, Path(cfg.data.path) / ITEMS_FILE):
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    return None


def recommend(run: str | Path, history: str | list | None = None, user: str | None = None, k: int = 10,
              device: str = "auto", keep_seen: bool = False) -> dict[str, Any]:
    """The ``k`` items a run scores highest after ``history`` (item ids) or after the whole history of
    ``user`` in the run's prepared data, the items already seen left out (``keep_seen``: kept): each with
    its score (the model's probability) and its metadata (title, ...) when the data has any."""
    if k < 1:
        raise PretrainError("--k must be >= 1")
    if (history is None) == (user is None):
        raise PretrainError("give either --history ITEM,ITEM,... or --user ID")
    model, cfg, tok, meta, dev = load_item_run(run, device)
    if user is not None:
        data = Interactions(cfg.data.path)
        if str(user) not in data.users:
            raise PretrainError(f"unknown user {user!r}: not among the {len(data.users):,} users of "
                                f"{cfg.data.path}")
        hist = data.sequences("test")[data.users.index(str(user))]
        ids = [tok.tk.id_to_token(int(i)) for i in hist]
    else:
        ids, hist = parse_history(history, tok)  # type: ignore[arg-type]
    probs = item_scorer(model, cfg, tok, dev).scores([hist])[0].softmax(-1).numpy().astype(np.float64)
    probs[:len(SPECIALS)] = -math.inf
    if not keep_seen:
        probs[hist] = -math.inf
    order = np.argsort(-probs, kind="stable")[:k]
    md = _metadata(Path(run), cfg)
    out = []
    for i in order:
        if not np.isfinite(probs[i]):
            break
        item = tok.tk.id_to_token(int(i))
        entry = {"item": item, "score": round(float(probs[i]), 6)}
        if md is not None and item in md["items"]:
            entry.update(md["items"][item])
        out.append(entry)
    return {"history": ids, "user": user, "k": k, "recommendations": out, "step": meta.get("step")}


# ----------------------------------------------------------------------------------------------------------
# item embeddings


def item_embeddings(model: torch.nn.Module, tok) -> tuple[list[str], np.ndarray]:
    """(item ids, (N, C) float32 vectors): each item's row of the output projection, the vector the model's
    user state is scored against (the input embedding too when they are tied)."""
    from pretrain.models import spec_of

    w = spec_of(model).output_head(model).weight.detach().float().cpu().numpy()
    ids = [tok.tk.id_to_token(i) for i in range(len(SPECIALS), tok.vocab_size)]
    return ids, w[len(SPECIALS):tok.vocab_size]


def nearest_items(vectors: np.ndarray, k: int = 10, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) indices and cosine similarities of each vector's ``k`` nearest others."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    k = min(k, len(v) - 1)
    idx = np.zeros((len(v), k), np.int64)
    sim = np.zeros((len(v), k), np.float32)
    for lo in range(0, len(v), block):
        s = v[lo:lo + block] @ v.T
        s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        idx[lo:lo + len(s)], sim[lo:lo + len(s)] = top, np.take_along_axis(s, top, 1)
    return idx, sim


def embed_items(run: str | Path, out: str | Path, neighbours: int = 10, device: str = "auto",
                overwrite: bool = False) -> dict[str, Any]:
    """Write every item's embedding and its nearest items to ``out`` (.parquet: columns item, embedding,
    neighbours, similarities and the item metadata; .npy: the (N, C) matrix, rows in vocabulary order)."""
    from pretrain.features import write_vectors
    from pretrain.io import check_output_file

    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise PretrainError(f"--out must end in .npy or .parquet, got {out.name}")
    check_output_file(out, "embed", [run], overwrite)
    model, cfg, tok, meta, _ = load_item_run(run, device)
    ids, vectors = item_embeddings(model, tok)
    near, sims = nearest_items(vectors, neighbours)
    cols: dict[str, Any] = {"item": ids, "neighbours": [[ids[j] for j in row] for row in near],
                            "similarities": list(sims)}
    md = _metadata(Path(run), cfg)
    if md is not None:
        for c in md["columns"]:
            cols[c] = [None if i not in md["items"] else str(md["items"][i].get(c)) for i in ids]
    write_vectors(out, vectors, cols)
    return {"out": str(out), "rows": len(ids), "dim": int(vectors.shape[1]), "neighbours": neighbours,
            "step": meta.get("step"),
            "examples": {ids[i]: [ids[j] for j in near[i][:5]] for i in range(min(3, len(ids)))}}
