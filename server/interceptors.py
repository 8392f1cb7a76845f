"""Cross-cutting RPC concerns: API-key auth (who the principal is), per-RPC status metrics, and the
promise that no RPC answers UNKNOWN: an unexpected error is logged and answered INTERNAL."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from feedback.identity import DEFAULT_PRINCIPAL, key_digest
from flywheel.logs import request_id_var
from server.metrics import ServingMetrics

log = logging.getLogger(__name__)

FLYWHEEL_SERVICE_PREFIX = "/flywheel.v1.Flywheel/"
UNAUTHENTICATED_MESSAGE = "missing or unknown API key (x-api-key or authorization: Bearer metadata)"

principal_var: ContextVar[str] = ContextVar("principal", default=DEFAULT_PRINCIPAL)
"""The principal of the RPC being served, set by FlywheelInterceptor before the handler runs."""


def api_key_from_metadata(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    """The key from `x-api-key: KEY` or `authorization: Bearer KEY`."""
    for key, value in metadata:
        if isinstance(value, bytes):
            continue
        if key == "x-api-key":
            return value
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[len("bearer ") :].strip()
    return None


def _status_of(context: aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def principal_of(metadata: tuple[tuple[str, str | bytes], ...], principals_by_digest: dict[str, str]) -> str | None:
    """The principal whose key the call carries; DEFAULT_PRINCIPAL when no keys are configured; None when refused."""
    if not principals_by_digest:
        return DEFAULT_PRINCIPAL
    key = api_key_from_metadata(metadata)
    return None if key is None else principals_by_digest.get(key_digest(key))


async def _abort_unexpected(context: aio.ServicerContext, rpc: str, error: Exception) -> None:
    if context.done():
        # The call already ended (its deadline passed, or the client left) while the handler was
        # answering it, e.g. with an abort: nothing went wrong, and nothing more can be sent.
        raise asyncio.CancelledError from error
    log.error("%s failed unexpectedly", rpc, exc_info=error)
    request_id = request_id_var.get()
    await context.abort(
        grpc.StatusCode.INTERNAL,
        "internal error; the server logged it" + (f" (request id {request_id})" if request_id else ""),
    )


class FlywheelInterceptor(aio.ServerInterceptor):
    """Wraps every Flywheel RPC (not health or reflection) with auth, decoding, status accounting and the
    INTERNAL fallback.

    The request is decoded here rather than by gRPC: gRPC answers a message that does not parse
    (bad UTF-8, truncated, a malformed tag) with UNKNOWN and the parser's exception, before any
    handler or this interceptor's wrapper runs.
    """

    def __init__(self, metrics: ServingMetrics, principals_by_digest: dict[str, str]):
        self._metrics = metrics
        self._principals_by_digest = principals_by_digest

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(FLYWHEEL_SERVICE_PREFIX):
            return handler
        rpc = method.removeprefix(FLYWHEEL_SERVICE_PREFIX)
        principal = principal_of(handler_call_details.invocation_metadata, self._principals_by_digest)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary, handler.request_deserializer, principal),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._streaming(rpc, handler.unary_stream, handler.request_deserializer, principal),
            response_serializer=handler.response_serializer,
        )

    def _count(self, rpc: str, context: aio.ServicerContext, error: BaseException | None) -> None:
        self._metrics.requests.labels(rpc=rpc, code=_status_of(context, error).name).inc()

    def _unary(self, rpc, behavior, deserialize, principal):
        async def call(raw_request: bytes, context):
            error = None
            try:
                request = await _admit(context, raw_request, deserialize, principal)
                try:
                    return await behavior(request, context)
                except (aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as unexpected:
                    await _abort_unexpected(context, rpc, unexpected)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._count(rpc, context, error)

        return call

    def _streaming(self, rpc, behavior, deserialize, principal):
        async def call(raw_request: bytes, context):
            error = None
            try:
                request = await _admit(context, raw_request, deserialize, principal)
                try:
                    async for message in behavior(request, context):
                        yield message
                except (aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as unexpected:
                    await _abort_unexpected(context, rpc, unexpected)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._count(rpc, context, error)

        return call


async def _admit(context: aio.ServicerContext, raw_request: bytes, deserialize, principal: str | None):
    """The decoded request of an authenticated caller, whose principal the RPC then runs as; aborts otherwise."""
    if principal is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    try:
        request = deserialize(raw_request)
    except DecodeError:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "request: not a valid protobuf message of this RPC's request type (truncated, malformed, or a string "
            "field that is not UTF-8)",
        )
    principal_var.set(principal)
    return request
