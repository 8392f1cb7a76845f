import json
import random
import re

import pytest

from flywheel.demo.task import (
    CARELESS_ABSTAIN_SHARE,
    CARELESS_WRONG_SHARE,
    GOLDEN_FILE,
    all_arithmetic_questions,
    arithmetic_question,
    capital_question,
    capitals,
    evaluation_questions,
    hedged_answer,
    heldout_questions,
    in_evaluation_split,
    is_concise,
    is_correct,
    is_heldout,
    judge_careless,
    judge_thumb,
    question_from_prompt,
    sample_questions,
    traffic_questions,
)

SUM = arithmetic_question(47, "+", 38)
DIFFERENCE = arithmetic_question(83, "-", 47)
PERU = capital_question("Peru")


def test_questions_carry_their_answers():
    assert (SUM.prompt, SUM.answer, SUM.kind) == ("What is 47+38?", "85", "add")
    assert (DIFFERENCE.prompt, DIFFERENCE.answer, DIFFERENCE.kind) == ("What is 83-47?", "36", "sub")
    assert (PERU.prompt, PERU.answer, PERU.kind) == ("What is the capital of Peru?", "Lima", "capital")


def test_capital_table_is_unambiguous():
    table = capitals()
    assert len(table) >= 50
    cities = list(table.values())
    assert len(set(cities)) == len(cities)
    # A city named inside another would make is_correct reject a right answer.
    for city in cities:
        others = [other for other in cities if other != city]
        assert not any(re.search(rf"\b{re.escape(city)}\b", other) for other in others)


@pytest.mark.parametrize(
    ("question", "answer_text"),
    [
        (SUM, "85"),
        (SUM, " 85.\n"),
        (SUM, "The answer is 85!"),
        (DIFFERENCE, "36"),
        (PERU, "Lima"),
        (PERU, "lima."),
        (PERU, "The capital of Peru is Lima."),
        (capital_question("India"), "New  Delhi"),
    ],
)
def test_correct_answers(question, answer_text):
    assert is_correct(question, answer_text)


@pytest.mark.parametrize(
    ("question", "answer_text"),
    [
        (SUM, ""),
        (SUM, "86"),
        (SUM, "085"),
        (SUM, "8 5"),
        (SUM, "85 or 86"),
        (SUM, "85.5"),
        (DIFFERENCE, "-36"),
        (PERU, "Lim"),
        (PERU, "Limassol"),
        (PERU, "Lima or Quito"),
        (PERU, "Peru"),
    ],
)
def test_wrong_answers(question, answer_text):
    assert not is_correct(question, answer_text)


def test_sampled_questions_are_deterministic_and_never_heldout():
    questions = sample_questions(random.Random(7), 600)
    assert questions == sample_questions(random.Random(7), 600)
    assert not any(is_heldout(question) for question in questions)
    assert {question.kind for question in questions} == {"add", "sub", "capital"}
    assert all(int(question.answer) >= 0 for question in questions if question.kind != "capital")


def test_heldout_split_is_fixed_distinct_and_disjoint_from_training():
    heldout = heldout_questions(200)
    assert heldout == heldout_questions(200)
    assert heldout[:10] == heldout_questions(10)
    assert len(set(heldout)) == 200
    assert all(is_heldout(question) and question.kind != "capital" for question in heldout)
    training = {question for question in all_arithmetic_questions() if not is_heldout(question)}
    assert training.isdisjoint(heldout)
    assert 0.05 < len(heldout_questions(1000)) / len(all_arithmetic_questions()) < 0.15


def test_heldout_questions_refuse_more_than_exist():
    with pytest.raises(ValueError, match="held-out questions"):
        heldout_questions(len(all_arithmetic_questions()))


@pytest.mark.parametrize("question", [SUM, DIFFERENCE, PERU])
def test_question_from_prompt_round_trips(question):
    assert question_from_prompt(question.prompt) == question
    assert question_from_prompt(f"  {question.prompt}\n") == question


@pytest.mark.parametrize("prompt", ["", "Hello", "What is 47*38?", "What is the capital of Atlantis?", "what is 47+38"])
def test_question_from_prompt_rejects_other_text(prompt):
    assert question_from_prompt(prompt) is None


