"""The client's pure parts: back-off, which refusals are retried, errors carrying status and field, requests.

The client against a real server is tests/test_client_and_http_door.py.
"""

import ast
import asyncio
import random
from concurrent import futures

import grpc
import pytest

from flywheel import client
from flywheel.client import (
    USER_HEADER,
    AsyncFlywheel,
    DeadlineExceeded,
    Flywheel,
    FlywheelError,
    InvalidArgument,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    _Attempts,
    backoff_seconds,
    error_for,
    generate_request,
)
from flywheel.errors import field_of
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from tests.test_layering import REPO_ROOT


def test_backoff_is_full_jitter_under_an_exponential_cap():
    policy = RetryPolicy(initial_backoff_seconds=0.1, multiplier=2.0, max_backoff_seconds=1.0)
    # caps: 0.1, 0.2, 0.4, 0.8, then 1.6 capped at 1.0
    assert [backoff_seconds(retry, policy, draw=0.5) for retry in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5])
    assert backoff_seconds(3, policy, draw=0.0) == 0.0
    assert backoff_seconds(30, policy, draw=0.999) == pytest.approx(0.999)


def test_only_unavailable_and_resource_exhausted_are_retried():
    for code in grpc.StatusCode:
        attempts = _Attempts(RetryPolicy(attempts=3), timeout=None, rng=random.Random(0))
        error = error_for(code, "x")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            assert 0 <= attempts.wait_before_retry(error) < 0.1
        else:
            with pytest.raises(FlywheelError) as raised:
                attempts.wait_before_retry(error)
            assert raised.value is error


def test_retries_stop_after_the_attempts():
    attempts = _Attempts(RetryPolicy(attempts=3), timeout=None, rng=random.Random(0))
    refused = Unavailable("down")
    attempts.wait_before_retry(refused)  # after the 1st attempt
    attempts.wait_before_retry(refused)  # after the 2nd
    with pytest.raises(Unavailable):
        attempts.wait_before_retry(refused)  # the 3rd was the last


def test_a_retry_that_would_wait_past_the_deadline_raises_the_refusal():
    attempts = _Attempts(
        RetryPolicy(attempts=10, initial_backoff_seconds=100, max_backoff_seconds=100), timeout=5, rng=random.Random(0)
    )
    with pytest.raises(Unavailable):
        # draws of Random(0) are well above 5/100 of the 100 s cap
        attempts.wait_before_retry(Unavailable("down"))


def test_a_spent_deadline_is_deadline_exceeded():
    with pytest.raises(DeadlineExceeded):
        _Attempts(RetryPolicy(), timeout=0, rng=random.Random(0)).time_left()


def test_errors_carry_their_status_and_the_field_the_server_named():
    error = error_for(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: is 5000; allowed is 1 to 1024")
    assert isinstance(error, InvalidArgument)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "sampling.max_tokens"
    auth = error_for(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (x-api-key or ...)")
    assert isinstance(auth, Unauthenticated) and auth.field is None
    rare = error_for(grpc.StatusCode.ABORTED, "aborted")
    assert type(rare) is FlywheelError and rare.code == grpc.StatusCode.ABORTED


def test_field_of_reads_only_a_leading_field_path():
    assert field_of("chat.messages[3].content: is 20 characters") == "chat.messages[3].content"
    assert (
        field_of("tags['a b']: is 3 tags") is None
    )  # a name with a space is shown quoted; no field is better than half
    assert field_of("response.feedback_token: signature does not match") == "response.feedback_token"
    assert field_of("server is at capacity: 3 running") is None
    assert field_of("principal acme sends feedback faster than 6000 per minute") is None


def test_a_prompt_or_messages_become_the_request_the_contract_states():
    request = generate_request("2+2=", user_id="alice", max_tokens=3, stop="\n", temperature=None)
    assert request.WhichOneof("input") == "prompt" and request.prompt == "2+2="
    assert request.sampling.max_tokens == 3 and list(request.sampling.stop) == ["\n"]
    assert not request.sampling.HasField("temperature")  # None means the server's default
    chat = generate_request([{"role": "user", "content": "hi"}], user_id="bob", tags={"app": "demo"})
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "hi")] and chat.tags == {"app": "demo"}
    assert generate_request([], user_id="").WhichOneof("input") == "chat"  # the server says what is wrong
    with pytest.raises(TypeError, match="max_token"):
        generate_request("x", user_id="", max_token=3)


def test_the_client_imports_only_grpc_the_stubs_and_the_standard_library():
    """An application imports flywheel.client without the server's dependencies (vLLM, torch, Kafka)."""
    tree = ast.parse((REPO_ROOT / "flywheel" / "client.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    third_party = {name for name in imported if name.split(".")[0] not in __import__("sys").stdlib_module_names}
    assert third_party == {"grpc", "flywheel.errors", "flywheel.v1"}, third_party
    assert {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED} == client.RETRYABLE_CODES


class MetadataRecorder(serving_pb2_grpc.FlywheelServicer):
    """Answers every call with an empty message and keeps the metadata each arrived with: what a balancer sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    def _record(self, rpc: str, context) -> None:
        self.seen.append((rpc, dict(context.invocation_metadata())))

    def Generate(self, request, context):
        self._record("Generate", context)
        return serving_pb2.GenerateResponse(response_id="r", feedback_token="t")

    def GenerateStream(self, request, context):
        self._record("GenerateStream", context)
        yield serving_pb2.GenerateStreamResponse(text_delta="hi")
        yield serving_pb2.GenerateStreamResponse(summary=serving_pb2.GenerateResponse(response_id="s"))

    def GetPolicy(self, request, context):
        self._record("GetPolicy", context)
        return serving_pb2.PolicyInfo(policy_version=1)

    def SubmitFeedback(self, request, context):
        self._record("SubmitFeedback", context)
        return serving_pb2.SubmitFeedbackResponse(event_id="e")


def test_calls_for_a_user_name_it_in_the_x_flywheel_user_header_for_the_load_balancer():
    recorder = MetadataRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    serving_pb2_grpc.add_FlywheelServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Flywheel(f"127.0.0.1:{port}", api_key="k", user_id="alice") as flywheel:
            flywheel.generate("2+2=").thumbs_up()
            list(flywheel.stream("2+2=", user_id="bob"))
            flywheel.generate("2+2=", user_id="")
            flywheel.policy()

        async def asynchronously() -> None:
            async with AsyncFlywheel(f"127.0.0.1:{port}", user_id="carol") as flywheel:
                await flywheel.generate("2+2=")

        asyncio.run(asynchronously())
    finally:
        server.stop(0)
    users = [(rpc, metadata.get(USER_HEADER)) for rpc, metadata in recorder.seen]
    assert users == [
        ("Generate", "alice"), ("SubmitFeedback", "alice"), ("GenerateStream", "bob"),
        ("Generate", None), ("GetPolicy", None),  # no user: no header, any replica
        ("Generate", "carol"),
    ]  # fmt: skip
    assert all(metadata["authorization"] == "Bearer k" for _, metadata in recorder.seen[:5])
