"""The mathematics of both prototype families: KL, G_w, importance sampling, recomposition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protofuse.model.discriminative import (
    DiscriminativeConfig,
    DiscriminativePrototypes,
    TaskHead,
    adapt_map,
)
from protofuse.model.generative import (
    GenerativeConfig,
    GenerativePrototypes,
    gaussian_kl,
    gaussian_log_prob,
    hide_rows,
    reparameterize,
    restricted_log_softmax,
)
from protofuse.model.networks import (
    Augmentation,
    FeatureAugmentation,
    augment_features,
    augment_images,
    conv_blocks,
)
from protofuse.model.recompose import (
    WDistribution,
    WeightedPrototypes,
    fit_gaussian,
    fit_mixture,
    log_conditional,
    mixture_log_prob,
    predict_log_proba,
)
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
            estimates = torch.stack(
                [
                    model.log_joint(
                        x[:10], classes, w, n_z=n_z, generator=torch.Generator().manual_seed(s)
                    )
                    for s in range(12)
                ]
            )
        spreads.append(estimates.std(0).mean().item())
    assert spreads[1] < 0.5 * spreads[0]


def test_shared_draws_make_class_comparisons_stable(toy_generative):
    """With the same z draws for every class, the class *differences* vary far less than the
    log-likelihoods themselves (the reason for common random numbers)."""
    model, x, _ = toy_generative
    classes, w = torch.tensor([0, 1, 2]), torch.zeros(1, 2)
    with torch.no_grad():
        est = torch.stack(
            [
                model.log_joint(
                    x[:10], classes, w, n_z=4, generator=torch.Generator().manual_seed(s)
                )
                for s in range(12)
            ]
        )
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
    start = WDistribution(
        torch.tensor([3.0, -3.0]), 0.05 * torch.eye(2)
    )  # a deliberately poor start
    bank = [WDistribution(torch.zeros(2), torch.eye(2))]
    from protofuse.model.recompose import WeightedPrototypes

    before = WeightedPrototypes(
        start.sample(32, torch.Generator().manual_seed(1)), torch.full((32,), -math.log(32))
    )
    _, after = fit_gaussian(model, xs, ys, classes, start, bank, steps=40, seed=0)
    assert _support_loglik(model, xs, ys, classes, after) > _support_loglik(
        model, xs, ys, classes, before
    )
    comps = [start, WDistribution(torch.zeros(2), torch.eye(2))]
    _, mix = fit_mixture(model, xs, ys, classes, comps, per_component=8, steps=100)
    uniform = type(mix)(mix.w, torch.full_like(mix.log_weights, -math.log(len(mix.w))))
    assert (
        _support_loglik(model, xs, ys, classes, mix)
        >= _support_loglik(model, xs, ys, classes, uniform) - 1e-4
    )


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
    assert (tight.prototypes - prior.prototypes).norm() < 0.1 * (
        loose.prototypes - prior.prototypes
    ).norm()


def test_discriminative_expert_heads_only_cover_their_labels():
    model = DiscriminativePrototypes(
        DiscriminativeConfig(x_dim=16, n_labels=5, n_experts=2, feat_dim=8, encoder="mlp")
    )
    tau = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    model.eval()
    p = model.expert_log_proba(model.encoder(torch.rand(4, 16)), tau).exp()
    assert p.shape == (4, 2, 5)
    assert torch.allclose(p.sum(-1), torch.ones(4, 2), atol=1e-5)
    assert (p[:, 0, 2:] < 1e-6).all() and (p[:, 1, :2] < 1e-6).all()


def test_consensus_term_teaches_the_whole_vocabulary():
    torch.manual_seed(0)
    model = DiscriminativePrototypes(
        DiscriminativeConfig(x_dim=16, n_labels=4, n_experts=1, feat_dim=8, encoder="mlp")
    )
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
    cols = (shifted.view(200, 8, 8).sum(1) * torch.arange(8.0)).sum(1)  # the other axis alike
    assert cols.min() < 2.5 and cols.max() > 3.5 and ((cols - 3).abs() <= 1 + 1e-5).all()


def test_rotation_and_zoom_are_a_similarity_a_disc_stays_round():
    """Rotation with zoom must scale both axes alike: a centred disc may grow or shrink but not
    become an ellipse (a wrong sign or factor in the affine matrix would shear it)."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    disc = (((yy - 11.5) ** 2 + (xx - 11.5) ** 2) < 25).float().reshape(1, 576)
    out = augment_images(
        disc.repeat(50, 1),
        (24, 24),
        Augmentation(rotation=60.0, scale=0.5),
        torch.Generator().manual_seed(0),
    ).view(50, 24, 24)
    mass = out.sum((1, 2))
    var_y = (out.sum(2) * (torch.arange(24.0) - 11.5) ** 2).sum(1) / mass
    var_x = (out.sum(1) * (torch.arange(24.0) - 11.5) ** 2).sum(1) / mass
    cov = (out * (yy - 11.5) * (xx - 11.5)).sum((1, 2)) / mass
    assert ((var_y - var_x).abs() / (var_y + var_x) < 0.05).all() and (
        cov.abs() / (var_y + var_x) < 0.05
    ).all()
    assert mass.max() / mass.min() > 1.5  # the zoom did act


