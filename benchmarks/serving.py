"""Serving benchmark: Flywheel's gRPC `Generate` against vLLM's in-process engine and vLLM's OpenAI server.

Three systems answer the same workload on the same model with the same engine arguments:

  engine   vLLM's AsyncLLM in this process, driven through `PolicyEngine.stream(whole=True)` as `Generate` drives it (the ceiling: no RPC at all);
  flywheel `flywheel serve` in a subprocess, driven with `Generate` over a grpc.aio channel;
  openai   vLLM's OpenAI HTTP server in a subprocess, driven with POST /v1/completions over aiohttp.

Every request is the same prompt text, tokenized by each system for every request as Flywheel's `Generate`
must (the ceiling renders it per request with the server's own renderer; vLLM's OpenAI server is sent the
text, not token ids), greedy, with min_tokens == max_tokens so every answer has the same length.
Each system is started once and warmed up. Then, for several rounds, every concurrency level runs a fixed
number of requests against each system in turn, in a closed loop (each of `concurrency` workers sends its
next request when its previous one is answered). Interleaving the systems round by round spreads whatever
else the machine is doing evenly over them. Each measurement waits until every engine is idle: vLLM's engine
processes poll for a second after their last step, and an idle engine costs nothing while another is measured.

    .venv/bin/python -m benchmarks.serving [--model DIR] [--concurrency 1 8 32] [--rounds 12] [--max-tokens 64]

Prints a table, writes the raw numbers to benchmarks/results/serving.json and the `## Serving` section of
BENCHMARKS.md.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import psutil
import uvloop
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from benchmarks.common import REPO_ROOT, invocation
from feedback.broker import free_port
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from server.config import EngineSettings, ServerSettings

SYSTEMS = ("engine", "flywheel", "openai")
SYSTEM_TITLES = {
    "engine": "(a) vLLM AsyncLLM in-process",
    "flywheel": "(b) Flywheel gRPC Generate",
    "openai": "(c) vLLM OpenAI /v1/completions",
}
SYSTEM_LABELS = {system: title.split(" ")[0] + " " + system for system, title in SYSTEM_TITLES.items()}
"""Short names for the terminal table: "(a) engine"."""
PROMPT = "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Kenya is"
RESULTS_JSON = REPO_ROOT / "benchmarks" / "results" / "serving.json"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
SECTION_HEADING = "## Serving"

console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class Workload:
    """What every system is asked to do."""

    prompt: str
    """Raw prompt text; the token ids sent to the OpenAI server are its tokenization."""
    max_tokens: int
    """Answer length in tokens; min_tokens is the same, so no answer stops early."""
    concurrency_levels: tuple[int, ...]
    """Requests in flight at once, one measurement each."""
    rounds: int
    """Times every (concurrency, system) pair is measured, interleaved."""
    min_requests: int
    """Each measurement runs max(min_requests, requests_per_worker * concurrency) requests."""
    requests_per_worker: int
    warmup_requests: int
    """Sent to each system at the highest concurrency after it starts, not counted."""

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)


@dataclass(frozen=True)
class Run:
    """One measurement: one system, one concurrency level, one round."""

    system: str
    concurrency: int
    round: int
    completion_tokens: int
    wall_seconds: float
    """From the first request sent to the last answer received."""
    latencies_seconds: list[float]
    """Per request, client-side: send to whole answer received."""
    front_cpu_seconds: float
    """CPU time of the client and the serving front end (for the in-process engine: this process)."""
    engine_cpu_seconds: float
    """CPU time of vLLM's engine-core and model-worker processes."""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall_seconds


