"""Rendering a prompt, or a chat, into the text and token ids a policy is asked."""

from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    token_ids: list[int]


LONG_TEXT_CHARS = 4096
"""Texts longer than this are tokenized with the GIL released (and the server renders them in a
worker thread): tens of milliseconds of tokenizing must not hold up the event loop."""


class PromptRenderer:
    """Prompt text and chat messages to the token ids the engine is given, with the model's tokenizer.

    The server renders every request with it, and the gate its golden prompts, so both ask the same.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend returns the ids `tokenizer.encode` returns, without the
        # Python batching around them (about 50 µs a request, a tenth of the server's CPU per call).
        self._backend = tokenizer.backend_tokenizer if tokenizer.is_fast else None
        if self._backend is not None:
            self._backend.encode_special_tokens = tokenizer.split_special_tokens

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (UTF-8 bytes of its text, which is never fewer).

        A text of n characters therefore needs at least n / max_token_chars tokens.
        """
        pieces = self.tokenizer.batch_decode([[token_id] for token_id in range(len(self.tokenizer))])
        return max(1, *(len(piece.encode()) for piece in pieces))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._backend is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if len(text) > LONG_TEXT_CHARS:
            # encode_batch runs with the GIL released; encode holds it for the whole text.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def chat(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return RenderedPrompt(text, self._encode(text, add_special_tokens=False))

    def user_message(self, content: str) -> RenderedPrompt:
        """One question asked as a single user chat message, as a chat client sends it."""
        return self.chat([{"role": "user", "content": content}])

    def prompt(self, prompt: str) -> RenderedPrompt:
        return RenderedPrompt(prompt, self._encode(prompt, add_special_tokens=True))
