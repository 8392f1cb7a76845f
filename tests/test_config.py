"""The process configuration: sources in order of priority, and a model directory's own settings."""

from pathlib import Path

from flywheel.config import MODEL_SETTINGS_FILE, load_config


def test_flags_beat_environment_beat_config_file_beat_model_settings_beat_defaults(tmp_path: Path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / MODEL_SETTINGS_FILE).write_text(
        "[ppo]\npolicy_learning_rate = 2e-4\nmax_new_tokens = 24\nepochs = 2\n[gate]\nmax_new_tokens = 20\n"
    )
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text("[ppo]\nmax_new_tokens = 40\nepochs = 3\n")
    monkeypatch.setenv("FLYWHEEL_PPO__EPOCHS", "5")

    config = load_config(config_file, {"ppo": {"minibatch_size": 4}}, model_dir=model_dir)
    assert config.ppo.minibatch_size == 4  # flag
    assert config.ppo.epochs == 5  # environment
    assert config.ppo.max_new_tokens == 40  # config file over the model's settings
    assert config.ppo.policy_learning_rate == 2e-4 and config.gate.max_new_tokens == 20  # the model's settings
    assert config.ppo.clip_eps == 0.2  # default


def test_relative_paths_live_under_the_state_dir(tmp_path: Path):
    config = load_config(overrides={"state_dir": tmp_path})
    assert config.registry_dir == tmp_path / "registry"
    assert config.spool.directory == tmp_path / "spool"
    assert config.join_store.path == tmp_path / "trainer" / "join_store.sqlite3"
    assert config.trainer.checkpoint_dir == tmp_path / "trainer" / "checkpoint"
