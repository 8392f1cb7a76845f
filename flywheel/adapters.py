"""What a policy is made of: whole weights, or a low-rank adapter on a base model.

In adapter mode (`policy.adapter = "lora"`) the trainer learns a LoRA adapter on the base model
(the registry's first live version, whole weights), the registry holds each candidate as the
adapter's files alone with a manifest naming the base's digest, and servers keep the base in
their engine and apply the live (and canary) adapter per request. Shared by trainer, server and
gate, so it lives in the ground.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field

from flywheel.settings import Settings

ADAPTER_CONFIG_FILE = "adapter_config.json"
"""peft's adapter configuration; its presence makes a policy directory an adapter."""

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
"""peft's adapter weights, keyed as `set_peft_model_state_dict` takes them."""

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PolicySettings(Settings):
    """What the trainer learns and the servers serve: whole weights, or a LoRA adapter on the base."""

    adapter: Literal["none", "lora"] = Field(
        "none",
        description="`lora`: train, publish and serve low-rank adapters on the base model; `none`: whole weights.",
    )
    lora_rank: int = Field(8, ge=1, le=256, description="Rank r of every LoRA update (vLLM serves up to 256).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: an update is scaled by alpha / rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Names of the linear layers that get an adapter (Qwen2/Llama names by default).",
    )
    max_adapters: int = Field(
        4,
        ge=2,
        le=64,
        description="Adapters a server's engine holds at once (live, canary, and those in flight during a swap).",
    )

    @property
    def uses_adapters(self) -> bool:
        return self.adapter == "lora"


def is_adapter(policy_dir: Path) -> bool:
    """Whether a policy directory holds an adapter (and needs its base) rather than whole weights."""
    return (Path(policy_dir) / ADAPTER_CONFIG_FILE).is_file()


def adapter_name(version: int) -> str:
    """How the engine names the adapter of a policy version (in its logs and metrics)."""
    return f"policy-v{version}"


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256)
"""The values vLLM takes for max_lora_rank (its LoRAConfig); larger ones need more memory per slot."""


def engine_max_lora_rank(lora_rank: int) -> int:
    """The smallest max_lora_rank vLLM takes that serves adapters of `lora_rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= lora_rank:
            return allowed
    raise ValueError(f"policy.lora_rank={lora_rank}: vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]}")
