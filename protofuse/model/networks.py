"""Building blocks shared by both prototype families: MLPs, conv encoders, image and table
augmentation.

Sizes follow the paper's MNIST defaults (two hidden layers of 100 ReLU units, a normalization
after the first); the conv encoder is the small net the discriminative family uses on images.

Normalization (``norm_layer``): ``"batch"`` keeps running averages of the training activations,
which are then part of the weights; in a federation they describe a client's private queries to
whoever reads its update. ``"layer"`` normalizes each example over its own features and keeps no
statistic of the data.

Images travel as rows: an (H, W) greyscale or (H, W, C) colour image flattened channels-last,
exactly as numpy flattens an (n, H, W, C) array with ``images.reshape(n, -1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATIONS = ("batch", "layer")


def norm_layer(kind: str, channels: int, spatial: bool = False) -> nn.Module:
    """The normalization after a hidden layer of ``channels`` units (feature maps if
    ``spatial``): ``"batch"`` (batch statistics in training, running averages of them at
    inference) or ``"layer"`` (each example over its own units, and pixels for feature maps)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "layer":
        # GroupNorm with one group is layer norm over (channels, height, width) of each example.
        return nn.GroupNorm(1, channels) if spatial else nn.LayerNorm(channels)
    raise ValueError(f"unknown normalization {kind!r}: use one of {list(NORMALIZATIONS)}")


