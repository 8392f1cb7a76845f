"""The OpenAI-compatible HTTP door: /v1/chat/completions, /v1/models and /v1/feedback, on the gRPC server's loop.

One code path with gRPC: each HTTP request becomes the proto request it stands for and is answered by
the same FlywheelService methods, so validation, admission, limits, principals, metrics and events are
the gRPC door's own. What is HTTP's alone is here: reading and bounding the body, the API key from
`Authorization: Bearer`, OpenAI's request and answer shapes, and each gRPC status as OpenAI's error
JSON and HTTP code.

Every answer carries its response id, policy version and feedback token: as extra fields of the body
(`completion.feedback_token` in the OpenAI SDK), and, when not streamed, as X-Flywheel-* headers; a
streamed answer gives them in its last chunk, since headers go out before the answer exists.
`POST /v1/feedback` takes them back with a thumb or a preference.
"""

import asyncio
import json
import logging
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.errors import field_of, shown, status_message
from flywheel.logs import request_id_var
from flywheel.v1 import serving_pb2
from server.interceptors import UNAUTHENTICATED_MESSAGE, principal_of, principal_var
from server.metrics import ServingMetrics

if TYPE_CHECKING:  # the servicer imports the engine, so vLLM: the translations here are tested without it
    from server.service import FlywheelService

log = logging.getLogger(__name__)


class ConnectionLog(logging.LoggerAdapter):
    """aiohttp's connection log, where a request it cannot parse (a header too long, too many headers, a malformed
    chunk) is the client's fault: one debug line, not an error with its traceback per request, which any client
    could send until the logs fill."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        error = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(error, HttpProcessingError):
            self.debug(f"{msg}: %s", *args, error.message, **kwargs)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


MODEL_ID = "flywheel"
"""The one model this door serves: whichever policy is live. Requests name it in `model`."""

FINISH_REASONS = {
    serving_pb2.FINISH_REASON_STOP: "stop",
    serving_pb2.FINISH_REASON_LENGTH: "length",
    serving_pb2.FINISH_REASON_ABORT: "abort",
}

# gRPC status -> (HTTP status, OpenAI error type). The OpenAI SDK raises its exception by the HTTP status.
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
HTTP_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}
"""OpenAI error types of HTTP refusals aiohttp makes itself (an unknown path, a body too large)."""

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class CallRefused(Exception):
    """The servicer aborted the call with a status; the HTTP door answers it as OpenAI's error."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        """Overrides the HTTP status of `code`, for refusals HTTP names more precisely (413)."""


class ClientStalled(Exception):
    """A streaming client took none of its answer for server.http_client_timeout_seconds."""


class HttpCallContext:
    """What FlywheelService uses of grpc.aio.ServicerContext, for a call that came over HTTP."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise CallRefused(code, details)


# --- request bodies ------------------------------------------------------------------------------------------


class Strict(BaseModel):
    # An unknown field is refused, not ignored: an application relying on it would be answered without it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None
    """Accepted and not used: the chat template has no place for it."""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str
    messages: list[ChatMessageIn]
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    """vLLM's extension, as Flywheel's sampling has it."""
    min_tokens: Int32 | None = None
    """vLLM's extension, as Flywheel's sampling has it."""
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    """One answer per request: each answer has its own response id and feedback token."""
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    """Accepted at 0 only: Flywheel's sampling has no penalties."""
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    logprobs: Literal[False] | None = None
    user: str = ""
    """Who asked, as GenerateRequest.user_id: feedback on the answer must name the same user."""
    metadata: dict[str, str] | None = None
    """Free-form labels, as GenerateRequest.tags."""


class RatedIn(Strict):
    response_id: str
    feedback_token: str


class FeedbackIn(Strict):
    response_id: str
    feedback_token: str
    user: str = ""
    rating: Literal["up", "down"] | None = None
    comment: str = ""
    preferred_over: RatedIn | None = None
    """The user prefers this answer over that one."""


ParsedBody = TypeVar("ParsedBody", bound=BaseModel)

RATINGS = {"up": serving_pb2.RATING_UP, "down": serving_pb2.RATING_DOWN, None: serving_pb2.RATING_UNSPECIFIED}


# --- translation: HTTP <-> proto -----------------------------------------------------------------------------


