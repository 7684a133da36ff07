"""Building blocks shared by both prototype families: MLPs, conv encoders, random shifts.

Sizes follow the paper's MNIST defaults (two hidden layers of 100 ReLU units, batch norm after
the first); the conv encoder is the small net the discriminative family uses on images.
"""

from __future__ import annotations

import torch
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


def random_shift(x: torch.Tensor, image_shape: tuple[int, int], max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each (flattened) image by up to ``max_shift`` pixels, filling with zeros.

    The expert's output for the unshifted image stays the target: small shifts do not change a
    digit's class, so this teaches the encoder invariance without querying the expert again.
    """
    if max_shift <= 0:
        return x
    h, w = image_shape
    n = x.shape[0]
    pad = max_shift
    padded = torch.nn.functional.pad(x.view(n, 1, h, w), (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    out = padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]  # (n, h, w)
    return out.reshape(n, h * w)