@dataclass(frozen=True)
class LevelSummary:
    """All rounds of one system at one concurrency level."""

    system: str
    concurrency: int
    requests: int
    """Over all rounds."""
    tokens_per_second: float
    """Median over rounds."""
    tokens_per_second_min: float
    tokens_per_second_max: float
    p50_seconds: float
    """Request latency percentiles over every request of every round."""
    p99_seconds: float
    front_cpu_ms_per_token: float
    """Client and front-end CPU per completion token, over all rounds."""
    front_cpu_ms_per_request: float
    engine_cpu_ms_per_token: float

    @classmethod
    def of(cls, runs: list["Run"]) -> "LevelSummary":
        latencies = [latency for run in runs for latency in run.latencies_seconds]
        throughputs = [run.tokens_per_second for run in runs]
        tokens = sum(run.completion_tokens for run in runs)
        return cls(
            system=runs[0].system,
            concurrency=runs[0].concurrency,
            requests=len(latencies),
            tokens_per_second=float(np.median(throughputs)),
            tokens_per_second_min=min(throughputs),
            tokens_per_second_max=max(throughputs),
            p50_seconds=float(np.percentile(latencies, 50)),
            p99_seconds=float(np.percentile(latencies, 99)),
            front_cpu_ms_per_token=1000 * sum(run.front_cpu_seconds for run in runs) / tokens,
            front_cpu_ms_per_request=1000 * sum(run.front_cpu_seconds for run in runs) / len(latencies),
            engine_cpu_ms_per_token=1000 * sum(run.engine_cpu_seconds for run in runs) / tokens,
        )


def summarize(runs: list[Run]) -> list[LevelSummary]:
    """One summary per (system, concurrency), systems in SYSTEMS order, then by concurrency."""
    keys = sorted({(run.system, run.concurrency) for run in runs}, key=lambda key: (SYSTEMS.index(key[0]), key[1]))
    return [LevelSummary.of([run for run in runs if (run.system, run.concurrency) == key]) for key in keys]


SendOne = Callable[[], Awaitable[int]]
"""Send one request of the workload, wait for the whole answer, return its completion token count."""


@dataclass(frozen=True)
class Served:
    """A started system: how to send it a request, and which processes do its work."""

    send_one: SendOne
    front: list[psutil.Process]
    """The client and the serving front end (the in-process engine's front end is this process)."""
    engine: list[psutil.Process]
    """vLLM's engine-core and model-worker processes."""

    def cpu_seconds(self) -> tuple[float, float]:
        """Cumulative user + system CPU seconds of (front, engine)."""
        return _cpu_seconds(self.front), _cpu_seconds(self.engine)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def subprocess_system(send_one: SendOne, server_pid: int) -> Served:
    """A server subprocess: its main process is the front end, its descendants are vLLM's engine processes."""
    server = psutil.Process(server_pid)
    return Served(send_one, front=[psutil.Process(), server], engine=server.children(recursive=True))


async def run_level(
    system: str, served: Served, concurrency: int, requests: int, expected_tokens: int, round_index: int = -1
) -> Run:
    """Closed loop: `concurrency` workers share `requests` requests, each sending the next when answered."""
    remaining = requests
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal remaining, tokens
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            answered_tokens = await served.send_one()
            latencies.append(time.perf_counter() - sent)
            if answered_tokens != expected_tokens:
                raise RuntimeError(
                    f"{system}: an answer has {answered_tokens} tokens, the workload asks for {expected_tokens}"
                )
            tokens += answered_tokens

    front_cpu, engine_cpu = served.cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_seconds = time.perf_counter() - started
    front_cpu_after, engine_cpu_after = served.cpu_seconds()
    return Run(
        system, concurrency, round_index, tokens, wall_seconds, latencies,
        front_cpu_seconds=front_cpu_after - front_cpu, engine_cpu_seconds=engine_cpu_after - engine_cpu,
    )  # fmt: skip


async def engines_idle(systems_served: dict[str, Served], interval: float = 0.25, timeout: float = 30) -> None:
    """Wait until no engine process of any system uses CPU.

    vLLM's engine-core and model-worker processes keep polling each other for a second after their
    last step; a system measured in that second would share the model worker's core with them.
    """
    engines = [process for served in systems_served.values() for process in served.engine]
    deadline = time.monotonic() + timeout
    busy = _cpu_seconds(engines)
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        busy, before = _cpu_seconds(engines), busy
        if busy - before < 0.02 * interval * len(engines):
            return
    raise TimeoutError(f"vLLM's engine processes were still busy {timeout:.0f} s after the last measurement")


