"""Image objectives: masked autoencoding (MAE, He et al. 2022) and supervised classification pre-training,
with the augmentation each uses. Same contract as the text objectives (objectives/__init__.py): ``prepare``
turns a loader batch ``(images (B, H, W, C) uint8, labels (B,))`` into model inputs and targets (every random
draw from a CPU generator seeded by the step, so a resumed run draws the same), ``targets`` counts what the
loss averages over (images), ``loss_sum`` sums it, ``eval_batch`` gives (loss sum, images, correct or None).

The model's ``forward`` is the training entry (so DDP / FSDP / compile wrap it from outside): a ViT built with
a decoder maps ``(pixels, noise, mask_ratio)`` to ``(pred (B, N, p*p*C), mask (B, N))``; a model with a
classification head maps ``pixels`` to logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The model itself under torch.compile and DDP wrappers (for its parameter-free helpers: patchify)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def to_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 → (B, C, H, W) float, scaled to [0, 1] then normalised per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, min_scale: float, flip: bool) -> torch.Tensor:
    """Per image: a crop of a random fraction of the area in [min_scale, 1] (aspect ratio 3/4 to 4/3, at a
    random place inside the image) resized back to the full size (bilinear), and a horizontal flip with
    probability 1/2 when ``flip``. All draws from ``gen`` (CPU)."""
    b = x.size(0)
    if min_scale >= 1.0 and not flip:
        return x
    area = torch.empty(b).uniform_(min_scale, 1.0, generator=gen)
    log_r = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # the crop's centre, in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sx = w * (torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if flip else 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _ImageObjective:
    reports_bpb = False

    def __init__(self, mean: list[float], std: list[float], crop_scale: float, flip: bool):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.crop_scale, self.flip = crop_scale, flip

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images → normalised model inputs (no augmentation)."""
        return to_pixels(images, self.mean.to(images.device), self.std.to(images.device))

    def augmented(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_resized_crop(self.pixels(images), gen, self.crop_scale, self.flip)

    def targets(self, prepared: tuple) -> torch.Tensor:
        return torch.tensor(prepared[0].size(0), device=prepared[0].device)

    def loss(self, model: nn.Module, batch, seed: int) -> torch.Tensor:
        prepared = self.prepare(batch, seed)
        return self.loss_sum(model, prepared) / self.targets(prepared)


class MaskedAutoencoding(_ImageObjective):
    """MAE: hide ``mask_ratio`` of the patches (a random subset per image), encode the rest, reconstruct the
    hidden ones; the loss is the mean squared error over the hidden patches' pixels (each patch normalised
    by its own mean and variance with ``norm_pix_loss``), averaged per image."""

    name = "mae"

    def __init__(self, mean, std, crop_scale: float, flip: bool, mask_ratio: float, norm_pix_loss: bool,
                 n_patches: int):
        super().__init__(mean, std, crop_scale, flip)
        self.mask_ratio, self.norm_pix_loss, self.n_patches = mask_ratio, norm_pix_loss, n_patches

    def prepare(self, batch, seed: int) -> tuple:
        images = batch[0]
        gen = torch.Generator().manual_seed(seed)
        x = self.augmented(images, gen)
        noise = torch.rand(images.size(0), self.n_patches, generator=gen).to(images.device)
        return x, noise

    def target(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) reconstruction targets: the patches, normalised per patch with norm_pix_loss."""
        t = unwrap_compiled(model).patchify(pixels.float())
        if self.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def per_image(self, model: nn.Module, pixels: torch.Tensor, noise: torch.Tensor):
        pred, mask = model(pixels, noise, self.mask_ratio)
        err = (pred.float() - self.target(model, pixels)).pow(2).mean(-1)  # (B, N)
        return (err * mask).sum(1) / mask.sum(1).clamp(min=1), pred, mask

    def loss_sum(self, model: nn.Module, prepared: tuple) -> torch.Tensor:
        return self.per_image(model, *prepared)[0].sum()

    def eval_batch(self, model: nn.Module, batch, index: int):
        images = batch[0]
        gen = torch.Generator().manual_seed(0x5EED + index)  # the same masks at every evaluation
        noise = torch.rand(images.size(0), self.n_patches, generator=gen).to(images.device)
        losses = self.per_image(model, self.pixels(images), noise)[0]
        return float(losses.sum()), images.size(0), None

    @torch.no_grad()
    def snapshot(self, model: nn.Module, images: torch.Tensor, path: str | Path) -> None:
        """A PNG grid, one row per image: the original, what the encoder saw (hidden patches grey), the
        reconstruction with the visible patches pasted back in."""
        from PIL import Image

        inner = unwrap_compiled(model)
        x = self.pixels(images)
        gen = torch.Generator().manual_seed(0x5EED)
        noise = torch.rand(images.size(0), self.n_patches, generator=gen).to(images.device)
        pred, mask = model(x, noise, self.mask_ratio)
        pred = pred.float()
        if self.norm_pix_loss:  # back to pixel units with each patch's own statistics (for display)
            t = inner.patchify(x.float())
            pred = pred * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
        patches = inner.patchify(x.float())
        m = mask.unsqueeze(-1)
        recon = inner.unpatchify(patches * (1 - m) + pred * m)
        seen = inner.unpatchify(patches * (1 - m) + (m * -1e4))  # hidden: far below black, shown grey
        mean, std = self.mean.to(x.device).view(1, -1, 1, 1), self.std.to(x.device).view(1, -1, 1, 1)

        def to_uint8(t: torch.Tensor, hidden: bool = False) -> torch.Tensor:
            img = t * std + mean
            if hidden:
                img = torch.where(img < -10, torch.full_like(img, 0.5), img)
            return (img.clamp(0, 1) * 255).round().to(torch.uint8)

        rows = torch.cat([to_uint8(x), to_uint8(seen, True), to_uint8(recon)], dim=3)  # (B, C, H, 3W)
        grid = rows.permute(0, 2, 3, 1).reshape(-1, rows.size(3), rows.size(1)).cpu().numpy()  # (B*H, 3W, C)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        scale = max(1, 192 // max(1, images.size(1)))  # small images drawn larger
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        from pretrain.io import atomic_path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(path)) as tmp:
            img.save(tmp, format="PNG")


class SupervisedClassification(_ImageObjective):
    """Classification pre-training on labelled images (the ImageNet pattern): cross-entropy with label
    smoothing on augmented images; validation: plain cross-entropy and accuracy on the images as they are."""

    name = "supervised"

    def __init__(self, mean, std, crop_scale: float, flip: bool, label_smoothing: float):
        super().__init__(mean, std, crop_scale, flip)
        self.label_smoothing = label_smoothing

    def prepare(self, batch, seed: int) -> tuple:
        images, labels = batch
        return self.augmented(images, torch.Generator().manual_seed(seed)), labels

    def loss_sum(self, model: nn.Module, prepared: tuple) -> torch.Tensor:
        x, labels = prepared
        return F.cross_entropy(model(x).float(), labels, label_smoothing=self.label_smoothing,
                               reduction="sum")

    def eval_batch(self, model: nn.Module, batch, index: int):
        images, labels = batch
        logits = model(self.pixels(images)).float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        return float(loss), images.size(0), int((logits.argmax(-1) == labels).sum())
