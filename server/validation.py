"""Checks on a GenerateRequest before it reaches the engine. Pure: no engine, no I/O."""

from dataclasses import dataclass

from flywheel.v1 import serving_pb2

CHAT_ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """A request field is out of bounds; maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int
    max_tokens_limit: int
    max_message_chars: int
    max_stop_strings: int


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


def validate_chat(chat: serving_pb2.ChatMessages, limits: RequestLimits) -> list[dict[str, str]]:
    if not chat.messages:
        raise InvalidRequest("chat.messages", "must hold at least one message")
    messages = []
    for i, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(f"chat.messages[{i}].role", f"{message.role!r} is not one of {', '.join(CHAT_ROLES)}")
        if len(message.content) > limits.max_message_chars:
            raise InvalidRequest(
                f"chat.messages[{i}].content",
                f"is {len(message.content)} characters; at most {limits.max_message_chars} are allowed",
            )
        messages.append({"role": message.role, "content": message.content})
    if not any(m["content"].strip() for m in messages):
        raise InvalidRequest("chat.messages", "every message is empty")
    return messages


def validate_prompt(prompt: str, limits: RequestLimits) -> str:
    if not prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > limits.max_message_chars:
        raise InvalidRequest("prompt", f"is {len(prompt)} characters; at most {limits.max_message_chars} are allowed")
    return prompt


def validate_sampling(sampling: serving_pb2.SamplingParams, limits: RequestLimits) -> Sampling:
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest("sampling.max_tokens", f"is {max_tokens}; allowed is 1 to {limits.max_tokens_limit}")
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    if not temperature >= 0:
        raise InvalidRequest("sampling.temperature", f"is {temperature}; it must be >= 0 (0 is greedy)")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", f"is {top_p}; it must be in (0, 1]")
    top_k = sampling.top_k if sampling.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest("sampling.top_k", f"is {top_k}; it must be >= 0 (0 disables it)")
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidRequest("sampling.stop", f"has {len(sampling.stop)} strings; at most {limits.max_stop_strings}")
    if any(not s for s in sampling.stop):
        raise InvalidRequest("sampling.stop", "stop strings must not be empty")
    min_tokens = sampling.min_tokens if sampling.HasField("min_tokens") else 0
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise InvalidRequest("sampling.min_tokens", f"is {min_tokens}; allowed is 0 to max_tokens")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        min_tokens=min_tokens,
    )


def fit_to_context(sampling: Sampling, prompt_tokens: int, max_model_len: int, limits: RequestLimits) -> Sampling:
    """Check the prompt and answer fit the model's context; fill in the default max_tokens."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            "prompt", f"is {prompt_tokens} tokens; the model's context holds {max_model_len} including the answer"
        )
    if sampling.max_tokens is None:
        return Sampling(**{**sampling.__dict__, "max_tokens": min(limits.default_max_tokens, room)})
    if sampling.max_tokens > room:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"is {sampling.max_tokens}, but the {prompt_tokens}-token prompt leaves room for {room} "
            f"in the model's context of {max_model_len}",
        )
    return sampling
