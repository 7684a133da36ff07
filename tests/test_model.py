"""The mathematics of both prototype families: KL, G_w, importance sampling, recomposition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes, TaskHead, adapt_map
from protofuse.model.generative import GenerativeConfig, GenerativePrototypes, gaussian_kl, restricted_log_softmax
from protofuse.model.networks import Augmentation, augment_images
from protofuse.model.recompose import WDistribution, fit_gaussian, fit_mixture, log_conditional, predict_log_proba
from protofuse.training import train_generative
from protofuse.triples import assemble

torch.set_num_threads(1)


def test_gaussian_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.randn(3, generator=g), torch.randn(3, generator=g) * 0.5
    mu_p, lv_p = torch.randn(3, generator=g), torch.randn(3, generator=g) * 0.5
    q = torch.distributions.Normal(mu_q, (0.5 * lv_q).exp())
    p = torch.distributions.Normal(mu_p, (0.5 * lv_p).exp())
    s = q.sample((400_000,))
    mc = (q.log_prob(s) - p.log_prob(s)).sum(-1).mean()
    assert gaussian_kl(mu_q, lv_q, mu_p, lv_p).item() == pytest.approx(mc.item(), abs=0.02)
    assert gaussian_kl(mu_q, lv_q, mu_q, lv_q).item() == pytest.approx(0.0, abs=1e-6)


def test_restricted_softmax_puts_no_mass_outside_the_task():
    logits = torch.randn(4, 6)
    mask = torch.tensor([True, False, True, False, False, True])
    p = restricted_log_softmax(logits, mask).exp()
    assert torch.allclose(p.sum(-1), torch.ones(4))
    assert (p[:, ~mask] == 0).all()


@pytest.fixture(scope="module")
def toy_generative():
    """A small generative bank trained briefly on two-cluster data labelled by two experts."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d = 300, 12
    y = rng.integers(0, 3, n)
    centres = rng.random((3, d))
    x = np.clip(centres[y] + 0.1 * rng.standard_normal((n, d)), 0, 1).astype(np.float32)
    onehot = np.eye(3, dtype=np.float32)[y]
    outs = [onehot[:, [0, 1]] + 1e-3, onehot[:, [1, 2]] + 1e-3]
    outs = [o / o.sum(1, keepdims=True) for o in outs]
    triples = assemble(["a", "b"], [("0", "1"), ("1", "2")], [x, x], outs, shared=[0, 0])
    model = GenerativePrototypes(GenerativeConfig(d, 3, hidden=32))
    train_generative(model, triples, epochs=15, lr=3e-3)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def test_prototype_predictions_are_normalized_over_the_task_classes(toy_generative):
    model, x, _ = toy_generative
    classes = torch.tensor([0, 2])
    w = torch.randn(5, 2)
    with torch.no_grad():
        lj = model.log_joint(x[:20], classes, w, n_z=8, generator=torch.Generator().manual_seed(0))
    assert lj.shape == (20, 2, 5)
    g = log_conditional(lj).exp()
    assert torch.allclose(g.sum(1), torch.ones(20, 5), atol=1e-5)
    q_w = WDistribution(torch.zeros(2), torch.eye(2)).sample(5, torch.Generator().manual_seed(1))
    from protofuse.model.recompose import WeightedPrototypes

    q = WeightedPrototypes(q_w, torch.full((5,), -math.log(5)))
    for form in ("conditional", "joint"):
        p = predict_log_proba(lj, q, form).exp()
        assert torch.allclose(p.sum(-1), torch.ones(20), atol=1e-5)


def test_importance_sampling_estimate_stabilizes_as_samples_grow(toy_generative):
    model, x, _ = toy_generative
    classes, w = torch.tensor([0, 1, 2]), torch.zeros(1, 2)
    spreads = []
    for n_z in (2, 64):
        with torch.no_grad():
            estimates = torch.stack([model.log_joint(x[:10], classes, w, n_z=n_z, generator=torch.Generator().manual_seed(s)) for s in range(12)])
        spreads.append(estimates.std(0).mean().item())
    assert spreads[1] < 0.5 * spreads[0]


def test_shared_draws_make_class_comparisons_stable(toy_generative):
    """With the same z draws for every class, the class *differences* vary far less than the
    log-likelihoods themselves (the reason for common random numbers)."""
    model, x, _ = toy_generative
    classes, w = torch.tensor([0, 1, 2]), torch.zeros(1, 2)
    with torch.no_grad():
        est = torch.stack([model.log_joint(x[:10], classes, w, n_z=4, generator=torch.Generator().manual_seed(s)) for s in range(12)])
    diffs = est[:, :, 0] - est[:, :, 1]
    assert diffs.std(0).mean() < est[:, :, 0].std(0).mean()


def _support_loglik(model, x, y, classes, q):
    with torch.no_grad():
        lj = model.log_joint(x, classes, q.w, n_z=16, generator=torch.Generator().manual_seed(5))
    return predict_log_proba(lj, q, "conditional").gather(1, y[:, None]).sum().item()


