"""The process configuration: sources in order of priority, and a model directory's own settings."""

import ast
import functools
import json
import logging
import sys
import tomllib
import types
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from cli import main as cli_main
from cli.config import (
    DEMO_MODEL_DIR,
    MODEL_DIR_MAY_SET,
    MODEL_DIR_PATHS,
    MODEL_SETTINGS_FILE,
    REPO_ROOT,
    FlywheelConfig,
    GateConfig,
    ModelSettingsError,
    ProcessConfig,
    ServeConfig,
    TrainConfig,
    load_config,
    load_process_config,
    settings_a_model_may_not_set,
)
from flywheel.demo import init_model
from flywheel.demo.init_model import (
    DEMO_OPERATOR_CONFIG,
    DEMO_SETTINGS,
    MARKER_FILE,
    RECIPE,
    built_recipe,
    ensure_demo_model,
)
from flywheel.registry import PolicyRegistry
from flywheel.settings import Settings
from gate.config import GateSettings
from server.config import ServerSettings
from server.tls import CertificateFiles
from trainer.config import CandidateCheckSettings, PPOSettings


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
    assert config.spool.of_process("gate").directory == tmp_path / "spool" / "gate"  # each producer locks its own
    assert config.join_store.path == tmp_path / "trainer" / "join_store.sqlite3"
    assert config.trainer.checkpoint_dir == tmp_path / "trainer" / "checkpoint"


# ------------------------------------------------------------------- what a model directory may set


def model_dir_with(tmp_path: Path, settings: str) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / MODEL_SETTINGS_FILE).write_text(settings)
    return model_dir


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ('[server]\napi_keys_file = "keys.txt"\n', "server.api_keys_file"),
        ('[server]\napi_keys = ["let-me-in"]\n', "server.api_keys"),
        ('[server]\nfeedback_token_secret = "known-to-the-model-author"\n', "server.feedback_token_secret"),
        ("[server]\nport = 50052\n", "server.port"),
        ('[kafka]\nbootstrap_servers = "elsewhere:9092"\n', "kafka.bootstrap_servers"),
        ('[trainer]\nconsumer_group = "someone-elses"\n', "trainer.consumer_group"),
        ('registry_dir = "/tmp/registry"\n', "registry_dir"),
        ("[gate]\nauto_rollback = false\n", "gate.auto_rollback"),
        ("[reward_model]\nmax_principal_share = 1.0\n", "reward_model.max_principal_share"),
        ("[policy]\nmax_adapters = 64\n", "policy.max_adapters"),  # the engine's memory is the operator's
    ],
)
def test_a_model_directory_may_not_set_keys_secrets_addresses_or_the_processes_paths(tmp_path, settings, refused):
    model_dir = model_dir_with(tmp_path, settings + "[ppo]\nepochs = 2\n")
    with pytest.raises(ModelSettingsError) as refusal:
        load_config(model_dir=model_dir)
    message = str(refusal.value)
    assert f"may not set {refused}." in message  # the setting, and only it: ppo.epochs is allowed
    assert str(model_dir / MODEL_SETTINGS_FILE) in message
    assert "may set only its policy, training and gate settings (policy: adapter, lora_rank," in message


def test_the_demo_model_learns_as_an_adapter_and_one_setting_turns_it_to_whole_weights(tmp_path, monkeypatch):
    model_dir = model_dir_with(tmp_path, DEMO_SETTINGS)
    demo = load_config(model_dir=model_dir)
    assert demo.policy.uses_adapters and demo.policy.lora_rank == 4 and demo.ppo.adapter_learning_rate == 3e-4
    monkeypatch.setenv("FLYWHEEL_POLICY__ADAPTER", "none")
    whole = load_config(model_dir=model_dir)
    assert not whole.policy.uses_adapters and whole.ppo.policy_learning_rate == 3e-5


def test_make_up_runs_the_demo_with_a_canary_on_half_of_the_users(tmp_path):
    assert f"flywheel up --config {DEMO_OPERATOR_CONFIG.relative_to(REPO_ROOT)}" in (REPO_ROOT / "Makefile").read_text()
    config = load_config(DEMO_OPERATOR_CONFIG, model_dir=model_dir_with(tmp_path, DEMO_SETTINGS))
    assert config.policy.uses_adapters and config.gate.canary.share == 0.5


