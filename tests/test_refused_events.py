"""Events Kafka will never take are set aside, and cannot wedge the event log behind them.

Issue 13: a 1.1 MB tag made one GenerationLogged larger than Kafka takes; the producer retried it
at the head of its spool forever, and every later event of that replica queued behind it.

Tansu (the embedded broker) has no option for its largest message, so these tests make events
too large for the producer's own limit, kafka.max_message_bytes (aiokafka's max_request_size,
checked by send() before anything reaches the broker). A broker's refusal of the same kind
(MESSAGE_TOO_LARGE and the like) takes the same path; `permanent_refusal` sorts both.
"""

import asyncio
import base64
import json
import uuid

import pytest
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordListTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import CollectorRegistry

from feedback.config import KafkaSettings, SpoolSettings
from feedback.consumer import ConsumedEvent
from feedback.metrics import EventMetrics
from feedback.producer import QUARANTINE_FILE, EventProducer, dead_letter_headers, fit_dead_letter, permanent_refusal
from feedback.spool import Quarantine
from flywheel.registry import PolicyRegistry
from flywheel.v1 import events_pb2
from flywheel.v1.serving_pb2 import RATING_UP
from gate.config import GateSettings
from gate.service import Gate, GateMetrics, unusable_reason
from tests.kafka_fixtures import (
    HANG_GUARD_S,
    consume_all,
    generation,
    publish_while_unreachable_then_replay,
    read_raw,
    sample,
)
from trainer.config import RewardModelSettings

MAX_MESSAGE_BYTES = 2048  # a GenerationLogged of the tests is about 300 bytes as a record
OVERSIZED_TAG_BYTES = 4000


def oversized(response_id: str, sequence: int) -> events_pb2.GenerationLogged:
    """An answer with a tag too long for MAX_MESSAGE_BYTES, as the 1.1 MB tag of issue 13 was for 1 MiB."""
    event = generation(response_id, sequence)
    event.tags["notes"] = "x" * OVERSIZED_TAG_BYTES
    return event


def with_small_records(kafka: KafkaSettings) -> KafkaSettings:
    return kafka.model_copy(update={"max_message_bytes": MAX_MESSAGE_BYTES})


def mixed_traffic(keys: list[str], count: int) -> list[events_pb2.GenerationLogged]:
    """`count` answers over `keys` in turn; every seventh too large."""
    return [(oversized if number % 7 == 3 else generation)(keys[number % len(keys)], number) for number in range(count)]


def is_oversized(event: events_pb2.GenerationLogged) -> bool:
    return "notes" in event.tags


def assert_each_arrived_once_in_order_per_key(received: list[ConsumedEvent], sent: list[events_pb2.GenerationLogged]):
    assert sorted(event.event_id for event in received) == sorted(event.event_id for event in sent)  # once each
    for key in {event.response_id for event in sent}:
        assert [event.event for event in received if event.key == key] == [e for e in sent if e.response_id == key]


def assert_dead_lettered(records: list, refused: list[events_pb2.GenerationLogged], topic: str) -> None:
    """One dead letter per refused event, under its id and key, with why, its value cut to fit and saying so."""
    assert sorted(dict(record.headers)["event_id"].decode() for record in records) == sorted(
        e.event_id for e in refused
    )
    by_id = {event.event_id: event for event in refused}
    for record in records:
        assert len(record.value) < MAX_MESSAGE_BYTES
        letter = events_pb2.DeadLetter.FromString(record.value)
        event = by_id[dict(record.headers)["event_id"].decode()]
        whole = event.SerializeToString()
        assert (letter.source_topic, letter.key, letter.partition, letter.offset) == (
            topic,
            event.response_id.encode(),
            -1,
            -1,
        )
        assert letter.reason.startswith("message_too_large: [Error 10] MessageSizeTooLargeError: The message is ")
        assert f"value cut to its first {len(letter.value)} of {len(whole)} bytes" in letter.reason
        assert whole.startswith(letter.value) and len(letter.value) > MAX_MESSAGE_BYTES // 2


# Pure parts: no broker.


def test_only_errors_about_the_record_itself_are_permanent():
    assert permanent_refusal(MessageSizeTooLargeError("The message is 1100000 bytes")) == "message_too_large"
    assert permanent_refusal(RecordListTooLargeError()) == "record_list_too_large"
    assert permanent_refusal(CorruptRecordException()) == "corrupt_record"
    assert permanent_refusal(InvalidTopicError()) == "invalid_topic"
    transient = [
        None, KafkaConnectionError(), KafkaTimeoutError(), RequestTimedOutError(), TimeoutError("no acknowledgement"),
        NotLeaderForPartitionError(), TopicAuthorizationFailedError(), UnknownError(),
    ]  # fmt: skip
    assert [permanent_refusal(error) for error in transient] == [None] * len(transient)


