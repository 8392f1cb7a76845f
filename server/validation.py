"""Checks on a GenerateRequest before it reaches the engine. Pure: no engine, no I/O.

Everything here costs time linear in the request's size and runs before any templating or
tokenizing, so an oversized request is refused for the price of reading its lengths. What only
the engine can judge (a sampling value it does not accept, a prompt longer than its context) is
checked by the engine seam, still before the request is queued in the engine.
"""

from dataclasses import dataclass

from pydantic import Field

from flywheel.errors import shown
from flywheel.settings import Settings
from flywheel.v1 import serving_pb2

CHAT_ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """A request field is out of bounds; maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class RequestLimits(Settings):
    """What one Generate request may hold. Every field that is stored, logged or echoed has a bound."""

    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_message_chars: int = Field(
        16384, ge=1, description="Largest prompt, or content of one chat message, in characters."
    )
    max_chat_messages: int = Field(64, ge=1, description="Most messages in one chat.")
    max_request_chars: int = Field(
        65536, ge=1, description="Most characters of prompt or chat text in one request, all messages together."
    )
    max_stop_strings: int = Field(8, ge=0, description="Most stop strings a request may give.")
    max_stop_string_chars: int = Field(64, ge=1, description="Longest stop string, in characters.")
    max_user_id_chars: int = Field(
        128, ge=1, description="Longest user_id, in characters (Generate and SubmitFeedback)."
    )
    max_client_request_id_chars: int = Field(128, ge=0, description="Longest client_request_id, in characters.")
    max_tags: int = Field(16, ge=0, description="Most tags on one request.")
    max_tag_key_chars: int = Field(64, ge=1, description="Longest tag name, in characters.")
    max_tag_value_chars: int = Field(256, ge=0, description="Longest tag value, in characters.")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="Largest serialized request message gRPC accepts; larger ones are refused unread."
    )


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters; max_tokens None means "fill the server default"."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    min_tokens: int


def _at_most(field: str, size: int, limit: int, unit: str) -> None:
    if size > limit:
        raise InvalidRequest(field, f"is {size} {unit}; at most {limit} are allowed")


def validate_envelope(request: serving_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """The fields logged beside the answer: user_id, client_request_id and tags."""
    _at_most("user_id", len(request.user_id), limits.max_user_id_chars, "characters")
    _at_most("client_request_id", len(request.client_request_id), limits.max_client_request_id_chars, "characters")
    _at_most("tags", len(request.tags), limits.max_tags, "tags")
    for name, value in request.tags.items():
        _at_most(f"tags[{shown(name)}]", len(name), limits.max_tag_key_chars, "characters in its name")
        _at_most(f"tags[{shown(name)}]", len(value), limits.max_tag_value_chars, "characters in its value")


def validate_chat(chat: serving_pb2.ChatMessages, limits: RequestLimits) -> list[dict[str, str]]:
    if not chat.messages:
        raise InvalidRequest("chat.messages", "must hold at least one message")
    _at_most("chat.messages", len(chat.messages), limits.max_chat_messages, "messages")
    total = 0
    messages = []
    for i, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"chat.messages[{i}].role", f"{shown(message.role)} is not one of {', '.join(CHAT_ROLES)}"
            )
        _at_most(f"chat.messages[{i}].content", len(message.content), limits.max_message_chars, "characters")
        total += len(message.content)
        messages.append({"role": message.role, "content": message.content})
    _at_most("chat.messages", total, limits.max_request_chars, "characters in all")
    if not any(m["content"].strip() for m in messages):
        raise InvalidRequest("chat.messages", "every message is empty")
    return messages


def validate_prompt(prompt: str, limits: RequestLimits) -> str:
    _at_most("prompt", len(prompt), min(limits.max_message_chars, limits.max_request_chars), "characters")
    if not prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    return prompt


def validate_sampling(sampling: serving_pb2.SamplingParams, limits: RequestLimits) -> Sampling:
    """Flywheel's own bounds; the engine seam then asks the engine whether it accepts the values."""
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest("sampling.max_tokens", f"is {max_tokens}; allowed is 1 to {limits.max_tokens_limit}")
    _at_most("sampling.stop", len(sampling.stop), limits.max_stop_strings, "strings")
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise InvalidRequest(f"sampling.stop[{i}]", "must not be empty")
        _at_most(f"sampling.stop[{i}]", len(stop), limits.max_stop_string_chars, "characters")
    top_k = sampling.top_k if sampling.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest("sampling.top_k", f"is {top_k}; it must be >= 0 (0 disables it)")
    min_tokens = sampling.min_tokens if sampling.HasField("min_tokens") else 0
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise InvalidRequest("sampling.min_tokens", f"is {min_tokens}; allowed is 0 to max_tokens")
    return Sampling(
        max_tokens=max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        min_tokens=min_tokens,
    )


def text_field(input_field: str) -> str:
    """The field an error about a request's text names: its prompt, or its chat's messages."""
    return "chat.messages" if input_field == "chat" else "prompt"


def too_long_for_context(chars: int, max_prompt_chars: int, input_field: str) -> None:
    """Refuse, untokenized, a text that cannot fit the model's context however it tokenizes.

    `max_prompt_chars`: the context's tokens (less one for the answer) times the most characters a
    token stands for.
    """
    if chars > max_prompt_chars:
        raise InvalidRequest(
            text_field(input_field),
            f"is {chars} characters; the model's context cannot hold more than {max_prompt_chars}",
        )


def fit_to_context(
    sampling: Sampling, prompt_tokens: int, max_model_len: int, limits: RequestLimits, input_field: str = "prompt"
) -> Sampling:
    """Check the prompt and answer fit the model's context; fill in the default max_tokens.

    `input_field`: which input the request gave ("prompt" or "chat"), named when it does not fit.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            text_field(input_field),
            f"is {prompt_tokens} tokens; the model's context holds {max_model_len} including the answer",
        )
    if sampling.max_tokens is None:
        filled = min(limits.default_max_tokens, room)
        if sampling.min_tokens > filled:
            raise InvalidRequest(
                "sampling.min_tokens",
                f"is {sampling.min_tokens}, above the default max_tokens {filled}; set max_tokens too",
            )
        return Sampling(**{**sampling.__dict__, "max_tokens": filled})
    if sampling.max_tokens > room:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"is {sampling.max_tokens}, but the {prompt_tokens}-token prompt leaves room for {room} "
            f"in the model's context of {max_model_len}",
        )
    return sampling
