"""The whole-weight canary on the real engine: two servers on their own engines, one of them a canary replica.

The gate sends a whole-weight candidate that passed its offline checks to the canary replicas; the
canary replica reloads it (its answers carry its version) while the other replica stays on live.
Rejected, the canary replica reloads live; promoted, it stays where it is, and the live replica reloads.
The votes are the gate's input as Kafka delivers it: the online test itself is tests/test_canary.py's.
"""

from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from feedback.config import TopicNames
from flywheel.registry import PolicyRegistry
from flywheel.v1 import events_pb2, serving_pb2_grpc
from gate.canary import CanarySettings
from gate.config import GateSettings
from gate.service import Gate, GateMetrics
from server.app import FlywheelServer
from server.config import ServerSettings
from server.engine import PolicyEngine
from server.metrics import PolicyCheckMetrics
from server.swap import PolicyChecker, PolicySwapper
from tests import policy_variants
from tests.engine_fixtures import start_engine
from tests.test_canary import votes
from tests.test_gate_and_swap import PROMPTS, greedy, reward_model_dir
from trainer.config import RewardModelSettings
from trainer.gate_checks import SafetyRules

pytestmark = pytest.mark.engine

CANARY = CanarySettings(replica_share=0.5, min_votes=30)


@pytest.fixture(scope="module")
def canary_engine(engine_loop, model_path):
    """The canary replica's own engine (the live replica runs on the session's shared one)."""
    engine = start_engine(engine_loop, model_path)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def candidate(model_path, tmp_path_factory) -> tuple[Path, Path]:
    """A whole-weight candidate the gate's offline checks pass, and the reward model it is published with."""
    root = tmp_path_factory.mktemp("whole-weight-canary")
    return policy_variants.slightly_better(model_path, root / "policy"), reward_model_dir(model_path, root / "reward")


class PublishedEvents:
    """What a swapper hands its event producer, kept in order (the producer itself is tested on the real broker)."""

    def __init__(self):
        self.events: list[events_pb2.PolicyEvent] = []

    def publish(self, topic: str, key: str, event: events_pb2.PolicyEvent) -> bool:
        self.events.append(event)
        return True

    def kinds(self) -> list[tuple[int, int, str]]:
        """(kind, version, server) of each event, and forget them."""
        seen = [(event.kind, event.policy_version, event.server_id) for event in self.events]
        self.events.clear()
        return seen


class Replica:
    """One server on its own engine, following the registry as `flywheel serve` does."""

    def __init__(self, engine_loop, engine: PolicyEngine, registry: PolicyRegistry, canary_replica: bool):
        settings = ServerSettings(port=0, metrics_port=0, max_in_flight=4, max_queued=64, canary_replica=canary_replica)
        self.server = engine_loop.run(
            FlywheelServer.start(settings, engine, policy_version=1, policy_digest=registry.manifest(1).digest)
        )
        checker = PolicyChecker(registry, PolicyCheckMetrics(self.server.registry), 60, 300)
        self.published = PublishedEvents()
        self.swapper = PolicySwapper(
            engine, self.server.policy, self.server.admission, checker, self.server.metrics, self.published,
            TopicNames(), "canary" if canary_replica else "live", canary_replica=canary_replica,
        )  # fmt: skip
        self._engine_loop = engine_loop

    def sync(self) -> bool:
        return self._engine_loop.run(self.swapper.sync())

    def answers(self) -> list[tuple[int, str]]:
        """(version, text) of its greedy answers to PROMPTS."""
        with grpc.insecure_channel(self.server.address) as channel:
            stub = serving_pb2_grpc.FlywheelStub(channel)
            return [(response.policy_version, response.text) for response in (greedy(stub, p) for p in PROMPTS)]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.server.registry.get_sample_value(name, labels or {})


@pytest.fixture
def replicas(engine_loop, engine, canary_engine, model_path, candidate, tmp_path):
    """(registry, live replica, canary replica); v1 is the demo model, v2 the candidate. Both engines end on v1."""
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    policy, reward_model = candidate
    registry.publish(policy, parent_version=1, training_step=1, metrics={}, reward_model_dir=reward_model)
    live, canary = Replica(engine_loop, engine, registry, False), Replica(engine_loop, canary_engine, registry, True)
    yield registry, live, canary
    registry.set_live(1, reason="put both engines back on the demo weights", kind="rollback")
    for replica in (live, canary):
        replica.sync()
        engine_loop.run(replica.server.stop(0))


def gate_on(registry: PolicyRegistry) -> Gate:
    settings = GateSettings(
        safety=SafetyRules(banned_phrases=["hunter2"]), max_new_tokens=24, heldout_prompts=0, canary=CANARY,
        max_principal_share=1.0,
    )  # fmt: skip
    return Gate(settings, RewardModelSettings(), registry, GateMetrics(CollectorRegistry()))


def test_a_whole_weight_candidate_goes_to_the_canary_replica_and_promoted_stays_there_without_a_reload(replicas):
    registry, live, canary = replicas
    before = live.answers()
    gate = gate_on(registry)
    event = gate.decide_next()
    assert event.kind == events_pb2.POLICY_EVENT_KIND_CANARY, event
    assert registry.canary().version == 2 and registry.canary().share == 0.5 and registry.live().version == 1

    assert not live.sync() and canary.sync()
    assert canary.published.kinds() == [(events_pb2.POLICY_EVENT_KIND_CANARY, 2, "canary")]  # not live: v1 is
    assert live.answers() == before
    on_canary = canary.answers()
    assert {version for version, _ in on_canary} == {2}
    assert on_canary != [(2, text) for _, text in before], "the candidate must answer differently to mean anything"
    assert canary.metric("flywheel_canary_version") == 2 and canary.metric("flywheel_canary_share") == 0.5
    assert live.metric("flywheel_canary_version") == 0

    gate.take(votes(1, 50, 100, "live"))
    gate.take(votes(2, 27, 30, "canary"))
    assert gate.canary_due().kind == events_pb2.POLICY_EVENT_KIND_APPROVED
    assert registry.live().version == 2

    assert not canary.sync()  # promoted: live is what it runs
    assert canary.metric("flywheel_policy_swaps_total", {"outcome": "ok"}) == 1
    assert canary.metric("flywheel_policy_swap_seconds_count") == 1
    assert canary.metric("flywheel_canary_version") == 0
    assert canary.answers() == on_canary
    assert live.sync()
    assert live.answers() == on_canary  # the same weights on both engines: the canary replica ran the candidate's


def test_a_rejected_canary_sends_the_canary_replica_back_to_live(replicas):
    registry, live, canary = replicas
    before = live.answers()
    registry.start_canary(2, against=1, share=0.5)  # the offline checks are the test above's
    assert not live.sync() and canary.sync()
    assert {version for version, _ in canary.answers()} == {2}

    gate = gate_on(registry)
    gate.take(votes(1, 50, 100, "live"))
    gate.take(votes(2, 9, 30, "canary"))
    assert gate.canary_due().kind == events_pb2.POLICY_EVENT_KIND_REJECTED
    assert registry.live().version == 1

    assert canary.sync()  # reloads live
    assert canary.published.kinds()[-1] == (events_pb2.POLICY_EVENT_KIND_LIVE, 1, "canary")
    assert canary.answers() == before  # live's own answers: nothing of the candidate's weights or cache left
    assert canary.metric("flywheel_policy_swaps_total", {"outcome": "ok"}) == 2
    assert canary.metric("flywheel_canary_version") == 0 and canary.metric("flywheel_canary_share") == 0
    assert not live.sync() and live.answers() == before
