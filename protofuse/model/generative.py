"""The paper's generative prototypes (Hoang, Lam, Low, Jaillet, ICML 2020; docs/method.md).

    z ~ N(0, I)                    task-agnostic concept
    w ~ p_gamma(w | tau)           task-specific pattern (diagonal Gaussian from a network of tau)
    x ~ p_theta(x | w, z)          decoder: Bernoulli for [0,1] images, Gaussian for tabular data
    eta ~ p_alpha(eta | z)         label head, softmax restricted to the task's classes

Inference networks q_phi(z | x, eta) and q_phi(w | x, tau), and the regularizer q_psi(eta | w).
Each ``w`` is a prototype, a predictor ``G_w(c | x) ∝ p(x, c | w)`` (``log_joint`` below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .networks import (
    MLP,
    GaussianHead,
    ImageShape,
    as_channels_first,
    as_image_shape,
    as_rows,
    image_dims,
    norm_layer,
)

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GenerativeConfig:
    x_dim: int
    n_labels: int
    z_dim: int = 5
    w_dim: int = 2
    hidden: int = 100
    likelihood: str = "bernoulli"  # "bernoulli" ([0,1] images) or "gaussian" (tabular)
    image_shape: ImageShape | None = None  # (H, W) or (H, W, C)
    conv: bool = False  # conv encoders and a transposed-conv decoder (images only)
    lam: float = 1.0  # weight of the regularizer q_psi(eta | w)
    hide_eta: float = 0.5  # fraction of training triples whose eta is hidden from q(z | x, eta)
    norm: str = "batch"  # the MLPs' normalization (networks.norm_layer); older banks: batch


def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) for diagonal Gaussians, summed over the last
    dim."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1
    ).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, e^logvar), summed over the last dim."""
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 / logvar.exp()).sum(-1)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A differentiable draw from N(mu, e^logvar): mu + e^(logvar / 2) * eps, eps ~ N(0, I)."""
    eps = torch.randn(mu.shape, generator=generator).to(mu.device)
    return mu + (0.5 * logvar).exp() * eps


def hide_rows(
    eta: torch.Tensor, fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """eta (B, C) with each row replaced by zeros with probability ``fraction`` (label hidden)."""
    hide = torch.rand(eta.shape[0], 1, generator=generator).to(eta.device) < fraction
    return eta.masked_fill(hide, 0.0)


def restricted_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax over the classes where ``mask`` is true (an expert's or task's label set).

    Outside the set the result is -inf; callers multiply by targets that are zero there, so we
    return a large negative number instead of -inf to keep ``0 * x`` finite.
    """
    masked = logits.masked_fill(~mask, -1e9)
    return torch.log_softmax(masked, dim=-1)


class ConvFeatures(nn.Module):
    """Image rows (n, H*W*C) -> 128 features, the shared front of the conv variant's encoders."""

    def __init__(self, image_shape: ImageShape) -> None:
        super().__init__()
        h, w, c = image_dims(image_shape)
        self.image_shape = as_image_shape(image_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), 128),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(as_channels_first(x, self.image_shape))


class ConvDecoder(nn.Module):
    """(w, z) -> image logits (n, H*W*C), flattened like the inputs, through two transposed
    convolutions."""

    def __init__(self, in_dim: int, image_shape: ImageShape, norm: str = "batch") -> None:
        super().__init__()
        h, w, c = image_dims(image_shape)
        self.h4, self.w4 = h // 4, w // 4
        self.out_shape = (h, w)
        self.fc = nn.Sequential(
            nn.Linear(in_dim, 100),
            norm_layer(norm, 100),
            nn.ReLU(),
            nn.Linear(100, 32 * self.h4 * self.w4),
            nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(16, c, 4, stride=2, padding=1),
        )

    def forward(self, wz: torch.Tensor) -> torch.Tensor:
        h = self.fc(wz).view(-1, 32, self.h4, self.w4)
        out = self.deconv(h)  # (n, C, 4*h4, 4*w4)
        h, w = self.out_shape
        out = F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))  # sizes not divisible by 4
        return as_rows(out)


