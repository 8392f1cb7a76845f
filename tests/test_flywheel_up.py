"""The whole loop on one machine: `flywheel up` and `flywheel simulate` as a user runs them.

One short run goes through every stage — generations and feedback on Kafka, a reward-model
update, a PPO step, a candidate, the gate's verdict, the hot swap, answers carrying the new
version — then `flywheel up` is stopped and started again and resumes from the registry and
the trainer's checkpoint, on whole weights. Adapter mode, the demo's own, is in test_flywheel_up_adapters.py.
"""

import json
import re
import socket

import grpc
import pytest

from flywheel.registry import PolicyRegistry
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from tests.up_fixtures import UP_TEST_TIMEOUT_S, Up, live_version, vote_until, wait_for
from trainer.checkpoint import latest_checkpoint, load_state

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(UP_TEST_TIMEOUT_S)]

WHOLE_WEIGHTS = {"FLYWHEEL_POLICY__ADAPTER": "none"}
"""The demo model learns as an adapter by its own settings; this module runs it on whole weights."""


@pytest.fixture(scope="module")
def up(model_path, tmp_path_factory):
    running = Up(model_path, tmp_path_factory.mktemp("up"), WHOLE_WEIGHTS)
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

    # The trainer may still propose from labels it holds, so the live version can move on while this reads it.
    registry = PolicyRegistry(up.state_dir / "registry")
    wait_for(
        lambda: live_version(up.address) == registry.live().version, "the server to serve the registry's live policy"
    )
    version = live_version(up.address)  # the registry's live version a moment ago: approved, whatever came since
    assert version > 1 and registry.verdict(version).approved
    with grpc.insecure_channel(up.address) as channel:
        messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 12+34?")])
        answer = serving_pb2_grpc.FlywheelStub(channel).Generate(pb.GenerateRequest(chat=messages))
    assert answer.policy_version >= version and registry.verdict(answer.policy_version).approved
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
