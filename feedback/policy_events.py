"""Policy events, built one way by all who announce them: the trainer (candidates), the gate
(verdicts and rollbacks), the operator's rollback, and each server (live)."""

import time

from flywheel.v1 import events_pb2


def policy_event(
    kind: int, version: int, parent_version: int | None = None, *, event_id: str = "", **fields
) -> events_pb2.PolicyEvent:
    """A PolicyEvent about `version`, stamped now.

    kind: a `events_pb2.PolicyEventKind`. parent_version: None is sent as 0 (no parent).
    event_id: empty for one unique to this call, `<kind>-<version>-<ns>`; give one to make a
    repeat of the same announcement the same event (a consumer drops it by id).
    fields: PolicyEvent's other fields (path, digest, reasons, checks, server_id).
    """
    event = events_pb2.PolicyEvent(
        event_id=event_id or f"{events_pb2.PolicyEventKind.Name(kind).lower()}-{version}-{time.time_ns()}",
        kind=kind,
        policy_version=version,
        parent_version=parent_version or 0,
        **fields,
    )
    event.at.GetCurrentTime()
    return event