def generate_request(body: ChatCompletionRequest, client_request_id: str) -> serving_pb2.GenerateRequest:
    """The GenerateRequest the chat completion asks for; the servicer validates it as any gRPC request."""
    if body.model != MODEL_ID:
        raise CallRefused(
            grpc.StatusCode.NOT_FOUND, f"model: this server serves {MODEL_ID!r} (GET /v1/models), not {body.model!r}"
        )
    sampling = serving_pb2.SamplingParams(
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        min_tokens=body.min_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
    )
    chat = serving_pb2.ChatMessages(
        messages=[
            # OpenAI's newer name for the system role.
            serving_pb2.ChatMessage(
                role="system" if message.role == "developer" else message.role, content=message.text()
            )
            for message in body.messages
        ]
    )
    return serving_pb2.GenerateRequest(
        chat=chat, sampling=sampling, user_id=body.user, tags=body.metadata or {}, client_request_id=client_request_id
    )


def feedback_request(body: FeedbackIn) -> serving_pb2.SubmitFeedbackRequest:
    request = serving_pb2.SubmitFeedbackRequest(
        response=serving_pb2.RatedResponse(response_id=body.response_id, feedback_token=body.feedback_token),
        user_id=body.user,
        rating=RATINGS[body.rating],
        comment=body.comment,
    )
    if body.preferred_over is not None:
        request.preferred_over.CopyFrom(
            serving_pb2.RatedResponse(
                response_id=body.preferred_over.response_id, feedback_token=body.preferred_over.feedback_token
            )
        )
    return request


CHAT_PARAMS = {
    "chat.messages": "messages",
    "input": "messages",
    "prompt": "messages",
    "user_id": "user",
    "tags": "metadata",
    "client_request_id": "x-client-request-id",
    "sampling": "",
}


def chat_params(body: ChatCompletionRequest) -> dict[str, str]:
    """CHAT_PARAMS, with max_tokens spelled as this body spells it (http_param takes the first prefix that matches)."""
    if body.max_completion_tokens is None:
        return CHAT_PARAMS
    return {"sampling.max_tokens": "max_completion_tokens", **CHAT_PARAMS}


FEEDBACK_PARAMS = {
    "response.response_id": "response_id",
    "response.feedback_token": "feedback_token",
    "user_id": "user",
}


def http_param(proto_field: str, params: dict[str, str]) -> str:
    """The HTTP body's name for a proto field path: chat.messages[2].content -> messages[2].content."""
    for proto_prefix, http_prefix in params.items():
        if proto_field == proto_prefix or proto_field.startswith((proto_prefix + ".", proto_prefix + "[")):
            rest = proto_field[len(proto_prefix) :]
            return (http_prefix + rest).lstrip(".") if http_prefix else rest.lstrip(".")
    return proto_field


UNION_SHAPES = frozenset({"str", "list[str]", "list[TextPart]"})
"""pydantic's names for the shapes of the fields that take either (content, stop), as it puts them in an error's
location: no field of the body."""


def pydantic_param(location: tuple[str | int, ...]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; None for the body as a whole."""
    param = ""
    for part in location:
        if part in UNION_SHAPES:
            continue
        param += f"[{part}]" if isinstance(part, int) else f".{part}"
    return param.lstrip(".") or None


def furthest_shape(errors: list) -> dict:
    """The first error, or, where it is about one shape of a field that takes either, the error of the shape that
    got furthest into the body: a list of parts with one bad part is named by that part, not as "not a string"."""
    first = errors[0]
    shape_at = next((i for i, part in enumerate(first["loc"]) if part in UNION_SHAPES), None)
    if shape_at is None:
        return first
    field = first["loc"][:shape_at]
    same_field = [e for e in errors if e["loc"][:shape_at] == field and len(e["loc"]) > shape_at]
    return max(same_field, key=lambda e: len(e["loc"]))  # the first of the longest


def error_body(code: grpc.StatusCode, message: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for a refusal; the field the message names first becomes `param`,
    spelled as the HTTP body spells it."""
    http_status, error_type = HTTP_ERRORS.get(code, (500, "server_error"))
    proto_field = field_of(message)
    param = None
    if proto_field is not None:
        param = http_param(proto_field, params)
        message = param + message[len(proto_field) :]
    error = {"message": status_message(message), "type": error_type, "param": param, "code": code.name.lower()}
    return http_status, {"error": error}


def validation_refusal(error: ValidationError) -> CallRefused:
    """A body that does not parse or fit the request's shape, as INVALID_ARGUMENT naming the first bad field."""
    first = furthest_shape(error.errors(include_url=False, include_input=False))
    if first["type"] == "json_invalid":
        return CallRefused(grpc.StatusCode.INVALID_ARGUMENT, "the request body is not valid JSON")
    param = pydantic_param(first["loc"]) or "body"
    problem = "is not supported by this server" if first["type"] == "extra_forbidden" else first["msg"]
    return CallRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{param}: {problem}")


def chat_completion(answer: serving_pb2.GenerateResponse) -> dict[str, Any]:
    """OpenAI's chat.completion object for a whole answer, with Flywheel's fields beside OpenAI's."""
    return {
        "id": answer.response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": FINISH_REASONS.get(answer.finish_reason),
                "logprobs": None,
            }
        ],
        "usage": usage(answer),
        **flywheel_fields(answer),
    }


