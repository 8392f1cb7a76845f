"""HTTP door benchmark: Flywheel's OpenAI-compatible /v1/chat/completions against vLLM's own OpenAI server and
Flywheel's gRPC `Generate`, the same chat workload on the same model with the same engine arguments:

  grpc   `flywheel serve --http-port ...` in a subprocess, `Generate` with chat messages over a grpc.aio channel;
  http   the same process's HTTP door, POST /v1/chat/completions over aiohttp;
  vllm   vLLM's OpenAI server in a subprocess, POST /v1/chat/completions over aiohttp.

Every request is one user message, rendered with the model's chat template and tokenized by each server for
every request, greedy, min_tokens == max_tokens so every answer has the same length, returned whole. vLLM is
asked for the sampled token's log-prob (`logprobs`, `top_logprobs: 0`), as Flywheel's engine computes it for
every token. The measurement loop (closed-loop workers, rounds rotating the systems, each measurement once every
engine is idle) is benchmarks/serving.py's.

    .venv/bin/python -m benchmarks.http_door [--concurrency 1 8 32] [--rounds 6] [--max-tokens 32]

Prints a table, writes the raw numbers to benchmarks/results/http_door.json and the `## The OpenAI-compatible
HTTP door` section of BENCHMARKS.md.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import uvloop
from grpc import aio

from benchmarks.common import REPO_ROOT, invocation
from benchmarks.serving.__main__ import default_model
from benchmarks.serving.report import machine_facts, markdown_table, model_facts, rich_table
from benchmarks.serving.stats import LevelSummary, paired_ratios
from benchmarks.serving.systems import (
    flywheel_serve,
    grpc_serving,
    http_ok,
    openai_server_command,
    server_process,
    wait_until,
)
from benchmarks.serving.workload import (
    PROMPT,
    Run,
    Served,
    Workload,
    console,
    measure,
    run_level,
    subprocess_system,
)
from feedback.broker import free_port
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from server.config import EngineSettings
from server.openai_api import MODEL_ID

SYSTEMS = ("grpc", "http", "vllm")
SYSTEM_TITLES = {
    "grpc": "(a) Flywheel gRPC Generate",
    "http": "(b) Flywheel HTTP /v1/chat/completions",
    "vllm": "(c) vLLM OpenAI /v1/chat/completions",
}
RESULTS_JSON = REPO_ROOT / "benchmarks" / "results" / "http_door.json"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
SECTION_HEADING = "## The OpenAI-compatible HTTP door"
MESSAGES = [{"role": "user", "content": PROMPT}]
PROMPT_TOKENS: dict[str, set[int]] = {system: set() for system in SYSTEMS}
"""Prompt tokens each system reported: the same chat rendered alike is one number for all three."""


@contextlib.asynccontextmanager
async def flywheel_doors(
    model: str, settings: EngineSettings, workload: Workload, log_dir: Path
) -> AsyncIterator[dict[str, Served]]:
    """(a) and (b): one `flywheel serve` process with both doors open."""
    port, http_port, metrics_port = (free_port("127.0.0.1") for _ in range(3))
    command, env = flywheel_serve(model, settings, workload, log_dir, port, metrics_port)
    env["FLYWHEEL_SERVER__HTTP_PORT"] = str(http_port)
    with server_process("flywheel", command, env, log_dir) as server:
        connector = aiohttp.TCPConnector(limit=max(workload.concurrency_levels))
        async with (
            aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}", connector=connector) as session,
        ):
            await wait_until(server, lambda: grpc_serving(channel), "gRPC health SERVING")
            stub = serving_pb2_grpc.FlywheelStub(channel)
            request = serving_pb2.GenerateRequest(
                chat=serving_pb2.ChatMessages(messages=[serving_pb2.ChatMessage(**message) for message in MESSAGES]),
                sampling=serving_pb2.SamplingParams(
                    max_tokens=workload.max_tokens, min_tokens=workload.max_tokens, temperature=0.0
                ),
            )

            async def send_grpc() -> int:
                answer = await stub.Generate(request)
                PROMPT_TOKENS["grpc"].add(answer.prompt_tokens)
                return answer.completion_tokens

            body = chat_body(MODEL_ID, workload)
            yield {
                "grpc": subprocess_system(send_grpc, server.process.pid),
                "http": subprocess_system(lambda: post_chat(session, body, "http"), server.process.pid),
            }


@contextlib.asynccontextmanager
async def vllm_openai(model: str, settings: EngineSettings, workload: Workload, log_dir: Path) -> AsyncIterator[Served]:
    """(c) vLLM's OpenAI server with PolicyEngine's engine arguments."""
    port = free_port("127.0.0.1")
    with server_process("vllm", openai_server_command(model, settings, port), dict(os.environ), log_dir) as server:
        connector = aiohttp.TCPConnector(limit=max(workload.concurrency_levels))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as session:
            await wait_until(server, lambda: http_ok(session, "/health"), "HTTP /health 200")
            body = {**chat_body(model, workload), "logprobs": True, "top_logprobs": 0}
            yield subprocess_system(lambda: post_chat(session, body, "vllm"), server.process.pid)


def chat_body(model: str, workload: Workload) -> dict:
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": workload.max_tokens,
        "min_tokens": workload.max_tokens,
        "temperature": 0.0,
    }


async def post_chat(session: aiohttp.ClientSession, body: dict, system: str) -> int:
    async with session.post("/v1/chat/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{system}: HTTP {reply.status}: {await reply.text()}")
        usage = (await reply.json())["usage"]
    PROMPT_TOKENS[system].add(usage["prompt_tokens"])
    return usage["completion_tokens"]


async def run_all(model: str, settings: EngineSettings, workload: Workload, log_dir: Path) -> list[Run]:
    async with contextlib.AsyncExitStack() as running:
        console.rule("starting Flywheel (both doors) and vLLM's OpenAI server")
        served = await running.enter_async_context(flywheel_doors(model, settings, workload, log_dir))
        served["vllm"] = await running.enter_async_context(vllm_openai(model, settings, workload, log_dir))
        for system in SYSTEMS:
            await run_level(
                system, served[system], max(workload.concurrency_levels), workload.warmup_requests, workload.max_tokens
            )
        console.rule("measuring")
        return await measure({system: served[system] for system in SYSTEMS}, workload)


def summarize(runs: list[Run]) -> list[LevelSummary]:
    keys = sorted({(run.system, run.concurrency) for run in runs}, key=lambda key: (SYSTEMS.index(key[0]), key[1]))
    return [LevelSummary.of([run for run in runs if (run.system, run.concurrency) == key]) for key in keys]


def ratios(runs: list[Run], summaries: list[LevelSummary]) -> list[dict]:
    """Per concurrency: the HTTP door's throughput over vLLM's server's and over gRPC's (round by round, median and
    range), and its p99 latency over theirs."""
    p99 = {(summary.system, summary.concurrency): summary.p99_seconds for summary in summaries}
    rows = []
    for concurrency in sorted({run.concurrency for run in runs}):
        row: dict = {"concurrency": concurrency}
        for other in ("vllm", "grpc"):
            paired = paired_ratios(runs, "http", other, concurrency)
            row[f"http_over_{other}_throughput"] = float(np.median(paired))
            row[f"http_over_{other}_throughput_range"] = [min(paired), max(paired)]
            row[f"http_over_{other}_p99"] = p99["http", concurrency] / p99[other, concurrency]
        rows.append(row)
    return rows


RESULT_COLUMNS = (
    "system", "concurrency", "requests", "tokens/s (median)", "tokens/s (min–max)", "p50 ms", "p99 ms",
    "client+front-end CPU ms/answer",
)  # fmt: skip
RATIO_COLUMNS = (
    "concurrency", "b/c tokens/s (median)", "b/c (min–max)", "b/c p99", "b/a tokens/s (median)", "b/a (min–max)",
    "b/a p99",
)  # fmt: skip


def result_cells(summary: LevelSummary) -> list[str]:
    return [
        SYSTEM_TITLES[summary.system],
        str(summary.concurrency),
        str(summary.requests),
        f"{summary.tokens_per_second:.0f}",
        f"{summary.tokens_per_second_min:.0f}–{summary.tokens_per_second_max:.0f}",
        f"{summary.p50_seconds * 1000:.1f}",
        f"{summary.p99_seconds * 1000:.1f}",
        f"{summary.front_cpu_ms_per_request:.2f}",
    ]


def ratio_cells(row: dict) -> list[str]:
    cells = [str(row["concurrency"])]
    for other in ("vllm", "grpc"):
        low, high = row[f"http_over_{other}_throughput_range"]
        cells += [
            f"{row[f'http_over_{other}_throughput']:.2f}",
            f"{low:.2f}–{high:.2f}",
            f"{row[f'http_over_{other}_p99']:.2f}",
        ]
    return cells


def markdown_section(report: dict, summaries: list[LevelSummary], ratio_rows: list[dict]) -> str:
    machine, workload = report["machine"], report["workload"]
    load_before, load_after = report["load_average_1m"]["before"], report["load_average_1m"]["after"]
    lines = [
        SECTION_HEADING,
        "",
        "Completion tokens per second and client-side latency of (b) Flywheel's OpenAI-compatible door "
        "(`server.http_port`) against (c) vLLM's own OpenAI server and (a) Flywheel's gRPC `Generate` in the same "
        "process as (b): the same chat request (one user message, rendered with the chat template by each server), "
        f"greedy, max_tokens = min_tokens = {workload['max_tokens']}, answers returned whole, on the demo model with "
        "benchmarks/serving.py's engine arguments and measurement loop (closed-loop workers; "
        f"{workload['rounds']} rounds rotating the systems; max({workload['min_requests']}, "
        f"{workload['requests_per_worker']} × concurrency) requests per measurement; ratios taken round by round, "
        "median and range given).",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPU cores ({machine['cpu_model']}), no GPU, shared with other work "
        f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after); vLLM {machine['vllm']}, "
        f"aiohttp {machine['aiohttp']}, grpcio {machine['grpcio']}.",
        "- Prompt tokens each system reported: "
        + ", ".join(f"{system} {report['prompt_tokens'][system]}" for system in SYSTEMS)
        + ".",
        "",
        *markdown_table(RESULT_COLUMNS, [result_cells(summary) for summary in summaries]),
        "",
        *markdown_table(RATIO_COLUMNS, [ratio_cells(row) for row in ratio_rows]),
        "",
        reading(summaries, ratio_rows),
        "",
        f"Raw numbers, every round and every request's latency: `{RESULTS_JSON.relative_to(REPO_ROOT)}`.",
        "",
    ]
    return "\n".join(lines)


def reading(summaries: list[LevelSummary], ratio_rows: list[dict]) -> str:
    """The ratios in words, with whether the round-by-round ranges tell the systems apart at all."""
    throughput = [row["http_over_vllm_throughput"] for row in ratio_rows]
    p99 = [row["http_over_vllm_p99"] for row in ratio_rows]
    over_grpc = [row["http_over_grpc_throughput"] for row in ratio_rows]
    spans_one = all(
        low <= 1.0 <= high
        for row in ratio_rows
        for low, high in (row["http_over_vllm_throughput_range"], row["http_over_grpc_throughput_range"])
    )
    cpu = {(summary.system, summary.concurrency): summary.front_cpu_ms_per_request for summary in summaries}
    cheaper = [
        row["concurrency"] for row in ratio_rows if cpu["http", row["concurrency"]] < cpu["vllm", row["concurrency"]]
    ]
    return (
        f"Reading: the HTTP door delivers {min(throughput):.2f}–{max(throughput):.2f}× vLLM's OpenAI server's "
        f"throughput (medians over rounds) with a p99 {min(p99):.2f}–{max(p99):.2f}× its p99, and "
        f"{min(over_grpc):.2f}–{max(over_grpc):.2f}× Flywheel's own gRPC throughput. "
        + (
            "Every round-by-round range spans 1.0: on this machine the three are not told apart; the engine's "
            "step time dominates and the door's JSON and OpenAI shapes cost less than the noise. "
            if spans_one
            else ""
        )
        + "Client+front-end CPU per answer (the benchmark process and the server's main process; for (a) and (b) "
        "the same `flywheel serve`, whose measurements never overlap) is lower through the door than through "
        f"vLLM's server at concurrency {', '.join(map(str, cheaper)) or 'none'}."
    )


def write_markdown_section(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (or append it), keeping every other section."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION_HEADING), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + after if after else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_door", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length; min_tokens is the same")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--requests-per-worker", type=int, default=8)
    parser.add_argument("--warmup-requests", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results and BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = str(Path(args.model or default_model()).resolve())
    settings = EngineSettings(
        model=model, dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20, enforce_eager=True, seed=0
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
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as log_dir:
        runs = uvloop.run(run_all(model, settings, workload, Path(log_dir)))
    load_after = os.getloadavg()[0]
    summaries = summarize(runs)
    ratio_rows = ratios(runs, summaries)
    console.print(rich_table("HTTP door", RESULT_COLUMNS, [result_cells(summary) for summary in summaries]))
    console.print(rich_table("(b) over (c) and (a)", RATIO_COLUMNS, [ratio_cells(row) for row in ratio_rows]))
    console.print(f"[dim]{time.monotonic() - started:.0f} s in all[/dim]")
    if args.no_write:
        return
    report = {
        "command": invocation("benchmarks.http_door", argv),
        "machine": machine_facts(),
        "load_average_1m": {"before": load_before, "after": load_after},
        "model": model_facts(model),
        "engine_settings": settings.model_dump(),
        "workload": dataclasses.asdict(workload),
        "prompt_tokens": {system: sorted(counts) for system, counts in PROMPT_TOKENS.items()},
        "summaries": [dataclasses.asdict(summary) for summary in summaries],
        "ratios": ratio_rows,
        "runs": [{**dataclasses.asdict(run), "tokens_per_second": run.tokens_per_second} for run in runs],
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown_section(markdown_section(report, summaries, ratio_rows))
    console.print(f"wrote {RESULTS_JSON.relative_to(REPO_ROOT)} and the {SECTION_HEADING!r} section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
