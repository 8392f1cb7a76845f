"""The one configuration object of every Flywheel process: flags > environment (FLYWHEEL_*) > TOML file > defaults."""

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from feedback.config import KafkaSettings, SpoolSettings
from server.config import EngineSettings, ServerSettings
from trainer.config import GateSettings, JoinStoreSettings, PPOSettings, RewardModelSettings, TrainerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_SETTINGS_FILE = "flywheel.toml"
"""A model directory may carry the Flywheel settings that suit it (the demo model does): the lowest-priority file."""


class FlywheelConfig(BaseSettings):
    """Environment variables use FLYWHEEL_ and `__` between levels, e.g. FLYWHEEL_SERVER__PORT=50051.

    Relative paths inside sections (spool, join store, checkpoints, registry) are under state_dir.
    """

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(Path(".cache"), description="Where the demo model, spool, registry and trainer state live.")
    log_level: str = Field("INFO", description="Python logging level.")
    registry_dir: Path = Field(Path("registry"), description="The policy registry (a shared volume in Kubernetes).")
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
            return path if path.is_absolute() or path.parts[: len(self.state_dir.parts)] == self.state_dir.parts else self.state_dir / path

        self.registry_dir = under(self.registry_dir)
        self.spool.directory = under(self.spool.directory)
        self.join_store.path = under(self.join_store.path)
        self.trainer.checkpoint_dir = under(self.trainer.checkpoint_dir)
        return self

    def redacted_json(self) -> str:
        """The config as printed at start-up; secrets show as stars."""
        return json.dumps(self.model_dump(mode="json"), indent=2)


def load_config(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None, model_dir: Path | None = None
) -> FlywheelConfig:
    """Build the config; `overrides` (from flags) is nested like the config, e.g. {"server": {"port": 1}}.

    When `model_dir` holds a flywheel.toml, its settings rank below `config_file`'s and above the defaults.
    """
    files = [path for path in (model_dir and model_dir / MODEL_SETTINGS_FILE, config_file) if path is not None]

    class FromSources(FlywheelConfig):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file_settings = (TomlConfigSettingsSource(settings_cls, toml_file=files, deep_merge=True),) if files else ()
            return (init_settings, env_settings, *file_settings)

    loaded = FromSources(**(overrides or {}))
    return FlywheelConfig.model_validate(loaded.model_dump())


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
        shown = "" if default is None else json.dumps(default.get_secret_value() if isinstance(default, SecretStr) else default, default=str)
        env = "FLYWHEEL_" + key.upper().replace(".", "__")
        rows.append(f"| `{key}` | `{env}` | `{shown}` | {field.description or ''} |")
    return rows


def config_markdown() -> str:
    return "\n".join(["| setting | environment | default | meaning |", "|---|---|---|---|", *config_table()])