def usage(answer: serving_pb2.GenerateResponse) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def flywheel_fields(answer: serving_pb2.GenerateResponse) -> dict[str, Any]:
    return {
        "response_id": answer.response_id,
        "policy_version": answer.policy_version,
        "feedback_token": answer.feedback_token,
        "timings": {
            "queue_seconds": answer.timings.queue_seconds,
            "time_to_first_token_seconds": answer.timings.time_to_first_token_seconds,
            "total_seconds": answer.timings.total_seconds,
        },
    }


def flywheel_headers(answer: serving_pb2.GenerateResponse) -> dict[str, str]:
    return {
        "X-Flywheel-Response-Id": answer.response_id,
        "X-Flywheel-Policy-Version": str(answer.policy_version),
        "X-Flywheel-Feedback-Token": answer.feedback_token,
    }


def chunk(completion_id: str, created: int, delta: dict, finish_reason: str | None = None, **extra) -> dict[str, Any]:
    """One chat.completion.chunk of a streamed answer."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **extra,
    }


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# --- the door ------------------------------------------------------------------------------------------------


CLIENT_TIMEOUT = web.AppKey("client_timeout_seconds", float)
"""How long the door waits on a client (server.http_client_timeout_seconds)."""
PARAMS = web.RequestKey("params", dict)
"""HTTP names of proto fields for this request's refusals, when they are not the route's."""
RPC = web.RequestKey("rpc", str)
"""The servicer method a request is counted under, when it is not the route's (a streamed chat completion)."""
STREAM_STATUS = web.RequestKey("stream_status", grpc.StatusCode)
"""The status a streamed answer ended with, after its HTTP status line went out as 200."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpenAIDoor:
    """The aiohttp application serving OpenAI's API over a FlywheelService."""

    def __init__(self, service: "FlywheelService", metrics: ServingMetrics, principals_by_digest: dict[str, str]):
        self._service = service
        self._metrics = metrics
        self._principals_by_digest = principals_by_digest

    def runner(
        self, max_request_bytes: int, client_timeout_seconds: float, shutdown_timeout_seconds: float
    ) -> web.AppRunner:
        """The door's aiohttp runner, for a site to serve; `shutdown_timeout_seconds` is the wait for answers in
        flight when it is cleaned up.

        `client_timeout_seconds` bounds every wait on a client: for a request's headers, from the connection's
        opening or its last answer (aiohttp's default is an hour, so a client trickling headers, or opening
        connections and sending nothing, would hold a socket each); for its body (408); for the rest of a body
        refused unread, which is drained before the connection closes so that the client reads its refusal; and
        for each part of a streamed answer to be taken (_stream).
        """
        return web.AppRunner(
            self.application(max_request_bytes, client_timeout_seconds),
            handler_cancellation=True,  # a client that leaves cancels its answer, as a cancelled RPC does
            keepalive_timeout=client_timeout_seconds,
            lingering_time=client_timeout_seconds,
            # A compressed body is refused (_parsed); unpacking it to drain it would cost the loop a thousandfold.
            auto_decompress=False,
            shutdown_timeout=shutdown_timeout_seconds,
            access_log=None,
            logger=ConnectionLog(logging.getLogger("aiohttp.server")),
        )

    def application(self, max_request_bytes: int, client_timeout_seconds: float) -> web.Application:
        """Bodies larger than `max_request_bytes` are refused (413) before they are parsed, and bodies that have not
        all arrived `client_timeout_seconds` after their headers, 408."""
        app = web.Application(client_max_size=max_request_bytes, middlewares=[self._aiohttp_refusals])
        app[CLIENT_TIMEOUT] = client_timeout_seconds
        app.router.add_post("/v1/chat/completions", self._call("Generate", self._chat_completions, CHAT_PARAMS))
        app.router.add_get("/v1/models", self._call("GetPolicy", self._models, {}))
        app.router.add_post("/v1/feedback", self._call("SubmitFeedback", self._feedback, FEEDBACK_PARAMS))
        return app

    def _call(self, rpc: str, handle: Handler, params: dict[str, str]) -> Handler:
        """Auth, status accounting and the INTERNAL fallback around a handler, as the gRPC interceptor does them."""

        async def call(request: web.Request) -> web.StreamResponse:
            code = grpc.StatusCode.OK
            try:
                principal = principal_of(tuple(_lower_headers(request)), self._principals_by_digest)
                if principal is None:
                    raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
                principal_var.set(principal)
                return await handle(request)
            except CallRefused as refused:
                code = refused.code
                http_status, body = error_body(refused.code, refused.message, request.get(PARAMS, params))
                return web.json_response(body, status=refused.http_status or http_status)
            except (ConnectionResetError, asyncio.CancelledError):  # the client left; its answer is aborted
                code = grpc.StatusCode.CANCELLED
                raise
            except web.HTTPException:  # aiohttp's own refusal: the middleware answers it in OpenAI's shape
                code = grpc.StatusCode.INVALID_ARGUMENT
                raise
            except Exception as unexpected:
                code = grpc.StatusCode.INTERNAL
                log.error("HTTP %s failed unexpectedly", request.path, exc_info=unexpected)
                request_id = request_id_var.get()
                message = "internal error; the server logged it" + (f" (request id {request_id})" if request_id else "")
                http_status, body = error_body(code, message, params)
                return web.json_response(body, status=http_status)
            finally:
                code = request.get(STREAM_STATUS, code)
                self._metrics.requests.labels(rpc=request.get(RPC, rpc), code=code.name).inc()

        return call

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _parsed(request, ChatCompletionRequest)
        request[PARAMS] = chat_params(body)
        generate = generate_request(body, _header_text(request, "X-Client-Request-Id", "client_request_id"))
        if not body.stream:
            answer = await self._service.Generate(generate, HttpCallContext())
            return web.json_response(chat_completion(answer), headers=flywheel_headers(answer))
        request[RPC] = "GenerateStream"
        return await self._stream(request, generate, body.stream_options and body.stream_options.include_usage)

    async def _stream(
        self, request: web.Request, generate: serving_pb2.GenerateRequest, include_usage: bool
    ) -> web.StreamResponse:
        """Server-sent chat.completion.chunk events. A refusal before the first text is an HTTP error; one after
        it, an error event (the status line has gone out)."""
        events = self._service.GenerateStream(generate, HttpCallContext()).__aiter__()
        first = await anext(events)  # refusals (validation, capacity) raise here, before any byte is sent
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        client_timeout = request.app[CLIENT_TIMEOUT]

        async def in_time(sending: Awaitable[None]) -> None:
            # A client that stops reading would otherwise hold its answer, and its admission slot, for as long as
            # it likes: the write waits on its TCP window.
            try:
                async with asyncio.timeout(client_timeout):
                    await sending
            except TimeoutError:
                raise ClientStalled from None

        async def send(event: serving_pb2.GenerateStreamResponse) -> None:
            if event.HasField("text_delta"):
                await in_time(response.write(sse(chunk(completion_id, created, {"content": event.text_delta}))))
                return
            answer = event.summary
            finish_reason = FINISH_REASONS.get(answer.finish_reason)
            finished = chunk(completion_id, created, {}, finish_reason, **flywheel_fields(answer))
            await in_time(response.write(sse(finished)))
            if include_usage:
                last = chunk(completion_id, created, {}, usage=usage(answer), **flywheel_fields(answer))
                last["choices"] = []
                await in_time(response.write(sse(last)))

        try:
            try:
                await response.prepare(request)
                await in_time(response.write(sse(chunk(completion_id, created, {"role": "assistant", "content": ""}))))
                await send(first)
                async for event in events:
                    await send(event)
                await in_time(response.write(sse("[DONE]")))
            except CallRefused as refused:
                request[STREAM_STATUS] = refused.code
                _, body = error_body(refused.code, refused.message, request[PARAMS])
                await in_time(response.write(sse(body)))
            except (ConnectionResetError, asyncio.CancelledError):
                request[STREAM_STATUS] = grpc.StatusCode.CANCELLED
                raise
            except ClientStalled:
                raise
            except Exception as unexpected:
                request[STREAM_STATUS] = grpc.StatusCode.INTERNAL
                log.error("HTTP %s failed unexpectedly mid-stream", request.path, exc_info=unexpected)
                _, body = error_body(grpc.StatusCode.INTERNAL, "internal error; the server logged it", CHAT_PARAMS)
                await in_time(response.write(sse(body)))
            finally:
                await events.aclose()  # a client that left mid-answer: the engine stops generating it
            await in_time(response.write_eof())
        except ClientStalled:
            request[STREAM_STATUS] = grpc.StatusCode.DEADLINE_EXCEEDED
            if request.transport is not None:
                request.transport.abort()  # closing it would wait for the client to take what is buffered
        return response

    async def _models(self, request: web.Request) -> web.Response:
        policy = await self._service.GetPolicy(serving_pb2.GetPolicyRequest(), HttpCallContext())
        model = {
            "id": MODEL_ID,
            "object": "model",
            "created": policy.live_since.seconds,
            "owned_by": "flywheel",
            "policy_version": policy.policy_version,
            "digest": policy.digest,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _feedback(self, request: web.Request) -> web.Response:
        body = await _parsed(request, FeedbackIn)
        receipt = await self._service.SubmitFeedback(feedback_request(body), HttpCallContext())
        return web.json_response({"event_id": receipt.event_id, "replaced_previous": receipt.replaced_previous})

    @web.middleware
    async def _aiohttp_refusals(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own refusals (unknown path, wrong method, body too large) in OpenAI's error shape."""
        try:
            return await handler(request)
        except web.HTTPException as refusal:
            if refusal.status < 400:
                raise
            error_type = HTTP_ERROR_TYPES.get(refusal.status, "invalid_request_error")
            error = {"message": refusal.reason, "type": error_type, "param": None, "code": None}
            return web.json_response({"error": error}, status=refusal.status, headers=_allow(refusal))


def _allow(refusal: web.HTTPException) -> dict[str, str]:
    return {"Allow": refusal.headers["Allow"]} if "Allow" in refusal.headers else {}


def _lower_headers(request: web.Request) -> Iterator[tuple[str, str]]:
    """Headers as gRPC metadata: lower-case names."""
    return ((name.lower(), value) for name, value in request.headers.items())


def _header_text(request: web.Request, name: str, proto_field: str) -> str:
    """A header's value as text; INVALID_ARGUMENT on `proto_field` when its bytes are not UTF-8 (aiohttp hands
    such bytes on as surrogates, which a proto string field cannot hold)."""
    value = request.headers.get(name, "")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise CallRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{proto_field}: is not valid UTF-8") from None
    return value


async def _parsed(request: web.Request, model: type[ParsedBody]) -> ParsedBody:
    # A browser may send a cross-site form or text/plain POST without asking first; JSON it may not.
    content_type = request.headers.get("Content-Type")
    if content_type is not None and content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise CallRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"content-type: {shown(content_type)} is not accepted; send the body as application/json",
            http_status=415,
        )
    encoding = request.headers.get("Content-Encoding", "identity")
    if encoding.lower() != "identity":
        raise CallRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"content-encoding: {shown(encoding)} is not accepted; send the body uncompressed",
            http_status=415,
        )
    client_timeout = request.app[CLIENT_TIMEOUT]
    try:
        async with asyncio.timeout(client_timeout):
            raw = await request.read()
    except TimeoutError:
        raise CallRefused(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request body did not arrive within {client_timeout:g} s (server.http_client_timeout_seconds)",
            http_status=408,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise CallRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is larger than {request.client_max_size} bytes (server.limits.max_request_bytes)",
            http_status=413,
        ) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise validation_refusal(error) from None


def ssl_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    """TLS for the HTTP door from the gRPC port's PEM files (read at start-up)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
