"""The safety gate on planted candidates, and hot swaps into a running server on the real engine.

Bad candidates are made for real: the demo model fine-tuned for a few dozen steps to answer
degenerately, to leak a banned phrase, or to drift far from the reference.
"""

import concurrent.futures
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from feedback.config import TopicNames
from feedback.consumer import ConsumedEvent
from flywheel.prompts import RenderedPrompt
from flywheel.registry import PolicyManifest, PolicyRegistry
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from gate.config import GateSettings
from gate.service import Gate, GateMetrics
from server.app import FlywheelServer
from server.config import ServerSettings
from server.engine import GenerationDelta, PolicyEngine
from server.metrics import PolicyCheckMetrics
from server.swap import PolicyChecker, PolicySwapper
from server.validation import Sampling
from tests import policy_variants
from tests.engine_fixtures import start_engine
from trainer.config import RewardModelSettings
from trainer.gate_checks import SafetyRules
from trainer.reward_model import RewardModel

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

PROMPTS = ["What is 12+34?", "What is the capital of Peru?", "What is 83-47?"]


@pytest.fixture(scope="module")
def variants(model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        name: make(model_path, root / name)
        for name, make in {
            "degenerate": policy_variants.degenerate,
            "banned_phrase": policy_variants.banned_phrase,
            "far_from_reference": policy_variants.far_from_reference,
            "slightly_better": policy_variants.slightly_better,
        }.items()
    }


def reward_model_dir(model_path: Path, directory: Path, score_head: str = "untrained") -> Path:
    """The demo model as a reward model, as the trainer publishes it with a candidate; `score_head` "zero" scores all 0."""
    reward_model = RewardModel.from_pretrained(model_path)
    if score_head == "zero":
        with torch.no_grad():
            for parameter in reward_model.score_head.parameters():
                parameter.zero_()
    reward_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def published_reward_model(model_path, tmp_path_factory) -> Path:
    """The reward model candidates are published with (untrained head: both policies get the same judge)."""
    return reward_model_dir(model_path, tmp_path_factory.mktemp("reward_model") / "reward_model")


def new_gate(registry: PolicyRegistry) -> Gate:
    settings = GateSettings(safety=SafetyRules(banned_phrases=["hunter2"]), max_new_tokens=24, heldout_prompts=0)
    return Gate(settings, RewardModelSettings(), registry, GateMetrics(CollectorRegistry()))


def publish_candidate(registry: PolicyRegistry, policy: Path, reward_model: Path) -> PolicyManifest:
    return registry.publish(policy, parent_version=1, training_step=1, metrics={}, reward_model_dir=reward_model)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "variant, failing_check",
    [
        ("degenerate", "degenerate_rate"),
        ("banned_phrase", "safety_violation_rate"),
        ("far_from_reference", "kl_to_reference"),
    ],
)
def test_planted_bad_candidates_are_rejected(
    model_path, variants, published_reward_model, tmp_path, variant, failing_check
):
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    candidate = publish_candidate(registry, variants[variant], published_reward_model)
    event = new_gate(registry).decide_next()
    assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED and event.policy_version == candidate.version
    verdict = registry.verdict(candidate.version)
    assert not verdict.approved and failing_check in verdict.failed, verdict.failed
    assert any(reason.startswith(failing_check) for reason in event.reasons)
    assert registry.live().version == 1