def test_a_dead_letter_too_large_keeps_reason_and_key_and_cuts_its_value_to_fit():
    headers = dead_letter_headers("event-1")
    letter = events_pb2.DeadLetter(
        source_topic="flywheel.generations",
        key=b"resp-1",
        value=bytes(range(256)) * 20,
        reason="message_too_large: big",
    )
    assert fit_dead_letter(letter, headers, 8000) is letter  # 5120 bytes of value fit: left whole

    cut = fit_dead_letter(letter, headers, MAX_MESSAGE_BYTES)
    record_bytes = DefaultRecordBatchBuilder.estimate_size_in_bytes(cut.key, cut.SerializeToString(), headers)
    assert MAX_MESSAGE_BYTES - 16 < record_bytes <= MAX_MESSAGE_BYTES  # what aiokafka checks; cut no more than needed
    assert (cut.source_topic, cut.key) == (letter.source_topic, letter.key)
    assert cut.value == letter.value[: len(cut.value)]
    assert cut.reason == (
        f"message_too_large: big [value cut to its first {len(cut.value)} of 5120 bytes to fit kafka.max_message_bytes 2048]"
    )


def test_the_quarantine_is_bounded_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / QUARANTINE_FILE
    quarantine = Quarantine(path, max_bytes=25)
    assert quarantine.append(b'{"event_id": "a"}')  # 18 bytes with its newline
    assert not quarantine.append(b'{"event_id": "b"}')  # would pass 25
    with pytest.raises(ValueError, match="newline"):
        quarantine.append(b"two\nlines")
    quarantine.close()
    with open(path, "ab") as crashed_mid_write:
        crashed_mid_write.write(b'{"event_')
    reopened = Quarantine(path, max_bytes=100)
    assert reopened.size_bytes == 18
    assert reopened.append(b'{"event_id": "c"}')
    reopened.close()
    assert path.read_bytes() == b'{"event_id": "a"}\n{"event_id": "c"}\n'


def test_the_gate_refuses_a_vote_without_its_user_or_response_and_uses_the_rest(tmp_path):
    good = events_pb2.FeedbackGiven(
        event_id="v1", response_id="r1", user_id="alice", policy_version=1, rating=RATING_UP
    )
    no_user = events_pb2.FeedbackGiven(event_id="v2", response_id="r2", policy_version=1, rating=RATING_UP)
    no_response = events_pb2.FeedbackGiven(event_id="v3", user_id="bob", policy_version=1, rating=RATING_UP)
    assert unusable_reason(good) is None
    assert unusable_reason(no_user) == "FeedbackGiven: user_id must be set"
    assert unusable_reason(no_response) == "FeedbackGiven: response_id must be set"
    assert unusable_reason(generation("r1")) is None

    registry = PolicyRegistry(tmp_path / "registry")
    gate = Gate(GateSettings(), RewardModelSettings(), registry, GateMetrics(CollectorRegistry()))
    batch = [
        ConsumedEvent("feedback", 0, offset, e.response_id, e) for offset, e in enumerate([no_user, good, no_response])
    ]
    refused = gate.take(batch)
    assert [(consumed.offset, reason) for consumed, reason in refused] == [
        (0, "FeedbackGiven: user_id must be set"), (2, "FeedbackGiven: response_id must be set"),
    ]  # fmt: skip
    assert gate.thumbs.counts(1) == (0, 1)  # (thumbs down, all thumbs): only the good vote stands


# Through the broker.


def test_oversized_events_are_dead_lettered_and_every_other_arrives_once_in_order_per_key(kafka_settings, tmp_path):
    kafka = with_small_records(kafka_settings)
    topic = kafka.topics.generations
    sent = mixed_traffic([f"r{number}" for number in range(5)], 60)
    refused = [event for event in sent if is_oversized(event)]
    delivered = [event for event in sent if not is_oversized(event)]

    async def scenario():
        registry = CollectorRegistry()
        producer = EventProducer(kafka, SpoolSettings(directory=tmp_path), EventMetrics.register(registry))
        await producer.start()
        for event in sent:
            producer.publish(topic, event.response_id, event)
        async with asyncio.timeout(HANG_GUARD_S):
            await producer.flush()
        await producer.stop()
        received = await consume_all(kafka, topic, len(delivered))
        dead = await read_raw(kafka, kafka.topics.dead_letters, len(refused))
        return registry, received, dead

    registry, received, dead = asyncio.run(scenario())

    assert len(refused) == 9
    assert_each_arrived_once_in_order_per_key(received, delivered)
    assert_dead_lettered(dead, refused, topic)
    assert sample(registry, "flywheel_events_dead_lettered_total", topic=topic, reason="message_too_large") == len(
        refused
    )
    assert sample(registry, "flywheel_events_produced_total", topic=topic) == len(delivered)
    assert sample(registry, "flywheel_events_spooled_total", topic=topic) == 0  # nothing waited for Kafka
    assert sample(registry, "flywheel_events_quarantined_total", topic=topic, reason="message_too_large") == 0


