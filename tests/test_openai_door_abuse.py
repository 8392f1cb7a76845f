"""The HTTP door against hostile and careless clients, over a real socket and the door's own aiohttp runner.

The service behind the door is a stand-in that answers at once: what is tested here is the door's alone
(reading, bounding and timing requests, connections), and the real servicer imports vLLM. The door against
the real server is tests/test_client_and_http_door.py.
"""

import asyncio
import contextlib
import json
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry

from feedback.identity import key_digest
from flywheel.v1 import serving_pb2 as pb
from server.metrics import ServingMetrics
from server.openai_api import OpenAIDoor

CHAT = b'{"model": "flywheel", "messages": [{"role": "user", "content": "hi"}]}'
GUARD_S = 10.0
"""Longest any exchange here may take before the test fails instead of hanging."""


class AnsweringService:
    """Answers every chat completion with the same short answer, and counts what it was asked."""

    def __init__(self):
        self.generated: list[pb.GenerateRequest] = []

    async def Generate(self, request, context):
        self.generated.append(request)
        return pb.GenerateResponse(response_id="resp-1", text="hello", policy_version=1, feedback_token="token")


class EndlessStreamService:
    """Streams long deltas for as long as it is read; says whether its stream was closed."""

    def __init__(self):
        self.stream_closed = asyncio.Event()

    async def GenerateStream(self, request, context):
        try:
            while True:
                yield pb.GenerateStreamResponse(text_delta="token " * 100)
                await asyncio.sleep(0)
        finally:
            self.stream_closed.set()


