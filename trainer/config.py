"""Settings of the trainer process: one section per concern (reward model, PPO, join store)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from feedback.config import KafkaSettings, SpoolSettings
from flywheel.adapters import PolicySettings
from flywheel.demo.task import GOLDEN_FILE
from flywheel.settings import Settings
from trainer.gate_checks import GateThresholds, SafetyRules


class RewardModelSettings(Settings):
    """How the reward model is initialised and updated from users' feedback."""

    model_path: str = Field(
        "", description="Hugging Face directory to start the reward model from; empty means the policy's own weights."
    )
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of the backbone and the score head.")
    batch_size: int = Field(16, ge=1, description="Pairs, and separately thumbs, per optimizer step.")
    pointwise_loss_weight: float = Field(
        0.5, ge=0, description="Weight of the thumbs' logistic loss beside the pairs' Bradley–Terry loss."
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of prompts (by a stable hash of their text) kept out of training for evaluation.",
    )
    update_every_labels: int = Field(
        64,
        ge=1,
        description="Labels per reward-model update: it runs once this many unused standing labels (thumbs and "
        "pairs) wait, on the oldest this many within each principal's share.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global L2 norm.")
    max_principal_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Most of one update's labels, and of PPO's prompts, one principal (API key tenant) may supply; "
        "an equal share when fewer than 1/this principals take part. Labels beyond it wait for a later update.",
    )


class RolloutEngineSettings(Settings):
    """The vLLM engine that samples PPO answers when ppo.rollouts = "vllm"."""

    dtype: str = Field("auto", description="Weights' dtype in the engine (vLLM's `dtype`).")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt plus answer the engine holds, in tokens.")
    kv_cache_bytes: int = Field(
        0, ge=0, description="KV cache size in bytes; 0 sizes it by gpu_memory_utilization (required on CPU)."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of the GPU's memory the engine may take (the trainer needs the rest)."
    )
    enforce_eager: bool = Field(False, description="No CUDA graphs: faster start, slower sampling.")


