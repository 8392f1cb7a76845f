"""The configuration of every Flywheel process: flags > environment (FLYWHEEL_*) > TOML file > model's settings > defaults.

Users write one file (FlywheelConfig, every section); each process is handed, and prints, only the
sections it reads (ServeConfig, TrainConfig, GateConfig, ...). A new setting goes into its
section's own class (server/config.py, trainer/config.py, gate/config.py); a process that needs
another section names it in its class here.
"""

import copy
import json
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

from feedback.config import KafkaSettings, SpoolSettings
from flywheel.adapters import PolicySettings
from flywheel.registry import MODEL_SETTINGS_FILE, PolicyRegistry
from gate.config import GateSettings
from server.config import EngineSettings, ServerSettings
from trainer.config import (
    JoinStoreSettings,
    PPOSettings,
    RewardModelSettings,
    TrainerConfig,
    TrainerSettings,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

MODEL_DIR_MAY_SET = {
    "policy": ("adapter", "lora_rank", "lora_alpha", "target_modules"),
    "ppo": (
        "prompts_per_step",
        "responses_per_prompt",
        "max_new_tokens",
        "temperature",
        "epochs",
        "minibatch_size",
        "clip_eps",
        "value_clip_eps",
        "gamma",
        "lam",
        "target_kl",
        "kl_horizon",
        "min_reward_spread",
        "init_kl_coef",
        "missing_eos_penalty",
        "policy_learning_rate",
        "adapter_learning_rate",
        "critic_learning_rate",
        "max_grad_norm",
        "candidate_every_steps",
    ),
    "reward_model": (
        "model_path",
        "learning_rate",
        "batch_size",
        "pointwise_loss_weight",
        "heldout_fraction",
        "update_every_labels",
        "max_grad_norm",
    ),
    "trainer": (
        "min_labels_before_ppo",
        "checkpoint_every_steps",
        "restart_after_rejections",
        "precheck_candidates",
        "min_thumbs_up_gain",
        "restart_after_withheld",
        "seed",
        "torch_threads",
    ),
    "gate": (
        "thresholds",
        "safety",
        "golden_file",
        "heldout_prompts",
        "max_new_tokens",
        "kl_samples_per_prompt",
        "torch_threads",
    ),
}
"""Everything a model directory's flywheel.toml may set, section by section (thresholds and safety whole).
A model is downloaded, not vetted, so it gets no say over keys, secrets, addresses, ports, consumer groups,
the process's own files or per-tenant limits: those belong to whoever runs it (config file, environment,
flags). A setting added to a section stays off this list until someone decides a model may set it."""

MODEL_DIR_PATHS = {"reward_model.model_path": ("",), "gate.golden_file": ("", "demo")}
"""Settings of MODEL_DIR_MAY_SET that name a file, with their values that are not paths. From a model
directory, a path is relative to it and must stay inside it."""


class ModelSettingsError(ValueError):
    """A model directory's flywheel.toml sets what it may not."""


ENV_PREFIX = "FLYWHEEL_"
ENV_NESTED_DELIMITER = "__"
DEMO_MODEL_DIR = "demo-model"
"""Where under state_dir the demo model is built when engine.model is empty."""


class FlywheelConfig(BaseModel):
    """The whole configuration file. Environment variables use FLYWHEEL_ and `__` between levels, e.g.
    FLYWHEEL_SERVER__PORT=50051.

    Relative paths inside sections (spool, join store, checkpoints, registry) are under state_dir.
    """

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Field(Path(".cache"), description="Where the demo model, spool, registry and trainer state live.")
    log_level: str = Field("INFO", description="Python logging level.")
    registry_dir: Path = Field(Path("registry"), description="The policy registry (a shared volume in Kubernetes).")
    policy: PolicySettings = Field(default_factory=PolicySettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    reward_model: RewardModelSettings = Field(default_factory=RewardModelSettings)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    join_store: JoinStoreSettings = Field(default_factory=JoinStoreSettings)
    gate: GateSettings = Field(default_factory=GateSettings)

    @model_validator(mode="after")
    def _paths_under_state_dir(self) -> "FlywheelConfig":
        def under(path: Path) -> Path:
            return (
                path
                if path.is_absolute() or path.parts[: len(self.state_dir.parts)] == self.state_dir.parts
                else self.state_dir / path
            )

        self.registry_dir = under(self.registry_dir)
        self.spool.directory = under(self.spool.directory)
        self.join_store.path = under(self.join_store.path)
        self.trainer.checkpoint_dir = under(self.trainer.checkpoint_dir)
        return self

    @property
    def model_dir(self) -> Path:
        return model_dir_of(self.engine.model, self.state_dir)

    def for_process(self, process: type["ProcessT"]) -> "ProcessT":
        """The sections `process` (a ProcessConfig class) reads, the same objects as here."""
        sections = {name: getattr(self, name) for name in process.model_fields if name != "model_dir"}
        return process(model_dir=self.model_dir, **sections)


def model_dir_of(engine_model: str, state_dir: Path) -> Path:
    """The model to serve and train: engine.model (--model), or the demo model under state_dir (built on first use)."""
    return Path(engine_model) if engine_model else Path(state_dir) / DEMO_MODEL_DIR


# ---------------------------------------------------------------- each process's sections


class ProcessConfig(BaseModel):
    """What every process reads: where its state lives, how it logs, the registry and the model that seeds it."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path
    log_level: str
    registry_dir: Path
    model_dir: Path = Field(description="The model an empty registry is seeded with: engine.model, or the demo model.")

    def redacted_json(self) -> str:
        """The config as printed at start-up; secrets show as stars."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


ProcessT = TypeVar("ProcessT", bound=ProcessConfig)


class ServeConfig(ProcessConfig):
    """`flywheel serve`."""

    policy: PolicySettings
    engine: EngineSettings
    server: ServerSettings
    kafka: KafkaSettings
    spool: SpoolSettings

    @model_validator(mode="after")
    def _canary_replicas_serve_whole_weights(self) -> "ServeConfig":
        if self.server.canary_replica and self.policy.uses_adapters:
            raise ValueError(
                "server.canary_replica is for whole weights; with policy.adapter = "
                f"{self.policy.adapter!r} every server answers the canary's share of users beside live: "
                "set gate.canary.share instead"
            )
        return self


class TrainConfig(ProcessConfig, TrainerConfig):
    """`flywheel train`: the trainer's own sections (trainer.config.TrainerConfig), and of the `gate` section the
    checks it runs before proposing a candidate (the same thresholds, golden file and eval set as the gate's)."""


class GateConfig(ProcessConfig):
    """`flywheel gate`: it scores answers with the reward model the trainer publishes, by reward_model's settings."""

    gate: GateSettings
    reward_model: RewardModelSettings
    kafka: KafkaSettings
    spool: SpoolSettings


class BrokerConfig(ProcessConfig):
    """`flywheel broker`."""

    kafka: KafkaSettings


class RollbackConfig(ProcessConfig):
    """`flywheel rollback`: it moves the registry's live pointer and announces the move."""

    kafka: KafkaSettings
    spool: SpoolSettings


class CanaryConfig(ProcessConfig):
    """`flywheel canary`: it reads the registry's canary pointer and the gate's /metrics; `--reject` ends
    the canary and announces it."""

    gate: GateSettings
    kafka: KafkaSettings
    spool: SpoolSettings


class UpConfig(ProcessConfig):
    """`flywheel up`: it starts the others (each reads the whole file for itself) and says where they listen."""

    server: ServerSettings
    trainer: TrainerSettings
    gate: GateSettings
    kafka: KafkaSettings


# ---------------------------------------------------------------- loading


def load_config(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None, model_dir: Path | None = None
) -> FlywheelConfig:
    """Build the config; `overrides` (from flags) is nested like the config, e.g. {"server": {"port": 1}}.

    When `model_dir` holds a flywheel.toml, its settings rank below `config_file`'s and above the defaults;
    it may set only MODEL_DIR_MAY_SET (ModelSettingsError otherwise).
    """
    given = given_settings(config_file, overrides)
    return _validated(given, model_dir)


def load_process_config(
    config_file: Path | None, overrides: dict[str, Any] | None = None, *, runs_the_model: bool = False
) -> FlywheelConfig:
    """The config as a process loads it, once: the model whose flywheel.toml fills in what nothing else sets
    is the one the given settings name (engine.model, or the demo model under state_dir).

    `runs_the_model` (serve, train, gate, up): when the model is the demo's and the registry will be seeded
    with it, or it is built already, it is built first and its settings are this checkout's, so that every
    process reads the same mode and rates from the start. A registry seeded otherwise needs no demo model.
    """
    given = given_settings(config_file, overrides)
    engine = given.get("engine", {})
    engine_model = engine.get("model", "") if isinstance(engine, dict) else ""
    model_dir = model_dir_of(engine_model, given.get("state_dir", FlywheelConfig.model_fields["state_dir"].default))
    if runs_the_model and not engine_model:
        from flywheel.demo.init_model import MARKER_FILE, ensure_demo_model

        registry = PolicyRegistry(FlywheelConfig.model_validate(given).registry_dir)
        if (model_dir / MARKER_FILE).exists() or registry.live() is None:
            ensure_demo_model(model_dir, rebuild_stale=registry.live() is None)
    return _validated(given, model_dir)


def given_settings(config_file: Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """What the user gave, nested like the config: the file, then the environment over it, then `overrides` (flags).

    A FLYWHEEL_<SECTION>__<KEY> variable of a section the config has not is refused (pydantic-settings reads only
    the known ones, and would ignore it); keys unknown within a section are refused by the section itself.
    """
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and ENV_NESTED_DELIMITER in name
        and name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER)[0].lower() not in FlywheelConfig.model_fields
    )
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: the configuration has no such section (it has {', '.join(FlywheelConfig.model_fields)})"
        )
    from_file = TomlConfigSettingsSource(FlywheelConfig, toml_file=config_file)() if config_file else {}
    from_environment = EnvSettingsSource(
        FlywheelConfig, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER
    )()
    return _merged(_merged(from_file, from_environment), overrides or {})