def test_a_demo_model_built_by_other_code_gets_this_checkouts_settings_and_keeps_its_weights(tmp_path):
    built = model_dir_with(tmp_path, "[ppo]\npolicy_learning_rate = 3e-5\n")
    (built / MARKER_FILE).write_text(json.dumps({"recipe": RECIPE}))  # built: nothing is trained again
    (built / "model.safetensors").write_bytes(b"weights")
    assert ensure_demo_model(built) == built
    assert (built / MODEL_SETTINGS_FILE).read_text() == DEMO_SETTINGS
    assert (built / MODEL_SETTINGS_FILE).stat().st_mode & 0o777 == 0o644
    assert (built / "model.safetensors").read_bytes() == b"weights"
    assert sorted(path.name for path in built.iterdir()) == [MODEL_SETTINGS_FILE, MARKER_FILE, "model.safetensors"]


def test_a_process_that_runs_the_demo_model_reads_this_checkouts_demo_settings_from_its_first_start(tmp_path):
    # A demo model built by code from before the demo learnt as an adapter, under a state dir whose registry
    # may already be seeded: serve, train, gate and up must all read the same mode, the checkout's.
    built = tmp_path / DEMO_MODEL_DIR
    model_dir_with(tmp_path, "[ppo]\npolicy_learning_rate = 3e-5\n").rename(built)
    (built / MARKER_FILE).write_text(json.dumps({"recipe": RECIPE}))
    assert not load_process_config(None, {"state_dir": str(tmp_path)}).policy.uses_adapters  # rollback, canary
    assert load_process_config(None, {"state_dir": str(tmp_path)}, runs_the_model=True).policy.uses_adapters


@pytest.mark.slow
def test_a_cached_demo_model_of_another_recipe_is_built_again(tmp_path, monkeypatch):
    # The real build, one training step long: the cache's decision is under test, not the model.
    full_build = init_model.init_model
    monkeypatch.setattr(init_model, "init_model", lambda out_dir: full_build(out_dir, steps=1))
    cached = model_dir_with(tmp_path, "")
    (cached / MARKER_FILE).write_text("{}")  # written before recipes were recorded: recipe 1
    (cached / "model.safetensors").write_bytes(b"old weights")
    assert built_recipe(cached) == 1
    ensure_demo_model(cached)
    assert built_recipe(cached) == RECIPE
    assert (cached / "model.safetensors").read_bytes() != b"old weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.lock", "model"]  # nothing else beside it


def test_a_demo_model_of_another_recipe_under_a_seeded_registry_only_lends_it_this_checkouts_settings(
    tmp_path, monkeypatch
):
    # The registry serves its own copies; rebuilding the stale model would cost minutes for nothing.
    def build(out_dir: Path):
        raise AssertionError("rebuilt the demo model though the registry serves its own copies")

    monkeypatch.setattr(init_model, "init_model", build)
    built = tmp_path / DEMO_MODEL_DIR
    model_dir_with(tmp_path, "[ppo]\npolicy_learning_rate = 3e-5\n").rename(built)
    (built / MARKER_FILE).write_text(json.dumps({"recipe": RECIPE - 1}))
    (built / "model.safetensors").write_bytes(b"weights")
    PolicyRegistry(tmp_path / "registry").seed(built)
    assert load_process_config(None, {"state_dir": str(tmp_path)}, runs_the_model=True).policy.uses_adapters
    assert (built / "model.safetensors").read_bytes() == b"weights" and built_recipe(built) == RECIPE - 1


def test_a_registry_seeded_from_another_model_builds_no_demo_model(tmp_path, monkeypatch):
    def build(out_dir: Path):
        raise AssertionError("built the demo model, minutes of CPU, though the registry serves another model")

    monkeypatch.setattr(init_model, "init_model", build)
    other = model_dir_with(tmp_path, "")
    (other / "model.safetensors").write_bytes(b"weights")
    PolicyRegistry(tmp_path / "state" / "registry").seed(other)
    config = load_process_config(None, {"state_dir": str(tmp_path / "state")}, runs_the_model=True)
    assert not (tmp_path / "state" / DEMO_MODEL_DIR).exists() and not config.policy.uses_adapters


def test_every_refused_setting_is_named_at_once(tmp_path):
    model_dir = model_dir_with(tmp_path, '[server]\nport = 1\napi_keys_file = "k"\n[gate]\nmetrics_port = 2\n')
    with pytest.raises(
        ModelSettingsError, match=r"may not set server\.port, server\.api_keys_file, gate\.metrics_port\."
    ):
        load_config(model_dir=model_dir)


