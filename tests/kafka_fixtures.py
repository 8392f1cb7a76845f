"""A real Kafka broker for tests: the embedded Tansu. conftest.py loads these fixtures for every module."""

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from feedback.broker import EmbeddedBroker
from feedback.config import KafkaSettings, TopicNames

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
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    topics = TopicNames(
        generations=f"{prefix}.generations",
        feedback=f"{prefix}.feedback",
        policy=f"{prefix}.policy",
        dead_letters=f"{prefix}.dead-letters",
    )
    return kafka_broker.kafka.model_copy(update={"topics": topics, **FAST})
