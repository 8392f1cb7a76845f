"""A Python client for Flywheel's gRPC API: answers, streams, thumbs and preferences, in a few lines.

    from flywheel.client import Flywheel

    flywheel = Flywheel("localhost:50051", api_key="...", user_id="alice")
    answer = flywheel.generate("What is the capital of Kenya?", max_tokens=32)
    print(answer.text)
    answer.thumbs_up()

`AsyncFlywheel` is the same client for asyncio: every call is awaited, `stream` is iterated with
`async for`, and an answer's `thumbs_up()` is awaited too.

Every call has a deadline (`timeout`, seconds, all attempts together) and is retried, with
exponential back-off and full jitter, only when the server answers UNAVAILABLE or
RESOURCE_EXHAUSTED: the request was not served, so sending it again cannot answer it twice. A
stream is retried only before its first text arrives. Any other refusal is raised at once as a
`FlywheelError` subclass carrying the status code, the server's message and the field it names.

A call for a user (`user_id`) names it in the `x-flywheel-user` metadata too, for a load balancer
that keeps each user on one server replica (a whole-weight canary is a share of replicas).

This module needs only grpcio and the generated stubs, so an application can import it without the
server's dependencies.
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import grpc
from grpc import aio

from flywheel.errors import field_of
from flywheel.v1 import serving_pb2, serving_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""The codes that mean the request was not served: at capacity, over a rate, or no server reachable."""

