"""Generations and feedback from the real server to the real broker: what the engine computed is what Kafka holds,
and SubmitFeedback answers every kind of bad feedback with its own status code."""

import asyncio
import time
import uuid

import grpc
import pytest
from prometheus_client import CollectorRegistry
from transformers import GenerationConfig

from feedback.config import SpoolSettings
from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.intake import IntakeLimits
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from feedback.tokens import FeedbackClaims, issue_feedback_token
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from server.app import FlywheelServer
from server.config import ServerSettings
from server.validation import Sampling
from trainer.ppo import end_of_sequence_ids

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

TOKEN_SECRET = "feedback-test-secret"
HANG_GUARD_S = 60  # only to fail instead of hanging; nothing here is a timing assertion


@pytest.fixture
def logged_server(engine_loop, engine, kafka_settings, tmp_path):
    """A server on the shared engine that logs to this test's topics; yields (server, stub, kafka settings)."""
    producer = EventProducer(
        kafka_settings, SpoolSettings(directory=tmp_path / "spool"), EventMetrics.register(CollectorRegistry())
    )
    engine_loop.run(producer.start())
    settings = ServerSettings(
        port=0,
        metrics_port=0,
        feedback_token_secret=TOKEN_SECRET,
        feedback=IntakeLimits(max_comment_chars=20, vote_burst=4, votes_per_minute=1),
    )
    server = engine_loop.run(FlywheelServer.start(settings, engine, events=producer, topics=kafka_settings.topics))
    with grpc.insecure_channel(server.address) as channel:
        yield server, serving_pb2_grpc.FlywheelStub(channel), kafka_settings
    engine_loop.run(server.stop(0))
    engine_loop.run(producer.stop())


def consume(kafka_settings, topic: str, count: int) -> list[ConsumedEvent]:
    async def read() -> list[ConsumedEvent]:
        consumer = EventConsumer(kafka_settings, uuid.uuid4().hex, EventMetrics.register(CollectorRegistry()), [topic])
        await consumer.start()
        events: list[ConsumedEvent] = []
        deadline = time.monotonic() + HANG_GUARD_S
        try:
            while len(events) < count:
                assert time.monotonic() < deadline, f"only {len(events)} of {count} events arrived on {topic}"
                events += (await consumer.poll(timeout_ms=200)).events
            # Anything beyond `count` would be a duplicate: give it a moment to show up.
            events += (await consumer.poll(timeout_ms=1000)).events
        finally:
            await consumer.stop()
        return events

    return asyncio.run(read())


def ask(stub, question: str, user_id: str = "alice", **sampling) -> pb.GenerateResponse:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)])
    return stub.Generate(pb.GenerateRequest(chat=messages, sampling=pb.SamplingParams(**sampling), user_id=user_id))


def test_every_answer_is_logged_once_with_the_engines_tokens_and_logprobs(
    logged_server, engine, engine_loop, tokenizer, model_path
):
    generation = GenerationConfig.from_pretrained(model_path)
    _, stub, kafka = logged_server
    questions = [f"What is {a}+{a + 11}?" for a in range(20, 26)]
    answers = [ask(stub, q, max_tokens=12, temperature=1.0, seed=index) for index, q in enumerate(questions)]

    logged = {event.event.response_id: event.event for event in consume(kafka, kafka.topics.generations, len(answers))}
    assert sorted(logged) == sorted(answer.response_id for answer in answers), "exactly one GenerationLogged per answer"
    assert any(answer.finish_reason == pb.FINISH_REASON_STOP for answer in answers)
    for index, (question, answer) in enumerate(zip(questions, answers)):
        event = logged[answer.response_id]
        assert isinstance(event, events_pb2.GenerationLogged)
        assert (event.response_text, event.policy_version, event.user_id) == (
            answer.text,
            answer.policy_version,
            "alice",
        )
        assert event.chat.messages[0].content == question
        assert len(event.response_token_ids) == len(event.behavior_logprobs) == answer.completion_tokens
        assert len(event.prompt_token_ids) == answer.prompt_tokens
        # An answer the model ended on its own (no stop strings here) keeps its end token: the reward model
        # learns "it stopped here" from it.
        ended = event.response_token_ids[-1] in end_of_sequence_ids(generation.eos_token_id, tokenizer.eos_token_id)
        assert ended == (answer.finish_reason == pb.FINISH_REASON_STOP)

        # The engine itself, asked again with the same seed, samples the same tokens with the same log-probs.
        prompt = engine.render_chat([{"role": "user", "content": question}])
        assert list(event.prompt_token_ids) == prompt.token_ids and event.rendered_prompt == prompt.text
        sampling = Sampling(max_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=index, stop=(), min_tokens=0)

        async def again(prompt, sampling):
            tokens, logprobs = [], []
            async for delta in engine.stream(f"again-{uuid.uuid4().hex}", prompt, sampling):
                tokens += delta.token_ids
                logprobs += delta.behavior_logprobs
            return tokens, logprobs

        tokens, logprobs = engine_loop.run(again(prompt, sampling))
        assert list(event.response_token_ids) == tokens
        assert list(event.behavior_logprobs) == pytest.approx(logprobs, abs=1e-5)
        assert all(logprob <= 0 for logprob in logprobs)


