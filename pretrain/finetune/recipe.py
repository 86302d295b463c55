"""The fine-tuning recipe chosen on the training labels alone: learning rate, pooling and epochs.

A pre-trained backbone and a random init want different recipes (a random init takes a larger step; a
pre-trained one may over-fit a few hundred labels in a few epochs), and one fixed recipe for both sides
of a comparison favours whichever side it was tuned for. ``search`` carves a validation split from the
training examples (``carve``: 20%, at most ``MAX_SELECT`` rows, every class kept on the training side),
fine-tunes on the rest and picks, by the carved split's metric:

1. the learning rate from ``LR_GRID`` with the architecture's default pooling (cls / last), each run
   trained for its whole schedule (enough epochs for ``min_steps`` steps, at most ``max_epochs``) and
   evaluated on the carved split after every epoch;
2. then the other pooling (mean) at that learning rate;
3. the number of epochs: those of the best evaluation of the chosen run. The final run replays it: the
   same schedule (``schedule_epochs``), stopped after those epochs.

Five fine-tunes per recipe (a coordinate search, not the 4 × 2 grid; four for an image model with one
pooling, a ResNet's global average). The evaluation data is never seen.
Budgets larger than ``search_max`` examples search on a random ``search_max`` of them and keep the
config's epochs (the best epoch on a small subset says little about a large one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain import PretrainError
from pretrain.config import FinetuneConfig
from pretrain.io import write_json_atomic

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
"""Learning rates tried (the peak of the linear schedule)."""
SELECT_FRAC = 0.2
"""Share of the training examples carved off to choose the recipe on."""
MAX_SELECT = 1000
"""At most this many carved examples (a larger budget keeps more for training)."""


@dataclass
class Recipe:
    """What ``search`` chose and what it tried."""

    lr: float
    pooling: str
    epochs: int
    schedule_epochs: int
    """The epochs the search runs' schedule spanned (the final run's LR follows it and stops at ``epochs``;
    0: its own epochs)."""
    score: float
    """The carved split's metric of the chosen run."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """Every fine-tune of the search: lr, pooling, carved metric, best epoch."""
    searched_on: int = 0
    """Training examples of the search runs (the budget less the carved split)."""
    carves: int = 1
    """Carved splits each candidate was scored on (their mean curve)."""

    def apply(self, cfg: FinetuneConfig) -> FinetuneConfig:
        """``cfg`` with this recipe: its lr, pooling and epochs; no early stopping, one evaluation at the
        end (the evaluation data must not pick the epoch)."""
        return dataclasses.replace(cfg, lr=self.lr, pooling=self.pooling, epochs=self.epochs,
                                   schedule_epochs=self.schedule_epochs, patience=0, evals_per_epoch=0,
                                   head_lr=0.0)

    def describe(self) -> str:
        return f"lr {self.lr:g}, {self.pooling} pooling, {self.epochs} epoch{'s' * (self.epochs != 1)}"

    def judged(self) -> str:
        """How the recipe was scored: its carved-split metric and over how many carves."""
        return f"carved split {self.score:.4f} over {self.carves} carve{'s' * (self.carves != 1)}"


def epochs_for(n: int, batch_size: int, min_steps: int, base_epochs: int, max_epochs: int) -> int:
    """Small budgets get more epochs so that every budget trains for at least ``min_steps`` steps."""
    return int(min(max_epochs, max(base_epochs, math.ceil(min_steps * batch_size / n))))


def carve(labels: list[Any] | None, idx: list[int], seed: int, frac: float = SELECT_FRAC,
          max_select: int = MAX_SELECT) -> tuple[list[int], list[int]]:
    """``idx`` (rows of a training file) → (fit rows, carved selection rows). With labels, every class keeps
    at least one example on the fit side, the carved side holds only classes the fit side has, and it takes
    its examples class by class in turn (one of each class that can spare one, then a second, ...): with
    few labels and many classes, a carve of the classes that happen to have several examples would reward a
    model that predicts only those."""
    rng = random.Random(seed * 7919 + len(idx))
    order = list(idx)
    rng.shuffle(order)
    k = min(max_select, max(1, round(frac * len(order))))
    if labels is None:
        return sorted(order[k:]), sorted(order[:k])
    by_class: dict[str, list[int]] = {}
    for i in order:
        by_class.setdefault(str(labels[i]), []).append(i)
    queues = [rows[1:] for rows in by_class.values()]  # the first of each class stays on the fit side
    select: list[int] = []
    while len(select) < k and any(queues):
        for q in queues:
            if q and len(select) < k:
                select.append(q.pop(0))
    chosen = set(select)
    return sorted(i for i in order if i not in chosen), sorted(select)


