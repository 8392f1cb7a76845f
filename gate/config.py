"""Settings of the gate process (`flywheel gate`, the `gate` section): what a candidate must pass, and when to roll back."""

from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.demo.task import GOLDEN_FILE
from flywheel.registry import RegistryRetention
from gate.checks import GateThresholds, SafetyRules
from gate.rollback import ThumbsDownSPRT


class GateSettings(BaseModel):
    """The safety gate (`flywheel gate`): what a candidate must pass, and when to roll back."""

    host: str = Field("127.0.0.1", description="Address the gate's /metrics binds.")
    metrics_port: int = Field(9402, description="Prometheus /metrics HTTP port of the gate; 0 picks a free one.")
    consumer_group: str = Field("flywheel-gate", description="Kafka consumer group of the gate.")
    poll_seconds: float = Field(
        1.0, gt=0, description="Longest wait for events before the gate looks for candidates again."
    )
    thresholds: GateThresholds = Field(default_factory=GateThresholds)
    safety: SafetyRules = Field(default_factory=SafetyRules)
    golden_file: str = Field(
        "demo",
        description="JSON lines of {prompt, expected} and {prompt, must_not_contain}: a path, 'demo' for the demo "
        "task's built-in file, or '' for none.",
    )
    heldout_prompts: int = Field(32, ge=0, description="Recent held-out prompts from logged traffic in the eval set.")
    max_new_tokens: int = Field(32, ge=1, description="Longest answer generated during evaluation, in tokens.")
    kl_samples_per_prompt: int = Field(
        2, ge=1, description="Sampled answers per prompt for the KL-to-reference estimate."
    )
    auto_rollback: bool = Field(True, description="Roll back a live version whose thumbs are significantly worse.")
    max_principal_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Most of the rollback's votes on a version, and of the held-out prompts, one principal may supply; "
        "an equal share when fewer than 1/this principals take part.",
    )
    torch_threads: int = Field(
        0, ge=0, description="Threads torch computes with; 0 keeps torch's default. Set 1 when sharing few cores."
    )
    rollback: ThumbsDownSPRT = Field(default_factory=ThumbsDownSPRT)
    retention: RegistryRetention = Field(default_factory=RegistryRetention)

    def golden_path(self) -> Path | None:
        if not self.golden_file:
            return None
        return GOLDEN_FILE if self.golden_file == "demo" else Path(self.golden_file)
