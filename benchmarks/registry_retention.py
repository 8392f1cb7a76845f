"""Registry bytes before and after retention, for the learning benchmark's run replayed on real weights.

The learning benchmark's run left 85 versions: the seeded demo model, 3 approved candidates
(v2–v4), 80 rejected ones and 1 still waiting. This publishes that many copies of the demo
model's weights into a fresh registry with the same verdicts and live moves, then runs the
gate's retention pass with the default settings (gate.retention), and prints the bytes and the
versions with weights before and after.

    .venv/bin/python -m benchmarks.registry_retention --out /tmp/registry-retention
"""

import argparse
import shutil
import time
from pathlib import Path

from flywheel.registry import PolicyRegistry, RegistryRetention
from tests.engine_fixtures import test_model_path

APPROVED, REJECTED, WAITING = 3, 80, 1


def replay(registry: PolicyRegistry, model: Path) -> None:
    """Seed, approve the first APPROVED candidates, reject the next REJECTED, leave WAITING undecided."""
    registry.seed(model)
    for index in range(APPROVED + REJECTED + WAITING):
        live = registry.live().version
        version = registry.publish(model, parent_version=live, training_step=10 * (index + 1), metrics={}).version
        if index < APPROVED:
            registry.approve(version, judged_against=live, checks=[], reason="approved by the gate")
        elif index < APPROVED + REJECTED:
            registry.record_verdict(version, False, [], judged_against=live)


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/registry-retention"), help="scratch folder, emptied first"
    )
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    model = test_model_path()
    registry = PolicyRegistry(args.out / "registry")
    started = time.perf_counter()
    replay(registry, model)
    replay_seconds = time.perf_counter() - started

    rows = [("no retention (every version's weights)", registry.size_bytes(), registry.versions_with_weights(), None)]
    started = time.perf_counter()
    registry.retain(RegistryRetention())
    rows.append(
        ("retention, defaults", registry.size_bytes(), registry.versions_with_weights(), time.perf_counter() - started)
    )

    weights = sum(path.stat().st_size for path in model.iterdir() if path.is_file())
    print(
        f"demo model: {mib(weights)} a version; {len(registry.versions())} versions published in {replay_seconds:.1f} s"
    )
    print("| registry | bytes | versions with weights | pass |")
    print("|---|---|---|---|")
    for name, size, kept, seconds in rows:
        shown = f"{len(kept)}: {', '.join(f'v{v}' for v in kept)}" if len(kept) < 12 else f"{len(kept)}: v1–v{kept[-1]}"
        print(f"| {name} | {mib(size)} | {shown} | {'—' if seconds is None else f'{seconds * 1000:.0f} ms'} |")


if __name__ == "__main__":
    main()