def test_rotation_and_zoom_keep_a_centred_disc_in_place():
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    disc = (((yy - 5.5) ** 2 + (xx - 5.5) ** 2) < 9).float().reshape(1, 144)
    out = augment_images(
        disc.repeat(20, 1),
        (12, 12),
        Augmentation(rotation=30.0, scale=0.2),
        torch.Generator().manual_seed(0),
    )
    centre_y = (out.view(20, 12, 12).sum(2) * torch.arange(12.0)).sum(1) / out.sum(1)
    assert torch.allclose(
        centre_y, torch.full((20,), 5.5), atol=0.05
    )  # no shift asked for, none made
    mass = out.sum(1) / disc.sum()
    assert (mass > 0.6).all() and (mass < 1.5).all() and mass.std() > 0.01  # zoom changes size


def test_pixels_from_outside_are_black_in_greyscale_and_repeat_the_border_in_colour():
    aug = Augmentation(rotation=45.0, scale=0.3, shift=2.0)
    gen = torch.Generator().manual_seed(0)
    grey = augment_images(torch.full((20, 64), 0.5), (8, 8), aug, gen)
    assert grey.min() >= 0 and (grey < 0.25).any()  # the background comes in black
    colour = augment_images(torch.full((20, 8 * 8 * 3), 0.5), (8, 8, 3), aug, gen)
    torch.testing.assert_close(colour, torch.full_like(colour, 0.5))  # a flat image stays flat


def test_conv_blocks_keep_the_side_after_them_at_most_8_pixels_from_two_blocks_up():
    sides = (8, 28, 32, 36, 64, 72, 256)
    assert [conv_blocks((s, s)) for s in sides] == [2, 2, 2, 3, 3, 4, 5]
    assert conv_blocks((256, 36, 3)) == conv_blocks((36, 36)) == 3  # the shorter side decides


def test_no_augmentation_is_the_identity():
    x = torch.rand(5, 64)
    assert augment_images(x, (8, 8), Augmentation(), None) is x


def test_feature_augmentation_draws_only_from_the_generator_it_is_given():
    x = torch.randn(50, 6)
    centre, spread = x.mean(0), x.std(0)
    aug = FeatureAugmentation(dropout=0.3, noise=0.5)

    def draw() -> torch.Tensor:
        torch.manual_seed(torch.seed())  # the global generator moves on between the two draws
        return augment_features(x, aug, centre, spread, torch.Generator().manual_seed(7))

    torch.testing.assert_close(draw(), draw())  # a seeded training run repeats exactly


def test_feature_dropout_replaces_about_the_asked_share_of_each_feature_by_its_centre():
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4000, 6) + torch.arange(6.0) * 10  # raw columns far from 0
    centre, spread = x.mean(0), x.std(0, correction=0)
    out = augment_features(x, FeatureAugmentation(dropout=0.3), centre, spread, gen)
    assert out.shape == x.shape
    dropped = out != x
    assert (
        (dropped.float().mean(0) - 0.3).abs() < 0.03
    ).all()  # about the set share, in every column
    assert torch.equal(
        out[dropped], centre.expand_as(x)[dropped]
    )  # a dropped feature takes its centre, not 0
    assert dropped.sum(1).float().var() > 0  # drawn per feature, not whole rows


