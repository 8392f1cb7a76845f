"""One atomic checkpoint of everything the trainer learnt: policy, critic, reward model, optimizers,
KL controller, join store and counters.

A checkpoint is written into a temporary directory, fsync'd, renamed into place and then named
in `LATEST` (replaced atomically), so a crash at any moment leaves the previous checkpoint or the
new one, never half of one. Kafka offsets are committed only after `save` returns.
"""

import json
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


class TrainerState(BaseModel):
    """The trainer's counters; everything else in a checkpoint is weights and optimizer moments."""

    reference_path: str
    """The policy the KL penalty is taken against: the live policy when training first started."""
    reference_version: int
    ppo_steps: int = 0
    reward_model_updates: int = 0
    labels_trained: int = 0
    """Standing thumbs and preference pairs the reward model has trained on."""
    generations_at_last_step: int = 0
    """Logged answers the PPO steps so far have accounted for, `prompts_per_step` each."""
    last_candidate_version: int | None = None
    restarted_after_version: int = 0
    """The policy last restarted from the live one when this was the registry's newest version:
    only the gate's verdicts on later candidates count toward the next restart."""
    kl_coef: float | None = None


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
    checkpoint_dir: Path, state: TrainerState, ppo: PPOTrainer, reward_model: RewardModelTrainer, join_store: JoinStore
) -> Path:
    """Write a complete checkpoint and make it the latest; all but it and the one before are removed.

    The one before stays so that a reader who found it just before this save (the gate loading
    the reward model) can finish. Returns the new checkpoint's directory.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(checkpoint_dir)
    name = f"step-{state.ppo_steps:08d}-rm-{state.reward_model_updates:06d}-{uuid.uuid4().hex[:6]}"
    staging = checkpoint_dir / f".tmp-{name}"
    staging.mkdir()
    ppo.save_policy(staging / "policy")
    ppo.models.critic.save(staging / VALUE_HEAD_FILE)
    reward_model.save(staging / "reward_model")
    torch.save(
        {"policy": ppo.policy_optimizer.state_dict(), "critic": ppo.critic_optimizer.state_dict()},
        staging / PPO_OPTIMIZERS_FILE,
    )
    state = state.model_copy(update={"kl_coef": ppo.kl_controller.kl_coef})
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=2))
    join_store.snapshot_to(staging / JOIN_STORE_FILE)
    _fsync_tree(staging)
    final = checkpoint_dir / name
    staging.rename(final)
    write_atomically(checkpoint_dir / LATEST, name.encode())
    kept = {name} | ({previous.name} if previous is not None else set())
    for old in checkpoint_dir.iterdir():
        if old.is_dir() and old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: Path) -> TrainerState:
    return TrainerState.model_validate(json.loads((checkpoint / STATE_FILE).read_text()))


def restore_optimizers(checkpoint: Path, ppo: PPOTrainer, state: TrainerState) -> None:
    optimizers = torch.load(checkpoint / PPO_OPTIMIZERS_FILE, weights_only=True)
    ppo.policy_optimizer.load_state_dict(optimizers["policy"])
    ppo.critic_optimizer.load_state_dict(optimizers["critic"])
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
