"""The canary without an engine: who it answers, the online test's arithmetic, the registry's pointer,
and the gate promoting or rejecting it from users' thumbs."""

import asyncio
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from feedback.consumer import ConsumedEvent
from flywheel.registry import CanaryRecord, LiveMoved, PolicyRegistry, VerdictCheck
from flywheel.v1 import events_pb2
from flywheel.v1 import serving_pb2 as pb
from gate.canary import CanarySettings, canary_share, canary_test
from gate.config import GateSettings
from gate.service import Gate, GateMetrics
from server.policy import LivePolicy, canary_bucket, serves_canary, whole_weight_version
from server.swap import refuse_foreign_base
from trainer.config import RewardModelSettings

SETTINGS = CanarySettings(false_promote_rate=0.05, false_reject_rate=0.10, min_improvement=0.10, min_votes=30)


def test_the_online_test_promotes_rejects_and_waits_by_hand_computed_ratios():
    # Bounds: ln(0.10 / 0.95) = -2.2513 and ln(0.90 / 0.05) = ln 18 = 2.8904. δ = 0.1; live 50 up of 100.
    # ln Λ = D²/(2 v0) − (D − δ)²/(2 v1) − ½ ln(v1/v0) (gate/rollback.py, rate_rise_log_likelihood_ratio).
    better = canary_test(50, 100, 27, 30, SETTINGS)  # D = 0.4, v0 = 0.010464, q = 0.56923, v1 = 0.009831: 3.0989
    assert better.decision == "promote" and better.log_likelihood_ratio == pytest.approx(3.0989, abs=1e-4)
    assert better.lower == pytest.approx(-2.2513, abs=1e-4) and better.upper == pytest.approx(2.8904, abs=1e-4)
    assert "canary better" in better.reason()
    assert canary_test(50, 100, 26, 30, SETTINGS).decision == "continue"  # D = 0.36667: ln Λ = 2.8351
    same = canary_test(50, 100, 15, 30, SETTINGS)  # D = 0, v0 = 0.010833, q = 0.47692, v1 = 0.010631: −0.4609
    assert same.decision == "continue" and same.log_likelihood_ratio == pytest.approx(-0.4609, abs=1e-4)
    worse = canary_test(50, 100, 9, 30, SETTINGS)  # D = −0.2, v0 = 0.010741, q = 0.43077, v1 = 0.010754: −2.3231
    assert worse.decision == "reject" and "not better" in worse.reason()
    assert worse.log_likelihood_ratio == pytest.approx(-2.3231, abs=1e-4)
    assert canary_test(50, 100, 29, 29, SETTINGS).decision == "continue"  # below min_votes, however good
    assert canary_test(5, 29, 30, 30, SETTINGS).decision == "continue"  # live below min_votes
    budget = canary_test(50, 100, 15, 30, SETTINGS.model_copy(update={"max_votes": 30}))
    assert budget.decision == "reject" and "vote budget" in budget.reason()
    assert canary_test(0, 0, 0, 0, SETTINGS).log_likelihood_ratio == 0.0 and math.isnan(
        canary_test(0, 0, 0, 0, SETTINGS).live_rate
    )
    assert canary_test(50, 100, 0, 0, SETTINGS).log_likelihood_ratio == 0.0  # no canary votes yet


def test_lives_rate_counts_as_an_estimate_from_its_own_votes():
    # The canary's 60 % against live's 30 %: over 3,000 live votes that is proof (ln Λ = 3.7910); over 30 live
    # votes live's 30 % is as uncertain as the canary's 60 % (v0 = 0.0165, v1 = 0.016333, ln Λ = 1.5079): not
    # yet. Live's rate taken as known would promote both (binomial ln Λ = 18 ln(0.4/0.3) + 12 ln(0.6/0.7) = 3.3285).
    many = canary_test(900, 3000, 18, 30, SETTINGS)
    assert many.decision == "promote" and many.log_likelihood_ratio == pytest.approx(3.7910, abs=1e-4)
    few = canary_test(9, 30, 18, 30, SETTINGS)
    assert few.decision == "continue" and few.log_likelihood_ratio == pytest.approx(1.5079, abs=1e-4)