def poolings(cfg: FinetuneConfig, encoder: bool | tuple[str, ...]) -> list[str]:
    """The poolings searched, the architecture's default first; none for token tasks and prompts (no
    pooled head). ``encoder``: whether a text model is an encoder, or the poolings an image model offers
    (:func:`pooling_space`)."""
    if cfg.task in ("token", "qa") or cfg.prompt:
        return [cfg.pooling]
    if not isinstance(encoder, bool):
        return list(encoder)
    return ["cls", "mean"] if encoder else ["last", "mean"]


def is_encoder(run: str | Path) -> bool:
    """Whether the run's transferable model reads both directions (an encoder: cls pooling is open to it)."""
    from pretrain.finetune.model import load_backbone
    from pretrain.models import spec_of

    backbone, _, _, _ = load_backbone(run, 0.0, True, 0)
    return spec_of(backbone).bidirectional


def pooling_space(run: str | Path) -> bool | tuple[str, ...]:
    """What the search's poolings depend on: for a text run whether it is an encoder (:func:`is_encoder`),
    for an image run the poolings its features offer (ViT: cls, mean; ResNet: mean)."""
    from pretrain.features import image_poolings
    from pretrain.finetune.model import load_backbone
    from pretrain.models import spec_of

    backbone, _, _, _ = load_backbone(run, 0.0, True, 0)
    if spec_of(backbone).modality == "images":
        return image_poolings(backbone)
    return spec_of(backbone).bidirectional


def data_identity(path: str | Path) -> str:
    """The sha256 of a data file; of a prepared image directory's meta.json (which records every source's
    sha256, the counts and the pixel statistics) with the split, ``SHA@SPLIT``."""
    from pretrain.data.sources import sha256_file
    from pretrain.features import image_data, is_image_data

    if is_image_data(path):
        d, split = image_data(path, "train")
        return f"{sha256_file(d / 'meta.json')}@{split}"
    return sha256_file(Path(path))


def inputs_identity(run: str | Path, train: str | Path, valid: str | Path,
                     weights: bool = True) -> dict[str, Any]:
    """What a fine-tuning result depends on besides its config: the pre-trained checkpoint (``weights``;
    a random init depends only on the architecture and the tokenizer, so from-scratch runs are shared by
    backbones of one architecture) and the data."""
    from pretrain.checkpoint import resolve_checkpoint

    data = {"train_sha256": data_identity(train), "valid_sha256": data_identity(valid)}
    if weights:
        from pretrain.finetune.model import is_finetuned

        if is_finetuned(run):  # a fine-tuned model going on to another task: its weights' checksum
            from pretrain.finetune.predict import WEIGHTS

            return {"finetuned": str(Path(run).resolve()),
                    "weights_sha256": data_identity(Path(run) / WEIGHTS), **data}
        return {"checkpoint": str(resolve_checkpoint(run).resolve()), **data}
    from pretrain.finetune.model import load_backbone

    _, pcfg, tok, _ = load_backbone(run, 0.0, True, 0)
    return {"architecture": dataclasses.asdict(pcfg.model), "tokenizer_sha256": tok and tok.sha256(), **data}


def cached_finetune(run: str | Path, train_path: str | Path, valid_path: str | Path, work: Path,
                    cfg: FinetuneConfig, ident: dict[str, Any], train_subset: list[int] | None = None,
                    valid_subset: list[int] | None = None) -> dict[str, Any]:
    """``finetune`` into ``work``, or the result of an earlier completed run there with the same config, rows
    and inputs (``ident``: the checkpoint's path and the data's checksums), so an interrupted search or
    transfer resumes where it stopped. Only metrics and configs are kept, not the model."""
    from pretrain.finetune.loop import finetune

    rows = {"train": train_subset, "valid": valid_subset}
    try:
        done = json.loads((work / "done.json").read_text(encoding="utf-8"))
        if (done.get("config") == dataclasses.asdict(cfg) and done.get("inputs") == ident
                and done.get("rows") == rows and "curve" in done["result"]):
            return done["result"]
    except (OSError, ValueError, AttributeError):
        pass
    res = finetune(run, train_path, valid_path, work, cfg, train_subset=train_subset,
                   valid_subset=valid_subset, quiet=True, overwrite=True)
    (work / "model.safetensors").unlink(missing_ok=True)
    res["curve"] = [[h["epoch"], h["val_metric"]] for h in res["history"]]  # (epoch, metric) per evaluation
    write_json_atomic(work / "done.json", {"config": dataclasses.asdict(cfg), "inputs": ident, "rows": rows,
                                           "result": {k: v for k, v in res.items() if k != "history"}})
    return res


