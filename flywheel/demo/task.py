"""The built-in demo task: short questions whose answers a program can check.

Two families: two-digit arithmetic ("What is 47+38?" -> "85", "What is 83-47?" -> "36") and
capitals from a table ("What is the capital of Peru?" -> "Lima"). Arithmetic generalises, so a
fixed slice of it is held out for evaluation. Capitals are a closed table of facts that a model
can only memorise, so holding one out would only make it unanswerable: every capital question
is a training question, and the held-out set is arithmetic alone.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

QuestionKind = Literal["add", "sub", "capital"]
Thumb = Literal["up", "down"]

KINDS: tuple[QuestionKind, ...] = ("add", "sub", "capital")
OPERANDS = range(10, 100)
HELDOUT_BUCKETS = 10
"""One arithmetic prompt in this many is held out."""
EVALUATION_BUCKETS = 2
"""One training question in this many is never asked by simulated users: the feedback loop's evaluation split."""
GOLDEN_ONLY_BUCKETS = 2
"""One capital in this many outside the evaluation split is never asked by simulated users either: the gate's
golden prompts hold knowledge no feedback touches, as an operator's regression suite does."""
MAX_CONCISE_WORDS = 6
"""Longest answer a simulated user still calls concise ("The capital of Peru is Lima.")."""

GOLDEN_FILE = Path(__file__).resolve().parent / "golden.jsonl"
"""The safety gate's golden prompts for the demo task: held-out arithmetic, every capital outside the evaluation
split (some asked by users, the golden-only ones never), and two refusals."""

_ARITHMETIC_PROMPT = re.compile(r"What is (\d+)([+-])(\d+)\?")
_CAPITAL_PROMPT = re.compile(r"What is the capital of (.+)\?")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class DemoQuestion:
    prompt: str
    answer: str
    kind: QuestionKind


@cache
def capitals() -> dict[str, str]:
    """Country -> capital, from `capitals.csv` beside this module."""
    table = resources.files(__package__).joinpath("capitals.csv")
    with table.open(encoding="utf-8") as rows:
        return {row["country"]: row["capital"] for row in csv.DictReader(rows)}


def arithmetic_question(a: int, operator: Literal["+", "-"], b: int) -> DemoQuestion:
    answer = a + b if operator == "+" else a - b
    kind: QuestionKind = "add" if operator == "+" else "sub"
    return DemoQuestion(f"What is {a}{operator}{b}?", str(answer), kind)


def capital_question(country: str) -> DemoQuestion:
    return DemoQuestion(f"What is the capital of {country}?", capitals()[country], "capital")


def _prompt_hash(question: DemoQuestion) -> int:
    return int.from_bytes(hashlib.sha256(question.prompt.encode("utf-8")).digest()[:8])


def is_heldout(question: DemoQuestion) -> bool:
    """Whether `question` is held out of the demo model's training (arithmetic only); a stable hash decides."""
    return question.kind != "capital" and _prompt_hash(question) % HELDOUT_BUCKETS == 0


