"""`flywheel up` and `flywheel simulate` driven as a user runs them, for the whole-loop tests.

Each test module that uses `Up` holds one stack at a time in a module fixture: two `flywheel up` stacks
at once would share this machine's two cores and slow both.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedback.broker import free_port
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc

HANG_GUARD_S = 600  # only to fail instead of hanging; nothing here is a timing assertion
UP_TEST_TIMEOUT_S = 3 * HANG_GUARD_S
"""pytest's own guard for a test that drives `Up`: it covers a module fixture's start, the test's wait and
the stop, each bounded by HANG_GUARD_S or less, so it must be longer than their sum."""

# A loop small enough for a test: a reward-model update every 16 labels, a PPO step every 4
# logged answers, and every PPO step a candidate for the gate. Answers keep the demo model's 24-token
# limit: at 16 a quarter of its answers are cut off, and the pre-check withholds every candidate
# (unfinished over the gate's 20% cap) until PPO has shortened them, minutes of votes.
SMALL_LOOP = {
    "FLYWHEEL_REWARD_MODEL__UPDATE_EVERY_LABELS": "16",
    "FLYWHEEL_JOIN_STORE__VOTE_SETTLE_SECONDS": "0",
    "FLYWHEEL_TRAINER__MIN_LABELS_BEFORE_PPO": "16",
    "FLYWHEEL_PPO__PROMPTS_PER_STEP": "4",
    "FLYWHEEL_PPO__CANDIDATE_EVERY_STEPS": "1",
    "FLYWHEEL_GATE__HELDOUT_PROMPTS": "8",
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
