"""`flywheel train` on two ranks under torchrun (CPU, gloo) against the real (embedded) broker.

Rank 0 reads Kafka and checkpoints; rank 1 follows its orders. Rank 1 is SIGKILLed in the middle
of training, which ends the job; the job started again resumes from the last checkpoint. At the
end, stopped cleanly, both ranks hold bitwise the same weights, and every published event was
taken once and every label trained on once across the kill.
"""

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.message import Message

from flywheel.demo.task import traffic_questions
from flywheel.registry import PolicyRegistry
from tests.test_trainer_loop import (
    HANG_GUARD_S,
    HELDOUT_FRACTION,
    DemoTraffic,
    LabelAccount,
    TrainProcess,
    latest_name,
    publish,
    seen_event_ids,
    toml_document,
    wait_for_new_checkpoint,
    without_nulls,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.broker]

RANKS = 2


def rank_pid(trainer: TrainProcess, message: str) -> int:
    """The process id a rank logged when it opened (`rank 0 of 2 leads`, `rank 1 of 2 follows`)."""
    return trainer.line(trainer.wait_for(message))["pid"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def rank_stacks(pids: list[int]) -> str:
    """Each live rank's Python stack (py-spy), to tell where a hung job waits."""
    dumps = []
    for pid in pids:
        if gone(pid):
            continue
        try:
            dump = subprocess.run(
                [Path(sys.executable).with_name("py-spy"), "dump", "--pid", str(pid)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            dumps.append(f"--- rank process {pid}\n{dump.stdout}{dump.stderr}")
        except (OSError, subprocess.TimeoutExpired) as failed:
            dumps.append(f"--- rank process {pid}: no stack ({failed})")
    return "\n".join(dumps)


def wait_until_gone(pid: int) -> None:
    """torchrun starts each rank in a session of its own: wait for the rank itself, not just torchrun."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not gone(pid):
        assert time.monotonic() < deadline, f"rank process {pid} outlived its job"
        time.sleep(0.1)


@pytest.mark.timeout(900)  # two starts of two ranks, each importing torch and transformers
@pytest.mark.parametrize(
    ("parallelism", "rollouts"),
    [("ddp", "transformers"), ("fsdp", "transformers"), ("ddp", "vllm"), ("fsdp", "vllm")],
    ids=["ddp", "fsdp", "ddp-vllm", "fsdp-vllm"],
)
def test_two_ranks_train_as_one_through_a_sigkill(
    model_path, tokenizer, kafka_settings, tmp_path, parallelism, rollouts
):
    state_dir, registry_dir = tmp_path / "state", tmp_path / "registry"
    checkpoint_dir, join_store_path = state_dir / "trainer" / "checkpoint", state_dir / "trainer" / "join_store.sqlite3"
    PolicyRegistry(registry_dir).seed(model_path)
    update_every_labels = 16
    settings = {
        "state_dir": str(state_dir),
        "registry_dir": str(registry_dir),
        "engine": {"model": str(model_path)},
        "policy": {"adapter": "none"},  # whole weights, which FSDP shards (the demo model learns as an adapter)
        # The killed job's consumer keeps its partitions until its session times out: keep that short.
        "kafka": without_nulls(kafka_settings.model_dump(mode="json")) | {"session_timeout_ms": 4000},
        # Every second step's policy is proposed: whether rank 0 publishes them is tested here, the
        # pre-check that may withhold them in tests/test_candidate_precheck.py.
        "trainer": {"metrics_port": 0, "min_labels_before_ppo": 30, "checkpoint_every_steps": 1, "torch_threads": 1,
                    "parallelism": parallelism, "precheck_candidates": False},
        "join_store": {"vote_settle_seconds": 0},
        "reward_model": {
            "update_every_labels": update_every_labels, "heldout_fraction": HELDOUT_FRACTION, "learning_rate": 5e-4,
        },
        "ppo": {
            # Each rank samples 4 prompts x 2 answers and trains on minibatches of 4.
            "prompts_per_step": 8, "responses_per_prompt": 2, "max_new_tokens": 8, "epochs": 2, "minibatch_size": 8,
            "candidate_every_steps": 2,
            # vllm: each rank's own engine in its own process (vLLM's external launcher) samples its prompts.
            "rollouts": rollouts,
            "rollout_engine": {"dtype": "float32", "max_model_len": 256, "kv_cache_bytes": 64 << 20, "enforce_eager": True},
        },
    }  # fmt: skip
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text(toml_document(settings))

    traffic = DemoTraffic(tokenizer, seed=2)
    questions = traffic_questions(random.Random(2), 50)
    rounds = [traffic.labelled(questions[start:end]) for start, end in ((0, 25), (25, 40), (40, 50))]
    published: list[Message] = []

    def publish_round(events: list[Message]) -> None:
        asyncio.run(publish(kafka_settings, tmp_path / "test-spool", events))
        published.extend(events)

    started = time.perf_counter()
    jobs: list[TrainProcess] = []
    rank_pids: list[int] = []
    try:
        # 1. Two ranks train on the first round; rank 1 is SIGKILLed once PPO steps are under way,
        # and torchrun ends the whole job.
        job = TrainProcess(config_file, ranks=RANKS)
        jobs.append(job)
        follower = rank_pid(job, f"rank 1 of {RANKS} follows")
        first_leader = rank_pid(job, f"rank 0 of {RANKS} leads")
        rank_pids += [follower, first_leader]
        publish_round(rounds[0])
        job.wait_for("PPO step")
        # The pass that took the first step checkpoints after it: kill once that checkpoint is written.
        killed_after = wait_for_new_checkpoint(checkpoint_dir, job, than=latest_name(checkpoint_dir))
        os.kill(follower, signal.SIGKILL)
        ended_with = job.process.wait(timeout=HANG_GUARD_S)
        job._reader.join()
        assert ended_with != 0, job.tail()
        wait_until_gone(first_leader)

        # 2. The second round arrives while no job runs; the restarted job resumes from the last
        # checkpoint, takes the third round too, and stops cleanly when rank 0 is asked to.
        publish_round(rounds[1])
        restored = latest_name(checkpoint_dir)
        job = TrainProcess(config_file, ranks=RANKS)
        jobs.append(job)
        resumed = job.wait_for("training resumes from")
        assert job.line(resumed)["message"] == f"training resumes from {restored}", job.tail()
        leader = rank_pid(job, f"rank 0 of {RANKS} leads")
        rank_pids.append(leader)
        publish_round(rounds[2])
        published_ids = [event.event_id for event in published]
        deadline = time.monotonic() + HANG_GUARD_S
        while not seen_event_ids(join_store_path) >= set(published_ids):
            assert time.monotonic() < deadline, f"the job did not take every event:\n{job.tail()}"
            time.sleep(0.2)
        job.wait_for("PPO step", after=resumed + 1)
        os.kill(leader, signal.SIGTERM)
        assert job.process.wait(timeout=HANG_GUARD_S) == 0, job.tail()
        job._reader.join()

    except BaseException:  # a rank that hangs is rare: leave its stack, and every other rank's, in the report
        print(rank_stacks(rank_pids))
        raise
    finally:  # a test that failed midway leaves no rank behind
        for pid in rank_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for job in jobs:
            if job.process.poll() is None:
                job.kill()

    # Both ranks stopped when rank 0 did; whole copies (DDP) with the very same weights.
    stopped = {line["rank"]: line for line in job.logged("rank ") if line["message"].endswith(" stops")}
    assert sorted(stopped) == list(range(RANKS)), job.tail()
    if parallelism == "ddp":
        for model in ("policy", "critic", "reward_model"):
            assert len({line[f"{model}_digest"] for line in stopped.values()}) == 1, model
    if rollouts == "vllm":  # every rank's own engine sampled: the policy went into it before each rollout
        assert all(line["rollout_engine_syncs"] >= 1 for line in stopped.values()), stopped

    account = LabelAccount.of(checkpoint_dir, published, tmp_path)
    print(
        f"2 ranks ({parallelism}, {rollouts} rollouts), rank 1 killed after checkpoint {killed_after}, resumed from {restored}; "
        f"{account.summary(len(published))}; {time.perf_counter() - started:.1f}s"
    )
    # Every published event taken exactly once, every label trained on once, none skipped.
    assert sorted(account.seen) == sorted(published_ids)
    assert account.state.labels_trained == account.thumbs_used + account.pairs_used
    assert account.thumbs_used + account.pairs_used + account.waiting == account.expected_train
    assert account.waiting < update_every_labels
    assert account.state.ppo_steps >= 2
    assert PolicyRegistry(registry_dir).latest() > 1  # rank 0 proposed candidates