async def measure(systems_served: dict[str, Served], workload: Workload) -> list[Run]:
    """Every round: every level, every system; the systems' order rotates from round to round."""
    runs = []
    systems = list(systems_served)
    for round_index in range(workload.rounds):
        order = systems[round_index % len(systems) :] + systems[: round_index % len(systems)]
        for concurrency in workload.concurrency_levels:
            for system in order:
                await engines_idle(systems_served)
                run = await run_level(
                    system,
                    systems_served[system],
                    concurrency,
                    workload.requests_at(concurrency),
                    workload.max_tokens,
                    round_index,
                )
                console.print(
                    f"  round {round_index} {system:8s} c={concurrency:<3d} {run.tokens_per_second:9.1f} tok/s  "
                    f"p50 {np.percentile(run.latencies_seconds, 50) * 1000:8.1f} ms  "
                    f"p99 {np.percentile(run.latencies_seconds, 99) * 1000:8.1f} ms  "
                    f"CPU ms/token front {1000 * run.front_cpu_seconds / run.completion_tokens:5.2f} "
                    f"engine {1000 * run.engine_cpu_seconds / run.completion_tokens:5.2f}"
                )
                runs.append(run)
    return runs


def sampling_message(workload: Workload) -> serving_pb2.SamplingParams:
    """The workload's sampling as Flywheel's contract states it; the in-process engine validates the same message."""
    return serving_pb2.SamplingParams(max_tokens=workload.max_tokens, min_tokens=workload.max_tokens, temperature=0.0)


# --- the three systems ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process_engine(model: str, settings: EngineSettings, workload: Workload) -> AsyncIterator[Served]:
    """(a) vLLM's AsyncLLM on this event loop, through the same seam the Flywheel server uses."""
    from server.app import freeze_startup_heap
    from server.engine import PolicyEngine
    from server.validation import validate_sampling

    server_defaults = ServerSettings()
    limits = server_defaults.limits
    sampling = validate_sampling(sampling_message(workload), limits)
    this_process = psutil.Process()
    children_before = {child.pid for child in this_process.children(recursive=True)}
    engine = PolicyEngine.start(settings, model)
    engine_processes = [child for child in this_process.children(recursive=True) if child.pid not in children_before]
    request_ids = iter(range(1 << 62))
    freeze_startup_heap()  # as `flywheel serve` does once it has started

    async def send_one() -> int:
        tokens = 0
        # F821: ruff takes `engine` for the name deleted below, but that `del` runs after send_one's last call.
        prompt = engine.render_prompt(workload.prompt)  # noqa: F821 (as `Generate` renders every request's text)
        async for delta in engine.stream(f"bench-{next(request_ids)}", prompt, sampling, whole=True):  # noqa: F821
            tokens += len(delta.token_ids)
        return tokens

    try:
        yield Served(send_one, front=[this_process], engine=engine_processes)
    finally:
        engine.shutdown()
        # An import inside vLLM's shutdown leaves a traceback that keeps this frame, so the engine, alive
        # until interpreter teardown, where AsyncLLM.__del__ fails; `del` empties the local and send_one's cell.
        del engine