def test_recomposition_raises_the_support_log_likelihood(toy_generative):
    model, x, y = toy_generative
    keep = y != 2  # a task over classes 0 and 1
    xs, ys = x[keep][:20], y[keep][:20]
    classes = torch.tensor([0, 1])
    start = WDistribution(torch.tensor([3.0, -3.0]), 0.05 * torch.eye(2))  # a deliberately poor start
    bank = [WDistribution(torch.zeros(2), torch.eye(2))]
    from protofuse.model.recompose import WeightedPrototypes

    before = WeightedPrototypes(start.sample(32, torch.Generator().manual_seed(1)), torch.full((32,), -math.log(32)))
    _, after = fit_gaussian(model, xs, ys, classes, start, bank, steps=40, seed=0)
    assert _support_loglik(model, xs, ys, classes, after) > _support_loglik(model, xs, ys, classes, before)
    comps = [start, WDistribution(torch.zeros(2), torch.eye(2))]
    pi, mix = fit_mixture(model, xs, ys, classes, comps, per_component=8, steps=100)
    uniform = type(mix)(mix.w, torch.full_like(mix.log_weights, -math.log(len(mix.w))))
    assert _support_loglik(model, xs, ys, classes, mix) >= _support_loglik(model, xs, ys, classes, uniform) - 1e-4


def test_map_adaptation_fits_support_and_respects_the_prior():
    torch.manual_seed(0)
    z = torch.randn(30, 8)
    true = torch.randn(3, 8)
    y = (z @ true.T).argmax(1)
    prior = TaskHead(torch.zeros(3, 8), torch.zeros(3), torch.zeros(()))
    loose = adapt_map(z, y, prior, torch.ones(3) * 10.0)
    tight = adapt_map(z, y, prior, torch.ones(3) * 0.01)
    acc = (loose.log_proba(z).argmax(1) == y).float().mean()
    assert acc > 0.9
    assert (tight.prototypes - prior.prototypes).norm() < 0.1 * (loose.prototypes - prior.prototypes).norm()


def test_discriminative_expert_heads_only_cover_their_labels():
    model = DiscriminativePrototypes(DiscriminativeConfig(x_dim=16, n_labels=5, n_experts=2, feat_dim=8, encoder="mlp"))
    tau = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    model.eval()
    p = model.expert_log_proba(model.encoder(torch.rand(4, 16)), tau).exp()
    assert p.shape == (4, 2, 5)
    assert torch.allclose(p.sum(-1), torch.ones(4, 2), atol=1e-5)
    assert (p[:, 0, 2:] < 1e-6).all() and (p[:, 1, :2] < 1e-6).all()


def test_consensus_term_teaches_the_whole_vocabulary():
    torch.manual_seed(0)
    model = DiscriminativePrototypes(DiscriminativeConfig(x_dim=16, n_labels=4, n_experts=1, feat_dim=8, encoder="mlp"))
    x, teacher = torch.rand(64, 16), torch.softmax(3 * torch.randn(64, 4), dim=-1)

    def kl() -> float:
        log_p = torch.log_softmax(model.logits(model.encoder(x)), dim=-1)
        return (teacher * (teacher.log() - log_p)).sum(-1).mean().item()

    before = kl()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model.consensus_loss(model.encoder(x), teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.1 * before


def test_integer_shifts_move_content_without_changing_mass():
    img = torch.zeros(1, 64)
    img[0, 3 * 8 + 3] = 1.0  # one pixel in the middle of an 8x8 image
    gen = torch.Generator().manual_seed(0)
    shifted = augment_images(img.repeat(200, 1), (8, 8), Augmentation(shift=1.0), gen)
    assert torch.allclose(shifted.sum(1), torch.ones(200), atol=1e-5)  # bilinear: mass is kept
    rows = (shifted.view(200, 8, 8).sum(2) * torch.arange(8.0)).sum(1)  # centre of mass, row
    assert rows.min() < 2.5 and rows.max() > 3.5 and ((rows - 3).abs() <= 1 + 1e-5).all()


def test_rotation_and_zoom_keep_a_centred_disc_in_place():
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    disc = (((yy - 5.5) ** 2 + (xx - 5.5) ** 2) < 9).float().reshape(1, 144)
    out = augment_images(disc.repeat(20, 1), (12, 12), Augmentation(rotation=30.0, scale=0.2), torch.Generator().manual_seed(0))
    centre_y = (out.view(20, 12, 12).sum(2) * torch.arange(12.0)).sum(1) / out.sum(1)
    assert torch.allclose(centre_y, torch.full((20,), 5.5), atol=0.05)  # no shift asked for, none made
    mass = out.sum(1) / disc.sum()
    assert (mass > 0.6).all() and (mass < 1.5).all() and mass.std() > 0.01  # zoom changes size


def test_no_augmentation_is_the_identity():
    x = torch.rand(5, 64)
    assert augment_images(x, (8, 8), Augmentation(), None) is x


def test_conv_variant_of_the_generative_family_trains_and_scores_images():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.random((64, 100)) > 0.7).astype(np.float32)  # 10x10 binary "images"
    y = rng.integers(0, 2, 64)
    outs = [np.eye(2, dtype=np.float32)[y] * 0.98 + 0.01]
    triples = assemble(["a"], [("0", "1")], [x], outs)
    model = GenerativePrototypes(GenerativeConfig(100, 2, image_shape=(10, 10), conv=True, hidden=32))
    before = model.loss(torch.from_numpy(x), torch.from_numpy(triples.eta[:, 0]), torch.from_numpy(triples.tau).expand(64, -1))["loss"].item()
    train_generative(model, triples, epochs=5, lr=3e-3)
    model.train()
    after = model.loss(torch.from_numpy(x), torch.from_numpy(triples.eta[:, 0]), torch.from_numpy(triples.tau).expand(64, -1))["loss"].item()
    model.eval()
    assert after < before
    with torch.no_grad():
        lj = model.log_joint(torch.from_numpy(x[:4]), torch.tensor([0, 1]), torch.zeros(3, 2), n_z=4)
    assert lj.shape == (4, 2, 3) and torch.isfinite(lj).all()