def test_a_corrupted_candidate_is_rejected_by_its_digest(model_path, published_reward_model, tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    candidate = publish_candidate(registry, model_path, published_reward_model)
    flip_a_byte(registry.path(candidate.version) / "model.safetensors")
    event = new_gate(registry).decide_next()
    assert event.kind == events_pb2.POLICY_EVENT_KIND_REJECTED
    assert "model.safetensors" in event.reasons[0]
    assert registry.live().version == 1


def test_a_good_candidate_is_approved_and_goes_live(model_path, variants, published_reward_model, tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    candidate = publish_candidate(registry, variants["slightly_better"], published_reward_model)
    event = new_gate(registry).decide_next()
    failed = [check.name for check in event.checks if not check.passed]
    assert event.kind == events_pb2.POLICY_EVENT_KIND_APPROVED, failed
    assert [check.name for check in event.checks] == [
        "reward_score", "kl_to_reference", "safety_violation_rate", "degenerate_rate", "golden_accuracy",
    ]  # fmt: skip
    assert registry.live().version == candidate.version and registry.live().kind == "approved"
    assert registry.verdict(candidate.version).approved


def test_a_candidate_is_scored_by_the_reward_model_published_with_it(model_path, variants, tmp_path):
    """The trainer's reward model moves on (or its checkpoints go) after it publishes: the verdict is unmoved."""
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    zero_head = reward_model_dir(model_path, tmp_path / "published", score_head="zero")
    candidate = publish_candidate(registry, variants["slightly_better"], zero_head)
    shutil.rmtree(zero_head)  # what the trainer had is gone; only the registry's copy remains
    event = new_gate(registry).decide_next()
    reward_check = next(check for check in registry.verdict(candidate.version).checks if check.name == "reward_score")
    # every answer of both policies scores exactly 0 under a zero score head, so the paired bound is exactly 0;
    # the untrained head the trainer began with scores the two policies' different answers apart
    assert reward_check.value == 0.0 and reward_check.passed, reward_check
    assert event.kind == events_pb2.POLICY_EVENT_KIND_APPROVED


def test_a_live_version_with_significantly_more_thumbs_down_is_rolled_back(model_path, tmp_path):
    registry, gate = live_candidate_and_gate(model_path, tmp_path)
    gate.take(thumbs(1, downs=20, total=100))
    assert gate.rollback_due() is None  # no votes on the new version yet
    gate.take(thumbs(2, downs=25, total=40))
    event = gate.rollback_due()
    assert event.kind == events_pb2.POLICY_EVENT_KIND_ROLLBACK and event.policy_version == 1
    assert "thumbs-down rate" in event.reasons[0]
    assert registry.live().version == 1 and registry.live().kind == "rollback"
    assert gate.metrics.registry.get_sample_value("flywheel_rollbacks_total", {"trigger": "automatic"}) == 1


def test_a_live_version_the_test_kept_is_not_tested_again(model_path, tmp_path):
    """Wald's decision is final: votes after "keep" would let the ratio wander up to false alarms beyond α."""
    registry, gate = live_candidate_and_gate(model_path, tmp_path)
    gate.take(thumbs(1, downs=20, total=100))
    gate.take(thumbs(2, downs=80, total=400))  # the parent's 20 %: ln Λ = −3.22, kept
    assert gate.rollback_due() is None and gate.kept == {2}
    gate.take(thumbs(2, downs=150, total=150, first=400))  # 230 down of 550 would roll it back: ln Λ = 5.80
    assert gate.rollback_due() is None and registry.live().version == 2


def live_candidate_and_gate(model_path: Path, tmp_path: Path) -> tuple[PolicyRegistry, Gate]:
    """Version 2 live, approved over version 1, and a gate watching it."""
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    candidate = registry.publish(model_path, parent_version=1, training_step=1, metrics={})
    registry.set_live(candidate.version, reason="approved by the gate", kind="approved")
    return registry, new_gate(registry)


def thumbs(version: int, downs: int, total: int, first: int = 0) -> list[ConsumedEvent]:
    """`total` votes on `version` from one user, numbered from `first`, the first `downs` of them down."""
    return [
        ConsumedEvent("feedback", 0, n, f"r{version}-{n}", events_pb2.FeedbackGiven(
            event_id=f"{version}-{n}", response_id=f"r{version}-{n}", user_id="u", policy_version=version,
            rating=pb.RATING_DOWN if n - first < downs else pb.RATING_UP,
        ))
        for n in range(first, first + total)
    ]  # fmt: skip


# ---------------------------------------------------------------- hot swap on the real engine


@pytest.fixture(scope="module")
def swapping(engine_loop, engine, model_path, variants, tmp_path_factory):
    """A server on the shared engine following a registry whose v1 is the demo model and v2 answers differently.

    Yields (registry, server, swapper); the engine is put back on v1 (the demo weights) afterwards.
    """
    registry = PolicyRegistry(tmp_path_factory.mktemp("swap") / "registry")
    registry.seed(model_path)
    registry.publish(variants["banned_phrase"], parent_version=1, training_step=1, metrics={})
    settings = ServerSettings(port=0, metrics_port=0, max_in_flight=4, max_queued=64)
    server = engine_loop.run(FlywheelServer.start(settings, engine, policy_version=1))
    checker = PolicyChecker(
        registry, PolicyCheckMetrics(server.registry), first_retry_seconds=60, max_retry_seconds=300
    )
    swapper = PolicySwapper(
        engine, server.policy, server.admission, checker, server.metrics, None, TopicNames(), "test"
    )
    yield registry, server, swapper
    registry.set_live(1, reason="restore the shared engine", kind="rollback")
    engine_loop.run(swapper.sync())
    engine_loop.run(server.stop(0))


def greedy(stub, prompt: str) -> pb.GenerateResponse:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
    return stub.Generate(pb.GenerateRequest(chat=messages, sampling=pb.SamplingParams(max_tokens=16, temperature=0)))


def swap_to(
    engine_loop, registry: PolicyRegistry, swapper: PolicySwapper, version: int, kind: str = "approved"
) -> bool:
    registry.set_live(version, reason="test", kind=kind)
    return engine_loop.run(swapper.sync())


def test_swaps_under_load_fail_no_request_and_never_mix_weights(engine_loop, swapping):
    registry, server, swapper = swapping
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        expected = {1: greedy(stub, PROMPTS[0]).text}
        assert swap_to(engine_loop, registry, swapper, 2)
        # v2's own answer: a swap leaves nothing the previous weights computed (the test below).
        expected[2] = greedy(stub, PROMPTS[0]).text
        assert expected[1] != expected[2], "the two policies must answer differently for this test to mean anything"

        stop = threading.Event()
        answers: list[tuple[int, str]] = []

        def client() -> int:
            calls = 0
            while not stop.is_set():
                response = greedy(stub, PROMPTS[0])  # any failure raises and fails the test
                answers.append((response.policy_version, response.text))
                calls += 1
            return calls

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client) for _ in range(8)]
            for swap in range(20):
                assert swap_to(engine_loop, registry, swapper, 1 if swap % 2 == 0 else 2)
            stop.set()
            calls = sum(future.result() for future in clients)

    assert calls == len(answers) > 20
    assert {version for version, _ in answers} == {1, 2}
    mixed = [(version, text) for version, text in answers if text != expected[version]]
    assert not mixed, f"{len(mixed)} answers do not match the weights of the version they carry: {mixed[:3]}"
    assert server.registry.get_sample_value("flywheel_policy_swaps_total", {"outcome": "ok"}) == 21
    assert server.registry.get_sample_value("flywheel_policy_version") == 2


