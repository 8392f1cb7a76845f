"""Hot-swap under load: how long admission pauses, and how long from an approval until every server is live.

Two `flywheel serve` replicas follow one policy registry and one (embedded) Kafka broker, each
under a closed loop of greedy `Generate` calls. The benchmark then approves versions one after
another the way the gate does — move the registry's live pointer, publish an APPROVED policy
event — and polls `GetPolicy` on both replicas until both answer with the new version. It
reports, side by side: the request latency before and during the swaps, the admission pause
of each swap (the servers' own `flywheel_policy_swap_seconds`), and approval → all live.

`--compare-cache-reset` runs the second replica with swaps that keep vLLM's prefix and encoder
caches (as before the reset was added), so the two pauses come from the same swaps under the
same load.

    .venv/bin/python -m benchmarks.swap [--model DIR] [--swaps 10] [--concurrency 8] [--compare-cache-reset]
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from grpc import aio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import REPO_ROOT, percentile
from feedback.broker import EmbeddedBroker, free_port
from feedback.config import SpoolSettings
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.demo.init_model import ensure_demo_model
from flywheel.registry import PolicyRegistry
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from gate.service import policy_event

REPLICAS = 2
SERVE_KEEPING_CACHES = "serve-keeping-caches"
"""`python -m benchmarks.swap serve-keeping-caches ARGS`: `flywheel serve ARGS` whose swaps keep vLLM's caches."""


def serve_keeping_caches(argv: list[str]) -> None:
    """`flywheel serve` with the reload only: the prefix and encoder caches survive a swap (the stale-cache bug)."""
    from server.engine import PolicyEngine

    async def reload_keeping_caches(self: PolicyEngine, weights_dir: str) -> None:
        await self._llm.collective_rpc("reload_policy_weights", kwargs={"weights_path": weights_dir})

    PolicyEngine.reload_weights = reload_keeping_caches
    from cli.main import main

    main(["serve", *argv])


