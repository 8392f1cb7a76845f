"""Events from the request path to Kafka, through a local spool while Kafka does not take them.

`publish` only queues an event in memory; one background task sends the queue in rounds, in
publish order. Events of a round Kafka does not acknowledge go to the spool, and from then on
every new event goes behind them into the spool too, until the task has reached Kafka again
and replayed the spool in order. So each key's events reach Kafka in publish order, some
possibly twice (consumers drop repeats by event id).

An event Kafka will never take (too large, say: see `permanent_refusal`) must not wait at the
head of the spool forever with every later event behind it. It goes to the dead-letter topic
instead, its value cut to fit if need be; if Kafka refuses the dead letter too, to the
quarantine file in the spool directory. Either way it is counted, and the events after it go on.
"""

import asyncio
import base64
import contextlib
import json
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from google.protobuf.message import Message

from feedback.config import KafkaSettings, SpoolSettings
from feedback.connection import connection_options, ensure_topics
from feedback.envelope import EVENT_ID_HEADER, EVENT_TYPE_HEADER, OutgoingEvent
from feedback.metrics import EventMetrics
from feedback.spool import Quarantine, Spool
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

ROUND_EVENTS = 500  # events per send or replay round
QUARANTINE_FILE = "quarantine.jsonl"  # in the spool directory

# Errors about the record itself, by reason (a metric label): sending it again cannot succeed.
# Everything else (broker down, timeouts, leader moves, authorization) may pass once an operator
# or the cluster fixes it, so those events wait in the spool. Kafka's INVALID_RECORD (87) has no
# class in aiokafka: it arrives as UnknownError and is retried.
PERMANENT_REFUSALS: dict[type[KafkaError], str] = {
    MessageSizeTooLargeError: "message_too_large",  # raised by send() too, past max_request_size
    RecordTooLargeError: "message_too_large",
    RecordListTooLargeError: "record_list_too_large",
    CorruptRecordException: "corrupt_record",
    InvalidTopicError: "invalid_topic",
    InvalidTimestampError: "invalid_timestamp",
    UnsupportedForMessageFormatError: "unsupported_for_message_format",
}


def permanent_refusal(error: BaseException | None) -> str | None:
    """Why Kafka will never take a record that failed with `error`, as a metric label; None when it may later."""
    for refused, reason in PERMANENT_REFUSALS.items():
        if isinstance(error, refused):
            return reason
    return None


def retriable(error: BaseException | None) -> bool:
    """Whether a send failed with `error` (None: it did not fail) may succeed when tried again."""
    return error is not None and permanent_refusal(error) is None


@dataclass(frozen=True)
class Refusal:
    """An event Kafka will never take."""

    event: OutgoingEvent
    reason: str  # from PERMANENT_REFUSALS
    detail: str  # the error, for people


def refusals(events: Sequence[OutgoingEvent], errors: Sequence[BaseException | None]) -> list[Refusal]:
    """The events whose send failed for good, in order."""
    return [
        Refusal(event, reason, str(error))
        for event, error in zip(events, errors)
        if (reason := permanent_refusal(error)) is not None
    ]


def dead_letter_headers(dead_letter_id: str) -> list[tuple[str, bytes]]:
    dead_letter_type = events_pb2.DeadLetter.DESCRIPTOR.full_name
    return [(EVENT_ID_HEADER, dead_letter_id.encode()), (EVENT_TYPE_HEADER, dead_letter_type.encode())]


def fit_dead_letter(
    dead_letter: events_pb2.DeadLetter, headers: list[tuple[str, bytes]], max_message_bytes: int
) -> events_pb2.DeadLetter:
    """`dead_letter` as one record of at most `max_message_bytes`, keyed by its key, with `headers`.

    Whole when it fits; else its value is cut to what fits and its reason says so. The key and
    the reason are kept whole, so a dead letter whose key alone is too large still does not fit.
    """
    if _record_bytes(dead_letter, headers) <= max_message_bytes:
        return dead_letter
    whole = len(dead_letter.value)
    cut = events_pb2.DeadLetter()
    cut.CopyFrom(dead_letter)
    cut.value = b""
    cut.reason = _cut_reason(dead_letter.reason, whole, whole, max_message_bytes)  # the longest it gets
    # 8: the value's length prefixes in the proto and in the record grow with it.
    kept = min(whole, max(0, max_message_bytes - _record_bytes(cut, headers) - 8))
    cut.reason = _cut_reason(dead_letter.reason, kept, whole, max_message_bytes)
    cut.value = dead_letter.value[:kept]
    return cut


