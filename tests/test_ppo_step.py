"""PPO steps on the demo model: the first ratio is exactly 1, and a toy reward goes up within a KL budget."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.adapters import PolicySettings
from flywheel.prompts import PromptRenderer
from trainer.config import PPOSettings
from trainer.ppo import PolicyWithValue, PPOTrainer, Rollout, TokenBatch, cut_after_eos
from trainer.ppo_math import kl_over_vocabulary, masked_mean
from trainer.reward_model import RewardModel

PROMPTS = ["What is 47+38?", "What is 83-47?", "What is 12+90?", "What is 65-21?"]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    renderer = PromptRenderer(tokenizer)
    return [renderer.user_message(prompt).token_ids for prompt in PROMPTS]


def trainer_for(model_path, tokenizer, **settings) -> PPOTrainer:
    models = PolicyWithValue.from_pretrained(model_path)
    return PPOTrainer(models, tokenizer, PPOSettings(**settings))


def favoured_share(prompt_length: int):
    """A fixed toy reward: the share of an answer's tokens whose id is even (prompts share one length)."""

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        response, mask = input_ids[:, prompt_length:], attention_mask[:, prompt_length:].bool()
        return masked_mean((response % 2 == 0).float(), mask, dim=-1)

    return score


@torch.no_grad()
def favoured_probability(trainer: PPOTrainer, prompt_ids: list[list[int]]) -> float:
    """Probability mass the policy puts on even ids for the first answer token, mean over prompts."""
    one_token_answers = Rollout(prompt_ids, [[0]] * len(prompt_ids), [False] * len(prompt_ids), 0.0)
    batch = TokenBatch.from_rollout(one_token_answers, trainer.tokenizer.pad_token_id)
    logits = trainer.models.response_logits(trainer.models.policy, batch)[:, 0]
    return torch.softmax(logits / trainer.settings.temperature, -1)[:, ::2].sum(-1).mean().item()


@torch.no_grad()
def kl_to_reference_over_vocabulary(trainer: PPOTrainer, prompt_ids: list[list[int]]) -> float:
    """KL(policy ‖ reference) in nats per answer, summed exactly over the vocabulary at each position of
    32 sampled answers: the low-variance measure of what a step's k1 estimate (8 answers) samples."""
    batch = TokenBatch.from_rollout(trainer.rollout(prompt_ids * 4), trainer.tokenizer.pad_token_id)
    per_position = kl_over_vocabulary(
        trainer.models.response_logits(trainer.models.policy, batch),
        trainer.models.reference_logits(batch),
        trainer.settings.temperature,
    )
    return (per_position * batch.response_mask).sum(-1).mean().item()


def six_toy_reward_steps(trainer: PPOTrainer, prompt_ids: list[list[int]]) -> tuple[float, float, list]:
    """Six PPO steps on the toy reward: P(favoured first token) before and after, and each step's stats."""
    toy_reward = favoured_share(len(prompt_ids[0]))
    before = favoured_probability(trainer, prompt_ids)
    history = [trainer.ppo_step(trainer.rollout(prompt_ids), toy_reward) for _ in range(6)]
    after = favoured_probability(trainer, prompt_ids)
    print(
        f"P(favoured first token) {before:.3f} -> {after:.3f}; "
        f"score {[round(h.mean_score, 2) for h in history]}; KL {[round(h.kl_to_reference, 2) for h in history]}"
    )
    return before, after, history


def test_cut_after_eos_keeps_the_end_token():
    assert cut_after_eos([5, 6, 2, 0, 0], frozenset({2})) == [5, 6, 2]
    assert cut_after_eos([5, 6, 7], frozenset({2})) == [5, 6, 7]


def test_the_first_minibatch_ratio_is_exactly_one(model_path, tokenizer, prompt_ids):
    torch.manual_seed(0)
    trainer = trainer_for(model_path, tokenizer, max_new_tokens=8, minibatch_size=3, epochs=2)
    reward_model = RewardModel.from_pretrained(model_path)
    rollout = trainer.rollout(prompt_ids)
    assert len(rollout.response_token_ids) == 2 * len(prompt_ids)
    assert all(len(response) <= 8 for response in rollout.response_token_ids)
    stats = trainer.ppo_step(rollout, reward_model)
    assert stats.first_minibatch_ratio == 1.0
    assert all(math.isfinite(value) for value in vars(stats).values())
    assert 0.0 <= stats.value_clip_fraction <= 1.0
    assert trainer.kl_controller.kl_coef != stats.kl_coef


