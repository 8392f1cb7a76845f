"""Adapter mode on the real engine: LoRA adapters served per request, swapped without a pause,
refused on a foreign base, a canary share of users, and the gate's online test deciding it.

The engine here is its own (LoRA enabled), started once for the module; the users are simulated
by the demo task's judge (correct and concise: thumbs up).
"""

import asyncio
import concurrent.futures
import random
import threading
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cli.simulate import Simulation, SimulationSettings
from feedback.config import TopicNames
from feedback.consumer import ConsumedEvent
from flywheel.adapters import PolicySettings
from flywheel.demo.task import judge_thumb, traffic_questions
from flywheel.registry import PolicyRegistry
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from gate.canary import CanarySettings
from gate.config import GateSettings
from gate.service import Gate, GateMetrics
from server.app import FlywheelServer
from server.config import ServerSettings
from server.metrics import PolicyCheckMetrics
from server.swap import PolicyChecker, PolicySwapper
from server.validation import Sampling
from tests import policy_variants
from tests.engine_fixtures import start_engine
from tests.test_gate_and_swap import long_prompt, reward_model_dir
from trainer.config import RewardModelSettings

pytestmark = pytest.mark.engine

ADAPTERS = PolicySettings(adapter="lora", lora_rank=4, lora_alpha=16)