def promoted_share(live_rate: float, canary_rate: float, runs: int, seed: int, share: float = 0.5) -> float:
    """Share of simulated canaries promoted, each vote going to the canary with chance `share`, each canary
    voted on until the test decides."""
    rng = np.random.default_rng(seed)
    promoted = 0
    for _ in range(runs):
        to_canary = rng.random(4 * SETTINGS.max_votes) < share
        up = rng.random(to_canary.size) < np.where(to_canary, canary_rate, live_rate)
        canary_votes, canary_ups = np.cumsum(to_canary), np.cumsum(to_canary & up)
        live_votes, live_ups = np.cumsum(~to_canary), np.cumsum(~to_canary & up)
        for vote in range(to_canary.size):
            test = canary_test(
                int(live_ups[vote]), int(live_votes[vote]), int(canary_ups[vote]), int(canary_votes[vote]), SETTINGS
            )
            if test.decision != "continue":
                promoted += test.decision == "promote"
                break
    return promoted / runs


@pytest.mark.parametrize("share, live_rate, seed", [(0.5, 0.3, 0), (0.1, 0.02, 2)])
def test_a_canary_no_better_than_live_is_promoted_about_alpha_of_the_time(share, live_rate, seed):
    # 300 runs: the share's standard error is about √(0.05 · 0.95 / 300) ≈ 0.013. At share 0.5 and 30 %, live's
    # rate taken as known promoted 16 % of 400 such runs.
    promoted = promoted_share(live_rate, live_rate, runs=300, seed=seed, share=share)
    assert promoted <= SETTINGS.false_promote_rate + 0.03


@pytest.mark.parametrize("share, live_rate, seed", [(0.5, 0.3, 1), (0.1, 0.02, 3)])
def test_a_canary_better_by_delta_is_promoted_with_power_about_one_minus_beta(share, live_rate, seed):
    # At share 0.5 and 30 %, live's rate taken as known promoted 80 % of 300 such runs; at share 0.1 and 2 %, H0's
    # variance taken under H1 too promoted 77 % of these 200.
    promoted = promoted_share(live_rate, live_rate + 0.1, runs=200, seed=seed, share=share)
    assert promoted >= 1 - SETTINGS.false_reject_rate - 0.05


def test_a_canary_undecided_past_its_time_budget_is_rejected_even_with_no_votes():
    """A canary no server answers with (or few users vote on) must not hold the gate for ever."""
    assert canary_test(0, 0, 0, 0, SETTINGS, hours_running=23.9).decision == "continue"
    unserved = canary_test(0, 0, 0, 0, SETTINGS, hours_running=24.0)
    assert unserved.decision == "reject" and "time budget" in unserved.reason()
    assert canary_test(50, 100, 15, 30, SETTINGS, hours_running=25.0).decision == "reject"  # undecided by votes
    assert canary_test(50, 100, 27, 30, SETTINGS, hours_running=25.0).decision == "promote"  # decided by votes


def test_a_canary_answers_its_share_of_users_and_each_user_stays_on_one_side():
    users = [("tenant", f"user-{n}") for n in range(20_000)]
    on_canary = [serves_canary(principal, user, 7, 0.1) for principal, user in users]
    # 20,000 draws at 0.1: sd = sqrt(0.1 × 0.9 / 20000) = 0.0021; 0.01 is almost five of them.
    assert abs(sum(on_canary) / len(users) - 0.1) < 0.01
    assert on_canary == [serves_canary(principal, user, 7, 0.1) for principal, user in users]  # sticky
    # Another canary draws other users; the same user id under another principal is another user.
    assert on_canary != [serves_canary(principal, user, 8, 0.1) for principal, user in users]
    assert canary_bucket("a", "u", 7) != canary_bucket("b", "u", 7)
    # A larger share keeps everyone the smaller one had: raising it moves only live users over.
    wider = [serves_canary(principal, user, 7, 0.3) for principal, user in users]
    assert all(w for c, w in zip(on_canary, wider) if c)


