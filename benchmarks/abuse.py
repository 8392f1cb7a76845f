"""A small client's latency alone, and while four clients send the largest requests the limits allow.

One Flywheel server (a subprocess, so the clients' Python does not share its interpreter) on the
demo model with the default request limits. A small client asks one short greedy question after
another. In rotating windows of the same run, four attacking clients send, as fast as the server
answers:
- "largest": the largest `Generate` the limits allow: a chat of `max_chat_messages` messages
  holding `max_request_chars` characters, every id, tag and token at its bound;
- "largest that fits": the longest prompt the model's context takes (half of it) with max_tokens
  filling the other half, so the engine works on four long answers beside the small one.
The small client's p50 and p99 in each attacked window are compared with its own in the quiet
windows between them.

    .venv/bin/python -m benchmarks.abuse [--model DIR] [--rounds 6] [--seconds 8] [--attackers 4]
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc

from benchmarks.common import REPO_ROOT, invocation, markdown_table, percentile, report
from feedback.broker import free_port
from flywheel.demo.init_model import ensure_demo_model
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc
from server.validation import RequestLimits

RESULTS_MD = REPO_ROOT / "benchmarks" / "results" / "abuse.md"
MAX_MODEL_LEN = 512
SMALL_REQUEST = pb.GenerateRequest(
    chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 12+34?")]),
    sampling=pb.SamplingParams(max_tokens=8, temperature=0),
    user_id="small",
)


def largest_request(limits: RequestLimits) -> pb.GenerateRequest:
    """The biggest Generate the limits let through validation: every message, every character, every token."""
    per_message = min(limits.max_message_chars, limits.max_request_chars // limits.max_chat_messages)
    words = ("What is 12+34? " * (per_message // 15 + 1))[:per_message]
    messages = [
        pb.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=words)
        for i in range(limits.max_chat_messages)
    ]
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=messages),
        sampling=pb.SamplingParams(max_tokens=limits.max_tokens_limit),
        user_id="u" * limits.max_user_id_chars,
        client_request_id="c" * limits.max_client_request_id_chars,
        tags={f"{i:0{limits.max_tag_key_chars}d}": "v" * limits.max_tag_value_chars for i in range(limits.max_tags)},
    )


def largest_fitting_request(model: str, max_model_len: int) -> pb.GenerateRequest:
    """A chat whose prompt takes half the context, asking for answers as long as the other half."""
    from transformers import AutoTokenizer

    from flywheel.prompts import PromptRenderer

    renderer = PromptRenderer(AutoTokenizer.from_pretrained(model))
    repeats = 1
    while (
        len(renderer.chat([{"role": "user", "content": "What is 12+34? " * (repeats + 1)}]).token_ids)
        < max_model_len // 2
    ):
        repeats += 1
    content = "What is 12+34? " * repeats
    prompt_tokens = len(renderer.chat([{"role": "user", "content": content}]).token_ids)
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)]),
        sampling=pb.SamplingParams(max_tokens=max_model_len - prompt_tokens, min_tokens=max_model_len - prompt_tokens),
        user_id="attacker",
    )


def serve(model: str, port: int) -> None:
    """The server process: the demo engine and one FlywheelServer, until SIGTERM."""
    from server.app import FlywheelServer, freeze_startup_heap
    from server.config import EngineSettings, ServerSettings
    from server.engine import PolicyEngine

    async def run() -> None:
        engine_settings = EngineSettings(dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_bytes=256 << 20)
        engine = PolicyEngine.start(engine_settings, model)
        server = await FlywheelServer.start(ServerSettings(port=port, metrics_port=0), engine)
        freeze_startup_heap()
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        print("ready", flush=True)
        await stopping.wait()
        await server.stop(0)
        engine.shutdown()

    asyncio.run(run())


def small_client(stub, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        stub.Generate(SMALL_REQUEST, timeout=120)
        latencies.append(time.perf_counter() - started)


def attacker(stub, request: pb.GenerateRequest, stop: threading.Event, codes: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            stub.Generate(request, timeout=120)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        codes[code] = codes.get(code, 0) + 1


def window(stub, seconds: float, attackers: int, request: pb.GenerateRequest, codes: dict[str, int]) -> list[float]:
    """The small client's latencies over `seconds`, with `attackers` attacking threads beside it."""
    stop = threading.Event()
    latencies: list[float] = []
    threads = [threading.Thread(target=small_client, args=(stub, stop, latencies))]
    threads += [threading.Thread(target=attacker, args=(stub, request, stop, codes)) for _ in range(attackers)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of quiet and attacked windows")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each window")
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS_MD.relative_to(REPO_ROOT)}")
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model or str(ensure_demo_model(REPO_ROOT / ".cache" / "demo-model"))
    if args.serve_port:
        serve(model, args.serve_port)
        return

    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "benchmarks.abuse", "--model", model, "--serve-port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while (line := server.stdout.readline()) and line.strip() != b"ready":
            pass
        limits = RequestLimits()
        attacks = {
            "largest": largest_request(limits),
            "largest that fits": largest_fitting_request(model, MAX_MODEL_LEN),
        }
        latencies: dict[str, list[float]] = {"alone": [], **{name: [] for name in attacks}}
        codes: dict[str, dict[str, int]] = {name: {} for name in attacks}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_pb2_grpc.FlywheelStub(channel)
            window(stub, 2.0, 0, SMALL_REQUEST, {})  # warm-up
            for _ in range(args.rounds):
                for name, request in attacks.items():
                    latencies["alone"] += window(stub, args.seconds, 0, request, {})
                    latencies[name] += window(stub, args.seconds, args.attackers, request, codes[name])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    stats = {
        name: (1000 * percentile(values, 0.5), 1000 * percentile(values, 0.99), len(values))
        for name, values in latencies.items()
    }
    alone_p50, alone_p99, _ = stats["alone"]
    rows = [["alone", f"{alone_p50:.1f}", f"{alone_p99:.1f}", "", "", str(stats["alone"][2]), ""]]
    for name in attacks:
        p50, p99, count = stats[name]
        answered = ", ".join(f"{code} {n}" for code, n in sorted(codes[name].items()))
        rows.append(
            [
                f"4 clients: {name}",
                f"{p50:.1f}",
                f"{p99:.1f}",
                f"{p50 / alone_p50:.2f}",
                f"{p99 / alone_p99:.2f}",
                str(count),
                answered,
            ]
        )
    largest, answer_tokens = attacks["largest"], attacks["largest that fits"].sampling.max_tokens
    lines = [
        f"`{invocation('benchmarks.abuse', argv)}`",
        "",
        f"largest: a chat of {limits.max_chat_messages} messages, {limits.max_request_chars} characters, every field at its "
        f"bound, {largest.ByteSize()} bytes. largest that fits: {MAX_MODEL_LEN - answer_tokens} prompt tokens and "
        f"{answer_tokens} answer tokens, in a {MAX_MODEL_LEN}-token context.",
        "",
        *markdown_table(
            ["small client", "p50 ms", "p99 ms", "p50 / alone", "p99 / alone", "requests", "attacks answered"], rows
        ),
    ]
    report(lines, RESULTS_MD, args.write)


if __name__ == "__main__":
    main()
