"""`flywheel train` on several ranks: rank 0 leads, the others follow its orders.

Rank 0 alone reads Kafka, holds the join store, decides what is due, writes checkpoints and the
registry, and commits offsets. Each time it is about to touch the models it first broadcasts an
order saying what, with every input the work needs (labels, prompts, seeds); then every rank,
rank 0 included, runs the same call on those inputs. So the ranks run the same collectives in the
same order, and hold no state of their own that a restart could lose: everything durable is in
rank 0's checkpoint, which every rank resumes from.

Rank 0 also broadcasts `Idle` once per pass of its loop while nothing is due, so that the others
never wait on it longer than one pass (the process group's timeout would end the job).
"""

from dataclasses import dataclass

from trainer.join_store import LabelledExample, PreferencePair


@dataclass(frozen=True)
class Idle:
    """Nothing to do this pass."""


@dataclass(frozen=True)
class Stop:
    """Rank 0 has written its last checkpoint: leave the process group and exit."""


@dataclass(frozen=True)
class UpdateRewardModel:
    """One reward-model update on these labels; every rank takes the same update."""

    examples: list[LabelledExample]
    pairs: list[PreferencePair]
    seed: int
    """Seeds the shuffle, the same on every rank."""
    evaluate: bool
    """Evaluate on the held-out labels after it: only the last of the updates due at once does."""
    heldout_examples: list[LabelledExample] | None = None
    heldout_pairs: list[PreferencePair] | None = None
    """The held-out labels to evaluate on, sent only when the model is sharded (evaluating is then a
    collective); otherwise rank 0 evaluates alone."""


@dataclass(frozen=True)
class TakePPOStep:
    """One PPO step on these prompts: each rank samples and trains on its share."""

    prompts: list[list[int]]
    seed: int


@dataclass(frozen=True)
class RestartPolicy:
    """Load the policy from this registry directory and forget its optimizer moments."""

    policy_path: str


@dataclass(frozen=True)
class AnchorPolicy:
    """Make the policy at this registry directory the reference the KL penalty holds the policy near;
    an empty path: the reference the trainer started with."""

    policy_path: str


@dataclass(frozen=True)
class SaveCandidate:
    """Gather the policy and reward model for a candidate rank 0 writes into the registry."""


@dataclass(frozen=True)
class SaveCheckpoint:
    """Gather everything a checkpoint holds; rank 0 writes it."""


Order = Idle | Stop | UpdateRewardModel | TakePPOStep | RestartPolicy | AnchorPolicy | SaveCandidate | SaveCheckpoint


def rank_seed(seed: int, rank: int, phase: int) -> int:
    """A seed per step, rank and phase (0: sampling, 1: the updates' shuffles): ranks draw different answers,
    and a step taken again after a restart draws the same ones."""
    return (seed * 1_000 + rank) * 2 + phase
