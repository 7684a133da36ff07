"""Adaptation of the discriminative bank: the prior it starts from (rows and biases), imprinting of
labels no expert covers, and that the examples matter when the bank's prior is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import clusters, toy_bank, two_experts

from protofuse.bank import Bank, fit_bank
from protofuse.model.discriminative import TaskHead, adapt_map, imprint
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings

torch.set_num_threads(1)


def _clusters(seed: int, n: int = 800):
    """Four overlapping clusters (noise 0.3 around centres in [0, 1]^d): hard enough that one
    example per class is not the whole story. Expert a knows 0/1/2, expert b knows 2/3."""
    x, y, _ = clusters(seed, n=n, noise=0.3, clip=False)
    return two_experts(x, y), x, y


def _bank(seed: int) -> tuple[Bank, np.ndarray, np.ndarray]:
    triples, x, y = _clusters(seed)
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=12, lr=5e-3, seed=seed),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    return bank, x, y


def _support(y: np.ndarray, classes: list[int], k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in classes])


@pytest.fixture(scope="module", params=[0, 1, 2])
def seeded_bank(request):
    return _bank(request.param)


def test_the_examples_matter_when_the_banks_prior_is_wrong(seeded_bank):
    """Swap the bank's rows (and biases) for 0 and 3: its zero-shot model then calls every 0 a 3.
    From k examples per class adaptation must overrule that prior, more surely as k grows
    (each k averaged over six support draws, on three banks)."""
    bank, x, y = seeded_bank
    model = bank.model
    i0, i3 = bank.label_names.index("0"), bank.label_names.index("3")
    with torch.no_grad():
        model.prototypes[[i0, i3]] = model.prototypes[[i3, i0]].clone()
        model.bias[[i0, i3]] = model.bias[[i3, i0]].clone()
    try:
        keep = np.isin(y, [0, 3])
        tx, ty = x[keep], y[keep].astype(str)
        zero_shot = (bank.zero_shot(["0", "3"]).predict(tx) == ty).mean()
        acc = {}
        for k in (1, 5, 10):
            draws = [_support(y, [0, 3], k, seed=100 * r + k) for r in range(6)]
            acc[k] = np.mean(
                [(bank.adapt(x[s], y[s].astype(str)).predict(tx) == ty).mean() for s in draws]
            )
    finally:
        with torch.no_grad():  # the fixture's bank is shared: put its rows back
            model.prototypes[[i0, i3]] = model.prototypes[[i3, i0]].clone()
            model.bias[[i0, i3]] = model.bias[[i3, i0]].clone()
    assert zero_shot < 0.1
    assert acc[1] >= zero_shot  # one example against a confident, wrong prior may not be enough
    assert acc[5] > acc[1] + 0.2
    assert acc[10] >= acc[5] - 0.01 and acc[10] > 0.9


def test_the_prior_is_centred_on_the_banks_rows_and_biases(seeded_bank):
    """With a very strong prior the fitted task head is the bank's own rows and biases, so a
    prior that dropped the biases (or the rows) shows at once."""
    bank, x, y = seeded_bank
    model = bank.model
    idx = [bank.label_names.index(c) for c in ("1", "3")]
    original = model.bias.detach().clone()
    with torch.no_grad():  # biases far from zero and from each other: a dropped term cannot hide
        model.bias[idx] = torch.tensor([2.0, -1.5])
    try:
        s = _support(y, [1, 3], 3, seed=0)
        head = bank.adapt(x[s], y[s].astype(str), prior_strength=1e6).task.head
        zero = bank.zero_shot(["1", "3"]).task.head
    finally:
        with torch.no_grad():
            model.bias.copy_(original)
    for h in (head, zero):
        torch.testing.assert_close(h.bias, torch.tensor([2.0, -1.5]), atol=0.02, rtol=0)
        torch.testing.assert_close(h.prototypes, model.prototypes.detach()[idx], atol=0.02, rtol=0)


def test_adapt_map_keeps_prior_biases_that_the_data_cannot_judge():
    """Features that carry no information (all zero) leave only the biases to fit: the MAP
    estimate stays between the prior's biases and the support's class frequencies."""
    z = torch.zeros(20, 4)
    y = torch.tensor([0, 1] * 10)
    prior = TaskHead(torch.zeros(2, 4), torch.tensor([2.0, -2.0]), torch.zeros(()))
    head = adapt_map(z, y, prior, torch.ones(2), strength=1.0)
    gap = (head.bias[0] - head.bias[1]).item()
    assert 0.5 < gap < 4.0  # the data (balanced) pull towards 0, the prior towards 4
    free = adapt_map(z, y, prior, torch.ones(2) * 1e3, strength=1.0)
    assert abs((free.bias[0] - free.bias[1]).item()) < 0.1  # a negligible prior: the data decide


def test_imprint_gives_class_means_scaled_to_the_banks_prototypes():
    z = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 4.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    reference = torch.tensor([[0.0, 2.0], [4.0, 0.0]])  # mean norm 3
    rows = imprint(z, y, 3, reference)
    expected = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3 / 2**0.5, 3 / 2**0.5]])
    torch.testing.assert_close(rows, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_label_no_expert_covers_is_imprinted_from_its_examples(seed):
    """'new' is a label of the task that no expert knows (its examples are 3s). Its prior row is
    the mean of its support features, scaled to the bank's rows, and its bias the bank's mean
    bias; with a strong prior the fitted row stays there, and the model tells 'new' apart."""
    bank, x, y = _bank(seed)
    s = _support(y, [0, 3], 5, seed=seed)
    names = np.where(y[s] == 3, "new", y[s].astype(str))
    m = bank.model
    z_new = m.embed(torch.from_numpy(x[s][names == "new"])).mean(0)
    mean_norm = m.prototypes.detach().norm(dim=-1).mean()
    head = bank.adapt(x[s], names, prior_strength=1e6).task.head
    row = head.prototypes[1]  # classes are sorted: ["0", "new"]
    torch.testing.assert_close(row, z_new / z_new.norm() * mean_norm, atol=0.05, rtol=0.01)
    torch.testing.assert_close(head.bias[1], m.bias.detach().mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(
        head.prototypes[0], m.prototypes.detach()[bank.label_names.index("0")], atol=0.02, rtol=0
    )  # a covered row keeps the bank's
    keep = np.isin(y, [0, 3])
    truth = np.where(y[keep] == 3, "new", y[keep].astype(str))
    model = bank.adapt(x[s], names)
    assert model.info["uncovered_labels"] == ["new"]
    assert (model.predict(x[keep]) == truth).mean() > 0.9


def test_a_separable_support_on_small_features_adapts_where_the_line_search_overflows():
    """A briefly trained bank embeds the toy clusters with features of norm ~0.3; on a separable
    support, L-BFGS's strong-Wolfe search then extrapolates its step past float32's range
    ("value cannot be converted to type float without overflow": adapt raised before). The
    fallback descends from the prior instead: a finite model that fits its support."""
    bank, x, y = toy_bank(epochs=2, n=200)
    keep = np.isin(y, ("0", "1", "3"))
    model = bank.adapt(x[keep][:30], y[keep][:30])
    assert model.info["support_accuracy"] == 1.0
    proba = model.predict_proba(x[keep])
    assert np.isfinite(proba).all()
    assert (model.classes_[proba.argmax(1)] == y[keep]).mean() > 0.9
