"""Events out of Kafka for the trainer: decoded batches, commits only on the caller's word.

Records that are not events (undecodable value, unknown type, no event id) are sent to the
dead-letter topic with the reason and skipped; so are events the caller cannot use, through
`EventConsumer.dead_letter`. Delivery is at least once: a reader drops repeats by event id (the
trainer's join store does, persistently).
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.message import Message

from feedback.config import KafkaSettings
from feedback.connection import connection_options, ensure_topics
from feedback.envelope import Rejection, decode_event, event_types_by_topic
from feedback.metrics import EventMetrics
from feedback.producer import dead_letter_headers, fit_dead_letter
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumedEvent:
    topic: str
    partition: int
    offset: int
    key: str
    event: Message  # a GenerationLogged, FeedbackGiven or PolicyEvent

    @property
    def event_id(self) -> str:
        return self.event.event_id


@dataclass(frozen=True)
class EventBatch:
    events: list[ConsumedEvent]
    # Per partition, the offset after the last record of the batch, dead letters included: commit
    # it once every event of the batch is durably used.
    next_offsets: dict[TopicPartition, int]


class EventConsumer:
    """One member of consumer group `group_id`, reading `topics` (default: generations, feedback, policy)."""

    def __init__(
        self, kafka: KafkaSettings, group_id: str, metrics: EventMetrics, topics: Sequence[str] | None = None
    ) -> None:
        self._kafka = kafka
        self._topics = list(topics or [kafka.topics.generations, kafka.topics.feedback, kafka.topics.policy])
        self._types_by_topic = event_types_by_topic(kafka.topics)
        self._group_id = group_id
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Join the group; raises aiokafka's KafkaError when Kafka cannot be reached."""
        if self._kafka.create_topics:
            await ensure_topics(self._kafka)
        self._dead_letters = AIOKafkaProducer(
            **connection_options(self._kafka),
            acks="all",
            request_timeout_ms=self._kafka.request_timeout_ms,
            max_request_size=self._kafka.max_message_bytes,
        )
        await self._dead_letters.start()
        self._consumer = AIOKafkaConsumer(
            *self._topics,
            **connection_options(self._kafka),
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group starts from the oldest event Kafka still has
            session_timeout_ms=self._kafka.session_timeout_ms,
            heartbeat_interval_ms=self._kafka.session_timeout_ms // 3,
        )
        await self._consumer.start()

    async def poll(self, timeout_ms: int = 1000, max_records: int = 500) -> EventBatch:
        """The next records, at most `max_records`, waiting up to `timeout_ms` for the first.

        Raises KafkaError when a dead letter cannot be written; the batch is then read again next time.
        """
        records = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        events: list[ConsumedEvent] = []
        try:
            for partition, partition_records in records.items():
                for record in partition_records:
                    decoded = decode_event(record.topic, record.headers, record.value, self._types_by_topic)
                    if isinstance(decoded, Rejection):
                        dead_letter = events_pb2.DeadLetter(
                            source_topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            key=record.key or b"",
                            value=record.value or b"",
                        )
                        await self._send_dead_letter(dead_letter, decoded.reason, decoded.detail)
                    else:
                        key = (record.key or b"").decode(errors="replace")
                        events.append(ConsumedEvent(record.topic, partition.partition, record.offset, key, decoded))
        except KafkaError:
            for partition, partition_records in records.items():
                self._consumer.seek(partition, partition_records[0].offset)
            raise
        next_offsets = {partition: batch[-1].offset + 1 for partition, batch in records.items()}
        return EventBatch(events, next_offsets)

    async def dead_letter(self, consumed: ConsumedEvent, reason: str, detail: str) -> None:
        """Send an event the caller cannot use to the dead-letter topic; commit its offset then as if it was used.

        `reason` is a metric label (e.g. refused_by_trainer), `detail` says what is wrong with the
        event. The dead letter holds the event as decoded, serialized again. Raises KafkaError when
        Kafka does not take the dead letter.
        """
        dead_letter = events_pb2.DeadLetter(
            source_topic=consumed.topic,
            partition=consumed.partition,
            offset=consumed.offset,
            key=consumed.key.encode(),
            value=consumed.event.SerializeToString(),
        )
        await self._send_dead_letter(dead_letter, reason, detail)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read: everything before it is used."""
        await self._consumer.commit(dict(offsets))

    async def lag(self) -> dict[str, int]:
        """Per topic, records Kafka holds beyond this member's read position (its assigned partitions)."""
        lag: dict[str, int] = {}
        for partition in self._consumer.assignment():
            highwater = self._consumer.highwater(partition)
            if highwater is None:
                continue
            behind = highwater - await self._consumer.position(partition)
            lag[partition.topic] = lag.get(partition.topic, 0) + max(behind, 0)
        return lag

    async def stop(self) -> None:
        """Leave the group without committing anything more."""
        await self._consumer.stop()
        await self._dead_letters.stop()

    async def _send_dead_letter(self, dead_letter: events_pb2.DeadLetter, reason: str, detail: str) -> None:
        """Send `dead_letter` (its source position, key and value set) with why; its value is cut to fit if need be."""
        dead_letter.reason = f"{reason}: {detail}"
        dead_letter.at.GetCurrentTime()
        # The source position identifies a dead letter, so a re-read record gives the same id.
        dead_letter_id = f"{dead_letter.source_topic}/{dead_letter.partition}/{dead_letter.offset}"
        headers = dead_letter_headers(dead_letter_id)
        dead_letter = fit_dead_letter(dead_letter, headers, self._kafka.max_message_bytes)
        await self._dead_letters.send_and_wait(
            self._kafka.topics.dead_letters,
            dead_letter.SerializeToString(),
            key=dead_letter.key or None,
            headers=headers,
        )
        self._metrics.dead_letters.labels(dead_letter.source_topic, reason).inc()
        log.warning("dead-lettered %s: %s", dead_letter_id, dead_letter.reason)
