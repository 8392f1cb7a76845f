"""Keeping a running server on the live policy: verify, drain, reload in place, flip the version.

The registry's live pointer is the truth; policy events on Kafka only say "look now", and a
periodic look covers events lost with a restarted broker. A swap pauses admission and waits
for running requests to finish before it reloads, so no request sees two sets of weights.
"""

import asyncio
import logging
import time

from feedback.config import TopicNames
from feedback.consumer import EventConsumer
from flywheel.registry import CorruptPolicy, PolicyRegistry
from flywheel.v1 import events_pb2
from server.admission import AdmissionController
from server.engine import PolicyEngine
from server.metrics import ServingMetrics
from server.policy import EventLog, LivePolicy

log = logging.getLogger(__name__)


class PolicySwapper:
    def __init__(
        self,
        engine: PolicyEngine,
        policy: LivePolicy,
        admission: AdmissionController,
        registry: PolicyRegistry,
        metrics: ServingMetrics,
        events: EventLog | None,
        topics: TopicNames,
        server_id: str,
    ):
        self._engine = engine
        self._policy = policy
        self._admission = admission
        self._registry = registry
        self._metrics = metrics
        self._events = events
        self._topics = topics
        self._server_id = server_id
        self._refused: set[tuple[int, str]] = set()  # (version, digest) that failed verification
        self._lock = asyncio.Lock()

    async def sync(self) -> bool:
        """Swap to the registry's live version if this server is on another one; return whether it swapped."""
        async with self._lock:
            live = await asyncio.to_thread(self._registry.live)
            if live is None or live.version == self._policy.current.version:
                return False
            return await self._swap_to(live.version)

    async def _swap_to(self, version: int) -> bool:
        path = self._registry.path(version)
        try:
            manifest = await asyncio.to_thread(self._registry.verify, version)
        except CorruptPolicy as error:
            if (version, str(error)) not in self._refused:
                self._refused.add((version, str(error)))
                self._metrics.policy_swaps.labels(outcome="digest_mismatch").inc()
                log.error("refusing to load policy %d: %s", version, error)
            return False
        try:
            async with self._admission.paused():
                paused_at = time.monotonic()
                await self._engine.reload_weights(str(path))
                self._policy.current = LivePolicy.snapshot(version, str(path), manifest.digest)
                paused_seconds = time.monotonic() - paused_at
        except Exception:
            self._metrics.policy_swaps.labels(outcome="failed").inc()
            log.exception("reloading policy %d failed; still serving %d", version, self._policy.current.version)
            return False
        self._metrics.policy_swaps.labels(outcome="ok").inc()
        self._metrics.policy_swap_seconds.observe(paused_seconds)
        self._metrics.policy_version.set(version)
        log.info("policy %d is live", version, extra={"policy_version": version, "paused_seconds": round(paused_seconds, 4)})
        if self._events is not None:
            self._events.publish(self._topics.policy, str(version), self._live_event(version, manifest.digest, str(path)))
        return True

    def _live_event(self, version: int, digest: str, path: str) -> events_pb2.PolicyEvent:
        event = events_pb2.PolicyEvent(
            event_id=f"live-{self._server_id}-{version}-{time.time_ns()}",
            kind=events_pb2.POLICY_EVENT_KIND_LIVE,
            policy_version=version,
            path=path,
            digest=digest,
            server_id=self._server_id,
        )
        event.at.GetCurrentTime()
        return event

    async def run(self, consumer: EventConsumer | None, poll_seconds: float) -> None:
        """Follow the live pointer until cancelled: at every policy event, and every `poll_seconds`."""
        while True:
            try:
                await self.sync()
            except OSError:
                log.exception("cannot read the policy registry; trying again in %.0f s", poll_seconds)
            if consumer is None:
                await asyncio.sleep(poll_seconds)
                continue
            try:
                await consumer.poll(timeout_ms=int(poll_seconds * 1000))
            except Exception as error:  # Kafka down: the periodic look carries on alone
                log.warning("policy events unavailable (%s); checking the registry every %.0f s", error, poll_seconds)
                await asyncio.sleep(poll_seconds)
