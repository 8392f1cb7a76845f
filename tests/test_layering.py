"""Each folder is one floor, and imports only run down (STYLE.md): read from every module's source with `ast`.

From the bottom up:

    0  ground    flywheel: the generated stubs (flywheel.v1), registry, prompts, logs, demo task
    1  feedback  events in and out of Kafka
    2  server | trainer   side by side: neither may import the other
    3  gate      judges the trainer's candidates; borrows its reward model and sampling
    4  top       cli: the command line, its configuration, the supervisor, the simulated users

A module may import from its own room or any floor below. Nothing is imported here, so the test
needs no engine, broker or torch, and an import hidden in a function or under TYPE_CHECKING counts
as much as one at the top: it is the same dependency.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flywheel", "feedback", "server", "trainer", "gate", "cli")


@dataclass(frozen=True)
class Room:
    """Where a module lives: its floor, and on a floor shared side by side, its room."""

    floor: int
    name: str


GROUND, FEEDBACK, SERVER, TRAINER, GATE, TOP = (
    Room(0, "ground"),
    Room(1, "feedback"),
    Room(2, "server"),
    Room(2, "trainer"),
    Room(3, "gate"),
    Room(4, "top"),
)
ROOM_OF_PACKAGE = {
    "flywheel": GROUND,
    "feedback": FEEDBACK,
    "server": SERVER,
    "trainer": TRAINER,
    "gate": GATE,
    "cli": TOP,
}

ALLOWED_EXCEPTIONS: set[tuple[str, str]] = set()
"""(importing module, imported module) pairs that break a floor and wait for a design change, each
with its reason beside it. Empty: the two found when this test came in were small moves, made then
(flywheel.demo.init_model took MODEL_SETTINGS_FILE from cli.config, now in flywheel.registry;
trainer.loop's TrainerConfig.of read a FlywheelConfig, now cli.main.trainer_config_of). An entry
that no longer matches an import fails the test, so the list only shrinks."""


def room_of(module: str) -> Room | None:
    """The room of a first-party module; None for the standard library and third parties."""
    return ROOM_OF_PACKAGE.get(module.split(".")[0])


def may_import(importer: Room, imported: Room) -> bool:
    return imported.floor < importer.floor or imported == importer


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, relative ones resolved; `from a import b` names
    `a.b`, which `room_of` places by its first component."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return found


def floor_violations(root: Path) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import under `root`'s packages that runs up or sideways."""
    violations = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            importer = room_of(module)
            for line, imported in imported_modules(path.read_text(), module, path.name == "__init__.py"):
                target = room_of(imported)
                if importer is not None and target is not None and not may_import(importer, target):
                    violations.append((module, imported, line))
    return violations


def _matches(violation: tuple[str, str, int], exception: tuple[str, str]) -> bool:
    importer, imported, _ = violation
    return importer == exception[0] and (imported == exception[1] or imported.startswith(exception[1] + "."))


def test_imports_only_run_down() -> None:
    found = floor_violations(REPO_ROOT)
    unexcused = [v for v in found if not any(_matches(v, e) for e in ALLOWED_EXCEPTIONS)]
    assert not unexcused, "imports that run up a floor or across to a neighbour (server ↔ trainer):\n" + "\n".join(
        f"  {importer} (line {line}) imports {imported}: {room_of(importer).name} may not import {room_of(imported).name}"
        for importer, imported, line in unexcused
    )
    stale = [e for e in ALLOWED_EXCEPTIONS if not any(_matches(v, e) for v in found)]
    assert not stale, f"ALLOWED_EXCEPTIONS no longer needed, remove them: {stale}"


def test_every_module_has_a_floor() -> None:
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            assert room_of(module_name(path, REPO_ROOT)) is not None, path


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    # A miniature repository: each package with one module, and three imports that break a rule.
    sources = {
        "flywheel/__init__.py": "",
        "flywheel/registry.py": "from flywheel.v1 import events_pb2\nimport trainer.ppo\n",
        "cli/__init__.py": "",
        "cli/main.py": "from gate import service\nfrom server.app import main\n",
        "feedback/__init__.py": "",
        "feedback/intake.py": "from flywheel.registry import PolicyRegistry\nfrom . import spool\n",
        "server/__init__.py": "",
        "server/swap.py": "from feedback.consumer import EventConsumer\n",
        "trainer/__init__.py": "",
        "trainer/loop.py": "def run():\n    from server.swap import follow\n",
        "gate/__init__.py": "",
        "gate/service.py": "from trainer.ppo import sample\nfrom ..cli import main\n",
    }
    for relative, source in sources.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)

    assert floor_violations(tmp_path) == [
        ("flywheel.registry", "trainer.ppo", 2),
        ("trainer.loop", "server.swap.follow", 2),
        ("gate.service", "cli.main", 2),
    ]