class Replica:
    def __init__(self, state_dir: Path, model: str, kafka: str, index: int, keep_caches: bool = False):
        self.port, self.metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.log = (state_dir / f"serve-{index}.log").open("wb")
        env = {
            **os.environ,
            "FLYWHEEL_ENGINE__DTYPE": "float32",
            "FLYWHEEL_ENGINE__MAX_MODEL_LEN": "512",
            "FLYWHEEL_ENGINE__KV_CACHE_BYTES": str(256 << 20),
            "FLYWHEEL_SERVER__SERVER_ID": f"replica-{index}",
            "FLYWHEEL_SERVER__LOG_GENERATIONS": "false",
            "FLYWHEEL_POLICY__ADAPTER": "none",  # whole-weight swaps (the demo model's settings choose adapters)
        }
        serve = (
            [sys.executable, "-m", "benchmarks.swap", SERVE_KEEPING_CACHES]
            if keep_caches
            else [sys.executable, "-m", "cli", "serve"]
        )
        command = [
            *serve, "--model", model, "--state-dir", str(state_dir),
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--kafka", kafka,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.channel = aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = serving_pb2_grpc.FlywheelStub(self.channel)

    async def version(self) -> int | None:
        try:
            return (await self.stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)).policy_version
        except aio.AioRpcError:
            return None

    def swap_seconds(self) -> tuple[float, float]:
        """(sum, count) of the replica's flywheel_policy_swap_seconds histogram."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
        samples = {sample.name: sample.value for sample in families["flywheel_policy_swap_seconds"].samples}
        return samples["flywheel_policy_swap_seconds_sum"], samples["flywheel_policy_swap_seconds_count"]

    async def stop(self) -> None:
        await self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


class Load:
    """A closed loop of greedy Generate calls against every replica, recording (finished at, latency)."""

    def __init__(self, replicas: list[Replica], concurrency: int):
        messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 47+38?")])
        self.request = pb.GenerateRequest(
            chat=messages, sampling=pb.SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
        )
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self.tasks = [asyncio.create_task(self.worker(replica)) for replica in replicas for _ in range(concurrency)]

    async def worker(self, replica: Replica) -> None:
        while True:
            started = time.perf_counter()
            try:
                await replica.stub.Generate(self.request, timeout=60)
            except aio.AioRpcError:
                self.failures += 1
                continue
            finished = time.perf_counter()
            self.samples.append((finished, finished - started))

    def latencies(self, start: float, end: float) -> list[float]:
        return [latency for finished, latency in self.samples if start <= finished < end]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run(args: argparse.Namespace) -> str:
    model = args.model or str(ensure_demo_model(REPO_ROOT / ".cache" / "demo-model"))
    state_dir = Path(tempfile.mkdtemp(prefix="flywheel-swap-"))
    registry = PolicyRegistry(state_dir / "registry")
    registry.seed(Path(model))
    second = registry.publish(Path(model), parent_version=1, training_step=1, metrics={})
    broker = EmbeddedBroker()
    await broker.start()
    producer = EventProducer(
        broker.kafka, SpoolSettings(directory=state_dir / "spool"), EventMetrics.register(CollectorRegistry())
    )
    await producer.start()
    # With --compare-cache-reset the last replica keeps its caches across swaps.
    replicas = [
        Replica(
            state_dir,
            model,
            broker.bootstrap_servers,
            index,
            keep_caches=args.compare_cache_reset and index == REPLICAS - 1,
        )
        for index in range(REPLICAS)
    ]
    try:
        while None in await asyncio.gather(*(replica.version() for replica in replicas)):
            if any(replica.process.poll() is not None for replica in replicas):
                raise RuntimeError(f"a replica exited; see {state_dir}/serve-*.log")
            await asyncio.sleep(1)
        await asyncio.sleep(args.settle_seconds)  # each replica's policy-event consumer joins its group
        load = Load(replicas, args.concurrency)
        baseline_start = time.perf_counter()
        await asyncio.sleep(args.baseline_seconds)
        swaps_start = time.perf_counter()
        to_all_live = []
        for swap in range(args.swaps):
            version = second.version if swap % 2 == 0 else 1
            approved_at = time.perf_counter()
            live = registry.set_live(version, reason="benchmark", kind="approved")
            producer.publish(
                broker.kafka.topics.policy,
                str(version),
                policy_event(events_pb2.POLICY_EVENT_KIND_APPROVED, version, live.previous_version),
            )
            while any(v != version for v in await asyncio.gather(*(replica.version() for replica in replicas))):
                await asyncio.sleep(0.01)
            to_all_live.append(time.perf_counter() - approved_at)
            await asyncio.sleep(args.gap_seconds)
        swaps_end = time.perf_counter()
        await load.stop()
        stalls = [replica.swap_seconds() for replica in replicas]
    finally:
        for replica in replicas:
            await replica.stop()
        await producer.stop()
        await broker.stop()

    baseline = load.latencies(baseline_start, swaps_start)
    during = load.latencies(swaps_start, swaps_end)
    stall_total, stall_count = (sum(values) for values in zip(*stalls))
    if args.compare_cache_reset:
        (reset_total, reset_count), (kept_total, kept_count) = stalls
        pause_lines = [
            f"Admission paused per swap (drain + reload, mean of {reset_count:.0f} each): "
            f"**{reset_total / reset_count * 1000:.1f} ms with the cache reset** (replica 0), "
            f"**{kept_total / kept_count * 1000:.1f} ms keeping the caches** (replica 1)",
        ]
    else:
        pause_lines = [
            f"Admission paused per swap (drain + reload, mean of {stall_count:.0f}): **{stall_total / stall_count * 1000:.1f} ms**"
        ]
    return "\n".join(
        [
            f"{REPLICAS} replicas (`flywheel serve`, one vLLM engine each), {args.concurrency} concurrent greedy 16-token "
            f"requests per replica, {args.swaps} approvals {args.gap_seconds:g} s apart; {load.failures} failed requests.",
            "",
            "| | requests | p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| before the swaps | {len(baseline)} | {statistics.median(baseline) * 1000:.1f} | {percentile(baseline, 0.99) * 1000:.1f} |",
            f"| during the swaps | {len(during)} | {statistics.median(during) * 1000:.1f} | {percentile(during, 0.99) * 1000:.1f} |",
            "",
            f"during / before: p50 {statistics.median(during) / statistics.median(baseline):.2f}, "
            f"p99 {percentile(during, 0.99) / percentile(baseline, 0.99):.2f}",
            "",
            *pause_lines,
            f"Approval → every replica live: **p50 {statistics.median(to_all_live) * 1000:.0f} ms, "
            f"max {max(to_all_live) * 1000:.0f} ms**",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients per replica")
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--gap-seconds", type=float, default=2.0, help="pause between approvals")
    parser.add_argument("--settle-seconds", type=float, default=10.0, help="wait after start for the consumers to join")
    parser.add_argument(
        "--compare-cache-reset", action="store_true", help="run the second replica with swaps that keep vLLM's caches"
    )
    if sys.argv[1:2] == [SERVE_KEEPING_CACHES]:
        serve_keeping_caches(sys.argv[2:])
        return
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
