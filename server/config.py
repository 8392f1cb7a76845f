"""Settings of the serving process (one section of the process config)."""

from pathlib import Path

from pydantic import Field, SecretStr

from feedback.identity import ApiKey, principals_by_digest, read_api_keys_file
from feedback.intake import IntakeLimits
from flywheel.settings import Settings
from server.validation import RequestLimits


class EngineSettings(Settings):
    """How the vLLM engine runs the policy."""

    model: str = Field("", description="Hugging Face model directory to serve; empty means the built-in demo model.")
    dtype: str = Field(
        "auto", description="Weight and activation dtype passed to vLLM (auto, float32, bfloat16, float16)."
    )
    max_model_len: int | None = Field(None, description="Context length in tokens; unset means the model's own.")
    kv_cache_bytes: int = Field(
        1 << 30, ge=0, description="KV-cache size in bytes; 0 lets vLLM size it from gpu_memory_utilization (GPU)."
    )
    gpu_memory_utilization: float = Field(0.9, description="Fraction of accelerator memory vLLM may take (GPU only).")
    enforce_eager: bool = Field(True, description="Skip graph compilation: faster start, slower steps.")
    seed: int = Field(0, description="Engine seed for requests that give none.")


class ServerSettings(Settings):
    """The gRPC front end: limits, auth and feedback tokens."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9400, description="Prometheus /metrics HTTP port; 0 picks a free one.")
    http_port: int | None = Field(
        None,
        description="OpenAI-compatible HTTP port (/v1/chat/completions, /v1/models, /v1/feedback) beside gRPC, "
        "with its keys, limits and TLS; unset means off, 0 picks a free one.",
    )
    http_client_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long the HTTP door waits on a client: for a request's headers (from the connection's "
        "opening or its last answer), for its body, and to take each part of a streamed answer; a slower client is "
        "answered 408 or disconnected.",
    )
    server_id: str = Field("", description="Name of this replica in logs and events; empty means host:port.")
    max_in_flight: int = Field(32, ge=1, description="Requests running in the engine at once.")
    max_queued: int = Field(64, ge=0, description="Requests waiting for an engine slot; beyond it RESOURCE_EXHAUSTED.")
    max_principal_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="With API keys: most of the running and waiting places (max_in_flight + max_queued) one "
        "principal may hold.",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits)
    grace_period_seconds: float = Field(30.0, ge=0, description="How long in-flight requests may finish at shutdown.")
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="Accepted API keys, as {principal, sha256}; none (and no api_keys_file) means no auth, one principal.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of accepted API keys, one `PRINCIPAL SHA256HEX` per line (`flywheel key new` makes one).",
    )
    feedback_token_secret: SecretStr | None = Field(
        None,
        description="HMAC key for feedback tokens; must be shared by all replicas. Unset: a random per-process key.",
    )
    feedback_token_ttl_seconds: int = Field(7 * 24 * 3600, ge=1, description="How long a feedback token stays valid.")
    feedback: IntakeLimits = Field(default_factory=IntakeLimits)
    log_generations: bool = Field(
        True, description="Log every answer to Kafka (GenerationLogged); the trainer needs it."
    )
    policy_poll_seconds: float = Field(
        5.0, gt=0, description="How often the server also checks the registry's live pointer, besides policy events."
    )
    canary_replica: bool = Field(
        False,
        description="Whole weights: this replica serves the registry's canary while one runs against live (an in-place "
        "reload, as any swap), and live otherwise. The share of canary replicas among all is the canary's share of "
        "traffic; a load balancer hashing on the x-flywheel-user header keeps each user on one replica.",
    )
    policy_refused_retry_max_seconds: float = Field(
        300.0,
        gt=0,
        description="Longest wait before a refused policy version is verified again; the wait doubles from policy_poll_seconds.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gRPC port; unset means plaintext. Re-read when it changes."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA certificates; when set, every client must present a certificate they signed (mutual TLS).",
    )

    def principals_by_key_digest(self) -> dict[str, str]:
        """sha256 of each accepted key -> its principal; empty means no auth."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += read_api_keys_file(self.api_keys_file)
        return principals_by_digest(keys)
