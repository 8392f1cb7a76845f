"""Rollout generation for PPO: transformers generate (`trainer.ppo.TransformersSampler`) against vLLM's offline `LLM`.

"Rollouts may use the vLLM engine or transformers generate. Measure, and choose." Both samplers answer the same
demo prompts (rendered with the chat template) with the same sampling: temperature 1, no top-k, top-p 1, and
exactly `new_tokens` tokens per answer (end-of-sequence suppressed: `min_new_tokens` for transformers,
`min_tokens` for vLLM), so their token counts are equal.

The trainer's policy changes every PPO step, and transformers samples from it directly, while vLLM holds its own
copy of the weights. So every vLLM round first pays the weight sync a trainer would pay: the policy is nudged (a
stand-in for an update), `save_pretrained` to a temporary directory, then
the server's reload (`flywheel.vllm_worker`: vLLM's `reload_weights`, then the tied LM head re-packed) and a prefix
cache reset, checked by comparing a weight checksum read back from vLLM's worker. The sync cost does not depend on
the batch; it is reported beside each row.

    .venv/bin/python -m benchmarks.rollouts [--model DIR] [--batch 16 64] [--new-tokens 16 32] [--rounds 5] [--threads N]

vLLM runs on CPU with enforce_eager, float32, a 256 MiB KV cache and max_model_len 512 (as the tests' engine).
Each (batch, new tokens) pair gets one warm-up of each sampler, then `rounds` rounds alternating which goes first;
numbers are medians over rounds. Prints a markdown table and writes it, with the command and the machine's load,
to benchmarks/results/rollouts.md.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from benchmarks.common import demo_prompt_ids, invocation, markdown_table, report
from trainer.ppo import TransformersSampler, end_of_sequence_ids
from trainer.reward_model import load_without_dropout

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "demo-model"
RESULTS_MD = REPO_ROOT / "benchmarks" / "results" / "rollouts.md"
KV_CACHE_BYTES = 256 << 20
UPDATE_SCALE = 1e-3
"""Relative size of the noise that stands in for a PPO update between rounds."""


@dataclass(frozen=True)
class Round:
    """One round of one (batch, new tokens) pair: each sampler's generation time, and vLLM's weight sync."""

    batch: int
    new_tokens: int
    transformers_seconds: float
    vllm_seconds: float
    transformers_cpu_seconds: float
    """CPU time of this process while transformers generated."""
    vllm_cpu_seconds: float
    """CPU time of this process (vLLM's client) and of vLLM's engine-core and worker processes while vLLM generated."""
    save_seconds: float
    """`save_pretrained` of the policy to a temporary directory."""
    reload_seconds: float
    """`reload_weights` from that directory into the running engine."""
    response_tokens: int

    @property
    def sync_seconds(self) -> float:
        return self.save_seconds + self.reload_seconds


def cpu_seconds() -> float:
    """User + system CPU time so far of this process and its children (vLLM's engine-core and worker processes).

    Unlike wall time it hardly moves when other work shares the machine; it does count threads spinning at a barrier.
    """
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@torch.no_grad()
def nudge(policy: PreTrainedModel, generator: torch.Generator) -> None:
    """Change every weight a little, as a PPO update would, so each sync moves new values."""
    for parameter in policy.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * UPDATE_SCALE * parameter.abs().mean())


def embedding_checksums(worker) -> tuple[float, float]:
    """Runs inside vLLM's worker: the sums of the input embeddings and of the LM head it holds now.

    The demo model ties the two; vLLM's reload logs "ParallelLMHead: Failed to load weights" because the checkpoint
    has no separate head, so the head is checked too.
    """
    model = worker.model_runner.model
    return float(model.model.embed_tokens.weight.double().sum()), float(model.lm_head.weight.double().sum())


class VLLMSampler:
    """vLLM's offline engine as a PPO rollout sampler, with the weight sync the trainer would need."""

    def __init__(self, model: Path, seed: int):
        # check_weights sends a function to the worker; vLLM pickles one only when allowed.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        self.llm = LLM(
            model=str(model),
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            max_model_len=512,
            seed=seed,
            # The server's reload: on CPU vLLM's own left a tied LM head on the start-up weights.
            worker_extension_cls="flywheel.vllm_worker.PolicyWorkerExtension",
        )

    def sample(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=new_tokens, min_tokens=new_tokens)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def sync(self, policy: PreTrainedModel, directory: Path) -> tuple[float, float]:
        """Write the policy and load it into the engine; returns (save seconds, reload seconds)."""
        started = time.perf_counter()
        policy.save_pretrained(directory)
        saved = time.perf_counter()
        self.llm.collective_rpc("reload_policy_weights", kwargs={"weights_path": str(directory)})
        self.llm.reset_prefix_cache()  # blocks cached by the old weights must not answer for the new
        return saved - started, time.perf_counter() - saved

    @torch.no_grad()
    def check_weights(self, policy: PreTrainedModel) -> None:
        """Raise unless the engine holds the policy's current input embeddings and LM head."""
        (held,) = self.llm.collective_rpc(embedding_checksums)
        expected = tuple(
            float(m.weight.double().sum()) for m in (policy.get_input_embeddings(), policy.get_output_embeddings())
        )
        if any(abs(h - e) > 1e-6 * max(1.0, abs(e)) for h, e in zip(held, expected)):
            raise RuntimeError(
                f"vLLM's (embeddings, LM head) sum to {held} after the reload, the policy's to {expected}"
            )


def run_pair(
    batch: int,
    new_tokens: int,
    rounds: int,
    prompts: list[list[int]],
    hf: TransformersSampler,
    engine: VLLMSampler,
    weights_dir: Path,
    generator: torch.Generator,
) -> list[Round]:
    prompts = prompts[:batch]
    hf.policy.generation_config.min_new_tokens = new_tokens

    def hf_round() -> tuple[float, float, int]:
        cpu_started, started = time.process_time(), time.perf_counter()
        answers = hf(prompts, new_tokens, 1.0)
        return time.perf_counter() - started, time.process_time() - cpu_started, sum(map(len, answers))

    def vllm_round() -> tuple[float, float, float, float, int]:
        nudge(hf.policy, generator)
        save_seconds, reload_seconds = engine.sync(hf.policy, weights_dir)
        cpu_started = cpu_seconds()
        started = time.perf_counter()
        answers = engine.sample(prompts, new_tokens)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_started
        engine.check_weights(hf.policy)
        return seconds, cpu, save_seconds, reload_seconds, sum(map(len, answers))

    hf_round(), vllm_round()  # warm-up
    results = []
    for round_index in range(rounds):
        if round_index % 2 == 0:
            (hf_seconds, hf_cpu, hf_tokens), (vllm_seconds, vllm_cpu, save, reload, vllm_tokens) = (
                hf_round(),
                vllm_round(),
            )
        else:
            (vllm_seconds, vllm_cpu, save, reload, vllm_tokens), (hf_seconds, hf_cpu, hf_tokens) = (
                vllm_round(),
                hf_round(),
            )
        if hf_tokens != vllm_tokens or hf_tokens != batch * new_tokens:
            raise RuntimeError(
                f"token counts differ: transformers {hf_tokens}, vLLM {vllm_tokens}, expected {batch * new_tokens}"
            )
        results.append(Round(batch, new_tokens, hf_seconds, vllm_seconds, hf_cpu, vllm_cpu, save, reload, hf_tokens))
        print(
            f"batch {batch} × {new_tokens}: transformers {hf_seconds:.3f} s (CPU {hf_cpu:.3f}), "
            f"vLLM {vllm_seconds:.3f} s (CPU {vllm_cpu:.3f}) + sync {save + reload:.3f} s",
            file=sys.stderr,
        )
    return results


# --- report --------------------------------------------------------------------------------------------------

HEADER = [
    "batch",
    "new tokens",
    "transformers tokens/s",
    "vLLM tokens/s",
    "sync s (save + reload)",
    "vLLM incl. sync tokens/s",
    "vLLM / transformers",
    "vLLM incl. sync / transformers",
]
CPU_HEADER = ["batch", "new tokens", "transformers tokens/CPU-s", "vLLM tokens/CPU-s", "vLLM / transformers"]


def summary_row(rounds: list[Round]) -> tuple[list[str], list[str], dict[str, float]]:
    """The row of the wall-clock table, the row of the CPU table, and vLLM's ratios to transformers (medians)."""
    tokens = rounds[0].response_tokens
    hf = statistics.median(tokens / r.transformers_seconds for r in rounds)
    vllm = statistics.median(tokens / r.vllm_seconds for r in rounds)
    with_sync = statistics.median(tokens / (r.vllm_seconds + r.sync_seconds) for r in rounds)
    save = statistics.median(r.save_seconds for r in rounds)
    reload = statistics.median(r.reload_seconds for r in rounds)
    row = [
        str(rounds[0].batch),
        str(rounds[0].new_tokens),
        f"{hf:.0f}",
        f"{vllm:.0f}",
        f"{save + reload:.3f} ({save:.3f} + {reload:.3f})",
        f"{with_sync:.0f}",
        f"{vllm / hf:.2f}",
        f"{with_sync / hf:.2f}",
    ]
    hf_cpu = statistics.median(tokens / r.transformers_cpu_seconds for r in rounds)
    vllm_cpu = statistics.median(tokens / r.vllm_cpu_seconds for r in rounds)
    cpu_row = [
        str(rounds[0].batch),
        str(rounds[0].new_tokens),
        f"{hf_cpu:.0f}",
        f"{vllm_cpu:.0f}",
        f"{vllm_cpu / hf_cpu:.2f}",
    ]
    return row, cpu_row, {"generate": vllm / hf, "with_sync": with_sync / hf, "cpu": vllm_cpu / hf_cpu}


def versions() -> str:
    import transformers
    import vllm

    return (
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads in this "
        f"process), transformers {transformers.__version__}, vllm {vllm.__version__}; {len(os.sched_getaffinity(0))} CPUs"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollouts", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face causal-LM directory (default: the demo model)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="answers per rollout")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 32], help="length of every answer")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (batch, new tokens) pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of this process, so of transformers generate; 0 keeps torch's default (one per CPU). "
        "vLLM's worker ignores it and binds its own (VLLM_CPU_OMP_THREADS_BIND=auto reserves one CPU and runs the "
        "model on the rest: one thread on a 2-CPU machine)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.relative_to(REPO_ROOT)} alone"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"no model at {args.model}; build the demo model with `flywheel init-model` or pass --model DIR"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = demo_prompt_ids(tokenizer, max(args.batch), args.seed)
    policy = load_without_dropout(AutoModelForCausalLM, args.model)
    hf = TransformersSampler(
        policy,
        tokenizer.pad_token_id,
        end_of_sequence_ids(policy.generation_config.eos_token_id, tokenizer.eos_token_id),
    )
    generator = torch.Generator().manual_seed(args.seed)

    load_before = os.getloadavg()[0]
    engine = VLLMSampler(args.model, args.seed)
    rows, cpu_rows, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="flywheel-rollout-weights-") as weights_dir:
        for batch in args.batch:
            for new_tokens in args.new_tokens:
                row, cpu_row, ratio = summary_row(
                    run_pair(batch, new_tokens, args.rounds, prompts, hf, engine, Path(weights_dir), generator)
                )
                rows.append(row)
                cpu_rows.append(cpu_row)
                ratios.append(ratio)
    load_after = os.getloadavg()[0]
    engine.llm.llm_engine.engine_core.shutdown()

    command = invocation("benchmarks.rollouts", argv)
    lines = [
        "## Rollouts: transformers generate vs vLLM",
        "",
        f"`{command}`",
        "",
        f"Model `{args.model.name}`; temperature 1, no top-k, top-p 1, end-of-sequence suppressed so every answer has "
        f"exactly `new tokens` tokens; vLLM on CPU, enforce_eager, float32, {KV_CACHE_BYTES >> 20} MiB KV cache, "
        f"max_model_len 512. One warm-up, then {args.rounds} rounds per row, alternating which sampler goes first; "
        f'medians over rounds. Sync is `save_pretrained` + `collective_rpc("reload_weights")`, paid once per PPO step. '
        f"{versions()}. 1-minute load average {load_before:.2f} before, {load_after:.2f} after.",
        "",
        *markdown_table(HEADER, rows),
        "",
        f"vLLM / transformers: {min(r['generate'] for r in ratios):.2f}–{max(r['generate'] for r in ratios):.2f}× "
        f"generating alone, {min(r['with_sync'] for r in ratios):.2f}–{max(r['with_sync'] for r in ratios):.2f}× with the weight sync.",
        "",
        "CPU time while generating (user + system; for vLLM this process plus its engine-core and worker processes), "
        "which hardly moves when other work shares the machine:",
        "",
        *markdown_table(CPU_HEADER, cpu_rows),
        "",
        f"vLLM / transformers in tokens per CPU-second: {min(r['cpu'] for r in ratios):.2f}–{max(r['cpu'] for r in ratios):.2f}×.",
        "",
    ]
    report(lines, RESULTS_MD, write=not args.no_write)


if __name__ == "__main__":
    main()