@pytest.mark.parametrize("escape", ["../golden.jsonl", "/etc/golden.jsonl", "link-out/golden.jsonl"])
def test_a_path_from_a_model_directory_must_stay_inside_it(tmp_path, escape):
    model_dir = model_dir_with(tmp_path, f'[gate]\ngolden_file = "{escape}"\n')
    (model_dir / "link-out").symlink_to(tmp_path)  # inside by name, outside once resolved
    with pytest.raises(ModelSettingsError, match=r"gate\.golden_file leaves the model directory"):
        load_config(model_dir=model_dir)


def test_a_model_directorys_paths_are_relative_to_it(tmp_path):
    model_dir = model_dir_with(
        tmp_path, '[gate]\ngolden_file = "eval/golden.jsonl"\n[reward_model]\nmodel_path = "./reward"\n'
    )
    config = load_config(model_dir=model_dir)
    assert config.gate.golden_file == str(model_dir.resolve() / "eval" / "golden.jsonl")
    assert config.reward_model.model_path == str(model_dir.resolve() / "reward")

    # Keywords are not paths; and the operator's own files may point anywhere.
    (model_dir / MODEL_SETTINGS_FILE).write_text('[gate]\ngolden_file = "demo"\n')
    assert load_config(model_dir=model_dir).gate.golden_file == "demo"
    config_file = tmp_path / "operator.toml"
    config_file.write_text('[gate]\ngolden_file = "/srv/golden.jsonl"\n')
    assert load_config(config_file, model_dir=model_dir).gate.golden_file == "/srv/golden.jsonl"


def test_a_model_directorys_training_and_gate_settings_apply(tmp_path):
    model_dir = model_dir_with(
        tmp_path,
        "[reward_model]\nbatch_size = 4\n"
        "[trainer]\nmin_labels_before_ppo = 7\ntorch_threads = 1\n"
        '[gate]\nheldout_prompts = 5\nthresholds = { kl_budget = 2.5 }\n[gate.safety]\nbanned_phrases = ["x"]\n',
    )
    config = load_config(model_dir=model_dir)
    assert (config.reward_model.batch_size, config.trainer.min_labels_before_ppo, config.trainer.torch_threads) == (
        4,
        7,
        1,
    )
    assert (config.gate.heldout_prompts, config.gate.thresholds.kl_budget, config.gate.safety.banned_phrases) == (
        5,
        2.5,
        ["x"],
    )


def test_the_demo_models_settings_are_all_a_model_directory_may_set():
    # Read from the source, not imported: init_model imports torch and transformers.
    source = (REPO_ROOT / "flywheel" / "demo" / "init_model.py").read_text()
    (demo_settings,) = [
        ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and [ast.unparse(target) for target in node.targets] == ["DEMO_SETTINGS"]
    ]
    assert settings_a_model_may_not_set(tomllib.loads(demo_settings)) == []


def test_every_path_a_model_directory_may_set_is_checked():
    """A file-naming setting added to an allowed section must join MODEL_DIR_PATHS, or it could point anywhere."""

    def settings(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
        found = []
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += settings(field.annotation, f"{prefix}{name}.")
            else:
                found.append((f"{prefix}{name}", field.annotation))
        return found

    every_setting = settings(FlywheelConfig, "")
    allowed = [
        (name, annotation)
        for name, annotation in every_setting
        if settings_a_model_may_not_set(functools.reduce(lambda table, key: {key: table}, reversed(name.split(".")), 0))
        == []
    ]
    # Every name on the list is a setting still: a rename must not quietly take it off.
    for section, names in MODEL_DIR_MAY_SET.items():
        for name in names:
            assert any(
                setting == f"{section}.{name}" or setting.startswith(f"{section}.{name}.") for setting, _ in allowed
            ), name
    file_naming = {
        name for name, annotation in allowed if "Path" in str(annotation) or name.endswith(("_file", "_path", "_dir"))
    }
    assert file_naming == set(MODEL_DIR_PATHS)


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"tls_cert_file": Path("tls.crt")}, "server.tls_cert_file and server.tls_key_file go together"),
        ({"tls_key_file": Path("tls.key")}, "server.tls_cert_file and server.tls_key_file go together"),
        ({"tls_client_ca_file": Path("ca.crt")}, "server.tls_client_ca_file needs server.tls_cert_file"),
    ],
)
def test_half_a_tls_configuration_is_refused_naming_the_settings(files, named):
    with pytest.raises(ValueError, match=named):
        CertificateFiles.of(ServerSettings(**files))
    assert CertificateFiles.of(ServerSettings()) is None


