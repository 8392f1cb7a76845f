"""Keeping a running server on the live policy (and the canary): verify, load, flip the version.

The registry's live pointer is the truth; policy events on Kafka only say "look now", and a
periodic look covers events lost with a restarted broker. A whole-weight swap pauses admission
and waits for running requests to finish before it reloads, so no request sees two sets of
weights. An adapter swap pauses nothing: the new adapter is loaded beside the old one and new
requests name it, while running ones finish on the adapter they started with. A server loads
no version, at start-up or in a swap, that `PolicyChecker.verify` refuses; in adapter mode that
includes an adapter trained on another base than the one the server runs.

A canary runs beside live in the one engine of an adapter server. With whole weights a canary is
a share of replicas: a server marked as a canary replica swaps to the canary while it runs, by the
same drained reload, and back to live when it ends (`whole_weight_version`).
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from feedback.config import TopicNames
from feedback.consumer import EventConsumer
from feedback.policy_events import policy_event
from flywheel.registry import CanaryRecord, CorruptPolicy, LiveRecord, PolicyManifest, PolicyRegistry
from flywheel.v1 import events_pb2
from server.admission import AdmissionController
from server.metrics import PolicyCheckMetrics, ServingMetrics
from server.policy import CanaryServing, EventLog, LivePolicy, PolicySnapshot, whole_weight_version

if TYPE_CHECKING:  # the start-up check and its tests run without importing vLLM
    from server.engine import PolicyEngine

log = logging.getLogger(__name__)


class PolicyRefused(Exception):
    """This server will not load a policy version: its files do not match its manifest, or it is not in the registry."""

    def __init__(self, version: int, reason: str, outcome: str = "digest_mismatch"):
        super().__init__(reason)
        self.version = version
        self.reason = reason
        self.outcome = outcome
        """The swap outcome it counts as: digest_mismatch, or foreign_base for an adapter this server cannot apply."""


class ForeignBase(ValueError):
    """An adapter this server cannot apply: it serves whole weights, or another base."""


class NoServablePolicy(Exception):
    """At start-up, the live version is refused and no earlier version may stand in for it."""


def refusal_backoff_seconds(refusals: int, first_seconds: float, max_seconds: float) -> float:
    """Seconds to wait before checking a version again after its `refusals`-th refusal in a row (1, 2, …).

    Doubles from first_seconds and stops at max_seconds: 5, 10, 20, … 300 s with the defaults.
    """
    return min(max_seconds, first_seconds * 2.0 ** min(refusals - 1, 60))


def fallback_versions(live_version: int, history: Sequence[LiveRecord]) -> list[int]:
    """Versions a starting server may serve instead of a refused live one, the one to try first first.

    Every version the live pointer has held, newest first, except the live one and any version a
    rollback moved away from: a rollback judged it bad, so only the refused version's
    predecessors that nobody judged bad stand in for it.
    """
    rolled_back = {record.previous_version for record in history if record.kind == "rollback"}
    candidates: list[int] = []
    for record in reversed(history):
        if record.version != live_version and record.version not in rolled_back and record.version not in candidates:
            candidates.append(record.version)
    return candidates


@dataclass(frozen=True)
class Refusal:
    reason: str
    refusals: int
    """Refusals in a row, this one included."""
    retry_at: float
    """time.monotonic() from which the version is checked again."""


class PolicyChecker:
    """The check a policy version passes before this server loads it, at start-up and before every swap.

    It re-hashes every file of the version against its manifest (`PolicyRegistry.verify`). A
    refused version is counted and logged, and checked again only once a back-off has passed,
    doubling from `first_retry_seconds` to `max_retry_seconds`: a registry's files do not change,
    so re-hashing gigabytes at every look would only burn a core. A repaired version passes at
    its next check; another live version is checked at once.
    """

    def __init__(
        self,
        registry: PolicyRegistry,
        metrics: PolicyCheckMetrics,
        first_retry_seconds: float,
        max_retry_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.registry = registry
        self._metrics = metrics
        self._first_retry_seconds = first_retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._clock = clock
        self._refusals: dict[int, Refusal] = {}

    def due(self, version: int) -> bool:
        """Whether `version` may be checked now: never refused, or its back-off has passed."""
        refusal = self._refusals.get(version)
        return refusal is None or self._clock() >= refusal.retry_at

    def verify(self, version: int, base_digest: str | None = None) -> PolicyManifest:
        """The manifest of `version` when every file matches it; raises PolicyRefused. Blocks while hashing.

        `base_digest`: the whole weights this server's engine runs, when it serves adapters; an
        adapter trained on other weights is refused (it would run, and answer nonsense).
        """
        try:
            manifest = self.registry.verify(version)
            refuse_foreign_base(manifest, base_digest)
        except (CorruptPolicy, ValueError) as error:  # ValueError: no such version in the registry
            previous = self._refusals.get(version)
            refusals = previous.refusals + 1 if previous else 1
            wait = refusal_backoff_seconds(refusals, self._first_retry_seconds, self._max_retry_seconds)
            self._refusals[version] = Refusal(str(error), refusals, self._clock() + wait)
            self._metrics.refusals.labels(policy_version=str(version)).inc()
            log.error(
                "refusing policy version %d (refusal %d in a row, next check in %.0f s): %s",
                version,
                refusals,
                wait,
                error,
            )
            outcome = "foreign_base" if isinstance(error, ForeignBase) else "digest_mismatch"
            raise PolicyRefused(version, str(error), outcome) from error
        if self._refusals.pop(version, None) is not None:
            log.info("policy version %d matches its manifest again", version)
        return manifest


def refuse_foreign_base(manifest: PolicyManifest, base_digest: str | None) -> None:
    """Raise ForeignBase when `manifest` is an adapter this server cannot apply: it serves whole weights
    (`base_digest` None), or another base than the adapter's."""
    if not manifest.is_adapter:
        return
    if base_digest is None:
        raise ForeignBase(
            f"policy version {manifest.version} is an adapter (on version {manifest.base_version}), and this "
            f'server serves whole weights: start it with policy.adapter = "lora"'
        )
    if manifest.base_digest != base_digest:
        raise ForeignBase(
            f"policy version {manifest.version} is an adapter on base digest {manifest.base_digest}, and this "
            f"server serves base digest {base_digest}: an adapter runs only on the weights it was trained on"
        )