def test_feedback_round_trip_and_every_refusal_has_its_code(logged_server):
    server, stub, kafka = logged_server
    answer = ask(stub, "What is 12+34?", max_tokens=8, temperature=0)
    other = ask(stub, "What is 40+2?", max_tokens=8, temperature=0)
    rated = pb.RatedResponse(response_id=answer.response_id, feedback_token=answer.feedback_token)
    rated_other = pb.RatedResponse(response_id=other.response_id, feedback_token=other.feedback_token)

    def submit(**fields) -> pb.SubmitFeedbackResponse:
        return stub.SubmitFeedback(pb.SubmitFeedbackRequest(**{"response": rated, "user_id": "alice", **fields}))

    def refused(**fields) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as error:
            submit(**fields)
        return error.value.code(), error.value.details()

    first = submit(rating=pb.RATING_UP, comment="right")
    assert first.event_id and not first.replaced_previous
    again = submit(rating=pb.RATING_UP, comment="right")
    assert not again.replaced_previous
    changed = submit(rating=pb.RATING_DOWN)
    assert changed.replaced_previous
    preference = submit(preferred_over=rated_other)

    forged = issue_feedback_token(
        b"not-the-secret", FeedbackClaims(answer.response_id, 0, "alice", int(time.time()) + 60)
    )
    expired = issue_feedback_token(
        TOKEN_SECRET.encode(), FeedbackClaims(answer.response_id, 0, "alice", int(time.time()) - 1)
    )
    code, message = refused(
        response=pb.RatedResponse(response_id=answer.response_id, feedback_token=forged), rating=pb.RATING_UP
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "signature" in message
    code, message = refused(
        response=pb.RatedResponse(response_id=answer.response_id, feedback_token=expired), rating=pb.RATING_UP
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "expired" in message
    code, message = refused(
        response=pb.RatedResponse(response_id="resp-never-issued", feedback_token=answer.feedback_token),
        rating=pb.RATING_UP,
    )
    assert code == grpc.StatusCode.NOT_FOUND and "resp-never-issued" in message
    assert refused(user_id="mallory", rating=pb.RATING_UP)[0] == grpc.StatusCode.PERMISSION_DENIED
    code, message = refused(rating=pb.RATING_UP, comment="x" * 21)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("comment")
    forged_other = pb.RatedResponse(response_id=other.response_id, feedback_token=forged)
    assert refused(preferred_over=forged_other)[0] == grpc.StatusCode.PERMISSION_DENIED

    # alice has spent her burst of 4 votes, all accepted (refusals before the rate check spend none).
    code, message = refused(response=rated_other, rating=pb.RATING_UP)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per minute" in message

    accepted = {first.event_id, again.event_id, changed.event_id, preference.event_id}
    logged = consume(kafka, kafka.topics.feedback, len(accepted))
    assert sorted(event.event_id for event in logged) == sorted(accepted), "each accepted vote once, nothing refused"
    by_id = {event.event_id: event.event for event in logged}
    assert by_id[first.event_id].rating == pb.RATING_UP and by_id[first.event_id].comment == "right"
    assert by_id[changed.event_id].rating == pb.RATING_DOWN
    assert by_id[preference.event_id].preferred_over_response_id == other.response_id
    assert all(event.event.response_id == answer.response_id for event in logged)

    scrape = server.registry
    assert scrape.get_sample_value("flywheel_feedback_total", {"rating": "down", "policy_version": "0"}) == 1
    assert scrape.get_sample_value("flywheel_feedback_rejected_total", {"reason": "forbidden"}) == 4
