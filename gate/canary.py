"""When a canary goes live: a sequential test of its users' thumbs-up rate against live's, over the same window.

A candidate that passed the gate's offline checks answers a share of users (sticky per user)
beside the live version. Each vote on either is counted from the moment the canary started,
so both face the same traffic, hours and users mix. The question is one-sided: is the canary
better than live by at least δ? The hypotheses, for the canary's thumbs-up rate p:

    H0: p = p0          no better than live (p0: live's rate over the same window, itself estimated)
    H1: p = p0 + δ      better by δ (absolute)

Wald's SPRT on the difference of the two observed rates (rollback.py tests thumbs-down the same
way, and holds the ratio): promote at the upper bound, reject at the lower. α = chance of
promoting a canary no better than live; β = chance of rejecting one δ better. Live's rate is an estimate too, from as few votes
as the canary's at a share of one half: the ratio is that of the normal approximation of the
difference, whose variance counts both versions' votes (`rate_rise_log_likelihood_ratio`). Taking
live's rate as known instead promoted 16 % of canaries equal to live at share 0.5, not α
(tests/test_canary.py).
A canary worse than live drives the ratio down faster than an equal one, so it is rejected sooner.
Both versions need `min_votes` before any decision. A canary still undecided after `max_votes` of
its own votes, or `max_hours`, is rejected: not shown better.

An adapter canary answers `share` of users in every server's engine. A whole-weight canary is
served by the canary replicas (server.canary_replica), `replica_share` of all: the replicas and
the load balancer decide who it answers, and the test counts votes per version all the same.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from flywheel.settings import Settings
from gate.rollback import observed_rate, rate_rise_log_likelihood_ratio, wald_bounds


class CanarySettings(Settings):
    """The canary: the share of users a candidate serves after the offline checks, and the online test."""

    share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of users (sticky per principal and user) an adapter candidate serves beside live after "
        "passing the offline checks; 0 makes passing candidates live at once.",
    )
    replica_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Whole weights: the share of server replicas that are canary replicas (server.canary_replica; "
        "Helm sets it from server.canaryReplicas). Above 0, a whole-weight candidate that passed the offline checks "
        "is served by those replicas until the online test decides; recorded as the canary's share, which the "
        "replicas and the load balancer decide. 0 makes such candidates live at once.",
    )
    false_promote_rate: float = Field(
        0.05, gt=0, lt=0.5, description="α: chance of promoting a canary whose thumbs-up rate is no better than live's."
    )
    false_reject_rate: float = Field(
        0.10, gt=0, lt=0.5, description="β: chance of rejecting a canary min_improvement better than live."
    )
    min_improvement: float = Field(
        0.10, gt=0, lt=0.5, description="δ: absolute rise of the thumbs-up rate the canary must show to be promoted."
    )
    min_votes: int = Field(30, ge=1, description="Votes the canary, and separately live, need before any decision.")
    max_votes: int = Field(
        2000, ge=1, description="Votes on the canary after which an undecided test rejects it (not shown better)."
    )
    max_hours: float = Field(
        24.0,
        gt=0,
        description="Hours after which an undecided canary is rejected (not shown better in time): one that no "
        "server answers with, or few users vote on, would otherwise hold the gate, which judges nothing else meanwhile.",
    )


def canary_share(is_adapter: bool, settings: CanarySettings) -> float:
    """The share of users a candidate that passed the offline checks answers as a canary; 0: it goes live at once."""
    return settings.share if is_adapter else settings.replica_share


CANARY_CHECK = "canary_thumbs_up"
"""The name of the online test's check in a canary's verdict."""

CanaryDecision = Literal["promote", "reject", "continue"]


@dataclass(frozen=True)
class CanaryTest:
    """The online test's state after the votes so far (the gate's metrics and `flywheel canary` show it)."""

    decision: CanaryDecision
    log_likelihood_ratio: float
    """ln Λ of the rates' difference, H1 over H0 (`rate_rise_log_likelihood_ratio`); 0 while either has no votes."""
    lower: float
    """Reject at or below it: ln(β / (1 − α))."""
    upper: float
    """Promote at or above it: ln((1 − β) / α)."""
    live_rate: float
    """Live's thumbs-up rate over the window (NaN with no votes)."""
    canary_rate: float
    live_votes: int
    canary_votes: int
    budget_spent: Literal["", "votes", "time"] = ""
    """Which budget ran out, for a canary rejected undecided."""

    def reason(self) -> str:
        """Why the test decided (or has not), in words for the verdict and the operator."""
        rates = (
            f"thumbs-up {self.canary_rate:.1%} over {self.canary_votes} canary votes against {self.live_rate:.1%} "
            f"over {self.live_votes} live votes"
        )
        llr = f"log-likelihood ratio {self.log_likelihood_ratio:.2f}"
        match self.decision:
            case "promote":
                return f"canary better: {rates} ({llr} >= {self.upper:.2f})"
            case "reject" if self.log_likelihood_ratio <= self.lower:
                return f"canary not better: {rates} ({llr} <= {self.lower:.2f})"
            case "reject" if self.budget_spent == "time":
                return f"canary not shown better within its time budget: {rates} ({llr})"
            case "reject":
                return f"canary not shown better within its vote budget: {rates} ({llr})"
            case _:
                return f"undecided: {rates} ({llr}, between {self.lower:.2f} and {self.upper:.2f})"


def canary_test(
    live_up: int,
    live_total: int,
    canary_up: int,
    canary_total: int,
    settings: CanarySettings,
    hours_running: float = 0.0,
) -> CanaryTest:
    """Promote, reject, or keep watching a canary, from both versions' thumbs-up counts over the same window,
    `hours_running` since it started (H0: equal rates; H1: the canary's higher by δ)."""
    live_rate = observed_rate(live_up, live_total, "live", "thumbs-up")
    canary_rate = observed_rate(canary_up, canary_total, "canary", "thumbs-up")
    lower, upper = wald_bounds(settings.false_promote_rate, settings.false_reject_rate)
    llr = 0.0
    if live_total and canary_total:
        llr = rate_rise_log_likelihood_ratio(live_up, live_total, canary_up, canary_total, settings.min_improvement)
    decision: CanaryDecision = "continue"
    budget_spent = ""
    if min(live_total, canary_total) >= settings.min_votes:
        if llr >= upper:
            decision = "promote"
        elif llr <= lower:
            decision = "reject"
        elif canary_total >= settings.max_votes:
            decision, budget_spent = "reject", "votes"
    if decision == "continue" and hours_running >= settings.max_hours:
        decision, budget_spent = "reject", "time"
    return CanaryTest(decision, llr, lower, upper, live_rate, canary_rate, live_total, canary_total, budget_spent)
