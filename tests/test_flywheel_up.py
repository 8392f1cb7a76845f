"""The whole loop on one machine: `flywheel up` and `flywheel simulate` as a user runs them.

One short run goes through every stage — generations and feedback on Kafka, a reward-model
update, a PPO step, a candidate, the gate's verdict, the hot swap, answers carrying the new
version — then `flywheel up` is stopped and started again and resumes from the registry and
the trainer's checkpoint.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedback.broker import free_port
from flywheel.registry import PolicyRegistry
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from gate.canary import CANARY_CHECK
from trainer.checkpoint import latest_checkpoint, load_state

pytestmark = pytest.mark.subprocess  # every test drives a `flywheel up` process

HANG_GUARD_S = 600  # only to fail instead of hanging; nothing here is a timing assertion

# A loop small enough for a test: a reward-model update every 16 labels, a PPO step every 4
# logged answers, and every PPO step a candidate for the gate.
SMALL_LOOP = {
    "FLYWHEEL_REWARD_MODEL__UPDATE_EVERY_LABELS": "16",
    "FLYWHEEL_JOIN_STORE__VOTE_SETTLE_SECONDS": "0",
    "FLYWHEEL_TRAINER__MIN_LABELS_BEFORE_PPO": "16",
    "FLYWHEEL_PPO__PROMPTS_PER_STEP": "4",
    "FLYWHEEL_PPO__MAX_NEW_TOKENS": "16",
    "FLYWHEEL_PPO__CANDIDATE_EVERY_STEPS": "1",
    "FLYWHEEL_GATE__HELDOUT_PROMPTS": "8",
    "FLYWHEEL_GATE__MAX_NEW_TOKENS": "16",
    "FLYWHEEL_SERVER__POLICY_POLL_SECONDS": "1",
    "FLYWHEEL_TRAINER__METRICS_PORT": "0",
    "FLYWHEEL_GATE__METRICS_PORT": "0",
    "FLYWHEEL_SERVER__FEEDBACK_TOKEN_SECRET": "up-test-secret",
}


class Up:
    """A `flywheel up` subprocess on free ports with its own state directory."""

    def __init__(self, model_path: Path, state_dir: Path, environment: dict[str, str] | None = None):
        self.state_dir = state_dir
        self.environment = SMALL_LOOP | (environment or {})
        self.address = f"127.0.0.1:{free_port('127.0.0.1')}"
        self.kafka = f"127.0.0.1:{free_port('127.0.0.1')}"
        self.flags = [
            "--model", str(model_path), "--state-dir", str(state_dir), "--port", self.address.rpartition(":")[2],
            "--metrics-port", "0", "--kafka", self.kafka,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.output = (self.state_dir / f"up-{uuid.uuid4().hex[:6]}.out").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", *self.flags],
            stdout=self.output, stderr=subprocess.STDOUT, env={**os.environ, **self.environment},
        )  # fmt: skip
        wait_for(self.serving, "the server to answer health checks")

    def serving(self) -> bool:
        assert self.process.poll() is None, f"flywheel up exited with {self.process.returncode}"
        try:
            with grpc.insecure_channel(self.address) as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=180)
        self.output.close()
        return code

    def log(self, child: str) -> str:
        return (self.state_dir / "logs" / f"{child}.log").read_text(errors="replace")

    def simulate(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", "simulate", "--target", self.address, "--trainer-metrics-url", "", *arguments],
            capture_output=True, text=True, timeout=HANG_GUARD_S,
        )  # fmt: skip


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(1)


def vote_until(up: Up, done, what: str, log: str, first_seed: int = 0) -> None:
    """Users keep asking and voting, 40 events a round, until `done()`; the trainer proposes a candidate only
    when its pre-check expects the gate to pass it, which takes as many labels as its reward model needs."""
    deadline, seed = time.monotonic() + HANG_GUARD_S, first_seed
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{up.log(log)[-3000:]}"
        simulated = up.simulate(
            "--events", "40", "--seed", str(seed), "--heldout-questions", "5", "--out", str(up.state_dir / f"run-{seed}")
        )  # fmt: skip
        assert simulated.returncode == 0, simulated.stdout + simulated.stderr
        seed += 1


def live_version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return serving_pb2_grpc.FlywheelStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=10).policy_version


@pytest.fixture(scope="module")
def up(model_path, tmp_path_factory):
    running = Up(model_path, tmp_path_factory.mktemp("up"))
    running.start()
    yield running
    if running.process.poll() is None:
        running.stop()


def test_one_short_run_goes_through_every_stage(up):
    assert live_version(up.address) == 1
    simulated = up.simulate(
        "--events", "160", "--eval-every", "80", "--out", str(up.state_dir / "run"), "--heldout-questions", "10"
    )
    assert simulated.returncode == 0, simulated.stdout + simulated.stderr
    curve = (up.state_dir / "run" / "learning_curve.csv").read_text().splitlines()
    assert curve[0].startswith("feedback_events,seconds,heldout_thumbs_up_rate") and len(curve) >= 3
    assert (up.state_dir / "run" / "learning_curve.png").stat().st_size > 0

    vote_until(up, lambda: live_version(up.address) > 1, "an approved candidate to go live", log="train", first_seed=1)
    train_log, gate_log, serve_log = up.log("train"), up.log("gate"), up.log("serve")
    assert (
        "reward model updated" in train_log and "PPO step 1" in train_log and "candidate policy 2 proposed" in train_log
    )
    assert re.search(r"approved policy \d+", gate_log)
    assert re.search(r"policy \d+ is live", serve_log)

    registry = PolicyRegistry(up.state_dir / "registry")
    version = live_version(up.address)
    assert registry.live().version == version and registry.verdict(version).approved
    with grpc.insecure_channel(up.address) as channel:
        messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 12+34?")])
        answer = serving_pb2_grpc.FlywheelStub(channel).Generate(pb.GenerateRequest(chat=messages))
    assert answer.policy_version == version
    state = load_state(latest_checkpoint(up.state_dir / "trainer" / "checkpoint"))
    assert state.ppo_steps >= 1 and state.reward_model_updates >= 1


def test_a_judge_that_cannot_be_used_gets_a_clear_error(up):
    missing = up.simulate("--judge", "no_such_module:judge", "--events", "1")
    assert missing.returncode == 2 and "cannot import module 'no_such_module'" in missing.stdout
    no_function = up.simulate("--judge", "flywheel.demo.task:no_such_judge", "--events", "1")
    assert no_function.returncode == 2 and "has no function 'no_such_judge'" in no_function.stdout
    malformed = up.simulate("--judge", "flywheel.demo.task", "--events", "1")
    assert malformed.returncode == 2 and "expected module:function" in malformed.stdout
    invalid = up.simulate("--judge", "tests.judges:undecided", "--events", "1", "--out", str(up.state_dir / "invalid"))
    assert (
        invalid.returncode == 2
        and "returned 'maybe'" in invalid.stdout
        and "expected 'up', 'down' or 'none'" in invalid.stdout
    )


def serving_versions(serve_log: str) -> list[int]:
    """The policy version of each start of the server, from its "serving" log lines."""
    return [json.loads(line)["policy_version"] for line in serve_log.splitlines() if '"message": "serving"' in line]


def test_stop_and_start_resumes_from_the_registry_and_the_checkpoint(up):
    assert up.stop() == 0
    for address in (up.address, up.kafka):  # every child is gone with it
        with pytest.raises(OSError):
            socket.create_connection(address.rsplit(":", 1), timeout=2).close()
    registry = PolicyRegistry(up.state_dir / "registry")
    live_at_stop = registry.live().version
    assert live_at_stop > 1

    up.start()
    assert serving_versions(up.log("serve"))[-1] == live_at_stop
    wait_for(lambda: "training resumes from step-" in up.log("train"), "the trainer to resume from its checkpoint")
    assert [record.kind for record in registry.history()].count("initial") == 1


# Adapter mode: LoRA rank 4 (a tenth of the whole model's learning rate would barely move an
# adapter), and a canary on half the users that decides within a few dozen votes.
ADAPTER_LOOP = {
    "FLYWHEEL_POLICY__ADAPTER": "lora",
    "FLYWHEEL_POLICY__LORA_RANK": "4",
    "FLYWHEEL_PPO__POLICY_LEARNING_RATE": "3e-4",
    "FLYWHEEL_GATE__CANARY__SHARE": "0.5",
    "FLYWHEEL_GATE__CANARY__MIN_VOTES": "10",
    "FLYWHEEL_GATE__CANARY__MAX_VOTES": "40",
}


@pytest.fixture(scope="module")
def up_adapters(model_path, tmp_path_factory):
    running = Up(model_path, tmp_path_factory.mktemp("up-adapters"), ADAPTER_LOOP)
    running.start()
    yield running
    if running.process.poll() is None:
        running.stop()


def canary_verdicts(registry: PolicyRegistry) -> dict[int, str]:
    """The online test's reason for each candidate a canary decided, by version."""
    decided = {}
    for version in range(2, (registry.latest() or 1) + 1):
        verdict = registry.verdict(version)
        checks = [] if verdict is None else [check for check in verdict.checks if check.name == CANARY_CHECK]
        if checks:
            decided[version] = checks[0].detail
    return decided


def test_in_adapter_mode_a_ppo_trained_adapter_is_gated_then_its_canary_is_decided_by_users_thumbs(up_adapters):
    up = up_adapters
    registry = PolicyRegistry(up.state_dir / "registry")
    vote_until(up, lambda: canary_verdicts(registry), "a canary to be decided", log="gate")
    decided = canary_verdicts(registry)
    train_log, gate_log = up.log("train"), up.log("gate")
    assert "PPO step 1" in train_log and "candidate policy 2 proposed" in train_log
    version, reason = next(iter(decided.items()))
    manifest = registry.manifest(version)
    assert manifest.is_adapter and manifest.base_digest == registry.manifest(1).digest
    assert f"policy {version} passed the offline checks and answers 50.0% of users" in gate_log
    votes = int(re.search(r"over (\d+) canary votes", reason).group(1))
    assert votes >= 10, reason  # users were answered by the canary's version, and voted on it
    if registry.verdict(version).approved:
        assert reason.startswith("canary better") and f"promoted canary {version}" in gate_log
        wait_for(lambda: live_version(up.address) >= version, "the promoted adapter to go live")
    else:
        assert reason.startswith("canary not") and f"rejected canary {version}" in gate_log
