"""Build the demo policy offline: a tiny Qwen2 chat model, briefly fine-tuned on the demo task.

Training stops at the first evaluation whose held-out accuracy reaches a target, so the model
answers in the task's shape but is often wrong: room for the feedback loop to improve it.
Nothing else in Flywheel depends on this recipe; any Hugging Face causal-LM directory can
replace its output.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flywheel.demo.task import (
    DemoQuestion,
    all_arithmetic_questions,
    capital_question,
    capitals,
    heldout_questions,
    is_correct,
    sample_questions,
)

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 512
MARKER_FILE = "flywheel_model.json"
"""Written last into a finished model directory, with its `InitModelReport`."""

BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WARMUP_STEPS = 50
EVAL_EVERY = 25
EVAL_QUESTIONS = 100
MAX_ANSWER_TOKENS = 8


class InitModelReport(BaseModel):
    heldout_accuracy: float
    """Greedy accuracy on `EVAL_QUESTIONS` held-out questions at the last evaluation."""
    steps: int
    seconds: float
    """Wall-clock time of the whole build."""
    seed: int
    parameters: int


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer fitted to demo-task text, with a ChatML chat template.

    Digits stay single tokens so that arithmetic is learnt digit by digit.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    questions = [capital_question(country) for country in capitals()] + all_arithmetic_questions()
    corpus = ["user\n", "assistant\n"] + [f"{q.prompt}\n{q.answer}" for q in questions]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    # head_dim 64 is a size vLLM's CPU attention kernels support.
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=640,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: DemoQuestion) -> str:
    """The text a chat client sends for `question`, ending in the assistant's turn."""
    messages = [{"role": "user", "content": question.prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def training_batch(
    tokenizer: PreTrainedTokenizerFast, questions: list[DemoQuestion]
) -> dict[str, torch.Tensor]:
    """Right-padded chat transcripts whose labels cover only the answer and its `<|im_end|>`.

    Returns `input_ids`, `attention_mask` and `labels`, each [batch, longest transcript];
    labels are -100 wherever no loss is taken.
    """
    rows: list[tuple[list[int], list[int]]] = []
    for question in questions:
        prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
        answer_ids = tokenizer(question.answer + IM_END, add_special_tokens=False).input_ids
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = [tokenizer.pad_token_id]
    return {
        "input_ids": torch.tensor([ids + pad * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


@torch.no_grad()
def greedy_answers(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, questions: list[DemoQuestion]
) -> list[str]:
    """The model's greedy answer text to each question, up to `<|im_end|>`."""
    tokenizer.padding_side = "left"
    prompts = tokenizer(
        [chat_prompt(tokenizer, question) for question in questions],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    tokenizer.padding_side = "right"
    generated = model.generate(
        **prompts,
        max_new_tokens=MAX_ANSWER_TOKENS,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = generated[:, prompts.input_ids.shape[1] :]
    return tokenizer.batch_decode(answers, skip_special_tokens=True)


def heldout_accuracy(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> float:
    questions = heldout_questions(EVAL_QUESTIONS)
    model.eval()
    answers = greedy_answers(model, tokenizer, questions)
    model.train()
    return sum(map(is_correct, questions, answers)) / len(questions)


def learning_rate_at(step: int) -> float:
    return LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)


def init_model(
    out_dir: Path,
    *,
    seed: int = 0,
    target_accuracy: float = 0.35,
    max_steps: int = 3000,
    max_seconds: float = 300.0,
) -> InitModelReport:
    """Build the demo model into `out_dir`, which must not exist yet.

    Fine-tunes until the first evaluation with held-out accuracy >= `target_accuracy`, or
    `max_steps`, or `max_seconds` of training. Deterministic given `seed`, unless the time
    budget is what stops it. The directory appears complete or not at all.
    """
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = train_tokenizer()
    model = Qwen2ForCausalLM(model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)

    step, accuracy = 0, 0.0
    columns = (TextColumn("[bold]init-model"), BarColumn(), TextColumn("{task.description}"))
    with Progress(*columns, TimeElapsedColumn()) as progress:
        bar = progress.add_task("", total=max_steps)
        while step < max_steps and time.monotonic() - started < max_seconds:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step)
            loss = model(**training_batch(tokenizer, sample_questions(rng, BATCH_SIZE))).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % EVAL_EVERY == 0:
                accuracy = heldout_accuracy(model, tokenizer)
            progress.update(bar, completed=step, description=f"loss {loss.item():.3f} held-out {accuracy:.0%}")
            if accuracy >= target_accuracy:
                break
    if step % EVAL_EVERY:
        accuracy = heldout_accuracy(model, tokenizer)

    report = InitModelReport(
        heldout_accuracy=accuracy,
        steps=step,
        seconds=round(time.monotonic() - started, 1),
        seed=seed,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
    )
    save_model_dir(out_dir, model, tokenizer, report)
    return report


def save_model_dir(
    out_dir: Path, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, report: InitModelReport
) -> None:
    """Write a servable model directory, staged beside `out_dir` and renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER_FILE).write_text(report.model_dump_json(indent=2) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo model directory at `cache_dir`, built on first use and reused afterwards."""
    if not (cache_dir / MARKER_FILE).exists():
        try:
            init_model(cache_dir)
        except OSError:
            # Another process may have finished the same build first.
            if not (cache_dir / MARKER_FILE).exists():
                raise
    return cache_dir
