"""Learning benchmark: does the whole loop make a fresh demo model better from thumbs alone, safely?

It builds a fresh demo model, starts `flywheel up` on it (broker, server, trainer, gate) as `make up`
does (the demo model's own settings, the demo's operator config; FLYWHEEL_* variables over both), and
runs `flywheel simulate` for a fixed budget of feedback events, paced over a fixed time. It
reports the thumbs-up rate on the evaluation questions (never asked by the simulated users,
greedy answers) at the start and at the end, the events and wall time used, the gate's
decisions and the KL the trainer spent, as a markdown table, and keeps the learning curve.

    .venv/bin/python -m benchmarks.learning --events 3000 --minutes 20 --out runs/learning
    .venv/bin/python -m benchmarks.learning --seeds 0 1 2 --judge flywheel.demo.task:judge_careless \\
        --eval-judge flywheel.demo.task:judge_thumb

Each seed is a fresh model and its own run; the table gives every seed and the median (range).
The ceiling is the fresh model's accuracy on the evaluation questions: with users who want correct
answers, no policy learnt from thumbs alone answers more of them correctly than the model can.
Target: +30 points of thumbs-up rate within 3,000 feedback events and 20 minutes on 2 cores.
"""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, invocation, markdown_table
from feedback.broker import free_port
from flywheel.demo.init_model import (
    DEMO_OPERATOR_CONFIG,
    MARKER_FILE,
    RECIPE,
    InitModelReport,
    built_recipe,
    ensure_demo_model,
    init_model,
)
from flywheel.registry import PolicyRegistry

SERVER_START_TIMEOUT_S = 600
PLATEAU_TOLERANCE = 0.03


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
        sys.executable, "-m", "cli", "up", "--config", str(DEMO_OPERATOR_CONFIG), "--model", str(model_dir),
        "--state-dir", str(state_dir),
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
        decisions["undecided" if verdict is None else "approved" if verdict.approved else "rejected"] += 1
    return decisions


def last_kl(train_log: Path) -> float | None:
    """KL to the reference of the trainer's last PPO step, from its log."""
    found = re.findall(r'"kl_to_reference": (-?[\d.e-]+)', train_log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def plateau_index(rates: list[float], tolerance: float = PLATEAU_TOLERANCE) -> int:
    """The first measurement from which the curve never again rises more than `tolerance` above it:
    where learning stopped."""
    return next(i for i, rate in enumerate(rates) if max(rates[i:]) <= rate + tolerance)


def candidates_after(registry: PolicyRegistry, moment: float) -> int:
    """Candidates the trainer published at or after `moment` (a time.time() value)."""
    return sum(
        1
        for version in registry.versions()
        if registry.manifest(version).parent_version is not None
        and registry.manifest(version).created_at.timestamp() >= moment
    )


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One fresh model, one `flywheel up`, one simulation; the run's numbers."""
    out.mkdir(parents=True)
    started = time.monotonic()
    if args.fresh_model is None:
        model_report = init_model(out / "demo-model", seed=seed)
    else:
        shutil.copytree(args.fresh_model, out / "demo-model")
        ensure_demo_model(out / "demo-model")  # this checkout's settings
        model_report = InitModelReport.model_validate_json((out / "demo-model" / MARKER_FILE).read_text())
    init_seconds = model_report.seconds if args.fresh_model else time.monotonic() - started

    up, addresses = start_up(out, out / "demo-model")
    try:
        wait_until_serving(out, up)
        loop_started, loop_started_at = time.monotonic(), time.time()
        subprocess.run(
            [
                sys.executable, "-m", "cli", "simulate", "--target", addresses["grpc"], "--judge", args.judge,
                *(["--eval-judge", args.eval_judge] if args.eval_judge else []),
                "--events", str(args.events), "--rate", str(args.events / (args.minutes * 60)),
                "--eval-every", str(args.eval_every), "--out", str(out / "curve"), "--seed", str(seed),
                "--trainer-metrics-url", addresses["trainer_metrics"],
            ],
            check=True,
        )  # fmt: skip
        loop_seconds = time.monotonic() - loop_started
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=300)

    with (out / "curve" / "learning_curve.csv").open() as rows:
        curve = list(csv.DictReader(rows))
    rates = [float(row["heldout_thumbs_up_rate"]) for row in curve]
    plateau = plateau_index(rates)
    registry = PolicyRegistry(out / "registry")
    decisions = gate_decisions(registry)
    return {
        "seed": seed,
        "model_parameters": model_report.parameters,
        "init_seconds": init_seconds,
        "ceiling": model_report.evaluation_accuracy,
        "start": rates[0],
        "end": rates[-1],
        "best": max(rates),
        "feedback_events": int(curve[-1]["feedback_events"]),
        "loop_minutes": loop_seconds / 60,
        "live_at_end": int(curve[-1]["policy_version"]),
        "proposed": sum(decisions.values()),
        **decisions,
        "plateau_events": int(curve[plateau]["feedback_events"]),
        "proposed_after_plateau": candidates_after(registry, loop_started_at + float(curve[plateau]["seconds"])),
        "rollbacks": sum(record.kind == "rollback" for record in registry.history()),
        "kl_to_reference": last_kl(out / "logs" / "train.log"),
    }


