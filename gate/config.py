"""Settings of the gate process (`flywheel gate`, the `gate` section): what a candidate must pass, and when to roll back."""

from pydantic import Field

from flywheel.registry import RegistryRetention
from gate.canary import CanarySettings
from gate.rollback import ThumbsDownSPRT
from trainer.config import CandidateCheckSettings


class GateSettings(CandidateCheckSettings):
    """The safety gate (`flywheel gate`): what a candidate must pass (its checks, shared with the trainer), and when to roll back."""

    host: str = Field("127.0.0.1", description="Address the gate's /metrics binds.")
    metrics_port: int = Field(9402, description="Prometheus /metrics HTTP port of the gate; 0 picks a free one.")
    consumer_group: str = Field("flywheel-gate", description="Kafka consumer group of the gate.")
    poll_seconds: float = Field(
        1.0, gt=0, description="Longest wait for events before the gate looks for candidates again."
    )
    auto_rollback: bool = Field(True, description="Roll back a live version whose thumbs are significantly worse.")
    torch_threads: int = Field(
        0, ge=0, description="Threads torch computes with; 0 keeps torch's default. Set 1 when sharing few cores."
    )
    rollback: ThumbsDownSPRT = Field(default_factory=ThumbsDownSPRT)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    retention: RegistryRetention = Field(default_factory=RegistryRetention)
