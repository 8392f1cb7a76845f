"""Adapter mode against whole weights, side by side in one run: what a swap pauses, what a candidate
weighs, and what a PPO step costs the trainer.

    python -m benchmarks.adapters [--swaps 5] [--ppo-steps 3] [--write]

- Pause per swap: one LoRA-enabled engine on the demo model, a server's PolicySwapper following a
  registry; swaps alternate between a whole-weight version (reload in place, admission paused)
  and an adapter version (loaded beside, nothing paused), as `flywheel_policy_swap_seconds` counts them.
- Bytes per candidate: what the trainer's `save_policy` writes in each mode.
- Trainer: PPO steps on the demo model in a fresh process per mode (peak RSS is per process),
  tokens per second of `ppo_step`, and the bytes of what training holds (policy, reference,
  optimizer moments).
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO_ROOT, invocation, markdown_table, report

RESULTS = REPO_ROOT / "benchmarks" / "results" / "adapters.md"
ADAPTER_SETTINGS = {"adapter": "lora", "lora_rank": 4, "lora_alpha": 16.0}


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def ppo_run(mode: str, steps: int) -> dict:
    """PPO steps in this process, in `mode` ("whole" or "lora"); what they cost and what a candidate weighs."""
    import torch
    from transformers import AutoTokenizer

    from benchmarks.common import demo_prompt_ids
    from flywheel.adapters import PolicySettings
    from tests.engine_fixtures import test_model_path
    from trainer.config import PPOSettings
    from trainer.ppo import PolicyWithValue, PPOTrainer
    from trainer.reward_model import RewardModel

    torch.manual_seed(0)
    model_path = test_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = PolicySettings(**ADAPTER_SETTINGS) if mode == "lora" else None
    models = PolicyWithValue.from_pretrained(model_path, policy)
    trainer = PPOTrainer(
        models, tokenizer, PPOSettings(max_new_tokens=16, policy_learning_rate=1e-5, adapter_learning_rate=1e-3)
    )
    reward_model = RewardModel.from_pretrained(model_path)
    prompts = demo_prompt_ids(tokenizer, 8, seed=0)
    stats = [trainer.ppo_step(trainer.rollout(prompts), reward_model) for _ in range(steps)]

    def tensor_bytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    moments = [v for state in trainer.policy_optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    held = tensor_bytes(models.policy.parameters()) + tensor_bytes(moments)
    if models.reference is not None:
        held += tensor_bytes(models.reference.parameters())
    trainable = sum(p.numel() for p in models.policy.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as out:
        trainer.save_policy(Path(out))
        candidate = directory_bytes(Path(out))
    return {
        "tokens_per_second": sum(s.tokens_per_second for s in stats[1:] or stats) / len(stats[1:] or stats),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "held_bytes": held,
        "trainable_parameters": trainable,
        "candidate_bytes": candidate,
    }


async def measure_swaps(swaps: int) -> dict[str, list[float]]:
    """Seconds admission was paused per swap, for whole-weight and adapter swaps, alternating on one engine."""
    from prometheus_client import CollectorRegistry

    from feedback.config import TopicNames
    from flywheel.adapters import PolicySettings
    from flywheel.registry import PolicyRegistry
    from server.app import FlywheelServer
    from server.config import EngineSettings, ServerSettings
    from server.engine import PolicyEngine
    from server.metrics import PolicyCheckMetrics
    from server.swap import PolicyChecker, PolicySwapper
    from tests import policy_variants
    from tests.engine_fixtures import test_model_path

    model_path = test_model_path()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        registry = PolicyRegistry(root / "registry")
        registry.seed(model_path)
        whole = registry.publish(
            policy_variants.banned_phrase(model_path, root / "whole"), parent_version=1, training_step=1, metrics={}
        ).version
        adapter = registry.publish(
            policy_variants.concise_adapter(model_path, root / "adapter"),
            parent_version=1, training_step=1, metrics={}, base_version=1,
        ).version  # fmt: skip
        settings = EngineSettings(dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20)
        engine = PolicyEngine.start(settings, str(model_path), PolicySettings(**ADAPTER_SETTINGS))
        server = await FlywheelServer.start(
            ServerSettings(port=0, metrics_port=0), engine, policy_version=1, policy_digest=registry.manifest(1).digest
        )
        checker = PolicyChecker(registry, PolicyCheckMetrics(CollectorRegistry()), 60, 300)
        swapper = PolicySwapper(
            engine, server.policy, server.admission, checker, server.metrics, None, TopicNames(), "bench",
            base_digest=registry.manifest(1).digest,
        )  # fmt: skip
        paused: dict[str, list[float]] = {"whole": [], "adapter": []}

        def pause_so_far() -> float:
            return server.registry.get_sample_value("flywheel_policy_swap_seconds_sum") or 0.0

        try:
            for _ in range(swaps):
                # base (v1) → whole-weight version: a reload; then back to the base, and on to the adapter.
                for target, kind in ((whole, "whole"), (1, "whole"), (adapter, "adapter"), (1, "adapter")):
                    before = pause_so_far()
                    registry.set_live(target, reason="bench", kind="approved")
                    assert await swapper.sync(), f"swap to {target} failed"
                    paused[kind].append(pause_so_far() - before)
        finally:
            await server.stop(0)
            engine.shutdown()
    return paused


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--ppo-steps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/adapters.md")
    parser.add_argument("--ppo-child", choices=["whole", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ppo_child:
        print(json.dumps(ppo_run(args.ppo_child, args.ppo_steps)))
        return

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ppo = {}
    for mode in ("whole", "lora"):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.adapters", "--ppo-child", mode, "--ppo-steps", str(args.ppo_steps)],
            capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        ppo[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    paused = asyncio.run(measure_swaps(args.swaps))
    whole, lora = ppo["whole"], ppo["lora"]

    def mean_ms(values: list[float]) -> str:
        return f"{1000 * sum(values) / len(values):.1f} ms (max {1000 * max(values):.1f})"

    rows = [
        ["admission pause per swap", mean_ms(paused["whole"]), mean_ms(paused["adapter"]), "—"],
        [
            "bytes per candidate",
            f"{whole['candidate_bytes']:,}",
            f"{lora['candidate_bytes']:,}",
            f"{lora['candidate_bytes'] / whole['candidate_bytes']:.1%}",
        ],
        [
            "trainable parameters",
            f"{whole['trainable_parameters']:,}",
            f"{lora['trainable_parameters']:,}",
            f"{lora['trainable_parameters'] / whole['trainable_parameters']:.1%}",
        ],
        [
            "trainer's weights + reference + moments",
            f"{whole['held_bytes']:,}",
            f"{lora['held_bytes']:,}",
            f"{lora['held_bytes'] / whole['held_bytes']:.2f}×",
        ],
        [
            "trainer peak RSS",
            f"{whole['peak_rss_bytes'] / 2**20:,.0f} MiB",
            f"{lora['peak_rss_bytes'] / 2**20:,.0f} MiB",
            f"{lora['peak_rss_bytes'] / whole['peak_rss_bytes']:.2f}×",
        ],
        [
            "PPO tokens/s",
            f"{whole['tokens_per_second']:,.0f}",
            f"{lora['tokens_per_second']:,.0f}",
            f"{lora['tokens_per_second'] / whole['tokens_per_second']:.2f}×",
        ],
    ]
    lines = [
        "```",
        invocation("benchmarks.adapters", argv),
        "```",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.1f}. Swaps: {args.swaps} rounds of four "
        f"(whole-weight and adapter, alternating). PPO: {args.ppo_steps} steps of 8 prompts × 2 answers, "
        "16 new tokens, a fresh process per mode.",
        "",
        *markdown_table(["measure", "whole weights", "adapter (LoRA r=4)", "adapter / whole"], rows),
    ]
    report(lines, RESULTS, args.write)


if __name__ == "__main__":
    main()