@contextlib.asynccontextmanager
async def flywheel_grpc(
    model: str, settings: EngineSettings, workload: Workload, prompt_tokens: int, log_dir: Path
) -> AsyncIterator[Served]:
    """(b) `flywheel serve` in a subprocess, `Generate` over one grpc.aio channel."""
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    env = {
        **os.environ,
        "FLYWHEEL_ENGINE__DTYPE": settings.dtype,
        "FLYWHEEL_ENGINE__MAX_MODEL_LEN": str(settings.max_model_len),
        "FLYWHEEL_ENGINE__KV_CACHE_BYTES": str(settings.kv_cache_bytes),
        "FLYWHEEL_ENGINE__ENFORCE_EAGER": json.dumps(settings.enforce_eager),
        "FLYWHEEL_ENGINE__SEED": str(settings.seed),
        "FLYWHEEL_SERVER__MAX_IN_FLIGHT": str(max(workload.concurrency_levels)),
        "FLYWHEEL_SERVER__MAX_QUEUED": str(max(workload.concurrency_levels)),
        # Serving alone: what logging to Kafka costs is benchmarks/event_logging.py's question.
        "FLYWHEEL_SERVER__LOG_GENERATIONS": "false",
    }
    command = [
        str(Path(sys.executable).parent / "flywheel"), "serve", "--model", model, "--state-dir", str(log_dir / "flywheel-state"),
        "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    with server_process("flywheel", command, env, log_dir) as server:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until(server, lambda: grpc_serving(channel), "gRPC health SERVING")
            stub = serving_pb2_grpc.FlywheelStub(channel)
            request = serving_pb2.GenerateRequest(prompt=workload.prompt, sampling=sampling_message(workload))

            async def send_one() -> int:
                response = await stub.Generate(request)
                if response.prompt_tokens != prompt_tokens:
                    raise RuntimeError(f"flywheel: prompt is {response.prompt_tokens} tokens, expected {prompt_tokens}")
                return response.completion_tokens

            yield subprocess_system(send_one, server.process.pid)


@contextlib.asynccontextmanager
async def openai_http(
    model: str, settings: EngineSettings, workload: Workload, prompt_tokens: int, log_dir: Path
) -> AsyncIterator[Served]:
    """(c) vLLM's OpenAI server in a subprocess with PolicyEngine's engine arguments, /v1/completions over aiohttp."""
    port = free_port("127.0.0.1")
    with server_process("openai", openai_server_command(model, settings, port), dict(os.environ), log_dir) as server:
        connector = aiohttp.TCPConnector(limit=max(workload.concurrency_levels))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as session:
            await wait_until(server, lambda: http_ok(session, "/health"), "HTTP /health 200")
            body = {
                "model": model,
                "prompt": workload.prompt,
                "max_tokens": workload.max_tokens,
                "min_tokens": workload.max_tokens,
                "temperature": 0.0,
                # PolicyEngine asks the engine for the sampled token's log-prob on every request; so does this.
                "logprobs": 0,
            }

            async def send_one() -> int:
                async with session.post("/v1/completions", json=body) as reply:
                    if reply.status != 200:
                        raise RuntimeError(f"openai: HTTP {reply.status}: {await reply.text()}")
                    usage = (await reply.json())["usage"]
                if usage["prompt_tokens"] != prompt_tokens:
                    raise RuntimeError(f"openai: prompt is {usage['prompt_tokens']} tokens, expected {prompt_tokens}")
                return usage["completion_tokens"]

            yield subprocess_system(send_one, server.process.pid)


def openai_server_command(model: str, settings: EngineSettings, port: int) -> list[str]:
    """vLLM's OpenAI server with the AsyncEngineArgs that `PolicyEngine.start` builds from `settings`.

    Scheduler limits are spelled out because the server's defaults are chosen by usage context;
    the values are the ones AsyncLLM.from_engine_args ends up with.
    """
    from vllm.config import SchedulerConfig

    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--kv-cache-memory-bytes", str(settings.kv_cache_bytes),
        "--seed", str(settings.seed),
        "--logprobs-mode", "processed_logprobs",
        "--max-num-seqs", str(SchedulerConfig.DEFAULT_MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS),
        # The model's generation_config.json would otherwise change the sampling defaults of this system only.
        "--generation-config", "vllm",
    ]  # fmt: skip
    if settings.enforce_eager:
        command.append("--enforce-eager")
    return command