def startup_policy(
    checker: PolicyChecker, live: LiveRecord, base_digest: str | None = None
) -> tuple[int, PolicyManifest]:
    """The version a starting server loads, and its manifest: the live one if the checker passes it.

    Otherwise the first of `fallback_versions` that passes, so a restarted replica serves what the
    running replicas, which refused the same version, still serve; the refusal stays counted for
    the alert and the swapper keeps checking the live version. Raises NoServablePolicy naming the
    version and why when none passes.
    """
    try:
        return live.version, checker.verify(live.version, base_digest)
    except PolicyRefused as refused:
        live_refused = refused
    tried: list[str] = []
    for version in fallback_versions(live.version, checker.registry.history()):
        try:
            manifest = checker.verify(version, base_digest)
        except PolicyRefused as refused:
            tried.append(f"version {version}: {refused.reason}")
            continue
        log.error(
            "serving policy version %d instead of the live version %d, which is refused: %s",
            version, live.version, live_refused.reason,
        )  # fmt: skip
        return version, manifest
    fallbacks = "; ".join(tried) if tried else "the live pointer held no other version no rollback moved away from"
    raise NoServablePolicy(
        f"refusing to serve live policy version {live.version}: {live_refused.reason}. "
        f"No earlier version may stand in ({fallbacks}). Repair the version's files, or point the "
        f"registry at a good version with `flywheel rollback --to N`."
    )


