"""Learning benchmark: does the whole loop make a fresh demo model better from thumbs alone, safely?

It builds a fresh demo model, starts `flywheel up` on it (broker, server, trainer, gate), and
runs `flywheel simulate` for a fixed budget of feedback events, paced over a fixed time. It
reports the thumbs-up rate on the evaluation questions (never asked by the simulated users,
greedy answers) at the start and at the end, the events and wall time used, the gate's
decisions and the KL the trainer spent, as a markdown table, and keeps the learning curve.

    .venv/bin/python -m benchmarks.learning --events 3000 --minutes 20 --out runs/learning

Target: +30 points of thumbs-up rate within 3,000 feedback events and 20 minutes on 2 cores.
"""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT
from feedback.broker import free_port
from flywheel.demo.init_model import DEMO_SETTINGS, MARKER_FILE, InitModelReport, init_model
from flywheel.registry import MODEL_SETTINGS_FILE, PolicyRegistry

SERVER_START_TIMEOUT_S = 600


def start_up(state_dir: Path, model_dir: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """`flywheel up` on free ports; returns the process and its addresses."""
    ports = {
        name: free_port("127.0.0.1") for name in ("grpc", "server_metrics", "trainer_metrics", "gate_metrics", "kafka")
    }
    addresses = {
        "grpc": f"127.0.0.1:{ports['grpc']}",
        "kafka": f"127.0.0.1:{ports['kafka']}",
        "trainer_metrics": f"http://127.0.0.1:{ports['trainer_metrics']}/metrics",
    }
    env = {
        **os.environ,
        "FLYWHEEL_TRAINER__METRICS_PORT": str(ports["trainer_metrics"]),
        "FLYWHEEL_GATE__METRICS_PORT": str(ports["gate_metrics"]),
    }
    command = [
        sys.executable, "-m", "cli", "up", "--model", str(model_dir), "--state-dir", str(state_dir),
        "--port", str(ports["grpc"]), "--metrics-port", str(ports["server_metrics"]), "--kafka", addresses["kafka"],
    ]  # fmt: skip
    output = (state_dir / "up.out").open("wb")
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env), addresses


def wait_until_serving(state_dir: Path, up: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    log = state_dir / "logs" / "serve.log"
    while not (log.exists() and '"message": "serving"' in log.read_text(errors="replace")):
        if up.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"flywheel up did not start serving; see {state_dir}/up.out and {state_dir}/logs")
        time.sleep(1)


def gate_decisions(registry: PolicyRegistry) -> dict[str, int]:
    decisions = {"approved": 0, "rejected": 0, "undecided": 0}
    for version in registry.versions():
        if registry.manifest(version).parent_version is None:
            continue
        verdict = registry.verdict(version)
        decisions["undecided" if verdict is None else "approved" if verdict["approved"] else "rejected"] += 1
    return decisions


def last_kl(train_log: Path) -> float | None:
    """KL to the reference of the trainer's last PPO step, from its log."""
    found = re.findall(r'"kl_to_reference": (-?[\d.e-]+)', train_log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000, help="feedback events the simulated users send")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall time the events are spread over")
    parser.add_argument("--eval-every", type=int, default=250, help="measure the thumbs-up rate every N events")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "learning")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh demo model and of the users")
    parser.add_argument(
        "--fresh-model", type=Path, default=None,
        help="a demo model built by `flywheel init-model` and never trained by the loop, to skip building one",
    )  # fmt: skip
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    started = time.monotonic()
    if args.fresh_model is None:
        model_report = init_model(args.out / "demo-model", seed=args.seed)
    else:
        shutil.copytree(args.fresh_model, args.out / "demo-model")
        (args.out / "demo-model" / MODEL_SETTINGS_FILE).write_text(DEMO_SETTINGS)  # this checkout's settings
        model_report = InitModelReport.model_validate_json((args.out / "demo-model" / MARKER_FILE).read_text())
    init_seconds = model_report.seconds if args.fresh_model else time.monotonic() - started

    up, addresses = start_up(args.out, args.out / "demo-model")
    try:
        wait_until_serving(args.out, up)
        loop_started = time.monotonic()
        subprocess.run(
            [
                sys.executable, "-m", "cli", "simulate", "--target", addresses["grpc"],
                "--events", str(args.events), "--rate", str(args.events / (args.minutes * 60)),
                "--eval-every", str(args.eval_every), "--out", str(args.out / "curve"), "--seed", str(args.seed),
                "--trainer-metrics-url", addresses["trainer_metrics"],
            ],
            check=True,
        )  # fmt: skip
        loop_seconds = time.monotonic() - loop_started
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=300)

    with (args.out / "curve" / "learning_curve.csv").open() as rows:
        curve = list(csv.DictReader(rows))
    start, end = float(curve[0]["heldout_thumbs_up_rate"]), float(curve[-1]["heldout_thumbs_up_rate"])
    best = max(float(row["heldout_thumbs_up_rate"]) for row in curve)
    registry = PolicyRegistry(args.out / "registry")
    decisions = gate_decisions(registry)
    rollbacks = sum(record.kind == "rollback" for record in registry.history())
    kl = last_kl(args.out / "logs" / "train.log")
    result = {
        "demo model": f"{model_report.parameters:,} parameters, built in {init_seconds:.0f} s "
        f"({model_report.steps} steps; accuracy {model_report.evaluation_accuracy:.0%}, concise {model_report.concise_share:.0%})",
        "thumbs-up rate, start → end": f"{start:.1%} → {end:.1%} ({(end - start) * 100:+.1f} points; best {best:.1%})",
        "feedback events": curve[-1]["feedback_events"],
        "wall time of the loop": f"{loop_seconds / 60:.1f} min",
        "live policy at the end": f"v{curve[-1]['policy_version']}",
        "gate decisions": ", ".join(f"{count} {name}" for name, count in decisions.items()),
        "rollbacks": str(rollbacks),
        "KL to the reference at the last PPO step": "n/a" if kl is None else f"{kl:.3f} nats per answer",
    }
    report = "| measure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in result.items())
    (args.out / "report.md").write_text(report + "\n")
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    print(
        f"\ncurve: {args.out / 'curve' / 'learning_curve.png'}; model report: {args.out / 'demo-model' / MARKER_FILE}"
    )


if __name__ == "__main__":
    main()
