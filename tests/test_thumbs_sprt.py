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
    # parent 10 / 50: p0 = 0.2, p1 = 0.3; new 9 down of 30
    # 9 · ln(0.3 / 0.2) + 21 · ln(0.7 / 0.8) = 9 · 0.405465 − 21 · 0.133531 = 3.649186 − 2.804159 = 0.845027
    result = sprt_decision(10, 50, 9, 30, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(0.845027, abs=1e-6)
    assert result.decision == "continue"
    assert (result.parent_rate, result.new_rate) == (0.2, 0.3)


def test_a_clearly_worse_version_is_rolled_back():
    # parent 20 / 100 (0.2); new 18 / 40: 18 · 0.405465 − 22 · 0.133531 = 4.360681, below 4.553877
    assert sprt_decision(20, 100, 18, 40, SETTINGS).decision == "continue"
    # new 20 / 40: 20 · 0.405465 − 20 · 0.133531 = 5.438674 ≥ 4.553877
    result = sprt_decision(20, 100, 20, 40, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(5.438674, abs=1e-6)
    assert result.decision == "rollback"


def test_an_equal_version_is_kept_eventually():
    # parent 200 / 1000 (0.2); new at the same rate:
    # 20 / 100: 20 · 0.405465 − 80 · 0.133531 = −2.573209, above −2.985682: keep watching
    assert sprt_decision(200, 1000, 20, 100, SETTINGS).decision == "continue"
    # 40 / 200: twice that, −5.146418: keep
    result = sprt_decision(200, 1000, 40, 200, SETTINGS)
    assert result.log_likelihood_ratio == pytest.approx(-5.146418, abs=1e-6)
    assert result.decision == "keep"


def test_too_few_votes_means_continue():
    # every vote down: far past the rollback bound, but under 30 votes for the new version
    assert sprt_decision(20, 100, 29, 29, SETTINGS).decision == "continue"
    assert sprt_decision(20, 100, 30, 30, SETTINGS).decision == "rollback"
    # and the parent needs 30 votes too
    assert sprt_decision(2, 29, 30, 30, SETTINGS).decision == "continue"
    no_parent = sprt_decision(0, 0, 30, 30, SETTINGS)
    assert no_parent.decision == "continue"
    assert math.isnan(no_parent.parent_rate)


def test_a_parent_without_thumbs_down_is_clamped():
    # p0 = ε = 0.001, p1 = 0.101; 0 down of 30: 30 · ln(0.899 / 0.999) = −3.166
    result = sprt_decision(0, 100, 0, 30, SETTINGS)
    assert RATE_EPSILON == 0.001
    assert result.log_likelihood_ratio == pytest.approx(30 * math.log(0.899 / 0.999))
    assert result.decision == "keep"
    # a parent at 95 % thumbs-down: p0 = 1 − 0.1 − 0.001 = 0.899, p1 = 0.999
    assert math.isfinite(sprt_decision(95, 100, 30, 30, SETTINGS).log_likelihood_ratio)


def test_counts_must_be_consistent():
    with pytest.raises(ValueError, match="new version: thumbs-down count 5 must be between 0 and the vote count 4"):
        sprt_decision(10, 50, 5, 4, SETTINGS)


def rollback_share(true_rate: float, runs: int, seed: int, max_votes: int = 3000) -> float:
    """Share of simulated new versions rolled back, each voted on until the test decides."""
    rng = np.random.default_rng(seed)
    parent_down, parent_total = 200, 1000  # parent's rate 0.2, taken as known
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
