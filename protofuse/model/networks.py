"""Building blocks shared by both prototype families: MLPs, conv encoders, image and table augmentation.

Sizes follow the paper's MNIST defaults (two hidden layers of 100 ReLU units, batch norm after
the first); the conv encoder is the small net the discriminative family uses on images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """in -> hidden -> BN -> ReLU -> hidden -> ReLU -> out (the paper's network shape)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, in) -> (n, out)
        return self.net(x)


class GaussianHead(nn.Module):
    """An MLP whose output is the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 100) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, 2 * out_dim, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.mlp(x).chunk(2, dim=-1)
        # Bounded log-variance keeps early training from exploding the KL terms.
        return mu, logvar.clamp(-8.0, 6.0)


class ConvEncoder(nn.Module):
    """(n, h*w) images in [0,1] -> (n, out_dim) features; two conv blocks and a linear layer."""

    def __init__(self, image_shape: tuple[int, int], out_dim: int, channels: int = 32) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        h, w = self.image_shape
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * channels * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.image_shape
        return self.head(self.conv(x.view(-1, 1, h, w)))


class MLPEncoder(nn.Module):
    """(n, d) -> (n, out_dim) features for tabular inputs (or images, without the conv prior)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, out_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def make_encoder(kind: str, in_dim: int, out_dim: int, image_shape: tuple[int, int] | None) -> nn.Module:
    """The encoder named by a config: ``"conv"`` (needs an image shape) or ``"mlp"``."""
    if kind == "conv":
        if image_shape is None:
            raise ValueError("encoder 'conv' needs image inputs (an image shape); use encoder = 'mlp'")
        return ConvEncoder(image_shape, out_dim)
    if kind == "mlp":
        return MLPEncoder(in_dim, out_dim)
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


def augment_images(x: torch.Tensor, image_shape: tuple[int, int], aug: Augmentation, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one random affine transform (shift, rotation, zoom) per flattened image, (n, h*w).

    Pixels sampled from outside the image are zero (the background of the datasets we use).
    """
    if not aug.active:
        return x
    h, w = image_shape
    n = x.shape[0]

    def uniform(half_width: float) -> torch.Tensor:  # (n,) in [-half_width, half_width]
        return (2 * torch.rand(n, generator=generator) - 1) * half_width

    angle = uniform(math.radians(aug.rotation))
    zoom = 1 + uniform(aug.scale)
    # affine_grid maps output to input coordinates in [-1, 1]: a zoom of s samples a 1/s window,
    # and one pixel is 2/side in those units.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = uniform(aug.shift) * 2 / w, uniform(aug.shift) * 2 / h
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(x.view(n, 1, h, w), grid, align_corners=False).reshape(n, h * w)


@dataclass(frozen=True)
class FeatureAugmentation:
    """Random perturbations of tabular training inputs (feature vectors). As with images, the
    expert's answer for the clean input stays the target: the encoder learns answers that do not
    hang on any one feature, and no extra query is spent."""

    dropout: float = 0.0  # probability that a feature is replaced by its centre (the query pool's mean)
    noise: float = 0.0  # Gaussian noise, in units of each feature's spread over the query pool

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.noise > 0


def augment_features(x: torch.Tensor, aug: FeatureAugmentation, centre: torch.Tensor, spread: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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