class PPOSettings(Settings):
    """One PPO step: sample answers, score them, then several epochs of clipped updates."""

    prompts_per_step: int = Field(8, ge=1, description="Prompts from logged traffic per PPO step (B).")
    responses_per_prompt: int = Field(2, ge=1, description="Answers sampled for each prompt.")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs and KL are taken at it too.")
    epochs: int = Field(4, ge=1, description="Passes over one rollout's answers.")
    minibatch_size: int = Field(8, ge=1, description="Answers per gradient step.")
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip: updates are cut outside [1 − ε, 1 + ε].")
    value_clip_eps: float = Field(
        0.2, gt=0, description="How far one update may move a value prediction before clipping."
    )
    gamma: float = Field(
        1.0, ge=0, le=1, description="Discount per token; 1 because the score only arrives at the end."
    )
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ: bias (0) against variance (1) of the advantages.")
    target_kl: float = Field(
        3.0,
        gt=0,
        description="KL to the policy the penalty holds the policy near (live), in nats per answer, that the adaptive "
        "coefficient steers toward.",
    )
    kl_horizon: int = Field(
        2000,
        ge=1,
        description="Answers over which the KL coefficient can change by about 20% when off target; "
        "at least one step's answers (prompts_per_step × responses_per_prompt).",
    )
    init_kl_coef: float = Field(0.05, gt=0, description="Starting KL coefficient β of the −β·KL reward per token.")
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="Subtracted from the score of an answer cut at max_new_tokens without end-of-sequence."
    )
    policy_learning_rate: float = Field(
        1e-5, gt=0, description="AdamW learning rate of the policy's whole weights (policy.adapter = none)."
    )
    adapter_learning_rate: float = Field(
        1e-4,
        gt=0,
        description="AdamW learning rate of a LoRA adapter (policy.adapter = lora); an adapter moves the policy through "
        "a few low-rank weights and needs about ten times the whole weights' rate.",
    )
    critic_learning_rate: float = Field(
        1e-3, gt=0, description="AdamW learning rate of the critic (the value head on the policy's features)."
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Policy and value-head gradients are each clipped to this L2 norm."
    )
    candidate_every_steps: int = Field(
        10, ge=1, description="Propose the policy as a candidate for the safety gate every this many PPO steps."
    )
    min_reward_spread: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="A prompt whose answers' predicted thumbs-up probabilities (σ of the reward model's scores, after the "
        "missing-EOS penalty) "
        "all lie within this of each other is left out of the policy's update, the critic's kept (DAPO's dynamic "
        "sampling): alike answers show no direction, only the reward model's noise, and updates on them make the "
        "policy forget what no user asks. 0 learns from every prompt; needs responses_per_prompt ≥ 2.",
    )
    rollouts: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What samples the PPO answers: transformers' generate on the policy itself, or a vLLM engine "
        "beside the trainer, the policy's weights pushed into it before every rollout (faster on GPUs; on CPU not "
        "worth its engine, see BENCHMARKS.md). Under torchrun each rank has its own engine (vLLM's external launcher).",
    )
    rollout_engine: RolloutEngineSettings = Field(default_factory=RolloutEngineSettings)

    @model_validator(mode="after")
    def _answers_to_compare(self) -> "PPOSettings":
        if self.min_reward_spread > 0 and self.responses_per_prompt < 2:
            raise ValueError(
                f"ppo.min_reward_spread = {self.min_reward_spread} compares a prompt's answers, but "
                f"ppo.responses_per_prompt = {self.responses_per_prompt}: sample at least 2, or set it to 0"
            )
        return self

    @model_validator(mode="after")
    def _step_within_kl_horizon(self) -> "PPOSettings":
        answers = self.prompts_per_step * self.responses_per_prompt
        if answers > self.kl_horizon:
            raise ValueError(
                f"ppo.prompts_per_step × ppo.responses_per_prompt = {answers} answers per step is more than "
                f"ppo.kl_horizon = {self.kl_horizon}: one step would move the KL coefficient by more than 20%, "
                f"and from 5 × kl_horizon answers drive it to 0 or below; set kl_horizon to at least {answers}"
            )
        return self


class JoinStoreSettings(Settings):
    """The SQLite store joining generations with their feedback."""

    path: Path = Field(
        Path("trainer/join_store.sqlite3"), description="SQLite file; created on first use. Relative to state_dir."
    )
    ttl_seconds: float = Field(
        7 * 24 * 3600,
        gt=0,
        description="An answer without feedback, or feedback without its answer, is dropped after this long "
        "(at the trainer's next checkpoint); matches the feedback token's lifetime, after which no vote can arrive.",
    )
    vote_settle_seconds: float = Field(
        30.0,
        ge=0,
        description="A vote becomes a training label this long after it first arrives, with the value it has then; "
        "later changes never train again.",
    )
    max_pairs_per_answer: int = Field(
        4, ge=1, description="Preference pairs one answer yields as the chosen one, and as the rejected one, ever."
    )
    max_pairs_per_prompt: int = Field(16, ge=1, description="Preference pairs one prompt yields, ever.")


class CandidateCheckSettings(Settings):
    """What a candidate is checked on and held to: the gate's checks, which the trainer also runs before proposing.

    Part of the `gate` section (gate.config.GateSettings adds the gate's own settings), so both read one file.
    """

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
    max_principal_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Most of the rollback's votes on a version, and of the held-out prompts, one principal may supply; "
        "an equal share when fewer than 1/this principals take part.",
    )

    def golden_path(self) -> Path | None:
        if not self.golden_file:
            return None
        return GOLDEN_FILE if self.golden_file == "demo" else Path(self.golden_file)


