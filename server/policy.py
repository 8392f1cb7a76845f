"""Which policy the server answers with."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.message import Message


@dataclass(frozen=True)
class PolicySnapshot:
    version: int
    model_path: str
    digest: str
    live_since: datetime


class LivePolicy:
    """The live policy; read `current` once per request so a request sees one version."""

    def __init__(self, initial: PolicySnapshot):
        self.current = initial

    @staticmethod
    def snapshot(version: int, model_path: str, digest: str) -> PolicySnapshot:
        return PolicySnapshot(version, model_path, digest, datetime.now(UTC))


class EventLog(Protocol):
    """Where the server sends its events: `feedback.producer.EventProducer` (never blocks)."""

    def publish(self, topic: str, key: str, event: Message) -> bool: ...
