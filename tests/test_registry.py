"""Tests of flywheel/registry.py on small fake model directories (bytes, no real model)."""

import hashlib
import json
import multiprocessing
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flywheel import registry as registry_module
from flywheel.registry import (
    CorruptPolicy,
    LiveMoved,
    LiveRecord,
    PolicyRegistry,
    PolicyRemoved,
    RegistryRetention,
    VerdictCheck,
    VersionStanding,
    files_digest,
    versions_to_keep,
)

FAKE_MODEL = {
    "model.safetensors": bytes(range(256)) * 64,
    "config.json": b'{"model_type": "llama", "hidden_size": 8}',
    "generation_config.json": b'{"eos_token_id": 2}',
    "tokenizer.json": b'{"version": "1.0"}',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
}


def make_model_dir(path: Path, files: dict[str, bytes] = FAKE_MODEL) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


@pytest.fixture
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def registry(tmp_path):
    return PolicyRegistry(tmp_path / "registry")


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# ---------------------------------------------------------------- publish and read back


def test_files_digest_hashes_sorted_name_and_sha_lines():
    # lines "name\0sha\n" in name order, whatever the dict order
    expected = hashlib.sha256(b"a\0aaa\nb\0bbb\n").hexdigest()
    assert files_digest({"b": "bbb", "a": "aaa"}) == expected


def test_publish_two_versions_and_read_them_back(registry, model_dir, tmp_path):
    first = registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    changed = dict(FAKE_MODEL, **{"model.safetensors": b"\x01" * 1000})
    second_dir = make_model_dir(tmp_path / "model2", changed)
    second = registry.publish(second_dir, parent_version=1, training_step=40, metrics={"reward_mean": 0.25})

    assert (first.version, second.version) == (1, 2)
    assert registry.versions() == [1, 2]
    assert registry.latest() == 2
    assert registry.path(2) == registry.root / "v000002"

    read_back = registry.manifest(2)
    assert read_back == second
    assert read_back.parent_version == 1
    assert read_back.training_step == 40
    assert read_back.metrics == {"reward_mean": 0.25}
    assert read_back.created_at.utcoffset().total_seconds() == 0
    assert read_back.files == {name: sha256(content) for name, content in changed.items()}
    assert read_back.digest == files_digest(read_back.files)
    assert first.digest != second.digest

    for name, content in FAKE_MODEL.items():
        assert (registry.path(1) / name).read_bytes() == content
    assert sorted(p.name for p in registry.path(1).iterdir()) == sorted([*FAKE_MODEL, "manifest.json"])
    assert registry.verify(1) == first
    assert registry.verify(2) == second


def test_empty_registry(registry):
    assert registry.versions() == []
    assert registry.latest() is None
    with pytest.raises(ValueError, match="policy version 1 does not exist"):
        registry.manifest(1)


def test_publish_refuses_subdirectories_and_unknown_parents(registry, model_dir):
    (model_dir / "onnx").mkdir()
    with pytest.raises(ValueError, match=r"must be flat.*'onnx'"):
        registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    (model_dir / "onnx").rmdir()
    with pytest.raises(ValueError, match="policy version 7 does not exist"):
        registry.publish(model_dir, parent_version=7, training_step=0, metrics={})
    assert registry.versions() == []
    assert not list(registry.root.glob(".tmp-*")), "a refused publish leaves no staging directory"


def test_publish_skips_hidden_tool_metadata(registry, model_dir):
    (model_dir / ".gitattributes").write_text("*.safetensors filter=lfs")
    (model_dir / ".cache" / "huggingface").mkdir(parents=True)
    manifest = registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    assert sorted(manifest.files) == sorted(FAKE_MODEL)


# ---------------------------------------------------------------- verify


