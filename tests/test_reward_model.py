"""The reward model: padding-invariant scores, learning the demo users' thumbs, save and resume."""

import random
import time

import pytest
import torch

from flywheel.demo.task import DemoQuestion, capitals, heldout_questions, judge_thumb, sample_questions
from flywheel.prompts import PromptRenderer
from trainer.config import RewardModelSettings
from trainer.join_store import LabelledExample, LoggedAnswer, PreferencePair
from trainer.reward_model import RewardModel, RewardModelTrainer, right_pad


def logged_answer(tokenizer, question: DemoQuestion, answer_text: str) -> LoggedAnswer:
    """An answer as the server logs it: chat-rendered prompt ids, then the answer ids and end-of-turn."""
    prompt_ids = PromptRenderer(tokenizer).user_message(question.prompt).token_ids
    response_ids = tokenizer.encode(answer_text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return LoggedAnswer(question.prompt + answer_text, tuple(prompt_ids), tuple(response_ids))


def wrong_answer(rng: random.Random, question: DemoQuestion) -> str:
    """A wrong answer of a kind a small reward model can learn to spot: a hedge, or the wrong kind.

    (A near miss, "86" for 47+38, is left out: telling it apart takes arithmetic, more than a
    few hundred labels can teach in a test.)
    """
    other_capitals = sorted(set(capitals().values()) - {question.answer})
    if rng.random() < 0.5:
        other = rng.choice(other_capitals) if question.kind == "capital" else int(question.answer) + 1
        return f"{question.answer} or {other}"
    return str(rng.randint(10, 198)) if question.kind == "capital" else rng.choice(other_capitals)


def demo_pairs(tokenizer, rng: random.Random, questions: list[DemoQuestion]) -> list[PreferencePair]:
    pairs = []
    for question in questions:
        wrong = wrong_answer(rng, question)
        assert (judge_thumb(question.prompt, question.answer), judge_thumb(question.prompt, wrong)) == ("up", "down")
        chosen, rejected = (
            logged_answer(tokenizer, question, question.answer),
            logged_answer(tokenizer, question, wrong),
        )
        pairs.append(PreferencePair(chosen, rejected, principal="default", arrival=len(pairs)))
    return pairs


def thumbs(pairs: list[PreferencePair]) -> list[LabelledExample]:
    return [LabelledExample(pair.chosen, True, "default", "ada", pair.arrival) for pair in pairs] + [
        LabelledExample(pair.rejected, False, "default", "ada", pair.arrival) for pair in pairs
    ]


def test_scores_do_not_change_with_extra_right_padding(model_path, tokenizer):
    torch.manual_seed(0)
    model = RewardModel.from_pretrained(model_path)
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with torch.no_grad():
        tight = model(*right_pad(sequences, tokenizer.pad_token_id))
        input_ids, attention_mask = right_pad(sequences + [[1] * 20], tokenizer.pad_token_id)
        loose = model(input_ids[:2], attention_mask[:2])
    assert loose.shape == (2,)
    torch.testing.assert_close(loose, tight, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_learns_the_demo_users_thumbs_and_resumes_from_a_save(model_path, tokenizer, tmp_path):
    torch.manual_seed(0)
    rng = random.Random(0)
    train_pairs = demo_pairs(tokenizer, rng, sample_questions(rng, 150))
    heldout_pairs = demo_pairs(tokenizer, rng, heldout_questions(60))
    settings = RewardModelSettings(learning_rate=3e-4, batch_size=16, pointwise_loss_weight=0.5)
    trainer = RewardModelTrainer(RewardModel.from_pretrained(model_path), settings, tokenizer.pad_token_id)

    started = time.perf_counter()
    before = trainer.evaluate(heldout_pairs, thumbs(heldout_pairs))
    for _ in range(2):
        stats = trainer.update(train_pairs, thumbs(train_pairs))
    after = trainer.evaluate(heldout_pairs, thumbs(heldout_pairs))
    print(f"reward model: {before} -> {after}, last epoch {stats}, {time.perf_counter() - started:.1f}s")
    assert stats["steps"] == 19
    assert after["pairwise_accuracy"] > 0.7
    assert after["pairwise_accuracy"] > before["pairwise_accuracy"]

    trainer.save(tmp_path / "rm")
    resumed = RewardModelTrainer.load(tmp_path / "rm", settings, tokenizer.pad_token_id)
    assert resumed.evaluate(heldout_pairs, thumbs(heldout_pairs)) == pytest.approx(after)
    assert resumed.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()
