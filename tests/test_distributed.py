"""Data-parallel PPO under torchrun: two CPU ranks on gloo end every step with identical weights,
and sharded (FSDP2) they train the same policy as whole copies (DDP) do."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer.distributed import SINGLE_PROCESS, Ranks
from trainer.ppo import TransformersSampler, end_of_sequence_ids
from trainer.ranks import rank_seed

WORKER = Path(__file__).with_name("distributed_ppo_worker.py")
REPO_ROOT = WORKER.parent.parent


def test_one_process_is_the_identity():
    assert SINGLE_PROCESS.shard([1, 2, 3]) == [1, 2, 3]
    assert SINGLE_PROCESS.share(7, "ppo.minibatch_size") == 7
    assert SINGLE_PROCESS.mean(2.5) == 2.5
    module = object()
    assert SINGLE_PROCESS.wrap(module) is module


def test_every_step_rank_and_phase_draws_from_its_own_seed():
    seeds = {rank_seed(step, rank, phase) for step in range(50) for rank in range(8) for phase in (0, 1)}
    assert len(seeds) == 50 * 8 * 2
    assert rank_seed(3, 1, 0) == rank_seed(3, 1, 0)  # a step taken again after a restart samples the same
    assert SINGLE_PROCESS.broadcast({"prompts": [[1, 2]]}) == {"prompts": [[1, 2]]}
    assert not SINGLE_PROCESS.sharded and SINGLE_PROCESS.leads


def test_ranks_split_prompts_and_minibatches_evenly():
    second_of_two = Ranks(rank=1, world_size=2)
    assert second_of_two.shard(["a", "b", "c", "d"]) == ["b", "d"]
    assert second_of_two.share(8, "ppo.minibatch_size") == 4
    with pytest.raises(ValueError, match="ppo.prompts_per_step a multiple of the number of ranks"):
        second_of_two.shard(["a", "b", "c"])
    with pytest.raises(ValueError, match="ppo.minibatch_size=5 .* multiple of 2"):
        second_of_two.share(5, "ppo.minibatch_size")


def two_ranks(model_path: Path, out_dir: Path, *flags: str) -> list[dict]:
    """tests/distributed_ppo_worker.py on two CPU ranks (gloo); each rank's report."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(model_path), str(out_dir), "--steps", "2", *flags,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    print(f"torchrun, 2 ranks, 2 PPO steps {flags}: {time.perf_counter() - started:.1f}s")
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.subprocess
def test_two_ranks_on_gloo_keep_identical_weights(model_path, tmp_path):
    reports = two_ranks(model_path, tmp_path / "ranks")

    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"], report["backend"], report["ddp"]) == (
            rank,
            2,
            "gloo",
            "DistributedDataParallel",
        )
        for step in report["steps"]:
            print(f"rank {rank}: {step['own']}")
            assert step["own"]["first_minibatch_ratio"] == 1.0
            # Each rank sampled its half: 4 of the 8 prompts, 2 answers each.
            assert len(step["prompts"]) == 8
    first, second = reports
    # The ranks sampled different prompts, yet trained the very same weights.
    assert set(first["steps"][0]["prompts"]).isdisjoint(second["steps"][0]["prompts"])
    assert first["started_from"] == second["started_from"]
    assert first["policy"] == second["policy"] != first["started_from"]
    assert first["critic"] == second["critic"]
    for mine, theirs in zip(first["steps"], second["steps"]):
        # β and the logged statistics are taken over both ranks, so both see the same numbers.
        assert mine["kl_coef_after"] == theirs["kl_coef_after"]
        assert mine["all_ranks"] == theirs["all_ranks"]
        assert mine["all_ranks"]["kl_to_reference"] == pytest.approx(
            (mine["own"]["kl_to_reference"] + theirs["own"]["kl_to_reference"]) / 2
        )