def spread(values: list[float], percent: bool = True) -> str:
    """Median, and the range over seeds when there is more than one."""
    show = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:g}")
    middle = show(statistics.median(values))
    return middle if len(values) == 1 else f"{middle} ({show(min(values))}–{show(max(values))})"


def summary_table(runs: list[dict]) -> str:
    """One column per seed and one for the median (range), one row per measure."""
    rows = {
        "ceiling (model's accuracy)": ("ceiling", True),
        "thumbs-up rate, start": ("start", True),
        "thumbs-up rate, end": ("end", True),
        "thumbs-up rate, best": ("best", True),
        "end below ceiling, points": ("below_ceiling", False),
        "candidates proposed": ("proposed", False),
        "approved": ("approved", False),
        "rejected": ("rejected", False),
        "plateau at event": ("plateau_events", False),
        "proposed after the plateau": ("proposed_after_plateau", False),
        "rollbacks": ("rollbacks", False),
        "loop wall time, min": ("loop_minutes", False),
    }
    for run in runs:
        run["below_ceiling"] = round((run["ceiling"] - run["end"]) * 100, 1)
        run["loop_minutes"] = round(run["loop_minutes"], 1)
    header = ["measure", *(f"seed {run['seed']}" for run in runs), "median (range)"]
    table = []
    for name, (key, percent) in rows.items():
        values = [run[key] for run in runs]
        table.append([name, *(f"{v:.1%}" if percent else f"{v:g}" for v in values), spread(values, percent)])
    return "\n".join(markdown_table(header, table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000, help="feedback events the simulated users send")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall time the events are spread over")
    parser.add_argument("--eval-every", type=int, default=250, help="measure the thumbs-up rate every N events")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "learning")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the fresh demo models and of the users, one run each",
    )
    parser.add_argument("--judge", default="flywheel.demo.task:judge_thumb", help="the simulated users' votes")
    parser.add_argument(
        "--eval-judge", default=None, help="the taste the held-out rate is measured with (default: the judge)"
    )
    parser.add_argument(
        "--fresh-model", type=Path, default=None,
        help="a demo model built by `flywheel init-model` and never trained by the loop, to skip building one",
    )  # fmt: skip
    args = parser.parse_args()
    if args.fresh_model is not None and built_recipe(args.fresh_model) != RECIPE:
        parser.error(f"--fresh-model {args.fresh_model} is not a demo model of this checkout's recipe {RECIPE}")

    if args.out.exists():
        shutil.rmtree(args.out)
    runs = [run_seed(args, seed, args.out / f"seed-{seed}") for seed in args.seeds]
    table = summary_table(runs)
    heading = f"judge `{args.judge}`" + (f", measured with `{args.eval_judge}`" if args.eval_judge else "")
    report = f"{heading}; {args.events} events over {args.minutes:g} min per seed\n\n{table}\n\n`{invocation('benchmarks.learning', None)}`\n"
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(json.dumps(runs, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