def _validated(given: dict[str, Any], model_dir: Path | None) -> FlywheelConfig:
    model_settings = read_model_settings(model_dir) if model_dir is not None else {}
    return FlywheelConfig.model_validate(_merged(model_settings, given))


def _merged(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """`lower` with `higher`'s settings over it, section by section."""
    merged = dict(lower)
    for key, value in higher.items():
        below = merged.get(key)
        merged[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def read_model_settings(model_dir: Path) -> dict[str, Any]:
    """The settings of `model_dir`'s flywheel.toml ({} without one), its paths made absolute.

    Raises ModelSettingsError naming each setting outside MODEL_DIR_MAY_SET and each path that leaves the directory.
    """
    settings_file = model_dir / MODEL_SETTINGS_FILE
    if not settings_file.is_file():
        return {}
    try:
        table = tomllib.loads(settings_file.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ModelSettingsError(f"{settings_file} is not valid TOML: {error}") from error
    refused = settings_a_model_may_not_set(table)
    resolved, outside = model_paths_resolved(table, model_dir)
    if refused or outside:
        problems = [f"it may not set {', '.join(refused)}"] if refused else []
        problems += [f"{setting} leaves the model directory ({path})" for setting, path in outside.items()]
        allowed = "; ".join(f"{section}: {', '.join(names)}" for section, names in MODEL_DIR_MAY_SET.items())
        raise ModelSettingsError(
            f"{settings_file}: {'; '.join(problems)}. A model directory may set only its policy, training and gate "
            f"settings ({allowed}), with paths inside the directory. Set anything else in the config file, a "
            "FLYWHEEL_* environment variable or a flag."
        )
    return resolved


def settings_a_model_may_not_set(table: dict[str, Any]) -> list[str]:
    """The dotted names of the settings in `table` (a parsed flywheel.toml) outside MODEL_DIR_MAY_SET; a key that
    is no setting at all is left to the sections' own validation, which names it as unknown (or retired)."""
    return [setting for setting in _leaf_settings(table) if _is_a_setting(setting) and not _model_may_set(setting)]


def model_paths_resolved(table: dict[str, Any], model_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """`table` with each path of MODEL_DIR_PATHS resolved against `model_dir`, and those that land outside it.

    Pure but for resolving symbolic links: a link in the directory pointing out of it leaves it too.
    """
    resolved = copy.deepcopy(table)
    outside: dict[str, Path] = {}
    root = model_dir.resolve()
    for setting, not_paths in MODEL_DIR_PATHS.items():
        section, name = setting.split(".")
        value = table.get(section, {}).get(name) if isinstance(table.get(section), dict) else None
        if not isinstance(value, str) or value in not_paths:
            continue  # absent, a keyword, or a wrong type the settings' own validation reports
        path = (root / value).resolve()  # an absolute value stays itself
        if path.is_relative_to(root):
            resolved[section][name] = str(path)
        else:
            outside[setting] = path
    return resolved, outside


def _leaf_settings(table: dict[str, Any], prefix: str = "") -> list[str]:
    leaves = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        leaves += _leaf_settings(value, f"{name}.") if isinstance(value, dict) else [name]
    return leaves


def _is_a_setting(setting: str) -> bool:
    model: Any = FlywheelConfig
    for name in setting.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # a value inside a setting, such as a table
        if name not in model.model_fields:
            return False
        model = model.model_fields[name].annotation
    return True


def _model_may_set(setting: str) -> bool:
    section, _, rest = setting.partition(".")
    return rest.split(".")[0] in MODEL_DIR_MAY_SET.get(section, ())


def config_table(model: type[BaseModel] = FlywheelConfig, prefix: str = "") -> list[str]:
    """Markdown rows `| key | env var | default | meaning |` for every setting, nested sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_table(annotation, f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        shown = (
            ""
            if default is None
            else json.dumps(default.get_secret_value() if isinstance(default, SecretStr) else default, default=str)
        )
        env = "FLYWHEEL_" + key.upper().replace(".", "__")
        rows.append(f"| `{key}` | `{env}` | `{shown}` | {field.description or ''} |")
    return rows


def config_markdown() -> str:
    return "\n".join(["| setting | environment | default | meaning |", "|---|---|---|---|", *config_table()])
