"""The DP accountant (protofuse.privacy) and the DP update of a round (server/fusion/dp.py)."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protofuse.privacy import plan_dp, run_epsilon
from protofuse.settings import PrivacySettings
from protofuse.spec import SpecError, load_spec
from protofuse_server.fusion import dp


def _exact_gaussian_delta(eps: float, sigma: float) -> float:
    """delta(eps) of one Gaussian mechanism of sensitivity 1 and noise sigma, exactly (the
    analytic Gaussian mechanism, Balle and Wang 2018)."""
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)


def _exact_epsilon(sigma: float, delta: float) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(200):  # delta(eps) decreases in eps: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _exact_gaussian_delta(mid, sigma) > delta else (lo, mid)
    return hi


def _classic_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """The textbook bound: RDP of order a is rounds * a / (2 sigma^2), converted with
    eps = rdp + log(1 / delta) / (a - 1), minimised over a."""
    orders = np.linspace(1.01, 512, 200_000)
    return float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))


@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_one_round_spends_at_least_the_exact_epsilon_and_at_most_the_textbook_bound(sigma):
    eps = run_epsilon(sigma, 1, 1e-5)
    assert _exact_epsilon(sigma, 1e-5) <= eps <= _classic_rdp_epsilon(sigma, 1, 1e-5)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 40), (4.0, 40), (25.0, 10)])
def test_a_run_spends_at_most_the_textbook_bound_and_more_with_more_rounds(sigma, rounds):
    eps = run_epsilon(sigma, rounds, 1e-5)
    assert 0 < eps <= _classic_rdp_epsilon(sigma, rounds, 1e-5)
    assert run_epsilon(sigma, 2 * rounds, 1e-5) > eps > run_epsilon(2 * sigma, rounds, 1e-5)


@pytest.mark.parametrize("budget", [1.0, 4.0, 8.0])
def test_noise_calibrated_to_a_budget_spends_it(budget):
    plan = plan_dp(PrivacySettings(mode="dp", epsilon=budget), 40)
    assert budget * 0.98 <= plan.epsilon <= budget * (1 + 1e-6)
    assert plan.epsilon == pytest.approx(run_epsilon(plan.noise_multiplier, 40, 1e-5))
    assert plan.rounds == 40 and plan.clip == 0.3 and plan.delta == 1e-5


def test_a_run_that_would_exceed_its_budget_is_refused_with_the_fields_and_the_fix():
    with pytest.raises(SpecError, match=r"privacy.noise_multiplier: 1.0 over 40 rounds spends"):
        plan_dp(PrivacySettings(mode="dp", epsilon=8, noise_multiplier=1.0), 40)
    # within the budget: the named noise is used, and its epsilon reported
    plan = plan_dp(PrivacySettings(mode="dp", epsilon=8, noise_multiplier=6.0), 40)
    assert plan.noise_multiplier == 6.0 and plan.epsilon < 8


def test_a_dp_spec_needs_a_budget_or_noise_and_every_number_is_bounded(tmp_path):
    path = tmp_path / "server.toml"
    for table, error in [
        ("mode = 'dp'", "privacy: mode 'dp' needs epsilon"),
        ("mode = 'dp'\nepsilon = 0", "privacy.epsilon: Input should be greater than 0"),
        ("mode = 'dp'\nepsilon = 1\ndelta = 0.5", "privacy.delta: Input should be less than 0.1"),
        ("mode = 'dp'\nepsilon = 1\nclip = -1", "privacy.clip: Input should be greater than 0"),
        ("mode = 'dp'\nepsilon = nan", "privacy.epsilon: Input should be a finite number"),
        ("mode = 'local'", "privacy.mode: Input should be 'plain', 'dp' or 'secagg'"),
    ]:
        path.write_text(f"[privacy]\n{table}\n")
        with pytest.raises(SpecError) as err:
            load_spec(path, experts_required=False)
        assert error in str(err.value), str(err.value)
    path.write_text("[privacy]\nmode = 'dp'\nepsilon = 4\n[federation]\ncombine = 'median'\n")
    with pytest.raises(
        SpecError, match=r"federation\.combine: 'median' cannot be used with privacy"
    ):
        load_spec(path, experts_required=False)
    path.write_text("[privacy]\nmode = 'dp'\nepsilon = 4\n")
    assert load_spec(path, experts_required=False).privacy.epsilon == 4.0


# -- the round's update ----------------------------------------------------------------------

CLIENTS, LABELS = 4, 5


def _deltas(values: np.ndarray) -> list[dict[str, np.ndarray]]:
    """(K, 2 + C * 3) values as K clients' deltas: a shared array of 2 and prototype rows."""
    return [{"w": v[:2], "prototypes": v[2:].reshape(LABELS, 3)} for v in values]


