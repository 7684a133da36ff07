"""The two phases of training a discriminative bank, written once for ``fit`` and the federation.

Phase one learns a consensus from every expert. Between the phases each expert is scored by its
agreement with that consensus (its trust weight). Phase two weights each expert by its trust and
distils the consensus over the whole vocabulary into the bank. Central training counts the
phases in epochs; the federation counts them in rounds (with one agreement round between them,
where the clients score their experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import TrainingSettings


@dataclass(frozen=True)
class TwoPhases:
    """``total`` steps (epochs or rounds) split between the consensus and the weighted phase."""

    consensus: int
    weighted: int  # 0: one phase only (no reweighting, no distillation, or too short to split)

    @classmethod
    def split(
        cls, total: int, training: TrainingSettings, n_experts: int | None = None
    ) -> TwoPhases:
        """Half and half when a second phase has work to do: reweighting (which needs two experts
        or more, when their number is known) or distillation; else everything in one phase."""
        reweight = training.reweight and (n_experts is None or n_experts > 1)
        if total >= 2 and (reweight or training.distill > 0):
            return cls(total // 2, total - total // 2)
        return cls(total, 0)

    @property
    def total(self) -> int:
        return self.consensus + self.weighted
