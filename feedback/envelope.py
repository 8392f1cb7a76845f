"""How an event travels on Kafka: a serialized proto as the value, its id and type as headers.

Both ends live here: `OutgoingEvent` is what the producer sends (and spools), `decode_event`
is how a consumer turns a record back into a proto message, or says why it cannot.
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from google.protobuf.message import DecodeError, Message

from feedback.config import TopicNames
from flywheel.v1 import events_pb2

EVENT_ID_HEADER = "event_id"
EVENT_TYPE_HEADER = "event_type"

EVENT_TYPES: dict[str, type[Message]] = {
    message.DESCRIPTOR.full_name: message
    for message in (events_pb2.GenerationLogged, events_pb2.FeedbackGiven, events_pb2.PolicyEvent)
}

FIELD_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class OutgoingEvent:
    """One serialized event and where it goes."""

    topic: str
    key: str
    event_id: str
    event_type: str  # the proto's full name, e.g. flywheel.v1.FeedbackGiven
    value: bytes

    @classmethod
    def of(cls, topic: str, key: str, event: Message) -> "OutgoingEvent":
        event_type = event.DESCRIPTOR.full_name
        if not event.event_id:
            raise ValueError(f"{event_type}.event_id is empty; every event needs a unique id")
        return cls(topic, key, event.event_id, event_type, event.SerializeToString())

    def headers(self) -> list[tuple[str, bytes]]:
        return [(EVENT_ID_HEADER, self.event_id.encode()), (EVENT_TYPE_HEADER, self.event_type.encode())]

    def to_record(self) -> bytes:
        """The event as one spool record: each field length-prefixed."""
        fields = [self.topic.encode(), self.key.encode(), self.event_id.encode(), self.event_type.encode(), self.value]
        return b"".join(FIELD_LENGTH.pack(len(field)) + field for field in fields)

    @classmethod
    def from_record(cls, record: bytes) -> "OutgoingEvent":
        fields, offset = [], 0
        while offset < len(record):
            (length,) = FIELD_LENGTH.unpack_from(record, offset)
            fields.append(record[offset + FIELD_LENGTH.size : offset + FIELD_LENGTH.size + length])
            offset += FIELD_LENGTH.size + length
        topic, key, event_id, event_type, value = fields
        return cls(topic.decode(), key.decode(), event_id.decode(), event_type.decode(), value)


@dataclass(frozen=True)
class Rejection:
    """Why a consumed record is not an event; `reason` is a metric label, `detail` is for people."""

    reason: Literal["undecodable", "unknown_type", "missing_event_id"]
    detail: str


def event_types_by_topic(topics: TopicNames) -> dict[str, type[Message]]:
    """The type a record on each topic has when it carries no event_type header."""
    return {
        topics.generations: events_pb2.GenerationLogged,
        topics.feedback: events_pb2.FeedbackGiven,
        topics.policy: events_pb2.PolicyEvent,
    }


def decode_event(
    topic: str, headers: Sequence[tuple[str, bytes]], value: bytes | None, types_by_topic: dict[str, type[Message]]
) -> Message | Rejection:
    """The event in a record, typed by its event_type header, else by its topic."""
    header_values = dict(headers)
    if EVENT_TYPE_HEADER in header_values:
        event_type = header_values[EVENT_TYPE_HEADER].decode(errors="replace")
        message_type = EVENT_TYPES.get(event_type)
        if message_type is None:
            return Rejection("unknown_type", f"event_type header {event_type!r} is none of {sorted(EVENT_TYPES)}")
    else:
        message_type = types_by_topic.get(topic)
        if message_type is None:
            return Rejection("unknown_type", f"no event_type header, and topic {topic!r} has no default event type")
    event = message_type()
    try:
        event.ParseFromString(value or b"")
    except DecodeError as error:
        return Rejection("undecodable", f"value is not a {message_type.DESCRIPTOR.full_name}: {error}")
    if not event.event_id:
        return Rejection("missing_event_id", f"{message_type.DESCRIPTOR.full_name} has an empty event_id")
    return event
