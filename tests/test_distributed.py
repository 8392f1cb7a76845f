"""Data-parallel PPO under torchrun: two CPU ranks on gloo end every step with identical weights."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.distributed import SINGLE_PROCESS, Ranks

WORKER = Path(__file__).with_name("distributed_ppo_worker.py")
REPO_ROOT = WORKER.parent.parent


def test_one_process_is_the_identity():
    assert SINGLE_PROCESS.shard([1, 2, 3]) == [1, 2, 3]
    assert SINGLE_PROCESS.share(7, "ppo.minibatch_size") == 7
    assert SINGLE_PROCESS.mean(2.5) == 2.5
    module = object()
    assert SINGLE_PROCESS.wrap(module) is module


def test_ranks_split_prompts_and_minibatches_evenly():
    second_of_two = Ranks(rank=1, world_size=2)
    assert second_of_two.shard(["a", "b", "c", "d"]) == ["b", "d"]
    assert second_of_two.share(8, "ppo.minibatch_size") == 4
    with pytest.raises(ValueError, match="ppo.prompts_per_step a multiple of the number of ranks"):
        second_of_two.shard(["a", "b", "c"])
    with pytest.raises(ValueError, match="ppo.minibatch_size=5 .* multiple of 2"):
        second_of_two.share(5, "ppo.minibatch_size")


@pytest.mark.subprocess
def test_two_ranks_on_gloo_keep_identical_weights(model_path, tmp_path):
    out_dir = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(model_path), str(out_dir), "--steps", "2",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    reports = [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    print(f"torchrun, 2 ranks, 2 PPO steps: {time.perf_counter() - started:.1f}s")

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
