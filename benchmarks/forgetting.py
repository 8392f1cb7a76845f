"""Where the demo policy's capitals go: PPO offline on the users' questions, without the serving loop.

    .venv/bin/python -m benchmarks.forgetting VARIANT [--coef C] [--steps 400] [--seed 0]
        [--reward-model CHECKPOINT/reward_model]

Each step samples 2 answers to 8 questions the simulated users ask (two thirds arithmetic, which
the model cannot do), scores them and takes a PPO step with the demo's settings. Every 50 steps it
prints how many of the 29 evaluation capitals (never asked) the policy answers correctly, and
correctly and concisely, greedily. The score is the built-in users' thumb (+1 up, −1 down), or with
`--reward-model` a trained reward model's. Variants:

- `none`: PPO as the trainer ran it before `ppo.min_reward_spread`.
- `filter`: a prompt whose answers score alike is removed from the step (with the thumb: both up or
  both down; with a reward model: thumbs-up probabilities within `--coef`); a step with none left is
  skipped. The trainer's `ppo.min_reward_spread` instead keeps the rows and zeroes their advantages.
- `capitals-only`: users who ask only capitals, to see what the hopeless arithmetic costs.
- anchors to the reference, each after every PPO step: `ptx` (language-model loss on the demo
  model's own training data, outside the evaluation split, weight `--coef`), `kl-loss` (exact KL to
  the reference over the vocabulary on the step's answers), `k3-loss` (the k3 estimate of it, as
  GRPO), `no-mean-shift` (advantages scaled but not centred).
"""

import argparse
import functools
import json
import random
import time

import torch
from transformers import AutoTokenizer

import trainer.ppo as ppo_module
from benchmarks.common import REPO_ROOT
from flywheel.demo.init_model import HEDGED_SHARE, greedy_answers, training_batch
from flywheel.demo.task import (
    evaluation_questions,
    hedged_answer,
    in_evaluation_split,
    is_concise,
    is_correct,
    judge_thumb,
    sample_questions,
    traffic_questions,
)
from flywheel.prompts import PromptRenderer
from trainer.config import PPOSettings
from trainer.ppo import PolicyWithValue, PPOTrainer, Rollout, TokenBatch
from trainer.ppo_math import (
    answers_to_learn_from,
    kl_estimators,
    kl_over_vocabulary,
    logprobs_from_logits,
    masked_whiten,
)
from trainer.reward_model import RewardModel

VARIANTS = ("none", "filter", "capitals-only", "ptx", "kl-loss", "k3-loss", "no-mean-shift")
# The demo model's PPO settings on whole weights (this benchmark trains whole weights; the demo's own mode is an adapter).
DEMO_PPO = PPOSettings(policy_learning_rate=3e-5, max_new_tokens=24, init_kl_coef=0.2, target_kl=2.0, kl_horizon=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--coef", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache" / "demo-model"))
    parser.add_argument("--reward-model", default=None)
    args = parser.parse_args()
    variant, coef = args.variant, args.coef
    if variant == "no-mean-shift":
        ppo_module.masked_whiten = functools.partial(masked_whiten, shift_mean=False)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models = PolicyWithValue.from_pretrained(args.model)
    ppo = PPOTrainer(models, tokenizer, DEMO_PPO)
    renderer = PromptRenderer(tokenizer)
    rng, ptx_rng = random.Random(args.seed), random.Random(1000 + args.seed)
    capitals = [question for question in evaluation_questions() if question.kind == "capital"]

    def thumb(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            text = tokenizer.decode(row[mask.bool()], skip_special_tokens=False)
            question = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
            scores.append(1.0 if judge_thumb(question, answer) == "up" else -1.0)
        return torch.tensor(scores)

    score = thumb
    if args.reward_model:
        score = RewardModel.from_pretrained(args.reward_model).eval().requires_grad_(False)

    def evaluate() -> tuple[int, int]:
        models.policy.eval()
        answers = greedy_answers(models.policy, tokenizer, capitals)
        models.policy.train()
        correct = [is_correct(question, answer) for question, answer in zip(capitals, answers, strict=True)]
        return sum(correct), sum(c and is_concise(a) for c, a in zip(correct, answers, strict=True))

    def users_questions() -> list:
        if variant != "capitals-only":
            return traffic_questions(rng, 8)
        questions = []
        while len(questions) < 8:
            questions += [question for question in traffic_questions(rng, 8) if question.kind == "capital"]
        return questions[:8]

    def anchor_step(loss: torch.Tensor) -> None:
        ppo.policy_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.policy.parameters(), 1.0)
        ppo.policy_optimizer.step()

    print(json.dumps({"step": 0, "capitals correct, concise": evaluate()}), flush=True)
    started = time.time()
    for step in range(1, args.steps + 1):
        prompts = [renderer.user_message(question.prompt).token_ids for question in users_questions()]
        rollout = ppo.rollout(prompts)
        if variant == "filter":
            batch = TokenBatch.from_rollout(rollout, tokenizer.pad_token_id)
            with torch.no_grad():
                scores = score(batch.input_ids, batch.attention_mask)
            # The thumb's up and down lie 0.46 apart in probability, alike answers 0.
            spread = coef if args.reward_model else 0.01
            keep = answers_to_learn_from(scores, DEMO_PPO.responses_per_prompt, spread).tolist()
            if not any(keep):
                if step % 50 == 0:
                    print(json.dumps({"step": step, "capitals correct, concise": evaluate(), "skipped": True}))
                continue

            def kept(rows: list, keep: list[bool] = keep) -> list:
                return [row for row, k in zip(rows, keep, strict=True) if k]

            rollout = Rollout(
                kept(rollout.prompt_token_ids), kept(rollout.response_token_ids), kept(rollout.ended_with_eos), 0.0
            )
        stats = ppo.ppo_step(rollout, score)
        if variant == "ptx":
            for _ in range(DEMO_PPO.epochs):
                questions = [q for q in sample_questions(ptx_rng, 32) if not in_evaluation_split(q)][:8]
                answers = [hedged_answer(q) if ptx_rng.random() < HEDGED_SHARE else q.answer for q in questions]
                anchor_step(coef * models.policy(**training_batch(tokenizer, questions, answers)).loss)
        if variant in ("kl-loss", "k3-loss"):
            batch = TokenBatch.from_rollout(rollout, tokenizer.pad_token_id)
            with torch.no_grad():
                reference_logits = models.reference_logits(batch)
            for _ in range(DEMO_PPO.epochs):
                for index in torch.randperm(len(rollout.response_token_ids)).split(8):
                    minibatch = batch.rows(index)
                    logits = models(minibatch)[0]
                    if variant == "kl-loss":
                        kl = kl_over_vocabulary(logits, reference_logits[index])
                    else:
                        taken = minibatch.response_ids
                        kl = kl_estimators(
                            logprobs_from_logits(logits, taken, 1.0),
                            logprobs_from_logits(reference_logits[index], taken, 1.0),
                        ).k3
                    anchor_step(coef * kl[minibatch.response_mask].mean())
        if step % 50 == 0:
            print(
                json.dumps(
                    {
                        "step": step,
                        "capitals correct, concise": evaluate(),
                        "score": round(stats.mean_score, 2),
                        "kl": round(stats.kl_to_reference, 2),
                        "seconds": round(time.time() - started),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