def test_feature_noise_is_in_units_of_each_features_spread():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(8000, 3)
    spread = torch.tensor([1.0, 10.0, 0.0])  # the last feature never varies in the queries
    out = augment_features(x, FeatureAugmentation(noise=0.5), torch.zeros(3), spread, gen)
    assert torch.allclose(out.std(0)[:2], torch.tensor([0.5, 5.0]), rtol=0.05)
    assert torch.allclose(out.mean(0)[:2], torch.ones(2), atol=0.15)  # centred on the input
    assert torch.equal(out[:, 2], x[:, 2])


def test_no_feature_augmentation_is_the_identity():
    x = torch.rand(5, 3)
    assert augment_features(x, FeatureAugmentation(), x.mean(0), x.std(0), None) is x


def test_conv_variant_of_the_generative_family_trains_and_scores_images():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.random((64, 100)) > 0.7).astype(np.float32)  # 10x10 binary "images"
    y = rng.integers(0, 2, 64)
    outs = [np.eye(2, dtype=np.float32)[y] * 0.98 + 0.01]
    triples = assemble(["a"], [("0", "1")], [x], outs)
    model = GenerativePrototypes(
        GenerativeConfig(100, 2, image_shape=(10, 10), conv=True, hidden=32)
    )
    before = model.loss(
        torch.from_numpy(x),
        torch.from_numpy(triples.eta[:, 0]),
        torch.from_numpy(triples.tau).expand(64, -1),
    )["loss"].item()
    train_generative(model, triples, epochs=5, lr=3e-3)
    model.train()
    after = model.loss(
        torch.from_numpy(x),
        torch.from_numpy(triples.eta[:, 0]),
        torch.from_numpy(triples.tau).expand(64, -1),
    )["loss"].item()
    model.eval()
    assert after < before
    with torch.no_grad():
        lj = model.log_joint(
            torch.from_numpy(x[:4]), torch.tensor([0, 1]), torch.zeros(3, 2), n_z=4
        )
    assert lj.shape == (4, 2, 3) and torch.isfinite(lj).all()


# -- the formulas, each against an independent computation --------------------------------


def test_gaussian_log_prob_is_the_diagonal_normal_density():
    g = torch.Generator().manual_seed(0)
    x, mu, logvar = (
        torch.randn(5, 3, generator=g),
        torch.randn(5, 3, generator=g),
        torch.randn(5, 3, generator=g),
    )
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(x, mu, logvar), expected)


def test_mixture_log_prob_is_the_uniform_mixture_density():
    components = [
        WDistribution(torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.5]])),
        WDistribution(torch.tensor([-2.0, 0.5]), torch.eye(2) * 0.2),
    ]
    w = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.4]])
    dens = (
        sum(
            torch.distributions.MultivariateNormal(c.mean, c.cov).log_prob(w).exp()
            for c in components
        )
        / 2
    )
    torch.testing.assert_close(mixture_log_prob(w, components), dens.log(), atol=1e-4, rtol=1e-4)


def test_prediction_forms_weigh_prototypes_by_their_weights():
    # Two prototypes, two classes, one input: log p(x, c | w) as a (1, K=2, M=2) table.
    log_joint = torch.log(torch.tensor([[[0.6, 0.02], [0.2, 0.06]]]))
    q = WeightedPrototypes(torch.zeros(2, 1), torch.log(torch.tensor([0.25, 0.75])))
    joint = predict_log_proba(log_joint, q, "joint").exp()
    mix = 0.25 * torch.tensor([0.6, 0.2]) + 0.75 * torch.tensor([0.02, 0.06])
    torch.testing.assert_close(joint[0], mix / mix.sum())
    conditional = predict_log_proba(log_joint, q, "conditional").exp()
    vote = 0.25 * torch.tensor([0.75, 0.25]) + 0.75 * torch.tensor([0.25, 0.75])
    torch.testing.assert_close(conditional[0], vote / vote.sum())
    with pytest.raises(ValueError, match="unknown prediction form"):
        predict_log_proba(log_joint, q, "marginal")


def test_task_head_is_a_tempered_softmax_over_its_rows():
    head = TaskHead(
        torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        torch.tensor([0.5, -0.5]),
        torch.tensor(math.log(2.0)),
    )
    z = torch.tensor([[1.0, 1.0]])
    logits = 2.0 * torch.tensor([1.0 + 0.5, 2.0 - 0.5])
    torch.testing.assert_close(head.log_proba(z), torch.log_softmax(logits, -1)[None])