class GenerativePrototypes(nn.Module):
    """All networks of the generative family, shared across experts."""

    def __init__(self, cfg: GenerativeConfig) -> None:
        super().__init__()
        conv_shape = cfg.image_shape if cfg.conv else None  # set exactly for the conv variant
        if cfg.conv and conv_shape is None:
            raise ValueError("the conv variant needs image inputs (an image shape)")
        self.cfg = cfg
        d, c, zd, wd, hdim = cfg.x_dim, cfg.n_labels, cfg.z_dim, cfg.w_dim, cfg.hidden
        self.features = ConvFeatures(conv_shape) if conv_shape is not None else nn.Identity()
        fdim = 128 if cfg.conv else d
        norm = cfg.norm
        self.enc_z = GaussianHead(fdim + c, zd, hdim, norm)  # q_phi(z | x, eta)
        self.enc_w = GaussianHead(fdim + c, wd, hdim, norm)  # q_phi(w | x, tau)
        self.prior_w = GaussianHead(c, wd, hdim, norm)  # p_gamma(w | tau)
        self.label_head = MLP(zd, c, hdim, norm)  # p_alpha(eta | z)
        self.regularizer = MLP(wd, c, hdim, norm)  # q_psi(eta | w)
        self.decoder = (
            ConvDecoder(wd + zd, conv_shape, norm)
            if conv_shape is not None
            else MLP(wd + zd, d, hdim, norm)
        )
        if cfg.likelihood == "gaussian":
            self.x_logvar = nn.Parameter(torch.zeros(d))  # per-feature observation noise
        elif cfg.likelihood != "bernoulli":
            raise ValueError(
                f"unknown likelihood {cfg.likelihood!r}: use 'bernoulli' or 'gaussian'"
            )

    # -- the generative model ------------------------------------------------------------
    def log_px(self, x: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_theta(x | w, z); x (..., d), w (..., wd), z (..., zd) broadcast together ->
        (...)."""
        batch = torch.broadcast_shapes(x.shape[:-1], w.shape[:-1], z.shape[:-1])
        wz = torch.cat([w.expand(*batch, -1), z.expand(*batch, -1)], dim=-1)
        out = self.decoder(wz.reshape(-1, wz.shape[-1])).view(*batch, -1)
        xb = x.expand(*batch, -1)
        if self.cfg.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, xb, reduction="none").sum(-1)
        return gaussian_log_prob(
            xb, out, self.x_logvar.clamp(-6.0, 4.0).expand_as(out)
        )  # bounded noise: constant features cannot blow up the likelihood

    def encode_z(
        self, x_feat: torch.Tensor, eta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc_z(torch.cat([x_feat, eta], dim=-1))

    def encode_w(
        self, x_feat: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc_w(torch.cat([x_feat, tau], dim=-1))

    # -- the training objective ----------------------------------------------------------
    def loss(
        self, x: torch.Tensor, eta: torch.Tensor, tau: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO plus regularizer on a batch of triples (x (B, d), eta (B, C), tau (B,
        C))."""
        mask = tau > 0
        x_feat = self.features(x)
        # Hide eta from q(z | x, eta) for part of the batch: otherwise the encoder copies the
        # label into z and learns little from the image.
        mu_z, lv_z = self.encode_z(x_feat, hide_rows(eta, self.cfg.hide_eta))
        mu_w, lv_w = self.encode_w(x_feat, tau)
        mu_pw, lv_pw = self.prior_w(tau)
        z = reparameterize(mu_z, lv_z)
        w = reparameterize(mu_w, lv_w)

        rec = self.log_px(x, w, z)
        label = (eta * restricted_log_softmax(self.label_head(z), mask)).sum(-1)
        kl_z = gaussian_kl(mu_z, lv_z, torch.zeros_like(mu_z), torch.zeros_like(lv_z))
        kl_w = gaussian_kl(mu_w, lv_w, mu_pw, lv_pw)
        reg = (eta * restricted_log_softmax(self.regularizer(w), mask)).sum(-1)

        elbo = rec + label - kl_z - kl_w
        total = -(elbo + self.cfg.lam * reg).mean()
        return {
            "loss": total,
            "rec": rec.mean(),
            "label": label.mean(),
            "kl_z": kl_z.mean(),
            "kl_w": kl_w.mean(),
            "reg": reg.mean(),
        }

    # -- prototypes ----------------------------------------------------------------------
    def log_joint(
        self,
        x: torch.Tensor,
        classes: torch.Tensor,
        w: torch.Tensor,
        n_z: int = 16,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Importance-sampled log p(x, c | w) for every example, task class and prototype.

        x (n, d); classes (K,) label indices of the task; w (M, wd)  ->  (n, K, M).

            p(x, c | w) = E_{q(z|x,e_c)} [ p(z) p_theta(x | z, w) p_alpha(c | z) / q(z | x, e_c) ]

        The label head's softmax is restricted to the task's classes, and the same standard-normal
        draws are used for every candidate class (independent draws drown the class differences
        in the decoder's hundreds of nats). Differentiable in ``w`` (recomposition needs that);
        wrap in ``torch.no_grad()`` to predict. Examples are processed in chunks that bound memory.
        """
        chunk = max(1, 4_000_000 // (classes.shape[0] * n_z * w.shape[0] * self.cfg.x_dim))
        # One set of draws for every example, class and chunk: an input's estimate does not
        # depend on which other inputs share its batch.
        eps = torch.randn(1, 1, n_z, self.cfg.z_dim, generator=generator).to(x.device)
        parts = [
            self._log_joint(x[i : i + chunk], classes, w, eps) for i in range(0, x.shape[0], chunk)
        ]
        return torch.cat(parts) if parts else x.new_zeros(0, classes.shape[0], w.shape[0])

    def _log_joint(
        self, x: torch.Tensor, classes: torch.Tensor, w: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        n, k, m, zd, n_z = x.shape[0], classes.shape[0], w.shape[0], self.cfg.z_dim, eps.shape[2]
        task_mask = torch.zeros(self.cfg.n_labels, dtype=torch.bool, device=x.device)
        task_mask[classes] = True
        onehot = F.one_hot(classes, self.cfg.n_labels).float()  # (K, C)
        x_feat = self.features(x)
        feats = x_feat[:, None, :].expand(n, k, -1)
        mu, lv = self.encode_z(feats.reshape(n * k, -1), onehot.repeat(n, 1))
        mu, lv = mu.view(n, k, 1, zd), lv.view(n, k, 1, zd)
        z = mu + (0.5 * lv).exp() * eps  # (n, K, S, zd); the same draws for every class
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = gaussian_log_prob(z, mu, lv)
        log_pc = restricted_log_softmax(self.label_head(z.reshape(-1, zd)), task_mask).view(
            n, k, n_z, -1
        )
        log_pc = log_pc.gather(-1, classes.view(1, k, 1, 1).expand(n, k, n_z, 1)).squeeze(
            -1
        )  # (n, K, S)
        log_px = self.log_px(
            x.view(n, 1, 1, 1, -1), w.view(1, 1, 1, m, -1), z[:, :, :, None, :]
        )  # (n, K, S, M)
        log_w = (log_pz + log_pc - log_qz)[..., None] + log_px
        return torch.logsumexp(log_w, dim=2) - math.log(n_z)  # (n, K, M)

    @torch.no_grad()
    def posterior_w(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(w | x, tau) for every x under one task descriptor tau (C,)."""
        x_feat = self.features(x)
        return self.encode_w(x_feat, tau.expand(x.shape[0], -1))