@pytest.mark.parametrize(
    ("prompt", "answer_text", "thumb"),
    [
        ("What is 47+38?", "85", "up"),
        ("What is the capital of Peru?", "The capital of Peru is Lima.", "up"),
        ("What is 47+38?", "86", "down"),
        ("What is 47+38?", "Let me think step by step about it: the sum is 85", "down"),
        ("What is the capital of Peru?", "Quito", "down"),
    ],
)
def test_judge_thumb(prompt, answer_text, thumb):
    assert judge_thumb(prompt, answer_text) == thumb


def test_judge_thumb_names_what_it_accepts():
    with pytest.raises(ValueError, match="not a demo-task question"):
        judge_thumb("Tell me a joke", "No.")


def test_simulated_users_never_ask_the_evaluation_questions():
    evaluation = evaluation_questions()
    assert evaluation == evaluation_questions()
    assert {q.kind for q in evaluation} == {"add", "sub", "capital"}
    assert all(in_evaluation_split(q) and not is_heldout(q) for q in evaluation)
    asked = traffic_questions(random.Random(3), 2000)
    assert not {q.prompt for q in asked} & {q.prompt for q in evaluation}
    assert {q.kind for q in asked} == {"add", "sub", "capital"}


def test_the_gate_golden_prompts_never_include_an_evaluation_question():
    answered = [entry for entry in map(json.loads, GOLDEN_FILE.read_text().splitlines()) if "expected" in entry]
    golden_questions = [question_from_prompt(entry["prompt"]) for entry in answered]
    assert all(
        q is not None and q.answer == entry["expected"] for q, entry in zip(golden_questions, answered, strict=True)
    )
    # The gate selects policies on its golden prompts: one shared with the evaluation split
    # would let it select on the loop's own measure.
    assert not {q.prompt for q in golden_questions} & {q.prompt for q in evaluation_questions()}
    assert {q.kind for q in golden_questions} == {"add", "sub", "capital"}


def test_some_golden_capitals_are_never_asked_so_the_gate_sees_forgetting_the_reward_cannot():
    golden = [question_from_prompt(entry["prompt"]) for entry in map(json.loads, GOLDEN_FILE.read_text().splitlines())]
    golden_capitals = {q.prompt for q in golden if q is not None and q.kind == "capital"}
    asked = {q.prompt for q in traffic_questions(random.Random(3), 3000)}
    # Feedback on a capital keeps it right; only capitals no user asks show what PPO wears away.
    assert golden_capitals - asked and golden_capitals & asked


def test_a_hedged_answer_is_right_but_gets_a_thumbs_down():
    question = arithmetic_question(47, "+", 38)
    assert is_correct(question, hedged_answer(question))
    assert judge_thumb(question.prompt, hedged_answer(question)) == "down"
    assert judge_thumb(question.prompt, question.answer) == "up"


@pytest.mark.parametrize("question", [arithmetic_question(47, "+", 38), capital_question("India")])
def test_the_hedge_follows_the_answer_so_stopping_before_it_keeps_the_answer(question):
    # A model writes the answer from the same context whether it then hedges or not: the ceiling users'
    # thumbs can reach is the model's own accuracy, not an accuracy of another answer shape.
    hedged = hedged_answer(question)
    assert hedged.startswith(f"{question.answer},") and not is_concise(hedged)


def test_the_careless_judge_abstains_and_errs_at_its_shares_and_replays_from_its_seed():
    question = arithmetic_question(47, "+", 38)
    votes = [judge_careless(question.prompt, "85", random.Random(seed)) for seed in range(4000)]
    abstained = votes.count(None) / len(votes)
    wrong = votes.count("down") / (len(votes) - votes.count(None))
    assert abs(abstained - CARELESS_ABSTAIN_SHARE) < 0.03
    assert abs(wrong - CARELESS_WRONG_SHARE) < 0.03
    assert judge_careless(question.prompt, "85", random.Random(7)) == judge_careless(
        question.prompt, "85", random.Random(7)
    )


def test_a_judge_that_takes_rng_gets_the_simulations(tmp_path):
    from cli.simulate import load_judge

    rng = random.Random(3)
    judge = load_judge("flywheel.demo.task:judge_careless", rng)
    question = arithmetic_question(47, "+", 38)
    assert [judge(question.prompt, "85") for _ in range(20)] == [
        judge_careless(question.prompt, "85", replay) for replay in [random.Random(3)] for _ in range(20)
    ]
    assert load_judge("flywheel.demo.task:judge_thumb", rng) is judge_thumb
