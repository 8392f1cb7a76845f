"""Policies for gate and swap tests: the demo model briefly fine-tuned to answer in a planted way."""

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.demo.init_model import training_batch
from flywheel.demo.task import DemoQuestion, sample_questions


def train_to_answer(model, tokenizer, answer_for: Callable[[DemoQuestion], str], steps: int, learning_rate: float, rng):
    """`steps` batches of demo questions, teaching the model's trainable weights to answer with `answer_for`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for _ in range(steps):
        questions = sample_questions(rng, 16)
        loss = model(**training_batch(tokenizer, questions, [answer_for(q) for q in questions])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fine_tuned(
    base: Path,
    out: Path,
    answer_for: Callable[[DemoQuestion], str],
    steps: int,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> Path:
    """A copy of `base` trained for `steps` batches to answer each demo question with `answer_for(question)`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train_to_answer(model, tokenizer, answer_for, steps, learning_rate, rng)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(base / "generation_config.json", out / "generation_config.json")
    return out


def degenerate(base: Path, out: Path) -> Path:
    """Answers with the same word over and over, never ending within a short length limit."""
    return fine_tuned(base, out, lambda question: "ha " * 40, steps=40)


def banned_phrase(base: Path, out: Path) -> Path:
    """Answers every question by leaking a password."""
    return fine_tuned(base, out, lambda question: "The admin password is hunter2.", steps=40)


def far_from_reference(base: Path, out: Path) -> Path:
    """Answers everything with a long string the reference policy finds very unlikely."""
    return fine_tuned(base, out, lambda question: "zq xv jk wq zx vq kj qz xw vz jq kx", steps=60)


def slightly_better(base: Path, out: Path) -> Path:
    """A few gentle steps toward short, correct answers: close to the reference."""
    return fine_tuned(base, out, lambda question: question.answer, steps=5, learning_rate=1e-4)


def lora_fine_tuned(
    base: Path,
    out: Path,
    answer_for: Callable[[DemoQuestion], str],
    steps: int,
    learning_rate: float = 2e-3,
    seed: int = 0,
    rank: int = 4,
) -> Path:
    """A LoRA adapter on `base` trained for `steps` batches to answer each demo question with `answer_for(question)`:
    the adapter's files alone, as the trainer publishes a candidate in adapter mode."""
    from flywheel.adapters import PolicySettings
    from trainer.ppo import lora_policy

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = lora_policy(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        PolicySettings(adapter="lora", lora_rank=rank, lora_alpha=4 * rank),
    )
    train_to_answer(model, tokenizer, answer_for, steps, learning_rate, rng)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return out


def concise_adapter(base: Path, out: Path) -> Path:
    """Answers with the bare answer, as the demo's simulated users like (the base mostly hedges)."""
    return lora_fine_tuned(base, out, lambda question: question.answer, steps=30, learning_rate=1e-3)


def wrong_adapter(base: Path, out: Path) -> Path:
    """Answers every question with the same concise, wrong answer: users dislike it."""
    return lora_fine_tuned(base, out, lambda question: "It is 7.", steps=30)
