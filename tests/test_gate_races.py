"""The gate against other movers of the live pointer, on real registries, threads and processes.

The candidates are small fake model directories and the gate's judgement is scripted (no model is
run): what is tested is what the gate does with the registry around a judgement that takes time.
"""

import multiprocessing
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from flywheel.registry import PolicyRegistry, Withheld
from flywheel.v1 import events_pb2
from flywheel.v1 import serving_pb2 as pb
from gate import service as gate_module
from gate.config import GateSettings
from gate.service import DIGEST_CHECK, Gate, GateMetrics, publish_rollback
from tests.test_registry import make_model_dir
from trainer.config import RewardModelSettings
from trainer.gate_checks import GateCheck, GateVerdict

PASSED = GateVerdict(approved=True, checks=[GateCheck("reward_score", 0.1, -0.25, True, "candidate − live ≥ −0.25")])


class ScriptedGate(Gate):
    """A gate whose judgement passes every candidate after running `while_judging` (the test's hook)."""

    def __init__(self, registry: PolicyRegistry, while_judging=lambda: None):
        settings = GateSettings(golden_file="", heldout_prompts=0)
        super().__init__(settings, RewardModelSettings(), registry, GateMetrics(CollectorRegistry()))
        self.while_judging = while_judging
        self.judged: list[tuple[str, str]] = []

    def judge(
        self, candidate_path, live_path, reference_path, reward_model_path, prompts, base_path=None
    ) -> GateVerdict:
        self.judged.append((candidate_path.name, live_path.name))
        self.while_judging()
        return PASSED


def registry_with_candidate(tmp_path: Path) -> PolicyRegistry:
    """Version 1 seeded, 2 approved and live, 3 a candidate trained from 2; candidates carry a reward model."""
    registry = PolicyRegistry(tmp_path / "registry")
    model = make_model_dir(tmp_path / "model")
    reward_model = make_model_dir(tmp_path / "reward_model")
    registry.seed(model)
    registry.publish(model, parent_version=1, training_step=1, metrics={}, reward_model_dir=reward_model)
    registry.approve(2, judged_against=1, checks=[], reason="approved by the gate")
    registry.publish(model, parent_version=2, training_step=2, metrics={}, reward_model_dir=reward_model)
    return registry


def _operator_rollback(root: str, version: int) -> None:
    publish_rollback(PolicyRegistry(Path(root)), version, "operator: answers got worse")


def test_an_operator_rollback_made_while_a_candidate_is_judged_is_kept(tmp_path):
    registry = registry_with_candidate(tmp_path)

    def operator_rolls_back_meanwhile() -> None:  # `flywheel rollback --to 1`'s move, from another process
        operator = multiprocessing.get_context("fork").Process(target=_operator_rollback, args=(str(registry.root), 1))
        operator.start()
        operator.join(30)
        assert operator.exitcode == 0

    gate = ScriptedGate(registry, while_judging=operator_rolls_back_meanwhile)
    event = gate.decide_next()

    assert gate.judged == [("v000003", "v000002")]
    live = registry.live()
    assert (live.version, live.kind, live.forced, live.previous_version) == (1, "rollback", True, 2), (
        "the rollback stands"
    )
    assert [r.version for r in registry.history()] == [1, 2, 1], "the gate made no move after it"
    verdict = registry.verdict(3)
    assert verdict.approved is False and verdict.judged_against == 2
    assert verdict.withheld is Withheld.LIVE_MOVED and not verdict.judged_on_checks
    assert (
        "live policy is version 1 (rollback, forced: operator: answers got worse), not version 2"
        in verdict.withheld_detail
    )
    assert not verdict.failed
    assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED and event.policy_version == 3
    assert gate.metrics.registry.get_sample_value("flywheel_gate_decisions_total", {"decision": "withheld"}) == 1
    assert gate.decide_next() is None, "a withheld candidate has its verdict: it is not judged again"