def test_an_oversized_event_already_in_the_spool_is_moved_past_on_replay(kafka_settings, tmp_path):
    """The wedge of issue 13: a process spooled an event too large for Kafka; the next one replays its spool."""
    kafka = with_small_records(kafka_settings)
    topic = kafka.topics.generations
    sent = mixed_traffic(["r0", "r1", "r2"], 30)
    sent.insert(0, oversized("r0", -1))  # at the head of the spool
    refused = [event for event in sent if is_oversized(event)]
    delivered = [event for event in sent if not is_oversized(event)]

    async def scenario():
        registry = CollectorRegistry()
        metrics = EventMetrics.register(registry)
        spooled = await publish_while_unreachable_then_replay(kafka, tmp_path, registry, metrics, topic, sent)
        received = await consume_all(kafka, topic, len(delivered))
        dead = await read_raw(kafka, kafka.topics.dead_letters, len(refused))
        return registry, spooled, received, dead

    registry, spooled, received, dead = asyncio.run(scenario())

    assert spooled == len(sent) and len(refused) == 5
    assert_each_arrived_once_in_order_per_key(received, delivered)
    assert_dead_lettered(dead, refused, topic)
    assert sample(registry, "flywheel_events_replayed_total", topic=topic) == len(delivered)
    assert sample(registry, "flywheel_events_dead_lettered_total", topic=topic, reason="message_too_large") == len(
        refused
    )
    assert sample(registry, "flywheel_spool_bytes") == 0


def test_an_event_whose_dead_letter_is_refused_too_is_quarantined_and_the_rest_go_on(kafka_settings, tmp_path):
    """A key too large for a record: the dead letter keeps the key whole, so Kafka refuses it as well."""
    kafka = with_small_records(kafka_settings)
    topic = kafka.topics.feedback
    long_key = "k" * (MAX_MESSAGE_BYTES + 1)
    stuck = events_pb2.FeedbackGiven(event_id=uuid.uuid4().hex, response_id=long_key, user_id="bob", rating=RATING_UP)
    after = [events_pb2.FeedbackGiven(event_id=uuid.uuid4().hex, response_id="r1", user_id="bob") for _ in range(3)]

    async def scenario():
        registry = CollectorRegistry()
        producer = EventProducer(kafka, SpoolSettings(directory=tmp_path), EventMetrics.register(registry))
        await producer.start()
        for event in [stuck, *after]:
            producer.publish(topic, event.response_id, event)
        async with asyncio.timeout(HANG_GUARD_S):
            await producer.flush()
        await producer.stop()
        return registry, await consume_all(kafka, topic, len(after))

    registry, received = asyncio.run(scenario())

    assert [event.event for event in received] == after
    (line,) = (tmp_path / QUARANTINE_FILE).read_text().splitlines()
    quarantined = json.loads(line)
    assert (quarantined["topic"], quarantined["key"], quarantined["event_id"]) == (topic, long_key, stuck.event_id)
    assert quarantined["event_type"] == "flywheel.v1.FeedbackGiven"
    assert events_pb2.FeedbackGiven.FromString(base64.b64decode(quarantined["value_base64"])) == stuck
    assert quarantined["reason"].startswith("message_too_large: [Error 10] MessageSizeTooLargeError")
    assert "the dead letter was refused too: [Error 10] MessageSizeTooLargeError" in quarantined["reason"]
    assert sample(registry, "flywheel_events_quarantined_total", topic=topic, reason="message_too_large") == 1
    assert sample(registry, "flywheel_events_dead_lettered_total", topic=topic, reason="message_too_large") == 0


def test_an_event_the_producer_cannot_hold_is_reported_not_taken(kafka_settings, tmp_path):
    """SubmitFeedback refuses a vote the producer did not take, instead of answering with an id it will never log."""

    async def scenario() -> tuple[list[bool], float]:
        registry = CollectorRegistry()
        settings = kafka_settings.model_copy(update={"max_pending_events": 1})
        producer = EventProducer(settings, SpoolSettings(directory=tmp_path), EventMetrics.register(registry))
        await producer.start()
        try:
            taken = [producer.publish(kafka_settings.topics.generations, "r", generation(f"r{n}")) for n in range(2)]
        finally:
            await producer.stop()
        labels = {"topic": kafka_settings.topics.generations, "reason": "queue_full"}
        return taken, registry.get_sample_value("flywheel_events_dropped_total", labels)

    taken, dropped = asyncio.run(scenario())
    assert taken == [True, False] and dropped == 1