def _sums(step: dict[str, np.ndarray], coverage: np.ndarray, n: int) -> np.ndarray:
    """The step times its public counts: the sums the noise was added to, concatenated."""
    return np.concatenate(
        [step["w"] * n, (step["prototypes"] * np.maximum(coverage, 1)[:, None]).ravel()]
    )


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
covers_st = hnp.arrays(np.float64, (CLIENTS, LABELS), elements=st.sampled_from([0.0, 1.0]))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float64, (CLIENTS, 2 + LABELS * 3), elements=finite),
    covers_st,
    st.floats(0.01, 100),
)
def test_one_client_moves_the_sums_by_at_most_clip_whatever_it_sends(values, covers, clip):
    """The sensitivity the accountant assumes: with the noise off, the sums with and without any
    one client differ by at most ``clip`` in L2 norm (its rows counted where it covers them)."""
    coverage = covers.sum(0) + 1  # public counts: every replying client and one that did not
    rng = np.random.default_rng(0)
    full = dp.noisy_mean(_deltas(values), covers, coverage, CLIENTS + 1, clip, 0.0, True, rng)
    for k in range(CLIENTS):
        keep = np.arange(CLIENTS) != k
        less = dp.noisy_mean(
            _deltas(values[keep]), covers[keep], coverage, CLIENTS + 1, clip, 0.0, True, rng
        )
        moved = _sums(full, coverage, CLIENTS + 1) - _sums(less, coverage, CLIENTS + 1)
        assert np.linalg.norm(moved) <= clip * (1 + 1e-9)
    for d in dp.clip_to_norm(_deltas(values), clip):
        assert math.sqrt(sum(float(np.sum(v * v)) for v in d.values())) <= clip * (1 + 1e-9)


def test_the_noise_has_the_calibrated_spread_and_spares_rows_nobody_covers():
    covers = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], float)
    coverage = covers.sum(0)  # label 3 and 4: nobody
    rng = np.random.default_rng(1)
    zero = [{"w": np.zeros(20_000), "prototypes": np.zeros((LABELS, 4_000))}] * CLIENTS
    step = dp.noisy_mean(zero, covers, coverage, CLIENTS, 0.5, 3.0, True, rng)
    assert np.std(step["w"]) == pytest.approx(3.0 * 0.5 / CLIENTS, rel=0.03)
    for c in range(3):
        assert np.std(step["prototypes"][c]) == pytest.approx(1.5 / coverage[c], rel=0.05)
    assert not step["prototypes"][3:].any()  # public: no client could have moved them
    # without row-wise averaging every array is a mean over all admitted clients
    flat = dp.noisy_mean(zero, covers, coverage, CLIENTS, 0.5, 3.0, False, rng)
    assert np.std(flat["prototypes"]) == pytest.approx(1.5 / CLIENTS, rel=0.03)


def test_with_no_noise_small_updates_average_as_rowwise_fedavg_over_public_counts():
    covers = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], float)
    coverage = np.array([3, 1, 0, 0, 0], float)  # a third client declared label 0, did not reply
    deltas = [
        {"w": np.array([0.1, 0.0]), "prototypes": np.full((LABELS, 1), 0.2)},
        {"w": np.array([0.3, 0.0]), "prototypes": np.full((LABELS, 1), 0.4)},
    ]
    step = dp.noisy_mean(deltas, covers, coverage, 3, 10.0, 0.0, True, np.random.default_rng())
    np.testing.assert_allclose(step["w"], [0.4 / 3, 0.0])
    np.testing.assert_allclose(step["prototypes"].ravel(), [0.6 / 3, 0.2, 0, 0, 0])