def test_verify_names_a_flipped_byte_in_the_weights(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    weights = registry.path(1) / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[1000] ^= 0x01
    weights.write_bytes(bytes(content))
    with pytest.raises(CorruptPolicy, match=r"policy version 1: file 'model.safetensors' has sha256"):
        registry.verify(1)


def test_verify_names_a_missing_file(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    (registry.path(1) / "tokenizer.json").unlink()
    with pytest.raises(CorruptPolicy, match=r"policy version 1: file 'tokenizer.json' is missing"):
        registry.verify(1)


def test_verify_names_an_extra_file(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    (registry.path(1) / "adapter.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CorruptPolicy, match=r"policy version 1: file 'adapter.safetensors' is not in the manifest"):
        registry.verify(1)


def test_verify_catches_an_edited_manifest(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    manifest_path = registry.path(1) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["config.json"] = sha256(b"something else")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptPolicy, match="policy version 1: manifest.json does not match"):
        registry.verify(1)


# ---------------------------------------------------------------- the reward model published with a version

FAKE_REWARD_MODEL = {"model.safetensors": bytes(range(255, -1, -1)) * 32, "score_head.safetensors": b"head"}


def test_a_version_carries_its_reward_model_checked_against_the_manifest(registry, model_dir, tmp_path):
    reward_model = make_model_dir(tmp_path / "reward_model", FAKE_REWARD_MODEL)
    manifest = registry.publish(
        model_dir, parent_version=None, training_step=3, metrics={}, reward_model_dir=reward_model
    )
    assert manifest.reward_model.files == {name: sha256(content) for name, content in FAKE_REWARD_MODEL.items()}
    path = registry.reward_model_path(1)
    assert path == registry.path(1) / "reward_model" and (path / "score_head.safetensors").read_bytes() == b"head"
    assert registry.verify(1).digest == manifest.digest, "the policy's digest covers the policy's files alone"
    assert manifest.digest == files_digest({name: sha256(content) for name, content in FAKE_MODEL.items()})

    (path / "score_head.safetensors").unlink()
    (path / "score_head.safetensors").write_bytes(b"hexd")
    with pytest.raises(
        CorruptPolicy, match="policy version 1's reward model: file 'score_head.safetensors' has sha256"
    ):
        registry.reward_model_path(1)


def test_a_version_without_a_reward_model_cannot_be_judged_by_one(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    with pytest.raises(CorruptPolicy, match="policy version 1 was published without a reward model"):
        registry.reward_model_path(1)
    (registry.path(1) / "reward_model").mkdir()
    with pytest.raises(CorruptPolicy, match="file 'reward_model' is not in the manifest"):
        registry.verify(1)


def test_an_unchanged_reward_model_is_linked_not_copied_and_outlives_the_version_it_came_with(
    registry, model_dir, tmp_path
):
    first = make_model_dir(tmp_path / "rm1", FAKE_REWARD_MODEL)
    changed = make_model_dir(tmp_path / "rm2", FAKE_REWARD_MODEL | {"score_head.safetensors": b"new head"})
    registry.seed(model_dir)
    for reward_model in (first, first, changed):
        registry.publish(model_dir, parent_version=1, training_step=1, metrics={}, reward_model_dir=reward_model)

    def inode(version: int, name: str) -> int:
        return (registry.path(version) / "reward_model" / name).stat().st_ino

    assert inode(2, "model.safetensors") == inode(3, "model.safetensors") == inode(4, "model.safetensors")
    assert (
        inode(2, "score_head.safetensors") == inode(3, "score_head.safetensors") != inode(4, "score_head.safetensors")
    )
    weights = len(FAKE_REWARD_MODEL["model.safetensors"])
    policy_bytes = sum(len(content) for content in FAKE_MODEL.values())
    assert registry.size_bytes() < 4 * policy_bytes + 2 * weights, "linked bytes are counted once"

    for version in (2, 3):
        registry.record_verdict(version, False, [], judged_against=1)
    registry.record_verdict(4, True, [], judged_against=1)
    assert registry.retain(RegistryRetention(keep_rejected=0, recently_live_seconds=0)).removed == [2, 3]
    assert registry.reward_model_path(4).is_dir(), "its linked files stay whole"


# ---------------------------------------------------------------- concurrency and crashes


def _publish_versions(root: str, model_dir: str, count: int) -> list[int]:
    registry = PolicyRegistry(Path(root))
    return [
        registry.publish(Path(model_dir), parent_version=None, training_step=step, metrics={}).version
        for step in range(count)
    ]


def test_concurrent_publishers_get_distinct_versions(registry, model_dir):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        per_process = pool.starmap(_publish_versions, [(str(registry.root), str(model_dir), 4)] * 2)
    allocated = sorted(per_process[0] + per_process[1])
    assert allocated == list(range(1, 9))
    assert registry.versions() == allocated
    for version in allocated:
        assert registry.verify(version).version == version


def test_leftover_temp_dir_is_ignored_and_cleaned_up_when_stale(registry, model_dir):
    crashed = make_model_dir(registry.root / ".tmp-crashed", FAKE_MODEL)
    (crashed / "manifest.json").write_text("{}")
    assert registry.versions() == []
    assert registry.publish(model_dir, parent_version=None, training_step=0, metrics={}).version == 1

    PolicyRegistry(registry.root)
    assert crashed.exists(), "a young temp dir may be a publish in progress: kept"

    two_hours_ago = time.time() - 7200
    for path in [crashed, *crashed.iterdir()]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    PolicyRegistry(registry.root)
    assert not crashed.exists()
    assert registry.versions() == [1]


# ---------------------------------------------------------------- live pointer


def test_live_pointer_round_trip_and_history(registry, model_dir):
    assert registry.live() is None
    assert registry.history() == []
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    registry.publish(model_dir, parent_version=1, training_step=10, metrics={})

    initial = registry.set_live(1, reason="base model", kind="initial")
    approved = registry.set_live(2, reason="gate passed 5/5 checks", kind="approved")
    rollback = registry.set_live(1, reason="thumbs-down SPRT: LLR 4.9 ≥ 4.55", kind="rollback")

    assert registry.live() == rollback
    assert (rollback.version, rollback.kind, rollback.previous_version) == (1, "rollback", 2)
    assert registry.history() == [initial, approved, rollback]
    assert [r.previous_version for r in registry.history()] == [None, 1, 2]
    assert approved.at.utcoffset().total_seconds() == 0


def test_set_live_refuses_an_unknown_version(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    with pytest.raises(ValueError, match=r"policy version 9 does not exist.*latest is 1"):
        registry.set_live(9, reason="typo", kind="approved")
    assert registry.live() is None
    assert registry.history() == []


def test_history_drops_a_torn_last_line_and_the_next_move_repairs_it(registry, model_dir):
    registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    first = registry.set_live(1, reason="base", kind="initial")
    with (registry.root / "history.jsonl").open("a") as history:
        history.write('{"version": 1, "ki')  # a crash cut this append short
    assert registry.history() == [first]
    second = registry.set_live(1, reason="again", kind="approved")
    assert registry.history() == [first, second]


# ---------------------------------------------------------------- verdicts


def test_verdicts_are_stored_beside_the_version(registry, model_dir):
    manifest = registry.publish(model_dir, parent_version=None, training_step=0, metrics={})
    assert registry.verdict(1) is None
    checks = [VerdictCheck(name="kl_to_reference", value=2.5, threshold=6.0, passed=True, detail="ok")]
    registry.record_verdict(1, approved=True, checks=checks)

    verdict = registry.verdict(1)
    assert verdict.version == 1
    assert verdict.approved is True
    assert verdict.checks == checks and verdict.judged_on_checks
    assert (registry.root / "v000001.verdict.json").is_file()
    assert registry.verify(1).digest == manifest.digest

    registry.record_verdict(1, approved=False, checks=[])
    assert registry.verdict(1).approved is False
    with pytest.raises(ValueError, match="policy version 2 does not exist"):
        registry.record_verdict(2, approved=True, checks=[])


# ---------------------------------------------------------------- compare-and-set moves of the live pointer


@pytest.fixture
def two_versions(registry, model_dir):
    """Versions 1 (seeded, live) and 2 (a candidate of 1)."""
    registry.seed(model_dir)
    registry.publish(model_dir, parent_version=1, training_step=1, metrics={})
    return registry


def test_move_live_refuses_when_live_is_not_the_expected_version(two_versions):
    registry = two_versions
    before = registry.history()
    with pytest.raises(
        LiveMoved, match=r"live policy is version 1 \(initial.*not version 2 as expected.*version 1 was not"
    ):
        registry.move_live(1, expected=2, reason="stale mover", kind="rollback")
    assert registry.history() == before and registry.live() == before[-1]

    moved = registry.move_live(2, expected=1, reason="judged against 1", kind="approved")
    assert (moved.version, moved.previous_version, moved.forced) == (2, 1, False)
    with pytest.raises(LiveMoved) as refused:
        registry.move_live(2, expected=1, reason="the same move again", kind="approved")
    assert refused.value.live == moved and (refused.value.expected, refused.value.wanted) == (1, 2)


def test_a_forced_move_records_that_it_overrode_the_live_version(two_versions):
    registry = two_versions
    registry.move_live(2, expected=1, reason="approved", kind="approved")
    record = registry.set_live(1, reason="operator rollback", kind="rollback")
    assert (record.version, record.previous_version, record.forced, record.kind) == (1, 2, True, "rollback")
    assert registry.history()[-1] == record
    assert (
        LiveRecord.model_validate_json(
            '{"version": 1, "kind": "initial", "reason": "", "at": "2024-01-01T00:00:00Z", "previous_version": null}'
        ).forced
        is False
    )  # history written before the field


def test_approve_writes_the_verdict_and_moves_live_only_if_live_is_what_was_judged_against(two_versions, model_dir):
    registry = two_versions
    registry.publish(model_dir, parent_version=1, training_step=2, metrics={})  # version 3
    registry.set_live(3, reason="operator", kind="rollback")
    with pytest.raises(LiveMoved):
        registry.approve(2, judged_against=1, checks=[], reason="approved by the gate")
    assert registry.verdict(2) is None, "a refused approval writes nothing"
    assert registry.live().version == 3

    record = registry.approve(2, judged_against=3, checks=[VerdictCheck(name="reward_score", passed=True)], reason="ok")
    assert (record.version, record.kind, record.previous_version) == (2, "approved", 3)
    verdict = registry.verdict(2)
    assert verdict.approved is True and verdict.judged_against == 3 and verdict.withheld is None


def _move_from_1(root: str, version: int, start: "multiprocessing.synchronize.Barrier", results) -> None:
    registry = PolicyRegistry(Path(root))
    start.wait()
    try:
        registry.move_live(version, expected=1, reason=f"mover of {version}", kind="approved")
        results.put(version)
    except LiveMoved:
        results.put(None)


def test_compare_and_set_holds_across_processes(two_versions, model_dir):
    registry = two_versions
    for step in range(2, 6):
        registry.publish(model_dir, parent_version=1, training_step=step, metrics={})  # versions 3..6
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(5), context.Queue()
    movers = [context.Process(target=_move_from_1, args=(str(registry.root), v, start, results)) for v in range(2, 7)]
    for mover in movers:
        mover.start()
    for mover in movers:
        mover.join(30)
    outcomes = [results.get(timeout=5) for _ in movers]
    winners = [version for version in outcomes if version is not None]
    assert len(winners) == 1, outcomes
    assert [(r.version, r.previous_version) for r in registry.history()] == [(1, None), (winners[0], 1)]


# ---------------------------------------------------------------- claims


def _hold_claim(root: str, version: int, holding, release) -> None:
    with PolicyRegistry(Path(root)).claim(version) as claimed:
        assert claimed
        holding.set()
        release.wait(30)


def test_a_claim_is_held_by_one_process_and_freed_when_its_holder_dies(two_versions):
    registry = two_versions
    context = multiprocessing.get_context("fork")
    holding, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_claim, args=(str(registry.root), 2, holding, release))
    holder.start()
    assert holding.wait(30)
    with registry.claim(2) as claimed:
        assert not claimed
    holder.kill()  # a crashed gate: the kernel drops its flock
    holder.join(30)
    with registry.claim(2) as claimed:
        assert claimed
        registry.record_verdict(2, False, [])
    assert not (registry.root / "v000002.claim").exists(), "a judged version's claim file is removed"


# ---------------------------------------------------------------- retention


def standing(version: int, parent: int | None, approved: bool | None) -> VersionStanding:
    return VersionStanding(version, parent, approved)


def live_record(version: int, previous: int | None, at: datetime, kind: str = "approved") -> LiveRecord:
    return LiveRecord(version=version, kind=kind, reason="", at=at, previous_version=previous)


def test_versions_to_keep_by_hand():
    # 1 seeded; 2..9 candidates of whatever was live: approved 2, 5, 8; 9 waits; the rest rejected.
    parents = {1: None, 2: 1, 3: 2, 4: 2, 5: 2, 6: 5, 7: 5, 8: 5, 9: 8}
    approved = {1: True, 2: True, 3: False, 4: False, 5: True, 6: False, 7: False, 8: True, 9: None}
    standings = [standing(v, parents[v], approved[v]) for v in parents]
    now = datetime(2024, 1, 2, tzinfo=UTC)
    long_ago = now - timedelta(days=30)
    history = [live_record(1, None, long_ago, "initial"), live_record(2, 1, long_ago), live_record(5, 2, long_ago),
               live_record(8, 5, now - timedelta(minutes=5))]  # fmt: skip
    retention = RegistryRetention(keep_approved=1, keep_rejected=1, recently_live_seconds=3600)
    # live 8 and the version before it, 5 (also within the hour: 8 replaced it 5 minutes ago);
    # waiting 9; newest approved 8; newest rejected 7; parents: 8→5, 9→8, 7→5, 5→2; root 1.
    assert versions_to_keep(standings, history[-1], history, retention, now) == {1, 2, 5, 7, 8, 9}
    # pinned 3 keeps it and its parent 2
    assert versions_to_keep(standings, history[-1], history, retention, now, pinned={3}) == {1, 2, 3, 5, 7, 8, 9}
    # an operator rolled back to 2 an hour ago and 8 is live again since: 2 and the 2→… move stay in the window
    history += [
        live_record(2, 8, now - timedelta(minutes=50), "rollback"),
        live_record(8, 2, now - timedelta(minutes=40)),
    ]
    wider = RegistryRetention(keep_approved=1, keep_rejected=0, recently_live_seconds=3600)
    assert versions_to_keep(standings, history[-1], history, wider, now) == {1, 2, 5, 8, 9}


def test_a_removed_version_keeps_its_manifest_and_verdict_and_says_why_it_cannot_load(registry, model_dir):
    registry.seed(model_dir)
    for step in (1, 2):
        registry.publish(model_dir, parent_version=1, training_step=step, metrics={})
    registry.record_verdict(2, False, [VerdictCheck(name="kl_to_reference")], judged_against=1)
    registry.record_verdict(3, False, [], judged_against=1)
    report = registry.retain(RegistryRetention(keep_rejected=0, recently_live_seconds=0))
    assert report.removed == [2, 3] and report.kept == [1]
    assert registry.versions() == [1, 2, 3] and registry.versions_with_weights() == [1]
    assert registry.manifest(2).parent_version == 1 and registry.verdict(2).checks[0].name == "kl_to_reference"
    for refused in (
        lambda: registry.path(3),
        lambda: registry.verify(3),
        lambda: registry.set_live(3, reason="", kind="rollback"),
    ):
        with pytest.raises(
            PolicyRemoved,
            match=r"policy version 3: its weights were removed by the registry's retention.*versions with weights: \[1\]",
        ):
            refused()
    assert not list(registry.root.glob(".tmp-*")), "the renamed-away directories are deleted"
    assert registry.publish(model_dir, parent_version=1, training_step=3, metrics={}).version == 4, (
        "numbers are never reused"
    )


def test_a_version_removed_while_it_is_verified_is_reported_removed_not_corrupt(registry, model_dir, monkeypatch):
    registry.seed(model_dir)
    registry.publish(model_dir, parent_version=1, training_step=1, metrics={})
    registry.record_verdict(2, False, [])
    real_sha256 = registry_module.file_sha256

    def removed_midway(path: Path) -> str:  # a server hashing version 2 while the gate's retention removes it
        if path.parent.name == "v000002":
            registry.retain(RegistryRetention(keep_rejected=0, recently_live_seconds=0))
        return real_sha256(path)

    monkeypatch.setattr(registry_module, "file_sha256", removed_midway)
    with pytest.raises(PolicyRemoved, match="policy version 2: its weights were removed"):
        registry.verify(2)