class RefusingService:
    """Refuses every chat completion as the servicer refuses a max_tokens out of bounds."""

    async def Generate(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: is 0; allowed is 1 to 1024")


@contextlib.asynccontextmanager
async def door_at(
    service,
    max_request_bytes: int = 1 << 20,
    client_timeout_seconds: float = GUARD_S,
    principals_by_digest: dict[str, str] | None = None,
) -> AsyncIterator[int]:
    """The door over `service` on a free local port, with its runner as the server builds it; yields the port."""
    from aiohttp import web

    door = OpenAIDoor(service, ServingMetrics(CollectorRegistry()), principals_by_digest or {})
    runner = door.runner(max_request_bytes, client_timeout_seconds=client_timeout_seconds, shutdown_timeout_seconds=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def post(path: str, body: bytes, **headers: str | bytes) -> bytes:
    """The request's bytes; a header given as bytes is sent as those bytes."""
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: door", f"Content-Length: {len(body)}".encode()]
    for name, value in headers.items():
        lines.append(name.replace("_", "-").encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def send(port: int, data: bytes) -> Connection:
    """A connection that has sent `data` and then sends nothing more; it stays open while the writer is held."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def answer_of(connection: Connection) -> bytes:
    """The door's answer on the connection, headers and body; b"" if it closed the connection unanswered."""
    reader, _ = connection
    try:
        async with asyncio.timeout(GUARD_S):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            return head + await reader.readexactly(length)
    except asyncio.IncompleteReadError as closed:
        return closed.partial


async def closed(connection: Connection) -> bool:
    """Whether the door closes the connection (within GUARD_S) with nothing more sent."""
    reader, writer = connection
    try:
        return await asyncio.wait_for(reader.read(), GUARD_S) == b""
    finally:
        writer.close()


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_client_slower_than_the_timeout_to_send_is_answered_or_let_go():
    async def scenario():
        async with door_at(AnsweringService(), client_timeout_seconds=0.5) as port:
            silent = await send(port, b"")
            half_headers = await send(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: door\r\n")
            half_body = await send(port, post("/v1/chat/completions", CHAT)[:-10])
            answered_then_idle = await send(port, post("/v1/chat/completions", CHAT))
            connections = (silent, half_headers, half_body, answered_then_idle)
            answers = await asyncio.gather(*(answer_of(connection) for connection in connections))
            return answers, await asyncio.gather(*(closed(connection) for connection in connections))

    (silent, half_headers, half_body, answered_then_idle), all_closed = asyncio.run(scenario())
    assert silent == b"" and half_headers == b"", "closed unanswered: there is no request to answer"
    status, refusal = status_and_json(half_body)
    assert status == 408 and refusal["error"]["code"] == "deadline_exceeded" and refusal["error"]["param"] is None
    assert "server.http_client_timeout_seconds" in refusal["error"]["message"]
    assert status_and_json(answered_then_idle)[0] == 200
    assert all(all_closed), "each connection is closed: unanswered, after its late body, or idle after its answer"


def gzip_bomb(json_prefix: bytes, zeros: int) -> bytes:
    """`json_prefix` and then `zeros` zero bytes, gzipped: about a thousandth of its unpacked size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits=31)
    block = bytes(1 << 20)
    return packer.compress(json_prefix) + b"".join(packer.compress(block) for _ in range(zeros >> 20)) + packer.flush()


def test_a_body_sent_as_anything_but_json_is_refused():
    """A web page may make its visitors' browsers POST a form or text/plain to any server without asking
    (no CORS preflight); on a server without API keys that would start generations. JSON it may not."""
    service = AnsweringService()

    async def scenario():
        async with door_at(service) as port:
            answers = {}
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
                answers[content_type] = await answer_of(
                    await send(port, post("/v1/chat/completions", CHAT, Content_Type=content_type))
                )
            answers["json"] = await answer_of(
                await send(port, post("/v1/chat/completions", CHAT, Content_Type="Application/JSON; charset=utf-8"))
            )
            answers["none"] = await answer_of(await send(port, post("/v1/chat/completions", CHAT)))
            return answers

    answers = asyncio.run(scenario())
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, refusal = status_and_json(answers[content_type])
        assert status == 415 and refusal["error"]["param"] == "content-type", content_type
    assert status_and_json(answers["json"])[0] == 200 and status_and_json(answers["none"])[0] == 200
    assert len(service.generated) == 2


def test_a_compressed_body_is_refused_unread():
    # 128 KiB on the wire, 128 MiB unpacked: aiohttp unpacked all of it, on the event loop every other client
    # shares, to drain it after the 413 (0.3 s of one stall and 0.5 s of CPU per MiB sent, measured).
    bomb = gzip_bomb(b'{"model": "flywheel", "messages": [{"role": "user", "content": "', zeros=128 << 20)
    service = AnsweringService()

    async def scenario():
        async with door_at(service) as port:
            compressed_chat = await send(
                port, post("/v1/chat/completions", zlib.compress(CHAT), Content_Encoding="deflate")
            )
            refused_chat = await answer_of(compressed_chat)
            cpu_before = time.process_time()
            bombed = await send(port, post("/v1/feedback", bomb, Content_Encoding="gzip"))
            refused_bomb = await answer_of(bombed)
            bombed[1].write(post("/v1/feedback", b"{"))  # answered once the bomb's rest is drained
            next_on_the_connection = await answer_of(bombed)
            return refused_chat, refused_bomb, time.process_time() - cpu_before, next_on_the_connection

    refused_chat, refused_bomb, cpu_seconds, next_on_the_connection = asyncio.run(scenario())
    for refused, encoding in ((refused_chat, "deflate"), (refused_bomb, "gzip")):
        status, refusal = status_and_json(refused)
        assert status == 415 and refusal["error"]["param"] == "content-encoding"
        assert refusal["error"]["message"].startswith(f"content-encoding: '{encoding}' is not accepted")
    assert not service.generated and status_and_json(next_on_the_connection)[0] == 400
    assert cpu_seconds < 0.1, f"the door spent {cpu_seconds:.2f} s of CPU on a body it refused"


def test_an_api_key_that_is_not_utf8_is_unknown():
    # aiohttp hands header bytes that are not UTF-8 on as surrogates, which hashing the key raised on: a 500.
    service = AnsweringService()

    async def scenario():
        async with door_at(service, principals_by_digest={key_digest("fw-good"): "acme"}) as port:
            keys = (b"Bearer fw-\xff", "Bearer fw-caf\u00e9".encode(), b"Bearer fw-good")
            return [
                await answer_of(await send(port, post("/v1/chat/completions", CHAT, Authorization=key))) for key in keys
            ]

    not_utf8, unknown_utf8, good = asyncio.run(scenario())
    for refused in (not_utf8, unknown_utf8):
        status, refusal = status_and_json(refused)
        assert (status, refusal["error"]["type"]) == (401, "authentication_error")
    assert status_and_json(good)[0] == 200 and len(service.generated) == 1


def test_a_client_request_id_that_is_not_utf8_is_refused_naming_its_header():
    service = AnsweringService()

    async def scenario():
        async with door_at(service) as port:
            request = post("/v1/chat/completions", CHAT, X_Client_Request_Id=b"req-\xff")
            return await answer_of(await send(port, request))

    status, refusal = status_and_json(asyncio.run(scenario()))
    assert (status, refusal["error"]["param"]) == (400, "x-client-request-id"), "was a 500"
    assert refusal["error"]["message"] == "x-client-request-id: is not valid UTF-8" and not service.generated


def test_a_refused_max_tokens_is_named_as_the_client_spelled_it():
    async def scenario():
        async with door_at(RefusingService()) as port:
            answers = []
            for field in ("max_tokens", "max_completion_tokens"):
                body = json.dumps({**json.loads(CHAT), field: 0}).encode()
                answers.append(await answer_of(await send(port, post("/v1/chat/completions", body))))
            return answers

    as_max_tokens, as_max_completion_tokens = asyncio.run(scenario())
    assert status_and_json(as_max_tokens)[1]["error"]["param"] == "max_tokens"
    refusal = status_and_json(as_max_completion_tokens)[1]["error"]
    assert refusal["param"] == "max_completion_tokens", "was max_tokens, a field the client did not send"
    assert refusal["message"] == "max_completion_tokens: is 0; allowed is 1 to 1024"


def test_a_request_aiohttp_cannot_parse_is_refused_without_an_error_in_the_log(caplog):
    # It was logged as an ERROR with its traceback, one per request: any client could fill the server's logs.
    async def scenario():
        async with door_at(AnsweringService()) as port:
            too_long = post("/v1/chat/completions", CHAT, X_Padding="x" * 10_000)
            too_many = post("/v1/chat/completions", CHAT, **{f"X_Header_{i}": "x" for i in range(200)})
            return [await answer_of(await send(port, request)) for request in (too_long, too_many)]

    with caplog.at_level(logging.DEBUG):
        answers = asyncio.run(scenario())
    assert [int(answer.split(b" ", 2)[1]) for answer in answers] == [400, 400]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING or record.exc_info]


def test_a_client_that_stops_reading_its_stream_is_let_go_and_its_answer_aborted():
    # Its answer waited on the client's TCP window for as long as the client liked, holding an admission slot.
    service = EndlessStreamService()
    streamed_chat = post("/v1/chat/completions", json.dumps({**json.loads(CHAT), "stream": True}).encode())

    async def scenario():
        async with door_at(service, client_timeout_seconds=0.5) as port:
            reader, _ = await send(port, streamed_chat)  # its buffer fills, then it reads no more
            await asyncio.wait_for(service.stream_closed.wait(), GUARD_S)
            received = b""
            with contextlib.suppress(ConnectionResetError):  # the door drops the connection, unflushed
                while data := await asyncio.wait_for(reader.read(1 << 16), GUARD_S):
                    received += data
            return received

    received = asyncio.run(scenario())
    assert received.startswith(b"HTTP/1.1 200 OK") and b"data: " in received and b"[DONE]" not in received