def _cut_reason(reason: str, kept: int, whole: int, max_message_bytes: int) -> str:
    return (
        f"{reason} [value cut to its first {kept} of {whole} bytes to fit kafka.max_message_bytes {max_message_bytes}]"
    )


def _record_bytes(dead_letter: events_pb2.DeadLetter, headers: list[tuple[str, bytes]]) -> int:
    """The size aiokafka checks against max_request_size."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(dead_letter.key, dead_letter.SerializeToString(), headers)


def dead_letter_event(refusal: Refusal, dead_letters_topic: str, max_message_bytes: int) -> OutgoingEvent:
    """The dead letter of a refused event, under the event's id and key; partition and offset -1: it never was in Kafka."""
    event = refusal.event
    dead_letter = events_pb2.DeadLetter(
        source_topic=event.topic,
        partition=-1,
        offset=-1,
        key=event.key.encode(),
        value=event.value,
        reason=f"{refusal.reason}: {refusal.detail}",
    )
    dead_letter.at.GetCurrentTime()
    dead_letter = fit_dead_letter(dead_letter, dead_letter_headers(event.event_id), max_message_bytes)
    return OutgoingEvent(
        dead_letters_topic, event.key, event.event_id, dead_letter.DESCRIPTOR.full_name, dead_letter.SerializeToString()
    )


def quarantine_line(refusal: Refusal, dead_letter_error: BaseException, at: datetime) -> bytes:
    """A refused event as one JSON line, its value in base64, with why Kafka refused it and its dead letter."""
    event = refusal.event
    return json.dumps(
        {
            "at": at.isoformat(),
            "topic": event.topic,
            "key": event.key,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "reason": f"{refusal.reason}: {refusal.detail}; the dead letter was refused too: {dead_letter_error}",
            "value_base64": base64.b64encode(event.value).decode(),
        }
    ).encode()