@pytest.fixture(scope="module")
def lora_engine(engine_loop, model_path):
    engine = start_engine(engine_loop, model_path, ADAPTERS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def adapters(model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "concise": policy_variants.concise_adapter(model_path, root / "concise"),
        "wrong": policy_variants.wrong_adapter(model_path, root / "wrong"),
    }


class EventsInMemory:
    """The server's event log, kept in a list: what it would publish to Kafka."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def publish(self, topic: str, key: str, event) -> bool:
        self.events.append((topic, event))
        return True


@pytest.fixture
def serving(engine_loop, lora_engine, model_path, tmp_path):
    """A server in adapter mode on the LoRA engine, following a registry whose v1 is the demo model (the base)."""
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    events = EventsInMemory()
    settings = ServerSettings(port=0, metrics_port=0, max_in_flight=8, max_queued=256)
    server = engine_loop.run(
        FlywheelServer.start(
            settings, lora_engine, policy_version=1, policy_digest=registry.manifest(1).digest, events=events
        )
    )
    checker = PolicyChecker(
        registry, PolicyCheckMetrics(server.registry), first_retry_seconds=60, max_retry_seconds=300
    )
    swapper = PolicySwapper(
        lora_engine, server.policy, server.admission, checker, server.metrics, events, TopicNames(), "test",
        base_digest=registry.manifest(1).digest,
    )  # fmt: skip
    yield registry, server, swapper, events
    engine_loop.run(server.stop(0))


def publish_adapter(registry: PolicyRegistry, adapter: Path, reward_model: Path | None = None) -> int:
    return registry.publish(
        adapter, parent_version=1, training_step=1, metrics={}, base_version=1, reward_model_dir=reward_model
    ).version


def ask(stub, prompt: str, user_id: str = "", max_tokens: int = 16) -> pb.GenerateResponse:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0)
    return stub.Generate(pb.GenerateRequest(chat=messages, sampling=sampling, user_id=user_id))


PROMPT = "What is 47+38?"


def test_adapter_swaps_under_load_pause_nothing_and_never_mix_versions(engine_loop, serving, adapters):
    registry, server, swapper, _ = serving
    version = publish_adapter(registry, adapters["concise"])
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        expected = {1: ask(stub, PROMPT).text}
        registry.set_live(version, reason="test", kind="approved")
        assert engine_loop.run(swapper.sync())
        expected[version] = ask(stub, PROMPT).text
        assert expected[1] != expected[version], (
            "base and adapter must answer differently for this test to mean anything"
        )

        stop = threading.Event()
        answered = threading.Condition()
        answers: list[tuple[int, str]] = []

        def client() -> int:
            calls = 0
            while not stop.is_set():
                response = ask(stub, PROMPT)  # any failure raises and fails the test
                with answered:
                    answers.append((response.policy_version, response.text))
                    answered.notify_all()
                calls += 1
            return calls

        clients_count = 8
        with concurrent.futures.ThreadPoolExecutor(clients_count) as pool:
            clients = [pool.submit(client) for _ in range(clients_count)]
            for swap in range(20):
                registry.set_live(1 if swap % 2 == 0 else version, reason="test", kind="approved")
                assert engine_loop.run(swapper.sync())
                # Requests overlap every swap however fast the machine swaps: wait for a round of answers.
                with answered:
                    after_swap = len(answers)
                    assert answered.wait_for(
                        lambda after=after_swap: len(answers) >= after + clients_count, timeout=120
                    )
            stop.set()
            calls = sum(future.result() for future in clients)

    assert calls == len(answers) >= 20 * clients_count
    assert {v for v, _ in answers} == {1, version}
    mixed = [(v, text) for v, text in answers if text != expected[v]]
    assert not mixed, f"{len(mixed)} answers do not match the version they carry: {mixed[:3]}"
    assert server.registry.get_sample_value("flywheel_policy_swaps_total", {"outcome": "ok"}) == 21
    # Admission never paused: every swap's pause is exactly zero, none was a reload.
    assert server.registry.get_sample_value("flywheel_policy_swap_seconds_sum") == 0.0


def test_an_adapter_answers_a_prompt_the_base_cached_as_if_nothing_were_cached(
    engine_loop, lora_engine, serving, adapters
):
    """vLLM keys prefix-cache blocks by adapter name and path: the base's blocks never answer for an adapter."""
    registry, server, swapper, _ = serving
    assert lora_engine.prefix_caching, "without prefix caching this test proves nothing"
    version = publish_adapter(registry, adapters["concise"])
    twin = publish_adapter(registry, adapters["concise"])  # the same weights under another version: a cold cache
    prompt = long_prompt(lora_engine, whole_blocks=2)

    async def answer(request_id: str, adapter_version: int | None):
        adapter = None if adapter_version is None else (adapter_version, str(registry.path(adapter_version)))
        sampling = Sampling(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=(), min_tokens=0)
        return [d async for d in lora_engine.stream(request_id, prompt, sampling, whole=True, adapter=adapter)][-1]

    base = engine_loop.run(answer("base", None))  # leaves the base's KV blocks of the prompt cached
    adapted = engine_loop.run(answer("adapter", version))
    cold = engine_loop.run(answer("twin", twin))
    assert base.behavior_logprobs != cold.behavior_logprobs, "base and adapter must differ on this prompt"
    assert adapted.token_ids == cold.token_ids and adapted.behavior_logprobs == cold.behavior_logprobs


def test_a_base_answer_batched_with_adapter_answers_is_the_bases_whichever_adapters_the_engine_holds(
    engine_loop, lora_engine, serving, adapters
):
    """vLLM's CPU LoRA path reads a request without an adapter (slot index -1) from the last slot: once
    every slot holds an adapter, a base answer batched with adapter answers was written by one of them."""
    registry, server, swapper, _ = serving
    versions = [publish_adapter(registry, adapters["concise"]) for _ in range(ADAPTERS.max_adapters + 1)]
    prompt = lora_engine.render_chat([{"role": "user", "content": PROMPT}])
    sampling = Sampling(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=(), min_tokens=0)

    async def answer(request_id: str, version: int | None) -> tuple[int, ...]:
        adapter = None if version is None else (version, str(registry.path(version)))
        deltas = [d async for d in lora_engine.stream(request_id, prompt, sampling, whole=True, adapter=adapter)]
        return deltas[-1].token_ids

    async def batched() -> list[tuple[int, ...]]:
        for version in versions:  # more adapters than slots: every slot holds one
            await lora_engine.load_adapter(version, str(registry.path(version)))
        requests = [answer(f"base-{n}", None) for n in range(4)] + [answer(f"v{v}", v) for v in versions[-3:]]
        return await asyncio.gather(*requests)

    base_alone = engine_loop.run(answer("base-alone", None))
    adapter_alone = engine_loop.run(answer("adapter-alone", versions[0]))
    assert base_alone != adapter_alone, "base and adapter must answer differently for this test to mean anything"
    answers = engine_loop.run(batched())
    assert answers[:4] == [base_alone] * 4, "a base answer was written with an adapter"
    assert answers[4:] == [adapter_alone] * 3


def test_an_adapter_on_another_base_is_refused_and_the_server_keeps_serving(
    engine_loop, serving, adapters, model_path, tmp_path
):
    registry, server, swapper, _ = serving
    other_base = registry.publish(
        policy_variants.banned_phrase(model_path, tmp_path / "other-base"),
        parent_version=1,
        training_step=1,
        metrics={},
    ).version
    foreign = registry.publish(
        adapters["concise"], parent_version=other_base, training_step=2, metrics={}, base_version=other_base
    ).version
    registry.set_live(foreign, reason="test", kind="approved")
    assert not engine_loop.run(swapper.sync())
    assert server.policy.current.version == 1
    assert server.registry.get_sample_value("flywheel_policy_swaps_total", {"outcome": "foreign_base"}) == 1
    with grpc.insecure_channel(server.address) as channel:
        assert ask(serving_pb2_grpc.FlywheelStub(channel), PROMPT).policy_version == 1


def ask_as_users(
    server, prompts_by_user: dict[str, str], rounds: int = 1
) -> list[tuple[str, str, pb.GenerateResponse]]:
    """Each user asks their prompt `rounds` times, 8 at once: (user, prompt, response)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        jobs = [(user, prompt) for _ in range(rounds) for user, prompt in prompts_by_user.items()]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = pool.map(lambda job: ask(stub, job[1], user_id=job[0], max_tokens=12), jobs)
            return [(user, prompt, response) for (user, prompt), response in zip(jobs, responses)]


def test_a_canary_answers_its_share_of_users_sticky_per_user_each_answer_naming_its_version(
    engine_loop, serving, adapters
):
    registry, server, swapper, _ = serving
    version = publish_adapter(registry, adapters["concise"])
    registry.start_canary(version, against=1, share=0.3)
    assert not engine_loop.run(swapper.sync())  # live stays; the canary joins it
    users = {f"user-{n}": PROMPT for n in range(300)}
    answered = ask_as_users(server, users, rounds=2)
    versions_by_user: dict[str, set[int]] = {}
    for user, _, response in answered:
        versions_by_user.setdefault(user, set()).add(response.policy_version)
    assert all(len(versions) == 1 for versions in versions_by_user.values()), "a user moved between versions"
    share = sum(versions == {version} for versions in versions_by_user.values()) / len(users)
    # 300 users at 0.3: sd = sqrt(0.3 × 0.7 / 300) = 0.026; 0.1 is almost four of them.
    assert abs(share - 0.3) < 0.1, share
    texts = {response.policy_version: response.text for _, _, response in answered}
    assert texts[1] != texts[version]
    assert server.registry.get_sample_value("flywheel_canary_version") == version
    assert server.registry.get_sample_value("flywheel_answers_total", {"policy_version": str(version)}) == sum(
        response.policy_version == version for *_, response in answered
    )
    registry.end_canary(version)
    engine_loop.run(swapper.sync())
    assert {response.policy_version for *_, response in ask_as_users(server, users)} == {1}


def test_the_simulations_held_out_rate_measures_live_while_a_canary_answers_most_users(engine_loop, serving, adapters):
    registry, server, swapper, _ = serving
    version = publish_adapter(registry, adapters["concise"])
    registry.start_canary(version, against=1, share=0.9)
    engine_loop.run(swapper.sync())

    async def measure() -> tuple[float, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            settings = SimulationSettings(heldout_questions=5, trainer_metrics_url="")
            return await Simulation(settings, serving_pb2_grpc.FlywheelStub(channel)).heldout_rate()

    try:
        rate, answered_by = engine_loop.run(measure())
    finally:
        registry.end_canary(version)
        engine_loop.run(swapper.sync())
    assert answered_by == 1
    # the demo model hedges (none of its greedy answers is concise); the concise canary answers as users like
    assert rate <= 0.2, f"{rate:.0%} of the first five capitals liked: the canary's answers were measured as live's"


@pytest.fixture(scope="module")
def published_reward_model(model_path, tmp_path_factory) -> Path:
    """The reward model the trainer publishes with a candidate (untrained head: both policies get the same judge)."""
    return reward_model_dir(model_path, tmp_path_factory.mktemp("reward_model") / "reward_model")


def users_vote(server, events: EventsInMemory, questions: int, seed: int) -> list[ConsumedEvent]:
    """Simulated users ask demo questions and vote with the demo's judge; the votes as the gate consumes them."""
    rng = random.Random(seed)
    prompts = {f"voter-{seed}-{n}": question.prompt for n, question in enumerate(traffic_questions(rng, questions))}
    answered = ask_as_users(server, prompts)
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        for user, prompt, response in answered:
            rating = pb.RATING_UP if judge_thumb(prompt, response.text) == "up" else pb.RATING_DOWN
            rated = pb.RatedResponse(response_id=response.response_id, feedback_token=response.feedback_token)
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(response=rated, user_id=user, rating=rating))
    votes = [event for topic, event in events.events if isinstance(event, events_pb2.FeedbackGiven)]
    events.events.clear()
    return [ConsumedEvent("feedback", 0, n, event.response_id, event) for n, event in enumerate(votes)]


