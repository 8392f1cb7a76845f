"""One rank of a data-parallel PPO run on the demo model, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/distributed_ppo_worker.py MODEL_DIR OUT_DIR \
        [--device cuda] [--parallelism fsdp] [--rollouts vllm] [--restart]

Every rank takes `--steps` PPO steps on the same list of demo prompts (each samples answers for
its own share) and writes OUT_DIR/rank-<rank>.json: what it sampled, each step's statistics (its
own and over all ranks), and a digest of its policy weights before and after. Rank 0 also
writes the whole trained policy to OUT_DIR/policy.safetensors (gathered from the shards under FSDP).
With `--rollouts vllm` each rank samples with its own vLLM engine (the external launcher), and after
the steps reports that engine's greedy answers to its share of the prompts.
"""

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.adapters import PolicySettings
from flywheel.prompts import PromptRenderer
from trainer.config import PPOSettings, RolloutEngineSettings
from trainer.distributed import close_ranks, init_ranks
from trainer.ppo import PolicyWithValue, PPOTrainer, end_of_sequence_ids
from trainer.ranks import rank_seed
from trainer.reward_model import RewardModel, load_without_dropout

PROMPTS = [
    "What is 47+38?", "What is 83-47?", "What is 12+90?", "What is 65-21?",
    "What is the capital of Peru?", "What is the capital of France?", "What is 30+41?", "What is 99-18?",
]  # fmt: skip


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    return state_digest(model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu: gloo; cuda: NCCL, one GPU per rank"
    )
    parser.add_argument("--parallelism", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--rollouts", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument(
        "--restart", action="store_true", help="after the steps, restart the policy from the model it started from"
    )
    args = parser.parse_args()

    ranks = init_ranks(args.device, args.parallelism)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # The reward model's head is new: the same seed on every rank gives every rank the same one.
    torch.manual_seed(0)
    reward_model = ranks.shard_model(RewardModel.from_pretrained(args.model_dir).to(ranks.device))
    models = PolicyWithValue.from_pretrained(args.model_dir)
    settings = PPOSettings(
        prompts_per_step=len(PROMPTS), max_new_tokens=8, minibatch_size=4, epochs=2, policy_learning_rate=1e-4
    )
    started_from = weights_digest(models.policy)
    sampler = None
    if args.rollouts == "vllm":
        from trainer.vllm_rollouts import VLLMSampler

        eos = end_of_sequence_ids(models.policy.generation_config.eos_token_id, tokenizer.eos_token_id)
        engine = RolloutEngineSettings(dtype="float32", max_model_len=256, kv_cache_bytes=64 << 20, enforce_eager=True)
        sampler = VLLMSampler(
            models.policy, args.model_dir, eos, engine, PolicySettings(), args.out_dir / "sync", ranks=ranks
        )
    ppo = PPOTrainer(models, tokenizer, settings, sampler=sampler, ranks=ranks)

    renderer = PromptRenderer(tokenizer)
    prompt_ids = [renderer.user_message(prompt).token_ids for prompt in PROMPTS]
    steps = []
    for step in range(args.steps):
        # Seeded as `flywheel train` seeds a step: each rank samples its own answers, and DDP and
        # FSDP (whose sampling draws past the end of an answer) then shuffle alike.
        torch.manual_seed(rank_seed(step, ranks.rank, 0))
        rollout = ppo.rollout(prompt_ids)
        torch.manual_seed(rank_seed(step, ranks.rank, 1))
        own = ppo.ppo_step(rollout, reward_model)
        steps.append(
            {
                "prompts": [tokenizer.decode(p) for p in rollout.prompt_token_ids],
                "own": asdict(own),
                "all_ranks": asdict(ranks.reduce_stats(own)),
                "kl_coef_after": ppo.kl_controller.kl_coef,
            }
        )
    greedy = None
    if sampler is not None:
        share = ranks.shard(prompt_ids)
        greedy = {"prompt_ids": share, "answers": sampler(share, 12, 0.0)}
    policy = ranks.full_state_dict(models.policy)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if ranks.leads:
        save_file({name: tensor.clone() for name, tensor in policy.items()}, args.out_dir / "policy.safetensors")
    report = {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "backend": torch.distributed.get_backend() if ranks.distributed else None,
        "ddp": type(ppo.trainable).__name__,
        "started_from": started_from,
        "policy": None if ranks.sharded else weights_digest(models.policy),
        "critic": None if ranks.sharded else weights_digest(models.critic),
        "steps": steps,
        "engine_greedy_after": greedy,
    }
    if args.restart:  # as the trainer restarts from live: every rank loads the whole weights
        ppo.restart_policy(load_without_dropout(AutoModelForCausalLM, args.model_dir).state_dict())
        restarted = ranks.full_state_dict(models.policy)
        report["restarted"] = state_digest(restarted) if restarted else None
        report["optimizer_moments_after_restart"] = len(ppo.policy_optimizer.state)
    (args.out_dir / f"rank-{ranks.rank}.json").write_text(json.dumps(report, indent=2))
    if sampler is not None:  # its shutdown takes the process group down with it: after the last use
        sampler.shutdown()
    close_ranks(ranks)


if __name__ == "__main__":
    main()
