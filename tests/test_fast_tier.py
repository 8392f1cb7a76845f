"""The fast tier (`pytest --fast`, `make test-fast`) is collected without importing vLLM (tests/conftest.py).

Collecting it runs in a fresh interpreter because this session may be the whole suite, which has imported
vLLM by now; so that check is itself a `subprocess` test, in the full suite only.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from cli.config import REPO_ROOT
from tests.conftest import module_markers

# Collect the fast tier; if vLLM gets imported, print the repository's frames that imported it.
COLLECT = """
import sys, traceback
import pytest

class FirstVllmImport:
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" and FirstVllmImport.stack is None:
            FirstVllmImport.stack = [
                f"{frame.filename}:{frame.lineno}: {frame.line}" for frame in traceback.extract_stack()
                if frame.filename.startswith(sys.argv[1]) and "/.venv/" not in frame.filename
            ]

sys.meta_path.insert(0, FirstVllmImport())
exit_code = pytest.main(["--fast", "--collect-only", "-q", "-p", "no:cacheprovider"])
print("vllm imported by:", *(FirstVllmImport.stack or ["nothing"]), sep="\\n")
sys.exit(exit_code)
"""


@pytest.mark.subprocess
def test_collecting_the_fast_tier_imports_no_vllm():
    collected = subprocess.run(
        [sys.executable, "-c", COLLECT, str(REPO_ROOT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert collected.returncode == 0, collected.stdout[-4000:] + collected.stderr[-4000:]
    assert "vllm imported by:\nnothing" in collected.stdout, (
        "collecting the fast tier imported vLLM; give the module that does a module-level "
        f"`pytestmark = pytest.mark.engine`:\n{collected.stdout.rpartition('vllm imported by:')[2]}"
    )
    assert "tests/test_fast_tier.py::test_a_modules_markers_are_read_from_its_source_without_importing_it" in (
        collected.stdout
    )
    assert "test_collecting_the_fast_tier_imports_no_vllm" not in collected.stdout, "it starts an interpreter"
    assert "test_learns_the_demo_users_thumbs" not in collected.stdout, "a slow test is left out"
    assert "tests/test_serving.py" not in collected.stdout, "a module marked engine is not even collected"


def test_a_modules_markers_are_read_from_its_source_without_importing_it(tmp_path: Path):
    written = {
        "one.py": "import no_such_module\npytestmark = pytest.mark.engine\n",
        "several.py": "pytestmark = [pytest.mark.broker, pytest.mark.timeout(900)]\n",
        "annotated.py": "pytestmark: list = [pytest.mark.subprocess]\n",
        "none.py": "def test_nothing():\n    mark = pytest.mark.engine\n",
    }
    for name, source in written.items():
        (tmp_path / name).write_text(source)
    assert {name: module_markers(tmp_path / name) for name in written} == {
        "one.py": {"engine"}, "several.py": {"broker", "timeout"}, "annotated.py": {"subprocess"}, "none.py": set(),
    }  # fmt: skip
