"""The federation's round schedule: the two phases of central training, counted in rounds.

1. consensus rounds: every client imitates its expert; the shared weights are averaged;
2. one agreement round: each client scores its expert against the bank's consensus on its own
   queries; the server turns the scores into trust weights;
3. weighted rounds: clients also distil the consensus and their updates count by examples x trust.

How the rounds split between the phases is ``protofuse.schedule.TwoPhases``, the one home of that
rule (central training uses it for epochs); this module only adds the agreement round between.
"""

from __future__ import annotations

from dataclasses import dataclass

from protofuse.protocol.federation import PHASES
from protofuse.schedule import TwoPhases
from protofuse.settings import FederationSettings, TrainingSettings

CONSENSUS, AGREEMENT, WEIGHTED = PHASES  # the names the round plan carries (protos' Phase enum)


@dataclass(frozen=True)
class Phase:
    name: str  # one of PHASES: "consensus", "agreement" or "weighted"
    index: int  # 0-based position of the round within its phase
    rounds: int  # rounds in the phase


@dataclass(frozen=True)
class Schedule:
    """Training rounds split between the two phases, an agreement round between them."""

    consensus: int
    weighted: int

    @classmethod
    def from_settings(cls, federation: FederationSettings, training: TrainingSettings) -> Schedule:
        phases = TwoPhases.split(federation.rounds, training)  # the same rule as central training
        return cls(phases.consensus, phases.weighted)

    @property
    def total(self) -> int:
        return self.consensus + (1 + self.weighted if self.weighted else 0)

    @property
    def training_rounds(self) -> int:
        """Rounds that change the shared weights (all but the agreement round)."""
        return self.consensus + self.weighted

    def at(self, round: int) -> Phase:
        """The phase of a 1-based round."""
        if not 1 <= round <= self.total:
            raise ValueError(f"round {round} outside the schedule's 1..{self.total}")
        if round <= self.consensus:
            return Phase(CONSENSUS, round - 1, self.consensus)
        if round == self.consensus + 1:
            return Phase(AGREEMENT, 0, 1)
        return Phase(WEIGHTED, round - self.consensus - 2, self.weighted)