def test_live_policy_answers_a_canary_user_with_the_canary():
    policy = LivePolicy(LivePolicy.snapshot(1, "/base", "d1"))
    from server.policy import CanaryServing

    canary = LivePolicy.snapshot(2, "/v2", "d2", adapter_path="/v2")
    policy.canary = CanaryServing(canary, 0.5)
    picked = {user: policy.for_user("p", user).version for user in ("a", "b", "c", "d", "e", "f", "g", "h")}
    assert set(picked.values()) == {1, 2}
    assert all(picked[user] == (2 if serves_canary("p", user, 2, 0.5) else 1) for user in picked)
    assert policy.for_user("p", "a").adapter == ((2, "/v2") if picked["a"] == 2 else None)


def test_a_canary_replica_serves_the_canary_while_it_runs_against_live_and_live_otherwise():
    def canary(version: int, against: int) -> CanaryRecord:
        return CanaryRecord(version=version, against=against, share=0.25, started_at=datetime.now(UTC))

    assert whole_weight_version(1, None, canary_replica=True) == 1  # no canary: live
    assert whole_weight_version(1, canary(2, against=1), canary_replica=True) == 2  # the canary runs
    assert whole_weight_version(1, canary(2, against=1), canary_replica=False) == 1  # other replicas stay on live
    # Promoted: live is the canary's version now, so the replica stays on what it runs.
    assert whole_weight_version(2, canary(2, against=1), canary_replica=True) == 2
    # Live moved elsewhere (rejected and replaced, or rolled back): the canary is over, back to live.
    assert whole_weight_version(3, canary(2, against=1), canary_replica=True) == 3


def test_a_candidate_goes_canary_on_every_server_as_an_adapter_and_on_the_canary_replicas_as_whole_weights():
    settings = CanarySettings(share=0.1)
    assert canary_share(is_adapter=True, settings=settings) == 0.1
    assert canary_share(is_adapter=False, settings=settings) == 0  # no canary replicas by default: live at once
    replicas = CanarySettings(share=0.1, replica_share=0.25)
    assert canary_share(is_adapter=False, settings=replicas) == 0.25
    assert canary_share(is_adapter=True, settings=replicas.model_copy(update={"share": 0})) == 0


