"""The two-phase rule, written once (protofuse.schedule) and read by central training (epochs)
and the federation (rounds)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protofuse.schedule import TwoPhases
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse_server.fusion.schedule import Schedule

SECOND_PHASE = [TrainingSettings(), TrainingSettings(reweight=False), TrainingSettings(distill=0.0)]


@given(total=st.integers(0, 10_000), which=st.sampled_from(SECOND_PHASE))
def test_a_second_phase_with_work_gets_half_the_steps(total, which):
    phases = TwoPhases.split(total, which)
    assert phases.total == total
    if total >= 2:
        assert (phases.consensus, phases.weighted) == (total // 2, total - total // 2)
    else:
        assert phases.weighted == 0


@given(total=st.integers(0, 1000))
def test_without_reweighting_or_distillation_there_is_one_phase(total):
    assert TwoPhases.split(total, TrainingSettings(reweight=False, distill=0.0)) == TwoPhases(
        total, 0
    )


def test_reweighting_one_expert_is_no_second_phase_unless_it_distils():
    assert TwoPhases.split(10, TrainingSettings(distill=0.0), n_experts=1) == TwoPhases(10, 0)
    assert TwoPhases.split(10, TrainingSettings(distill=0.0), n_experts=2) == TwoPhases(5, 5)
    assert TwoPhases.split(10, TrainingSettings(), n_experts=1) == TwoPhases(5, 5)


@given(rounds=st.integers(1, 500), which=st.sampled_from(SECOND_PHASE))
def test_the_federation_splits_its_rounds_by_the_same_rule(rounds, which):
    schedule = Schedule.from_settings(FederationSettings(rounds=rounds), which)
    phases = TwoPhases.split(rounds, which)
    assert (schedule.consensus, schedule.weighted) == (phases.consensus, phases.weighted)
    # one agreement round between two phases; none when there is one phase
    assert schedule.total == rounds + (1 if phases.weighted else 0)
