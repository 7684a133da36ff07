"""The privacy accountant of a federation run with ``[privacy] mode = "dp"``.

Each training round releases one Gaussian mechanism on the sum of the clients' clipped changes:
adding or removing one client moves that sum by at most ``clip`` in L2 norm, and the noise has
standard deviation ``noise_multiplier * clip``. Every admitted client takes part in every round
(no sampling), so the run is ``rounds`` self-composed Gaussian mechanisms; the agreement round
releases nothing (trust stays fixed under DP). Google's ``dp-accounting`` (its Renyi-DP
accountant) turns that into epsilon for the run's delta, and calibrates the noise to a budget.
It is an optional dependency: ``pip install 'protofuse[dp]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import PrivacySettings
from .spec import SpecError

INSTALL = "pip install 'protofuse[dp]'"


@dataclass(frozen=True)
class DpPlan:
    """The noise a run adds and the privacy it buys."""

    noise_multiplier: float  # noise standard deviation over clip
    clip: float  # L2 bound on one client's change in one round
    rounds: int  # Gaussian mechanisms released (training rounds)
    epsilon: float  # of the whole run, for delta (Renyi-DP accountant)
    delta: float

    def describe(self) -> str:
        return (
            f"(epsilon {self.epsilon:.3g}, delta {self.delta:.3g})-DP per client over "
            f"{self.rounds} rounds: noise multiplier {self.noise_multiplier:.4g}, clip "
            f"{self.clip:.4g}"
        )


def _accounting() -> Any:
    try:
        import dp_accounting
    except ModuleNotFoundError:
        raise SpecError(f"[privacy] mode = 'dp' needs the privacy accountant: {INSTALL}") from None
    return dp_accounting


def run_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian mechanisms of noise multiplier ``noise_multiplier``."""
    dp = _accounting()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.SelfComposedDpEvent(dp.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def plan_dp(settings: PrivacySettings, rounds: int) -> DpPlan:
    """The run's noise and epsilon. Without ``noise_multiplier`` the noise is calibrated to spend
    ``epsilon``; with one, a run whose epsilon exceeds ``epsilon`` is refused (SpecError naming
    the fields and the fix)."""
    if settings.mode != "dp":
        raise ValueError("plan_dp: [privacy] mode is not 'dp'")
    dp = _accounting()
    sigma = settings.noise_multiplier
    if sigma is None:
        assert settings.epsilon is not None  # PrivacySettings requires one of the two
        sigma = float(
            dp.calibrate_dp_mechanism(
                dp.rdp.RdpAccountant,
                lambda s: dp.SelfComposedDpEvent(dp.GaussianDpEvent(s), rounds),
                settings.epsilon,
                settings.delta,
            )
        )
    epsilon = run_epsilon(sigma, rounds, settings.delta)
    if settings.epsilon is not None and epsilon > settings.epsilon * (1 + 1e-6):
        raise SpecError(
            f"privacy.noise_multiplier: {sigma} over {rounds} rounds spends epsilon "
            f"{epsilon:.3g} (delta {settings.delta:g}), more than privacy.epsilon = "
            f"{settings.epsilon:g}; raise the noise multiplier, run fewer rounds, or leave "
            "noise_multiplier out to calibrate it to the budget"
        )
    return DpPlan(sigma, settings.clip, rounds, epsilon, settings.delta)
