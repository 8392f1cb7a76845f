"""Retention of the policy registry over a long run, on real files (tiny fake weights, no model)."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from flywheel.registry import PolicyRegistry, PolicyRemoved, RegistryRetention
from gate.service import publish_rollback
from server.metrics import PolicyCheckMetrics
from server.swap import PolicyChecker, PolicyRefused
from tests.test_gate_races import ScriptedGate
from tests.test_registry import make_model_dir

WINDOWS = RegistryRetention(keep_approved=2, keep_rejected=3)


def long_run(registry: PolicyRegistry, model: Path, retention: RegistryRetention) -> None:
    """Version 1 seeded, then candidates 2..43 of the live version: every tenth approved (10, 20, 30, 40), the rest
    rejected, retention after each verdict as the gate runs it."""
    registry.seed(model)
    for version in range(2, 44):
        live = registry.live().version
        assert registry.publish(model, parent_version=live, training_step=version, metrics={}).version == version
        if version % 10 == 0:
            registry.approve(version, judged_against=live, checks=[], reason="approved by the gate")
        else:
            registry.record_verdict(version, False, [{"name": "reward_score", "passed": False}], judged_against=live)
        registry.retain(retention)
        now_live = registry.live()
        assert {now_live.version, now_live.previous_version} - {None} <= set(registry.versions_with_weights())


def test_a_long_run_keeps_live_its_parents_and_the_windows_and_nothing_else(tmp_path):
    registry = PolicyRegistry(tmp_path / "state" / "registry")
    long_run(registry, make_model_dir(tmp_path / "model"), WINDOWS)

    # Within the day every version that was live keeps its weights: 1, 10, 20, 30, 40 (40 live, 30 before it);
    # the newest rejected 41..43; everything else rejected is gone.
    assert registry.versions_with_weights() == [1, 10, 20, 30, 40, 41, 42, 43]
    # A day later only the windows remain: approved 30, 40; rejected 41..43; live 40 and 30 before it;
    # parents 20 (of 30), 40 (of 41..43); lineage root 1 (the gate's KL reference).
    report = registry.retain(WINDOWS, now=datetime.now(UTC) + timedelta(days=2))
    assert report.removed == [10]
    assert registry.versions_with_weights() == [1, 20, 30, 40, 41, 42, 43]

    assert registry.versions() == list(range(1, 44)), "every version keeps its manifest"
    assert all(registry.verdict(version) is not None for version in range(2, 44)), "and its verdict"
    assert [registry.manifest(version).parent_version for version in (9, 10, 19, 43)] == [1, 1, 10, 40]
    for version in registry.versions_with_weights():
        assert registry.verify(version).version == version
    assert not list(registry.root.glob(".tmp-*")) and not list(registry.root.glob("*.claim"))

    later = publish_rollback(registry, 20, "operator: back to 20")  # a kept version: live again, loadable
    assert registry.live().version == 20 and later.parent_version == 40
    assert registry.verify(20).version == 20
    assert registry.retain(WINDOWS, now=datetime.now(UTC) + timedelta(days=2)).removed == []
    with pytest.raises(PolicyRemoved, match="policy version 10: its weights were removed"):
        publish_rollback(registry, 10, "operator: further back")
    assert registry.live().version == 20


@pytest.mark.subprocess
def test_rolling_back_to_a_removed_version_from_the_command_line_says_which_versions_can(tmp_path):
    registry = PolicyRegistry(tmp_path / "state" / "registry")
    long_run(registry, make_model_dir(tmp_path / "model"), WINDOWS.model_copy(update={"recently_live_seconds": 0}))
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "rollback", "--to", "12", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "policy version 12: its weights were removed by the registry's retention" in refused.stderr
    assert "versions with weights: [1, 20, 30, 40, 41, 42, 43]" in refused.stderr
    assert registry.live().version == 40


def test_a_server_refuses_a_removed_version_with_the_reason(tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    long_run(registry, make_model_dir(tmp_path / "model"), WINDOWS.model_copy(update={"recently_live_seconds": 0}))
    checker = PolicyChecker(registry, PolicyCheckMetrics(CollectorRegistry()), 5.0, 300.0)
    with pytest.raises(PolicyRefused, match="policy version 12: its weights were removed"):
        checker.verify(12)
    assert checker.verify(30).version == 30


def test_the_gate_keeps_the_trainers_reference_policy_and_reports_the_registry_bytes(tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    model = make_model_dir(tmp_path / "model")
    registry.seed(model)
    for version in (2, 3, 4):
        registry.publish(model, parent_version=1, training_step=version, metrics={})
        registry.record_verdict(version, False, [], judged_against=1)
    # the trainer names its reference policy in each candidate it publishes: the newest names 3
    registry.publish(model, parent_version=1, training_step=5, metrics={}, reference_version=3)
    registry.record_verdict(5, False, [], judged_against=1)
    gate = ScriptedGate(registry)
    gate.settings.retention = RegistryRetention(keep_rejected=0, recently_live_seconds=0)

    before = registry.size_bytes()
    report = gate.retain()
    assert report.removed == [2, 4, 5] and registry.versions_with_weights() == [1, 3]
    after = gate.metrics.registry.get_sample_value("flywheel_registry_bytes")
    # each removed version leaves its manifest (moved beside it, same bytes) and takes its weights away
    assert after == registry.size_bytes() == before - 3 * sum(path.stat().st_size for path in model.iterdir())
    assert gate.metrics.registry.get_sample_value("flywheel_registry_weights_removed_total") == 3
