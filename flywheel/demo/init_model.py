"""Build the demo policy offline: a tiny Qwen2 chat model, briefly fine-tuned on the demo task.

A fixed number of steps, with a learning rate that warms up and then decays, leaves a model that
answers in the task's shape but is often wrong, and that hedges most answers ("85, but I am not
completely sure."): room for the feedback loop to improve it.
Nothing else in Flywheel depends on this recipe; any Hugging Face causal-LM directory can
replace its output.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
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
    evaluation_questions,
    hedged_answer,
    heldout_questions,
    is_concise,
    is_correct,
    sample_questions,
)
from flywheel.durable import write_atomically
from flywheel.prompts import PromptRenderer
from flywheel.registry import MODEL_SETTINGS_FILE

log = logging.getLogger(__name__)

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
RECIPE = 2
"""Raised whenever a change here or in the demo task changes the model built; a cached build of another
recipe is built again. 2: the hedge follows the answer."""

BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WARMUP_STEPS = 50
TRAINING_STEPS = 1200
EVAL_EVERY = 200
EVAL_QUESTIONS = 100
MAX_ANSWER_TOKENS = 24
HEDGED_SHARE = 0.75
"""Share of training answers followed by a hedge. Above one half, greedy answers start out hedged:
correct or not, users give them a thumbs-down, which leaves the feedback loop a preference to learn."""


DEMO_SETTINGS = """\
# Flywheel settings that suit this tiny demo model; Flywheel reads them when it serves this
# directory, below any config file, environment variable or flag. The defaults suit large models.
# The policy learns as a LoRA adapter: over three seeds it learnt at least as well as whole weights
# (BENCHMARKS.md). policy.adapter = "none" trains whole weights, at policy_learning_rate.
[policy]
adapter = "lora"
lora_rank = 4

[ppo]
policy_learning_rate = 3e-5
adapter_learning_rate = 3e-4
max_new_tokens = 24
candidate_every_steps = 5
init_kl_coef = 0.2
target_kl = 2.0
kl_horizon = 100

[reward_model]
learning_rate = 1e-4

[trainer]
min_labels_before_ppo = 128
torch_threads = 1

[gate]
max_new_tokens = 24
torch_threads = 1
"""


DEMO_OPERATOR_CONFIG = Path(__file__).resolve().parent / "up.toml"
"""The config file `make up` and the learning benchmark run the demo with: what its operator sets."""


class InitModelReport(BaseModel):
    recipe: int = 1
    """`RECIPE` of the code that built the model; builds from before it was recorded were recipe 1."""
    evaluation_accuracy: float
    """Greedy accuracy on the feedback loop's evaluation questions (seen in training) at the last evaluation."""
    concise_share: float
    """Share of those greedy answers that are concise (unhedged); the loop has this to learn."""
    heldout_arithmetic_accuracy: float
    """Greedy accuracy on `EVAL_QUESTIONS` held-out arithmetic questions, never trained on: generalisation."""
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
    corpus = ["user\n", "assistant\n"] + [f"{q.prompt}\n{q.answer}\n{hedged_answer(q)}" for q in questions]
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


