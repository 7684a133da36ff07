"""Training and its measurements: imitation fidelity, consensus agreement, reliability weights,
held-out queries kept out of training, and what consensus distillation does to the bank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from toys import answers, clusters, two_experts

from protofuse.bank import Bank, fit_bank
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.training import (
    MIN_AGREEMENT_ROWS,
    consensus_agreement,
    fidelity,
    reliability_weights,
)
from protofuse.triples import assemble

torch.set_num_threads(1)


def _two_experts(eta_a: np.ndarray, eta_b: np.ndarray):
    """Expert a answers over labels (0, 1), expert b over (1, 2), both on the same 4 inputs."""
    x = np.zeros((len(eta_a), 2), dtype=np.float32)
    return assemble(["a", "b"], [("0", "1"), ("1", "2")], [x, x], [eta_a, eta_b], shared=[0, 0])


def test_fidelity_on_a_case_with_a_knownanswers():
    eta_a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)
    eta_b = np.array([[1.0, 0.0], [0.3, 0.7], [0.3, 0.7], [0.7, 0.3]], dtype=np.float32)
    triples = _two_experts(eta_a, eta_b)
    # The imitation (n, E, C) over the vocabulary (0, 1, 2): a agrees on rows 0, 1, 3, b on rows
    # 1, 2. Off-label columns carry large mass to prove they are ignored: fidelity is over the
    # expert's own labels only.
    q_a = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.5, 0.5]])
    q_b = np.array([[0.4, 0.6], [0.1, 0.9], [0.2, 0.8], [0.4, 0.6]])
    imitated = np.zeros((4, 2, 3))
    imitated[:, 0, :2], imitated[:, 0, 2] = q_a, 0.0
    imitated[:, 1, 1:], imitated[:, 1, 0] = q_b, 0.0
    with np.errstate(divide="ignore"):
        log_q = torch.from_numpy(np.log(imitated)).float()
    log_q[:, 0, 2] = 50.0  # would win an argmax over the whole vocabulary
    log_q[:, 1, 0] = 50.0
    fa, fb = fidelity(log_q, triples)
    assert fa.agreement == pytest.approx(3 / 4) and fb.agreement == pytest.approx(2 / 4)
    assert fa.n == 4 and fb.n == 4

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0)
        return float(terms.sum(1).mean())

    assert fa.kl == pytest.approx(kl(eta_a, q_a), rel=1e-5)
    assert fb.kl == pytest.approx(kl(eta_b, q_b), rel=1e-5)  # a zero answer contributes nothing


def test_fidelity_counts_only_the_inputs_an_expert_answered():
    xa, xb = np.zeros((3, 2), np.float32), np.ones((2, 2), np.float32)
    triples = assemble(
        ["a", "b"],
        [("0", "1"), ("0", "1")],
        [xa, xb],
        [np.eye(2, dtype=np.float32)[[0, 1, 0]], np.eye(2, dtype=np.float32)[[1, 1]]],
    )
    log_q = torch.log(torch.tensor([[0.9, 0.1]] * 5)).float()[:, None, :].expand(5, 2, 2)
    fa, fb = fidelity(log_q, triples)
    assert (fa.n, fb.n) == (3, 2)
    assert fa.agreement == pytest.approx(2 / 3) and fb.agreement == pytest.approx(0.0)
    assert fb.kl == pytest.approx(-math.log(0.1), rel=1e-5)
    empty = assemble(
        ["a", "b"],
        [("0", "1"), ("0", "1")],
        [xa, xb[:0]],
        [np.eye(2, dtype=np.float32)[[0, 1, 0]], np.zeros((0, 2), np.float32)],
    )
    _, none = fidelity(log_q[:3], empty)
    assert none.n == 0 and math.isnan(none.agreement) and math.isnan(none.kl)


def test_consensus_agreement_and_reliability_weights_on_a_known_case():
    # Vocabulary (0, 1, 2); a covers (0, 1), b covers (1, 2).
    eta_a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)
    eta_b = np.array([[0.9, 0.1], [0.3, 0.7], [0.3, 0.7], [0.7, 0.3]], dtype=np.float32)
    triples = _two_experts(eta_a, eta_b)
    pooled = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7], [0.05, 0.05, 0.9]])
    agreement = consensus_agreement(pooled, triples, min_rows=1)
    # a: only row 0 has consensus mass > 0.5 on {0, 1}; it agrees there. b: rows 1-3, agrees on 1
    # and 2.
    np.testing.assert_allclose(agreement, [1.0, 2 / 3])
    weights = reliability_weights(np.array([1.0, 0.75, 0.5, np.nan]), np.array([2, 4, 2, 3]))
    # kappa = (agreement - chance) / (1 - chance): 1, 2/3, 0, and 1 for an expert never judged.
    np.testing.assert_allclose(weights, [1.0, (2 / 3) ** 2, 0.0, 1.0])
    np.testing.assert_allclose(
        reliability_weights(np.array([0.5, 0.75]), np.array([2, 2])), [0.0, 1.0]
    )
    # By default a rate on fewer than MIN_AGREEMENT_ROWS inputs is not a measurement.
    assert np.isnan(consensus_agreement(pooled, triples)).all()
    rows = np.repeat(np.arange(4), MIN_AGREEMENT_ROWS)  # each input 30 times: same rates
    many = _two_experts(eta_a[rows], eta_b[rows])
    np.testing.assert_allclose(consensus_agreement(pooled[rows], many), [1.0, 2 / 3])
    # Unmeasured experts set no reference: the measured ones are scored against each other.
    np.testing.assert_allclose(
        reliability_weights(np.array([0.5, 0.75, np.nan]), np.array([2, 2, 2]), "median"),
        [0.0, 1.0, 1.0],
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fidelity_is_measured_on_queries_the_bank_never_trained_on(seed):
    """The held-out queries sit in a region of their own where the expert answers '1' although
    they lie next to the 0s: a bank that never saw them says '0' there, one that trained on them
    learns '1'. So fidelity near 0 proves they were held out; near 1 would mean a leak."""
    x, y, centres = clusters(seed)
    probe = assemble(["a"], [("0", "1")], [x], [answers(y, [0, 1])])
    held_rows = np.sort(probe.split_indices(0.1, seed)[1])
    y = y.copy()
    y[held_rows] = 0
    x = x.copy()
    offset = np.zeros(x.shape[1], np.float32)
    offset[0] = 0.25
    x[held_rows] = (
        centres[0]
        + offset
        + 0.02 * np.random.default_rng(seed).standard_normal((len(held_rows), x.shape[1]))
    )
    answers_a = answers(y, [0, 1, 2])
    answers_a[held_rows] = [0.01, 0.98, 0.01]  # the expert's private rule for that region
    triples = assemble(
        ["a", "b"],
        [("0", "1", "2"), ("2", "3")],
        [x, x],
        [answers_a, answers(y, [2, 3])],
        shared=[0, 0],
    )
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=15, lr=5e-3, holdout=0.1, seed=seed),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    a = {e.name: e for e in bank.experts}["a"]
    assert a.fidelity.n == len(held_rows) == 40
    assert a.fidelity.agreement < 0.2
    leaked = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=15, lr=5e-3, holdout=0.0, seed=seed),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    # The same region, learned from: the test's premise holds (the bank could have learned it).
    assert (
        leaked.model.logits(leaked.model.embed(torch.from_numpy(x[held_rows]))).argmax(1)
        == leaked.label_names.index("1")
    ).float().mean() > 0.8


def _pair_log_proba(bank: Bank, x: np.ndarray, a: str, b: str) -> torch.Tensor:
    """The bank's own labeller restricted to two labels: (n, 2) log-probabilities."""
    m = bank.model
    cols = [bank.label_names.index(a), bank.label_names.index(b)]
    with torch.no_grad():
        return torch.log_softmax(m.logits(m.embed(torch.from_numpy(x)))[:, cols], dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_distillation_carries_the_first_phase_consensus_to_labels_no_expert_compares(seed):
    """0 and 3 never share an expert, so only the bank ranks them against each other. Distillation
    makes the second phase keep the first phase's consensus on that pair: with it, the final
    bank's 0-vs-3 distribution is clearly closer to the first phase's than without it."""
    x, y, _ = clusters(seed)
    triples = two_experts(x, y)
    pair = x[np.isin(y, [0, 3])]
    model, adapt = ModelSettings(feat_dim=8), AdaptSettings()

    def bank(**training) -> Bank:
        return fit_bank(
            triples,
            model,
            TrainingSettings(lr=5e-3, seed=seed, **training),
            adapt,
            None,
            "bernoulli",
        )

    # A 12-epoch bank trains 6 epochs from this same start, then 6 more: this is its first phase.
    teacher = _pair_log_proba(bank(epochs=6, reweight=False, distill=0.0), pair, "0", "3")

    def divergence(b: Bank) -> float:
        return (
            (teacher.exp() * (teacher - _pair_log_proba(b, pair, "0", "3"))).sum(-1).mean().item()
        )

    # Reweighting off in both: only distillation differs (and still splits training in two).
    with_distillation, without = (
        divergence(bank(epochs=12, distill=1.0, reweight=False)),
        divergence(bank(epochs=12, distill=0.0)),
    )
    assert with_distillation < 0.8 * without


def _contradicting_experts(seed: int = 0):
    """Experts a and b label the same inputs with the same two labels, b with them swapped."""
    x, y, _ = clusters(seed)
    keep = np.isin(y, [0, 1])
    x, y = x[keep], y[keep]
    honest = answers(y, [0, 1])
    return (
        assemble(
            ["a", "b"],
            [("0", "1"), ("0", "1")],
            [x, x],
            [honest, honest[:, ::-1].copy()],
            shared=[0, 0],
        ),
        x,
        y,
    )


@pytest.mark.parametrize("weights, follows", [((1.0, 0.0), "a"), ((0.0, 1.0), "b")])
def test_training_listens_to_experts_in_proportion_to_their_weights(weights, follows):
    from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
    from protofuse.training import train_discriminative

    triples, x, y = _contradicting_experts()
    torch.manual_seed(0)
    model = DiscriminativePrototypes(
        DiscriminativeConfig(x.shape[1], 2, 2, feat_dim=8, encoder="mlp")
    )
    train_discriminative(model, triples, 10, lr=5e-3, expert_weight=np.array(weights))
    predicted = model.logits(model.embed(torch.from_numpy(x))).argmax(1).numpy()
    truth = y if follows == "a" else 1 - y
    assert (predicted == truth).mean() > 0.95


def test_the_consensus_term_pulls_harder_with_a_larger_weight():
    from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
    from protofuse.training import train_discriminative

    x, y, _ = clusters()
    triples = assemble(["a"], [("0", "1", "2", "3")], [x], [answers(y, [0, 1, 2, 3])])
    teacher = (
        np.roll(np.eye(4, dtype=np.float32)[y], 1, axis=1) * 0.9 + 0.025
    )  # a teacher that disagrees with the expert

    def disagreement(weight: float) -> float:
        torch.manual_seed(0)
        model = DiscriminativePrototypes(
            DiscriminativeConfig(x.shape[1], 4, 1, feat_dim=8, encoder="mlp")
        )
        train_discriminative(model, triples, 8, lr=5e-3, teacher=teacher, teacher_weight=weight)
        log_p = (
            torch.log_softmax(model.logits(model.embed(torch.from_numpy(x))), -1).detach().numpy()
        )
        return float((teacher * (np.log(teacher) - log_p)).sum(1).mean())

    assert disagreement(4.0) < 0.5 * disagreement(0.25)


@pytest.mark.parametrize("family", ["discriminative", "generative"])
def test_training_reports_every_epoch_with_its_mean_loss(family):
    x, y, _ = clusters()
    triples = two_experts(x, y)
    seen: list[tuple[int, int, float]] = []
    fit_bank(
        triples,
        ModelSettings(family=family, feat_dim=8, hidden=16),
        TrainingSettings(epochs=6, lr=5e-3),
        AdaptSettings(),
        None,
        "bernoulli",
        progress=lambda e, n, loss: seen.append((e, n, loss)),
    )
    assert [(e, n) for e, n, _ in seen] == [(e, 6) for e in range(1, 7)]
    losses = [loss for _, _, loss in seen]
    assert all(np.isfinite(losses))
    if (
        family == "discriminative"
    ):  # cross-entropies: the first half's falls; the second adds the consensus term
        assert (
            0.3 < losses[0] < 3.0
            and losses[2] < 0.8 * losses[0]
            and all(loss < 5.0 for loss in losses)
        )
    else:  # a negative ELBO of 16 features: nats per triple (not summed over them), falling
        assert 5.0 < losses[0] < 200.0 and losses[-1] < losses[0]
    if family == "discriminative":  # one phase only (no reweighting, no distillation) reports too
        seen.clear()
        fit_bank(
            triples,
            ModelSettings(feat_dim=8),
            TrainingSettings(epochs=3, reweight=False, distill=0.0),
            AdaptSettings(),
            None,
            "bernoulli",
            progress=lambda e, n, loss: seen.append((e, n, loss)),
        )
        assert [(e, n) for e, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]


def test_a_bank_is_reproducible_from_its_seed():
    x, y, _ = clusters()
    triples = two_experts(x, y)

    def fit(seed: int) -> Bank:
        return fit_bank(
            triples,
            ModelSettings(feat_dim=8),
            TrainingSettings(epochs=4, lr=5e-3, seed=seed),
            AdaptSettings(),
            None,
            "bernoulli",
        )

    a, b, c = fit(3), fit(3), fit(4)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert [e.fidelity for e in a.experts] == [e.fidelity for e in b.experts]
    assert not torch.equal(a.model.prototypes, c.model.prototypes)


def test_expert_records_count_queries_and_mark_fidelity_unmeasured_without_a_holdout():
    x, y, _ = clusters()
    triples = assemble(
        ["a", "b"],
        [("0", "1", "2"), ("2", "3")],
        [x, x[:100]],
        [answers(y, [0, 1, 2]), answers(y[:100], [2, 3])],
    )
    for family in ("discriminative", "generative"):
        bank = fit_bank(
            triples,
            ModelSettings(family=family, feat_dim=8, hidden=16),
            TrainingSettings(epochs=2, holdout=0.0),
            AdaptSettings(),
            None,
            "bernoulli",
        )
        assert [e.n_queries for e in bank.experts] == [400, 100]
        for e in bank.experts:
            assert (
                e.fidelity.n == 0 and math.isnan(e.fidelity.agreement) and math.isnan(e.fidelity.kl)
            )
    for family in ("discriminative", "generative"):
        held = fit_bank(
            triples,
            ModelSettings(family=family, feat_dim=8, hidden=16),
            TrainingSettings(epochs=2, holdout=0.2),
            AdaptSettings(),
            None,
            "bernoulli",
        )
        assert sum(e.fidelity.n for e in held.experts) == 80 + 20 and all(
            0 <= e.fidelity.agreement <= 1 for e in held.experts
        )


def test_default_epochs_follow_the_family():
    x, y, _ = clusters(n=60)
    triples = assemble(["a"], [("0", "1", "2", "3")], [x], [answers(y, [0, 1, 2, 3])])
    for family, expected in (
        ("generative", 40),
        ("discriminative", 600),
    ):  # 54 queries: one batch an epoch, 600 steps
        seen: list[int] = []
        fit_bank(
            triples,
            ModelSettings(family=family, feat_dim=4, hidden=8),
            TrainingSettings(lr=5e-3),
            AdaptSettings(),
            None,
            "bernoulli",
            progress=lambda e, n, loss, seen=seen: seen.append(n),
        )
        assert set(seen) == {expected}


def test_image_banks_use_the_conv_encoder_and_train_on_augmented_images():
    from protofuse.model.networks import ConvEncoder

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    x = np.zeros((120, 8, 8), np.float32)
    for i, c in enumerate(y):  # a bar whose orientation is the class
        r = rng.integers(2, 6)
        if c == 0:
            x[i, r, 1:7] = 1
        elif c == 1:
            x[i, 1:7, r] = 1
        else:
            x[i, np.arange(1, 7), np.arange(1, 7)] = 1
    x = x.reshape(120, 64)
    p = np.eye(3, dtype=np.float32)[y] * 0.97 + 0.01
    triples = assemble(
        ["a", "b"],
        [("0", "1"), ("1", "2")],
        [x, x],
        [p[:, :2] / p[:, :2].sum(1, keepdims=True), p[:, 1:] / p[:, 1:].sum(1, keepdims=True)],
        shared=[0, 0],
    )

    def fit(**training) -> Bank:
        return fit_bank(
            triples,
            ModelSettings(feat_dim=8),
            TrainingSettings(epochs=2, seed=0, **training),
            AdaptSettings(),
            (8, 8),
            "bernoulli",
        )

    augmented, plain, plain_again = (
        fit(),
        fit(max_shift=0, max_rotation=0, max_scale=0),
        fit(max_shift=0, max_rotation=0, max_scale=0),
    )
    assert isinstance(augmented.model.encoder, ConvEncoder) and augmented.meta.image_shape == (8, 8)
    assert torch.equal(plain.model.prototypes, plain_again.model.prototypes)
    assert not torch.equal(
        augmented.model.prototypes, plain.model.prototypes
    )  # the random transforms reached training


def test_a_trainer_resumes_its_moments_and_schedule_even_after_the_vocabulary_grew():
    import torch

    from client_sdk.clientapp.local_training import LocalExpert, local_triples
    from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
    from protofuse.training import DiscriminativeTrainer

    x = np.random.default_rng(0).random((64, 16)).astype(np.float32)
    expert = LocalExpert("a", ("0", "1"), x, np.full((64, 2), 0.5, np.float32), 64)
    torch.manual_seed(0)
    first = DiscriminativeTrainer(
        DiscriminativePrototypes(DiscriminativeConfig(16, 3, 1, 8, "mlp", None)),
        1e-3,
        total_steps=100,
    )
    first.epoch(local_triples(expert, ("0", "1", "2")), 16, torch.Generator().manual_seed(0))
    saved = first.state_arrays()
    assert int(saved["steps_done"][0]) == 4
    same = DiscriminativeTrainer(
        DiscriminativePrototypes(DiscriminativeConfig(16, 3, 1, 8, "mlp", None)),
        1e-3,
        total_steps=100,
    )
    assert same.load_state_arrays(saved) and same.steps_done == 4
    assert (
        same.opt.param_groups[0]["lr"] == first.opt.param_groups[0]["lr"]
    )  # the schedule's position too
    grown = DiscriminativeTrainer(
        DiscriminativePrototypes(DiscriminativeConfig(16, 4, 1, 8, "mlp", None)),
        1e-3,
        total_steps=100,
    )
    assert grown.load_state_arrays(saved) and grown.steps_done == 4
    moments = grown.opt.state_dict()["state"]
    protos = next(i for i, p in enumerate(grown.model.parameters()) if p is grown.model.prototypes)
    assert (
        moments[protos]["exp_avg_sq"].shape == (4, 8)
        and torch.all(moments[protos]["exp_avg_sq"][3] == 0)
        and torch.any(moments[protos]["exp_avg_sq"][:3] > 0)
    )
    narrower = DiscriminativeTrainer(
        DiscriminativePrototypes(DiscriminativeConfig(16, 2, 1, 8, "mlp", None)),
        1e-3,
        total_steps=100,
    )
    assert not narrower.load_state_arrays(saved) and narrower.steps_done == 0
    # a state from another model (more parameters), or without its schedule, is not taken either
    n = len(list(same.model.parameters()))
    foreign = {**saved, f"{n}.exp_avg": np.zeros(1, np.float32)}
    unscheduled = {k: v for k, v in saved.items() if k != "steps_done"}
    for state in (foreign, unscheduled):
        fresh = DiscriminativeTrainer(
            DiscriminativePrototypes(DiscriminativeConfig(16, 3, 1, 8, "mlp", None)),
            1e-3,
            total_steps=100,
        )
        assert not fresh.load_state_arrays(state) and fresh.steps_done == 0


def test_table_augmentation_is_a_setting_of_tabular_inputs_only():
    from pydantic import ValidationError

    from protofuse.model.networks import Augmentation, FeatureAugmentation
    from protofuse.settings import TABLE_DROPOUT, TABLE_WIDE

    default = TrainingSettings()
    assert default.resolved_augmentation(None, TABLE_WIDE) == FeatureAugmentation(
        dropout=TABLE_DROPOUT
    )  # wide: features dropped
    assert default.resolved_augmentation(None, 784) == FeatureAugmentation(dropout=TABLE_DROPOUT)
    assert (
        default.resolved_augmentation(None, TABLE_WIDE - 1) is None
    )  # narrow: one feature may decide the class
    set_both = TrainingSettings(feature_dropout=0.3, feature_noise=0.1)
    assert (
        set_both.resolved_augmentation(None, 18)
        == set_both.resolved_augmentation(None, 784)
        == FeatureAugmentation(0.3, 0.1)
    )  # set: any width
    assert TrainingSettings(feature_noise=0.5).resolved_augmentation(
        None, 18
    ) == FeatureAugmentation(0.0, 0.5)
    assert (
        TrainingSettings(feature_dropout=0, feature_noise=0).resolved_augmentation(None, 784)
        is None
    )
    image = set_both.resolved_augmentation((8, 8), 64)
    assert isinstance(image, Augmentation) and image == default.resolved_augmentation(
        (8, 8), 64
    )  # images have their own
    for bad in ({"feature_dropout": 1.0}, {"feature_dropout": -0.1}, {"feature_noise": -1.0}):
        with pytest.raises(ValidationError, match="feature_"):
            TrainingSettings(**bad)


def test_a_central_bank_applies_the_width_rule_to_its_own_inputs(monkeypatch):
    from protofuse.families import discriminative
    from protofuse.model.networks import FeatureAugmentation
    from protofuse.settings import TABLE_DROPOUT, TABLE_WIDE

    seen: list = []
    monkeypatch.setattr(
        discriminative,
        "train_discriminative",
        lambda model, train, epochs, lr, batch, aug, **kw: seen.append(aug),
    )
    for width, expected in (
        (TABLE_WIDE, FeatureAugmentation(dropout=TABLE_DROPOUT)),
        (TABLE_WIDE - 1, None),
    ):
        x, y, _ = clusters(n=40, d=width)
        seen.clear()
        fit_bank(
            two_experts(x, y),
            ModelSettings(feat_dim=4),
            TrainingSettings(epochs=2),
            AdaptSettings(),
            None,
            "gaussian",
        )
        assert seen == [expected, expected]  # both phases


def test_tabular_banks_train_on_perturbed_features_and_stay_reproducible():
    x, y, _ = clusters(n=120, clip=False)
    triples = two_experts(x, y)

    def fit(**training) -> Bank:
        return fit_bank(
            triples,
            ModelSettings(feat_dim=8),
            TrainingSettings(epochs=2, seed=0, **training),
            AdaptSettings(),
            None,
            "gaussian",
        )

    plain, perturbed, perturbed_again = (
        fit(feature_dropout=0, feature_noise=0),
        fit(feature_dropout=0.3, feature_noise=0.2),
        fit(feature_dropout=0.3, feature_noise=0.2),
    )
    assert torch.equal(perturbed.model.prototypes, perturbed_again.model.prototypes)
    assert not torch.equal(
        perturbed.model.prototypes, plain.model.prototypes
    )  # the perturbations reached training
    assert perturbed.meta.settings.training.feature_dropout == 0.3  # recorded with the bank


def test_a_federated_client_trains_on_the_same_table_augmentation_with_its_own_statistics(
    monkeypatch,
):
    from client_sdk.clientapp import local_training
    from protofuse import training as training_module
    from protofuse.families.discriminative import shared_arrays
    from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
    from protofuse.model.networks import FeatureAugmentation
    from protofuse.settings import FederationSettings

    seen: list[tuple[FeatureAugmentation, torch.Tensor]] = []
    original = training_module.augment_features

    def spy(x, aug, centre, spread, generator=None):
        seen.append((aug, centre.clone()))
        return original(x, aug, centre, spread, generator)

    monkeypatch.setattr(training_module, "augment_features", spy)
    x, y, _ = clusters(n=80)
    expert = local_training.LocalExpert("a", ("0", "1", "2"), x, answers(y, [0, 1, 2]), 80)
    vocabulary = ("0", "1", "2", "3")
    model = {"x_dim": 16, "feat_dim": 8, "encoder": "mlp", "image_shape": None}
    shared = shared_arrays(
        DiscriminativePrototypes(DiscriminativeConfig(n_labels=4, n_experts=1, **model))
    )
    settings = TrainingSettings(feature_dropout=0.25, feature_noise=0.1)
    plan = local_training.RoundPlan(
        1, "consensus", 0, 2, vocabulary, model, settings, FederationSettings()
    )
    local_training.run_round(expert, plan, shared, {})
    assert seen and all(aug == FeatureAugmentation(0.25, 0.1) for aug, _ in seen)
    train, _ = local_training.local_triples(expert, vocabulary).split(
        settings.holdout, local_training.client_seed(settings.seed, "a", 0)
    )
    assert torch.allclose(
        seen[0][1], torch.from_numpy(train.x).mean(0)
    )  # the centre of the client's own training queries


def test_n_batches_rounds_up_and_is_at_least_one():
    from protofuse.training import n_batches

    assert [n_batches(n, 64) for n in (0, 1, 63, 64, 65, 128, 129)] == [1, 1, 1, 1, 2, 2, 3]
