"""Events through a real Kafka broker: round trips, dead letters, commits, and a broker outage."""

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from feedback import policy_events
from feedback.broker import EmbeddedBroker
from feedback.config import SpoolSettings, TopicNames
from feedback.connection import connection_options
from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.envelope import EVENT_TYPES, OutgoingEvent, decode_event, event_types_by_topic
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.v1 import events_pb2, serving_pb2
from tests.kafka_fixtures import (
    FAST,
    HANG_GUARD_S,
    consume,
    generation,
    new_id,
    publish_while_unreachable_then_replay,
    read_raw,
    sample,
)

OUTAGE_EVENTS = 600  # published while the broker is down


def feedback(response_id: str, **fields) -> events_pb2.FeedbackGiven:
    return events_pb2.FeedbackGiven(
        event_id=new_id(), response_id=response_id, user_id="bob", rating=serving_pb2.RATING_UP, **fields
    )


def policy_event() -> events_pb2.PolicyEvent:
    return events_pb2.PolicyEvent(
        event_id=new_id(),
        kind=events_pb2.POLICY_EVENT_KIND_APPROVED,
        policy_version=4,
        parent_version=3,
        checks=[events_pb2.GateCheck(name="kl_to_reference", value=1.5, threshold=3.0, passed=True)],
    )


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.05)


# Pure parts: no broker.


def test_decode_types_by_header_then_by_topic_and_says_why_not():
    topics = TopicNames()
    by_topic = event_types_by_topic(topics)
    event = feedback("r1")
    typed = [("event_type", b"flywheel.v1.FeedbackGiven")]

    assert decode_event("anywhere", typed, event.SerializeToString(), by_topic) == event
    assert decode_event(topics.feedback, [], event.SerializeToString(), by_topic) == event
    assert decode_event("anywhere", [], event.SerializeToString(), by_topic).reason == "unknown_type"
    assert decode_event("x", [("event_type", b"flywheel.v1.Nope")], b"", by_topic).reason == "unknown_type"
    assert decode_event("x", typed, b"\xff\xff\xff", by_topic).reason == "undecodable"
    no_id = events_pb2.FeedbackGiven(response_id="r1")
    assert decode_event("x", typed, no_id.SerializeToString(), by_topic).reason == "missing_event_id"


def test_an_outgoing_event_survives_the_spool_record_encoding():
    outgoing = OutgoingEvent.of("flywheel.generations", "r1", generation("r1"))
    assert OutgoingEvent.from_record(outgoing.to_record()) == outgoing
    assert dict(outgoing.headers()) == {
        "event_id": outgoing.event_id.encode(),
        "event_type": b"flywheel.v1.GenerationLogged",
    }
    with pytest.raises(ValueError, match="event_id is empty"):
        OutgoingEvent.of("flywheel.feedback", "r1", events_pb2.FeedbackGiven())


def test_a_policy_event_is_stamped_now_with_an_id_of_its_own_unless_given_one():
    first, second = (
        policy_events.policy_event(events_pb2.POLICY_EVENT_KIND_REJECTED, 5, None, reasons=["kl_to_reference: 4 > 3"])
        for _ in range(2)
    )
    assert first.event_id.startswith("policy_event_kind_rejected-5-") and first.event_id != second.event_id
    assert (first.kind, first.policy_version, first.parent_version) == (events_pb2.POLICY_EVENT_KIND_REJECTED, 5, 0)
    assert list(first.reasons) == ["kl_to_reference: 4 > 3"] and abs(first.at.ToSeconds() - time.time()) < 60
    candidate = policy_events.policy_event(events_pb2.POLICY_EVENT_KIND_CANDIDATE, 6, 5, event_id="candidate-6-ab12")
    assert (candidate.event_id, candidate.parent_version) == ("candidate-6-ab12", 5)


# Through the broker.


