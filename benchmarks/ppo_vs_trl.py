"""PPO step throughput: Flywheel's `trainer.ppo.PPOTrainer` against TRL's `trl.experimental.ppo.PPOTrainer`.

Both trainers take whole PPO steps on the same small policy, in the same process, from the same prompts:
sample `answers` responses of exactly `new_tokens` tokens (end-of-sequence is suppressed with the policy's
`generation_config.min_new_tokens`, so every answer has the same length on both sides), score them with a
reward model built from the same policy and each trainer's critic (TRL: a separate value model; Flywheel: a value
head on the policy's features), then take `epochs` passes of clipped updates in minibatches of `minibatch` answers. Throughput is response tokens per second of the whole step: rollout
generation + scoring + the update epochs.

TRL 1.12.0 is the last release with `trl.experimental.ppo`, and the project's venv does not carry TRL, so this
benchmark runs in its own venv (gitignored), created once from the repository root:

    python3.11 -m venv benchmarks/.venv-trl && benchmarks/.venv-trl/bin/pip install torch==2.13.0 && benchmarks/.venv-trl/bin/pip install trl==1.12.0 transformers==5.19.0 scipy protobuf && benchmarks/.venv-trl/bin/pip install --no-deps -e .

(`trl==1.12.0` brings accelerate and datasets; transformers is pinned to the project venv's version, and scipy
and protobuf are what `trainer.ppo`'s imports need beside them.) Then:

    benchmarks/.venv-trl/bin/python -m benchmarks.ppo_vs_trl [--model DIR] [--answers 16] [--new-tokens 16] [--epochs 4] [--minibatch 8] [--rounds 5] [--threads N]

Each trainer takes one warm-up step, then `rounds` timed steps, alternating which goes first. TRL runs with
what matches Flywheel: float32 (its config defaults to bf16), no gradient checkpointing (its default is on), one
optimizer step per minibatch (per_device_train_batch_size = answers, num_mini_batches = answers / minibatch),
a constant learning rate. Each TRL step is one `train()` call of one update (TRL has no public step method); the
time is the whole call, so it includes TRL's per-step `gc.collect()`.

Prints a markdown table and writes it, with the command and the machine's load, to
benchmarks/results/ppo_vs_trl.md.
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

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from benchmarks.common import demo_prompt_ids, invocation, markdown_table, report
from trainer.config import PPOSettings
from trainer.ppo import PolicyWithValue, PPOTrainer
from trainer.reward_model import RewardModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "demo-model"
RESULTS_MD = REPO_ROOT / "benchmarks" / "results" / "ppo_vs_trl.md"
TRAINERS = ("Flywheel", "TRL")


@dataclass(frozen=True)
class Workload:
    """One PPO step, the same for both trainers."""

    answers: int
    """Rollout batch: one answer per prompt."""
    new_tokens: int
    """Every answer's length: end-of-sequence is suppressed until then."""
    epochs: int
    minibatch: int
    """Answers per optimizer step."""


@dataclass(frozen=True)
class StepTime:
    trainer: str
    seconds: float
    cpu_seconds: float
    """User + system CPU time of this process over the step: unlike wall time, it hardly moves when other work
    shares the machine (with one torch thread; more threads also count the time they spin waiting)."""
    response_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.response_tokens / self.cpu_seconds


def timed(trainer: str, step) -> StepTime:
    """Run `step()`, which returns its response token count, and time it in wall and CPU seconds."""
    cpu_started, started = time.process_time(), time.perf_counter()
    response_tokens = step()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return StepTime(trainer, seconds, cpu_seconds, response_tokens)


# --- Flywheel ------------------------------------------------------------------------------------------------


class FlywheelSteps:
    """Flywheel's trainer as the loop uses it: `rollout` then `ppo_step` with the reward model as scorer."""

    def __init__(self, model: Path, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], workload: Workload):
        self.prompts = prompts
        self.reward_model = RewardModel.from_pretrained(model)
        models = PolicyWithValue.from_pretrained(model)
        models.policy.generation_config.min_new_tokens = workload.new_tokens
        settings = PPOSettings(
            prompts_per_step=len(prompts),
            responses_per_prompt=1,
            max_new_tokens=workload.new_tokens,
            temperature=1.0,
            epochs=workload.epochs,
            minibatch_size=workload.minibatch,
        )
        self.trainer = PPOTrainer(models, tokenizer, settings)

    def step(self) -> StepTime:
        def one_step() -> int:
            rollout = self.trainer.rollout(self.prompts)
            self.trainer.ppo_step(rollout, self.reward_model)
            return sum(map(len, rollout.response_token_ids))

        return timed("Flywheel", one_step)


# --- TRL -----------------------------------------------------------------------------------------------------