def publish_adapter(registry: PolicyRegistry, tmp_path: Path, name: str, base_version: int, parent: int) -> int:
    """An adapter-shaped version: the registry checks files and digests, not what the weights say."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 4}')
    (directory / "adapter_model.safetensors").write_bytes(name.encode())
    return registry.publish(
        directory, parent_version=parent, training_step=1, metrics={}, base_version=base_version
    ).version


@pytest.fixture
def registry(tmp_path) -> PolicyRegistry:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    (base / "config.json").write_text("{}")
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(base)
    return registry


def test_an_adapter_names_its_base_and_a_server_on_another_base_refuses_it(registry, tmp_path):
    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    manifest = registry.manifest(version)
    assert manifest.is_adapter and manifest.base_digest == registry.manifest(1).digest
    refuse_foreign_base(manifest, registry.manifest(1).digest)  # its own base: served
    with pytest.raises(ValueError, match="server serves base digest other"):
        refuse_foreign_base(manifest, "other")
    with pytest.raises(ValueError, match="serves whole weights"):
        refuse_foreign_base(manifest, None)
    with pytest.raises(ValueError, match="is an adapter"):  # an adapter's base has whole weights
        publish_adapter(registry, tmp_path, "b", base_version=version, parent=version)


def test_the_canary_pointer_lives_only_as_long_as_the_live_version_it_is_compared_with(registry, tmp_path):
    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    with pytest.raises(LiveMoved):
        registry.start_canary(version, against=version, share=0.1)
    registry.start_canary(version, against=1, share=0.1, checks=[VerdictCheck(name="reward_score", passed=True)])
    assert registry.canary().version == version and registry.canary().checks[0].name == "reward_score"
    other = publish_adapter(registry, tmp_path, "b", base_version=1, parent=1)
    registry.set_live(other, reason="operator", kind="rollback")
    assert registry.canary() is None and registry.canary(include_ended=True).version == version
    registry.end_canary(version)
    assert registry.canary(include_ended=True) is None


def votes(version: int, ups: int, total: int, prefix: str) -> list[ConsumedEvent]:
    """`total` users' thumbs on answers of `version`, `ups` of them up, all given now."""
    now = time.time_ns()
    events = []
    for n in range(total):
        event = events_pb2.FeedbackGiven(
            event_id=f"{prefix}-{n}", response_id=f"{prefix}-r{n}", user_id=f"{prefix}-u{n}", principal="p",
            policy_version=version, rating=pb.RATING_UP if n < ups else pb.RATING_DOWN,
        )  # fmt: skip
        event.given_at.FromNanoseconds(now)
        events.append(ConsumedEvent("feedback", 0, n, event.response_id, event))
    return events


def gate_on(registry: PolicyRegistry, tmp_path: Path) -> Gate:
    settings = GateSettings(canary=SETTINGS, max_principal_share=1.0)
    return Gate(settings, RewardModelSettings(), registry, GateMetrics(CollectorRegistry()))


@pytest.mark.parametrize("canary_ups, decision", [(27, "promote"), (9, "reject")])
def test_the_gate_promotes_a_canary_its_users_like_better_and_rejects_one_they_like_worse(
    registry, tmp_path, canary_ups, decision
):
    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    offline = [VerdictCheck(name="reward_score", value=0.1, threshold=0.0, passed=True)]
    registry.start_canary(version, against=1, share=0.25, checks=offline)
    gate = gate_on(registry, tmp_path)
    gate.take(votes(1, 40, 80, "before"))  # votes before the canary started would count: they must not
    registry.start_canary(version, against=1, share=0.25, checks=offline)  # restart the window after them
    assert gate.decide_next() is None  # nothing else is judged while the canary runs
    gate.take(votes(1, 50, 100, "live"))
    assert gate.canary_due() is None  # no canary votes yet
    gate.take(votes(version, canary_ups, 30, "canary"))
    event = gate.canary_due()
    verdict = registry.verdict(version)
    assert [check.name for check in verdict.checks] == ["reward_score", "canary_thumbs_up"]
    assert verdict.checks[-1].detail == event.reasons[0]
    assert "over 100 live votes" in event.reasons[0]  # the same window: the 80 earlier votes left out
    if decision == "promote":
        assert event.kind == events_pb2.POLICY_EVENT_KIND_APPROVED and verdict.approved
        assert registry.live().version == version and registry.live().reason == event.reasons[0]
    else:
        assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED and not verdict.approved
        assert registry.live().version == 1
    assert registry.canary(include_ended=True) is None
    assert gate.metrics.registry.get_sample_value("flywheel_gate_canary_version") == 0