def test_each_event_type_round_trips_with_id_and_type_headers(kafka_settings, tmp_path):
    topics = kafka_settings.topics
    sent = [
        (topics.generations, "r1", generation("r1")),
        (topics.feedback, "r1", feedback("r1", comment="right", preferred_over_response_id="r0")),
        (topics.policy, "4", policy_event()),
    ]

    async def scenario():
        registry = CollectorRegistry()
        metrics = EventMetrics.register(registry)
        producer = EventProducer(kafka_settings, SpoolSettings(directory=tmp_path), metrics)
        await producer.start()
        for topic, key, event in sent:
            producer.publish(topic, key, event)
        await producer.flush()
        await producer.stop()

        consumer = EventConsumer(kafka_settings, new_id(), metrics)
        await consumer.start()
        received = await consume(consumer, 3)
        await consumer.stop()
        raw = {topic: await read_raw(kafka_settings, topic, 1) for topic, _, _ in sent}
        return registry, received, raw

    registry, received, raw = asyncio.run(scenario())

    by_topic = {event.topic: event for event in received}
    for topic, key, event in sent:
        assert by_topic[topic].event == event
        assert by_topic[topic].key == key
        assert by_topic[topic].event_id == event.event_id
        (record,) = raw[topic]
        assert dict(record.headers) == {
            "event_id": event.event_id.encode(),
            "event_type": event.DESCRIPTOR.full_name.encode(),
        }
        assert sample(registry, "flywheel_events_produced_total", topic=topic) == 1
    assert set(EVENT_TYPES) == {event.DESCRIPTOR.full_name for _, _, event in sent}


def test_malformed_records_go_to_the_dead_letter_topic_and_consumption_goes_on(kafka_settings):
    topic = kafka_settings.topics.feedback
    good = feedback("r1")
    typed = [("event_type", b"flywheel.v1.FeedbackGiven"), ("event_id", b"x")]
    malformed = [
        (b"\xff\xff\xff", typed, "undecodable"),
        (good.SerializeToString(), [("event_type", b"flywheel.v1.Nope")], "unknown_type"),
        (events_pb2.FeedbackGiven(response_id="r1").SerializeToString(), typed, "missing_event_id"),
    ]

    async def scenario():
        registry = CollectorRegistry()
        consumer = EventConsumer(kafka_settings, new_id(), EventMetrics.register(registry))
        await consumer.start()  # creates the topics
        raw_producer = AIOKafkaProducer(**connection_options(kafka_settings))
        await raw_producer.start()
        for value, headers, _ in malformed:
            await raw_producer.send_and_wait(topic, value, key=b"r1", headers=headers)
        await raw_producer.send_and_wait(topic, good.SerializeToString(), key=b"r1", headers=typed[:1])
        await raw_producer.stop()

        received = await consume(consumer, 1)
        await consumer.stop()
        dead = await read_raw(kafka_settings, kafka_settings.topics.dead_letters, len(malformed))
        return registry, received, dead

    registry, received, dead = asyncio.run(scenario())

    assert [event.event for event in received] == [good]
    dead_letters = [events_pb2.DeadLetter.FromString(record.value) for record in dead]
    assert [letter.reason.split(":")[0] for letter in dead_letters] == [reason for _, _, reason in malformed]
    assert [letter.value for letter in dead_letters] == [value for value, _, _ in malformed]
    assert all(letter.source_topic == topic and letter.key == b"r1" for letter in dead_letters)
    assert [letter.offset for letter in dead_letters] == [0, 1, 2]
    for _, _, reason in malformed:
        assert sample(registry, "flywheel_dead_letters_total", topic=topic, reason=reason) == 1


def test_only_committed_events_are_skipped_by_the_next_member_of_the_group(kafka_settings, tmp_path):
    topic = kafka_settings.topics.feedback
    sent = [feedback("r1") for _ in range(10)]  # one key: one partition, one order
    group_id = new_id()

    async def scenario():
        metrics = EventMetrics.register(CollectorRegistry())
        producer = EventProducer(kafka_settings, SpoolSettings(directory=tmp_path), metrics)
        await producer.start()
        for event in sent:
            producer.publish(topic, "r1", event)
        await producer.stop()

        first_member = EventConsumer(kafka_settings, group_id, metrics, topics=[topic])
        await first_member.start()
        first_read = await consume(first_member, 10)
        used = first_read[3]
        await first_member.commit({TopicPartition(used.topic, used.partition): used.offset + 1})
        await first_member.stop()

        next_member = EventConsumer(kafka_settings, group_id, metrics, topics=[topic])
        await next_member.start()
        second_read = await consume(next_member, 6)
        await next_member.stop()
        return first_read, second_read

    first_read, second_read = asyncio.run(scenario())

    assert [event.event for event in first_read] == sent
    assert [event.event for event in second_read] == sent[4:]


