"""The Flywheel gRPC service: validate, translate, delegate to the engine."""

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from feedback.config import TopicNames
from feedback.intake import FeedbackIntake, FeedbackRefused
from feedback.tokens import FeedbackClaims, issue_feedback_token
from flywheel.errors import status_message
from flywheel.logs import request_id_var
from flywheel.prompts import LONG_TEXT_CHARS, RenderedPrompt
from flywheel.v1 import events_pb2, serving_pb2, serving_pb2_grpc
from server.admission import AdmissionController, Overloaded
from server.engine import GenerationDelta, PolicyEngine
from server.interceptors import principal_var
from server.metrics import ServingMetrics
from server.policy import EventLog, LivePolicy
from server.validation import (
    InvalidRequest,
    RequestLimits,
    Sampling,
    fit_to_context,
    too_long_for_context,
    validate_chat,
    validate_envelope,
    validate_prompt,
    validate_sampling,
)

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": serving_pb2.FINISH_REASON_STOP,
    "length": serving_pb2.FINISH_REASON_LENGTH,
    "abort": serving_pb2.FINISH_REASON_ABORT,
}


RATING_LABELS = {serving_pb2.RATING_UP: "up", serving_pb2.RATING_DOWN: "down"}


@dataclass(frozen=True)
class ValidatedInput:
    """A request's prompt or chat messages, checked against the limits but not yet rendered."""

    prompt: str | None
    messages: list[dict[str, str]] | None

    @property
    def chars(self) -> int:
        """Characters of text the request gives: its prompt, or its messages' contents together."""
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(message["content"]) for message in self.messages)


