"""A hostile or careless client against the real server over gRPC, with API keys and the real broker.

Each case is a request and its documented status: auth, every bound, every sampling parameter at
and past its limit, every rating and token forgery. No case answers UNKNOWN, names a Python
exception, or sends a status message longer than any client takes; after the whole suite the
server still answers and its events still reach Kafka.
"""

import asyncio
import math
import time
import uuid

import grpc
import pytest
from prometheus_client import CollectorRegistry

from feedback.config import SpoolSettings
from feedback.consumer import EventConsumer
from feedback.identity import ApiKey, key_digest
from feedback.intake import IntakeLimits
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from feedback.tokens import FeedbackClaims, issue_feedback_token
from flywheel.errors import MAX_STATUS_MESSAGE_CHARS
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.app import FlywheelServer
from server.config import ServerSettings
from server.validation import RequestLimits
from tests.kafka_fixtures import with_own_topics
from tests.test_feedback_rpc import HANG_GUARD_S, consume

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

SECRET = "abuse-test-secret"
ACME_KEY, MALLORY_KEY = "acme-key", "mallory-key"
ACME = (("x-api-key", ACME_KEY),)
MALLORY = (("authorization", f"Bearer {MALLORY_KEY}"),)
LIMITS = RequestLimits(max_tokens_limit=64, max_message_chars=2000, max_chat_messages=4, max_request_chars=3000)
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def abused(engine_loop, engine, kafka_broker, tmp_path_factory):
    """A server with two tenants' keys, logging to Kafka; yields (stub, kafka settings, server)."""
    kafka = with_own_topics(kafka_broker.kafka, "abuse")
    producer = EventProducer(
        kafka, SpoolSettings(directory=tmp_path_factory.mktemp("spool")), EventMetrics.register(CollectorRegistry())
    )
    engine_loop.run(producer.start())
    settings = ServerSettings(
        port=0,
        metrics_port=0,
        feedback_token_secret=SECRET,
        limits=LIMITS,
        api_keys=[
            ApiKey(principal="acme", sha256=key_digest(ACME_KEY)),
            ApiKey(principal="mallory", sha256=key_digest(MALLORY_KEY)),
        ],
        feedback=IntakeLimits(max_comment_chars=100, vote_burst=100, votes_per_minute=1),
    )
    server = engine_loop.run(FlywheelServer.start(settings, engine, events=producer, topics=kafka.topics))
    with grpc.insecure_channel(server.address) as channel:
        yield serving_pb2_grpc.FlywheelStub(channel), kafka, server
    engine_loop.run(server.stop(0))
    engine_loop.run(producer.stop())


def consume_until(kafka, topic: str, wanted):
    """The first event on `topic` that `wanted(event)` accepts, read from the topic's start."""

    async def read():
        consumer = EventConsumer(kafka, uuid.uuid4().hex, EventMetrics.register(CollectorRegistry()), [topic])
        await consumer.start()
        deadline = time.monotonic() + HANG_GUARD_S
        try:
            while time.monotonic() < deadline:
                for consumed in (await consumer.poll(timeout_ms=200)).events:
                    if wanted(consumed.event):
                        return consumed.event
        finally:
            await consumer.stop()
        raise AssertionError(f"no such event reached {topic} in {HANG_GUARD_S} s")

    return asyncio.run(read())


def status_of(call, request, metadata=ACME) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, metadata=metadata, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def assert_contract(code: grpc.StatusCode, message: str) -> None:
    assert code != grpc.StatusCode.UNKNOWN, message
    assert len(message) <= MAX_STATUS_MESSAGE_CHARS and message.isascii()
    assert "Error" not in message and "Exception" not in message and "Traceback" not in message, message


def generate(prompt: str = "What is 1+1?", **fields) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", pb.SamplingParams(max_tokens=2))
    return pb.GenerateRequest(prompt=prompt, sampling=sampling, **fields)


def chat(*contents: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content) for content in contents])


def sampling(**values) -> pb.SamplingParams:
    return pb.SamplingParams(**{"max_tokens": 2, **values})


