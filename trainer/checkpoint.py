"""One atomic checkpoint of everything the trainer learnt: policy, critic, reward model, optimizers,
KL controller, join store and counters.

A checkpoint is written into a temporary directory, fsync'd, renamed into place and then named
in `LATEST` (replaced atomically), so a crash at any moment leaves the previous checkpoint or the
new one, never half of one. Kafka offsets are committed only after `save` returns.

What a checkpoint holds, for the demo model after 3,000 feedback events: the policy, its value
head and their AdamW moments 49%, the reward model and its moments 48%, the join store 2.5%. A
reward model no update changed since the latest checkpoint is hard-linked from it, not written again.
"""

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from pydantic import BaseModel

from flywheel.durable import fsync_path, write_atomically
from trainer.join_store import JoinStore
from trainer.ppo import PPOTrainer
from trainer.reward_model import RewardModelTrainer

LATEST = "LATEST"
STATE_FILE = "state.json"
PPO_OPTIMIZERS_FILE = "ppo_optimizers.pt"
JOIN_STORE_FILE = "join_store.sqlite3"
VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_MODEL_DIR = "reward_model"

log = logging.getLogger(__name__)


class TrainerState(BaseModel):
    """The trainer's counters; everything else in a checkpoint is weights and optimizer moments."""

    reference_path: str
    """The live policy when training first started: the gate's KL reference, and the base an adapter applies to."""
    reference_version: int
    ppo_steps: int = 0
    reward_model_updates: int = 0
    labels_trained: int = 0
    """Standing thumbs and preference pairs the reward model has trained on."""
    generations_at_last_step: int = 0
    """Logged answers the PPO steps so far have accounted for, `prompts_per_step` each, less those the
    join store has expired since: the store's answers minus this are the answers owed a step."""
    last_candidate_version: int | None = None
    restarted_after_version: int = 0
    """The policy last restarted from the live one when this was the registry's newest version:
    only the gate's verdicts on later candidates count toward the next restart."""
    kl_coef: float | None = None
    following_live_version: int | None = None
    """The live version the policy is trained on from: the one it (re)started from, or its own candidate
    the gate approved. Live moving anywhere else (a rollback, an operator) restarts the policy from it."""
    anchor_version: int | None = None
    """The registry version the KL penalty holds the policy near: the live one the policy follows. None: the
    reference (where training began)."""
    withheld_in_a_row: int = 0
    """Candidates the pre-check withheld as drifted since the last one it let through or the last restart."""


