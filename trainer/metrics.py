"""Prometheus metrics of the trainer process."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# PPOStepStats field -> (metric name, help)
PPO_GAUGES = {
    "mean_reward": ("flywheel_trainer_mean_reward", "Mean per-answer reward of the last PPO step (score − β·KL)."),
    "mean_score": ("flywheel_trainer_mean_score", "Mean reward-model score of the last PPO step's answers."),
    "kl_to_reference": (
        "flywheel_trainer_kl_to_reference",
        "KL of the last PPO step's answers to the policy its KL penalty holds it near (live, once live moved from "
        "where training began), nats per answer.",
    ),
    "kl_coef": ("flywheel_trainer_kl_coef", "KL coefficient β used in the last PPO step."),
    "approx_kl": (
        "flywheel_trainer_approx_kl",
        "Approximate KL between the policy before and after the last PPO step's updates, per token.",
    ),
    "clip_fraction": (
        "flywheel_trainer_clip_fraction",
        "Share of tokens whose ratio was clipped in the last PPO step.",
    ),
    "entropy": ("flywheel_trainer_entropy", "Policy entropy per answer token in the last PPO step, nats."),
    "value_loss": ("flywheel_trainer_value_loss", "Critic loss of the last PPO step."),
    "value_clip_fraction": (
        "flywheel_trainer_value_clip_fraction",
        "Share of tokens whose value prediction was clipped in the last PPO step.",
    ),
    "explained_variance": (
        "flywheel_trainer_explained_variance",
        "Share of the returns' variance the critic explained in the last PPO step.",
    ),
    "learning_answer_fraction": (
        "flywheel_trainer_learning_answer_fraction",
        "Share of the last PPO step's answers the policy learnt from: those of prompts whose answers the reward "
        "model tells apart (ppo.min_reward_spread).",
    ),
    "tokens_per_second": (
        "flywheel_trainer_tokens_per_second",
        "Answer tokens per second of the last PPO step (scoring and updates).",
    ),
}


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.events_consumed = Counter(
            "flywheel_trainer_events_consumed",
            "Events read from Kafka, repeats included.",
            ["topic"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "flywheel_trainer_consumer_lag",
            "Records in Kafka not yet read by the trainer.",
            ["topic"],
            registry=registry,
        )
        self.ppo_steps = Counter("flywheel_trainer_ppo_steps", "PPO steps taken.", registry=registry)
        self.step_seconds = Histogram(
            "flywheel_trainer_step_seconds",
            "Wall time of one PPO step, rollout included.",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.last_step_timestamp = Gauge(
            "flywheel_trainer_last_step_timestamp_seconds",
            "Unix time of the last PPO step (the trainer's start time until its first step).",
            registry=registry,
        )
        self.last_step_timestamp.set_to_current_time()
        self.ppo = {
            field: Gauge(name, description, registry=registry) for field, (name, description) in PPO_GAUGES.items()
        }
        self.reward_model_updates = Counter(
            "flywheel_reward_model_updates", "Reward-model updates from new labels.", registry=registry
        )
        self.reward_model_accuracy = Gauge(
            "flywheel_reward_model_pairwise_accuracy",
            "Reward model's pairwise accuracy on held-out feedback.",
            registry=registry,
        )
        self.reward_model_calibration_error = Gauge(
            "flywheel_reward_model_calibration_error",
            "Expected calibration error of the reward model's thumbs-up probability on held-out thumbs.",
            registry=registry,
        )
        self.candidates = Counter(
            "flywheel_trainer_candidates", "Candidate policies proposed to the gate.", registry=registry
        )
        self.policy_restarts = Counter(
            "flywheel_trainer_policy_restarts",
            "Restarts of the trained policy from the live one: candidates rejected or withheld in a row, or live "
            "moved to another lineage.",
            registry=registry,
        )
        self.candidates_withheld = Counter(
            "flywheel_trainer_candidates_withheld",
            "Candidates the trainer's pre-check of the gate's checks kept back, once under each check they failed; "
            "check canary_running: held while the gate decides a canary.",
            ["check"],
            registry=registry,
        )
        self.waiting_for_gate = Gauge(
            "flywheel_trainer_waiting_for_gate",
            "The version whose decision PPO steps wait for (the trainer's last candidate, or a canary); 0 when none.",
            registry=registry,
        )
        self.kl_to_live = Gauge(
            "flywheel_trainer_kl_to_live",
            "KL(policy ‖ live policy) at the last pre-check, nats per answer.",
            registry=registry,
        )
