"""PPO steps on one rank and on two, whole copies (DDP) against shards (FSDP2): tokens/s and memory per rank.

    python -m benchmarks.ranks [--hidden 512] [--layers 8] [--steps 3] [--no-write]

Builds one randomly initialised Qwen2 model (the demo tokenizer's chat template, a larger vocabulary and
body), then, one after another in this run, launches `torchrun --nproc_per_node N python -m
benchmarks.ranks --worker` for: 1 rank; 2 ranks DDP; 2 ranks FSDP (`trainer.distributed.Ranks`,
as `flywheel train` uses them). Every rank builds the policy, its reference, value head and reward
model from that directory, takes one warm-up PPO step and `--steps` timed ones on the same prompts
(its share of them), answers forced to `--new-tokens` tokens (end-of-sequence suppressed) so every
setting samples the same number of tokens. Reported per setting: response tokens per second over
all ranks (rollout + scoring + updates), peak resident memory of each rank (ru_maxrss: the process's
peak, torch and transformers included; under FSDP it includes loading the whole models before sharding
them), its resident memory after the steps, and the bytes of model state each rank holds (parameters
and AdamW moments of the trained models, plus the frozen reference and reward model: shards under FSDP).

On CPU the ranks share this machine's cores, so 2 ranks cannot be faster than 1 here; what the table
shows is what the second rank costs and what sharding saves. Writes benchmarks/results/ranks.md.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from benchmarks.common import REPO_ROOT, demo_prompt_ids, invocation, markdown_table, report
from trainer.config import PPOSettings
from trainer.distributed import close_ranks, init_ranks
from trainer.ppo import PolicyWithValue, PPOTrainer
from trainer.ranks import rank_seed
from trainer.reward_model import RewardModel

DEMO_MODEL = REPO_ROOT / ".cache" / "demo-model"
RESULTS_MD = REPO_ROOT / "benchmarks" / "results" / "ranks.md"
SETTINGS = (("1 rank", 1, "ddp"), ("2 ranks, DDP", 2, "ddp"), ("2 ranks, FSDP", 2, "fsdp"))


def build_model(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random Qwen2 policy with the demo tokenizer in `directory`; returns its parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() for parameter in model.parameters())


def local_bytes(tensors) -> int:
    """Bytes of these tensors held by this rank: a shard's own part only."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def resident_mib() -> float:
    """This process's resident memory now, MiB (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One rank: warm-up step, timed steps; its numbers to OUT/rank-<rank>.json."""
    ranks = init_ranks("cpu", args.parallelism)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    reward_model = ranks.shard_model(RewardModel.from_pretrained(args.model_dir))
    models = PolicyWithValue.from_pretrained(args.model_dir)
    models.policy.generation_config.min_new_tokens = args.new_tokens  # every answer exactly new_tokens long
    settings = PPOSettings(
        prompts_per_step=args.prompts, responses_per_prompt=2, max_new_tokens=args.new_tokens, epochs=2,
        minibatch_size=args.prompts, kl_horizon=10_000,
    )  # fmt: skip
    ppo = PPOTrainer(models, tokenizer, settings, ranks=ranks)
    prompts = demo_prompt_ids(tokenizer, args.prompts, seed=0)
    seconds, tokens = [], []
    for step in range(args.steps + 1):
        torch.manual_seed(rank_seed(step, ranks.rank, 0))
        started = time.perf_counter()
        rollout = ppo.rollout(prompts)
        torch.manual_seed(rank_seed(step, ranks.rank, 1))
        ppo.ppo_step(rollout, reward_model)
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        answered = torch.tensor([sum(map(len, rollout.response_token_ids))], dtype=torch.float64)
        if ranks.distributed:
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(answered)
        if step:  # the first is the warm-up
            seconds.append(elapsed.item())
            tokens.append(answered.item())
    trained = [*models.policy.parameters(), *models.critic.parameters()]
    moments = [
        tensor
        for optimizer in (ppo.policy_optimizer, ppo.critic_optimizer)
        for state in optimizer.state.values()
        for tensor in state.values()
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0
    ]
    frozen = [*models.reference.parameters(), *reward_model.parameters()]
    result = {
        "rank": ranks.rank,
        "seconds": seconds,
        "tokens": tokens,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_mib": resident_mib(),
        "model_state_mib": (local_bytes(trained) + local_bytes(moments) + local_bytes(frozen)) / 2**20,
        "wrapper": type(ppo.trainable).__name__,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank-{ranks.rank}.json").write_text(json.dumps(result))
    close_ranks(ranks)


def launch(model_dir: Path, out_dir: Path, ranks: int, parallelism: str, args: argparse.Namespace) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "benchmarks.ranks", "--worker", "--model-dir", str(model_dir), "--out-dir", str(out_dir),
        "--parallelism", parallelism, "--steps", str(args.steps), "--prompts", str(args.prompts),
        "--new-tokens", str(args.new_tokens),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(command, cwd=REPO_ROOT, env=environment, check=True, capture_output=True)
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in range(ranks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parallelism", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per PPO step (2 answers each)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps after one warm-up")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ranks-bench-") as scratch:
        model_dir = Path(scratch) / "model"
        parameters = build_model(model_dir, args.hidden, args.layers, args.vocab)
        results = {}
        for name, ranks, parallelism in SETTINGS:
            results[name] = launch(
                model_dir, Path(scratch) / name.replace(" ", "_").replace(",", ""), ranks, parallelism, args
            )
    load_after = os.getloadavg()[0]

    rows = []
    baseline = None
    for name, reports in results.items():
        # Tokens are summed over ranks and seconds are the slowest rank's, step by step, on every rank.
        tokens_per_second = statistics.median(t / s for t, s in zip(reports[0]["tokens"], reports[0]["seconds"]))
        baseline = baseline or tokens_per_second
        rows.append(
            [
                name,
                reports[0]["wrapper"],
                f"{tokens_per_second:.0f}",
                f"{tokens_per_second / baseline:.2f}×",
                " / ".join(f"{r['peak_rss_mib']:.0f}" for r in reports),
                " / ".join(f"{r['rss_after_mib']:.0f}" for r in reports),
                " / ".join(f"{r['model_state_mib']:.0f}" for r in reports),
            ]
        )
    lines = [
        f"`{invocation('benchmarks.ranks', argv)}`",
        "",
        f"Random Qwen2, {parameters / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{args.vocab}, float32); per PPO step {args.prompts} prompts × 2 answers × {args.new_tokens} tokens over all "
        f"ranks, 2 epochs, one optimizer step per epoch; 1 warm-up step, median of {args.steps} timed. One torch "
        f"thread per rank, gloo. Python {platform.python_version()}, torch {torch.__version__}; {os.cpu_count()} "
        f"CPUs; 1-minute load {load_before:.2f} before, {load_after:.2f} after.",
        "",
        *markdown_table(
            [
                "setting",
                "wrapper",
                "tokens/s (all ranks)",
                "vs 1 rank",
                "peak RSS MiB per rank",
                "RSS after MiB",
                "model state MiB per rank",
            ],
            rows,
        ),
    ]
    report(lines, RESULTS_MD, write=not args.no_write)


if __name__ == "__main__":
    main()
