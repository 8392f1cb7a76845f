"""Error messages that echo what a client sent: short, ASCII, and safe to return as a gRPC status."""

MAX_STATUS_MESSAGE_CHARS = 1000
"""gRPC carries a status message in a trailer that clients cap (16 KB in grpc-core, percent-encoded)."""

SHOWN_VALUE_CHARS = 64


def shown(value: object) -> str:
    """A client-supplied value as it may appear in an error message: ASCII, quoted, at most 64 characters."""
    text = ascii(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[: SHOWN_VALUE_CHARS - 4]}...{text[-1]}"


def status_message(text: str) -> str:
    """An error message safe to send as a gRPC status: ASCII, short enough for any client's trailer."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= MAX_STATUS_MESSAGE_CHARS else text[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."


def field_of(message: str) -> str | None:
    """The request field a status message names first ("sampling.top_p: must be ..."), or None when it names none.

    Every refusal Flywheel sends about one field starts with the field's path and a colon; a
    message about the call as a whole (capacity, auth) starts with words.
    """
    head, colon, _ = message.partition(": ")
    if not colon or not head or " " in head:
        return None
    return head