def _documented_map_objective(
    head_params, z, y, prior: TaskHead, scale: torch.Tensor, strength: float
) -> torch.Tensor:
    """docs/method.md: the negative log posterior that adaptation minimises, written out anew."""
    protos, bias, log_temp = head_params
    nll = -torch.log_softmax(log_temp.exp() * (z @ protos.T + bias), -1)[
        torch.arange(len(y)), y
    ].sum()
    lam = strength / scale**2
    return (
        nll
        + 0.5 * (lam * ((protos - prior.prototypes) ** 2).sum(-1)).sum()
        + 0.5 * (lam * (bias - prior.bias) ** 2).sum()
        + 0.5 * (log_temp - prior.log_temp) ** 2
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_adaptation_finds_the_minimum_of_the_documented_objective(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(12, 4, generator=g)
    y = torch.arange(12) % 3
    prior = TaskHead(
        torch.randn(3, 4, generator=g), 0.5 * torch.randn(3, generator=g), torch.tensor(0.2)
    )
    scale = torch.tensor([0.5, 1.0, 2.0])
    head = adapt_map(z, y, prior, scale, strength=1.5)
    params = [
        head.prototypes.clone().requires_grad_(True),
        head.bias.clone().requires_grad_(True),
        head.log_temp.clone().requires_grad_(True),
    ]
    grads = torch.autograd.grad(_documented_map_objective(params, z, y, prior, scale, 1.5), params)
    assert max(gr.abs().max().item() for gr in grads) < 1e-2  # L-BFGS stops at float32 tolerance


def test_importance_sampling_estimate_does_not_drift_with_the_sample_count(toy_generative):
    """log p(x, c | w) is an average of importance weights: more samples reduce its noise, not
    its level (a wrong normaliser would shift it by log n_z)."""
    model, x, _ = toy_generative
    classes, w = torch.tensor([0, 1, 2]), torch.zeros(1, 2)
    with torch.no_grad():
        few = torch.stack(
            [
                model.log_joint(
                    x[:10], classes, w, n_z=4, generator=torch.Generator().manual_seed(s)
                )
                for s in range(8)
            ]
        ).mean()
        many = model.log_joint(
            x[:10], classes, w, n_z=256, generator=torch.Generator().manual_seed(99)
        ).mean()
    assert abs((few - many).item()) < 1.0 < math.log(256 / 4)


def test_aggregated_posterior_has_the_moments_of_the_mixture_of_posteriors(toy_generative):
    from protofuse.model.recompose import aggregated_posterior

    model, x, _ = toy_generative
    tau = torch.tensor([1.0, 1.0, 0.0])
    mu, logvar = model.posterior_w(x, tau)
    dist = aggregated_posterior(model, x, tau)
    torch.testing.assert_close(dist.mean, mu.mean(0))
    # Law of total variance: mean of the covariances plus the covariance of the means.
    means = mu.numpy().astype(np.float64)
    expected = np.diag(logvar.exp().numpy().mean(0)) + np.cov(means.T, bias=True)
    np.testing.assert_allclose(dist.cov.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_mixture_recomposition_prefers_the_component_that_explains_the_support(toy_generative):
    """Two bank components: one at the prototypes that fit the task best, one far off. The fitted
    weights must move clearly towards the first."""
    model, x, y = toy_generative
    keep = y != 2
    xs, ys = x[keep][:100], y[keep][:100]
    classes = torch.tensor([0, 1])
    candidates = [torch.tensor([a, b]) for a in (-3.0, 0.0, 3.0) for b in (-3.0, 0.0, 3.0)]
    fits = []
    for c in candidates:
        q = WeightedPrototypes(c[None], torch.zeros(1))
        fits.append(_support_loglik(model, xs, ys, classes, q))
    best, worst = candidates[int(np.argmax(fits))], candidates[int(np.argmin(fits))]
    assert max(fits) > min(fits) + 1.0  # the premise: the prototypes differ on this task
    comps = [WDistribution(worst, 0.01 * torch.eye(2)), WDistribution(best, 0.01 * torch.eye(2))]
    pi, _ = fit_mixture(model, xs, ys, classes, comps, per_component=4, steps=200)
    assert pi[1] > 0.9


def test_reparameterized_draws_have_the_asked_mean_and_spread():
    mu, logvar = (
        torch.tensor([1.0, -2.0]).expand(20000, 2),
        torch.tensor([math.log(4.0), math.log(0.25)]).expand(20000, 2),
    )
    draws = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), torch.tensor([1.0, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.tensor([2.0, 0.5]), atol=0.03, rtol=0)
    assert (
        abs(((draws[:, 0] - 1.0) / 2.0).pow(4).mean().item() - 3.0) < 0.2
    )  # Gaussian tails (kurtosis 3)
    torch.testing.assert_close(
        reparameterize(mu, logvar, torch.Generator().manual_seed(0)), draws
    )  # the generator decides


def test_hiding_rows_zeroes_whole_rows_at_the_asked_rate():
    eta = torch.softmax(torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)), -1)
    assert torch.equal(hide_rows(eta, 0.0), eta) and (hide_rows(eta, 1.0) == 0).all()
    half = hide_rows(eta, 0.5, torch.Generator().manual_seed(1))
    hidden = (half == 0).all(1)
    assert abs(hidden.float().mean().item() - 0.5) < 0.03
    assert torch.equal(half[~hidden], eta[~hidden])  # the others pass unchanged
    assert torch.equal(
        hide_rows(eta, 0.5, torch.Generator().manual_seed(1)), half
    )  # the generator decides


def test_label_terms_of_the_elbo_are_restricted_to_the_experts_labels():
    """With the label head and the regulariser answering all-zero logits, the restricted
    cross-entropy of a one-hot answer is exactly log of the expert's label count, not of the
    vocabulary's: the softmax runs over the expert's own labels only."""
    torch.manual_seed(0)
    model = GenerativePrototypes(GenerativeConfig(6, 4, hidden=8))
    for head in (model.label_head, model.regularizer):
        last = head.net[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    model.eval()
    tau = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(5, 4)
    eta = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(5, 4)
    out = model.loss(torch.rand(5, 6), eta, tau)
    assert out["label"].item() == pytest.approx(-math.log(2)) and out[
        "reg"
    ].item() == pytest.approx(-math.log(2))


def test_gaussian_heads_bound_their_log_variance():
    from protofuse.model.networks import GaussianHead

    head = GaussianHead(3, 2, hidden=8).eval()
    _, logvar = head(torch.randn(50, 3))
    assert (
        (logvar > -8).all() and (logvar < 6).all() and logvar.std() > 0
    )  # ordinary inputs: untouched
    with torch.no_grad():
        head.mlp.net[-1].bias[2:] = torch.tensor([100.0, -100.0])
    _, logvar = head(torch.randn(50, 3))
    assert (logvar[:, 0] == 6.0).all() and (logvar[:, 1] == -8.0).all()


def test_gaussian_decoder_scores_inputs_with_its_learned_noise():
    torch.manual_seed(0)
    model = GenerativePrototypes(GenerativeConfig(5, 3, likelihood="gaussian", hidden=8)).eval()
    with torch.no_grad():
        model.x_logvar.copy_(
            torch.tensor([0.0, 1.0, -1.0, 9.0, -9.0])
        )  # the last two beyond the bounds
    x, w, z = torch.randn(4, 5), torch.randn(4, 2), torch.randn(4, 5)
    mean = model.decoder(torch.cat([w, z], -1))
    std = (0.5 * torch.tensor([0.0, 1.0, -1.0, 4.0, -6.0])).exp()
    torch.testing.assert_close(
        model.log_px(x, w, z), torch.distributions.Normal(mean, std).log_prob(x).sum(-1)
    )
    bernoulli = GenerativePrototypes(GenerativeConfig(5, 3, likelihood="bernoulli", hidden=8))
    assert not hasattr(bernoulli, "x_logvar")
    with pytest.raises(ValueError, match="unknown likelihood"):
        GenerativePrototypes(GenerativeConfig(5, 3, likelihood="poisson"))


@pytest.mark.parametrize("side", [10, 12, 13])
def test_conv_networks_of_the_generative_family_keep_image_geometry(side):
    """Features: two conv blocks that halve the side twice, then 128 features. Decoder: two
    transposed convolutions that double it twice (to 4 * (side // 4)), padded to the image."""
    from protofuse.model.generative import ConvDecoder, ConvFeatures

    torch.manual_seed(0)
    features, decoder = ConvFeatures((side, side)).eval(), ConvDecoder(7, (side, side)).eval()
    x = torch.rand(3, side * side)
    assert features(x).shape == (3, 128)
    wz = torch.randn(3, 7)
    inner = decoder.deconv(decoder.fc(wz).view(-1, 32, side // 4, side // 4))
    assert inner.shape == (3, 1, 4 * (side // 4), 4 * (side // 4))
    out = decoder(wz).view(3, side, side)
    torch.testing.assert_close(out[:, : inner.shape[2], : inner.shape[3]], inner[:, 0])
    assert (out[:, inner.shape[2] :, :] == 0).all() and (out[:, :, inner.shape[3] :] == 0).all()
    model = GenerativePrototypes(
        GenerativeConfig(side * side, 3, image_shape=(side, side), conv=True, hidden=8)
    )
    assert isinstance(model.decoder, ConvDecoder) and isinstance(model.features, ConvFeatures)
    with pytest.raises(
        ValueError, match=r"^the conv variant needs image inputs \(an image shape\)$"
    ):
        GenerativePrototypes(GenerativeConfig(side * side, 3, conv=True))


def test_support_log_likelihood_averages_over_prototypes_then_sums_over_examples():
    from protofuse.model.recompose import support_log_likelihood

    # Two examples, two classes, three prototype samples: G_w(c | x) as probabilities.
    g = torch.tensor([[[0.9, 0.5, 0.1], [0.1, 0.5, 0.9]], [[0.2, 0.6, 0.7], [0.8, 0.4, 0.3]]])
    y = torch.tensor([0, 1])
    expected = math.log((0.9 + 0.5 + 0.1) / 3) + math.log((0.8 + 0.4 + 0.3) / 3)
    assert support_log_likelihood(g.log(), y).item() == pytest.approx(expected, rel=1e-6)


def test_encoders_are_named_and_misnamed_ones_refused():
    from protofuse.model.networks import ConvEncoder, MLPEncoder, make_encoder

    assert isinstance(make_encoder("conv", 64, 8, (8, 8)), ConvEncoder) and isinstance(
        make_encoder("mlp", 64, 8, None), MLPEncoder
    )
    with pytest.raises(
        ValueError,
        match=r"^encoder 'conv' needs image inputs \(an image shape\); use encoder = 'mlp'$",
    ):
        make_encoder("conv", 64, 8, None)
    with pytest.raises(ValueError, match=r"^unknown encoder 'resnet': use 'conv' or 'mlp'$"):
        make_encoder("resnet", 64, 8, None)


def test_the_training_loss_is_the_negative_elbo_plus_the_weighted_regulariser():
    """loss = -(E[log p(x|w,z)] + E[sum_c eta_c log p(c|z)] - KL_z - KL_w
                + lambda * E[sum_c eta_c log q(c|w)]),
    each term averaged over the batch (docs/method.md)."""
    torch.manual_seed(0)
    model = GenerativePrototypes(GenerativeConfig(6, 3, hidden=8, lam=0.7)).eval()
    eta = torch.softmax(torch.randn(5, 3), -1)
    out = model.loss(torch.rand(5, 6), eta, torch.ones(5, 3))
    expected = -(out["rec"] + out["label"] - out["kl_z"] - out["kl_w"] + 0.7 * out["reg"])
    torch.testing.assert_close(out["loss"], expected)
    assert out["kl_z"] > 0 and out["kl_w"] > 0 and out["rec"] < 0


def test_an_images_flat_size_is_height_times_width_times_channels():
    from protofuse.model.networks import image_size

    assert image_size((8, 8)) == 64 and image_size((4, 6, 3)) == 72


def test_a_config_read_back_from_json_has_its_image_shape_as_a_tuple_again():
    import json

    from protofuse.families.base import config_from_json

    config = {"x_dim": 192, "image_shape": (8, 8, 3), "feat_dim": 16}
    back = config_from_json(json.loads(json.dumps(config)))
    assert back == config and isinstance(back["image_shape"], tuple)
    assert config_from_json({"x_dim": 4, "image_shape": None}) == {"x_dim": 4, "image_shape": None}


def test_image_shapes_keep_every_dimension_in_order():
    from protofuse.model.networks import as_image_shape

    assert as_image_shape([4, 6]) == (4, 6)
    assert as_image_shape([4, 6, 3]) == (4, 6, 3)  # height, width, channels: none swapped
    with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, C\]"):
        as_image_shape([4])
