"""Assemble and run the gRPC server: service, health, reflection, metrics, graceful shutdown."""

import asyncio
import logging
import signal
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from flywheel.registry import weights_digest
from flywheel.v1 import serving_pb2, serving_pb2_grpc
from server.admission import AdmissionController
from server.config import ServerSettings
from server.engine import PolicyEngine
from server.interceptors import FlywheelInterceptor
from server.metrics import ServingMetrics
from server.policy import LivePolicy
from server.service import FlywheelService, random_token_secret
from server.validation import RequestLimits

log = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Flywheel"].full_name


@dataclass
class FlywheelServer:
    """One running gRPC front end over an engine; several may share one engine (tests do)."""

    grpc_server: aio.Server
    health: health_aio.HealthServicer
    metrics_http: WSGIServer
    metrics: ServingMetrics
    address: str
    metrics_url: str
    policy: LivePolicy

    @classmethod
    async def start(cls, settings: ServerSettings, engine: PolicyEngine, policy_version: int = 0) -> "FlywheelServer":
        registry = CollectorRegistry()
        metrics = ServingMetrics(registry)
        admission = AdmissionController(settings.max_in_flight, settings.max_queued)
        metrics.in_flight.set_function(lambda: admission.in_flight)
        metrics.queued.set_function(lambda: admission.queued)
        policy = LivePolicy(LivePolicy.snapshot(policy_version, engine.model_path, weights_digest(engine.model_path)))
        metrics.policy_version.set(policy_version)

        if settings.feedback_token_secret is None:
            log.warning("no feedback_token_secret configured: using a random key, so tokens die with this process")
            token_secret = random_token_secret()
        else:
            token_secret = settings.feedback_token_secret.get_secret_value().encode()
        service = FlywheelService(
            engine=engine,
            policy=policy,
            admission=admission,
            limits=RequestLimits(
                default_max_tokens=settings.default_max_tokens,
                max_tokens_limit=settings.max_tokens_limit,
                max_message_chars=settings.max_message_chars,
                max_stop_strings=settings.max_stop_strings,
            ),
            metrics=metrics,
            feedback_token_secret=token_secret,
            feedback_token_ttl_seconds=settings.feedback_token_ttl_seconds,
        )

        grpc_server = aio.server(interceptors=[FlywheelInterceptor(metrics, settings.accepted_api_keys())])
        serving_pb2_grpc.add_FlywheelServicer_to_server(service, grpc_server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), grpc_server)
        port = grpc_server.add_insecure_port(f"{settings.host}:{settings.port}")
        await grpc_server.start()

        metrics_http, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
        for service_name in ("", SERVICE_NAME):
            await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        server = cls(
            grpc_server=grpc_server,
            health=health,
            metrics_http=metrics_http,
            metrics=metrics,
            address=f"{settings.host}:{port}",
            metrics_url=f"http://{settings.host}:{metrics_http.server_port}/metrics",
            policy=policy,
        )
        log.info("serving", extra={"address": server.address, "metrics_url": server.metrics_url, "policy_version": policy_version})
        return server

    async def stop(self, grace_seconds: float) -> None:
        """Turn health NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_seconds)
        self.metrics_http.shutdown()
        self.metrics_http.server_close()


async def serve(settings: ServerSettings, engine_settings, model_path: str) -> None:
    """Run one server until SIGINT or SIGTERM."""
    engine = PolicyEngine.start(engine_settings, model_path)
    try:
        server = await FlywheelServer.start(settings, engine)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("shutting down", extra={"grace_seconds": settings.grace_period_seconds})
        await server.stop(settings.grace_period_seconds)
    finally:
        engine.shutdown()
