"""What logging every answer to Kafka costs a `Generate` call, and how many events/s the producer sustains.

Two Flywheel servers run in this process on one vLLM engine: one logs every answer to the
embedded broker (GenerationLogged, through the spooling producer), the other logs nothing.
Rounds alternate between them, each a closed loop of `--requests` greedy requests at
`--concurrency`, so whatever else the machine does falls on both alike. Then the producer alone
publishes `--events` GenerationLogged events as fast as the caller can, and the time until Kafka
acknowledged them all gives events/s.

    .venv/bin/python -m benchmarks.event_logging [--model DIR] [--rounds 6] [--requests 64] [--concurrency 8] [--events 20000]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from grpc import aio
from prometheus_client import CollectorRegistry

from benchmarks.common import REPO_ROOT, percentile
from feedback.broker import EmbeddedBroker
from feedback.config import SpoolSettings
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.demo.init_model import ensure_demo_model
from flywheel.v1 import events_pb2, serving_pb2_grpc
from flywheel.v1 import serving_pb2 as pb
from server.app import FlywheelServer
from server.config import EngineSettings, ServerSettings
from server.engine import PolicyEngine


async def closed_loop(
    stub: serving_pb2_grpc.FlywheelStub, requests: int, concurrency: int, max_tokens: int
) -> list[float]:
    """Latencies in seconds of `requests` Generate calls, `concurrency` at a time."""
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 47+38?")])
    request = pb.GenerateRequest(
        chat=messages, sampling=pb.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    )
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await stub.Generate(request)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def generation_event() -> events_pb2.GenerationLogged:
    return events_pb2.GenerationLogged(
        event_id=uuid.uuid4().hex,
        response_id=f"resp-{uuid.uuid4().hex}",
        rendered_prompt="<|im_start|>user\nWhat is 47+38?<|im_end|>\n<|im_start|>assistant\n",
        response_text="85",
        prompt_token_ids=list(range(20)),
        response_token_ids=[7, 8, 2],
        behavior_logprobs=[-0.1, -0.2, -0.01],
        policy_version=1,
    )


async def producer_throughput(producer: EventProducer, topic: str, events: int) -> float:
    """Events per second from the first publish to Kafka's acknowledgement of the last."""
    batch = [generation_event() for _ in range(events)]
    started = time.perf_counter()
    for event in batch:
        producer.publish(topic, event.response_id, event)
    await producer.flush()
    return events / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> str:
    model = args.model or str(ensure_demo_model(REPO_ROOT / ".cache" / "demo-model"))
    engine = PolicyEngine.start(EngineSettings(dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20), model)
    broker = EmbeddedBroker()
    await broker.start()
    kafka = broker.kafka.model_copy(update={"max_pending_events": max(10_000, args.events)})
    spool_dir = Path(tempfile.mkdtemp(prefix="flywheel-spool-"))
    producer = EventProducer(kafka, SpoolSettings(directory=spool_dir), EventMetrics.register(CollectorRegistry()))
    await producer.start()
    settings = ServerSettings(port=0, metrics_port=0, max_in_flight=args.concurrency, max_queued=args.concurrency)
    servers = {
        "logging off": await FlywheelServer.start(settings, engine),
        "logging on": await FlywheelServer.start(settings, engine, events=producer, topics=kafka.topics),
    }
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    try:
        channels = {name: aio.insecure_channel(server.address) for name, server in servers.items()}
        stubs = {name: serving_pb2_grpc.FlywheelStub(channel) for name, channel in channels.items()}
        for stub in stubs.values():
            await closed_loop(stub, args.concurrency, args.concurrency, args.max_tokens)  # warm-up
        for round_number in range(args.rounds):
            order = list(stubs) if round_number % 2 == 0 else list(reversed(stubs))
            for name in order:
                latencies[name] += await closed_loop(stubs[name], args.requests, args.concurrency, args.max_tokens)
        await producer.flush()
        events_per_second = await producer_throughput(producer, kafka.topics.generations, args.events)
        for channel in channels.values():
            await channel.close()
    finally:
        for server in servers.values():
            await server.stop(0)
        await producer.stop()
        await broker.stop()
        engine.shutdown()

    rows = []
    for name, values in latencies.items():
        rows.append(
            f"| {name} | {len(values)} | {statistics.median(values) * 1000:.1f} | {percentile(values, 0.99) * 1000:.1f} |"
        )
    on, off = latencies["logging on"], latencies["logging off"]
    p50_ratio = statistics.median(on) / statistics.median(off)
    p99_ratio = percentile(on, 0.99) / percentile(off, 0.99)
    return "\n".join(
        [
            f"Concurrency {args.concurrency}, {args.max_tokens} tokens per answer, {args.rounds} alternating rounds "
            f"of {args.requests} requests each, one engine.",
            "",
            "| server | requests | p50 ms | p99 ms |",
            "|---|---|---|---|",
            *rows,
            "",
            f"**logging on / off: p50 {p50_ratio:.3f}, p99 {p99_ratio:.3f}** (target p99 ≤ 1.05)",
            "",
            f"Producer alone: **{events_per_second:,.0f} GenerationLogged events/s** acknowledged by the embedded broker "
            f"({args.events} events, acks=all, gzip).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=64, help="requests per round and server")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--events", type=int, default=20_000, help="events for the producer throughput run")
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