class TrainerSettings(Settings):
    """The long-running `flywheel train` process."""

    metrics_port: int = Field(9401, description="Prometheus /metrics HTTP port of the trainer; 0 picks a free one.")
    host: str = Field("127.0.0.1", description="Address the trainer's /metrics binds.")
    consumer_group: str = Field("flywheel-trainer", description="Kafka consumer group of the trainer.")
    checkpoint_dir: Path = Field(
        Path("trainer/checkpoint"), description="Where checkpoints live. Relative to state_dir."
    )
    checkpoint_every_steps: int = Field(
        1, ge=1, description="Checkpoint (and commit Kafka offsets) after this many PPO steps or reward-model updates."
    )
    keep_checkpoints: int = Field(
        2,
        ge=2,
        description="Checkpoints kept on disk, newest first: the latest and at least the one before it, which a "
        "reader (a backup, an operator) may still be reading.",
    )
    min_labels_before_ppo: int = Field(
        32, ge=1, description="Standing votes the reward model must have trained on before the first PPO step."
    )
    restart_after_rejections: int = Field(
        0,
        ge=0,
        description="After this many candidates in a row rejected by the gate, the trainer's policy restarts from the "
        "live policy (fresh optimizer moments); 0, the default, never restarts.",
    )
    precheck_candidates: bool = Field(
        True,
        description="Propose a candidate only when the gate's checks (gate.thresholds, on golden and held-out "
        "prompts) pass on the trainer's own evaluation against live; off, every candidate_every_steps-th policy goes.",
    )
    min_thumbs_up_gain: float = Field(
        0.05,
        ge=-1,
        lt=1,
        description="With the pre-check on, a candidate is proposed only when the reward model predicts its thumbs-up "
        "rate on the eval set (the mean of σ(score)) above live's by more than this, absolute: a swap is worth a rise "
        "users notice, and a canary asks for gate.canary.min_improvement (0.10), which a candidate less better than "
        "about half of it mostly fails. σ(score) is a rate only while reward_model.pointwise_loss_weight > 0.",
    )
    restart_after_withheld: int = Field(
        3,
        ge=0,
        description="After this many candidates in a row that the pre-check found drifted (failing a gate check the "
        "reward model does not judge: KL, safety, degeneration, golden answers), the trainer's policy restarts from "
        "the live policy (fresh optimizer moments); one the reward model alone finds no better than live does not "
        "count. 0 never restarts.",
    )
    seed: int = Field(0, description="Seed of prompt sampling and PPO shuffling.")
    torch_threads: int = Field(
        0, ge=0, description="Threads torch computes with; 0 keeps torch's default. Set 1 when sharing few cores."
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps whole models on every rank; fsdp shards the policy, reference, value "
        "head and reward model over the ranks (torch FSDP2), for models one device cannot hold. Switching needs a "
        "fresh checkpoint directory (their optimizer moments are saved differently). One process ignores it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_settings(cls, data: object) -> object:
        if isinstance(data, dict) and "min_reward_gain" in data:
            raise ValueError(
                "trainer.min_reward_gain is retired: set trainer.min_thumbs_up_gain, the rise of the thumbs-up rate "
                "the reward model must predict over live's (an absolute rise, e.g. 0.05), not reward-model units"
            )
        return data


class TrainerConfig(BaseModel):
    """The sections of the configuration the trainer reads (`flywheel train` is handed cli.config.TrainConfig, one of these)."""

    trainer: TrainerSettings
    reward_model: RewardModelSettings
    ppo: PPOSettings
    join_store: JoinStoreSettings
    gate: CandidateCheckSettings = Field(default_factory=CandidateCheckSettings)
    """The gate's checks, run before proposing (trainer.precheck_candidates)."""
    kafka: KafkaSettings
    spool: SpoolSettings
    registry_dir: Path
    policy: PolicySettings = Field(default_factory=PolicySettings)

    @model_validator(mode="after")
    def adapters_train_whole_on_every_rank(self) -> "TrainerConfig":
        if self.policy.uses_adapters and self.trainer.parallelism == "fsdp":
            raise ValueError(
                "policy.adapter = lora trains under trainer.parallelism = ddp only: an adapter is small enough "
                "for every rank to hold whole, and sharding one is not supported (the model directory's "
                "flywheel.toml may have chosen adapters, as the demo model's does: set policy.adapter = none "
                "to shard whole weights)"
            )
        return self