def test_events_spooled_while_kafka_was_unreachable_are_replayed_by_the_next_producer(kafka_settings, tmp_path):
    topic = kafka_settings.topics.feedback
    sent = [feedback(f"r{number % 3}") for number in range(30)]

    async def scenario():
        registry = CollectorRegistry()
        metrics = EventMetrics.register(registry)
        spooled = await publish_while_unreachable_then_replay(kafka_settings, tmp_path, registry, metrics, topic, sent)
        consumer = EventConsumer(kafka_settings, new_id(), metrics, topics=[topic])
        await consumer.start()
        received = await consume(consumer, len(sent))
        await consumer.stop()
        return registry, spooled, received

    registry, spooled, received = asyncio.run(scenario())

    assert spooled == len(sent)
    assert sample(registry, "flywheel_events_replayed_total", topic=topic) == len(sent)
    for key in ("r0", "r1", "r2"):
        assert [event.event for event in received if event.key == key] == [e for e in sent if e.response_id == key]


@pytest.mark.broker  # a broker of its own, to stop and start again
def test_events_published_through_a_broker_outage_arrive_once_each_in_order_per_key(tmp_path):
    keys = [f"r{number}" for number in range(10)]
    published: list[events_pb2.GenerationLogged] = []

    async def scenario():
        registry = CollectorRegistry()
        metrics = EventMetrics.register(registry)
        async with EmbeddedBroker() as broker:
            kafka = broker.kafka.model_copy(update=FAST)
            topic = kafka.topics.generations
            producer = EventProducer(kafka, SpoolSettings(directory=tmp_path), metrics)
            await producer.start()

            def publish(count: int) -> None:
                for _ in range(count):
                    key = keys[len(published) % len(keys)]
                    event = generation(key, sequence=len(published))
                    producer.publish(topic, key, event)
                    published.append(event)

            async def read_all(group_id: str, count: int) -> list[ConsumedEvent]:
                consumer = EventConsumer(kafka, group_id, metrics, topics=[topic])
                await consumer.start()
                events = await consume(consumer, count)
                await consumer.stop()
                return events

            publish(200)
            await producer.flush()
            # Tansu keeps records in memory only: read them before stopping it.
            before_outage = await read_all("before-outage", 200)

            await broker.stop()
            publish(OUTAGE_EVENTS)
            await until(lambda: sample(registry, "flywheel_events_spooled_total", topic=topic) >= OUTAGE_EVENTS)
            await broker.start()  # same port, empty
            publish(200)  # while the spool may still be replaying: these must queue behind it
            await producer.flush()
            await producer.stop()
            after_outage = await read_all("after-outage", OUTAGE_EVENTS + 200)
        return registry, topic, before_outage + after_outage

    registry, topic, received = asyncio.run(scenario())

    first_by_id: dict[str, ConsumedEvent] = {}
    for event in received:  # delivery is at least once: keep each event's first arrival
        first_by_id.setdefault(event.event_id, event)
    arrived = list(first_by_id.values())
    assert sorted(event.event_id for event in arrived) == sorted(event.event_id for event in published)
    sequences_by_key: dict[str, list[int]] = defaultdict(list)
    for event in arrived:
        sequences_by_key[event.key].append(int(event.event.tags["sequence"]))
    for key in keys:
        expected = [number for number, event in enumerate(published) if event.response_id == key]
        assert sequences_by_key[key] == expected, f"events of {key} out of order"
    assert sample(registry, "flywheel_events_replayed_total", topic=topic) >= OUTAGE_EVENTS
    assert sample(registry, "flywheel_events_dropped_total", topic=topic, reason="spool_full") == 0
    assert sample(registry, "flywheel_spool_bytes") == 0
