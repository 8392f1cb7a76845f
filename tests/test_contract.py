"""The committed Python stubs match the contract in proto/."""

import filecmp
import importlib.util
from pathlib import Path

from cli.config import REPO_ROOT


def test_generated_stubs_are_fresh(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("generate", REPO_ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted((tmp_path / "flywheel" / "v1").iterdir())
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        committed = REPO_ROOT / "flywheel" / "v1" / path.name
        assert committed.exists() and filecmp.cmp(path, committed, shallow=False), (
            f"{committed} is stale: run `python proto/generate.py`"
        )