@pytest.mark.subprocess
def test_sharded_ranks_train_the_policy_whole_copies_train(model_path, tmp_path):
    """FSDP2 on two ranks, against DDP on the same prompts and seeds: the same answers, the same policy
    within float tolerance (the gradient is summed in another order), far from where both started."""
    whole = two_ranks(model_path, tmp_path / "ddp", "--parallelism", "ddp")
    sharded = two_ranks(model_path, tmp_path / "fsdp", "--parallelism", "fsdp")
    assert sharded[0]["ddp"] == "FSDPPolicyWithValue"
    for ddp_rank, fsdp_rank in zip(whole, sharded):
        for ddp_step, fsdp_step in zip(ddp_rank["steps"], fsdp_rank["steps"]):
            assert fsdp_step["prompts"] == ddp_step["prompts"]
            assert fsdp_step["own"]["first_minibatch_ratio"] == 1.0
            assert fsdp_step["own"]["mean_score"] == pytest.approx(ddp_step["own"]["mean_score"], abs=1e-4)
    ddp_policy = load_file(tmp_path / "ddp" / "policy.safetensors")
    fsdp_policy = load_file(tmp_path / "fsdp" / "policy.safetensors")
    started = load_file(model_path / "model.safetensors")
    assert fsdp_policy.keys() == ddp_policy.keys()
    moved = max((ddp_policy[name] - started[name]).abs().max().item() for name in started if name in ddp_policy)
    apart = max((fsdp_policy[name] - ddp_policy[name]).abs().max().item() for name in ddp_policy)
    print(f"largest weight change from the start {moved:.2e}; largest DDP-FSDP difference {apart:.2e}")
    assert moved > 1e-4
    for name in ddp_policy:
        torch.testing.assert_close(fsdp_policy[name], ddp_policy[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.subprocess
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_each_ranks_vllm_engine_answers_with_the_trained_policy(model_path, tokenizer, tmp_path, parallelism):
    """`ppo.rollouts = "vllm"` under torchrun: every rank's own engine (vLLM's external launcher)
    samples its share, and after PPO steps answers greedily as the trained policy does (whole
    weights handed over in memory, gathered from the shards under FSDP)."""
    reports = two_ranks(model_path, tmp_path / parallelism, "--parallelism", parallelism, "--rollouts", "vllm")
    trained = AutoModelForCausalLM.from_pretrained(model_path)
    trained.load_state_dict(load_file(tmp_path / parallelism / "policy.safetensors"), strict=False)
    trained.tie_weights()
    started = AutoModelForCausalLM.from_pretrained(model_path)
    eos = end_of_sequence_ids(trained.generation_config.eos_token_id, tokenizer.eos_token_id)
    moved = False
    for report in reports:
        engine = report["engine_greedy_after"]
        assert all(step["own"]["first_minibatch_ratio"] == 1.0 for step in report["steps"])
        policy_answers = TransformersSampler(trained.eval(), tokenizer.pad_token_id, eos)(engine["prompt_ids"], 12, 0.0)
        assert engine["answers"] == policy_answers, "a rank's engine answered with weights other than the policy's"
        base = TransformersSampler(started.eval(), tokenizer.pad_token_id, eos)(engine["prompt_ids"], 12, 0.0)
        moved |= base != policy_answers
    assert reports[0]["engine_greedy_after"]["prompt_ids"] != reports[1]["engine_greedy_after"]["prompt_ids"]
    assert moved, "PPO must change some greedy answer for this test to mean anything"


@pytest.mark.subprocess
def test_a_sharded_policy_restarts_from_live_on_every_rank(model_path, tmp_path):
    """FSDP: `restart_policy` (the trainer's restart from live) loads the whole weights into every
    rank's shards and forgets the optimizer's moments."""
    reports = two_ranks(model_path, tmp_path / "fsdp", "--parallelism", "fsdp", "--restart")
    leader = reports[0]
    trained = load_file(tmp_path / "fsdp" / "policy.safetensors")
    started = load_file(model_path / "model.safetensors")
    assert any(not torch.equal(trained[name], started[name]) for name in started), "the steps must move the policy"
    assert leader["restarted"] == leader["started_from"], "the gathered shards are not the weights restarted from"
    assert all(report["optimizer_moments_after_restart"] == 0 for report in reports)
