"""When to roll a new policy version back: Wald's sequential probability ratio test on thumbs-down.

After a version goes live, its thumbs-down votes arrive one by one. Waiting for a fixed sample
wastes traffic on a bad version; peeking at a fixed-sample test after every vote inflates its
false-alarm rate. Wald's SPRT is built to be looked at after every vote: it keeps one running
log-likelihood ratio and stops the first time it leaves a band.

The hypotheses, for the new version's thumbs-down rate p and its parent's p0:

    H0: p = p0          the new version is as good as its parent
    H1: p = p0 + δ      it is worse by at least δ (absolute)

Per version, the chance of rolling back a version no worse than its parent is about α (the
false-alarm rate), and the chance of keeping one that is δ worse is about β (the miss rate).
Both are per new version tested: over many versions, expect about α × versions false rollbacks.

The parent's rate is an estimate too, from few votes when it served briefly: the ratio is that of
the normal approximation of the difference of the two observed rates, whose variance counts both
versions' votes (`rate_rise_log_likelihood_ratio`; gate/canary.py tests thumbs-up the same way).
Taking the parent's rate as known instead rolled back 11 % of versions as good as a parent with
100 votes, not α (tests/test_thumbs_sprt.py). The parent's votes stop when it leaves live, and
they bound the evidence: against a parent at 20 % thumbs-down, a version δ worse was rolled back
16 % of the time with 100 parent votes, 83 % with 300 and 95 % with 1,000 (400 simulated versions
each, up to 3,000 votes). A version whose parent served briefly is watched on weaker evidence;
`flywheel rollback` remains.

A decision is final: once `sprt_decision` says "rollback" or "keep", stop testing that version
(the gate remembers the versions it kept). Feeding it more votes after "keep" lets the ratio
wander back up: false alarms beyond α.
"""

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from flywheel.settings import Settings

# Keeps the variance of the rates' difference above 0 when every vote is the same.
RATE_EPSILON = 1e-3


class ThumbsDownSPRT(Settings):
    """Settings of the automatic-rollback test."""

    false_alarm_rate: float = Field(
        0.01, gt=0, lt=0.5, description="α: chance of rolling back a new version that is no worse than its parent."
    )
    miss_rate: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="β: chance of keeping a new version whose thumbs-down rate is min_increase worse.",
    )
    min_increase: float = Field(
        0.10, gt=0, lt=0.5, description="δ: absolute rise of the thumbs-down rate that counts as significantly worse."
    )
    min_votes: int = Field(
        30, ge=1, description="Votes the new version, and separately its parent, need before any decision."
    )


@dataclass(frozen=True)
class SPRTResult:
    """The test's state after the votes seen so far."""

    decision: Literal["rollback", "keep", "continue"]
    log_likelihood_ratio: float
    """ln Λ of the rates' difference, H1 over H0 (`rate_rise_log_likelihood_ratio`); 0 while either has no votes."""
    upper: float
    """ln((1 − β) / α): roll back at or above it."""
    lower: float
    """ln(β / (1 − α)): keep at or below it."""
    parent_rate: float
    """The parent's observed thumbs-down rate (NaN with no votes)."""
    new_rate: float
    """The new version's observed thumbs-down rate (NaN with no votes)."""


def wald_bounds(alpha: float, beta: float) -> tuple[float, float]:
    """Wald's (lower, upper) bounds on the log-likelihood ratio for error rates α (accepting H1
    when H0 holds) and β (accepting H0 when H1 holds): ln(β / (1 − α)), ln((1 − β) / α)."""
    return math.log(beta / (1.0 - alpha)), math.log((1.0 - beta) / alpha)


def sprt_bounds(settings: ThumbsDownSPRT) -> tuple[float, float]:
    """Wald's (lower, upper) bounds on the log-likelihood ratio for the settings' α and β."""
    return wald_bounds(settings.false_alarm_rate, settings.miss_rate)


