"""Session fixtures, and the fast tier.

A test that needs more than this interpreter says so with a marker (registered in pyproject.toml):
`engine` (a real vLLM engine), `broker` (the embedded Kafka broker), `subprocess` (it starts another
program: a Python interpreter, torchrun, promtool, grpcurl); and `slow` marks a learning test that
trains for seconds of CPU. Tests that use the `engine`/`engine_loop`
or `kafka_broker`/`kafka_settings` fixtures are marked here; a test that starts a program is marked
where it is written, and a module that imports vLLM at its top (`server.app`, `server.engine`) marks
all its tests with a module-level `pytestmark = pytest.mark.engine`. A child forked by `multiprocessing`
is no subprocess in this sense: it starts in a millisecond and imports nothing.

`pytest --fast` (`make test-fast`) runs the tests with none of these markers, without importing vLLM.
One mechanism does it, the markers: a module whose `pytestmark` names one is not imported at all
(`pytest_ignore_collect` reads the assignment from the module's source, so its imports never run),
and the remaining tests that carry one are deselected after collection. vLLM itself is imported only
when the `engine` fixture starts one. tests/test_fast_tier.py checks all of this.
"""

import ast
import functools
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.engine_fixtures import EngineLoop, start_engine, test_model_path

pytest_plugins = ["tests.kafka_fixtures"]  # kafka_broker and kafka_settings, for every module
FULL_SUITE_ONLY = ("engine", "broker", "subprocess", "slow")
FIXTURE_MARKERS = {"engine": "engine", "engine_loop": "engine", "kafka_broker": "broker", "kafka_settings": "broker"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true",
        help=f"run only the tests marked none of {', '.join(FULL_SUITE_ONLY)}; vLLM is not imported",
    )  # fmt: skip


@functools.cache
def module_markers(path: Path) -> frozenset[str]:
    """The markers a test module's top-level `pytestmark` names, read without importing the module."""
    names = set()
    for statement in ast.parse(path.read_bytes(), filename=str(path)).body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        if (
            not any(isinstance(target, ast.Name) and target.id == "pytestmark" for target in targets)
            or not statement.value
        ):
            continue
        for node in ast.walk(statement.value):
            # pytest.mark.NAME, or pytest.mark.NAME(...) whose func is that attribute
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
                names.add(node.attr)
    return frozenset(names)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    is_test_module = collection_path.suffix == ".py" and collection_path.name.startswith("test_")
    if config.getoption("fast") and is_test_module and module_markers(collection_path) & set(FULL_SUITE_ONLY):
        return True
    return None  # not False: that would collect even what pytest itself ignores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in sorted({FIXTURE_MARKERS[name] for name in item.fixturenames if name in FIXTURE_MARKERS}):
            item.add_marker(marker)
    if config.getoption("fast"):
        kept, deselected = [], []
        for item in items:
            (deselected if any(item.get_closest_marker(name) for name in FULL_SUITE_ONLY) else kept).append(item)
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept


@pytest.fixture(scope="session")
def model_path():
    return test_model_path()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    """The demo model's tokenizer."""
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def engine_loop():
    loop = EngineLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def engine(engine_loop, model_path):
    policy_engine = start_engine(engine_loop, model_path)
    yield policy_engine
    policy_engine.shutdown()
