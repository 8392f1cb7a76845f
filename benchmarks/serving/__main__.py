"""`python -m benchmarks.serving`: start the systems, measure them, report (see benchmarks/serving/__init__.py)."""

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import uvloop

import benchmarks.serving
from benchmarks.common import REPO_ROOT, invocation
from benchmarks.serving.report import (
    BENCHMARKS_MD,
    RATIO_COLUMNS,
    RESULT_COLUMNS,
    RESULTS_JSON,
    SECTION_HEADING,
    machine_facts,
    markdown_section,
    model_facts,
    ratio_cells,
    result_cells,
    rich_table,
    write_markdown_section,
)
from benchmarks.serving.stats import ratios, summarize
from benchmarks.serving.systems import flywheel_grpc, in_process_engine, openai_http
from benchmarks.serving.workload import (
    PROMPT,
    SYSTEM_LABELS,
    SYSTEM_TITLES,
    SYSTEMS,
    Run,
    Served,
    Workload,
    console,
    measure,
    run_level,
)
from server.config import EngineSettings


def default_model() -> str:
    if importlib.util.find_spec("flywheel.demo.init_model") is None:
        raise SystemExit("there is no demo model builder (flywheel.demo.init_model) here; pass --model DIR")
    from flywheel.demo.init_model import ensure_demo_model

    return str(ensure_demo_model(REPO_ROOT / ".cache" / "demo-model"))


# --- main ----------------------------------------------------------------------------------------------------


async def run_all(
    model: str, settings: EngineSettings, workload: Workload, prompt_tokens: int, systems: list[str], log_dir: Path
) -> list[Run]:
    """`prompt_tokens`: how many tokens both servers must report for the prompt (the same text, rendered alike)."""
    starters = {
        "engine": lambda: in_process_engine(model, settings, workload),
        "flywheel": lambda: flywheel_grpc(model, settings, workload, prompt_tokens, log_dir),
        "openai": lambda: openai_http(model, settings, workload, prompt_tokens, log_dir),
    }
    async with contextlib.AsyncExitStack() as running:
        systems_served: dict[str, Served] = {}
        for system in systems:
            console.rule(SYSTEM_TITLES[system])
            started = time.monotonic()
            served = systems_served[system] = await running.enter_async_context(starters[system]())
            console.print(f"[dim]  started in {time.monotonic() - started:.1f} s; warming up[/dim]")
            await run_level(
                system, served, max(workload.concurrency_levels), workload.warmup_requests, workload.max_tokens
            )
        console.rule("measuring")
        return await measure(systems_served, workload)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=benchmarks.serving.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length; min_tokens is the same")
    parser.add_argument(
        "--rounds", type=int, default=12, help="measurements of every (concurrency, system), interleaved"
    )
    parser.add_argument("--min-requests", type=int, default=32, help="requests per measurement: at least this many")
    parser.add_argument(
        "--requests-per-worker", type=int, default=16, help="... and at least this many per concurrent worker"
    )
    parser.add_argument("--warmup-requests", type=int, default=32)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave serving.json and BENCHMARKS.md alone"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = str(Path(args.model or default_model()).resolve())
    settings = EngineSettings(
        model=model,
        dtype="float32",
        max_model_len=512,
        kv_cache_bytes=args.kv_cache_mib << 20,
        enforce_eager=True,
        seed=0,
    )
    from vllm.config import SchedulerConfig

    if max(args.concurrency) > SchedulerConfig.DEFAULT_MAX_NUM_SEQS:
        raise SystemExit(
            f"--concurrency above vLLM's max_num_seqs ({SchedulerConfig.DEFAULT_MAX_NUM_SEQS}) would measure queueing"
        )
    workload = Workload(
        prompt=PROMPT,
        max_tokens=args.max_tokens,
        concurrency_levels=tuple(args.concurrency),
        rounds=args.rounds,
        min_requests=args.min_requests,
        requests_per_worker=args.requests_per_worker,
        warmup_requests=args.warmup_requests,
    )
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(model).encode(workload.prompt))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as log_dir:
        # The in-process engine and the clients run on the event loop `flywheel serve` and vLLM's OpenAI server use.
        runs = uvloop.run(run_all(model, settings, workload, prompt_tokens, args.systems, Path(log_dir)))
    # Collect the shut-down AsyncLLM now: its __del__ fails if it first runs during interpreter teardown.
    gc.collect()
    load_after = os.getloadavg()[0]

    summaries = summarize(runs)
    ratio_rows = ratios(runs, summaries)
    result_rows = [result_cells(summary, SYSTEM_LABELS) for summary in summaries]
    console.print(
        rich_table("Serving: completion tokens/s, request latency, CPU per token", RESULT_COLUMNS, result_rows)
    )
    console.print(
        rich_table(
            "Flywheel (b) over the ceiling (a) and the OpenAI server (c)",
            RATIO_COLUMNS,
            [ratio_cells(r) for r in ratio_rows],
        )
    )
    if args.no_write:
        return

    report = {
        "command": invocation("benchmarks.serving", argv),
        "machine": machine_facts(),
        "load_average_1m": {"before": load_before, "after": load_after},
        "model": model_facts(model),
        "engine_settings": settings.model_dump(),
        "workload": {
            **dataclasses.asdict(workload),
            "prompt_tokens": prompt_tokens,
            "max_num_seqs": SchedulerConfig.DEFAULT_MAX_NUM_SEQS,
            "max_num_batched_tokens": SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS,
        },
        "summaries": [dataclasses.asdict(summary) for summary in summaries],
        "ratios": ratio_rows,
        "runs": [{**dataclasses.asdict(run), "tokens_per_second": run.tokens_per_second} for run in runs],
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown_section(markdown_section(report, summaries, ratio_rows))
    console.print(
        f"wrote {RESULTS_JSON.relative_to(REPO_ROOT)} and the {SECTION_HEADING!r} section of {BENCHMARKS_MD.name}"
    )


if __name__ == "__main__":
    main()