def training_batch(
    tokenizer: PreTrainedTokenizerFast, questions: list[DemoQuestion], answers: list[str]
) -> dict[str, torch.Tensor]:
    """Right-padded chat transcripts of each question and its answer text, whose labels cover only
    the answer and its `<|im_end|>`.

    Returns `input_ids`, `attention_mask` and `labels`, each [batch, longest transcript];
    labels are -100 wherever no loss is taken.
    """
    renderer = PromptRenderer(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for question, answer in zip(questions, answers, strict=True):
        prompt_ids = renderer.user_message(question.prompt).token_ids
        answer_ids = tokenizer(answer + IM_END, add_special_tokens=False).input_ids
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
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    questions: list[DemoQuestion],
) -> list[str]:
    """The model's greedy answer text to each question, up to `<|im_end|>`."""
    renderer = PromptRenderer(tokenizer)
    tokenizer.padding_side = "left"
    prompts = tokenizer(
        [renderer.user_message(question.prompt).text for question in questions],
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


def greedy_results(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, questions: Sequence[DemoQuestion]
) -> tuple[float, float]:
    """(accuracy, concise share) of the model's greedy answers to `questions`."""
    model.eval()
    answers = greedy_answers(model, tokenizer, list(questions))
    model.train()
    return sum(map(is_correct, questions, answers)) / len(questions), sum(map(is_concise, answers)) / len(answers)


def learning_rate_at(step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth: the answers' style settles instead of swinging."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def init_model(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = TRAINING_STEPS,
) -> InitModelReport:
    """Build the demo model into `out_dir`, which must not exist yet.

    Fine-tunes for `steps` batches: deterministic given `seed` and the installed packages (constraints.txt),
    however long a slow machine takes. The directory appears complete or not at all.
    """
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = train_tokenizer()
    model = Qwen2ForCausalLM(model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)

    step, accuracy, concise = 0, 0.0, 0.0
    columns = (TextColumn("[bold]init-model"), BarColumn(), TextColumn("{task.description}"))
    with Progress(*columns, TimeElapsedColumn()) as progress:
        bar = progress.add_task("", total=steps)
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, steps)
            questions = sample_questions(rng, BATCH_SIZE)
            answers = [hedged_answer(q) if rng.random() < HEDGED_SHARE else q.answer for q in questions]
            loss = model(**training_batch(tokenizer, questions, answers)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % EVAL_EVERY == 0:
                accuracy, concise = greedy_results(model, tokenizer, evaluation_questions())
            progress.update(bar, completed=step, description=f"loss {loss.item():.3f} accuracy {accuracy:.0%}")
    if step % EVAL_EVERY:
        accuracy, concise = greedy_results(model, tokenizer, evaluation_questions())

    report = InitModelReport(
        recipe=RECIPE,
        evaluation_accuracy=accuracy,
        concise_share=concise,
        heldout_arithmetic_accuracy=greedy_results(model, tokenizer, heldout_questions(EVAL_QUESTIONS))[0],
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
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(
            staging
        )
        tokenizer.save_pretrained(staging)
        (staging / MODEL_SETTINGS_FILE).write_text(DEMO_SETTINGS)
        (staging / MARKER_FILE).write_text(report.model_dump_json(indent=2) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def built_recipe(model_dir: Path) -> int | None:
    """The recipe a finished demo model directory was built by; None if there is none. A marker that does
    not say (written before recipes were recorded, or not JSON) counts as recipe 1."""
    try:
        report = json.loads((model_dir / MARKER_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return 1
    recipe = report.get("recipe", 1) if isinstance(report, dict) else 1
    return recipe if isinstance(recipe, int) else 1


def ensure_demo_model(cache_dir: Path, *, rebuild_stale: bool = True) -> Path:
    """The demo model directory at `cache_dir`, built on first use and reused afterwards. Its settings
    are this checkout's DEMO_SETTINGS, rewritten if a model built by other code holds others.

    A model of another `RECIPE` is built again, unless `rebuild_stale` is False: a registry seeded already
    serves its own copies, and a stale build only lends it its settings. Processes that share `cache_dir`
    build it once, one waiting for the other.
    """
    if not _needs_writing(cache_dir, rebuild_stale):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with (cache_dir.parent / f".{cache_dir.name}.lock").open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building the demo model in %s", cache_dir)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            recipe = built_recipe(cache_dir)
            if recipe is not None and recipe != RECIPE and rebuild_stale:
                _discard(cache_dir)
                recipe = None
            if recipe is None:
                init_model(cache_dir)
            if not _settings_are_current(cache_dir):
                settings_file = cache_dir / MODEL_SETTINGS_FILE
                write_atomically(settings_file, DEMO_SETTINGS.encode())
                settings_file.chmod(0o644)  # as the build writes it: readable by whoever serves the directory
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return cache_dir


def _needs_writing(cache_dir: Path, rebuild_stale: bool) -> bool:
    """Whether `ensure_demo_model` has anything to build or rewrite: a current one reads, so a read-only cache serves."""
    recipe = built_recipe(cache_dir)
    return recipe is None or (recipe != RECIPE and rebuild_stale) or not _settings_are_current(cache_dir)


def _settings_are_current(cache_dir: Path) -> bool:
    settings_file = cache_dir / MODEL_SETTINGS_FILE
    return settings_file.is_file() and settings_file.read_text() == DEMO_SETTINGS


def _discard(model_dir: Path) -> None:
    """Move `model_dir` aside in one step, then delete it: a reader finds it whole or gone."""
    aside = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.stale.", dir=model_dir.parent))
    try:
        model_dir.rename(aside / model_dir.name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