def test_flywheel_canary_shows_the_share_the_votes_the_test_and_past_decisions(registry, tmp_path):
    from prometheus_client import generate_latest

    from cli.canary import canary_report, gate_samples, past_canaries

    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    registry.start_canary(version, against=1, share=0.25)
    gate = gate_on(registry, tmp_path)
    gate.take(votes(1, 50, 100, "live"))
    gate.take(votes(version, 15, 30, "canary"))
    assert gate.canary_due() is None  # undecided: −0.46 between the bounds
    shown = canary_report(
        registry.canary(), gate_samples(generate_latest(gate.metrics.registry).decode()), past_canaries(registry)
    )
    assert f"canary: policy {version} answers 25.0% of users beside live 1" in shown
    assert "live      100 votes, thumbs-up 50.0%" in shown and "canary     30 votes, thumbs-up 50.0%" in shown
    assert "log-likelihood ratio -0.46; reject at <= -2.25, promote at >= 2.89" in shown
    gate.take(votes(version, 0, 20, "more"))  # 20 more downs: 15 up of 50 against 50 of 100, −3.37: rejected
    assert gate.canary_due().kind == events_pb2.POLICY_EVENT_KIND_REJECTED
    shown = canary_report(registry.canary(), None, past_canaries(registry))
    assert shown.startswith("no canary running") and f"policy {version}: rejected: canary not better" in shown


def test_an_operator_rejects_the_canary_and_the_gates_later_decision_writes_nothing(registry, tmp_path):
    from cli.canary import past_canaries
    from flywheel.registry import CanaryEnded
    from gate.service import reject_canary

    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    waiting = publish_adapter(registry, tmp_path, "b", base_version=1, parent=1)
    offline = [VerdictCheck(name="reward_score", value=0.1, threshold=0.0, passed=True)]
    registry.start_canary(version, against=1, share=0.25, checks=offline)
    gate = gate_on(registry, tmp_path)
    gate.metrics.canary_version.set(version)  # as the gate set it when it started the canary
    gate.take(votes(1, 50, 100, "live"))
    gate.take(votes(version, 27, 30, "canary"))  # the online test would promote it now

    event = reject_canary(registry, "users report wrong sums")
    assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED and event.policy_version == version
    assert event.parent_version == 1 and event.reasons == ["rejected by an operator: users report wrong sums"]
    assert registry.canary(include_ended=True) is None and registry.live().version == 1
    verdict = registry.verdict(version)
    assert not verdict.approved and [c.name for c in verdict.checks] == ["reward_score", "canary_thumbs_up"]
    assert past_canaries(registry) == [(version, False, "rejected by an operator: users report wrong sums")]

    assert gate.canary_due() is None  # the operator decided first: no promotion, nothing rewritten
    assert registry.live().version == 1 and registry.verdict(version) == verdict
    assert gate.metrics.registry.get_sample_value("flywheel_gate_canary_version") == 0
    with pytest.raises(CanaryEnded):  # a gate that read the canary before the operator ended it
        registry.close_canary(version, approved=True, checks=offline, reason="promoted")
    assert registry.live().version == 1 and registry.verdict(version) == verdict
    with pytest.raises(CanaryEnded):
        reject_canary(registry, "twice")
    assert gate.waiting_candidates() == [waiting]  # the gate judges the next candidate again


def test_flywheel_canary_reject_ends_the_canary_and_announces_it_on_kafka(
    registry, tmp_path, kafka_settings, monkeypatch, capsys
):
    from cli.main import main
    from tests.kafka_fixtures import consume_all

    version = publish_adapter(registry, tmp_path, "a", base_version=1, parent=1)
    registry.start_canary(version, against=1, share=0.25)
    monkeypatch.setenv("FLYWHEEL_KAFKA__TOPICS__POLICY", kafka_settings.topics.policy)
    flags = ["--state-dir", str(tmp_path), "--kafka", kafka_settings.bootstrap_servers]
    main(["canary", *flags, "--reject", "too many complaints"])
    assert f"canary {version} rejected; live 1 answers every user again" in capsys.readouterr().out
    assert registry.canary(include_ended=True) is None and not registry.verdict(version).approved
    (announced,) = asyncio.run(consume_all(kafka_settings, kafka_settings.topics.policy, 1))
    assert announced.event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED
    assert announced.event.reasons == ["rejected by an operator: too many complaints"]
    with pytest.raises(SystemExit, match="no canary is running"):
        main(["canary", *flags, "--reject", "again"])