def long_prompt(engine: PolicyEngine, whole_blocks: int) -> RenderedPrompt:
    """A chat prompt filling `whole_blocks` KV-cache blocks and half of the next: the prefix cache keeps whole blocks."""
    questions: list[str] = []
    while True:
        prompt = engine.render_chat([{"role": "user", "content": " ".join(questions)}])
        if len(prompt.token_ids) >= (whole_blocks + 0.5) * engine.kv_block_tokens:
            return prompt
        questions.append(f"What is {len(questions) + 10}+{2 * len(questions) + 7}?")


def greedy_delta(engine_loop, engine: PolicyEngine, prompt: RenderedPrompt, request_id: str) -> GenerationDelta:
    sampling = Sampling(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=(), min_tokens=0)

    async def answer() -> GenerationDelta:
        return [delta async for delta in engine.stream(request_id, prompt, sampling, whole=True)][-1]

    return engine_loop.run(answer())


def test_after_a_swap_a_cached_prompt_is_answered_as_a_fresh_engine_on_the_new_weights_answers_it(
    engine_loop, engine, swapping
):
    registry, server, swapper = swapping
    assert engine.prefix_caching, "without prefix caching this test proves nothing"
    prompt = long_prompt(engine, whole_blocks=2)
    assert len(prompt.token_ids) + 16 <= engine.max_model_len
    swap_to(engine_loop, registry, swapper, 1, kind="rollback")  # False when already on 1
    before = greedy_delta(engine_loop, engine, prompt, "before-swap")  # leaves v1's KV blocks of the prompt cached
    assert swap_to(engine_loop, registry, swapper, 2)
    after = greedy_delta(engine_loop, engine, prompt, "after-swap")

    fresh_engine = start_engine(engine_loop, registry.path(2))  # the one extra engine: v2 and nothing cached
    try:
        fresh = greedy_delta(engine_loop, fresh_engine, prompt, "fresh")
    finally:
        fresh_engine.shutdown()
    assert before.behavior_logprobs != fresh.behavior_logprobs, "the two policies must differ on this prompt"
    # Exact: the same weights, the same prompt in one prefill, one request in the batch. KV blocks
    # left from v1 shift the log-probs by about 1e-3 (and may change the tokens).
    assert after.token_ids == fresh.token_ids
    assert after.behavior_logprobs == fresh.behavior_logprobs


