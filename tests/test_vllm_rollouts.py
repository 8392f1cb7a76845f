"""PPO rollouts from a vLLM engine beside the trainer (`ppo.rollouts = "vllm"`), on the real engine.

The engine must answer with the policy being trained: after the policy moves, greedy answers from
the engine are the policy's own greedy answers (transformers' generate on the same weights), for
whole weights and for an adapter. And a PPO step runs on its rollouts as on generate's.
"""

import pytest
import torch

from flywheel.adapters import PolicySettings
from flywheel.prompts import PromptRenderer
from trainer.config import PPOSettings, RolloutEngineSettings
from trainer.ppo import PolicyWithValue, PPOTrainer, TransformersSampler, end_of_sequence_ids
from trainer.vllm_rollouts import VLLMSampler

pytestmark = pytest.mark.engine

PROMPTS = ["What is 47+38?", "What is 83-47?", "What is the capital of France?", "What is 65-21?"]
ENGINE = RolloutEngineSettings(dtype="float32", max_model_len=512, kv_cache_bytes=128 << 20, enforce_eager=True)
ADAPTERS = PolicySettings(adapter="lora", lora_rank=4, lora_alpha=16)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    renderer = PromptRenderer(tokenizer)
    return [renderer.user_message(prompt).token_ids for prompt in PROMPTS]


def sampler_pair(model_path, tokenizer, policy_settings: PolicySettings, tmp_path):
    models = PolicyWithValue.from_pretrained(model_path, policy_settings)
    eos = end_of_sequence_ids(models.policy.generation_config.eos_token_id, tokenizer.eos_token_id)
    engine = VLLMSampler(models.policy, model_path, eos, ENGINE, policy_settings, tmp_path / "sync", seed=0)
    return models, engine, TransformersSampler(models.policy, tokenizer.pad_token_id, eos), eos


def move(policy, trainable_only: bool) -> None:
    """Move the policy's weights by seeded noise (only the adapter's, when it has one)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if trainable_only and "lora_" not in name:
                continue
            scale = 0.05 if trainable_only else 0.5 * parameter.std().nan_to_num(0.0).item()
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("policy_settings", [PolicySettings(), ADAPTERS], ids=["whole", "adapter"])
def test_the_engine_answers_with_the_policys_weights_as_of_each_rollout(
    model_path, tokenizer, prompt_ids, policy_settings, tmp_path
):
    models, engine, generate, eos = sampler_pair(model_path, tokenizer, policy_settings, tmp_path)
    try:
        models.policy.eval()
        before = engine(prompt_ids, 16, 0.0)
        assert before == generate(prompt_ids, 16, 0.0)
        move(models.policy, trainable_only=policy_settings.uses_adapters)
        after = engine(prompt_ids, 16, 0.0)
        assert after != before, "the moved policy must answer differently for this test to mean anything"
        assert after == generate(prompt_ids, 16, 0.0), "the engine answered with weights other than the policy's"
        assert all(answer[-1] in eos or len(answer) == 16 for answer in after)
        assert all(eos.isdisjoint(answer[:-1]) for answer in after), "an answer ran past its end"
    finally:
        engine.shutdown()


def test_a_ppo_step_trains_on_the_engines_rollouts(model_path, tokenizer, prompt_ids, tmp_path):
    models = PolicyWithValue.from_pretrained(model_path)
    eos = end_of_sequence_ids(models.policy.generation_config.eos_token_id, tokenizer.eos_token_id)
    engine = VLLMSampler(models.policy, model_path, eos, ENGINE, PolicySettings(), tmp_path / "sync", seed=0)
    settings = PPOSettings(prompts_per_step=4, responses_per_prompt=2, max_new_tokens=12, minibatch_size=4)
    trainer = PPOTrainer(models, tokenizer, settings, sampler=engine)
    try:
        torch.manual_seed(0)
        rollout = trainer.rollout(prompt_ids)
        torch.manual_seed(0)
        assert trainer.rollout(prompt_ids).response_token_ids == rollout.response_token_ids, "seeded: the same answers"
        stats = trainer.ppo_step(rollout, lambda input_ids, attention_mask: torch.ones(len(input_ids)))
        assert stats.first_minibatch_ratio == 1.0 and stats.mean_response_tokens > 0
        assert engine.syncs == 2
    finally:
        engine.shutdown()