CANARY = CanarySettings(share=0.3, min_votes=20, min_improvement=0.1)


def test_an_adapter_candidate_goes_canary_is_promoted_when_users_like_it_better_then_rolled_back(
    engine_loop, serving, adapters, published_reward_model
):
    registry, server, swapper, events = serving
    version = publish_adapter(registry, adapters["concise"], published_reward_model)
    gate = Gate(
        GateSettings(canary=CANARY, heldout_prompts=0, max_new_tokens=24, max_principal_share=1.0),
        RewardModelSettings(), registry, GateMetrics(CollectorRegistry()),
    )  # fmt: skip
    event = gate.decide_next()
    assert event.kind == events_pb2.POLICY_EVENT_KIND_CANARY, event
    engine_loop.run(swapper.sync())
    assert server.policy.canary is not None and server.policy.canary.policy.version == version
    decided = None
    for round_ in range(6):
        gate.take(users_vote(server, events, questions=100, seed=round_))
        if (decided := gate.canary_due()) is not None:
            break
    assert decided is not None and decided.kind == events_pb2.POLICY_EVENT_KIND_APPROVED, gate.canary_state()
    assert registry.live().version == version and "canary better" in registry.live().reason
    assert engine_loop.run(swapper.sync()) and server.policy.canary is None
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        assert ask(stub, PROMPT).policy_version == version
        registry.set_live(1, reason="operator rollback", kind="rollback")
        assert engine_loop.run(swapper.sync())
        assert ask(stub, PROMPT).policy_version == 1


def test_a_canary_its_users_like_worse_is_rejected_and_live_stays(engine_loop, serving, adapters):
    registry, server, swapper, events = serving
    version = publish_adapter(registry, adapters["wrong"])
    # The offline checks would catch this one (golden accuracy): started by hand, to test the online test alone.
    registry.start_canary(version, against=1, share=0.3)
    gate = Gate(
        GateSettings(canary=CANARY, max_principal_share=1.0), RewardModelSettings(), registry,
        GateMetrics(CollectorRegistry()),
    )  # fmt: skip
    engine_loop.run(swapper.sync())
    decided = None
    for round_ in range(6):
        gate.take(users_vote(server, events, questions=100, seed=round_))
        if (decided := gate.canary_due()) is not None:
            break
    assert decided is not None and decided.kind == events_pb2.POLICY_EVENT_KIND_REJECTED, gate.canary_state()
    assert "canary not better" in registry.verdict(version).checks[-1].detail
    assert registry.live().version == 1
    engine_loop.run(swapper.sync())
    assert server.policy.canary is None