# --- subprocesses and readiness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerProcess:
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def server_process(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Iterator[ServerProcess]:
    """Run `command` in its own process group, logging to log_dir; the whole group is killed on exit.

    The same session as this process, though: Linux schedules each session as one group (autogroup),
    so a server in a session of its own would get half the CPU against the clients, where the
    in-process engine shares it thread by thread.
    """
    log_path = log_dir / f"{name}.log"
    console.print(f"[dim]starting {name}: {shlex.join(command)}[/dim]")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, process_group=0
        )
    try:
        yield ServerProcess(process, log_path)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 30) -> None:
    """SIGTERM the group (servers shut down their engine cores), SIGKILL whatever is left after the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


async def wait_until(
    server: ServerProcess, ready: Callable[[], Awaitable[bool]], what: str, timeout: float = 600
) -> None:
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"server exited with code {server.process.returncode} before {what}; log tail:\n{tail}")
        with contextlib.suppress(Exception):
            if await ready():
                console.print(f"[dim]  ready after {time.monotonic() - started:.1f} s[/dim]")
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout:.0f} s; see {server.log_path}")


async def grpc_serving(channel: aio.Channel) -> bool:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="flywheel.v1.Flywheel"), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def http_ok(session: aiohttp.ClientSession, path: str) -> bool:
    async with session.get(path, timeout=aiohttp.ClientTimeout(total=2)) as reply:
        return reply.status == 200


# --- reporting -----------------------------------------------------------------------------------------------


def paired_ratios(runs: list[Run], numerator: str, denominator: str, concurrency: int) -> list[float]:
    """Throughput of `numerator` over `denominator` in each round where both ran at this concurrency."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.concurrency == concurrency:
            by_round.setdefault(run.round, {})[run.system] = run.tokens_per_second
    return [
        systems[numerator] / systems[denominator]
        for systems in by_round.values()
        if numerator in systems and denominator in systems
    ]


def ratios(runs: list[Run], summaries: list[LevelSummary]) -> list[dict]:
    """Per concurrency: Flywheel's throughput over the ceiling's and over the OpenAI server's, its p99 over the latter's,
    and the client and front-end CPU each server spends per answer beyond the ceiling's.

    Throughput ratios are taken round by round, between measurements seconds apart, then the median over rounds
    (with the range): the machine's speed drifts more between rounds than between the systems of one round.
    """
    p99 = {(summary.system, summary.concurrency): summary.p99_seconds for summary in summaries}
    front_cpu = {(summary.system, summary.concurrency): summary.front_cpu_ms_per_request for summary in summaries}
    rows = []
    for concurrency in sorted({run.concurrency for run in runs}):
        row: dict = {"concurrency": concurrency}
        for key, other in (
            ("flywheel_over_engine_throughput", "engine"),
            ("flywheel_over_openai_throughput", "openai"),
        ):
            paired = paired_ratios(runs, "flywheel", other, concurrency)
            if paired:
                row[key] = float(np.median(paired))
                row[f"{key}_range"] = [min(paired), max(paired)]
        if ("flywheel", concurrency) in p99 and ("openai", concurrency) in p99:
            row["flywheel_over_openai_p99"] = p99["flywheel", concurrency] / p99["openai", concurrency]
        for key, system in zip(ADDED_CPU_KEYS, ("flywheel", "openai")):
            if (system, concurrency) in front_cpu and ("engine", concurrency) in front_cpu:
                row[key] = front_cpu[system, concurrency] - front_cpu["engine", concurrency]
        rows.append(row)
    return rows


RESULT_COLUMNS = (
    "system", "concurrency", "requests", "tokens/s (median)", "tokens/s (min–max)", "p50 ms", "p99 ms",
    "client+front-end CPU ms/token", "engine CPU ms/token",
)  # fmt: skip
RATIO_COLUMNS = (
    "concurrency", "b/a tokens/s (median)", "b/a (min–max)", "b/c tokens/s (median)", "b/c (min–max)", "b/c p99",
    "b − a client+front-end CPU ms/answer", "c − a client+front-end CPU ms/answer",
)  # fmt: skip
RATIO_KEYS = ("flywheel_over_engine_throughput", "flywheel_over_openai_throughput", "flywheel_over_openai_p99")
ADDED_CPU_KEYS = ("flywheel_added_front_cpu_ms_per_answer", "openai_added_front_cpu_ms_per_answer")


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


# --- machine and model facts ---------------------------------------------------------------------------------


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
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
