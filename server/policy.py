"""Which policy the server answers with: the live version, or for a share of users the canary."""

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.message import Message

from flywheel.registry import CanaryRecord


@dataclass(frozen=True)
class PolicySnapshot:
    version: int
    model_path: str
    digest: str
    live_since: datetime
    adapter_path: str | None = None
    """The version's adapter directory, applied to the engine's base per request; None for the engine's own weights."""

    @property
    def adapter(self) -> tuple[int, str] | None:
        """What the engine needs to answer with this version's adapter (PolicyEngine.stream)."""
        return None if self.adapter_path is None else (self.version, self.adapter_path)


@dataclass(frozen=True)
class CanaryServing:
    """A candidate this server answers a share of users with, beside the live version."""

    policy: PolicySnapshot
    share: float


def canary_bucket(principal: str, user_id: str, canary_version: int) -> float:
    """Where a user falls in [0, 1) for one canary: the same user, the same place, on every replica.

    A user is (principal, user_id): the same user id under two API keys is two users. The canary's
    version is in the hash, so each canary draws its own users instead of always the same few.
    """
    digest = hashlib.sha256(f"{principal}\0{user_id}\0{canary_version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def serves_canary(principal: str, user_id: str, canary_version: int, share: float) -> bool:
    """Whether this user is answered by the canary: sticky for as long as the canary and its share stay."""
    return canary_bucket(principal, user_id, canary_version) < share


def whole_weight_version(live_version: int, canary: CanaryRecord | None, canary_replica: bool) -> int:
    """The version a whole-weight server loads: on a canary replica, the canary while one runs against live;
    otherwise live.

    A canary ends when live moves off the version it was compared with (`canary.against`), and the
    replica returns to live: the canary itself when it was promoted (nothing to reload), the
    version it was compared with when it was rejected.
    """
    if canary_replica and canary is not None and canary.against == live_version:
        return canary.version
    return live_version


class LivePolicy:
    """The live policy and the canary; pick once per request (`for_user`) so a request sees one version."""

    def __init__(self, initial: PolicySnapshot):
        self.current = initial
        self.canary: CanaryServing | None = None

    def for_user(self, principal: str, user_id: str) -> PolicySnapshot:
        """The version that answers this user now: the canary for its share of users, else live."""
        canary = self.canary
        if canary is not None and serves_canary(principal, user_id, canary.policy.version, canary.share):
            return canary.policy
        return self.current

    @staticmethod
    def snapshot(version: int, model_path: str, digest: str, adapter_path: str | None = None) -> PolicySnapshot:
        return PolicySnapshot(version, model_path, digest, datetime.now(UTC), adapter_path)


class EventLog(Protocol):
    """Where the server sends its events: `feedback.producer.EventProducer` (never blocks)."""

    def publish(self, topic: str, key: str, event: Message) -> bool: ...