class TRLSteps:
    """TRL's experimental PPOTrainer, one update per `train()` call, on the same prompts and shapes."""

    def __init__(
        self,
        model: Path,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[list[int]],
        workload: Workload,
        output_dir: str,
    ):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl.experimental.ppo import PPOConfig
        from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

        class EndOfSequenceCount(TrainerCallback):
            """Keeps TRL's count of end-of-sequence tokens in the last step's responses (0 when suppressed)."""

            last = None

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "val/num_eos_tokens" in logs:
                    self.last = logs["val/num_eos_tokens"]

        self.workload = workload
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        value_model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
        reward_model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
        config = PPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=workload.answers,
            gradient_accumulation_steps=1,
            num_mini_batches=workload.answers // workload.minibatch,
            num_ppo_epochs=workload.epochs,
            total_episodes=workload.answers,  # one update per train() call
            local_rollout_forward_batch_size=workload.answers,
            response_length=workload.new_tokens,
            stop_token="eos",
            temperature=1.0,
            missing_eos_penalty=1.0,
            kl_coef=0.05,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            bf16=False,
            gradient_checkpointing=False,
            num_sample_generations=0,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        )
        # Left padding, as TRL's examples use: every answer then starts at the same column.
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        dataset = Dataset.from_dict({"input_ids": prompts})
        self.trainer = TRLPPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward_model,
            train_dataset=dataset,
            value_model=value_model,
            eval_dataset=dataset,
        )
        self.trainer.remove_callback(PrinterCallback)
        self.trainer.remove_callback(ProgressCallback)
        self.end_of_sequence_count = EndOfSequenceCount()
        self.trainer.add_callback(self.end_of_sequence_count)
        # After the trainer set the policy's eos_token_id to the stop token: suppress it the same way as Flywheel.
        policy.generation_config.min_new_tokens = workload.new_tokens

    def step(self) -> StepTime:
        def one_step() -> int:
            self.trainer.train()
            return self.workload.answers * self.workload.new_tokens

        step_time = timed("TRL", one_step)
        if self.end_of_sequence_count.last != 0:
            raise RuntimeError(
                f"TRL's responses held {self.end_of_sequence_count.last} end-of-sequence tokens; they were meant to be "
                "suppressed, so the response token count would be wrong"
            )
        return step_time


# --- report --------------------------------------------------------------------------------------------------


HEADER = [
    "trainer",
    "timed steps",
    "response tokens/step",
    "s/step",
    "tokens/s",
    "tokens/s range",
    "CPU s/step",
    "tokens/CPU-s",
    "tokens/CPU-s range",
]


def summary_rows(times: list[StepTime]) -> tuple[list[list[str]], dict[str, tuple[float, float]]]:
    """One row per trainer (medians over its timed steps), and its (tokens/s, tokens/CPU-s) medians."""
    rows, medians = [], {}
    for trainer in TRAINERS:
        mine = [t for t in times if t.trainer == trainer]
        rates = [t.tokens_per_second for t in mine]
        cpu_rates = [t.tokens_per_cpu_second for t in mine]
        medians[trainer] = (statistics.median(rates), statistics.median(cpu_rates))
        rows.append(
            [
                trainer,
                str(len(mine)),
                str(mine[0].response_tokens),
                f"{statistics.median(t.seconds for t in mine):.3f}",
                f"{medians[trainer][0]:.0f}",
                f"{min(rates):.0f}–{max(rates):.0f}",
                f"{statistics.median(t.cpu_seconds for t in mine):.3f}",
                f"{medians[trainer][1]:.0f}",
                f"{min(cpu_rates):.0f}–{max(cpu_rates):.0f}",
            ]
        )
    return rows, medians


def versions() -> str:
    import accelerate
    import datasets
    import transformers
    import trl

    return (
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, trl {trl.__version__}, accelerate {accelerate.__version__}, "
        f"datasets {datasets.__version__}; {len(os.sched_getaffinity(0))} CPUs"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ppo_vs_trl", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face causal-LM directory (default: the demo model)"
    )
    parser.add_argument("--answers", type=int, default=16, help="answers per PPO step (one per prompt)")
    parser.add_argument("--new-tokens", type=int, default=16, help="length of every answer")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=8, help="answers per optimizer step; must divide --answers")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each trainer, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both trainers; 0 keeps torch's default (one per CPU). On a CPU shared with other "
        "work, 1 avoids threads spinning at each other's barriers",
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.relative_to(REPO_ROOT)} alone"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.answers % args.minibatch:
        raise SystemExit(
            f"--minibatch {args.minibatch} must divide --answers {args.answers} (TRL splits the batch exactly)"
        )
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"no model at {args.model}; build the demo model with `flywheel init-model` or pass --model DIR"
        )
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    transformers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workload = Workload(args.answers, args.new_tokens, args.epochs, args.minibatch)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = demo_prompt_ids(tokenizer, args.answers, args.seed)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="flywheel-trl-") as output_dir:
        steppers = {"Flywheel": FlywheelSteps(args.model, tokenizer, prompts, workload)}
        steppers["TRL"] = TRLSteps(args.model, tokenizer, prompts, workload, output_dir)
        for stepper in steppers.values():
            stepper.step()  # warm-up
        times = []
        for round_index in range(args.rounds):
            order = TRAINERS if round_index % 2 == 0 else TRAINERS[::-1]
            for trainer in order:
                times.append(steppers[trainer].step())
                print(
                    f"round {round_index}: {trainer} {times[-1].seconds:.3f} s, CPU {times[-1].cpu_seconds:.3f} s",
                    file=sys.stderr,
                )
    load_after = os.getloadavg()[0]

    rows, medians = summary_rows(times)
    command = invocation("benchmarks.ppo_vs_trl", argv)
    lines = [
        "## PPO step throughput: Flywheel vs TRL",
        "",
        f"`{command}`",
        "",
        f"Model `{args.model.name}`; {workload.answers} answers × {workload.new_tokens} new tokens (end-of-sequence suppressed), "
        f"{workload.epochs} epochs, minibatch {workload.minibatch}, temperature 1; one warm-up step each, then "
        f"{args.rounds} timed steps each, alternating; medians over steps. CPU s is this process's user + system "
        f"time over the step. {versions()}. 1-minute load average {load_before:.2f} before, "
        f"{load_after:.2f} after.",
        "",
        *markdown_table(HEADER, rows),
        "",
        f"Flywheel / TRL: **{medians['Flywheel'][0] / medians['TRL'][0]:.2f}×** in tokens/s, "
        f"**{medians['Flywheel'][1] / medians['TRL'][1]:.2f}×** in tokens per CPU-second (medians).",
        "",
    ]
    report(lines, RESULTS_MD, write=not args.no_write)


if __name__ == "__main__":
    main()
