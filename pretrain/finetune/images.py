"""Image classification on a pre-trained image backbone: the data, the model's inputs, the shallow baseline.

An image run (its spec's ``modality`` is 'images') fine-tunes on prepared image directories
(`pretrain prepare IMAGES --out DIR`). Each data argument names a split: ``DIR`` means the role's split
('train' for --train, 'val' for --valid, 'test' for --test; for predict and embed 'test' when there is one,
else 'val'), ``DIR@SPLIT`` any other (features.image_data). The images must have the run's size and channels
(else one error: prepare them with ``--image-size``); their pixels are normalised with the run's own mean and
std. While training, each batch gets a light random resized crop (``crop_scale``, the same
:func:`pretrain.objectives.image.random_resized_crop` pre-training uses, from a generator seeded by the
fine-tune's seed) and, only when asked, horizontal flips. Labels are the directory's class names.

The fine-tuning loop itself is the text one (loop.py) through :class:`ImageInputs`; the transfer report's
shallow arm for images is :func:`pixel_baseline`, a logistic regression on the raw pixels.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.config import ConfigError, FinetuneConfig
from pretrain.features import (
    check_image_size,
    image_data,
    image_pixels,
    image_pooling,
    image_poolings,
    open_images,
)
from pretrain.finetune.data import TaskDataError, check_known
from pretrain.finetune.metrics import compute_metrics
from pretrain.hardware import autocast_context

PIXELS = "pixels"
"""The name and kind of the transfer report's shallow arm for images: logistic regression on raw pixels."""


@dataclass
class ImageExamples:
    """Rows of one split of a prepared image directory: images ``rows`` of it, their class names."""

    split: Any
    """The ImageSplit (pretrain.data.images)."""
    rows: np.ndarray
    """Indices into the split (int64)."""
    labels: list[str] | None
    """The class name of each row (None: the split has no labels)."""
    source: str
    """``DIR@SPLIT``."""

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: list[int]) -> ImageExamples:
        return ImageExamples(self.split, self.rows[np.asarray(idx, dtype=np.int64)],
                             None if self.labels is None else [self.labels[i] for i in idx], self.source)

    def images(self, idx: np.ndarray) -> np.ndarray:
        """(k, H, W, C) uint8 images of rows ``idx`` (of these examples)."""
        return self.split.images(self.rows[np.asarray(idx, dtype=np.int64)])


def read_images(path: str | Path, role: str, with_labels: bool = True) -> ImageExamples:
    """Every image of the split ``path`` names in ``role`` ('train', 'valid', 'test', 'input'), with the class
    name of each (an error when ``with_labels`` and the split has none)."""
    from pretrain import PretrainError

    try:
        split, source = open_images(path, role)
    except PretrainError as e:
        raise TaskDataError(str(e)) from None
    labels = None
    if split.labels is not None:
        classes = list(split.classes)
        labels = [str(classes[i]) for i in np.asarray(split.labels).tolist()]
    elif with_labels:
        raise TaskDataError(f"{source} has no labels (it was prepared from unlabelled images): fine-tuning "
                            "needs labelled images (one sub-folder per class, or labels in the source)")
    return ImageExamples(split, np.arange(len(split), dtype=np.int64), labels, source)


def canonical(path: str | Path, role: str) -> str:
    """``DIR@SPLIT`` for the split ``path`` means in ``role`` (so that it means the same in any role)."""
    d, split = image_data(path, role)
    return f"{d}@{split}"


