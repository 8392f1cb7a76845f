"""Tests of flywheel/registry.py on small fake model directories (bytes, no real model)."""

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from flywheel.registry import CorruptPolicy, PolicyRegistry, files_digest

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
    checks = [{"name": "kl_to_reference", "value": 2.5, "threshold": 6.0, "passed": True, "detail": "ok"}]
    registry.record_verdict(1, approved=True, checks=checks)

    verdict = registry.verdict(1)
    assert verdict["version"] == 1
    assert verdict["approved"] is True
    assert verdict["checks"] == checks
    assert (registry.root / "v000001.verdict.json").is_file()
    assert registry.verify(1).digest == manifest.digest

    registry.record_verdict(1, approved=False, checks=[])
    assert registry.verdict(1)["approved"] is False
    with pytest.raises(ValueError, match="policy version 2 does not exist"):
        registry.record_verdict(2, approved=True, checks=[])