def auto_carves(rows: int, search_max: int = 2000) -> int:
    """How many carves score each candidate recipe when none is asked for: 3 for a budget of up to
    ``search_max`` rows (its carved split is 20% of it: at most 400 rows by default), else 1 (larger budgets
    search on a ``search_max`` subset and keep the configured epochs). At 200 carved rows one carve judges a
    recipe to about ±3.3 points (one standard error at 70% accuracy) — as much as pre-training is worth at
    that size; on SST-2 and BANKING77 at 1k labels three carves lifted three of the four arms by 1.2-3.6
    points (the fourth: +0.2; BENCHMARKS.md)."""
    return 3 if rows <= search_max else 1


def search(run: str | Path, train_path: str | Path, idx: list[int], labels: list[Any] | None, work: Path,
           cfg: FinetuneConfig, encoder: bool | tuple[str, ...], ident: dict[str, Any], max_epochs: int = 20,
           min_steps: int = 300, seed: int = 0, search_max: int = 2000, log=None, carves: int = 0) -> Recipe:
    """Choose a recipe for fine-tuning ``run`` (or its random init with ``cfg.from_scratch``) on rows
    ``idx`` of ``train_path``; the search runs go to ``work/lr<lr>_<pooling>[_c<k>]`` (finished ones are
    reused, see ``cached_finetune``). ``carves`` > 1: each candidate is fine-tuned on that many different
    carves (and seeds) and scored by its carved metric averaged over them, epoch by epoch (less noise,
    ``carves`` times the cost); 0 = :func:`auto_carves`."""
    if carves < 0:
        raise PretrainError("search carves must be >= 0 (0: automatic)")
    carves = carves or auto_carves(len(idx), search_max)
    big = len(idx) > search_max
    if big:
        idx = sorted(random.Random(seed).sample(list(idx), search_max))
    splits = [carve(labels, idx, seed + c) for c in range(carves)]
    fit = splits[0][0]
    epochs = epochs_for(len(fit), cfg.batch_size, min_steps, cfg.epochs, max_epochs)
    base = dataclasses.replace(cfg, seed=seed, epochs=epochs, schedule_epochs=0, patience=0,
                               evals_per_epoch=1)
    trials: list[dict[str, Any]] = []

    def trial(lr: float, pooling: str) -> dict[str, Any]:
        run_cfg = dataclasses.replace(base, lr=lr, pooling=pooling)
        where = [work / (f"lr{lr:g}_{pooling}" + (f"_c{c}" if c else "")) for c in range(len(splits))]
        runs = [cached_finetune(run, train_path, train_path, w, dataclasses.replace(run_cfg, seed=seed + c),
                                ident, f, s) for c, (w, (f, s)) in enumerate(zip(where, splits))]
        if len(runs) == 1:
            best = runs[0]["best"]
            metric, epoch, tie = best["val_metric"], best["epoch"], best.get("val_macro_f1", 0.0)
        else:  # the mean curve over the carves, and its best epoch
            n = min(len(r["curve"]) for r in runs)
            mean = [sum(r["curve"][i][1] for r in runs) / len(runs) for i in range(n)]
            i = max(range(n), key=lambda j: mean[j])
            metric, epoch, tie = mean[i], runs[0]["curve"][i][0], 0.0
        t = {"lr": lr, "pooling": pooling, "metric": metric, "best_epoch": epoch,
             "steps": runs[0]["steps"], "tie_break": tie}
        trials.append(t)
        if log:
            log(f"  search {work.name}: lr {lr:g} {pooling}: carved {metric:.4f} (best at epoch {epoch:g})")
        return t

    pools = poolings(cfg, encoder)
    key = lambda t: (t["metric"], t["tie_break"])  # noqa: E731  (equal accuracy: the better macro-F1)
    first = max((trial(lr, pools[0]) for lr in LR_GRID), key=key)
    best = max([first, *(trial(first["lr"], p) for p in pools[1:])], key=key)
    if big:  # the best epoch on a subset says little about the whole budget: the config's epochs
        return Recipe(best["lr"], best["pooling"], cfg.epochs, 0, best["metric"], trials, len(fit), carves)
    return Recipe(best["lr"], best["pooling"], max(1, math.ceil(best["best_epoch"] - 1e-9)), epochs,
                  best["metric"], trials, len(fit), carves)