class EventProducer:
    """Publishes events to Kafka without ever blocking the caller; see the module docstring."""

    def __init__(self, kafka: KafkaSettings, spool: SpoolSettings, metrics: EventMetrics) -> None:
        self._kafka = kafka
        self._spool_settings = spool
        self._metrics = metrics
        self._pending: deque[OutgoingEvent] = deque()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._stopping = asyncio.Event()
        self._healthy = False  # Kafka took the last round, and metadata was refreshed after the last failure
        self._failures = 0  # failed attempts to reach Kafka in a row
        self._producer: AIOKafkaProducer | None = None
        self._spool: Spool | None = None
        self._quarantine: Quarantine | None = None
        self._spool_empty = True
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the spool, try Kafka once, and start sending; Kafka may be down (events then wait in the spool)."""
        self._spool = await asyncio.to_thread(Spool, self._spool_settings)
        self._quarantine = await asyncio.to_thread(
            Quarantine, self._spool_settings.directory / QUARANTINE_FILE, self._spool_settings.quarantine_max_bytes
        )
        self._spool_empty = self._spool.is_empty
        self._metrics.spool_bytes.set_function(lambda: self._spool.size_bytes)
        self._healthy = await self._reach_kafka()
        self._sender = asyncio.create_task(self._run(), name="event-producer")
        self._sender.add_done_callback(_log_sender_failure)

    def publish(self, topic: str, key: str, event: Message) -> bool:
        """Queue one event for `topic` and return at once: whether it was taken.

        Raises ValueError when the event has no event_id, RuntimeError after `stop`. An event is not
        taken, and is counted (events_dropped), when more than max_pending_events wait in memory
        (queue_full) or when the sending task has died (sender_failed; it logged why); the caller
        decides what an untaken event means (SubmitFeedback refuses the vote).
        """
        if self._stopping.is_set() or self._sender is None:
            raise RuntimeError("EventProducer is not running; call start() first, and publish nothing after stop()")
        outgoing = OutgoingEvent.of(topic, key, event)
        if self._sender.done():
            self._metrics.events_dropped.labels(topic, "sender_failed").inc()
            return False
        if len(self._pending) >= self._kafka.max_pending_events:
            self._metrics.events_dropped.labels(topic, "queue_full").inc()
            return False
        self._pending.append(outgoing)
        self._drained.clear()
        self._wakeup.set()
        return True

    async def flush(self) -> None:
        """Wait until every published event, and everything spooled, is in Kafka (or set aside: dead-lettered, quarantined).

        Waits out a Kafka outage; bound it with `asyncio.timeout` where that matters.
        """
        drained = asyncio.ensure_future(self._drained.wait())
        try:
            await asyncio.wait({drained, self._sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
        if self._sender.done():
            self._sender.result()

    async def stop(self) -> None:
        """Deliver what is queued and spooled while Kafka takes it, leave the rest in the spool, and close.

        The next producer on the same spool directory replays what is left.
        """
        self._stopping.set()
        self._wakeup.set()
        try:
            await self._sender
        finally:
            if self._producer is not None:
                # An idempotent producer would wait for an unreachable Kafka forever; what it holds is spooled.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._producer.stop(), self._kafka.request_timeout_ms / 1000)
            self._spool.close()
            self._quarantine.close()

    async def _run(self) -> None:
        while True:
            if not self._pending and self._spool_empty:
                self._drained.set()
            if self._healthy and self._spool_empty:
                round_events = await self._next_round()
                if not round_events:
                    return
                errors = await self._send(round_events)
                await self._to_spool([event for event, error in zip(round_events, errors) if retriable(error)])
                await self._set_aside(refusals(round_events, errors))
            else:
                await self._to_spool(self._take_pending(len(self._pending)))
                if not await self._replay():
                    if self._stopping.is_set():
                        return
                    await self._pause()

    async def _next_round(self) -> list[OutgoingEvent]:
        while not self._pending and not self._stopping.is_set():
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._take_pending(ROUND_EVENTS)

    def _take_pending(self, count: int) -> list[OutgoingEvent]:
        return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    async def _send(self, events: Sequence[OutgoingEvent]) -> list[BaseException | None]:
        """Send events in order; return, per event, why Kafka did not acknowledge it (None: it did)."""
        attempts: list[asyncio.Future | KafkaError] = []
        try:
            producer = await self._connected()
            for event in events:
                try:
                    attempts.append(
                        await producer.send(event.topic, event.value, key=event.key.encode(), headers=event.headers())
                    )
                except KafkaError as error:
                    if permanent_refusal(error) is None:
                        raise
                    attempts.append(error)  # refused before sending (too large): the others still go
        except KafkaError as error:
            attempts += [error] * (len(events) - len(attempts))
        deliveries = [attempt for attempt in attempts if isinstance(attempt, asyncio.Future)]
        if deliveries:
            # An idempotent producer retries forever, so its deliveries are bounded here too.
            await asyncio.wait(deliveries, timeout=2 * self._kafka.request_timeout_ms / 1000)
        errors = [_delivery_error(attempt) if isinstance(attempt, asyncio.Future) else attempt for attempt in attempts]
        for delivery in deliveries:
            delivery.add_done_callback(_retrieve_exception)
        for event, error in zip(events, errors):
            if error is None:
                self._metrics.events_produced.labels(event.topic).inc()
        failed = [error for error in errors if error is not None]
        self._metrics.producer_errors.inc(len(failed))
        to_retry = [error for error in failed if retriable(error)]
        if to_retry:
            if self._healthy:
                log.warning(
                    "Kafka did not take %d events (%s); spooling until it answers again", len(to_retry), to_retry[0]
                )
            self._healthy = False
        return errors

    async def _connected(self) -> AIOKafkaProducer:
        """The aiokafka producer, started on first use; raises KafkaError while Kafka cannot be reached."""
        if self._producer is None:
            producer = AIOKafkaProducer(
                **connection_options(self._kafka),
                acks="all",
                enable_idempotence=self._kafka.enable_idempotence,
                compression_type="gzip",
                max_request_size=self._kafka.max_message_bytes,
                request_timeout_ms=self._kafka.request_timeout_ms,
            )
            try:
                await producer.start()
            except KafkaError:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _reach_kafka(self) -> bool:
        """Create missing topics (a restarted embedded broker has none), refresh metadata; return whether Kafka answered."""
        try:
            if self._kafka.create_topics:
                await ensure_topics(self._kafka)
            producer = await self._connected()
            # Metadata cached before a broker restart may name partitions the new one lacks.
            if not await producer.client.force_metadata_update():
                raise KafkaError("cannot refresh cluster metadata")
        except KafkaError as error:
            if self._failures == 0:
                log.warning(
                    "cannot reach Kafka at %s (%s); events wait in the spool", self._kafka.bootstrap_servers, error
                )
            return False
        return True

    async def _replay(self) -> bool:
        """Reach Kafka again and send it the oldest spooled events; return whether it took them all."""
        if not self._healthy:
            if not await self._reach_kafka():
                return False
            self._healthy = True
            self._failures = 0
            if not self._spool_empty:
                log.info("reached Kafka; replaying %d spooled bytes", self._spool.size_bytes)
        records = await asyncio.to_thread(self._spool.read, ROUND_EVENTS)
        events = [OutgoingEvent.from_record(record.payload) for record in records]
        errors = await self._send(events)
        # Kafka took the events before the first one it may take later; those it never will are set aside.
        taken = next((index for index, error in enumerate(errors) if retriable(error)), len(events))
        await self._set_aside(refusals(events[:taken], errors[:taken]))
        if taken:
            await asyncio.to_thread(self._spool.ack, records[taken - 1].end)
            self._spool_empty = self._spool.is_empty
            for event, error in zip(events[:taken], errors[:taken]):
                if error is None:
                    self._metrics.events_replayed.labels(event.topic).inc()
        return taken == len(events)

    async def _to_spool(self, events: Sequence[OutgoingEvent]) -> None:
        if not events:
            return
        taken = await asyncio.to_thread(self._spool.append, [event.to_record() for event in events])
        for event in events[:taken]:
            self._metrics.events_spooled.labels(event.topic).inc()
        for event in events[taken:]:
            self._metrics.events_dropped.labels(event.topic, "spool_full").inc()
        self._spool_empty = self._spool.is_empty

    async def _set_aside(self, refused: Sequence[Refusal]) -> None:
        """Dead-letter the events Kafka will never take; quarantine those whose dead letter it does not take either."""
        if not refused:
            return
        topic, max_bytes = self._kafka.topics.dead_letters, self._kafka.max_message_bytes
        dead_letters = [dead_letter_event(refusal, topic, max_bytes) for refusal in refused]
        for refusal, error in zip(refused, await self._send(dead_letters)):
            event = refusal.event
            if error is None:
                self._metrics.events_dead_lettered.labels(event.topic, refusal.reason).inc()
                log.warning(
                    "Kafka refuses event %s of %s for good, dead-lettered: %s",
                    event.event_id,
                    event.topic,
                    refusal.detail,
                )
            elif await asyncio.to_thread(self._quarantine.append, quarantine_line(refusal, error, datetime.now(UTC))):
                self._metrics.events_quarantined.labels(event.topic, refusal.reason).inc()
                log.error(
                    "Kafka refuses event %s of %s for good (%s), and its dead letter (%s): quarantined in %s",
                    event.event_id,
                    event.topic,
                    refusal.detail,
                    error,
                    self._spool_settings.directory / QUARANTINE_FILE,
                )
            else:
                self._metrics.events_dropped.labels(event.topic, "quarantine_full").inc()
                log.error(
                    "Kafka refuses event %s of %s for good (%s), and its dead letter (%s); the quarantine is full: dropped",
                    event.event_id,
                    event.topic,
                    refusal.detail,
                    error,
                )

    async def _pause(self) -> None:
        """Back off exponentially, from retry_backoff_ms up to request_timeout_ms; a stop cuts it short."""
        self._failures += 1
        backoff_ms = min(self._kafka.retry_backoff_ms * 2 ** (self._failures - 1), self._kafka.request_timeout_ms)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), backoff_ms / 1000)


def _delivery_error(delivery: asyncio.Future) -> BaseException | None:
    """Why Kafka did not acknowledge a record; None when it did."""
    if not delivery.done():
        return TimeoutError("no acknowledgement in time")
    return delivery.exception()


def _log_sender_failure(sender: asyncio.Task) -> None:
    if not sender.cancelled() and sender.exception() is not None:
        log.error("the event producer stopped sending; new events are refused", exc_info=sender.exception())


def _retrieve_exception(delivery: asyncio.Future) -> None:
    """A delivery given up on may still fail later; its error is already counted."""
    if not delivery.cancelled():
        delivery.exception()