def test_ppo_refuses_more_answers_per_step_than_the_kl_horizon():
    # β ·= 1 + e · answers / kl_horizon with e in [−0.2, 0.2]: 8 prompts × 2 answers over a horizon
    # of 3 gives 1 − 0.2 · 16 / 3 = −0.0667 on a low KL, a negative β that pays the policy to drift.
    with pytest.raises(
        ValueError, match=r"ppo.prompts_per_step × ppo.responses_per_prompt = 16 answers.*ppo.kl_horizon = 3"
    ):
        load_config(overrides={"ppo": {"prompts_per_step": 8, "responses_per_prompt": 2, "kl_horizon": 3}})
    # 16 answers over a horizon of 16: β moves by at most 20% a step
    assert (
        load_config(
            overrides={"ppo": {"prompts_per_step": 8, "responses_per_prompt": 2, "kl_horizon": 16}}
        ).ppo.kl_horizon
        == 16
    )


def test_flywheel_simulate_takes_its_defaults_from_the_simulation_settings(monkeypatch):
    from cli import main as cli
    from cli import simulate

    ran: list[simulate.SimulationSettings] = []
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(simulate, "run_simulation", lambda settings: ran.append(settings) or 0)
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--events", "5", "--out", "runs/x", "--trainer-metrics-url", ""])
    assert ran[-1] == simulate.SimulationSettings(events=5, out_dir=Path("runs/x"), trainer_metrics_url="")
    # Every flag reaches its setting (a flag whose name matched none would be dropped).
    given = {
        "target": "host:1", "judge": "tests.judges:undecided", "eval_judge": "tests.judges:undecided", "events": 7, "concurrency": 2, "rate": 0.5,
        "out_dir": Path("out"), "seed": 3, "eval_every": 9, "heldout_questions": 4, "trainer_metrics_url": "", "api_key": "k",
    }  # fmt: skip
    flags = {"out_dir": "--out"}
    with pytest.raises(SystemExit):
        cli.main(
            [
                "simulate",
                *(
                    str(part)
                    for name, value in given.items()
                    for part in (flags.get(name, "--" + name.replace("_", "-")), value)
                ),
            ]
        )
    assert ran[-1] == simulate.SimulationSettings(**given)


# ------------------------------------------------------------------- one file, each process its own sections


@pytest.fixture
def started(tmp_path, monkeypatch, capsys):
    """Run `flywheel COMMAND` up to where the process would start, with a config file; returns
    (its start-up log lines as dicts, how often the config file was read, the config it seeded with).

    The server itself is stubbed (a module standing in for server.app: what is tested is the
    configuration it is handed, not vLLM), and so are building the demo model and seeding the registry.
    """
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text('[server]\nfeedback_token_secret = "s3cret"\n[ppo]\nepochs = 3\n')
    reads = []
    real_load = tomllib.load

    def counting_load(file, **kwargs):
        reads.append(getattr(file, "name", file))
        return real_load(file, **kwargs)

    monkeypatch.setattr(tomllib, "load", counting_load)
    handed = {}

    async def serve(server, engine, kafka, spool, registry, policy_settings=None):
        handed.update(server=server, engine=engine)

    monkeypatch.setitem(sys.modules, "server.app", types.SimpleNamespace(serve=serve))
    monkeypatch.setattr(cli_main, "seed_registry", lambda config: handed.update(config=config))
    monkeypatch.setattr(init_model, "ensure_demo_model", lambda model_dir, **_: model_dir)
    root_handlers = logging.getLogger().handlers[:]

    def start(command: str) -> tuple[list[dict], list, dict]:
        try:
            cli_main.main([command, "--config", str(config_file), "--state-dir", str(tmp_path / "state")])
        finally:
            logging.getLogger().handlers[:] = root_handlers
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        return lines, [read for read in reads if str(read) == str(config_file)], handed

    return start


def test_serve_loads_the_config_once_and_prints_only_its_own_sections(started):
    lines, reads, handed = started("serve")
    assert len(reads) == 1, f"the config file was read {len(reads)} times"
    printed = json.loads(next(line["message"] for line in lines if line["message"].startswith("config\n"))[7:])
    assert set(printed) == set(ServeConfig.model_fields), sorted(printed)
    assert "ppo" not in printed and "trainer" not in printed and "gate" not in printed
    assert printed["server"]["feedback_token_secret"] == "**********", "secrets are starred"
    assert handed["server"].feedback_token_secret.get_secret_value() == "s3cret"
    assert isinstance(handed["config"], ServeConfig)