def _fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory`, deepest first, then the directory itself."""
    for path in sorted(directory.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(directory)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    pointer = checkpoint_dir / LATEST
    if not pointer.exists():
        return None
    return checkpoint_dir / pointer.read_text().strip()


def save_checkpoint(
    checkpoint_dir: Path,
    state: TrainerState,
    ppo: PPOTrainer,
    reward_model: RewardModelTrainer,
    join_store: JoinStore | None,
    keep: int = 2,
) -> Path | None:
    """Write a complete checkpoint and make it the latest; only the newest `keep` (at least 2) stay.

    The one before stays so that a reader who found it just before this save (a backup, an
    operator) can finish. Returns the new checkpoint's directory.

    Under several ranks every rank calls this (sharded weights are gathered to rank 0 here); only
    rank 0, which holds the join store, writes, and the others get None.
    """
    if keep < 2:
        raise ValueError(
            f"keep={keep}: keep at least 2 checkpoints, the latest and the one a reader may still be reading"
        )
    leads = ppo.ranks.leads
    name = f"step-{state.ppo_steps:08d}-rm-{state.reward_model_updates:06d}-{uuid.uuid4().hex[:6]}"
    staging = checkpoint_dir / f".tmp-{name}"
    previous = latest_checkpoint(checkpoint_dir) if leads else None
    if leads:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    ppo.save_policy(staging / "policy")
    ppo.save_critic(staging / VALUE_HEAD_FILE)
    # Sharded, saving is a collective every rank must join: no rank may decide alone to skip it.
    if not ppo.ranks.sharded and previous is not None and reward_model_unchanged_since(previous, state):
        link_tree(previous / REWARD_MODEL_DIR, staging / REWARD_MODEL_DIR)
    else:
        reward_model.save(staging / REWARD_MODEL_DIR)
    optimizer_states = ppo.optimizer_states()
    if not leads:
        return None
    torch.save(optimizer_states, staging / PPO_OPTIMIZERS_FILE)
    state = state.model_copy(update={"kl_coef": ppo.kl_controller.kl_coef})
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=2))
    join_store.snapshot_to(staging / JOIN_STORE_FILE)
    _fsync_tree(staging)
    final = checkpoint_dir / name
    staging.rename(final)
    write_atomically(checkpoint_dir / LATEST, name.encode())
    for old in checkpoints_to_remove(checkpoint_dir, keep):
        shutil.rmtree(old, ignore_errors=True)
    return final


def reward_model_unchanged_since(checkpoint: Path, state: TrainerState) -> bool:
    """Whether `checkpoint` holds the reward model the trainer has now: no update since it was written.

    The trainer's reward model changes only in an update, which counts itself in reward_model_updates,
    and it resumes from the latest checkpoint's; so the same count means the same weights and moments.
    """
    try:
        saved = load_state(checkpoint)
    except (OSError, ValueError):
        return False
    return saved.reward_model_updates == state.reward_model_updates and (checkpoint / REWARD_MODEL_DIR).is_dir()


def link_tree(source: Path, target: Path) -> None:
    """Make `target` a copy of the flat directory `source` whose files are hard links (copies where links fail).

    Safe because no checkpoint file is ever written in place: every save writes new files.
    """
    target.mkdir()
    for file in source.iterdir():
        try:
            os.link(file, target / file.name)
        except OSError as error:  # a filesystem without hard links
            log.debug("copying %s instead of linking it: %s", file, error)
            shutil.copy2(file, target / file.name)


def checkpoints_to_remove(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Every directory in checkpoint_dir but the latest and the newest others, `keep` in all.

    Newest by the time state.json was written; a directory without one (a save a crash cut
    short) is removed. The one LATEST names is always kept.
    """
    latest = latest_checkpoint(checkpoint_dir)
    complete, incomplete = [], []
    for directory in checkpoint_dir.iterdir():
        if not directory.is_dir() or directory == latest:
            continue
        try:
            complete.append(((directory / STATE_FILE).stat().st_mtime_ns, directory.name, directory))
        except FileNotFoundError:
            incomplete.append(directory)
    newest_first = [directory for *_, directory in sorted(complete, reverse=True)]
    kept_others = keep - 1 if latest is not None else keep
    return newest_first[kept_others:] + incomplete


def load_state(checkpoint: Path) -> TrainerState:
    return TrainerState.model_validate(json.loads((checkpoint / STATE_FILE).read_text()))


def restore_optimizers(checkpoint: Path, ppo: PPOTrainer, state: TrainerState) -> None:
    ppo.load_optimizer_states(torch.load(checkpoint / PPO_OPTIMIZERS_FILE, weights_only=True))
    if state.kl_coef is not None:
        ppo.kl_controller.kl_coef = state.kl_coef


def remove_join_store(join_store_path: Path) -> None:
    """Delete a working SQLite join store with its write-ahead log."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{join_store_path}{suffix}").unlink(missing_ok=True)


def restore_join_store(checkpoint: Path, join_store_path: Path) -> None:
    """Put the checkpoint's join store in place of the working one (which may be ahead of it)."""
    join_store_path.parent.mkdir(parents=True, exist_ok=True)
    remove_join_store(join_store_path)
    shutil.copyfile(checkpoint / JOIN_STORE_FILE, join_store_path)
