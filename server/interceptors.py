"""Cross-cutting RPC concerns: API-key auth and per-RPC status metrics."""

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from server.metrics import ServingMetrics

FLYWHEEL_SERVICE_PREFIX = "/flywheel.v1.Flywheel/"


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


class FlywheelInterceptor(aio.ServerInterceptor):
    """Wraps every Flywheel RPC (not health or reflection) with auth and status accounting."""

    def __init__(self, metrics: ServingMetrics, api_keys: set[str]):
        self._metrics = metrics
        self._api_keys = api_keys

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
        authorized = not self._api_keys or api_key_from_metadata(handler_call_details.invocation_metadata) in self._api_keys
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._streaming(rpc, handler.unary_stream, authorized),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _count(self, rpc: str, context: aio.ServicerContext, error: BaseException | None) -> None:
        self._metrics.requests.labels(rpc=rpc, code=_status_of(context, error).name).inc()

    def _unary(self, rpc, behavior, authorized):
        async def call(request, context):
            error = None
            try:
                if not authorized:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (x-api-key metadata)")
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._count(rpc, context, error)

        return call

    def _streaming(self, rpc, behavior, authorized):
        async def call(request, context):
            error = None
            try:
                if not authorized:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (x-api-key metadata)")
                async for message in behavior(request, context):
                    yield message
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._count(rpc, context, error)

        return call