class PolicySwapper:
    def __init__(
        self,
        engine: "PolicyEngine",
        policy: LivePolicy,
        admission: AdmissionController,
        checker: PolicyChecker,
        metrics: ServingMetrics,
        events: EventLog | None,
        topics: TopicNames,
        server_id: str,
        base_digest: str | None = None,
        canary_replica: bool = False,
    ):
        """`base_digest`: the digest of the whole-weight version the engine runs (for an engine serving adapters).
        `canary_replica`: a whole-weight server that serves the registry's canary while one runs."""
        self._engine = engine
        self._policy = policy
        self._admission = admission
        self._checker = checker
        self._registry = checker.registry
        self._metrics = metrics
        self._events = events
        self._topics = topics
        self._server_id = server_id
        self._lock = asyncio.Lock()
        self._base_digest = base_digest if engine.serves_adapters else None
        """The digest of the whole weights in the engine, when it serves adapters on them."""
        self._canary_replica = canary_replica

    async def sync(self) -> bool:
        """Swap to the version this server should run (`whole_weight_version`: live, or on a canary
        replica the canary), then follow the canary pointer; return whether it swapped.

        A version the checker refused is left alone until its back-off has passed.
        """
        async with self._lock:
            live = await asyncio.to_thread(self._registry.live)
            canary = await asyncio.to_thread(self._registry.canary)
            swapped = False
            if live is not None:
                wanted = whole_weight_version(live.version, canary, self._canary_replica)
                if wanted != self._policy.current.version and self._checker.due(wanted):
                    swapped = await self._swap_to(wanted, as_canary=wanted != live.version)
            if self._canary_replica:
                serving_canary = canary is not None and canary.version == self._policy.current.version
                self._show_canary(canary if serving_canary else None)
            await self._follow_canary(canary)
            return swapped

    async def _follow_canary(self, record: CanaryRecord | None) -> None:
        """Serve the registry's canary (`record`) beside live, or stop serving one that ended.

        Only an engine serving adapters runs a canary beside live; with whole weights a canary is
        a share of replicas running the candidate (`sync`).
        """
        if self._base_digest is None:
            return
        serving = self._policy.canary
        if record is None or record.against != self._policy.current.version:
            if serving is not None:
                self._policy.canary = None
                self._show_canary(None)
                log.info("canary %d ended", serving.policy.version)
            return
        if serving is not None and serving.policy.version == record.version:
            if serving.share != record.share:
                self._policy.canary = CanaryServing(serving.policy, record.share)
                self._show_canary(record)
            return
        if not self._checker.due(record.version):
            return
        try:
            manifest = await asyncio.to_thread(self._checker.verify, record.version, self._base_digest)
            snapshot = await self._load(record.version, manifest)
        except PolicyRefused:
            return
        except Exception:
            log.exception("loading canary %d failed; answering every user with live", record.version)
            return
        self._policy.canary = CanaryServing(snapshot, record.share)
        self._show_canary(record)
        log.info("canary %d answers a share of %.3f of users", record.version, record.share)

    def _show_canary(self, record: CanaryRecord | None) -> None:
        """The canary metrics: the canary this server answers with and its share, or 0 and 0."""
        self._metrics.canary_version.set(0 if record is None else record.version)
        self._metrics.canary_share.set(0 if record is None else record.share)

    async def _load(self, version: int, manifest: PolicyManifest) -> PolicySnapshot:
        """Load an adapter (or name the base) into the engine, without a pause; the snapshot that answers with it."""
        path = self._registry.path(version)  # PolicyRemoved when retention removed it since the check
        if not manifest.is_adapter:  # the base itself: the engine's own weights
            return LivePolicy.snapshot(version, self._engine.model_path, manifest.digest)
        await self._engine.load_adapter(version, str(path))
        return LivePolicy.snapshot(version, str(path), manifest.digest, adapter_path=str(path))

    def _swaps_without_reload(self, manifest: PolicyManifest) -> bool:
        """An adapter on this server's base, or the base itself: nothing to reload, nothing to pause."""
        return self._base_digest is not None and (manifest.is_adapter or manifest.digest == self._base_digest)

    async def _swap_to(self, version: int, *, as_canary: bool = False) -> bool:
        """Load `version` as the one this server answers with: live, or on a canary replica the canary."""
        try:
            manifest = await asyncio.to_thread(self._checker.verify, version, self._base_digest)
        except PolicyRefused as refused:
            self._metrics.policy_swaps.labels(outcome=refused.outcome).inc()
            return False
        try:
            if self._swaps_without_reload(manifest):
                self._policy.current = await self._load(version, manifest)
                path, paused_seconds = self._policy.current.model_path, 0.0
            else:
                path = self._registry.path(version)  # PolicyRemoved when retention removed it since the check
                async with self._admission.paused():
                    paused_at = time.monotonic()
                    await self._engine.reload_weights(str(path))
                    self._policy.current = LivePolicy.snapshot(version, str(path), manifest.digest)
                    paused_seconds = time.monotonic() - paused_at
                if self._base_digest is not None:
                    self._base_digest = manifest.digest
        except Exception:
            self._metrics.policy_swaps.labels(outcome="failed").inc()
            log.exception("reloading policy %d failed; still serving %d", version, self._policy.current.version)
            return False
        self._metrics.policy_swaps.labels(outcome="ok").inc()
        self._metrics.policy_swap_seconds.observe(paused_seconds)
        self._metrics.policy_version.set(version)
        log.info(
            "policy %d is %s", version, "the canary" if as_canary else "live",
            extra={"policy_version": version, "paused_seconds": round(paused_seconds, 4)},
        )  # fmt: skip
        if self._events is not None:
            self._events.publish(
                self._topics.policy, str(version), self._serving_event(version, manifest.digest, str(path), as_canary)
            )
        return True

    def _serving_event(self, version: int, digest: str, path: str, as_canary: bool) -> events_pb2.PolicyEvent:
        """This server now answers with `version`: as live, or (a canary replica) as the canary."""
        return policy_event(
            events_pb2.POLICY_EVENT_KIND_CANARY if as_canary else events_pb2.POLICY_EVENT_KIND_LIVE,
            version,
            event_id=f"{'canary' if as_canary else 'live'}-{self._server_id}-{version}-{time.time_ns()}",
            path=path,
            digest=digest,
            server_id=self._server_id,
        )

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
