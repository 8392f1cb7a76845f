"""Assemble and run the gRPC server: service, health, reflection, metrics, events, swaps, graceful shutdown."""

import asyncio
import contextlib
import gc
import logging
import math
import signal
import uuid
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from aiohttp import web
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from feedback.config import KafkaSettings, SpoolSettings, TopicNames
from feedback.consumer import EventConsumer
from feedback.intake import FeedbackIntake
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.adapters import PolicySettings
from flywheel.registry import PolicyRegistry, weights_digest
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from server.admission import AdmissionController
from server.config import EngineSettings, ServerSettings
from server.engine import PolicyEngine
from server.interceptors import FlywheelInterceptor
from server.metrics import PolicyCheckMetrics, ServingMetrics
from server.openai_api import OpenAIDoor, ssl_context
from server.policy import EventLog, LivePolicy
from server.service import FlywheelService, random_token_secret
from server.swap import NoServablePolicy, PolicyChecker, PolicySwapper, startup_policy
from server.tls import add_grpc_port

log = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Flywheel"].full_name


@dataclass
class FlywheelServer:
    """One running gRPC front end over an engine; several may share one engine (tests do)."""

    grpc_server: aio.Server
    health: health_aio.HealthServicer
    metrics_http: WSGIServer
    metrics: ServingMetrics
    registry: CollectorRegistry
    address: str
    metrics_url: str
    policy: LivePolicy
    admission: AdmissionController
    server_id: str
    http_runner: web.AppRunner | None = None
    http_url: str | None = None
    """Base URL of the OpenAI-compatible door (http://host:port/v1), when server.http_port is set."""

    @classmethod
    async def start(
        cls,
        settings: ServerSettings,
        engine: PolicyEngine,
        *,
        policy_version: int = 0,
        policy_digest: str | None = None,
        adapter_path: str | None = None,
        events: EventLog | None = None,
        topics: TopicNames | None = None,
        registry: CollectorRegistry | None = None,
    ) -> "FlywheelServer":
        """Serve `engine`, whose weights are `policy_version`; log to `events` when given.

        policy_digest: the registry manifest's digest of the policy; None hashes the engine's weight files.
        adapter_path: the policy's adapter, applied to the engine's base per request; None for the engine's weights.
        """
        registry = registry or CollectorRegistry()
        metrics = ServingMetrics(registry)
        principals_by_digest = settings.principals_by_key_digest()
        places = settings.max_in_flight + settings.max_queued
        admission = AdmissionController(
            settings.max_in_flight,
            settings.max_queued,
            max(1, math.floor(settings.max_principal_share * places)) if principals_by_digest else None,
        )
        metrics.in_flight.set_function(lambda: admission.in_flight)
        metrics.queued.set_function(lambda: admission.queued)
        digest = policy_digest or await asyncio.to_thread(weights_digest, engine.model_path)
        policy = LivePolicy(
            LivePolicy.snapshot(policy_version, adapter_path or engine.model_path, digest, adapter_path)
        )
        metrics.policy_version.set(policy_version)

        if settings.feedback_token_secret is None:
            log.warning("no feedback_token_secret configured: using a random key, so tokens die with this process")
            token_secret = random_token_secret()
        else:
            token_secret = settings.feedback_token_secret.get_secret_value().encode()
        grpc_server = aio.server(
            interceptors=[FlywheelInterceptor(metrics, principals_by_digest)],
            # A larger request is refused (RESOURCE_EXHAUSTED) before it is parsed.
            options=[("grpc.max_receive_message_length", settings.limits.max_request_bytes)],
        )
        port = add_grpc_port(grpc_server, settings)  # TLS when settings name a certificate
        server_id = settings.server_id or f"{settings.host}:{port}"
        service = FlywheelService(
            engine=engine,
            policy=policy,
            admission=admission,
            limits=settings.limits,
            metrics=metrics,
            feedback_token_secret=token_secret,
            feedback_token_ttl_seconds=settings.feedback_token_ttl_seconds,
            intake=FeedbackIntake(token_secret, settings.feedback, max_user_id_chars=settings.limits.max_user_id_chars),
            events=events,
            topics=topics or TopicNames(),
            server_id=server_id,
        )
        serving_pb2_grpc.add_FlywheelServicer_to_server(service, grpc_server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            grpc_server,
        )
        await grpc_server.start()
        http_runner, http_url = None, None
        if settings.http_port is not None:
            http_runner, http_url = await start_openai_door(settings, service, metrics, principals_by_digest)

        metrics_http, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
        for service_name in ("", SERVICE_NAME):
            await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        server = cls(
            grpc_server=grpc_server,
            health=health,
            metrics_http=metrics_http,
            metrics=metrics,
            registry=registry,
            address=f"{settings.host}:{port}",
            metrics_url=f"http://{settings.host}:{metrics_http.server_port}/metrics",
            policy=policy,
            admission=admission,
            server_id=server_id,
            http_runner=http_runner,
            http_url=http_url,
        )
        log.info(
            "serving",
            extra={
                "address": server.address,
                "metrics_url": server.metrics_url,
                "http_url": http_url,
                "policy_version": policy_version,
            },
        )
        return server

    async def stop(self, grace_seconds: float) -> None:
        """Turn health NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        stopping = [self.grpc_server.stop(grace_seconds)]
        if self.http_runner is not None:
            stopping.append(self.http_runner.cleanup())  # waits for answers in flight, up to the grace period
        await asyncio.gather(*stopping)
        self.metrics_http.shutdown()
        self.metrics_http.server_close()


async def start_openai_door(
    settings: ServerSettings, service: FlywheelService, metrics: ServingMetrics, principals_by_digest: dict[str, str]
) -> tuple[web.AppRunner, str]:
    """The OpenAI-compatible HTTP door on this event loop, over the same service; (its runner, its base URL)."""
    door = OpenAIDoor(service, metrics, principals_by_digest)
    runner = door.runner(
        settings.limits.max_request_bytes,
        client_timeout_seconds=settings.http_client_timeout_seconds,
        shutdown_timeout_seconds=settings.grace_period_seconds,
    )
    await runner.setup()
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = ssl_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    site = web.TCPSite(runner, settings.host, settings.http_port, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"{'https' if tls else 'http'}://{settings.host}:{port}/v1"


async def serve(
    settings: ServerSettings,
    engine_settings: EngineSettings,
    kafka: KafkaSettings,
    spool: SpoolSettings,
    policies: PolicyRegistry,
    policy_settings: PolicySettings | None = None,
) -> None:
    """Run one server on the registry's live policy until SIGINT or SIGTERM, following swaps.

    The live version is verified first, as a swap verifies it; a refused one is served by an earlier
    version when `startup_policy` finds one, and otherwise the process exits naming the version and why.
    """
    policy_settings = policy_settings or PolicySettings()
    live = policies.live()
    if live is None:
        raise RuntimeError(f"the policy registry {policies.root} has no live policy; run `flywheel up` or publish one")
    registry = CollectorRegistry()
    checker = PolicyChecker(
        policies, PolicyCheckMetrics(registry), settings.policy_poll_seconds, settings.policy_refused_retry_max_seconds
    )
    base_digest = serving_base_digest(policies, live.version) if policy_settings.uses_adapters else None
    try:
        version, manifest = startup_policy(checker, live, base_digest)
    except NoServablePolicy as error:
        raise SystemExit(f"flywheel serve: {error}") from None
    # In adapter mode the engine runs the base and the live adapter applies per request.
    engine_version = manifest.base_version or version
    engine = PolicyEngine.start(engine_settings, str(policies.path(engine_version)), policy_settings)
    adapter_path = str(policies.path(version)) if manifest.is_adapter else None
    event_metrics = EventMetrics.register(registry)
    producer = None
    if settings.log_generations:
        producer = EventProducer(kafka, spool, event_metrics)
        await producer.start()
    server = await FlywheelServer.start(
        settings,
        engine,
        policy_version=version,
        policy_digest=manifest.digest,
        adapter_path=adapter_path,
        events=producer,
        topics=kafka.topics,
        registry=registry,
    )
    swapper = PolicySwapper(
        engine,
        server.policy,
        server.admission,
        checker,
        server.metrics,
        producer,
        kafka.topics,
        server.server_id,
        base_digest=policies.manifest(engine_version).digest,
        canary_replica=settings.canary_replica,
    )
    policy_events = EventConsumer(
        kafka, f"flywheel-server-{server.server_id}-{uuid.uuid4().hex[:8]}", event_metrics, [kafka.topics.policy]
    )
    following = asyncio.create_task(_follow_policies(swapper, policy_events, settings.policy_poll_seconds))
    freeze_startup_heap()
    try:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("shutting down", extra={"grace_seconds": settings.grace_period_seconds})
        following.cancel()
        await server.stop(settings.grace_period_seconds)
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        if producer is not None:
            await producer.stop()
        engine.shutdown()


def serving_base_digest(policies: PolicyRegistry, version: int) -> str:
    """The digest of the whole weights an adapter-mode server runs for `version`: its base, or itself."""
    manifest = policies.manifest(version)
    return policies.manifest(manifest.base_version).digest if manifest.is_adapter else manifest.digest


def freeze_startup_heap() -> None:
    """Put every object alive after start-up out of the garbage collector's reach.

    They live as long as the process, and a full collection would walk them all: the engine's and the
    libraries' start-up heap took 0.4 s to scan on 2 cores, every answer in flight waiting.
    """
    gc.collect()
    gc.freeze()


async def _follow_policies(swapper: PolicySwapper, policy_events: EventConsumer, poll_seconds: float) -> None:
    consumer = None
    try:
        await policy_events.start()
        consumer = policy_events
    except Exception as error:
        log.warning("cannot follow policy events (%s); checking the registry every %.0f s", error, poll_seconds)
    try:
        await swapper.run(consumer, poll_seconds)
    finally:
        if consumer is not None:
            await consumer.stop()
