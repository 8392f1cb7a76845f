"""Trainer checkpoints on disk: only the newest few stay, and an unchanged reward model is linked, not written again.

Real checkpoints of the demo model (CPU, no engine, no broker).
"""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trainer.checkpoint import LATEST, REWARD_MODEL_DIR, TrainerState, latest_checkpoint, load_state, save_checkpoint
from trainer.config import PPOSettings, RewardModelSettings
from trainer.join_store import JoinStore
from trainer.ppo import PolicyWithValue, PPOTrainer
from trainer.reward_model import RewardModel, RewardModelTrainer


@pytest.fixture(scope="module")
def learner(model_path, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reward_model = RewardModelTrainer(
        RewardModel.from_pretrained(model_path), RewardModelSettings(), tokenizer.pad_token_id
    )
    ppo = PPOTrainer(PolicyWithValue.from_pretrained(model_path), tokenizer, PPOSettings())
    join_store = JoinStore(tmp_path_factory.mktemp("store") / "join_store.sqlite3", 3600)
    yield ppo, reward_model, join_store, tokenizer.pad_token_id
    join_store.close()


def inode(path: Path) -> int:
    return path.stat().st_ino


def disk_bytes(directory: Path) -> int:
    """Bytes of the distinct files under `directory`: a hard-linked file counts once."""
    sizes = {path.stat().st_ino: path.stat().st_size for path in directory.rglob("*") if path.is_file()}
    return sum(sizes.values())


def test_the_newest_checkpoints_stay_and_an_unchanged_reward_model_is_linked(learner, model_path, tmp_path):
    ppo, reward_model, join_store, pad_token_id = learner
    checkpoint_dir = tmp_path / "checkpoint"
    state = TrainerState(reference_path=str(model_path), reference_version=1)
    # saves after each update: PPO steps and reward-model updates; the kept three hold B, B and C
    written = []
    for ppo_steps, updates in [(1, 0), (2, 0), (2, 1), (3, 1), (4, 2)]:
        state.ppo_steps, state.reward_model_updates = ppo_steps, updates
        if written and updates != load_state(written[-1]).reward_model_updates:
            with torch.no_grad():
                reward_model.model.score_head.bias.add_(0.5)  # what an update does to the weights
        written.append(save_checkpoint(checkpoint_dir, state, ppo, reward_model, join_store, keep=3))

    assert sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir()) == sorted(p.name for p in written[-3:])
    assert latest_checkpoint(checkpoint_dir) == written[-1] and (checkpoint_dir / LATEST).is_file()
    weights = [checkpoint / REWARD_MODEL_DIR / "model.safetensors" for checkpoint in written[-3:]]
    assert inode(weights[0]) == inode(weights[1]), "linked while no update changed it"
    assert inode(weights[1]) != inode(weights[2]), "written again after an update"
    assert {p.name for p in (written[-2] / REWARD_MODEL_DIR).iterdir()} == {
        p.name for p in (written[-1] / REWARD_MODEL_DIR).iterdir()
    }

    linked = RewardModelTrainer.load(written[-2] / REWARD_MODEL_DIR, RewardModelSettings(), pad_token_id)
    assert torch.allclose(linked.model.score_head.bias + 0.5, reward_model.model.score_head.bias)

    linked_bytes = disk_bytes(checkpoint_dir)
    copied_bytes = sum(p.stat().st_size for p in checkpoint_dir.rglob("*") if p.is_file())
    reward_model_bytes = sum(p.stat().st_size for p in (written[-1] / REWARD_MODEL_DIR).iterdir())
    assert copied_bytes - linked_bytes == reward_model_bytes, "two checkpoints share one copy of reward model B"


def test_fewer_than_two_checkpoints_is_refused(learner, model_path, tmp_path):
    ppo, reward_model, join_store, _ = learner
    with pytest.raises(ValueError, match="keep=1: keep at least 2 checkpoints"):
        save_checkpoint(
            tmp_path,
            TrainerState(reference_path=str(model_path), reference_version=1),
            ppo,
            reward_model,
            join_store,
            keep=1,
        )


def test_a_save_cut_short_by_a_crash_is_removed_at_the_next_save(learner, model_path, tmp_path):
    ppo, reward_model, join_store, _ = learner
    state = TrainerState(reference_path=str(model_path), reference_version=1)
    crashed = tmp_path / ".tmp-step-00000009-rm-000000-dead00"
    (crashed / "policy").mkdir(parents=True)
    kept = save_checkpoint(tmp_path, state, ppo, reward_model, join_store)
    assert not crashed.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, LATEST])
    assert not os.path.exists(tmp_path / f".tmp-{kept.name}")
