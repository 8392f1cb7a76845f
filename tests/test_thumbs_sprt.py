"""Tests of gate/rollback.py: hand-computed ratios and a seeded false-alarm simulation."""

import math

import numpy as np
import pytest

from gate.rollback import RATE_EPSILON, ThumbsDownSPRT, sprt_bounds, sprt_decision

SETTINGS = ThumbsDownSPRT()  # α 0.01, β 0.05, δ 0.10, 30 votes


def test_bounds_by_hand():
    # lower ln(0.05 / 0.99) = −2.985682, upper ln(0.95 / 0.01) = ln 95 = 4.553877
    lower, upper = sprt_bounds(SETTINGS)
    assert lower == pytest.approx(-2.985682, abs=1e-6)
    assert upper == pytest.approx(4.553877, abs=1e-6)


def test_log_likelihood_ratio_by_hand():
    # ln Λ = δ (D − δ/2) / v, v = p̄ (1 − p̄) (1/new + 1/parent), p̄ both versions' downs over both totals.
    # parent 10 / 50, new 9 / 30: D = 0.1, p̄ = 19/80 = 0.2375, v = 0.181094 · 0.053333 = 0.0096583, ln Λ = 0.517688
    result = sprt_decision(10, 50, 9, 30, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(0.517688, abs=1e-6)
    assert result.decision == "continue"
    assert (result.parent_rate, result.new_rate) == (0.2, 0.3)


def test_a_clearly_worse_version_is_rolled_back():
    # parent 20 / 100 (0.2); new 22 / 40: D = 0.35, p̄ = 0.3, v = 0.21 · 0.035 = 0.00735, ln Λ = 4.081633 < 4.553877
    assert sprt_decision(20, 100, 22, 40, SETTINGS).decision == "continue"
    # new 24 / 40: D = 0.4, p̄ = 44/140, v = 0.215510 · 0.035 = 0.0075429, ln Λ = 4.640152 ≥ 4.553877
    result = sprt_decision(20, 100, 24, 40, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(4.640152, abs=1e-6)
    assert result.decision == "rollback"


def test_an_equal_version_is_kept_eventually():
    # parent 200 / 1000 (0.2); new at the same rate, D = 0, p̄ = 0.2:
    # 20 / 100: v = 0.16 · 0.011 = 0.00176, ln Λ = −0.005 / 0.00176 = −2.840909, above −2.985682: keep watching
    assert sprt_decision(200, 1000, 20, 100, SETTINGS).decision == "continue"
    # 40 / 200: v = 0.16 · 0.006 = 0.00096, ln Λ = −5.208333: keep
    result = sprt_decision(200, 1000, 40, 200, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(-5.208333, abs=1e-6)
    assert result.decision == "keep"


def test_the_parents_rate_counts_as_an_estimate_from_its_own_votes():
    # New 16 down of 40 (40 %) against a parent at 15 %: over 2,000 parent votes that is proof (ln Λ = 5.9914),
    # over 40 it is not yet (ln Λ = 2.0063). The parent's rate taken as known would roll back both
    # (binomial ln Λ = 16 ln(0.25/0.15) + 24 ln(0.75/0.85) = 5.1693 ≥ 4.5539).
    many = sprt_decision(300, 2000, 16, 40, SETTINGS)
    assert many.decision == "rollback" and many.log_likelihood_ratio == pytest.approx(5.9914, abs=1e-4)
    few = sprt_decision(6, 40, 16, 40, SETTINGS)
    assert few.decision == "continue" and few.log_likelihood_ratio == pytest.approx(2.0063, abs=1e-4)


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
    # p̄ = 0 is clamped to ε = 0.001: v = 0.001 · 0.999 · (1/30 + 1/100), finite, and D = 0: keep
    result = sprt_decision(0, 100, 0, 30, SETTINGS)
    assert RATE_EPSILON == 0.001
    assert result.log_likelihood_ratio == pytest.approx(-0.005 / (0.001 * 0.999 * (1 / 30 + 1 / 100)))
    assert result.decision == "keep"
    # every vote down on both: p̄ = 1 is clamped to 1 − ε
    assert math.isfinite(sprt_decision(100, 100, 30, 30, SETTINGS).log_likelihood_ratio)


def test_counts_must_be_consistent():
    with pytest.raises(ValueError, match="new version: thumbs-down count 5 must be between 0 and the vote count 4"):
        sprt_decision(10, 50, 5, 4, SETTINGS)


def rollback_share(true_rate: float, runs: int, seed: int, max_votes: int = 3000) -> float:
    """Share of simulated new versions rolled back, each voted on until the test decides."""
    rng = np.random.default_rng(seed)
    parent_down, parent_total = 200, 1000  # parent's rate 0.2, from 1,000 votes
    rollbacks = 0
    for _ in range(runs):
        downs = np.cumsum(rng.random(max_votes) < true_rate)
        for votes in range(SETTINGS.min_votes, max_votes + 1):
            decision = sprt_decision(parent_down, parent_total, int(downs[votes - 1]), votes, SETTINGS).decision
            if decision != "continue":
                rollbacks += decision == "rollback"
                break
    return rollbacks / runs


def test_false_alarms_stay_within_alpha_when_the_new_version_is_as_good():
    # 2,000 runs: the share's standard error is about √(0.01 · 0.99 / 2000) ≈ 0.0022, so 0.01 slack is 4.5 of them
    assert rollback_share(true_rate=0.2, runs=2000, seed=0) <= SETTINGS.false_alarm_rate + 0.01


def test_a_version_worse_by_delta_is_caught_with_power_about_one_minus_beta():
    assert rollback_share(true_rate=0.3, runs=300, seed=1) >= 1 - SETTINGS.miss_rate - 0.05