def rate_rise_log_likelihood_ratio(
    base_hits: int, base_total: int, new_hits: int, new_total: int, rise: float
) -> float:
    """ln of the density of D, the difference of the observed rates taken as normal, when the new rate is the
    base's plus `rise` (H1) over its density when they are equal (H0); each hypothesis its own variance, from
    both samples (m = base_total, n = new_total):

        D  = new_hits / n − base_hits / m
        v0 = p̄ (1 − p̄) (1/n + 1/m),        p̄ = (base_hits + new_hits) / (m + n), into [ε, 1 − ε]
        v1 = q (1 − q) / m + (q + rise)(1 − q − rise) / n,   q = (base_hits + new_hits − n·rise) / (m + n),
                                                             into [ε, 1 − rise − ε]
        ln Λ = D² / (2 v0) − (D − rise)² / (2 v1) − ½ ln(v1 / v0)

    H1's own variance matters at low rates, where (p + rise)(1 − p − rise) is several times p (1 − p): with
    H0's in both, a canary δ better than a live at 2 %, at share 0.1, was promoted 77 % of the time, not 1 − β
    (tests/test_canary.py). The normal approximation costs a little at low rates the other way: versions as
    good as a parent at 1–2 % thumbs-down were rolled back 1.3–1.8 % of the time, against α = 1 %.
    """
    if base_total < 1 or new_total < 1:
        raise ValueError(f"the test needs votes on both versions: base_total {base_total}, new_total {new_total}")
    hits, total = base_hits + new_hits, base_total + new_total
    pooled = min(max(hits / total, RATE_EPSILON), 1.0 - RATE_EPSILON)
    variance_equal = pooled * (1.0 - pooled) * (1.0 / new_total + 1.0 / base_total)
    base_if_risen = min(max((hits - new_total * rise) / total, RATE_EPSILON), 1.0 - rise - RATE_EPSILON)
    new_if_risen = base_if_risen + rise
    variance_risen = (
        base_if_risen * (1.0 - base_if_risen) / base_total + new_if_risen * (1.0 - new_if_risen) / new_total
    )
    difference = new_hits / new_total - base_hits / base_total
    return (
        difference**2 / (2.0 * variance_equal)
        - (difference - rise) ** 2 / (2.0 * variance_risen)
        - 0.5 * math.log(variance_risen / variance_equal)
    )


def observed_rate(hits: int, total: int, who: str, what: str = "thumbs-down") -> float:
    """hits / total, NaN for no votes; ValueError naming `who` when the counts cannot be."""
    if not 0 <= hits <= total:
        raise ValueError(f"{who}: {what} count {hits} must be between 0 and the vote count {total}")
    return hits / total if total else math.nan


def sprt_decision(
    parent_down: int, parent_total: int, new_down: int, new_total: int, settings: ThumbsDownSPRT
) -> SPRTResult:
    """Roll back, keep, or keep watching a new version, from both versions' thumbs-down counts.

    parent_down / parent_total: thumbs-down and all thumbs votes of the parent version.
    new_down / new_total: the same for the new version, counted since it went live.
    H0: equal rates; H1: the new version's higher by δ (`rate_rise_log_likelihood_ratio`).
    """
    parent_rate = observed_rate(parent_down, parent_total, "parent")
    new_rate = observed_rate(new_down, new_total, "new version")
    lower, upper = sprt_bounds(settings)
    if parent_total == 0 or new_total == 0:
        return SPRTResult("continue", 0.0, upper, lower, parent_rate, new_rate)

    llr = rate_rise_log_likelihood_ratio(parent_down, parent_total, new_down, new_total, settings.min_increase)
    if min(parent_total, new_total) < settings.min_votes:
        decision = "continue"
    elif llr >= upper:
        decision = "rollback"
    elif llr <= lower:
        decision = "keep"
    else:
        decision = "continue"
    return SPRTResult(decision, llr, upper, lower, parent_rate, new_rate)
