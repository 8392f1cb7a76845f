"""The report: the terminal tables, the `## Serving` section of BENCHMARKS.md and the machine and model facts it states."""

import json
import os
import platform
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from rich.table import Table

from benchmarks.common import REPO_ROOT
from benchmarks.serving.stats import ADDED_CPU_KEYS, RATIO_KEYS, LevelSummary
from benchmarks.serving.workload import SYSTEM_TITLES

RESULTS_JSON = REPO_ROOT / "benchmarks" / "results" / "serving.json"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
SECTION_HEADING = "## Serving"

RESULT_COLUMNS = (
    "system", "concurrency", "requests", "tokens/s (median)", "tokens/s (min–max)", "p50 ms", "p99 ms",
    "client+front-end CPU ms/token", "engine CPU ms/token",
)  # fmt: skip
RATIO_COLUMNS = (
    "concurrency", "b/a tokens/s (median)", "b/a (min–max)", "b/c tokens/s (median)", "b/c (min–max)", "b/c p99",
    "b − a client+front-end CPU ms/answer", "c − a client+front-end CPU ms/answer",
)  # fmt: skip


def result_cells(summary: LevelSummary, titles: dict[str, str] = SYSTEM_TITLES) -> list[str]:
    return [
        titles[summary.system],
        str(summary.concurrency),
        str(summary.requests),
        f"{summary.tokens_per_second:.0f}",
        f"{summary.tokens_per_second_min:.0f}–{summary.tokens_per_second_max:.0f}",
        f"{summary.p50_seconds * 1000:.1f}",
        f"{summary.p99_seconds * 1000:.1f}",
        f"{summary.front_cpu_ms_per_token:.2f}",
        f"{summary.engine_cpu_ms_per_token:.2f}",
    ]


def ratio_cells(row: dict) -> list[str]:
    cells = [str(row["concurrency"])]
    for key in RATIO_KEYS:
        cells.append(f"{row[key]:.2f}" if key in row else "–")
        if key.endswith("_throughput"):
            low, high = row.get(f"{key}_range", (None, None))
            cells.append(f"{low:.2f}–{high:.2f}" if low is not None else "–")
    cells.extend(f"{row[key]:.2f}" if key in row else "–" for key in ADDED_CPU_KEYS)
    return cells


def rich_table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    align = ["---" if column == "system" else "--:" for column in columns]
    return [f"| {' | '.join(columns)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(row)} |" for row in rows)]


def markdown_section(report: dict, summaries: list[LevelSummary], ratio_rows: list[dict]) -> str:
    machine, model, workload, settings = (
        report["machine"],
        report["model"],
        report["workload"],
        report["engine_settings"],
    )
    load_before, load_after = report["load_average_1m"]["before"], report["load_average_1m"]["after"]
    lines = [
        SECTION_HEADING,
        "",
        "Completion tokens per second and client-side request latency of three ways to serve the same model with the "
        "same vLLM engine arguments: (a) vLLM's `AsyncLLM` in-process through `PolicyEngine.stream(whole=True)`, as `Generate` uses it (the ceiling), "
        "(b) Flywheel's `Generate` over gRPC (`flywheel serve`), (c) vLLM's OpenAI server, `/v1/completions`.",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPU cores ({machine['cpu_model']}), {machine['memory_gib']:.0f} GiB RAM, "
        f"no GPU; Python {machine['python']}, vLLM {machine['vllm']}, torch {machine['torch']}, grpcio {machine['grpcio']}. "
        "Clients, front ends and engine processes share the cores (vLLM pins its model worker to one core). "
        f"1-minute load average {load_before:.1f} before the run and {load_after:.1f} after it.",
        f"- Model: `{model['path']}`, {model['architecture']}, {model['parameters'] / 1e6:.2f} M parameters "
        f"({model['layers']} layers, hidden size {model['hidden_size']}, vocabulary {model['vocab_size']}).",
        f"- Engine, all three: dtype {settings['dtype']}, max_model_len {settings['max_model_len']}, enforce_eager, "
        f"KV cache {settings['kv_cache_bytes'] >> 20} MiB, max_num_seqs {workload['max_num_seqs']}, "
        f"max_num_batched_tokens {workload['max_num_batched_tokens']}, logprobs_mode processed_logprobs, seed "
        f"{settings['seed']}; Flywheel max_in_flight {max(workload['concurrency_levels'])}.",
        f"- Workload: one {workload['prompt_tokens']}-token prompt, sent as text and tokenized for every request by "
        "every system (the ceiling with the server's renderer, vLLM's OpenAI server with its own), greedy, "
        f"max_tokens = min_tokens = {workload['max_tokens']} "
        "(every answer has that many tokens, each with its log-prob), answers returned whole. "
        f"Each system is started once and warmed up with {workload['warmup_requests']} requests; then "
        f"{workload['rounds']} rounds, each running every concurrency level against every system in turn "
        f"(order rotating), max({workload['min_requests']}, {workload['requests_per_worker']} × concurrency) "
        "requests per measurement in a closed loop, each measurement starting once every engine is idle. "
        "The servers run in the benchmark's session, so the kernel schedules their threads and the clients' "
        "as it schedules the in-process engine's; the benchmark and both servers run uvloop's event loop. "
        "tokens/s is the median over rounds (range beside it); "
        "b/a and b/c are taken within each round and their median over rounds is given (range beside it). "
        "Latency is measured by the client from send to whole answer, percentiles over all rounds' requests. "
        "CPU ms/token is user + system CPU time per completion token, over all rounds: client+front-end counts the "
        "benchmark process (clients; for (a) also vLLM's front end) plus the server's main process, engine counts "
        "vLLM's engine-core and model-worker processes. Unlike tokens/s it hardly moves when other work shares the machine.",
        "",
        *markdown_table(RESULT_COLUMNS, [result_cells(summary) for summary in summaries]),
        "",
        *markdown_table(RATIO_COLUMNS, [ratio_cells(row) for row in ratio_rows]),
        "",
        reading(ratio_rows),
        "",
        f"Raw numbers, every round and every request's latency: `{RESULTS_JSON.relative_to(REPO_ROOT)}`.",
        "",
    ]
    return "\n".join(lines)