def finetune_search(run: str | Path, train_path: str | Path, valid_path: str | Path, out: str | Path,
                    cfg: FinetuneConfig | None = None, max_epochs: int = 20, min_steps: int = 300,
                    search_max: int = 2000, quiet: bool = False, overwrite: bool = False,
                    carves: int = 0, test_path: str | Path | None = None) -> dict[str, Any]:
    """``pretrain finetune --search``: choose the recipe on a split carved from ``train_path`` (the search
    runs go to OUT/search), then fine-tune on all of it with that recipe; ``valid_path`` (and ``test_path``)
    score the final model once, after its last epoch, and choose nothing."""
    from pretrain.finetune.loop import finetune
    from pretrain.io import check_output_dir

    cfg = cfg or FinetuneConfig()
    out = Path(out)
    train_path, valid_path, inputs = task_paths(run, train_path, valid_path)
    check_output_dir(out, "finetune", [run, *inputs], overwrite)
    full = read_labelled(cfg, run, train_path)
    labels = full.labels if cfg.task == "classification" else None
    rows = None  # --max-train: the search and the final fine-tune use the same subset
    if cfg.max_train and cfg.max_train < len(full):
        from pretrain.finetune.transfer import sample_budget

        rows = sample_budget(labels, cfg.max_train, cfg.seed, len(full))
    encoder = pooling_space(run)
    log = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    chosen = search(run, train_path, rows or list(range(len(full))), labels, out / "search", cfg, encoder,
                    inputs_identity(run, train_path, valid_path), max_epochs, min_steps, cfg.seed,
                    search_max, log, carves)
    log(f"recipe: {chosen.describe()} ({chosen.judged()}, {len(chosen.trials) * chosen.carves} runs)")
    res = finetune(run, train_path, valid_path, out, chosen.apply(cfg), quiet=quiet, overwrite=True,
                   test_path=test_path, train_subset=rows)
    return {**res, "recipe": dataclasses.asdict(chosen)}


def task_paths(run: str | Path, train: str | Path, valid: str | Path) -> tuple[Any, Any, list[Path | str]]:
    """(train, valid, the folders or files to protect from the output): for an image run the splits named
    explicitly, ``DIR@train`` / ``DIR@val`` (the search validates on rows of the training *split*, so
    ``valid_path = train_path`` must name it in any role); text paths as given."""
    from pretrain.features import image_data
    from pretrain.finetune.model import run_modality

    if run_modality(run) != "images":
        return train, valid, [train, valid]
    from pretrain.finetune.images import canonical

    return (canonical(train, "train"), canonical(valid, "valid"),
            [image_data(train, "train")[0], image_data(valid, "valid")[0]])


def read_labelled(cfg: FinetuneConfig, run: str | Path, path: str | Path):
    """The labelled examples at ``path`` as the run reads them: rows of a table / CoNLL file (text), or the
    images of a split (an image run; one error when the run is text and the data images, or the reverse)."""
    from pretrain.features import is_image_data
    from pretrain.finetune.data import TaskDataError
    from pretrain.finetune.encode import read_task
    from pretrain.finetune.model import run_modality

    images = run_modality(run) == "images"
    if images:
        from pretrain.finetune.images import read_images

        if not is_image_data(path):
            raise TaskDataError(f"{run} is an image run: it fine-tunes on prepared image directories, DIR or "
                                f"DIR@SPLIT (`pretrain prepare IMAGES --out DIR`), not {path}")
        return read_images(path, "train")
    if is_image_data(path):
        raise TaskDataError(f"{path} is a prepared image directory, but {run} is a text run: fine-tune it on "
                            "text (CSV/TSV/JSONL/Parquet, CoNLL), or the images with an image run")
    return read_task(cfg, path)