def read_image_task(cfg: FinetuneConfig, run: str | Path, mcfg, train_path: str | Path,
                    valid_path: str | Path, train_subset: list[int] | None = None,
                    valid_subset: list[int] | None = None):
    """Both splits read (the rows ``*_subset`` of them, if given), their image size checked against the run's
    (``mcfg``, its model config), their labels checked: at least two classes in training, no validation
    class the training directory does not have. → TaskData (names: the training directory's classes)."""
    from pretrain.finetune.loop import TaskData

    if cfg.task != "classification":
        raise TaskDataError(f"{run} is an image run: it fine-tunes task classification, not {cfg.task}")
    if cfg.prompt:
        raise ConfigError("prompt-based classification is for text runs (an image model has no words to "
                          "score)")
    from pretrain.features import is_image_data

    for p in (train_path, valid_path):
        if not is_image_data(p):
            raise TaskDataError(f"{run} is an image run: it fine-tunes on prepared image directories, DIR or "
                                f"DIR@SPLIT (`pretrain prepare IMAGES --out DIR`), not {p}")
    train = read_images(train_path, "train")
    valid = train if canonical(valid_path, "valid") == train.source else read_images(valid_path, "valid")
    for ex in (train, valid):
        check_image_size(ex.source, ex.split, mcfg, run)
    names = [str(c) for c in train.split.classes]
    if train_subset is not None:
        train = train.subset(train_subset)
    if valid_subset is not None:
        valid = valid.subset(valid_subset)
    assert train.labels is not None and valid.labels is not None
    present = sorted(set(train.labels))
    if len(present) < 2:
        raise TaskDataError(f"{train.source}: classification needs at least two classes, found {present}")
    check_known(valid.labels, names, valid.source)
    return TaskData(train, valid, names)


class ImageInputs:
    """Image data as the fine-tuning loop sees it: shuffled batches of normalised, lightly augmented pixels;
    class probabilities on the validation images."""

    def __init__(self, cfg: FinetuneConfig, mcfg, data):
        self.cfg, self.mcfg, self.data = cfg, mcfg, data
        index = {n: i for i, n in enumerate(data.names)}
        self.y = np.asarray([index[v] for v in data.train.labels], dtype=np.int64)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the crops and flips

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    def targets(self) -> np.ndarray:
        return self.y

    def batches(self, rng) -> list[list[int]]:
        from pretrain.finetune.encode import length_batches

        return length_batches([1] * self.n_train, self.cfg.batch_size, rng)  # (equal lengths: shuffled)

    def batch(self, idx: list[int], device: torch.device) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        from pretrain.objectives.image import random_resized_crop

        x = image_pixels(self.data.train.images(np.asarray(idx)), self.mcfg, device)
        x = random_resized_crop(x, self.gen, self.cfg.crop_scale, self.cfg.flip)
        return (x,), torch.from_numpy(self.y[np.asarray(idx)]).to(device)

    def predict(self, model: nn.Module, device: torch.device) -> tuple[list[str], np.ndarray]:
        return run_images(model, self.data.valid, self.mcfg, self.data.names, self.cfg.batch_size * 2, device,
                          self.cfg.dtype)

    def gold(self) -> list[str]:
        return self.data.valid.labels


