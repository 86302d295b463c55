"""ResNet (He et al. 2016) in the v1.5 form (a bottleneck block downsamples in its 3x3 convolution, as
torchvision's and Hugging Face's): a stem, then stages of residual blocks, each stage after the first halving
the resolution in its first block, global average pooling and a linear classifier.

Stem 'imagenet': 7x7 convolution at stride 2, BatchNorm, ReLU, 3x3 max-pool at stride 2 (224-pixel images;
Hugging Face's ResNet). Stem 'small': one 3x3 convolution at stride 1, BatchNorm, ReLU, no pooling (28-64
pixel images, as CIFAR ResNets; no Hugging Face equivalent). Blocks 'basic' (two 3x3 convolutions;
ResNet-18/34) or 'bottleneck' (1x1 to a quarter of the width, 3x3, 1x1 back; ResNet-50). A block whose input
and output differ in width or resolution adds a projected shortcut (1x1 convolution and BatchNorm).

Inputs are normalised pixels (B, C, H, W). The blocks of every stage are kept as one flat ``nn.ModuleList``
(``layers``: FSDP units, activation checkpointing, layer-wise learning rates) whose modules are named as
Hugging Face's ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``; export maps block k to its
``encoder.stages.{i}.layers.{j}`` (models/resnet_spec.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig

REDUCTION = 4  # a bottleneck block's inner width: its output width / 4


def conv_flops(conv: nn.Conv2d, size: int) -> tuple[float, int]:
    """(forward FLOPs of ``conv`` on a size x size input, the output's size)."""
    out = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * conv.in_channels * conv.out_channels * k * out * out, out


class ConvBN(nn.Module):
    """Convolution (no bias, 'same' padding) → BatchNorm → ReLU (none for the last of a residual branch)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalization(self.convolution(x))
        return F.relu(x) if self.relu else x

    def flops(self, size: int) -> tuple[float, int]:
        return conv_flops(self.convolution, size)


class Block(nn.Module):
    """relu(branch(x) + shortcut(x)); the shortcut projects (1x1 conv + BN) when the width or resolution
    changes."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool):
        super().__init__()
        self.shortcut = ConvBN(cin, cout, 1, stride, relu=False) if cin != cout or stride != 1 else None
        if bottleneck:
            mid = cout // REDUCTION
            self.layer = nn.Sequential(ConvBN(cin, mid, 1), ConvBN(mid, mid, 3, stride),
                                       ConvBN(mid, cout, 1, relu=False))
        else:
            self.layer = nn.Sequential(ConvBN(cin, cout, 3, stride), ConvBN(cout, cout, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layer(x) + (x if self.shortcut is None else self.shortcut(x)))

    def flops(self, size: int) -> tuple[float, int]:
        total, out = (self.shortcut.flops(size)[0] if self.shortcut is not None else 0.0), size
        for conv in self.layer:
            f, out = conv.flops(out)
            total += f
        return total, out


class Stem(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        big = cfg.stem == "imagenet"
        self.convolution = nn.Conv2d(cfg.channels, cfg.stem_width, 7 if big else 3, stride=2 if big else 1,
                                     padding=3 if big else 1, bias=False)
        self.normalization = nn.BatchNorm2d(cfg.stem_width)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if big else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.normalization(self.convolution(x)))
        return x if self.pool is None else self.pool(x)

    def flops(self, size: int) -> tuple[float, int]:
        f, out = conv_flops(self.convolution, size)
        return f, out if self.pool is None else (out + 2 - 3) // 2 + 1


class ResNet(nn.Module):
    """pixels (B, C, H, W) → globally pooled features (B, widths[-1]) / class logits."""

    poolings = ("mean",)  # one global average pool: the only pooling its features offer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.channels < 1:
            raise ValueError("ResNet needs a resolved channels")
        bottleneck = cfg.block == "bottleneck"
        if bottleneck and min(cfg.widths) < REDUCTION:
            raise ValueError(f"bottleneck blocks need model.widths of at least {REDUCTION}")
        self.cfg = cfg
        self.stem = Stem(cfg)
        blocks, cin = [], cfg.stem_width
        for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            for j in range(depth):
                blocks.append(Block(cin, width, 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = width
        self.layers = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else None
        self.reset_parameters()

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    def stage_of(self) -> list[tuple[int, int]]:
        """(stage, index within the stage) of each block of ``layers``."""
        return [(i, j) for i, depth in enumerate(self.cfg.depths) for j in range(depth)]

    def reset_parameters(self) -> None:
        """Convolutions kaiming-normal (fan out, ReLU), BatchNorms 1 / 0 except the last of each residual
        branch, whose gain starts at 0 (each block starts as the identity: Goyal et al. 2017), the classifier
        normal(init_std) with a zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.layers:
            nn.init.zeros_(block.layer[-1].normalization.weight)
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=self.cfg.init_std)
            nn.init.zeros_(self.classifier.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.stem.parameters()) if non_embedding else n

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last stage's output (B, widths[-1], h, w)."""
        x = self.stem(pixels)
        for block in self.layers:
            x = block(x)
        return x

    def features(self, pixels: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """(B, widths[-1]): the global average of the last feature map (``pooling`` is accepted for the
        common interface and changes nothing)."""
        return self.feature_map(pixels).mean(dim=(2, 3))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, num_classes): average pool → linear (ResNetForImageClassification)."""
        if self.classifier is None:
            raise ValueError("this ResNet has no classification head (model.num_classes is 0)")
        return self.classifier(self.features(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The training entry: class logits with a classifier, else the pooled features."""
        return self.classify(pixels) if self.classifier is not None else self.features(pixels)


def forward_flops(model: ResNet, image_size: int | None = None) -> float:
    """Forward FLOPs per image of ``image_size`` pixels (default the model's, 224 when unresolved):
    convolutions and the classifier, 2 per multiply-add (BatchNorm, ReLU, pooling and additions left out)."""
    size = image_size or model.cfg.image_size or 224
    total, size = model.stem.flops(size)
    for block in model.layers:
        f, size = block.flops(size)
        total += f
    if model.classifier is not None:
        total += 2.0 * model.classifier.in_features * model.classifier.out_features
    return total
