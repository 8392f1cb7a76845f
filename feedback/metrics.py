"""Prometheus metrics of the Kafka layer, registered in the registry the process owns."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class EventMetrics:
    events_produced: Counter
    events_spooled: Counter
    events_replayed: Counter
    events_dropped: Counter
    events_dead_lettered: Counter
    events_quarantined: Counter
    spool_bytes: Gauge
    producer_errors: Counter
    dead_letters: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> "EventMetrics":
        return cls(
            events_produced=Counter(
                "flywheel_events_produced",
                "Events acknowledged by Kafka, replays included.",
                ["topic"],
                registry=registry,
            ),
            events_spooled=Counter(
                "flywheel_events_spooled",
                "Events written to the local spool because Kafka did not take them.",
                ["topic"],
                registry=registry,
            ),
            events_replayed=Counter(
                "flywheel_events_replayed",
                "Spooled events later acknowledged by Kafka.",
                ["topic"],
                registry=registry,
            ),
            events_dropped=Counter(
                "flywheel_events_dropped",
                "Events lost: reason queue_full (memory), spool_full or quarantine_full (disk).",
                ["topic", "reason"],
                registry=registry,
            ),
            events_dead_lettered=Counter(
                "flywheel_events_dead_lettered",
                "Published events Kafka refuses for good (reason, e.g. message_too_large), sent to the dead-letter topic.",
                ["topic", "reason"],
                registry=registry,
            ),
            events_quarantined=Counter(
                "flywheel_events_quarantined",
                "Published events Kafka refuses for good, dead letter too, written to the spool's quarantine file.",
                ["topic", "reason"],
                registry=registry,
            ),
            spool_bytes=Gauge("flywheel_spool_bytes", "Bytes of spool segment files on disk.", registry=registry),
            producer_errors=Counter(
                "flywheel_producer_errors",
                "Events whose send to Kafka failed (each attempt counts).",
                registry=registry,
            ),
            dead_letters=Counter(
                "flywheel_dead_letters",
                "Consumed messages sent to the dead-letter topic instead of being used.",
                ["topic", "reason"],
                registry=registry,
            ),
        )
