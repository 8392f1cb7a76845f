"""The whole loop in adapter mode, as a user runs it: a PPO-trained LoRA adapter is gated, then answers a
share of users as a canary until their thumbs decide it."""

import re

import pytest

from flywheel.registry import PolicyRegistry
from gate.canary import CANARY_CHECK
from tests.up_fixtures import UP_TEST_TIMEOUT_S, Up, live_version, vote_until, wait_for

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(UP_TEST_TIMEOUT_S)]

# Adapter mode as the demo model's own settings choose it (LoRA rank 4 at its adapter learning rate),
# with a canary on half the users that decides within a few dozen votes.
ADAPTER_LOOP = {
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
