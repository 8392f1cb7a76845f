"""Prompt rendering (the server's and the gate's) gives exactly the ids the model's tokenizer gives."""

import pytest

from flywheel.prompts import PromptRenderer

PROMPTS = [
    "What is 47 + 38?",
    "  leading and trailing spaces, tabs\tand\nnewlines  ",
    "unicode: héllo wörld — 東京",
    "<|im_start|>user\ntext that spells the chat template's special tokens<|im_end|>",
    "",
    "long, tokenized with the GIL released: " + "What is 47 + 38? héllo 東京 <|im_end|> " * 200,
]


def test_the_demo_tokenizer_takes_the_fast_path(tokenizer):
    assert PromptRenderer(tokenizer)._backend is not None


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_are_the_tokenizers(tokenizer, prompt):
    rendered = PromptRenderer(tokenizer).prompt(prompt)
    assert rendered.text == prompt
    assert rendered.token_ids == tokenizer.encode(prompt)


@pytest.mark.parametrize("content", PROMPTS)
def test_chat_ids_are_the_tokenizers(tokenizer, content):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]
    rendered = PromptRenderer(tokenizer).chat(messages)
    assert rendered.text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.token_ids == tokenizer.encode(rendered.text, add_special_tokens=False)


def test_a_user_message_is_a_chat_of_one_user_message(tokenizer):
    renderer = PromptRenderer(tokenizer)
    assert renderer.user_message(PROMPTS[0]) == renderer.chat([{"role": "user", "content": PROMPTS[0]}])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_no_text_takes_fewer_tokens_than_its_characters_allow(tokenizer, prompt):
    """The server refuses text longer than the context allows without tokenizing it, on this bound."""
    renderer = PromptRenderer(tokenizer)
    assert len(renderer.prompt(prompt).token_ids) * renderer.max_token_chars >= len(prompt)
