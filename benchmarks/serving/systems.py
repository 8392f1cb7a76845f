"""The three systems, each started once and handed back as a Served: vLLM in this process, `flywheel serve`
and vLLM's OpenAI server in subprocesses of their own process groups, and how to tell each is ready."""

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.common import REPO_ROOT
from benchmarks.serving.workload import Served, Workload, console, sampling_message, subprocess_system
from feedback.broker import free_port
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from server.config import EngineSettings, ServerSettings


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


def flywheel_serve(
    model: str, settings: EngineSettings, workload: Workload, log_dir: Path, port: int, metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `flywheel serve` with these engine settings, admitting the
    workload's highest concurrency and logging nothing to Kafka."""
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
        # The engine vLLM's own server runs: whole weights, no LoRA (the demo model's settings choose adapters).
        "FLYWHEEL_POLICY__ADAPTER": "none",
    }
    command = [
        str(Path(sys.executable).parent / "flywheel"), "serve", "--model", model, "--state-dir", str(log_dir / "flywheel-state"),
        "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    return command, env


@contextlib.asynccontextmanager
async def flywheel_grpc(
    model: str, settings: EngineSettings, workload: Workload, prompt_tokens: int, log_dir: Path
) -> AsyncIterator[Served]:
    """(b) `flywheel serve` in a subprocess, `Generate` over one grpc.aio channel."""
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    command, env = flywheel_serve(model, settings, workload, log_dir, port, metrics_port)
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
