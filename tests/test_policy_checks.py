"""The check every policy version passes before a server loads it, at start-up and before a swap.

Real registries of small fake model directories; no engine (a server that refuses to start
never starts one).
"""

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from flywheel.registry import LiveRecord, PolicyRegistry
from server.metrics import PolicyCheckMetrics
from server.swap import (
    NoServablePolicy,
    PolicyChecker,
    PolicyRefused,
    fallback_versions,
    refusal_backoff_seconds,
    startup_policy,
)
from tests.test_registry import make_model_dir


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def corrupt(registry: PolicyRegistry, version: int) -> None:
    weights = registry.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.fixture
def registry(tmp_path) -> PolicyRegistry:
    """Versions 1 (seeded), 2 and 3, each approved in turn: 3 is live."""
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(make_model_dir(tmp_path / "model"))
    for version in (2, 3):
        registry.publish(tmp_path / "model", parent_version=version - 1, training_step=version, metrics={})
        registry.set_live(version, reason="approved", kind="approved")
    return registry


def checker_of(registry: PolicyRegistry, clock: Clock | None = None) -> tuple[PolicyChecker, CollectorRegistry]:
    metrics = CollectorRegistry()
    checker = PolicyChecker(registry, PolicyCheckMetrics(metrics), 5.0, 300.0, clock=clock or Clock())
    return checker, metrics


def refusals(metrics: CollectorRegistry, version: int) -> float | None:
    return metrics.get_sample_value("flywheel_policy_refusals_total", {"policy_version": str(version)})


def test_backoff_doubles_from_the_first_wait_up_to_the_cap():
    # 5 · 2^(n-1): 5, 10, 20, 40, 80, 160, then 320 capped to 300.
    assert [refusal_backoff_seconds(n, 5.0, 300.0) for n in range(1, 8)] == [5, 10, 20, 40, 80, 160, 300]
    assert refusal_backoff_seconds(10_000, 5.0, 300.0) == 300  # no overflow after days of refusals


def record(version: int, kind: str, previous: int | None) -> LiveRecord:
    return LiveRecord(version=version, kind=kind, reason="", at=datetime.now(UTC), previous_version=previous)


def test_fallbacks_are_earlier_live_versions_newest_first_but_none_a_rollback_left():
    history = [
        record(1, "initial", None),
        record(2, "approved", 1),
        record(3, "approved", 2),
        record(2, "rollback", 3),  # 3 judged bad
        record(4, "approved", 2),
        record(5, "approved", 4),
    ]
    assert fallback_versions(5, history) == [4, 2, 1]
    assert fallback_versions(2, history[:4]) == [1]  # a refused rollback target never falls back to what it replaced
    assert fallback_versions(1, history[:1]) == []


def test_a_refused_version_is_counted_and_checked_again_only_after_a_doubling_backoff(registry):
    clock = Clock()
    checker, metrics = checker_of(registry, clock)
    original = (registry.path(3) / "model.safetensors").read_bytes()
    corrupt(registry, 3)

    with pytest.raises(PolicyRefused, match="policy version 3: file 'model.safetensors' has sha256") as refused:
        checker.verify(3)
    assert refused.value.version == 3 and refusals(metrics, 3) == 1
    assert not checker.due(3) and checker.due(2)
    clock.now += 5  # the first wait
    assert checker.due(3)
    with pytest.raises(PolicyRefused):
        checker.verify(3)
    assert refusals(metrics, 3) == 2
    clock.now += 9.9  # the second wait is 10 s
    assert not checker.due(3)
    clock.now += 0.1
    assert checker.due(3)

    (registry.path(3) / "model.safetensors").write_bytes(original)  # repaired in place
    assert checker.verify(3).version == 3
    assert checker.due(3) and refusals(metrics, 3) == 2


def test_a_version_missing_from_the_registry_is_refused_not_raised(registry):
    checker, metrics = checker_of(registry)
    with pytest.raises(PolicyRefused, match="policy version 9 does not exist"):
        checker.verify(9)
    assert refusals(metrics, 9) == 1


def test_startup_serves_the_live_version_when_it_matches_its_manifest(registry):
    checker, metrics = checker_of(registry)
    version, manifest = startup_policy(checker, registry.live())
    assert version == 3 and manifest == registry.manifest(3)
    assert refusals(metrics, 3) is None


def test_startup_falls_back_to_the_version_live_before_a_refused_one(registry):
    corrupt(registry, 3)
    checker, metrics = checker_of(registry)
    version, manifest = startup_policy(checker, registry.live())
    assert version == 2 and manifest == registry.manifest(2)
    assert refusals(metrics, 3) == 1
    assert not checker.due(3)  # the swapper, sharing the checker, does not hash it again at once


def test_startup_skips_a_refused_fallback_for_an_older_one(registry):
    corrupt(registry, 3)
    corrupt(registry, 2)
    checker, metrics = checker_of(registry)
    assert startup_policy(checker, registry.live())[0] == 1
    assert refusals(metrics, 2) == refusals(metrics, 3) == 1


def test_startup_refuses_when_the_only_earlier_version_was_rolled_back_from(registry):
    registry.set_live(2, reason="thumbs-down", kind="rollback")  # 3 judged bad; only 1 may stand in for 2
    corrupt(registry, 2)
    corrupt(registry, 1)
    checker, _ = checker_of(registry)
    with pytest.raises(NoServablePolicy) as refused:
        startup_policy(checker, registry.live())
    message = str(refused.value)
    assert message.startswith("refusing to serve live policy version 2: policy version 2: file 'model.safetensors'")
    assert "version 1: policy version 1: file 'model.safetensors'" in message and "version 3" not in message


@pytest.mark.subprocess
def test_flywheel_serve_exits_naming_the_refused_live_version_and_why(tmp_path):
    registry = PolicyRegistry(tmp_path / "state" / "registry")
    registry.seed(make_model_dir(tmp_path / "model"))
    corrupt(registry, 1)
    serve = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert serve.returncode == 1, serve.stderr
    last_line = serve.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "flywheel serve: refusing to serve live policy version 1: policy version 1: file 'model.safetensors'"
    )
    assert "no other version" in last_line