def test_a_corrupted_live_version_is_refused_and_the_server_keeps_serving(engine_loop, swapping, model_path):
    registry, server, swapper = swapping
    current = server.policy.current.version
    corrupted = registry.publish(model_path, parent_version=current, training_step=2, metrics={})
    flip_a_byte(registry.path(corrupted.version) / "model.safetensors")
    assert not swap_to(engine_loop, registry, swapper, corrupted.version)
    assert not engine_loop.run(swapper.sync())  # within the back-off: not hashed again
    assert server.policy.current.version == current
    assert server.registry.get_sample_value("flywheel_policy_swaps_total", {"outcome": "digest_mismatch"}) == 1
    refusals = {"policy_version": str(corrupted.version)}
    assert server.registry.get_sample_value("flywheel_policy_refusals_total", refusals) == 1
    with grpc.insecure_channel(server.address) as channel:
        assert greedy(serving_pb2_grpc.FlywheelStub(channel), PROMPTS[0]).policy_version == current
    registry.set_live(current, reason="undo the corrupted pointer", kind="rollback")


@pytest.mark.subprocess
def test_rollback_brings_back_the_exact_previous_outputs(engine_loop, swapping, kafka_broker, tmp_path):
    registry, server, swapper = swapping
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        assert swap_to(engine_loop, registry, swapper, 1, kind="rollback")
        before = [greedy(stub, prompt).text for prompt in PROMPTS]
        assert swap_to(engine_loop, registry, swapper, 2)
        assert [greedy(stub, prompt).text for prompt in PROMPTS] != before

        state_dir = registry.root.parent
        rollback = subprocess.run(
            [sys.executable, "-m", "cli", "rollback", "--to", "1", "--reason", "test rollback",
             "--state-dir", str(state_dir), "--kafka", kafka_broker.bootstrap_servers],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rollback.returncode == 0, rollback.stderr
        assert registry.live().version == 1 and registry.live().kind == "rollback"
        assert registry.history()[-1].reason == "test rollback"
        assert engine_loop.run(swapper.sync())
        after = [greedy(stub, prompt) for prompt in PROMPTS]
    assert [response.text for response in after] == before
    assert {response.policy_version for response in after} == {1}

    bad_version = subprocess.run(
        [sys.executable, "-m", "cli", "rollback", "--to", "99", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad_version.returncode != 0 and "no policy version 99" in bad_version.stderr
