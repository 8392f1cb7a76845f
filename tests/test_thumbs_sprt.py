"""Tests of gate/rollback.py: hand-computed ratios and a seeded false-alarm simulation."""

import math

import numpy as np
import pytest

from gate.rollback import RATE_EPSILON, ThumbsDownSPRT, rate_rise_log_likelihood_ratio, sprt_bounds, sprt_decision

SETTINGS = ThumbsDownSPRT()  # α 0.01, β 0.05, δ 0.10, 30 votes


def test_bounds_by_hand():
    # lower ln(0.05 / 0.99) = −2.985682, upper ln(0.95 / 0.01) = ln 95 = 4.553877
    lower, upper = sprt_bounds(SETTINGS)
    assert lower == pytest.approx(-2.985682, abs=1e-6)
    assert upper == pytest.approx(4.553877, abs=1e-6)


def test_log_likelihood_ratio_by_hand():
    # ln Λ = D²/(2 v0) − (D − δ)²/(2 v1) − ½ ln(v1/v0), δ = 0.1 (rate_rise_log_likelihood_ratio).
    # parent 10 / 50, new 9 / 30: D = 0.1, v0 = 0.009658, q = 0.2, v1 = 0.0102, ln Λ = 0.4904
    result = sprt_decision(10, 50, 9, 30, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(0.4904, abs=1e-4)
    assert result.decision == "continue"
    assert (result.parent_rate, result.new_rate) == (0.2, 0.3)


def test_a_clearly_worse_version_is_rolled_back():
    # parent 20 / 100 (0.2); new 22 / 40: D = 0.35, v0 = 0.00735, v1 = 0.007814, ln Λ = 4.3036 < 4.553877
    assert sprt_decision(20, 100, 22, 40, SETTINGS).decision == "continue"
    # new 24 / 40: D = 0.4, v0 = 0.007543, q = 0.28571, v1 = 0.007964, ln Λ = 4.9287 ≥ 4.553877
    result = sprt_decision(20, 100, 24, 40, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(4.9287, abs=1e-4)
    assert result.decision == "rollback"


def test_an_equal_version_is_kept_eventually():
    # parent 200 / 1000 (0.2); new at the same rate, D = 0:
    # 20 / 100: v0 = 0.00176, q = 0.19091, v1 = 0.002217, ln Λ = −2.3705, above −2.985682: keep watching
    assert sprt_decision(200, 1000, 20, 100, SETTINGS).decision == "continue"
    # 40 / 200: v0 = 0.00096, q = 0.18333, v1 = 0.001165, ln Λ = −4.3886: keep
    result = sprt_decision(200, 1000, 40, 200, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(-4.3886, abs=1e-4)
    assert result.decision == "keep"


def test_the_parents_rate_counts_as_an_estimate_from_its_own_votes():
    # New 16 down of 40 (40 %) against a parent at 15 %: over 2,000 parent votes that is proof (ln Λ = 6.8319),
    # over 40 it is not yet (ln Λ = 1.9982). The parent's rate taken as known would roll back both
    # (binomial ln Λ = 16 ln(0.25/0.15) + 24 ln(0.75/0.85) = 5.1693 ≥ 4.5539).
    many = sprt_decision(300, 2000, 16, 40, SETTINGS)
    assert many.decision == "rollback" and many.log_likelihood_ratio == pytest.approx(6.8319, abs=1e-4)
    few = sprt_decision(6, 40, 16, 40, SETTINGS)
    assert few.decision == "continue" and few.log_likelihood_ratio == pytest.approx(1.9982, abs=1e-4)


def test_too_few_votes_means_continue():
    # every vote down: far past the rollback bound, but under 30 votes for the new version
    assert sprt_decision(20, 100, 29, 29, SETTINGS).decision == "continue"
    assert sprt_decision(20, 100, 30, 30, SETTINGS).decision == "rollback"
    # and the parent needs 30 votes too
    assert sprt_decision(2, 29, 30, 30, SETTINGS).decision == "continue"
    no_parent = sprt_decision(0, 0, 30, 30, SETTINGS)
    assert no_parent.decision == "continue"
    assert math.isnan(no_parent.parent_rate)


def test_versions_without_thumbs_down_are_clamped():
    # p̄ = 0 is clamped to ε = 0.001: v0 = 0.001 · 0.999 · (1/30 + 1/100), q = ε, v1 = 0.003037, and D = 0: keep
    result = sprt_decision(0, 100, 0, 30, SETTINGS)
    assert RATE_EPSILON == 0.001
    assert result.log_likelihood_ratio == pytest.approx(-3.7719, abs=1e-4)
    assert result.decision == "keep"
    # every vote down on both: p̄ = 1 is clamped to 1 − ε, and a rise above every vote down is impossible: keep
    assert sprt_decision(100, 100, 30, 30, SETTINGS).decision == "keep"


def test_the_ratio_needs_votes_on_both_versions():
    with pytest.raises(ValueError, match="base_total 0, new_total 30"):
        rate_rise_log_likelihood_ratio(0, 0, 3, 30, 0.1)


def test_counts_must_be_consistent():
    with pytest.raises(ValueError, match="new version: thumbs-down count 5 must be between 0 and the vote count 4"):
        sprt_decision(10, 50, 5, 4, SETTINGS)


def rollback_share(parent_rate: float, true_rate: float, runs: int, seed: int, parent_votes: int = 1000) -> float:
    """Share of simulated new versions rolled back, each voted on until the test decides (at most 3,000 votes),
    against a parent whose `parent_votes` votes are drawn at `parent_rate`."""
    rng = np.random.default_rng(seed)
    rollbacks = 0
    for _ in range(runs):
        parent_down = int(rng.binomial(parent_votes, parent_rate))
        downs = np.cumsum(rng.random(3000) < true_rate)
        for votes in range(SETTINGS.min_votes, downs.size + 1):
            decision = sprt_decision(parent_down, parent_votes, int(downs[votes - 1]), votes, SETTINGS).decision
            if decision != "continue":
                rollbacks += decision == "rollback"
                break
    return rollbacks / runs


@pytest.mark.parametrize("rate", [0.2, 0.02])
def test_false_alarms_stay_near_alpha_when_the_new_version_is_as_good(rate):
    # 1,000 runs: the share's standard error is about √(0.01 · 0.99 / 1000) ≈ 0.003. Measured: 1.2–1.4 % at 20 %,
    # 1.3–1.8 % at 2 % (the normal approximation's cost at low rates); 0.015 slack is 5 standard errors.
    assert rollback_share(rate, rate, runs=1000, seed=0) <= SETTINGS.false_alarm_rate + 0.015


@pytest.mark.parametrize("rate", [0.2, 0.02])
def test_a_version_worse_by_delta_is_caught_with_power_about_one_minus_beta(rate):
    # At 2 %, H0's variance taken under H1 too caught 79 % of these 300.
    assert rollback_share(rate, rate + 0.1, runs=300, seed=1) >= 1 - SETTINGS.miss_rate - 0.05


def test_a_version_as_good_as_a_parent_with_few_votes_is_not_rolled_back_beyond_alpha():
    """The parent's votes stop when it leaves live; its rate taken as known rolled back 11 % of these 300."""
    assert rollback_share(0.2, 0.2, runs=300, seed=2, parent_votes=100) <= SETTINGS.false_alarm_rate + 0.015
