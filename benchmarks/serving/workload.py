"""The load: what every system is asked (Workload), how one measurement drives a system (run_level, a closed
loop of workers) and how the rounds interleave the systems (measure)."""

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import psutil
from rich.console import Console

from flywheel.v1 import serving_pb2

SYSTEMS = ("engine", "flywheel", "openai")
SYSTEM_TITLES = {
    "engine": "(a) vLLM AsyncLLM in-process",
    "flywheel": "(b) Flywheel gRPC Generate",
    "openai": "(c) vLLM OpenAI /v1/completions",
}
SYSTEM_LABELS = {system: title.split(" ")[0] + " " + system for system, title in SYSTEM_TITLES.items()}
"""Short names for the terminal table: "(a) engine"."""
PROMPT = "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Kenya is"

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
