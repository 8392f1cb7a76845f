"""Settings of the Kafka layer: how to reach the cluster, which topics, and the local spool."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from flywheel.settings import Settings


class TopicNames(Settings):
    """The four event topics (see proto/flywheel/v1/events.proto)."""

    generations: str = Field("flywheel.generations", description="GenerationLogged, keyed by response_id.")
    feedback: str = Field("flywheel.feedback", description="FeedbackGiven, keyed by response_id.")
    policy: str = Field("flywheel.policy", description="PolicyEvent, keyed by policy version.")
    dead_letters: str = Field(
        "flywheel.dead-letters", description="DeadLetter: events Kafka refused for good, or consumers could not use."
    )

    def all(self) -> list[str]:
        return [self.generations, self.feedback, self.policy, self.dead_letters]


class KafkaSettings(Settings):
    """How producers, consumers and the topic admin reach Kafka."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    client_id: str = Field("flywheel", description="Client id the brokers log and quota by.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers; empty means the system CAs.")
    ssl_certfile: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Key of ssl_certfile.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    enable_idempotence: bool = Field(
        False, description="Idempotent producer: on for a real cluster; the embedded broker rejects it."
    )
    # Short on purpose: events wait this long in memory before they fall back to the spool, and
    # a healthy broker answers in milliseconds. Metadata is refreshed often so a restarted broker
    # is noticed quickly.
    request_timeout_ms: int = Field(
        3000, ge=100, description="Longest wait for a produce or metadata answer before an event goes to the spool."
    )
    retry_backoff_ms: int = Field(200, ge=10, description="Pause between attempts to reach the broker again.")
    metadata_max_age_ms: int = Field(10_000, ge=1000, description="Cluster metadata is refreshed at least this often.")
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="A consumer silent this long loses its partitions to the rest of its group (heartbeats every "
        "third of it). The embedded broker also waits half of it before assigning a new group's partitions.",
    )
    create_topics: bool = Field(
        True,
        description="Create missing topics at start and after an outage (the embedded broker forgets them when it "
        "restarts); turn off where operators provision topics.",
    )
    topics: TopicNames = TopicNames()
    partitions: int = Field(3, ge=1, description="Partitions of each topic this process creates.")
    replication_factor: int = Field(1, ge=1, description="Replicas of each topic this process creates.")
    max_pending_events: int = Field(
        10_000, ge=1, description="Events a producer holds in memory before it drops new ones (reason queue_full)."
    )
    max_message_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest record to send (aiokafka's max_request_size); a larger event is dead-lettered.",
    )

    @model_validator(mode="after")
    def _sasl_complete(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        return self


class SpoolSettings(Settings):
    """The local file spool holding events while Kafka is unreachable."""

    directory: Path = Field(Path("spool"), description="Owned by one producer process at a time (it is locked).")
    max_bytes: int = Field(1 << 30, gt=0, description="Bytes on disk, at most; further events are dropped.")
    segment_bytes: int = Field(
        4 << 20, gt=0, description="A segment file is closed past this size; acknowledged ones are deleted."
    )
    quarantine_max_bytes: int = Field(
        64 << 20,
        gt=0,
        description="Bytes of the quarantine file (events whose dead letter Kafka refused too), at most.",
    )

    def of_process(self, process: str) -> "SpoolSettings":
        """This spool as one process uses it: in its own subfolder, `directory / process`, since a
        spool directory is locked by the one producer that owns it."""
        return self.model_copy(update={"directory": self.directory / process})