class MLP(nn.Module):
    """in -> hidden -> norm -> ReLU -> hidden -> ReLU -> out (the paper's network shape)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 100, norm: str = "batch") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            norm_layer(norm, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, in) -> (n, out)
        return self.net(x)


class GaussianHead(nn.Module):
    """An MLP whose output is the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 100, norm: str = "batch") -> None:
        super().__init__()
        self.mlp = MLP(in_dim, 2 * out_dim, hidden, norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.mlp(x).chunk(2, dim=-1)
        # Bounded log-variance keeps early training from exploding the KL terms.
        return mu, logvar.clamp(-8.0, 6.0)


ImageShape = (
    tuple[int, int] | tuple[int, int, int]
)  # (height, width) greyscale, or (height, width, channels)


def image_dims(image_shape: ImageShape) -> tuple[int, int, int]:
    """(height, width, channels) of an image shape given as ``[H, W]`` (greyscale) or ``[H, W,
    C]``."""
    if len(image_shape) == 2:
        h, w = image_shape
        return int(h), int(w), 1
    h, w, c = image_shape
    return int(h), int(w), int(c)


def as_image_shape(image_shape: Sequence[int]) -> ImageShape:
    """``image_shape`` as a tuple (a JSON list becomes one): ``(H, W)`` or ``(H, W, C)``."""
    shape = tuple(image_shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    raise ValueError(f"an image shape is [H, W] or [H, W, C], got {list(shape)}")


def image_size(image_shape: ImageShape) -> int:
    """Features of one flattened image: H * W * C."""
    h, w, c = image_dims(image_shape)
    return h * w * c


def as_channels_first(x: torch.Tensor, image_shape: ImageShape) -> torch.Tensor:
    """(n, H*W*C) rows, each an image flattened channels-last (numpy's ``images.reshape(n, -1)``
    of an (n, H, W, C) array) -> (n, C, H, W), the layout convolutions take."""
    h, w, c = image_dims(image_shape)
    return x.reshape(-1, h, w, c).permute(0, 3, 1, 2)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) -> (n, H*W*C) rows flattened channels-last: the inverse of
    ``as_channels_first``."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def conv_blocks(image_shape: ImageShape) -> int:
    """Conv blocks (each halves the side) for an image: two, and one more while the shorter side
    would still exceed 8 pixels, so the linear layer after them stays small on large images.
    Images up to 32 x 32 (MNIST, digits) get the two blocks the defaults were measured with."""
    h, w, _ = image_dims(image_shape)
    blocks = 2
    while min(h, w) >> blocks > 8:
        blocks += 1
    return blocks


class ConvEncoder(nn.Module):
    """(n, H*W*C) images in [0,1] -> (n, out_dim) features: conv blocks, then two linear layers."""

    def __init__(
        self, image_shape: ImageShape, out_dim: int, channels: int = 32, norm: str = "batch"
    ) -> None:
        super().__init__()
        h, w, c = image_dims(image_shape)
        self.image_shape = as_image_shape(image_shape)
        blocks = conv_blocks(image_shape)
        layers: list[nn.Module] = []
        width_in = c
        for b in range(blocks):
            width_out = channels if b == 0 else 2 * channels
            layers += [
                nn.Conv2d(width_in, width_out, 3, padding=1),
                norm_layer(norm, width_out, spatial=True),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            width_in = width_out
        self.conv = nn.Sequential(*layers)
        flat = width_in * (h >> blocks) * (w >> blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H*W*C) -> (n, out_dim)
        return self.head(self.conv(as_channels_first(x, self.image_shape)))


class MLPEncoder(nn.Module):
    """(n, d) -> (n, out_dim) features for tabular inputs (or images, without the conv prior)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, norm: str = "batch") -> None:
        super().__init__()
        self.mlp = MLP(in_dim, out_dim, hidden, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def make_encoder(
    kind: str, in_dim: int, out_dim: int, image_shape: ImageShape | None, norm: str = "batch"
) -> nn.Module:
    """The encoder named by a config: ``"conv"`` (needs an image shape) or ``"mlp"``, with the
    named normalization (``norm_layer``)."""
    if kind == "conv":
        if image_shape is None:
            raise ValueError(
                "encoder 'conv' needs image inputs (an image shape); use encoder = 'mlp'"
            )
        return ConvEncoder(image_shape, out_dim, norm=norm)
    if kind == "mlp":
        return MLPEncoder(in_dim, out_dim, norm=norm)
    raise ValueError(f"unknown encoder {kind!r}: use 'conv' or 'mlp'")


@dataclass(frozen=True)
class Augmentation:
    """Random image transforms used in training: none of them changes a digit's (or most
    images') class, so the expert's answer for the original image stays the target and no
    extra query is spent."""

    shift: float = 0.0  # pixels, each axis, uniform in [-shift, shift]
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    scale: float = 0.0  # relative zoom, uniform in [1 - scale, 1 + scale]

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.rotation > 0 or self.scale > 0


def augment_images(
    x: torch.Tensor,
    image_shape: ImageShape,
    aug: Augmentation,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply one random affine transform (shift, rotation, zoom) per flattened image, (n, H*W*C).

    Every channel of an image moves with the same transform, so colours stay aligned. Pixels
    sampled from outside a greyscale image are zero (the background of the digit sets the
    defaults were measured on); a colour image repeats its border instead, since its background
    is rarely black.
    """
    if not aug.active:
        return x
    h, w, c = image_dims(image_shape)
    n = x.shape[0]

    def uniform(half_width: float) -> torch.Tensor:  # (n,) in [-half_width, half_width]
        return (2 * torch.rand(n, generator=generator) - 1) * half_width

    angle = uniform(math.radians(aug.rotation))
    zoom = 1 + uniform(aug.scale)
    # affine_grid maps output to input coordinates in [-1, 1]: a zoom of s samples a 1/s window,
    # and one pixel is 2/side in those units.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = uniform(aug.shift) * 2 / w, uniform(aug.shift) * 2 / h
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    padding = "zeros" if c == 1 else "border"
    moved = F.grid_sample(
        as_channels_first(x, image_shape), grid, padding_mode=padding, align_corners=False
    )  # (n, C, H, W)
    return as_rows(moved)


@dataclass(frozen=True)
class FeatureAugmentation:
    """Random perturbations of tabular training inputs (feature vectors). As with images, the
    expert's answer for the clean input stays the target: the encoder learns answers that do not
    hang on any one feature, and no extra query is spent."""

    dropout: float = (
        0.0  # probability that a feature is replaced by its centre (the query pool's mean)
    )
    noise: float = 0.0  # Gaussian noise, in units of each feature's spread over the query pool

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.noise > 0


def feature_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's centre and spread (mean and population std) over the training queries
    (n, d) -> (d,), (d,): what ``augment_features`` drops to and scales noise by."""
    return x.mean(0), x.std(0, correction=0)


def augment_features(
    x: torch.Tensor,
    aug: FeatureAugmentation,
    centre: torch.Tensor,
    spread: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Perturb a batch of feature vectors (n, d); ``centre`` and ``spread`` (d,) are each
    feature's mean and standard deviation over the training queries.

    A dropped feature takes its centre rather than 0, so raw, unstandardised columns are
    perturbed alike; relative noise leaves a constant feature constant.
    """
    if not aug.active:
        return x
    if aug.dropout > 0:
        dropped = torch.rand(x.shape, generator=generator) < aug.dropout  # (n, d)
        x = torch.where(dropped, centre.expand_as(x), x)
    if aug.noise > 0:
        x = x + aug.noise * spread * torch.randn(x.shape, generator=generator)
    return x