def test_every_process_section_is_a_section_of_the_one_file():
    for process in ProcessConfig.__subclasses__():
        assert set(process.model_fields) - {"model_dir"} <= set(FlywheelConfig.model_fields), process
    config = load_config()
    gate = config.for_process(GateConfig)
    assert gate.gate is config.gate and gate.model_dir == config.state_dir / "demo-model"
    train = config.for_process(TrainConfig)
    assert train.ppo is config.ppo and "ppo" not in GateConfig.model_fields
    # the trainer runs the gate's checks before proposing: the same section, of which it prints only the checks
    assert train.gate is config.gate
    assert set(train.model_dump()["gate"]) == set(CandidateCheckSettings.model_fields) < set(GateSettings.model_fields)


def test_a_canary_replica_serves_whole_weights_only(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_SERVER__CANARY_REPLICA", "true")
    assert load_config().for_process(ServeConfig).server.canary_replica
    with pytest.raises(ValueError, match="server.canary_replica is for whole weights.*set gate.canary.share instead"):
        load_config(overrides={"policy": {"adapter": "lora"}}).for_process(ServeConfig)


def test_a_reward_spread_needs_answers_to_compare():
    with pytest.raises(ValidationError, match="ppo.min_reward_spread.*ppo.responses_per_prompt = 1"):
        PPOSettings(min_reward_spread=0.02, responses_per_prompt=1)
    assert PPOSettings(min_reward_spread=0.0, responses_per_prompt=1).min_reward_spread == 0


@pytest.mark.parametrize(
    ("settings", "refused", "said"),
    [
        ("[ppo]\nclip_ratio = 0.1\n", "ppo.clip_ratio", "Extra inputs are not permitted"),  # clip_eps, misnamed
        ("[gate.canary]\nshares = 0.5\n", "gate.canary.shares", "Extra inputs are not permitted"),
        ("[server.limits]\nmax_prompt = 9\n", "server.limits.max_prompt", "Extra inputs are not permitted"),
        ("[trainer]\nmin_reward_gain = 0.1\n", "trainer", "set trainer.min_thumbs_up_gain"),
    ],
)
def test_a_setting_no_section_knows_is_refused_by_name_not_ignored(tmp_path, monkeypatch, settings, refused, said):
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text(settings)
    with pytest.raises(ValidationError) as refusal:
        load_config(config_file)
    locations = [".".join(map(str, error["loc"])) for error in refusal.value.errors()]
    assert refused in locations and said in str(refusal.value)
    config_file.write_text("")
    monkeypatch.setenv("FLYWHEEL_TRAINER__MIN_REWARD_GAIN", "0.1")
    with pytest.raises(ValidationError, match="retired"):
        load_config(config_file)


def test_an_environment_variable_for_a_section_the_config_has_not_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_SERVR__PORT", "1")
    with pytest.raises(ValueError, match="FLYWHEEL_SERVR__PORT: the configuration has no such section"):
        load_config(None)
    monkeypatch.delenv("FLYWHEEL_SERVR__PORT")
    monkeypatch.setenv("FLYWHEEL_SERVER__PORTT", "1")
    with pytest.raises(ValidationError, match="server.portt"):
        load_config(None)


def test_every_configuration_section_refuses_keys_it_does_not_know():
    """A section added as a plain pydantic model, or a list of them, would ignore a misspelt key again."""

    def sections(model: type[BaseModel]) -> list[type[BaseModel]]:
        found = []
        for field in model.model_fields.values():
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    found += [candidate, *sections(candidate)]
        return found

    every = sections(FlywheelConfig)
    assert len(every) >= 15, [section.__name__ for section in every]
    assert [section.__name__ for section in every if not issubclass(section, Settings)] == []


@pytest.mark.parametrize(
    ("settings", "said"),
    [("[ppo]\nclip_ratio = 0.1\n", "ppo.clip_ratio"), ("[trainer]\nmin_reward_gain = 0.1\n", "retired")],
)
def test_a_model_directorys_unknown_or_retired_key_is_named_as_such_not_as_forbidden(tmp_path, settings, said):
    """Told "may not set" and to move it to the config file, an operator would move a key that fails there too."""
    model_dir = model_dir_with(tmp_path, settings)
    with pytest.raises(ValidationError) as refusal:
        load_config(model_dir=model_dir)
    assert said in str(refusal.value)