@torch.no_grad()
def run_images(model: nn.Module, ex: ImageExamples, mcfg, names: list[str], batch_size: int,
               device: torch.device, dtype: str = "auto") -> tuple[list[str], np.ndarray]:
    """Predicted class names and (N, classes) probabilities of every image of ``ex``, in order."""
    model.eval()
    n = len(ex)
    probs = np.zeros((n, len(names)), dtype=np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        with autocast_context(device, dtype):
            logits = model(image_pixels(ex.images(idx), mcfg, device)).float()
        probs[idx] = torch.softmax(logits, -1).cpu().numpy()
    return [names[i] for i in probs.argmax(-1).tolist()], probs


def build_images(run: str | Path, out: Path, cfg: FinetuneConfig, data, quiet: bool, device: torch.device,
                 backbone: nn.Module, pcfg, ckpt: Path):
    """loop.build for an image run: the head on the backbone's pooled features, the inputs, finetune.json."""
    from pretrain.finetune.loop import FtJob, adapt, assemble
    from pretrain.finetune.model import ImageTaskModel
    from pretrain.models import spec_of

    spec = spec_of(backbone)
    offered = image_poolings(backbone)
    pooling = image_pooling(backbone, cfg.pooling)
    if pooling not in offered:
        raise ConfigError(f"pooling {pooling!r} is not offered by this image model ({spec.name}): use "
                          f"{' or '.join(offered)}")
    names = data.names
    if cfg.metric == "roc_auc" and len(names) != 2:
        raise ConfigError(f"metric roc_auc is for two classes; {data.train.source} has {len(names)}")
    torch.manual_seed(cfg.seed)
    model = adapt(ImageTaskModel(backbone, len(names), pooling, cfg.dropout), cfg, device)
    m = pcfg.model
    info = {"format": 1, "modality": "images", "task": cfg.task, "labels": names, "pooling": pooling,
            "encoder": spec.bidirectional,
            "image": {"size": m.image_size, "channels": m.channels, "mean": list(m.image_mean),
                      "std": list(m.image_std)},
            "config": dataclasses.asdict(cfg), "backbone": pcfg.to_dict(),
            "pretrained_from": None if cfg.from_scratch else str(ckpt), "train_examples": len(data.train),
            "valid_examples": len(data.valid),
            "data": {"train": data.train.source, "valid": data.valid.source}}
    job = FtJob(cfg, out, model, None, data, device, 0, 0, 0, info, None, None,  # type: ignore[arg-type]
                inputs=ImageInputs(cfg, m, data))
    return assemble(job, len(spec.block_list(backbone)), quiet, len(names),
                    f"fine-tuning {'a random init of ' if cfg.from_scratch else ''}{ckpt} for image "
                    f"classification: {len(data.train):,} train ({data.train.source}) / {len(data.valid):,} "
                    f"valid images ({data.valid.source}) of {m.image_size}x{m.image_size}x{m.channels}, "
                    f"{len(names)} classes, {pooling} pooling, ")


PIXEL_C = (1.0, 0.1, 0.01, 10.0)
"""Inverse regularisation strengths tried for the logistic regression on pixels (a tie goes to the first)."""
PIXEL_SELECT_MAX = 5000
"""The C of a larger budget is chosen on a random subset of this many of its images (then refit on all)."""


def pixel_baseline(full: ImageExamples, subset: list[int] | None, va: ImageExamples, seed: int,
                   select: str = "auto", names: list[str] | None = None) -> dict[str, Any]:
    """Logistic regression on the raw pixels (scaled to [0, 1], standardised per pixel on the training rows)
    of the same rows as the fine-tunes: C chosen on a split carved from them (recipe.carve, by the task's
    metric), then refit on all of them; scored on ``va``. The image counterpart of the TF-IDF arm: what the
    labels reach with no learned features at all."""
    import random

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pretrain.finetune.recipe import carve

    names = names or [str(c) for c in full.split.classes]
    idx = subset if subset is not None else list(range(len(full)))
    y = np.asarray(full.labels)

    def pixels(ex: ImageExamples, rows: list[int]) -> np.ndarray:
        return ex.images(np.asarray(rows)).reshape(len(rows), -1).astype(np.float32) / 255.0

    def fit(rows: list[int], c: float):
        x = pixels(full, rows)
        scaler = StandardScaler().fit(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x), y[rows])
        return scaler, clf

    def score(scaler, clf, ex: ImageExamples, rows: list[int], gold: list[str]) -> dict[str, float]:
        proba = clf.predict_proba(scaler.transform(pixels(ex, rows)))
        probs = np.zeros((len(rows), len(names)), dtype=np.float64)
        for j, c in enumerate(clf.classes_):
            probs[:, names.index(str(c))] = proba[:, j]
        pred = [names[i] for i in probs.argmax(-1)]
        return compute_metrics("classification", pred, gold, probs, names, select)

    pool = idx if len(idx) <= PIXEL_SELECT_MAX else sorted(random.Random(seed).sample(list(idx),
                                                                                     PIXEL_SELECT_MAX))
    fit_rows, chosen = carve(full.labels, pool, seed)
    scores = {}
    for c in PIXEL_C:
        scaler, clf = fit(fit_rows, c)
        scores[c] = score(scaler, clf, full, chosen, [str(y[i]) for i in chosen])["metric"]
    best_c = max(PIXEL_C, key=lambda c: scores[c])
    scaler, clf = fit(list(idx), best_c)
    m = score(scaler, clf, va, list(range(len(va))), list(va.labels))
    return {"metric": m["metric"], "C": best_c, **{f"val_{k}": v for k, v in m.items() if k != "metric"}}