@pytest.mark.slow
def test_ppo_raises_a_fixed_toy_reward_within_a_kl_budget(model_path, tokenizer, prompt_ids, tmp_path):
    torch.manual_seed(0)
    assert len({len(ids) for ids in prompt_ids}) == 1
    trainer = trainer_for(
        model_path,
        tokenizer,
        max_new_tokens=8,
        minibatch_size=4,
        epochs=4,
        policy_learning_rate=3e-4,
        critic_learning_rate=1e-3,
        missing_eos_penalty=0.0,
    )
    before, after, history = six_toy_reward_steps(trainer, prompt_ids)
    assert after > before + 0.1
    assert all(math.isfinite(h.kl_to_reference) for h in history)
    assert kl_to_reference_over_vocabulary(trainer, prompt_ids) < 10.0

    trainer.save_policy(tmp_path / "policy")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(weight, trainer.models.policy.state_dict()[name], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "policy").chat_template == tokenizer.chat_template


@pytest.mark.slow
def test_adapter_ppo_raises_the_toy_reward_training_only_the_adapter(model_path, tokenizer, prompt_ids, tmp_path):
    """Adapter mode: the base's weights never move, the reference is the base (adapter off), and the
    saved candidate is the adapter alone, a small fraction of the whole model's bytes."""
    torch.manual_seed(0)
    models = PolicyWithValue.from_pretrained(model_path, PolicySettings(adapter="lora", lora_rank=4, lora_alpha=16))
    assert models.reference is None
    base_before = {
        name: weight.clone()
        for name, weight in models.policy.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    trainer = PPOTrainer(
        models,
        tokenizer,
        PPOSettings(
            max_new_tokens=8,
            minibatch_size=4,
            epochs=4,
            adapter_learning_rate=1e-3,
            critic_learning_rate=1e-3,
            missing_eos_penalty=0.0,
        ),
    )
    assert trainer.policy_optimizer.param_groups[0]["lr"] == 1e-3  # the adapter's rate, not the whole weights'
    before, after, history = six_toy_reward_steps(trainer, prompt_ids)
    assert history[0].first_minibatch_ratio == 1.0
    assert history[0].kl_to_reference == 0.0  # the adapter starts as the base: B = 0
    assert after > before + 0.1
    assert all(math.isfinite(h.kl_to_reference) for h in history)
    assert kl_to_reference_over_vocabulary(trainer, prompt_ids) < 10.0
    for name, weight in models.policy.get_base_model().state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(weight, base_before[name], rtol=0, atol=0)

    trainer.save_policy(tmp_path / "adapter")
    assert sorted(path.name for path in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter_bytes = sum(path.stat().st_size for path in (tmp_path / "adapter").iterdir())
    whole_bytes = sum(path.stat().st_size for path in model_path.glob("*.safetensors"))
    assert adapter_bytes <= 0.05 * whole_bytes
    resumed = PolicyWithValue.resume(tmp_path / "adapter", model_path, None)
    one_token = Rollout(prompt_ids, [[0]] * len(prompt_ids), [False] * len(prompt_ids), 0.0)
    batch = TokenBatch.from_rollout(one_token, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(
            resumed.response_logits(resumed.policy, batch), models.response_logits(models.policy, batch)
        )


def test_answers_the_reward_model_cannot_tell_apart_do_not_move_the_policy(model_path, tokenizer, prompt_ids):
    """Each prompt's answers score alike (each prompt its own score): a step on them is the reward
    model's noise. Learnt from, whitening blows it up to a full-size update; left out
    (ppo.min_reward_spread) the policy stays, but for AdamW's weight decay. Answers grouped with
    another prompt's (a shuffled batch read in the wrong order) would differ, and be learnt from."""
    prompt_length = len(prompt_ids[0])
    score_of = {tuple(prompt): float(score) for prompt, score in zip(prompt_ids, (-2, -1, 0, 1), strict=True)}

    def score_of_the_prompt_alone(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor([score_of[tuple(row[:prompt_length].tolist())] for row in input_ids])

    probe = TokenBatch.from_rollout(Rollout(prompt_ids, [[0]] * len(prompt_ids), [False] * 4, 0.0), 0)
    moved = {}
    for min_reward_spread in (0.0, 0.02):
        torch.manual_seed(0)
        trainer = trainer_for(
            model_path, tokenizer, max_new_tokens=8, minibatch_size=4, policy_learning_rate=3e-4,
            missing_eos_penalty=0.0, min_reward_spread=min_reward_spread,
        )  # fmt: skip
        with torch.no_grad():
            before = trainer.models.response_logits(trainer.models.policy, probe)
        stats = trainer.ppo_step(trainer.rollout(prompt_ids), score_of_the_prompt_alone)
        with torch.no_grad():
            after = trainer.models.response_logits(trainer.models.policy, probe)
        moved[min_reward_spread] = (after - before).abs().max().item()
        assert stats.learning_answer_fraction == (1.0 if min_reward_spread == 0 else 0.0)
    print(
        f"largest logit change after one step: learning from every prompt {moved[0.0]:.4f}, leaving alike ones out {moved[0.02]:.6f}"
    )
    assert moved[0.02] < 1e-3 < moved[0.0]
