"""A readable live view of the trainer for a terminal (logs carry the same facts elsewhere)."""

import math
import sys
from contextlib import AbstractContextManager, nullcontext

from rich.console import Console
from rich.live import Live
from rich.table import Table

from trainer.checkpoint import TrainerState
from trainer.ppo import PPOStepStats


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def progress_table(
    state: TrainerState, events_consumed: int, last_step: PPOStepStats | None, reward_model_eval: dict[str, float]
) -> Table:
    table = Table(title="flywheel train", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("events consumed", f"{events_consumed:,}")
    table.add_row("labels trained on", f"{state.labels_trained:,} in {state.reward_model_updates} reward-model updates")
    table.add_row(
        "reward model (held out)",
        f"pairwise accuracy {_number(reward_model_eval.get('pairwise_accuracy'), 2)}, "
        f"calibration error {_number(reward_model_eval.get('ece'), 3)}",
    )
    table.add_row("PPO steps", f"{state.ppo_steps}; last candidate v{state.last_candidate_version or '–'}")
    if last_step is not None:
        table.add_row(
            "last step",
            f"score {_number(last_step.mean_score)}, reward {_number(last_step.mean_reward)}, "
            f"KL {_number(last_step.kl_to_reference)} (β {_number(last_step.kl_coef, 4)}), "
            f"clip {_number(last_step.clip_fraction, 2)}, {last_step.tokens_per_second:.0f} tokens/s",
        )
    return table


def live_display() -> AbstractContextManager[Live | None]:
    """A rich Live display on a terminal; nothing when output goes to a file."""
    if not sys.stderr.isatty():
        return nullcontext()
    return Live(console=Console(stderr=True), refresh_per_second=2, transient=False)
