"""Prometheus metrics of the serving process. Each server owns its registry."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; spans a tiny CPU model's milliseconds up to long answers on big models.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "flywheel_grpc_requests",
            "Finished RPCs by method and gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "flywheel_requests_in_flight", "Generate requests running in the engine.", registry=registry
        )
        self.queued = Gauge(
            "flywheel_requests_queued", "Generate requests waiting for an engine slot.", registry=registry
        )
        self.queue_seconds = Histogram(
            "flywheel_queue_seconds",
            "Time a request waited for an engine slot.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "flywheel_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "flywheel_request_duration_seconds",
            "Time from arrival to the last generated token.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("flywheel_prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.completion_tokens = Counter("flywheel_completion_tokens", "Tokens generated.", registry=registry)
        self.feedback = Counter(
            "flywheel_feedback",
            "Accepted feedback by rating (up, down, preference) and the policy version that wrote the answer.",
            ["rating", "policy_version"],
            registry=registry,
        )
        self.feedback_rejected = Counter(
            "flywheel_feedback_rejected",
            "Refused feedback by reason (invalid, forbidden, unknown_response, rate_limited).",
            ["reason"],
            registry=registry,
        )
        self.policy_swaps = Counter(
            "flywheel_policy_swaps",
            "Policy swaps by outcome (ok, digest_mismatch, foreign_base, failed).",
            ["outcome"],
            registry=registry,
        )
        self.policy_swap_seconds = Histogram(
            "flywheel_policy_swap_seconds",
            "Time admission was paused for a swap: draining running requests and reloading weights (0 for an adapter).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.policy_version = Gauge(
            "flywheel_policy_version", "Version of the policy this server answers with.", registry=registry
        )
        self.answers = Counter(
            "flywheel_answers",
            "Answers by the policy version that wrote them: live's and the canary's (their ratio is the canary share).",
            ["policy_version"],
            registry=registry,
        )
        self.canary_version = Gauge(
            "flywheel_canary_version", "Version serving the canary share beside live; 0 when none.", registry=registry
        )
        self.canary_share = Gauge(
            "flywheel_canary_share", "Share of users the canary is meant to answer; 0 when none.", registry=registry
        )


class PolicyCheckMetrics:
    """The check of policy versions against their manifests, at start-up and before each swap.

    Apart from ServingMetrics because the start-up check runs before the server that owns those exists.
    """

    def __init__(self, registry: CollectorRegistry):
        self.refusals = Counter(
            "flywheel_policy_refusals",
            "Checks of a policy version against its manifest that failed, at start-up or before a swap, by version; "
            "a refused version is checked again with exponential back-off.",
            ["policy_version"],
            registry=registry,
        )
