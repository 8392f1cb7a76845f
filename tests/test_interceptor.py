"""The interceptor's promises, over real gRPC: a server fault answers INTERNAL (never UNKNOWN, never
an exception's name), and each RPC runs as the principal its API key belongs to.

The servicer here is a stand-in whose handlers fail on purpose: no real handler can be made to
raise an unexpected error on demand.
"""

import asyncio

from grpc import aio
from prometheus_client import CollectorRegistry

from feedback.identity import DEFAULT_PRINCIPAL, key_digest
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.interceptors import FlywheelInterceptor, principal_var
from server.metrics import ServingMetrics


class FaultyService(serving_pb2_grpc.FlywheelServicer):
    async def GetPolicy(self, request, context):
        raise RuntimeError("secret internals: /etc/passwd")

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text_delta=principal_var.get())
        raise KeyError("half-way")


async def call_through(principals_by_digest: dict[str, str], metadata=()) -> list[tuple[str, str, str]]:
    metrics = ServingMetrics(CollectorRegistry())
    server = aio.server(interceptors=[FlywheelInterceptor(metrics, principals_by_digest)])
    serving_pb2_grpc.add_FlywheelServicer_to_server(FaultyService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = []
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_pb2_grpc.FlywheelStub(channel)
            try:
                await stub.GetPolicy(pb.GetPolicyRequest(), metadata=metadata)
            except aio.AioRpcError as error:
                outcomes.append(("GetPolicy", error.code().name, error.details()))
            deltas = []
            try:
                async for message in stub.GenerateStream(pb.GenerateRequest(), metadata=metadata):
                    deltas.append(message.text_delta)
            except aio.AioRpcError as error:
                outcomes.append(("GenerateStream", error.code().name, error.details(), *deltas))
    finally:
        await server.stop(0)
    return outcomes


def test_a_server_fault_answers_internal_without_its_internals():
    outcomes = asyncio.run(call_through({}))
    assert [outcome[:2] for outcome in outcomes] == [("GetPolicy", "INTERNAL"), ("GenerateStream", "INTERNAL")]
    for outcome in outcomes:
        assert "RuntimeError" not in outcome[2] and "passwd" not in outcome[2] and "KeyError" not in outcome[2]
    assert outcomes[1][3] == DEFAULT_PRINCIPAL, "without keys, every call is the default principal"


def test_each_call_runs_as_the_principal_of_its_key():
    outcomes = asyncio.run(call_through({key_digest("acme-key"): "acme"}, (("x-api-key", "acme-key"),)))
    assert outcomes[1][3] == "acme"
    refused = asyncio.run(call_through({key_digest("acme-key"): "acme"}, (("x-api-key", "other"),)))
    assert [outcome[1] for outcome in refused] == ["UNAUTHENTICATED", "UNAUTHENTICATED"]


def test_a_message_that_does_not_parse_is_an_invalid_argument_not_a_parser_exception():
    async def send_raw(payloads: list[bytes]) -> list[tuple[str, str]]:
        metrics = ServingMetrics(CollectorRegistry())
        server = aio.server(interceptors=[FlywheelInterceptor(metrics, {})])
        serving_pb2_grpc.add_FlywheelServicer_to_server(FaultyService(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes = []
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                raw = channel.unary_stream(
                    "/flywheel.v1.Flywheel/GenerateStream", request_serializer=None, response_deserializer=None
                )
                for payload in payloads:
                    try:
                        async for _ in raw(payload):
                            pass
                    except aio.AioRpcError as error:
                        outcomes.append((error.code().name, error.details()))
        finally:
            await server.stop(0)
        return outcomes

    bad_utf8, truncated, tag_zero = b"\x0a\x03\xff\xfe\x48", b"\x0a\x05ab", b"\x00\x00"
    for code, message in asyncio.run(send_raw([bad_utf8, truncated, tag_zero])):
        assert code == "INVALID_ARGUMENT" and message.startswith("request:"), message
        assert "DecodeError" not in message and "class" not in message
