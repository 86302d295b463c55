"""Vision Transformer (Dosovitskiy et al. 2021) with the light masked-autoencoder decoder of MAE (He et al.
2022): an image cut into p x p patches, each projected to d_model (a strided convolution), a [CLS] token in
front, fixed 2-D sin-cos positions, pre-norm blocks (LayerNorm, multi-head attention with biased q/k/v, exact
GELU MLP), a final LayerNorm. For MAE, a random subset of the patches is hidden before the encoder; the
decoder (its own narrower blocks) sees the encoded visible patches plus a shared mask token at every hidden
one and predicts every patch's pixels.

Inputs are normalised pixels (B, C, H, W) with H = W = cfg.image_size. Parameter names follow Hugging
Face's ViT / ViTMAE (``embeddings.patch_embeddings.projection``, ``layernorm_before``,
``decoder.decoder_embed`` ...) so that export is a rename (models/vit_spec.py).

Position embeddings: the encoder's are a Parameter initialised with MAE's 2-D sin-cos table. It is frozen
(``requires_grad`` False) in a model built with a decoder (MAE pre-training keeps it fixed, as MAE does) and
trainable otherwise (supervised pre-training, and fine-tuning of a pre-trained encoder, which MAE also
does): a Parameter either way, so the same tensor is ViTMAE's fixed ``position_embeddings`` and ViT's learned
one on export. The decoder's table is always fixed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig

DEFAULT_MASK_RATIO = 0.75  # ImageConfig.mask_ratio's default: MAE FLOPs estimates when the run's is not set


def mlp_width(cfg: ModelConfig) -> int:
    """The encoder MLP's inner width: model.d_ff, or ViT's 4 x d_model."""
    return cfg.d_ff or 4 * cfg.d_model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed position table (grid * grid + 1, dim), a zero row for [CLS] first. Each patch (row h,
    column w, row-major) gets [sin(w f_k) | cos(w f_k) | sin(h f_k) | cos(h f_k)], f_k = 10000^(-4k / dim):
    MAE's original layout (column first), which ViTMAE's checkpoints and initialisation keep."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    h, w = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    eh, ew = h.flatten()[:, None] * omega, w.flatten()[:, None] * omega  # (N, dim / 4)
    table = torch.cat([ew.sin(), ew.cos(), eh.sin(), eh.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)  # the output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.query, self.key, self.value))  # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, n_head: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = Attention(dim, n_head, dropout)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.layernorm_before(x)))
        return x + self.drop(self.mlp(self.layernorm_after(x)))


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.patch_size
        self.projection = nn.Conv2d(cfg.channels, cfg.d_model, kernel_size=p, stride=p)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major


class Embeddings(nn.Module):
    """[CLS] and patch embeddings with their positions (row 0 of ``position_embeddings`` is [CLS]'s)."""

    def __init__(self, cfg: ModelConfig, n_patches: int, learned_positions: bool):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.d_model),
                                                requires_grad=learned_positions)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → patch embeddings plus their positions (B, N, D)."""
        return self.patch_embeddings(pixels) + self.position_embeddings[:, 1:]

    def cls(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.position_embeddings[:, :1]).expand(batch, -1, -1)  # (B, 1, D)


class MAEDecoder(nn.Module):
    """MAE's light decoder: encoder output (B, 1 + kept, D) and the order to undo the shuffle → pixel
    predictions for every patch (B, N, p*p*C)."""

    def __init__(self, cfg: ModelConfig, n_patches: int):
        super().__init__()
        dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(cfg.d_model, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dd), requires_grad=False)
        self.decoder_layers = nn.ModuleList(Block(dd, cfg.decoder_heads, 4 * dd, cfg.norm_eps, cfg.dropout)
                                            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * cfg.channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (B, 1 + kept, dd)
        B, N = ids_restore.shape
        dd = x.size(-1)
        masked = self.mask_token.to(x.dtype).expand(B, N + 1 - x.size(1), dd)
        tokens = torch.cat([x[:, 1:], masked], dim=1)  # kept patches, then mask tokens: shuffled order
        tokens = tokens.gather(1, ids_restore[..., None].expand(B, N, dd))  # back to the image's order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_layers:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C), [CLS] dropped


class ViT(nn.Module):
    """pixels (B, C, H, W) → features / class logits / MAE reconstructions (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size < 1 or cfg.channels < 1:
            raise ValueError("ViT needs a resolved image_size and channels")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"model.image_size ({cfg.image_size}) must be a multiple of model.patch_size "
                             f"({cfg.patch_size})")
        if cfg.d_model % 4 or (cfg.decoder_layers and cfg.decoder_dim % 4):
            raise ValueError("ViT's sin-cos positions need model.d_model (and model.decoder_dim) divisible "
                             "by 4")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.n_patches = self.grid ** 2
        self.mask_ratio = DEFAULT_MASK_RATIO
        """The fraction of patches :meth:`mae` hides when not told (and the FLOPs estimate assumes); a
        trainer sets it to the run's image.mask_ratio."""
        self.embeddings = Embeddings(cfg, self.n_patches, learned_positions=cfg.decoder_layers == 0)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_head, mlp_width(cfg), cfg.norm_eps, cfg.dropout)
                                    for _ in range(cfg.n_layer))
        self.layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_classes) if cfg.num_classes > 0 else None
        self.decoder = MAEDecoder(cfg, self.n_patches) if cfg.decoder_layers > 0 else None
        self.reset_parameters()

    @property
    def feature_dim(self) -> int:
        return self.cfg.d_model

    def reset_parameters(self) -> None:
        """MAE's initialisation: Linear layers xavier-uniform with zero biases, the patch projection likewise
        (as a Linear), [CLS] and the mask token normal(init_std), LayerNorms 1 / 0, the fixed sin-cos tables;
        the classifier normal(init_std) with a zero bias."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.embeddings.patch_embeddings.projection.weight
        with torch.no_grad():
            w.copy_(nn.init.xavier_uniform_(torch.empty(w.size(0), w[0].numel())).view_as(w))
            nn.init.zeros_(self.embeddings.patch_embeddings.projection.bias)
            nn.init.normal_(self.embeddings.cls_token, std=std)
            self.embeddings.position_embeddings.copy_(sincos_2d(self.grid, self.cfg.d_model)[None])
            if self.classifier is not None:
                nn.init.normal_(self.classifier.weight, std=std)
            if self.decoder is not None:
                nn.init.normal_(self.decoder.mask_token, std=std)
                self.decoder.decoder_pos_embed.copy_(sincos_2d(self.grid, self.cfg.decoder_dim)[None])

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.embeddings.parameters()) if non_embedding else n

    # ------------------------------------------------------------------------------------------- patches

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, N, p*p*C), each patch's pixels row by row, channels last (ViTMAE's order)."""
        B, C, H, W = pixels.shape
        p = self.cfg.patch_size
        x = pixels.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: (B, N, p*p*C) → (B, C, H, W)."""
        B = x.size(0)
        p, C, g = self.cfg.patch_size, self.cfg.channels, self.grid
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    # ----------------------------------------------------------------------------------------- encoder

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D), [CLS] first → blocks → final LayerNorm (B, T, D)."""
        x = self.drop(x)
        for block in self.layers:
            x = block(x)
        return self.layernorm(x)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every token's final hidden state (B, 1 + N, D), [CLS] first, after the final LayerNorm."""
        x = self.embeddings.patches(pixels)  # (B, N, D)
        return self._encode(torch.cat([self.embeddings.cls(x.size(0)).to(x.dtype), x], dim=1))

    def features(self, pixels: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """(B, D): 'cls' the [CLS] token's final hidden state, 'mean' the mean of the patch tokens' (both
        after the final LayerNorm)."""
        h = self.encode(pixels)
        if pooling == "cls":
            return h[:, 0]
        if pooling == "mean":
            return h[:, 1:].mean(dim=1)
        raise ValueError(f"a ViT pools its features by 'cls' or 'mean', not {pooling!r}")

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits from [CLS] after the final LayerNorm (ViTForImageClassification)."""
        if self.classifier is None:
            raise ValueError("this ViT has no classification head (model.num_classes is 0)")
        return self.classifier(self.features(pixels, "cls"))

    # ---------------------------------------------------------------------------------------------- MAE

    def mae(self, pixels: torch.Tensor, noise: torch.Tensor | None = None,
            mask_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked autoencoding as ViTMAEForPreTraining: per image, the patches sorted by ``noise`` (B, N)
        ascending (``torch.rand`` when None), the first ``int(N * (1 - mask_ratio))`` kept and encoded with
        [CLS], the rest hidden; the decoder predicts every patch. → (pred (B, N, p*p*C), mask (B, N) float,
        1 = hidden)."""
        if self.decoder is None:
            raise ValueError("this ViT has no MAE decoder (model.decoder_layers is 0)")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = self.embeddings.patches(pixels)  # (B, N, D)
        B, N, D = x.shape
        if noise is None:
            noise = torch.rand(B, N, device=x.device)
        keep = int(N * (1 - ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(B, keep, D))  # (B, keep, D)
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)
        latent = self._encode(torch.cat([self.embeddings.cls(B).to(x.dtype), x], dim=1))
        return self.decoder(latent, ids_restore), mask

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor | None = None,
                mask_ratio: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The training entry (what DDP, FSDP and torch.compile wrap): a model with a decoder →
        :meth:`mae` (pred, mask) (when it also has a classifier: only when given ``noise``); else a model with
        a classifier → :meth:`classify` logits; else :meth:`features` ([CLS])."""
        if self.decoder is not None and (noise is not None or self.classifier is None):
            return self.mae(pixels, noise, mask_ratio)
        if self.classifier is not None:
            return self.classify(pixels)
        return self.features(pixels)


def forward_flops(model: ViT, mask_ratio: float | None = None) -> float:
    """Forward FLOPs per image (2 per multiply-add): the patch projection on every patch, the encoder on
    [CLS] + the kept patches (all of them without a decoder), the decoder on [CLS] + every patch, the
    classifier; attention's two (T x T x D) products included."""
    c = model.cfg
    n, d = model.n_patches, c.d_model
    pix = c.patch_size ** 2 * c.channels

    def blocks(layers: int, tokens: int, width: int, hidden: int) -> float:
        return layers * tokens * (2 * (4 * width * width + 2 * width * hidden) + 4 * tokens * width)

    f = 2.0 * n * pix * d
    if model.decoder is not None:
        ratio = model.mask_ratio if mask_ratio is None else mask_ratio
        t = 1 + int(n * (1 - ratio))
        dd = c.decoder_dim
        f += blocks(c.n_layer, t, d, mlp_width(c))
        f += 2.0 * t * d * dd + blocks(c.decoder_layers, n + 1, dd, 4 * dd) + 2.0 * (n + 1) * dd * pix
    else:
        f += blocks(c.n_layer, n + 1, d, mlp_width(c))
    if model.classifier is not None:
        f += 2.0 * d * c.num_classes
    return f
