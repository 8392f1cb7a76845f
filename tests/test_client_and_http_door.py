"""Both doors against the real server: `flywheel.client` over gRPC, the official `openai` package over HTTP.

One server on the shared engine, with two tenants' keys and the real broker, serves both doors; a
request through either is validated, admitted, logged and learnt from the same way, which the last
tests check on Kafka and in the trainer's join store. The retry tests start servers of their own:
one that is not up yet, one at capacity.
"""

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry

from feedback.broker import free_port
from feedback.config import SpoolSettings
from feedback.identity import ApiKey, key_digest
from feedback.intake import IntakeLimits
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.client import (
    AsyncFlywheel,
    DeadlineExceeded,
    Flywheel,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.app import FlywheelServer
from server.config import ServerSettings
from server.validation import RequestLimits
from tests.kafka_fixtures import HANG_GUARD_S, with_own_topics
from tests.test_abuse import consume_until
from tests.test_layering import REPO_ROOT
from tests.test_server_tls import Authority, write_server_files
from trainer.join_store import JoinStore

pytestmark = pytest.mark.engine  # it imports server.app, so vLLM: the fast tier does not import this module

SECRET = "client-test-secret"
ACME_KEY, MALLORY_KEY = "acme-key", "mallory-key"
QUESTION = [{"role": "user", "content": "What is 1+1?"}]
LIMITS = RequestLimits(max_tokens_limit=64, max_request_bytes=16 * 1024)
FAST_RETRIES = RetryPolicy(attempts=100, initial_backoff_seconds=0.05, max_backoff_seconds=0.5)


@pytest.fixture(scope="module")
def doors(engine_loop, engine, kafka_broker, tmp_path_factory):
    """A server with both doors, two tenants' keys, logging to Kafka; yields (server, kafka settings)."""
    kafka = with_own_topics(kafka_broker.kafka, "doors")
    producer = EventProducer(
        kafka, SpoolSettings(directory=tmp_path_factory.mktemp("spool")), EventMetrics.register(CollectorRegistry())
    )
    engine_loop.run(producer.start())
    settings = ServerSettings(
        port=0,
        metrics_port=0,
        http_port=0,
        feedback_token_secret=SECRET,
        limits=LIMITS,
        api_keys=[
            ApiKey(principal="acme", sha256=key_digest(ACME_KEY)),
            ApiKey(principal="mallory", sha256=key_digest(MALLORY_KEY)),
        ],
        feedback=IntakeLimits(vote_burst=3, votes_per_minute=1),
        grace_period_seconds=5,
    )
    server = engine_loop.run(FlywheelServer.start(settings, engine, events=producer, topics=kafka.topics))
    yield server, kafka
    engine_loop.run(server.stop(0))
    engine_loop.run(producer.stop())


@pytest.fixture
def acme(doors):
    with Flywheel(doors[0].address, api_key=ACME_KEY, user_id="alice", retry=RetryPolicy(attempts=1)) as client:
        yield client


def sdk(server: FlywheelServer, api_key: str = ACME_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key=api_key, max_retries=0, timeout=HANG_GUARD_S)


def requests_counted(server: FlywheelServer, rpc: str, code: str) -> float:
    return server.registry.get_sample_value("flywheel_grpc_requests_total", {"rpc": rpc, "code": code}) or 0.0


# --- the client over gRPC ------------------------------------------------------------------------------------


def test_the_client_generates_streams_and_gives_feedback(acme):
    answer = acme.generate(QUESTION, max_tokens=4, temperature=0, client_request_id="c-1", tags={"app": "test"})
    assert answer.text and answer.response_id.startswith("resp-") and answer.feedback_token
    assert (answer.policy_version, answer.completion_tokens, answer.client_request_id) == (0, 4, "c-1")
    assert answer.finish_reason == "length" and answer.timings.total_seconds >= answer.timings.queue_seconds >= 0

    stream = acme.stream(QUESTION, max_tokens=4, temperature=0)
    texts = list(stream)
    assert "".join(texts) == stream.answer.text == answer.text  # greedy: the same answer through either RPC
    assert stream.answer.response_id != answer.response_id

    assert answer.thumbs_up("good").event_id
    assert answer.thumbs_down().replaced_previous  # the same user changing their vote
    assert acme.prefer(stream.answer, over=answer).event_id
    assert acme.policy().version == 0


def test_the_async_client_does_the_same(doors):
    async def session():
        async with AsyncFlywheel(doors[0].address, api_key=ACME_KEY, user_id="amy") as client:
            answer = await client.generate("2+2=", max_tokens=3)
            stream = client.stream("2+2=", max_tokens=3)
            texts = [text async for text in stream]
            receipt = await stream.answer.thumbs_up()
            preference = await client.prefer(answer, over=stream.answer)
            return answer, texts, stream.answer, receipt, preference, await client.policy()

    answer, texts, streamed, receipt, preference, policy = asyncio.run(session())
    assert answer.completion_tokens == 3 and "".join(texts) == streamed.text
    assert receipt.event_id and preference.event_id and policy.version == 0


def test_each_refusal_is_its_exception_with_status_and_field(doors, acme):
    server, _ = doors
    with pytest.raises(InvalidArgument) as invalid:
        acme.generate("hi", max_tokens=1000)
    assert invalid.value.field == "sampling.max_tokens" and invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT

    with Flywheel(server.address, api_key="guess", user_id="alice") as stranger, pytest.raises(Unauthenticated):
        stranger.generate("hi", max_tokens=1)

    answer = acme.generate("hi", max_tokens=1)
    with (
        Flywheel(server.address, api_key=MALLORY_KEY, user_id="alice") as mallory,
        pytest.raises(PermissionDenied) as denied,
    ):
        mallory._submit(pb.SubmitFeedbackRequest(response=answer.rated(), user_id="alice", rating=pb.RATING_UP))
    assert denied.value.field == "response.feedback_token"

    other = acme.generate("hi", max_tokens=1)
    with pytest.raises(NotFound) as not_found:
        acme._submit(
            pb.SubmitFeedbackRequest(
                response=pb.RatedResponse(response_id=other.response_id, feedback_token=answer.feedback_token),
                user_id="alice",
                rating=pb.RATING_UP,
            )
        )
    assert not_found.value.field == "response.response_id"

    flooder = Flywheel(server.address, api_key=ACME_KEY, user_id="flooder", retry=RetryPolicy(attempts=2))
    flooded = flooder.generate("hi", max_tokens=1)
    for _ in range(3):  # the burst
        flooded.thumbs_up()
    with pytest.raises(ResourceExhausted) as exhausted:  # both attempts refused: one vote a minute after the burst
        flooded.thumbs_up()
    assert exhausted.value.field == "user_id" and exhausted.value.retryable
    flooder.close()

    with pytest.raises(DeadlineExceeded):
        acme.generate("hi", max_tokens=64, min_tokens=64, timeout=0.001)

    nobody = f"127.0.0.1:{free_port('127.0.0.1')}"
    with Flywheel(nobody, retry=RetryPolicy(attempts=2)) as lost, pytest.raises(Unavailable):
        lost.generate("hi")


def test_the_client_retries_until_a_server_that_is_not_up_yet_answers(engine_loop, engine, caplog):
    port = free_port("127.0.0.1")
    settings = ServerSettings(port=port, metrics_port=0, log_generations=False)
    client = Flywheel(f"127.0.0.1:{port}", retry=FAST_RETRIES, timeout=HANG_GUARD_S)
    answers, refused = [], threading.Event()

    class Refusals(logging.Handler):
        def emit(self, record):
            if "UNAVAILABLE" in record.getMessage():
                refused.set()

    handler = Refusals()
    logging.getLogger("flywheel.client").addHandler(handler)
    logging.getLogger("flywheel.client").setLevel(logging.INFO)
    asking = threading.Thread(target=lambda: answers.append(client.generate("hi", max_tokens=2)))
    asking.start()
    try:
        assert refused.wait(HANG_GUARD_S), "the client was never refused"
        server = engine_loop.run(FlywheelServer.start(settings, engine, policy_digest="test"))
        asking.join(HANG_GUARD_S)
        assert answers and answers[0].completion_tokens == 2
        engine_loop.run(server.stop(0))
    finally:
        logging.getLogger("flywheel.client").removeHandler(handler)
        client.close()


def test_the_client_retries_until_a_server_at_capacity_has_room(engine_loop, engine):
    """One engine slot and no queue: a long answer holds it, the client is refused, the slot frees, the client is answered."""
    settings = ServerSettings(port=0, metrics_port=0, http_port=0, max_in_flight=1, max_queued=0, log_generations=False)
    server = engine_loop.run(FlywheelServer.start(settings, engine, policy_digest="test"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            holder = serving_pb2_grpc.FlywheelStub(channel).GenerateStream(
                pb.GenerateRequest(prompt="Count:", sampling=pb.SamplingParams(max_tokens=200, min_tokens=200)),
                timeout=HANG_GUARD_S,
            )
            next(holder)  # generating: the slot is held
            client = Flywheel(server.address, retry=FAST_RETRIES, timeout=HANG_GUARD_S)
            answers = []
            asking = threading.Thread(target=lambda: answers.append(client.generate("hi", max_tokens=2)))
            asking.start()
            deadline = time.monotonic() + HANG_GUARD_S
            while not requests_counted(server, "Generate", "RESOURCE_EXHAUSTED"):
                assert time.monotonic() < deadline, "the client was never refused"
                time.sleep(0.01)
            with sdk(server) as http, pytest.raises(openai.RateLimitError) as http_refused:
                http.chat.completions.create(model="flywheel", messages=QUESTION, max_tokens=1)
            assert http_refused.value.status_code == 429 and http_refused.value.type == "rate_limit_error"
            holder.cancel()
            asking.join(HANG_GUARD_S)
            assert answers and answers[0].completion_tokens == 2
            client.close()
        with sdk(server) as http:  # a streaming client that leaves frees its slot: the door aborts the answer
            stream = http.chat.completions.create(
                model="flywheel", messages=QUESTION, max_tokens=200, extra_body={"min_tokens": 200}, stream=True
            )
            next(iter(stream))
            stream.close()
            deadline = time.monotonic() + HANG_GUARD_S
            while not requests_counted(server, "GenerateStream", "CANCELLED"):
                assert time.monotonic() < deadline, "the door never noticed the client leave"
                time.sleep(0.01)
            while server.admission.in_flight:  # freed (whether by the abort or the answer's end is not pinned here)
                assert time.monotonic() < deadline, "the slot was never freed"
                time.sleep(0.01)
        with sdk(server) as http, pytest.raises(openai.InternalServerError) as unavailable:  # it logs no events
            http.post("/feedback", cast_to=object, body={"response_id": "r", "feedback_token": "t", "rating": "up"})
        assert unavailable.value.status_code == 503 and unavailable.value.type == "service_unavailable"
    finally:
        engine_loop.run(server.stop(0))


# --- the official openai package over HTTP -------------------------------------------------------------------


def test_openai_chat_completion_carries_flywheels_fields_in_body_and_headers(doors):
    with sdk(doors[0]) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="flywheel", messages=QUESTION, max_tokens=4, temperature=0, user="carol"
        )
        completion = raw.parse()
        assert completion.choices[0].message.content and completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 4 and completion.id == completion.response_id
        assert completion.policy_version == 0 and completion.feedback_token
        assert raw.headers["x-flywheel-response-id"] == completion.response_id
        assert raw.headers["x-flywheel-policy-version"] == "0"
        assert raw.headers["x-flywheel-feedback-token"] == completion.feedback_token

        with Flywheel(doors[0].address, api_key=ACME_KEY, user_id="carol") as grpc_client:
            assert (
                grpc_client.generate(QUESTION, max_tokens=4, temperature=0).text
                == completion.choices[0].message.content
            )

        models = client.models.list()
        assert [model.id for model in models.data] == ["flywheel"] and models.data[0].policy_version == 0


def test_openai_streaming(doors):
    with sdk(doors[0]) as client:
        whole = client.chat.completions.create(model="flywheel", messages=QUESTION, max_tokens=4, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model="flywheel",
                messages=QUESTION,
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
        assert text == whole.choices[0].message.content
        finished = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
        assert len(finished) == 1 and finished[0].choices[0].finish_reason == "length"
        assert finished[0].feedback_token and finished[0].policy_version == 0
        assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices


def test_openai_errors_have_openais_shapes_and_http_codes(doors):
    server, _ = doors
    refused_before = requests_counted(server, "Generate", "INVALID_ARGUMENT")
    with sdk(server) as client:
        create = client.chat.completions.create
        with pytest.raises(openai.BadRequestError) as too_many:
            create(model="flywheel", messages=QUESTION, max_tokens=1000)
        assert (too_many.value.param, too_many.value.type) == ("max_tokens", "invalid_request_error")
        assert too_many.value.body["message"].startswith("max_tokens: is 1000")

        with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts: an HTTP error
            create(model="flywheel", messages=QUESTION, max_tokens=1000, stream=True)
        assert streamed.value.param == "max_tokens"

        with pytest.raises(openai.BadRequestError) as role:
            create(model="flywheel", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
        assert role.value.param == "messages[0].tool_call_id"  # a field this door does not take

        with pytest.raises(openai.BadRequestError) as unknown_role:
            create(model="flywheel", messages=[{"role": "robot", "content": "x"}])
        assert unknown_role.value.param == "messages[0].role"

        with pytest.raises(openai.BadRequestError) as unsupported:
            create(model="flywheel", messages=QUESTION, logit_bias={"1": 5})
        assert unsupported.value.param == "logit_bias"

        with pytest.raises(openai.NotFoundError) as model:
            create(model="gpt-4o", messages=QUESTION)
        assert model.value.param == "model"

        with pytest.raises(openai.APIStatusError) as too_large:
            create(model="flywheel", messages=[{"role": "user", "content": "x" * 20_000}])
        assert too_large.value.status_code == 413

        with sdk(server, api_key="guess") as stranger, pytest.raises(openai.AuthenticationError) as unknown_key:
            stranger.chat.completions.create(model="flywheel", messages=QUESTION, max_tokens=1)
        assert unknown_key.value.status_code == 401 and unknown_key.value.type == "authentication_error"

        completion = create(model="flywheel", messages=QUESTION, max_tokens=1, user="erin")
        vote = {"response_id": completion.response_id, "feedback_token": completion.feedback_token, "user": "erin"}
        with sdk(server, api_key=MALLORY_KEY) as mallory, pytest.raises(openai.PermissionDeniedError) as denied:
            mallory.post("/feedback", cast_to=object, body={**vote, "rating": "up"})
        assert denied.value.param == "feedback_token"
        with pytest.raises(openai.BadRequestError) as no_rating:
            client.post("/feedback", cast_to=object, body=vote)
        assert no_rating.value.param == "rating"

        unknown_path = httpx.get(server.http_url + "/nothing", headers={"Authorization": f"Bearer {ACME_KEY}"})
        assert unknown_path.status_code == 404 and unknown_path.json()["error"]["type"] == "not_found_error"
    # counted as the gRPC door's refusals are: the request too large never reached the service
    assert requests_counted(server, "Generate", "INVALID_ARGUMENT") >= refused_before + 5


# --- one way in for the trainer ------------------------------------------------------------------------------


def test_feedback_over_http_reaches_the_trainer_as_grpc_feedback_does(doors, tmp_path):
    server, kafka = doors
    with sdk(server) as http, Flywheel(server.address, api_key=ACME_KEY, user_id="dora") as client:
        over_http = http.chat.completions.create(model="flywheel", messages=QUESTION, max_tokens=3, user="dora")
        streamed = [
            chunk
            for chunk in http.chat.completions.create(
                model="flywheel", messages=QUESTION, max_tokens=3, user="dora", stream=True
            )
            if chunk.choices and chunk.choices[0].finish_reason
        ][0]
        over_grpc = client.generate(QUESTION, max_tokens=3)
        http.post(
            "/feedback",
            cast_to=object,
            body={"response_id": over_http.response_id, "feedback_token": over_http.feedback_token, "user": "dora", "rating": "up"},
        )  # fmt: skip
        http.post(
            "/feedback",
            cast_to=object,
            body={"response_id": streamed.response_id, "feedback_token": streamed.feedback_token, "user": "dora",
                  "preferred_over": {"response_id": over_grpc.response_id, "feedback_token": over_grpc.feedback_token}},
        )  # fmt: skip
        over_grpc.thumbs_down()

    answered = {over_http.response_id, streamed.response_id, over_grpc.response_id}
    generations, feedback = {}, []

    def a_generation(event):
        if event.response_id in answered:
            generations[event.response_id] = event
        return len(generations) == len(answered)

    def a_vote(event):
        if event.response_id in answered:
            feedback.append(event)
        return len(feedback) == 3

    consume_until(kafka, kafka.topics.generations, a_generation)
    consume_until(kafka, kafka.topics.feedback, a_vote)
    http_logged = generations[over_http.response_id]
    assert (http_logged.principal, http_logged.user_id, http_logged.policy_version) == ("acme", "dora", 0)
    assert [m.content for m in http_logged.chat.messages] == ["What is 1+1?"] and http_logged.response_token_ids

    store = JoinStore(tmp_path / "join.sqlite", ttl_seconds=3600)
    for event in generations.values():
        store.add_generation(event)
    for event in feedback:
        store.add_feedback(event)
    thumbs = {example.answer.response_id: example.thumbs_up for example in store.labelled_examples()}
    assert thumbs == {over_http.response_id: True, over_grpc.response_id: False}
    pairs = {(pair.chosen.response_id, pair.rejected.response_id) for pair in store.preference_pairs()}
    assert (streamed.response_id, over_grpc.response_id) in pairs
    assert (over_http.response_id, over_grpc.response_id) in pairs  # up over down, across the doors
    store.close()


# --- the examples run ----------------------------------------------------------------------------------------


def run_example(name: str, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.subprocess
def test_the_openai_sdk_example_runs_against_the_door(doors):
    output = run_example("openai_sdk.py", "--base-url", doors[0].http_url, "--api-key", ACME_KEY)
    assert "thumbs up: feedback" in output and "preference: feedback" in output, output


@pytest.mark.subprocess
def test_the_chat_loop_example_streams_and_takes_thumbs(doors):
    output = run_example(
        "chat_loop.py", "--target", doors[0].address, "--api-key", ACME_KEY, "--user", "chatter", "--max-tokens", "3",
        stdin="What is 1+1?\n+\nAnd 2+2?\n-\n/quit\n",
    )  # fmt: skip
    assert output.count("feedback") == 2 and "policy v0" in output, output


# --- TLS on both doors ---------------------------------------------------------------------------------------


def test_both_doors_speak_mutual_tls_with_the_grpc_ports_certificates(engine_loop, engine, tmp_path):
    authority = Authority("flywheel-test-ca")
    cert_file, key_file = write_server_files(tmp_path, authority)
    (tmp_path / "clients.crt").write_bytes(authority.cert_pem)
    client_cert = authority.issue("an-app", ExtendedKeyUsageOID.CLIENT_AUTH)
    settings = ServerSettings(
        port=0, metrics_port=0, http_port=0, log_generations=False,
        tls_cert_file=cert_file, tls_key_file=key_file, tls_client_ca_file=tmp_path / "clients.crt",
    )  # fmt: skip
    server = engine_loop.run(FlywheelServer.start(settings, engine, policy_digest="test"))
    try:
        with Flywheel(
            server.address,
            root_certificates=authority.cert_pem,
            certificate_chain=client_cert.cert_pem,
            private_key=client_cert.key_pem,
            user_id="tls",
        ) as client:
            assert client.generate("hi", max_tokens=2).completion_tokens == 2
        anonymous = Flywheel(server.address, root_certificates=authority.cert_pem, retry=RetryPolicy(attempts=1))
        with anonymous, pytest.raises(Unavailable):  # no client certificate: the handshake fails
            anonymous.generate("hi", max_tokens=2)

        assert server.http_url.startswith("https://")
        (tmp_path / "app.crt").write_bytes(client_cert.cert_pem)
        (tmp_path / "app.key").write_bytes(client_cert.key_pem)
        trusted = ssl.create_default_context(cadata=authority.cert_pem.decode())
        trusted.load_cert_chain(tmp_path / "app.crt", tmp_path / "app.key")
        with openai.OpenAI(
            base_url=server.http_url, api_key="none", max_retries=0, http_client=httpx.Client(verify=trusted)
        ) as https:
            completion = https.chat.completions.create(model="flywheel", messages=QUESTION, max_tokens=2)
        assert completion.usage.completion_tokens == 2
        untrusted_client = ssl.create_default_context(cadata=authority.cert_pem.decode())
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(server.http_url + "/models", verify=untrusted_client)
    finally:
        engine_loop.run(server.stop(0))