def _race(root: str, judgements: str, start, results) -> None:
    def slowly() -> None:
        with open(judgements, "a") as log:
            log.write(f"{multiprocessing.current_process().pid}\n")
        time.sleep(1.0)  # long enough for the other gate to look while this one judges

    gate = ScriptedGate(PolicyRegistry(Path(root)), while_judging=slowly)
    start.wait()
    event = gate.decide_next()
    results.put(None if event is None else events_pb2.PolicyEventKind.Name(event.kind))


def test_two_gates_racing_on_one_candidate_give_one_verdict_and_one_move(tmp_path):
    registry = registry_with_candidate(tmp_path)
    judgements = tmp_path / "judgements.log"
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    gates = [
        context.Process(target=_race, args=(str(registry.root), str(judgements), start, results)) for _ in range(2)
    ]
    for gate in gates:
        gate.start()
    for gate in gates:
        gate.join(60)
    outcomes = sorted([results.get(timeout=5) for _ in gates], key=str)

    assert len(judgements.read_text().splitlines()) == 1, "one gate judged the candidate"
    assert outcomes == [None, "POLICY_EVENT_KIND_APPROVED"]
    assert [(r.version, r.kind) for r in registry.history()] == [(1, "initial"), (2, "approved"), (3, "approved")]
    assert registry.verdict(3).approved and registry.verdict(3).judged_against == 2
    assert not (registry.root / "v000003.claim").exists()


def test_a_gate_leaves_an_older_candidate_another_gate_is_judging_to_it(tmp_path):
    registry = registry_with_candidate(tmp_path)
    judging, finish = threading.Event(), threading.Event()
    first = ScriptedGate(registry, while_judging=lambda: (judging.set(), finish.wait(30)))
    judged_first = threading.Thread(target=first.decide_next)
    judged_first.start()
    assert judging.wait(30)
    registry.publish(
        tmp_path / "model", parent_version=2, training_step=3, metrics={}, reward_model_dir=tmp_path / "reward_model"
    )  # version 4 arrives meanwhile
    second = ScriptedGate(registry)
    second.decide_next()
    assert registry.verdict(3) is None, "3 is being judged: the second gate does not mark it superseded"
    assert registry.verdict(4).approved and registry.live().version == 4
    finish.set()
    judged_first.join(30)
    verdict = registry.verdict(3)
    assert verdict.withheld is Withheld.LIVE_MOVED and registry.live().version == 4


def test_the_automatic_rollback_does_not_undo_an_operator_move_made_while_it_decided(tmp_path, monkeypatch):
    registry = registry_with_candidate(tmp_path)
    gate = ScriptedGate(registry)
    votes = [
        events_pb2.FeedbackGiven(
            event_id=f"{version}-{n}", response_id=f"r{version}-{n}", user_id="u", policy_version=version,
            rating=pb.RATING_DOWN if n < downs else pb.RATING_UP,
        )
        for version, downs, total in ((1, 20, 100), (2, 25, 40))
        for n in range(total)
    ]  # fmt: skip
    for vote in votes:
        gate.thumbs.add(vote)
    real_decision = gate_module.sprt_decision

    def operator_moves_first(*args):  # the test decides while the operator points live elsewhere
        registry.set_live(3, reason="operator: try 3", kind="rollback")
        return real_decision(*args)

    monkeypatch.setattr(gate_module, "sprt_decision", operator_moves_first)
    assert gate.rollback_due() is None, "the thumbs said roll back, but not from a version no longer live"
    assert registry.live().version == 3 and registry.live().forced
    assert [r.version for r in registry.history()] == [1, 2, 3]


def test_a_candidate_whose_reward_model_does_not_match_its_manifest_is_rejected_unjudged(tmp_path):
    registry = registry_with_candidate(tmp_path)
    (registry.path(3) / "reward_model" / "config.json").unlink()  # every file is a hard link: replace, never edit
    gate = ScriptedGate(registry)
    event = gate.decide_next()
    assert gate.judged == [], "no judgement without the reward model published with the candidate"
    assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED
    assert event.reasons == ["policy version 3's reward model: file 'config.json' is missing"]
    assert registry.verdict(3).failed == [DIGEST_CHECK] and registry.live().version == 2