def reading(ratio_rows: list[dict]) -> str:
    """The numbers against the targets (b/a >= 0.95 in throughput, b ahead of c), in words."""
    complete = [row for row in ratio_rows if all(key in row for key in RATIO_KEYS + ADDED_CPU_KEYS)]
    if not complete:
        return "Not every system ran, so there are no ratios to read."
    b_over_a = [row["flywheel_over_engine_throughput"] for row in complete]
    b_over_c = [row["flywheel_over_openai_throughput"] for row in complete]
    p99_over_c = [row["flywheel_over_openai_p99"] for row in complete]
    below = [row["concurrency"] for row in complete if row["flywheel_over_engine_throughput"] < 0.95]
    behind = [row["concurrency"] for row in complete if row["flywheel_over_openai_throughput"] < 1.0]
    verdict_a = (
        "the 0.95 target is met at every level"
        if not below
        else f"below the 0.95 target at concurrency {_levels(below)}"
    )
    verdict_c = "ahead at every level" if not behind else f"behind at concurrency {_levels(behind)}"
    cheaper = [row["concurrency"] for row in complete if row[ADDED_CPU_KEYS[0]] < row[ADDED_CPU_KEYS[1]]]
    added = ", ".join(
        f"{row[ADDED_CPU_KEYS[0]]:.2f} against {row[ADDED_CPU_KEYS[1]]:.2f} ms at concurrency {row['concurrency']}"
        for row in complete
    )
    return (
        f"Reading (medians of the round-by-round ratios): Flywheel delivers {min(b_over_a):.0%}–{max(b_over_a):.0%} of the "
        f"in-process engine's throughput ({verdict_a}) and {min(b_over_c):.2f}–{max(b_over_c):.2f}× the OpenAI server's "
        f"({verdict_c}), with a p99 latency {min(p99_over_c):.2f}–{max(p99_over_c):.2f}× the OpenAI server's. "
        f"Client and front-end CPU per answer beyond the ceiling's, Flywheel against the OpenAI server: {added} "
        f"(Flywheel spends less at concurrency {_levels(cheaper) if cheaper else 'none'})."
    )


def _levels(levels: list[int]) -> str:
    return ", ".join(str(c) for c in levels)


def write_markdown_section(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace this benchmark's `## Serving` section, keeping every other section of the file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION_HEADING), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + after if after else ""))


def machine_facts() -> dict:
    import torch
    import vllm

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu_count": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": memory_kib / (1 << 20),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "aiohttp": aiohttp.__version__,
    }


def model_facts(model: str) -> dict:
    from safetensors import safe_open

    config = json.loads((Path(model) / "config.json").read_text())
    parameters = 0
    for weights in sorted(Path(model).glob("*.safetensors")):
        with safe_open(weights, framework="numpy") as tensors:
            parameters += sum(int(np.prod(tensors.get_slice(name).get_shape())) for name in tensors.keys())  # noqa: SIM118 (safe_open: no __iter__)
    return {
        "path": model,
        "architecture": ",".join(config.get("architectures", [])),
        "parameters": parameters,
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
    }