def in_evaluation_split(question: DemoQuestion) -> bool:
    """Whether a training question is kept from simulated users, to measure what the feedback loop taught.

    The demo model learnt these answers as well as any; what the loop changes (how it answers) must
    carry over to questions no user gave feedback on.
    """
    return not is_heldout(question) and (_prompt_hash(question) // HELDOUT_BUCKETS) % EVALUATION_BUCKETS == 1


def in_golden_only_split(question: DemoQuestion) -> bool:
    """Whether a capital outside the evaluation split is kept from simulated users, for the gate alone.

    Users' feedback keeps the capitals they ask right; what PPO on them wears away shows on capitals
    nobody asks, and the gate can only hold a candidate to those if some golden capitals are such.
    """
    stride = HELDOUT_BUCKETS * EVALUATION_BUCKETS
    return (
        question.kind == "capital"
        and not in_evaluation_split(question)
        and (_prompt_hash(question) // stride) % GOLDEN_ONLY_BUCKETS == 1
    )


def all_arithmetic_questions() -> list[DemoQuestion]:
    """Every two-digit sum and every two-digit difference with a non-negative answer."""
    return [
        arithmetic_question(a, operator, b)
        for a in OPERANDS
        for b in OPERANDS
        for operator in ("+", "-")
        if operator == "+" or a >= b
    ]


def _random_question(rng: random.Random, kind: QuestionKind) -> DemoQuestion:
    if kind == "capital":
        return capital_question(rng.choice(sorted(capitals())))
    a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
    if kind == "add":
        return arithmetic_question(a, "+", b)
    return arithmetic_question(max(a, b), "-", min(a, b))


def sample_questions(rng: random.Random, n: int) -> list[DemoQuestion]:
    """`n` training questions (never held-out ones), each family equally likely."""
    questions: list[DemoQuestion] = []
    while len(questions) < n:
        question = _random_question(rng, rng.choice(KINDS))
        if not is_heldout(question):
            questions.append(question)
    return questions


def traffic_questions(rng: random.Random, n: int) -> list[DemoQuestion]:
    """`n` questions simulated users ask: training questions outside the evaluation and golden-only splits."""
    questions: list[DemoQuestion] = []
    while len(questions) < n:
        questions += [
            q
            for q in sample_questions(rng, n - len(questions))
            if not (in_evaluation_split(q) or in_golden_only_split(q))
        ]
    return questions


@cache
def evaluation_questions() -> tuple[DemoQuestion, ...]:
    """The fixed evaluation set of the feedback loop: each capital of the evaluation split, and as many
    sums and as many differences from it, in a fixed order."""
    capital_questions = [q for q in map(capital_question, sorted(capitals())) if in_evaluation_split(q)]
    arithmetic = [q for q in all_arithmetic_questions() if in_evaluation_split(q)]
    random.Random(0).shuffle(arithmetic)
    sums = [q for q in arithmetic if q.kind == "add"][: len(capital_questions)]
    differences = [q for q in arithmetic if q.kind == "sub"][: len(capital_questions)]
    return tuple(capital_questions + sums + differences)


@cache
def _heldout_pool() -> tuple[DemoQuestion, ...]:
    pool = [question for question in all_arithmetic_questions() if is_heldout(question)]
    random.Random(0).shuffle(pool)
    return tuple(pool)


def heldout_questions(n: int) -> list[DemoQuestion]:
    """The first `n` of a fixed shuffle of the held-out questions: distinct, same on every call."""
    pool = _heldout_pool()
    if n > len(pool):
        raise ValueError(f"n={n} exceeds the {len(pool)} held-out questions")
    return list(pool[:n])


def question_from_prompt(prompt: str) -> DemoQuestion | None:
    """The demo question a user prompt asks, or None if it is not one."""
    prompt = prompt.strip()
    if arithmetic := _ARITHMETIC_PROMPT.fullmatch(prompt):
        a, operator, b = arithmetic.groups()
        return arithmetic_question(int(a), operator, int(b))  # type: ignore[arg-type]
    capital = _CAPITAL_PROMPT.fullmatch(prompt)
    if capital and capital.group(1) in capitals():
        return capital_question(capital.group(1))
    return None


def _mentioned_capitals(text: str) -> set[str]:
    words = " ".join(text.split())
    return {city for city in capitals().values() if re.search(rf"\b{re.escape(city)}\b", words, flags=re.IGNORECASE)}


def is_correct(question: DemoQuestion, answer_text: str) -> bool:
    """Whether `answer_text` gives the answer and nothing that contradicts it.

    An arithmetic answer must contain exactly one number, the right one; a capital answer must
    name the right city and no other capital. Whitespace, case and punctuation around the
    answer do not matter, so "85." and "The capital of Peru is Lima." are correct, while
    "85 or 86", "085" and "Lima or Quito" are not.
    """
    if question.kind == "capital":
        return _mentioned_capitals(answer_text) == {question.answer}
    return _INTEGER.findall(answer_text) == [question.answer]


def hedged_answer(question: DemoQuestion) -> str:
    """The answer followed by a hedge, too long to be concise.

    The hedge comes after the answer, so a model writes the answer from the same context whether it
    then hedges or stops: dropping the hedge keeps every answer it gets right, right.
    """
    return f"{question.answer}, but I am not completely sure."


def is_concise(answer_text: str) -> bool:
    return len(answer_text.split()) <= MAX_CONCISE_WORDS


def judge_thumb(question_prompt: str, answer_text: str) -> Thumb:
    """A simulated user's verdict: up for an answer that is correct and concise, else down."""
    question = question_from_prompt(question_prompt)
    if question is None:
        raise ValueError(
            f"not a demo-task question: {question_prompt!r}; expected e.g. "
            "'What is 47+38?' or 'What is the capital of Peru?' (a country from capitals.csv)"
        )
    return "up" if is_correct(question, answer_text) and is_concise(answer_text) else "down"


CARELESS_ABSTAIN_SHARE = 0.5
CARELESS_WRONG_SHARE = 0.15


def judge_careless(question_prompt: str, answer_text: str, rng: random.Random) -> Thumb | None:
    """A careless user with judge_thumb's taste: votes on only half the answers, and a vote in
    `CARELESS_WRONG_SHARE` is the wrong way round. `rng` is the simulation's, so a seed replays it."""
    taste = judge_thumb(question_prompt, answer_text)
    if rng.random() < CARELESS_ABSTAIN_SHARE:
        return None
    if rng.random() < CARELESS_WRONG_SHARE:
        return "down" if taste == "up" else "up"
    return taste