GENERATE_CASES = [
    # auth
    ("no key", generate(), (), grpc.StatusCode.UNAUTHENTICATED, ""),
    ("unknown key", generate(), (("x-api-key", "guess"),), grpc.StatusCode.UNAUTHENTICATED, ""),
    ("bearer key", generate(), MALLORY, OK, ""),
    # every bound, at and past it
    ("prompt at its limit", generate("1" * 300), ACME, OK, ""),
    ("prompt past its limit", generate("1" * 2001), ACME, INVALID, "prompt"),
    ("empty prompt", generate(" "), ACME, INVALID, "prompt"),
    ("no input", pb.GenerateRequest(), ACME, INVALID, "input"),
    (
        "chat message past its limit",
        pb.GenerateRequest(chat=chat("x" * 2001)),
        ACME,
        INVALID,
        "chat.messages[0].content",
    ),
    ("chat at its message count", pb.GenerateRequest(chat=chat(*["hi"] * 4), sampling=sampling()), ACME, OK, ""),
    ("chat longer than the context", pb.GenerateRequest(chat=chat("1+1=" * 500)), ACME, INVALID, "chat.messages"),
    ("chat past its message count", pb.GenerateRequest(chat=chat(*["hi"] * 5)), ACME, INVALID, "chat.messages"),
    ("chat past the request's text", pb.GenerateRequest(chat=chat(*["x" * 1000] * 4)), ACME, INVALID, "chat.messages"),
    (
        "unknown role",
        pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="root" * 500, content="hi")])),
        ACME,
        INVALID,
        "chat.messages[0].role",
    ),
    ("user_id at its limit", generate(user_id="u" * 128), ACME, OK, ""),
    ("user_id past its limit", generate(user_id="u" * 129), ACME, INVALID, "user_id"),
    ("user_id of 1.1 MB", generate(user_id="u" * 1_100_000), ACME, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ("client_request_id past its limit", generate(client_request_id="c" * 129), ACME, INVALID, "client_request_id"),
    ("tags at their count", generate(tags={f"t{n}": "v" for n in range(16)}), ACME, OK, ""),
    ("tags past their count", generate(tags={f"t{n}": "v" for n in range(17)}), ACME, INVALID, "tags"),
    ("tag name past its limit", generate(tags={"k" * 65: "v"}), ACME, INVALID, "tags["),
    ("tag value past its limit", generate(tags={"k": "v" * 257}), ACME, INVALID, "tags['k']"),
    ("tag value of 1.1 MB", generate(tags={"k": "v" * 1_100_000}), ACME, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    # every sampling parameter at and past its limit
    ("max_tokens at its limit", generate(sampling=sampling(max_tokens=64)), ACME, OK, ""),
    ("max_tokens past its limit", generate(sampling=sampling(max_tokens=65)), ACME, INVALID, "sampling.max_tokens"),
    ("max_tokens zero", generate(sampling=sampling(max_tokens=0)), ACME, INVALID, "sampling.max_tokens"),
    ("temperature at the engine's limit", generate(sampling=sampling(temperature=2.0)), ACME, OK, ""),
    (
        "temperature past the engine's limit",
        generate(sampling=sampling(temperature=2.5)),
        ACME,
        INVALID,
        "sampling.temperature",
    ),
    ("temperature infinite", generate(sampling=sampling(temperature=math.inf)), ACME, INVALID, "sampling.temperature"),
    ("temperature NaN", generate(sampling=sampling(temperature=math.nan)), ACME, INVALID, "sampling.temperature"),
    ("temperature negative", generate(sampling=sampling(temperature=-0.1)), ACME, INVALID, "sampling.temperature"),
    ("top_p at its limit", generate(sampling=sampling(top_p=1.0)), ACME, OK, ""),
    ("top_p past its limit", generate(sampling=sampling(top_p=1.01)), ACME, INVALID, "sampling.top_p"),
    ("top_p zero", generate(sampling=sampling(top_p=0.0)), ACME, INVALID, "sampling.top_p"),
    ("top_k huge", generate(sampling=sampling(top_k=2**31 - 1)), ACME, OK, ""),
    ("top_k negative", generate(sampling=sampling(top_k=-1)), ACME, INVALID, "sampling.top_k"),
    ("seed extremes", generate(sampling=sampling(seed=-(2**63))), ACME, OK, ""),
    ("seed largest", generate(sampling=sampling(seed=2**63 - 1)), ACME, OK, ""),
    ("min_tokens at max_tokens", generate(sampling=sampling(max_tokens=4, min_tokens=4)), ACME, OK, ""),
    (
        "min_tokens past max_tokens",
        generate(sampling=sampling(max_tokens=4, min_tokens=5)),
        ACME,
        INVALID,
        "sampling.min_tokens",
    ),
    (
        "min_tokens past the default max_tokens",
        generate(sampling=pb.SamplingParams(min_tokens=1000)),
        ACME,
        INVALID,
        "sampling.min_tokens",
    ),
    ("stop strings at their count", generate(sampling=sampling(stop=["a"] * 8)), ACME, OK, ""),
    ("stop strings past their count", generate(sampling=sampling(stop=["a"] * 9)), ACME, INVALID, "sampling.stop"),
    ("stop string past its limit", generate(sampling=sampling(stop=["s" * 65])), ACME, INVALID, "sampling.stop[0]"),
    ("empty stop string", generate(sampling=sampling(stop=[""])), ACME, INVALID, "sampling.stop[0]"),
]


@pytest.mark.parametrize(
    ("case", "request_message", "metadata", "code", "field"), GENERATE_CASES, ids=[case[0] for case in GENERATE_CASES]
)
def test_generate_refusals_have_their_documented_status(abused, case, request_message, metadata, code, field):
    stub, _, _ = abused
    got, message = status_of(stub.Generate, request_message, metadata)
    assert_contract(got, message)
    assert got == code, f"{case}: {message}"
    if field:
        assert message.startswith(f"{field}"), message


def test_feedback_forgeries_and_bounds_have_their_documented_status(abused):
    stub, kafka, _ = abused
    answer = stub.Generate(generate(user_id="ada"), metadata=ACME)
    mallorys = stub.Generate(generate(user_id="ada"), metadata=MALLORY)
    rated = pb.RatedResponse(response_id=answer.response_id, feedback_token=answer.feedback_token)
    now = int(time.time())

    def token(secret: str = SECRET, **claims) -> str:
        fields = {"response_id": answer.response_id, "policy_version": 0, "user_id": "ada", "expires_at": now + 60}
        return issue_feedback_token(secret.encode(), FeedbackClaims(**{**fields, "principal": "acme", **claims}))

    def vote(metadata=ACME, **fields) -> pb.SubmitFeedbackRequest:
        return pb.SubmitFeedbackRequest(**{"response": rated, "user_id": "ada", "rating": pb.RATING_UP, **fields})

    def with_token(feedback_token: str, response_id: str = answer.response_id) -> pb.RatedResponse:
        return pb.RatedResponse(response_id=response_id, feedback_token=feedback_token)

    cases = [
        ("rating outside the contract", vote(rating=7), ACME, INVALID, "rating"),
        ("no rating", vote(rating=pb.RATING_UNSPECIFIED), ACME, INVALID, "rating"),
        ("no user", vote(user_id=""), ACME, INVALID, "user_id"),
        ("user_id past its limit", vote(user_id="u" * 129), ACME, INVALID, "user_id"),
        ("comment past its limit", vote(comment="c" * 101), ACME, INVALID, "comment"),
        (
            "response_id past its limit",
            vote(response=with_token(answer.feedback_token, "r" * 65)),
            ACME,
            INVALID,
            "response.response_id",
        ),
        ("token past its limit", vote(response=with_token("t" * 1025)), ACME, INVALID, "response.feedback_token"),
        (
            "malformed token",
            vote(response=with_token("not-a-token")),
            ACME,
            grpc.StatusCode.PERMISSION_DENIED,
            "response.feedback_token",
        ),
        (
            "signed with another secret",
            vote(response=with_token(token("guessed"))),
            ACME,
            grpc.StatusCode.PERMISSION_DENIED,
            "response.feedback_token",
        ),
        (
            "expired token",
            vote(response=with_token(token(expires_at=now - 1))),
            ACME,
            grpc.StatusCode.PERMISSION_DENIED,
            "response.feedback_token",
        ),
        (
            "token of another response",
            vote(response=with_token(answer.feedback_token, mallorys.response_id)),
            ACME,
            grpc.StatusCode.NOT_FOUND,
            "response.response_id",
        ),
        (
            "token of another user",
            vote(user_id="bob"),
            ACME,
            grpc.StatusCode.PERMISSION_DENIED,
            "response.feedback_token",
        ),
        (
            "another principal's user of the same name",
            vote(),
            MALLORY,
            grpc.StatusCode.PERMISSION_DENIED,
            "response.feedback_token",
        ),
        ("preferred over itself", vote(preferred_over=rated), ACME, INVALID, "preferred_over.response_id"),
        (
            "preferred over a forged answer",
            vote(preferred_over=with_token(token("guessed"), mallorys.response_id)),
            ACME,
            grpc.StatusCode.PERMISSION_DENIED,
            "preferred_over.feedback_token",
        ),
        ("no key", vote(), (), grpc.StatusCode.UNAUTHENTICATED, ""),
        ("the real vote", vote(), ACME, OK, ""),
        ("the same vote again", vote(), ACME, OK, ""),
    ]
    for case, request_message, metadata, code, field in cases:
        got, message = status_of(stub.SubmitFeedback, request_message, metadata)
        assert_contract(got, message)
        assert got == code, f"{case}: {message}"
        assert message.startswith(field), f"{case}: {message}"

    logged = consume(kafka, kafka.topics.feedback, 2)
    assert len(logged) == 2, (
        "only the real vote and its repeat were published; refused ones, the bad rating too, were not"
    )
    assert {(event.event.principal, event.event.user_id) for event in logged} == {("acme", "ada")}


def test_after_the_abuse_the_server_answers_and_its_events_reach_kafka(abused):
    stub, kafka, server = abused
    exactly_two = pb.SamplingParams(max_tokens=2, min_tokens=2)
    answer = stub.Generate(
        generate("What is 2+2?", user_id="after", tags={"phase": "after"}, sampling=exactly_two), metadata=MALLORY
    )
    assert answer.completion_tokens == 2
    logged = consume_until(kafka, kafka.topics.generations, lambda event: event.response_id == answer.response_id)
    assert logged.principal == "mallory" and logged.tags["phase"] == "after"
    assert (
        server.registry.get_sample_value("flywheel_grpc_requests_total", {"rpc": "Generate", "code": "UNKNOWN"}) is None
    )
