"""A real Kafka broker for tests (the embedded Tansu), and what tests do with it. conftest.py loads these
fixtures for every module."""

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from feedback.broker import EmbeddedBroker
from feedback.config import KafkaSettings, SpoolSettings, TopicNames
from feedback.connection import connection_options
from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.v1 import events_pb2, serving_pb2

HANG_GUARD_S = 60  # only to fail instead of hanging; nothing here is a timing assertion

# A local broker answers in milliseconds: short timeouts make a failed send reach the spool
# quickly, and a short session makes the broker assign partitions to a new group quickly.
FAST = {"request_timeout_ms": 1000, "retry_backoff_ms": 50, "session_timeout_ms": 2000}


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    asyncio.run(broker.start())
    yield broker
    asyncio.run(broker.stop())


@pytest.fixture
def kafka_settings(kafka_broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for the shared broker, with topics of this test's own."""
    return with_own_topics(kafka_broker.kafka, "test")


def with_own_topics(kafka: KafkaSettings, name: str) -> KafkaSettings:
    """`kafka` with topics no other test uses (named `name`-<random>.*) and short timeouts."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    topics = TopicNames(
        generations=f"{prefix}.generations",
        feedback=f"{prefix}.feedback",
        policy=f"{prefix}.policy",
        dead_letters=f"{prefix}.dead-letters",
    )
    return kafka.model_copy(update={"topics": topics, **FAST})


def unreachable(kafka: KafkaSettings) -> KafkaSettings:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{probe.getsockname()[1]}"})


def new_id() -> str:
    return uuid.uuid4().hex


def generation(response_id: str, sequence: int = 0) -> events_pb2.GenerationLogged:
    event = events_pb2.GenerationLogged(
        event_id=new_id(),
        response_id=response_id,
        rendered_prompt="<|user|>What is 47+38?<|assistant|>",
        response_text="85",
        prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5],
        behavior_logprobs=[-0.25, -1.5],
        finish_reason=serving_pb2.FINISH_REASON_STOP,
        policy_version=3,
        user_id="alice",
        tags={"sequence": str(sequence)},
        server_id="server-a",
    )
    event.chat.messages.add(role="user", content="What is 47+38?")
    event.requested_at.GetCurrentTime()
    return event


async def consume(consumer: EventConsumer, count: int) -> list[ConsumedEvent]:
    events: list[ConsumedEvent] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events arrived"
        events += (await consumer.poll(timeout_ms=200)).events
    return events


async def read_raw(kafka: KafkaSettings, topic: str, count: int) -> list:
    consumer = AIOKafkaConsumer(topic, **connection_options(kafka), auto_offset_reset="earliest")
    await consumer.start()
    records: list = []
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while len(records) < count:
            assert time.monotonic() < deadline, f"only {len(records)} of {count} records arrived"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records += batch
    finally:
        await consumer.stop()
    return records


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def consume_all(kafka: KafkaSettings, topic: str, count: int) -> list[ConsumedEvent]:
    consumer = EventConsumer(kafka, uuid.uuid4().hex, EventMetrics.register(CollectorRegistry()), topics=[topic])
    await consumer.start()
    try:
        return await consume(consumer, count)
    finally:
        await consumer.stop()


async def publish_while_unreachable_then_replay(
    kafka: KafkaSettings,
    spool_dir: Path,
    registry: CollectorRegistry,
    metrics: EventMetrics,
    topic: str,
    events: Sequence[Message],
) -> float:
    """Publish `events` (keyed by response id) through a producer that cannot reach Kafka, so into its spool at
    `spool_dir`; then start a producer on that spool that can, and wait until it has replayed it.

    Returns how many events the first producer spooled (`registry` holds `metrics`).
    """
    earlier = EventProducer(unreachable(kafka), SpoolSettings(directory=spool_dir), metrics)
    await earlier.start()
    for event in events:
        earlier.publish(topic, event.response_id, event)
    await earlier.stop()
    spooled = sample(registry, "flywheel_events_spooled_total", topic=topic)

    restarted = EventProducer(kafka, SpoolSettings(directory=spool_dir), metrics)
    await restarted.start()
    async with asyncio.timeout(HANG_GUARD_S):
        await restarted.flush()
    await restarted.stop()
    return spooled
