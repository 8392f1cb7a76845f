"""Events from the request path to Kafka, through a local spool while Kafka does not take them.

`publish` only queues an event in memory; one background task sends the queue in rounds, in
publish order. Events of a round Kafka does not acknowledge go to the spool, and from then on
every new event goes behind them into the spool too, until the task has reached Kafka again
and replayed the spool in order. So each key's events reach Kafka in publish order, some
possibly twice (consumers drop repeats by event id).
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from google.protobuf.message import Message

from feedback.config import KafkaSettings, SpoolSettings
from feedback.connection import connection_options, ensure_topics
from feedback.envelope import OutgoingEvent
from feedback.metrics import EventMetrics
from feedback.spool import Spool

log = logging.getLogger(__name__)

ROUND_EVENTS = 500  # events per send or replay round


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
        self._spool_empty = True
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the spool, try Kafka once, and start sending; Kafka may be down (events then wait in the spool)."""
        self._spool = await asyncio.to_thread(Spool, self._spool_settings)
        self._spool_empty = self._spool.is_empty
        self._metrics.spool_bytes.set_function(lambda: self._spool.size_bytes)
        self._healthy = await self._reach_kafka()
        self._sender = asyncio.create_task(self._run(), name="event-producer")

    def publish(self, topic: str, key: str, event: Message) -> None:
        """Queue one event for `topic` and return at once.

        Raises ValueError when the event has no event_id, RuntimeError after `stop`. When more than
        max_pending_events wait in memory the event is dropped and counted (reason queue_full).
        """
        if self._stopping.is_set() or self._sender is None:
            raise RuntimeError("EventProducer is not running; call start() first, and publish nothing after stop()")
        outgoing = OutgoingEvent.of(topic, key, event)
        if len(self._pending) >= self._kafka.max_pending_events:
            self._metrics.events_dropped.labels(topic, "queue_full").inc()
            return
        self._pending.append(outgoing)
        self._drained.clear()
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until every published event, and everything spooled, is in Kafka.

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

    async def _run(self) -> None:
        while True:
            if not self._pending and self._spool_empty:
                self._drained.set()
            if self._healthy and self._spool_empty:
                round_events = await self._next_round()
                if not round_events:
                    return
                delivered = await self._send(round_events)
                await self._to_spool([event for event, ok in zip(round_events, delivered) if not ok])
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

    async def _send(self, events: Sequence[OutgoingEvent]) -> list[bool]:
        """Send events in order; return which of them Kafka acknowledged."""
        deliveries: list[asyncio.Future] = []
        not_sent: KafkaError | None = None
        try:
            producer = await self._connected()
            for event in events:
                deliveries.append(
                    await producer.send(event.topic, event.value, key=event.key.encode(), headers=event.headers())
                )
        except KafkaError as error:
            not_sent = error
        if deliveries:
            # An idempotent producer retries forever, so its deliveries are bounded here too.
            await asyncio.wait(deliveries, timeout=2 * self._kafka.request_timeout_ms / 1000)
        errors = [_delivery_error(delivery) for delivery in deliveries] + [not_sent] * (len(events) - len(deliveries))
        for delivery in deliveries:
            delivery.add_done_callback(_retrieve_exception)
        for event, error in zip(events, errors):
            if error is None:
                self._metrics.events_produced.labels(event.topic).inc()
        failed = [error for error in errors if error is not None]
        if failed:
            self._metrics.producer_errors.inc(len(failed))
            if self._healthy:
                log.warning("Kafka did not take %d events (%s); spooling until it answers again", len(failed), failed[0])
            self._healthy = False
        return [error is None for error in errors]

    async def _connected(self) -> AIOKafkaProducer:
        """The aiokafka producer, started on first use; raises KafkaError while Kafka cannot be reached."""
        if self._producer is None:
            producer = AIOKafkaProducer(
                **connection_options(self._kafka),
                acks="all",
                enable_idempotence=self._kafka.enable_idempotence,
                compression_type="gzip",
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
        delivered = await self._send(events)
        taken = delivered.index(False) if False in delivered else len(delivered)
        if taken:
            await asyncio.to_thread(self._spool.ack, records[taken - 1].end)
            self._spool_empty = self._spool.is_empty
            for event in events[:taken]:
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


def _retrieve_exception(delivery: asyncio.Future) -> None:
    """A delivery given up on may still fail later; its error is already counted."""
    if not delivery.cancelled():
        delivery.exception()