FINISH_REASONS = {
    serving_pb2.FINISH_REASON_STOP: "stop",
    serving_pb2.FINISH_REASON_LENGTH: "length",
    serving_pb2.FINISH_REASON_ABORT: "abort",
}
SAMPLING_FIELDS = frozenset(serving_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
USER_HEADER = "x-flywheel-user"
"""Metadata naming the user a call is for: a load balancer hashing on it keeps each user on one replica,
so a user stays on one side of a whole-weight canary (docs/adapters.md)."""


# --- errors --------------------------------------------------------------------------------------------------


class FlywheelError(Exception):
    """The server refused a call, or it could not be made. `field` is the request field the refusal names, if any."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.field = field_of(message)

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class InvalidArgument(FlywheelError):
    """A request field is out of bounds or malformed; `field` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(FlywheelError):
    """No API key, or one the server does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FlywheelError):
    """The key is valid but may not do this (e.g. vote with another user's feedback token)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(FlywheelError):
    """The call names something the server does not know (e.g. a response id no token was issued for)."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(FlywheelError):
    """The server is at capacity, or the caller is over a rate; retried until the deadline or the attempts run out."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FlywheelError):
    """No server answered (down, restarting, unreachable), or it cannot take the call now; retried like ResourceExhausted."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FlywheelError):
    """The call's `timeout` passed before an answer."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FlywheelError):
    code = grpc.StatusCode.CANCELLED


class Internal(FlywheelError):
    """The server failed unexpectedly; its log holds the request id the message gives."""

    code = grpc.StatusCode.INTERNAL


ERROR_TYPES: dict[grpc.StatusCode, type[FlywheelError]] = {
    error_type.code: error_type
    for error_type in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def error_for(code: grpc.StatusCode, message: str) -> FlywheelError:
    """The exception for a status: its own subclass, or FlywheelError with the code for the rarer ones."""
    error_type = ERROR_TYPES.get(code)
    return error_type(message) if error_type else FlywheelError(message, code)


def _raised(error: grpc.RpcError) -> FlywheelError:
    return error_for(error.code(), error.details() or "")


# --- retries -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a refused call again."""

    attempts: int = 5
    """Tries in all, the first included; 1 never retries."""
    initial_backoff_seconds: float = 0.1
    """The longest wait before the first retry; each later one may wait `multiplier` times longer."""
    max_backoff_seconds: float = 5.0
    multiplier: float = 2.0


def backoff_seconds(retry: int, policy: RetryPolicy, draw: float) -> float:
    """The wait before retry number `retry` (0 for the first), given `draw` uniform in [0, 1).

    Full jitter: uniform between 0 and the exponential cap, so clients refused together spread out
    instead of coming back together.
    """
    cap = min(policy.max_backoff_seconds, policy.initial_backoff_seconds * policy.multiplier**retry)
    return draw * cap


class _Attempts:
    """The attempts of one call: the time each may take, and whether and how long to wait after a refusal."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, rng: random.Random):
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._rng = rng
        self._retries = 0

    def time_left(self) -> float | None:
        """Seconds left for the next attempt; None when the call has no deadline."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's timeout passed while retrying")
        return left

    def wait_before_retry(self, error: FlywheelError) -> float:
        """The seconds to wait before trying again; re-raises `error` when it may not be retried."""
        if not error.retryable or self._retries + 1 >= self._policy.attempts:
            raise error
        wait = backoff_seconds(self._retries, self._policy, self._rng.random())
        left = self.time_left()
        if left is not None and wait >= left:
            raise error
        self._retries += 1
        log.info("%s (%s); retry %d in %.2f s", error.code.name, error.message, self._retries, wait)
        return wait


# --- what a call sends and gets back -------------------------------------------------------------------------

Messages = Iterable[Mapping[str, str]]
"""Chat messages: [{"role": "user", "content": "..."}, ...]; roles are system, user and assistant."""


def generate_request(
    prompt_or_messages: str | Messages,
    *,
    user_id: str,
    client_request_id: str = "",
    tags: Mapping[str, str] | None = None,
    **sampling,
) -> serving_pb2.GenerateRequest:
    """The GenerateRequest for a raw prompt (a string) or chat messages; `sampling` are SamplingParams fields."""
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    request = serving_pb2.GenerateRequest(
        sampling=serving_pb2.SamplingParams(**{name: value for name, value in sampling.items() if value is not None}),
        user_id=user_id,
        client_request_id=client_request_id,
        tags=dict(tags or {}),
    )
    if isinstance(prompt_or_messages, str):
        request.prompt = prompt_or_messages
    else:
        request.chat.messages.extend(
            serving_pb2.ChatMessage(role=message["role"], content=message["content"]) for message in prompt_or_messages
        )
        request.chat.SetInParent()  # an empty list is still a chat: the server says what is wrong with it
    return request


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    """Waiting for an engine slot."""
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class FeedbackReceipt:
    event_id: str
    replaced_previous: bool
    """This user had voted on the answer before, and this vote replaced that one."""


@dataclass(frozen=True)
class Answer:
    """One answer and what is needed to give feedback on it. With AsyncFlywheel, await thumbs_up/thumbs_down."""

    text: str
    response_id: str
    policy_version: int
    """The policy whose weights produced every token of the answer."""
    feedback_token: str
    finish_reason: str
    """"stop" (the model ended it, or a stop string), "length" (max_tokens) or "abort"."""
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    user_id: str
    client_request_id: str
    _client: "Flywheel | AsyncFlywheel" = field(repr=False, compare=False)

    @classmethod
    def of(cls, response: serving_pb2.GenerateResponse, user_id: str, client: "Flywheel | AsyncFlywheel") -> "Answer":
        return cls(
            text=response.text,
            response_id=response.response_id,
            policy_version=response.policy_version,
            feedback_token=response.feedback_token,
            finish_reason=FINISH_REASONS.get(response.finish_reason, "unspecified"),
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            timings=Timings(
                queue_seconds=response.timings.queue_seconds,
                time_to_first_token_seconds=response.timings.time_to_first_token_seconds,
                total_seconds=response.timings.total_seconds,
            ),
            user_id=user_id,
            client_request_id=response.client_request_id,
            _client=client,
        )

    def rated(self) -> serving_pb2.RatedResponse:
        return serving_pb2.RatedResponse(response_id=self.response_id, feedback_token=self.feedback_token)

    def thumbs_up(self, comment: str = "") -> "FeedbackReceipt | Awaitable[FeedbackReceipt]":
        return self._client._submit(feedback_request(self, serving_pb2.RATING_UP, comment))

    def thumbs_down(self, comment: str = "") -> "FeedbackReceipt | Awaitable[FeedbackReceipt]":
        return self._client._submit(feedback_request(self, serving_pb2.RATING_DOWN, comment))


def feedback_request(
    answer: Answer, rating: int, comment: str = "", preferred_over: Answer | None = None
) -> serving_pb2.SubmitFeedbackRequest:
    request = serving_pb2.SubmitFeedbackRequest(
        response=answer.rated(), user_id=answer.user_id, rating=rating, comment=comment
    )
    if preferred_over is not None:
        request.preferred_over.CopyFrom(preferred_over.rated())
    return request


@dataclass(frozen=True)
class Policy:
    version: int
    model_path: str
    digest: str
    """sha256 over the policy's weight files, hex."""
    live_since: datetime

    @classmethod
    def of(cls, info: serving_pb2.PolicyInfo) -> "Policy":
        return cls(info.policy_version, info.model_path, info.digest, info.live_since.ToDatetime())


# --- connections ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """Where and how to reach a server; shared by the sync and async clients."""

    target: str
    """host:port of the gRPC server."""
    api_key: str | None = None
    tls: bool = False
    """Use TLS with the system's root certificates, or `root_certificates` when given."""
    root_certificates: bytes | None = None
    """PEM CA certificates that signed the server's certificate (implies tls)."""
    certificate_chain: bytes | None = None
    """PEM client certificate, for servers that require mutual TLS (with private_key)."""
    private_key: bytes | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.certificate_chain):
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_options(self, retry: RetryPolicy) -> list[tuple[str, int]]:
        # gRPC's own reconnect back-off (1 s, growing to 2 min) would outlast this client's retries:
        # a server that comes back would be tried again only after them.
        backoff_ms = max(1, int(1000 * retry.initial_backoff_seconds))
        return [
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.min_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", max(backoff_ms, int(1000 * retry.max_backoff_seconds))),
        ]


class _Client:
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None,
        user_id: str,
        timeout: float | None,
        retry: RetryPolicy,
        tls: bool,
        root_certificates: bytes | None,
        certificate_chain: bytes | None,
        private_key: bytes | None,
        rng: random.Random | None,
    ):
        self.connection = Connection(target, api_key, tls, root_certificates, certificate_chain, private_key)
        self.user_id = user_id
        self.timeout = timeout
        self.retry = retry
        self._rng = rng or random.Random()
        self._metadata = self.connection.metadata()

    def _attempts(self, timeout: float | None) -> _Attempts:
        return _Attempts(self.retry, self.timeout if timeout is None else timeout, self._rng)

    def _metadata_for(self, user_id: str) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the API key, and the user it is for when there is one."""
        return (*self._metadata, (USER_HEADER, user_id)) if user_id else self._metadata

    def _request(self, prompt_or_messages, user_id, client_request_id, tags, sampling) -> serving_pb2.GenerateRequest:
        return generate_request(
            prompt_or_messages,
            user_id=self.user_id if user_id is None else user_id,
            client_request_id=client_request_id,
            tags=tags,
            **sampling,
        )


class Flywheel(_Client):
    """A blocking client; safe to share between threads. Close it, or use it in a `with` block."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        user_id: str = "",
        timeout: float | None = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        rng: random.Random | None = None,
    ):
        """`user_id`: who asks, by default; feedback must come from the user an answer was given to.
        `timeout`: seconds for each call, its retries included; None waits forever."""
        super().__init__(
            target, api_key=api_key, user_id=user_id, timeout=timeout, retry=retry, tls=tls,
            root_certificates=root_certificates, certificate_chain=certificate_chain, private_key=private_key, rng=rng,
        )  # fmt: skip
        credentials = self.connection.credentials()
        options = self.connection.channel_options(retry)
        self._channel = (
            grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target, options)
        )
        self._stub = serving_pb2_grpc.FlywheelStub(self._channel)

    def generate(
        self,
        prompt_or_messages: str | Messages,
        *,
        user_id: str | None = None,
        client_request_id: str = "",
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> Answer:
        """One whole answer. `sampling`: max_tokens, temperature, top_p, top_k, seed, stop, min_tokens."""
        request = self._request(prompt_or_messages, user_id, client_request_id, tags, sampling)
        response = self._unary(self._stub.Generate, request, timeout, request.user_id)
        return Answer.of(response, request.user_id, self)

    def stream(
        self,
        prompt_or_messages: str | Messages,
        *,
        user_id: str | None = None,
        client_request_id: str = "",
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> "AnswerStream":
        """The answer as text chunks: iterate it; then `.answer` holds the whole Answer."""
        request = self._request(prompt_or_messages, user_id, client_request_id, tags, sampling)
        return AnswerStream(self, request, self._attempts(timeout))

    def prefer(self, preferred: Answer, *, over: Answer, comment: str = "") -> FeedbackReceipt:
        """The user prefers `preferred` over `over` (two answers given to the same user)."""
        return self._submit(feedback_request(preferred, serving_pb2.RATING_UNSPECIFIED, comment, preferred_over=over))

    def policy(self, timeout: float | None = None) -> Policy:
        """The policy the server answers with now."""
        return Policy.of(self._unary(self._stub.GetPolicy, serving_pb2.GetPolicyRequest(), timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Flywheel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _submit(self, request: serving_pb2.SubmitFeedbackRequest) -> FeedbackReceipt:
        # A vote sent again is the same standing vote (the trainer keeps one per voter and answer): safe to retry.
        response = self._unary(self._stub.SubmitFeedback, request, None, request.user_id)
        return FeedbackReceipt(response.event_id, response.replaced_previous)

    def _unary(self, method: Callable, request, timeout: float | None, user_id: str = ""):
        attempts = self._attempts(timeout)
        while True:
            try:
                return method(request, metadata=self._metadata_for(user_id), timeout=attempts.time_left())
            except grpc.RpcError as error:
                time.sleep(attempts.wait_before_retry(_raised(error)))


class AnswerStream:
    """Text chunks as the server generates them; `answer` is set once the last one has arrived."""

    def __init__(self, client: Flywheel, request: serving_pb2.GenerateRequest, attempts: _Attempts):
        self.answer: Answer | None = None
        self._client = client
        self._request = request
        self._attempts = attempts
        self._call = None

    def __iter__(self) -> Iterator[str]:
        while True:
            started = False
            try:
                self._call = self._client._stub.GenerateStream(
                    self._request,
                    metadata=self._client._metadata_for(self._request.user_id),
                    timeout=self._attempts.time_left(),
                )
                for message in self._call:
                    if message.HasField("summary"):
                        self.answer = Answer.of(message.summary, self._request.user_id, self._client)
                    else:
                        started = True
                        yield message.text_delta
                return
            except GeneratorExit:  # the caller stopped reading: stop the server generating
                self.cancel()
                raise
            except grpc.RpcError as error:
                if started:  # text was given out: sending the request again would give a second answer
                    raise _raised(error) from None
                time.sleep(self._attempts.wait_before_retry(_raised(error)))

    def cancel(self) -> None:
        """Stop generating; the server aborts the answer."""
        if self._call is not None:
            self._call.cancel()


class AsyncFlywheel(_Client):
    """The asyncio client: as Flywheel, with every call awaited. Close it, or use it in an `async with` block."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        user_id: str = "",
        timeout: float | None = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        rng: random.Random | None = None,
    ):
        super().__init__(
            target, api_key=api_key, user_id=user_id, timeout=timeout, retry=retry, tls=tls,
            root_certificates=root_certificates, certificate_chain=certificate_chain, private_key=private_key, rng=rng,
        )  # fmt: skip
        credentials = self.connection.credentials()
        options = self.connection.channel_options(retry)
        self._channel = (
            aio.secure_channel(target, credentials, options) if credentials else aio.insecure_channel(target, options)
        )
        self._stub = serving_pb2_grpc.FlywheelStub(self._channel)

    async def generate(
        self,
        prompt_or_messages: str | Messages,
        *,
        user_id: str | None = None,
        client_request_id: str = "",
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> Answer:
        request = self._request(prompt_or_messages, user_id, client_request_id, tags, sampling)
        response = await self._unary(self._stub.Generate, request, timeout, request.user_id)
        return Answer.of(response, request.user_id, self)

    def stream(
        self,
        prompt_or_messages: str | Messages,
        *,
        user_id: str | None = None,
        client_request_id: str = "",
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> "AsyncAnswerStream":
        """The answer as text chunks: iterate it with `async for`; then `.answer` holds the whole Answer."""
        request = self._request(prompt_or_messages, user_id, client_request_id, tags, sampling)
        return AsyncAnswerStream(self, request, self._attempts(timeout))

    async def prefer(self, preferred: Answer, *, over: Answer, comment: str = "") -> FeedbackReceipt:
        return await self._submit(
            feedback_request(preferred, serving_pb2.RATING_UNSPECIFIED, comment, preferred_over=over)
        )

    async def policy(self, timeout: float | None = None) -> Policy:
        return Policy.of(await self._unary(self._stub.GetPolicy, serving_pb2.GetPolicyRequest(), timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncFlywheel":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _submit(self, request: serving_pb2.SubmitFeedbackRequest) -> FeedbackReceipt:
        response = await self._unary(self._stub.SubmitFeedback, request, None, request.user_id)
        return FeedbackReceipt(response.event_id, response.replaced_previous)

    async def _unary(self, method: Callable, request, timeout: float | None, user_id: str = ""):
        attempts = self._attempts(timeout)
        while True:
            try:
                return await method(request, metadata=self._metadata_for(user_id), timeout=attempts.time_left())
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.wait_before_retry(_raised(error)))


class AsyncAnswerStream:
    """AnswerStream for asyncio."""

    def __init__(self, client: AsyncFlywheel, request: serving_pb2.GenerateRequest, attempts: _Attempts):
        self.answer: Answer | None = None
        self._client = client
        self._request = request
        self._attempts = attempts
        self._call = None

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            started = False
            try:
                self._call = self._client._stub.GenerateStream(
                    self._request,
                    metadata=self._client._metadata_for(self._request.user_id),
                    timeout=self._attempts.time_left(),
                )
                async for message in self._call:
                    if message.HasField("summary"):
                        self.answer = Answer.of(message.summary, self._request.user_id, self._client)
                    else:
                        started = True
                        yield message.text_delta
                return
            except GeneratorExit:  # the caller stopped reading: stop the server generating
                self.cancel()
                raise
            except grpc.RpcError as error:
                if started:
                    raise _raised(error) from None
                await asyncio.sleep(self._attempts.wait_before_retry(_raised(error)))

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