@dataclass
class Answer:
    """An answer as it accumulates from engine deltas."""

    response_id: str
    arrived_at: float
    """time.monotonic() when the request arrived."""
    requested_at: Timestamp = field(default_factory=Timestamp)
    admitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    behavior_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: GenerationDelta) -> None:
        if self.first_token_at is None and delta.token_ids:
            self.first_token_at = delta.first_token_at or time.monotonic()
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.behavior_logprobs.extend(delta.behavior_logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def timings(self) -> serving_pb2.Timings:
        first_token_at = self.first_token_at or self.finished_at
        return serving_pb2.Timings(
            queue_seconds=self.admitted_at - self.arrived_at,
            time_to_first_token_seconds=first_token_at - self.arrived_at,
            total_seconds=self.finished_at - self.arrived_at,
        )


class FlywheelService(serving_pb2_grpc.FlywheelServicer):
    def __init__(
        self,
        engine: PolicyEngine,
        policy: LivePolicy,
        admission: AdmissionController,
        limits: RequestLimits,
        metrics: ServingMetrics,
        feedback_token_secret: bytes,
        feedback_token_ttl_seconds: int,
        intake: FeedbackIntake,
        events: EventLog | None,
        topics: TopicNames,
        server_id: str,
    ):
        self._engine = engine
        self._policy = policy
        self._admission = admission
        self._limits = limits
        self._metrics = metrics
        self._token_secret = feedback_token_secret
        self._token_ttl = feedback_token_ttl_seconds
        self._intake = intake
        self._events = events
        self._topics = topics
        self._server_id = server_id

    async def Generate(self, request, context):
        summary = None
        async for event in self._generate(request, context, rpc="Generate", whole=True):
            if isinstance(event, serving_pb2.GenerateResponse):
                summary = event
        return summary

    async def GenerateStream(self, request, context):
        # Closing this stream (the HTTP door does, when its client leaves) closes the answer with it, at once:
        # its engine request is aborted and its admission slot freed before aclose() returns.
        async with contextlib.aclosing(self._generate(request, context, rpc="GenerateStream", whole=False)) as events:
            async for event in events:
                if isinstance(event, serving_pb2.GenerateResponse):
                    yield serving_pb2.GenerateStreamResponse(summary=event)
                elif event:
                    yield serving_pb2.GenerateStreamResponse(text_delta=event)

    async def GetPolicy(self, request, context):
        live = self._policy.current
        live_since = Timestamp()
        live_since.FromDatetime(live.live_since)
        return serving_pb2.PolicyInfo(
            policy_version=live.version, model_path=live.model_path, digest=live.digest, live_since=live_since
        )

    async def SubmitFeedback(self, request, context):
        if self._events is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this server does not log feedback (log_generations is off)"
            )
        try:
            event, replaced = self._intake.accept(request, principal_var.get())
        except FeedbackRefused as refused:
            self._metrics.feedback_rejected.labels(reason=refused.refusal.name.lower()).inc()
            await context.abort(getattr(grpc.StatusCode, refused.refusal.value), status_message(str(refused)))
        if not self._events.publish(self._topics.feedback, event.response_id, event):
            self._metrics.feedback_rejected.labels(reason="event_log_full").inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server cannot log feedback right now (its event queue is full); retry later",
            )
        rating = "preference" if event.preferred_over_response_id else RATING_LABELS[event.rating]
        self._metrics.feedback.labels(rating=rating, policy_version=str(event.policy_version)).inc()
        log.info("feedback", extra={"response_id": event.response_id, "rating": rating, "replaced": replaced})
        return serving_pb2.SubmitFeedbackResponse(event_id=event.event_id, replaced_previous=replaced)

    async def _generate(
        self, request, context: aio.ServicerContext, rpc: str, whole: bool
    ) -> AsyncIterator[str | serving_pb2.GenerateResponse]:
        """Yield text deltas (one with the whole text if `whole`), then the summary response."""
        answer = Answer(response_id=f"resp-{uuid.uuid4().hex}", arrived_at=time.monotonic())
        answer.requested_at.GetCurrentTime()
        request_id_var.set(answer.response_id)
        principal = principal_var.get()
        try:
            validated, sampling = self._validate(request)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(str(error)))
        try:
            async with self._admission.slot(principal):
                answer.admitted_at = time.monotonic()
                self._metrics.queue_seconds.observe(answer.admitted_at - answer.arrived_at)
                prompt = await self._render(validated)
                sampling = fit_to_context(
                    sampling,
                    len(prompt.token_ids),
                    self._engine.max_model_len,
                    self._limits,
                    request.WhichOneof("input"),
                )
                policy = self._policy.for_user(principal, request.user_id)
                async for delta in self._engine.stream(
                    answer.response_id, prompt, sampling, whole=whole, adapter=policy.adapter
                ):
                    answer.add(delta)
                    yield delta.text
        except Overloaded as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, status_message(str(error)))
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(str(error)))
        answer.finished_at = time.monotonic()
        self._observe(answer, rpc, prompt_tokens=len(prompt.token_ids))
        self._metrics.answers.labels(policy_version=str(policy.version)).inc()
        log.info(
            "answered",
            extra={
                "rpc": rpc,
                "client_request_id": request.client_request_id,
                "policy_version": policy.version,
                "completion_tokens": len(answer.token_ids),
                "finish_reason": answer.finish_reason,
                "total_seconds": round(answer.finished_at - answer.arrived_at, 4),
            },
        )
        if self._events is not None:
            logged = generation_logged(request, prompt, sampling, answer, policy.version, self._server_id, principal)
            self._events.publish(self._topics.generations, answer.response_id, logged)
        yield serving_pb2.GenerateResponse(
            response_id=answer.response_id,
            client_request_id=request.client_request_id,
            text=answer.text,
            finish_reason=FINISH_REASONS.get(answer.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED),
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=len(answer.token_ids),
            policy_version=policy.version,
            feedback_token=self._feedback_token(answer.response_id, policy.version, request.user_id, principal),
            timings=answer.timings(),
        )

    def _validate(self, request: serving_pb2.GenerateRequest) -> tuple[ValidatedInput, Sampling]:
        """Every bound checked, for the price of reading lengths; nothing rendered or tokenized yet."""
        validate_envelope(request, self._limits)
        sampling = validate_sampling(request.sampling, self._limits)
        self._engine.sampling_params(sampling)  # what only the engine can judge, before the request queues
        match request.WhichOneof("input"):
            case "prompt":
                prompt = validate_prompt(request.prompt, self._limits)
                validated = ValidatedInput(prompt, None)
            case "chat":
                messages = validate_chat(request.chat, self._limits)
                validated = ValidatedInput(None, messages)
            case _:
                raise InvalidRequest("input", "set either prompt or chat")
        too_long_for_context(validated.chars, self._engine.max_prompt_chars, request.WhichOneof("input"))
        return validated, sampling

    async def _render(self, validated: ValidatedInput) -> RenderedPrompt:
        """Template and tokenize: on the event loop when short, else in a worker thread."""
        if validated.prompt is not None:
            render, argument = self._engine.render_prompt, validated.prompt
        else:
            render, argument = self._engine.render_chat, validated.messages
        if validated.chars <= LONG_TEXT_CHARS:  # a thread hop would cost more than tokenizing it
            return render(argument)
        return await asyncio.to_thread(render, argument)

    def _observe(self, answer: Answer, rpc: str, prompt_tokens: int) -> None:
        timings = answer.timings()
        self._metrics.time_to_first_token.observe(timings.time_to_first_token_seconds)
        self._metrics.request_duration.labels(rpc=rpc).observe(timings.total_seconds)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.completion_tokens.inc(len(answer.token_ids))

    def _feedback_token(self, response_id: str, policy_version: int, user_id: str, principal: str) -> str:
        claims = FeedbackClaims(
            response_id=response_id,
            policy_version=policy_version,
            user_id=user_id,
            principal=principal,
            expires_at=int(time.time()) + self._token_ttl,
        )
        return issue_feedback_token(self._token_secret, claims)


def generation_logged(
    request: serving_pb2.GenerateRequest,
    prompt: RenderedPrompt,
    sampling: Sampling,
    answer: Answer,
    policy_version: int,
    server_id: str,
    principal: str,
) -> events_pb2.GenerationLogged:
    """The Kafka record of one finished answer, with the sampling parameters as the engine applied them."""
    event = events_pb2.GenerationLogged(
        event_id=uuid.uuid4().hex,
        response_id=answer.response_id,
        rendered_prompt=prompt.text,
        response_text=answer.text,
        prompt_token_ids=prompt.token_ids,
        response_token_ids=answer.token_ids,
        behavior_logprobs=answer.behavior_logprobs,
        sampling=serving_pb2.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=sampling.stop,
            min_tokens=sampling.min_tokens,
        ),
        finish_reason=FINISH_REASONS.get(answer.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED),
        policy_version=policy_version,
        user_id=request.user_id,
        client_request_id=request.client_request_id,
        tags=dict(request.tags),
        requested_at=answer.requested_at,
        server_id=server_id,
        principal=principal,
    )
    if sampling.seed is not None:
        event.sampling.seed = sampling.seed
    if request.WhichOneof("input") == "chat":
        event.chat.CopyFrom(request.chat)
    else:
        event.prompt = request.prompt
    event.finished_at.GetCurrentTime()
    return event


def random_token_secret() -> bytes:
    return secrets.token_bytes(32)
