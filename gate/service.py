"""The safety gate: every candidate policy is judged against the live one before it may serve.

`flywheel gate` follows three topics. Generations give it held-out prompts from real traffic;
feedback gives it each policy version's thumbs, for the automatic rollback; policy events say
a candidate waits. The registry is the truth: a candidate is any version with a parent and no
verdict yet, so a lost event only delays a decision until the next look.

One gate judges a candidate at a time (the registry's claim on it). On approval the gate moves the
registry's live pointer, only if it still names the version the candidate was judged against, and
announces it; servers swap. A move made meanwhile wins: an operator's rollback is never undone by a
judgement that started before it, and the verdict says why the candidate was withheld. When the
live version's thumbs-down rate is significantly worse than its parent's (a sequential test),
the gate moves the pointer back and announces a rollback. After each decision the gate removes
the weights of versions outside the retention windows (gate.retention).

A candidate is judged with the reward model the trainer published with it, in its registry
version and checked against its manifest like the weights: the gate reads nothing of the trainer's own.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from feedback.config import KafkaSettings, SpoolSettings
from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.identity import DEFAULT_PRINCIPAL, capped_per_principal
from feedback.metrics import EventMetrics
from feedback.policy_events import policy_event
from feedback.producer import EventProducer
from flywheel.registry import (
    CanaryEnded,
    CanaryRecord,
    CorruptPolicy,
    LiveMoved,
    PolicyRegistry,
    RetentionReport,
    VerdictCheck,
    Withheld,
)
from flywheel.v1 import events_pb2, serving_pb2
from gate.canary import CANARY_CHECK, CanaryTest, canary_share, canary_test
from gate.config import GateSettings
from gate.rollback import sprt_decision
from trainer.config import RewardModelSettings
from trainer.gate_checks import GateVerdict
from trainer.policy_eval import EvalPrompt, HeldoutPrompts, PolicyEvaluator, load_golden
from trainer.reward_model import RewardModel, RewardModelTrainer, load_policy

log = logging.getLogger(__name__)

AUTOMATIC_ROLLBACK = "automatic-"
"""Prefix of the event id of a rollback the gate made itself; an operator's has none."""
DIGEST_CHECK = "digest"
"""The check a candidate whose files (weights or reward model) do not match its manifest fails."""


class ThumbsByVersion:
    """Each policy version's standing thumbs: one per voter (principal, user) and response, the latest given wins."""

    def __init__(self, max_principal_share: float = 1.0) -> None:
        self._max_principal_share = max_principal_share
        # (response, principal, user) -> (given_at ns, version, down)
        self._votes: dict[tuple[str, str, str], tuple[int, int, bool]] = {}

    def add(self, event: events_pb2.FeedbackGiven) -> None:
        if event.rating not in (serving_pb2.RATING_UP, serving_pb2.RATING_DOWN):
            return
        key = (event.response_id, event.principal or DEFAULT_PRINCIPAL, event.user_id)
        given_at = event.given_at.ToNanoseconds()
        if key in self._votes and self._votes[key][0] > given_at:
            return
        self._votes[key] = (given_at, event.policy_version, event.rating == serving_pb2.RATING_DOWN)

    def counts(self, version: int, since_ns: int = 0) -> tuple[int, int]:
        """(thumbs down, all thumbs) on answers written by `version`, no principal supplying more than its share.

        Each principal's earliest votes count; `since_ns` counts only votes given at or after it (ns since the epoch).
        """
        votes = sorted(
            (given_at, principal, down)
            for (_, principal, _), (given_at, v, down) in self._votes.items()
            if v == version and given_at >= since_ns
        )
        counted = capped_per_principal(votes, lambda vote: vote[1], self._max_principal_share)
        return sum(down for _, _, down in counted), len(counted)


class GateMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.decisions = Counter(
            "flywheel_gate_decisions", "Gate verdicts on candidates: approved, rejected, or withheld (passed, but live moved).",
            ["decision"], registry=registry,
        )  # fmt: skip
        self.check_value = Gauge(
            "flywheel_gate_check_value", "Each check's value on the last candidate.", ["check"], registry=registry
        )
        self.check_threshold = Gauge(
            "flywheel_gate_check_threshold",
            "Each check's threshold on the last candidate.",
            ["check"],
            registry=registry,
        )
        self.check_passed = Gauge(
            "flywheel_gate_check_passed",
            "1 when the last candidate passed the check, else 0.",
            ["check"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "flywheel_rollbacks", "Rollbacks of the live policy, by trigger.", ["trigger"], registry=registry
        )
        self.approved_version = Gauge(
            "flywheel_approved_policy_version", "The version the registry's live pointer names.", registry=registry
        )
        self.registry_bytes = Gauge(
            "flywheel_registry_bytes", "Bytes under the policy registry's root after the gate's last retention pass.",
            registry=registry,
        )  # fmt: skip
        self.weights_removed = Counter(
            "flywheel_registry_weights_removed", "Policy versions whose weights retention removed.", registry=registry
        )
        self.canary_version = Gauge(
            "flywheel_gate_canary_version", "The candidate answering the canary share; 0 when none.", registry=registry
        )
        self.canary_share = Gauge(
            "flywheel_gate_canary_share", "Share of users the canary answers; 0 when none.", registry=registry
        )
        self.canary_votes = Gauge(
            "flywheel_gate_canary_votes", "Thumbs since the canary started, on live and on the canary.", ["role"],
            registry=registry,
        )  # fmt: skip
        self.canary_thumbs_up_rate = Gauge(
            "flywheel_gate_canary_thumbs_up_rate", "Thumbs-up rate since the canary started, live and canary.",
            ["role"], registry=registry,
        )  # fmt: skip
        self.canary_bound = Gauge(
            "flywheel_gate_canary_bound", "The online test's bounds: reject at or below lower, promote at or above upper.",
            ["bound"], registry=registry,
        )  # fmt: skip
        self.canary_log_likelihood_ratio = Gauge(
            "flywheel_gate_canary_log_likelihood_ratio",
            "The online test's log-likelihood ratio: promote at its upper bound, reject at its lower.",
            registry=registry,
        )


def unusable_reason(event: Message) -> str | None:
    """Why the gate cannot use an event, naming the empty fields; None when it can.

    A vote stands once per response and voter: one without either would stand in for every such vote.
    """
    if isinstance(event, events_pb2.FeedbackGiven):
        missing = [name for name in ("response_id", "user_id") if not getattr(event, name)]
        if missing:
            return f"FeedbackGiven: {', '.join(missing)} must be set"
    return None


def lineage_root(registry: PolicyRegistry, version: int) -> int:
    """The first ancestor of `version` (following parents): the policy training started from."""
    while (parent := registry.manifest(version).parent_version) is not None:
        version = parent
    return version


class Gate:
    def __init__(
        self,
        settings: GateSettings,
        reward_model_settings: RewardModelSettings,
        registry: PolicyRegistry,
        metrics: GateMetrics,
    ):
        self.settings = settings
        self.reward_model_settings = reward_model_settings
        self.registry = registry
        self.metrics = metrics
        self.heldout = HeldoutPrompts(
            settings.heldout_prompts, reward_model_settings.heldout_fraction, settings.max_principal_share
        )
        self.thumbs = ThumbsByVersion(settings.max_principal_share)
        self.kept: set[int] = set()
        """Live versions the rollback test decided to keep: a decision is final (gate/rollback.py)."""

    def take(self, events: list[ConsumedEvent]) -> list[tuple[ConsumedEvent, str]]:
        """Use a batch of consumed events; returns those the gate cannot use, each with why: dead-letter them."""
        refused = []
        for consumed in events:
            event = consumed.event
            if (reason := unusable_reason(event)) is not None:
                refused.append((consumed, reason))
            elif isinstance(event, events_pb2.GenerationLogged):
                self.heldout.offer(event)
            elif isinstance(event, events_pb2.FeedbackGiven):
                self.thumbs.add(event)
            elif isinstance(event, events_pb2.PolicyEvent) and event.kind == events_pb2.POLICY_EVENT_KIND_ROLLBACK:
                if not event.event_id.startswith(AUTOMATIC_ROLLBACK):
                    self.metrics.rollbacks.labels(trigger="operator").inc()
        return refused

    def waiting_candidates(self) -> list[int]:
        """Versions with a parent and no verdict, oldest first."""
        return [
            version
            for version in self.registry.versions()
            if self.registry.manifest(version).parent_version is not None and self.registry.verdict(version) is None
        ]

    def decide_next(self) -> events_pb2.PolicyEvent | None:
        """Judge the newest waiting candidate (older ones are superseded); return the event to announce.

        None when nothing waits, or when another gate holds the claim on the newest candidate.
        """
        if self.registry.canary(include_ended=True) is not None:
            return None  # one candidate at a time: the canary's test decides first (canary_due)
        waiting = self.waiting_candidates()
        if not waiting:
            return None
        for superseded in waiting[:-1]:
            with self.registry.claim(superseded) as claimed:
                if claimed and self.registry.verdict(superseded) is None:  # one being judged elsewhere is left to it
                    detail = f"a newer candidate {waiting[-1]} waits"
                    self.registry.record_verdict(
                        superseded, False, [VerdictCheck(name=Withheld.SUPERSEDED.value, detail=detail)],
                        withheld=Withheld.SUPERSEDED, withheld_detail=detail,
                    )  # fmt: skip
        version = waiting[-1]
        with self.registry.claim(version) as claimed:
            if not claimed or self.registry.verdict(version) is not None:
                return None  # another gate is judging it, or has just judged it
            return self._judge(version)

    def judge(
        self,
        candidate_path: Path,
        live_path: Path,
        reference_path: Path,
        reward_model_path: Path,
        prompts: Sequence[EvalPrompt],
        base_path: Path | None = None,
    ) -> GateVerdict:
        """Run the gate's checks on a candidate against the live policy, scored by the reward model published with it.

        `base_path`: the base model of any adapter among the three (one lineage shares one base).
        """
        tokenizer = self._tokenizer()
        reward_model = RewardModelTrainer(
            RewardModel.from_pretrained(reward_model_path), self.reward_model_settings, tokenizer.pad_token_id
        )
        candidate = load_policy(candidate_path, base_path)
        live = load_policy(live_path, base_path)
        reference = None if reference_path == live_path else load_policy(reference_path, base_path)
        return PolicyEvaluator(tokenizer, reward_model, self.settings).judge(candidate, live, reference, prompts)

    def _judge(self, version: int) -> events_pb2.PolicyEvent:
        """Judge a claimed candidate against the live version and approve it if live has not moved since."""
        manifest = self.registry.manifest(version)
        live = self.registry.live()
        if live is None:
            raise RuntimeError("the registry has no live policy to compare candidates with")
        try:
            self.registry.verify(version)
            reward_model_path = self.registry.reward_model_path(version)
        except CorruptPolicy as error:
            return self._reject(
                version,
                manifest.parent_version,
                [VerdictCheck(name=DIGEST_CHECK, detail=str(error))],
                [str(error)],
                live.version,
            )
        prompts = self.heldout.current() + self._golden()
        verdict = self.judge(
            self.registry.path(version),
            self.registry.path(live.version),
            self.registry.path(lineage_root(self.registry, version)),
            reward_model_path,
            prompts,
            self.registry.path(manifest.base_version) if manifest.is_adapter else None,
        )
        checks = [VerdictCheck(**asdict(check)) for check in verdict.checks]
        for check in verdict.checks:
            self.metrics.check_value.labels(check=check.name).set(check.value)
            self.metrics.check_threshold.labels(check=check.name).set(check.threshold)
            self.metrics.check_passed.labels(check=check.name).set(float(check.passed))
        if not verdict.approved:
            return self._reject(
                version,
                live.version,
                checks,
                [f"{c.name}: {c.detail}" for c in verdict.checks if not c.passed],
                live.version,
            )
        share = canary_share(manifest.is_adapter, self.settings.canary)
        if share > 0:
            return self._start_canary(version, live.version, checks, manifest.digest, share)
        try:
            self.registry.approve(version, judged_against=live.version, checks=checks, reason="approved by the gate")
        except LiveMoved as moved:
            return self._withhold(version, live.version, checks, moved)
        self.metrics.decisions.labels(decision="approved").inc()
        self.metrics.approved_version.set(version)
        log.info("approved policy %d", version, extra={"checks": [check.model_dump() for check in checks]})
        return policy_event(
            events_pb2.POLICY_EVENT_KIND_APPROVED,
            version,
            live.version,
            path=str(self.registry.path(version)),
            digest=manifest.digest,
            checks=[_check_proto(c) for c in verdict.checks],
        )

    def _start_canary(
        self, version: int, live: int, checks: list[VerdictCheck], digest: str, share: float
    ) -> events_pb2.PolicyEvent:
        """A candidate that passed the offline checks answers a share of users beside live, until `canary_due` decides."""
        try:
            self.registry.start_canary(version, against=live, share=share, checks=checks)
        except LiveMoved as moved:
            return self._withhold(version, live, checks, moved)
        self.metrics.decisions.labels(decision="canary").inc()
        self.metrics.canary_version.set(version)
        self.metrics.canary_share.set(share)
        log.info(
            "policy %d passed the offline checks and answers %.1f%% of users beside %d", version, share * 100, live
        )
        return policy_event(
            events_pb2.POLICY_EVENT_KIND_CANARY,
            version,
            live,
            path=str(self.registry.path(version)),
            digest=digest,
            reasons=[f"passed the offline checks; answers a share of {share:g} of users beside live {live}"],
        )

    def canary_state(self) -> tuple[CanaryRecord, CanaryTest] | None:
        """The running canary and its online test over the votes since it started; None without one."""
        record = self.registry.canary()
        if record is None:
            return None
        since = int(record.started_at.timestamp() * 1e9)
        live_down, live_total = self.thumbs.counts(record.against, since_ns=since)
        canary_down, canary_total = self.thumbs.counts(record.version, since_ns=since)
        hours_running = (datetime.now(UTC) - record.started_at).total_seconds() / 3600
        test = canary_test(
            live_total - live_down,
            live_total,
            canary_total - canary_down,
            canary_total,
            self.settings.canary,
            hours_running,
        )
        self.metrics.canary_log_likelihood_ratio.set(test.log_likelihood_ratio)
        self.metrics.canary_bound.labels(bound="lower").set(test.lower)
        self.metrics.canary_bound.labels(bound="upper").set(test.upper)
        for role, votes, rate in (("live", live_total, test.live_rate), ("canary", canary_total, test.canary_rate)):
            self.metrics.canary_votes.labels(role=role).set(votes)
            self.metrics.canary_thumbs_up_rate.labels(role=role).set(rate)
        return record, test

    def canary_due(self) -> events_pb2.PolicyEvent | None:
        """Promote or reject the canary once its online test decides; close one whose live version moved.

        Returns the event to announce, or None while the test goes on (or no canary runs).
        """
        ended = self.registry.canary(include_ended=True)
        if ended is not None and self.registry.canary() is None:  # live moved away while it ran
            self.registry.end_canary(ended.version)
            self._canary_ended()
            if self.registry.verdict(ended.version) is not None:  # promoted: the verdict is written
                return None
            return self._withhold(
                ended.version,
                ended.against,
                ended.checks,
                LiveMoved(ended.version, ended.against, self.registry.live()),
            )
        running = self.canary_state()
        if running is None:
            self._canary_ended()  # none, or an operator ended it (`flywheel canary --reject`)
            return None
        record, test = running
        if test.decision == "continue":
            return None
        reason = test.reason()
        check = VerdictCheck(
            name=CANARY_CHECK,
            value=test.log_likelihood_ratio,
            threshold=test.upper,
            passed=test.decision == "promote",
            detail=reason,
        )
        checks = [*record.checks, check]
        promote = test.decision == "promote"
        try:
            self.registry.close_canary(record.version, approved=promote, checks=checks, reason=reason)
        except CanaryEnded:  # an operator decided it first
            self._canary_ended()
            return None
        except LiveMoved as moved:
            self.registry.end_canary(record.version)
            self._canary_ended()
            return self._withhold(record.version, record.against, checks, moved)
        self._canary_ended()
        if not promote:
            self.metrics.decisions.labels(decision="canary_rejected").inc()
            log.warning("rejected canary %d: %s", record.version, reason)
            return policy_event(events_pb2.POLICY_EVENT_KIND_REJECTED, record.version, record.against, reasons=[reason])
        self.metrics.decisions.labels(decision="approved").inc()
        self.metrics.approved_version.set(record.version)
        log.info("promoted canary %d: %s", record.version, reason)
        return policy_event(
            events_pb2.POLICY_EVENT_KIND_APPROVED,
            record.version,
            record.against,
            path=str(self.registry.path(record.version)),
            digest=self.registry.manifest(record.version).digest,
            reasons=[reason],
        )

    def _canary_ended(self) -> None:
        self.metrics.canary_version.set(0)
        self.metrics.canary_share.set(0)

    def _withhold(
        self, version: int, judged_against: int, checks: list[VerdictCheck], moved: LiveMoved
    ) -> events_pb2.PolicyEvent:
        """A candidate that passed against a version no longer live: not made live, and not judged again.

        Judging it again against the new live version could undo an operator's rollback, and a
        candidate trained from the version rolled back from is not one to serve; the trainer's next
        candidate is judged against the new live version.
        """
        self.registry.record_verdict(
            version,
            False,
            checks,
            judged_against=judged_against,
            withheld=Withheld.LIVE_MOVED,
            withheld_detail=str(moved),
        )
        self.metrics.decisions.labels(decision="withheld").inc()
        log.warning("withheld policy %d: %s", version, moved)
        return policy_event(events_pb2.POLICY_EVENT_KIND_REJECTED, version, judged_against, reasons=[str(moved)])

    def _reject(
        self, version: int, parent: int | None, checks: list[VerdictCheck], reasons: list[str], judged_against: int
    ) -> events_pb2.PolicyEvent:
        self.registry.record_verdict(version, False, checks, judged_against=judged_against)
        self.metrics.decisions.labels(decision="rejected").inc()
        log.warning("rejected policy %d: %s", version, "; ".join(reasons))
        return policy_event(events_pb2.POLICY_EVENT_KIND_REJECTED, version, parent, reasons=reasons)

    def rollback_due(self) -> events_pb2.PolicyEvent | None:
        """Roll the live version back to its parent when its thumbs are significantly worse; once the test says
        keep, that version is no longer tested (more votes after a decision would let the ratio wander up to
        false alarms beyond α)."""
        live = self.registry.live()
        if live is None or live.kind != "approved" or live.previous_version is None or live.version in self.kept:
            return None
        parent = live.previous_version
        result = sprt_decision(*self.thumbs.counts(parent), *self.thumbs.counts(live.version), self.settings.rollback)
        if result.decision == "keep":
            self.kept.add(live.version)
            log.info(
                "policy %d kept: its thumbs-down rate %.1f%% is no worse than %.1f%% for %d (log-likelihood ratio "
                "%.2f <= %.2f)", live.version, 100 * result.new_rate, 100 * result.parent_rate, parent,
                result.log_likelihood_ratio, result.lower,
            )  # fmt: skip
        if result.decision != "rollback":
            return None
        reason = (
            f"thumbs-down rate of policy {live.version} is {result.new_rate:.1%} against {result.parent_rate:.1%} for "
            f"{parent} (sequential test, log-likelihood ratio {result.log_likelihood_ratio:.2f} >= {result.upper:.2f})"
        )
        try:
            self.registry.move_live(parent, expected=live.version, reason=reason, kind="rollback")
        except LiveMoved as moved:  # an operator or another gate moved it first: that move stands
            log.warning("no automatic rollback from %d to %d: %s", live.version, parent, moved)
            return None
        self.metrics.rollbacks.labels(trigger="automatic").inc()
        self.metrics.approved_version.set(parent)
        log.warning("automatic rollback from %d to %d: %s", live.version, parent, reason)
        event = policy_event(events_pb2.POLICY_EVENT_KIND_ROLLBACK, parent, live.version, reasons=[reason])
        event.event_id = f"{AUTOMATIC_ROLLBACK}{event.event_id}"
        return event

    def retain(self) -> RetentionReport:
        """Remove the weights of versions outside gate.retention; the registry keeps the trainer's reference policy."""
        report = self.registry.retain(self.settings.retention)
        self.metrics.weights_removed.inc(len(report.removed))
        self.metrics.registry_bytes.set(self.registry.size_bytes())
        return report

    def _golden(self) -> list[EvalPrompt]:
        path = self.settings.golden_path()
        return [] if path is None else load_golden(path, self._tokenizer())

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        live = self.registry.live()
        manifest = self.registry.manifest(live.version)
        return AutoTokenizer.from_pretrained(self.registry.path(manifest.base_version or live.version))


def _check_proto(check) -> events_pb2.GateCheck:
    return events_pb2.GateCheck(
        name=check.name, value=check.value, threshold=check.threshold, passed=check.passed, detail=check.detail
    )


async def run_gate(
    gate: Gate, kafka: KafkaSettings, spool: SpoolSettings, event_metrics: EventMetrics, stopping: asyncio.Event
) -> None:
    """Follow the topics and decide until `stopping` is set.

    Offsets are never committed: a restarted gate reads the topics again from the start to
    rebuild its held-out prompts and thumbs, and the registry's verdicts keep it from judging a
    candidate twice. An event it cannot use is dead-lettered with why, and it reads on.
    """
    producer = EventProducer(kafka, spool, event_metrics)
    consumer = EventConsumer(
        kafka,
        gate.settings.consumer_group,
        event_metrics,
        [kafka.topics.generations, kafka.topics.feedback, kafka.topics.policy],
    )
    await producer.start()
    try:
        await consumer.start()
        try:
            retained_once = False
            while not stopping.is_set():
                batch = await consumer.poll(timeout_ms=int(gate.settings.poll_seconds * 1000))
                for consumed, reason in gate.take(batch.events):
                    await consumer.dead_letter(consumed, "refused_by_gate", reason)
                decisions = [
                    await asyncio.to_thread(gate.decide_next),
                    gate.canary_due(),
                    gate.rollback_due() if gate.settings.auto_rollback else None,
                ]
                for decided in decisions:
                    if decided is not None:
                        producer.publish(kafka.topics.policy, str(decided.policy_version), decided)
                if any(decided is not None for decided in decisions) or not retained_once:
                    await asyncio.to_thread(_retain_logging_errors, gate)
                    retained_once = True
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


def _retain_logging_errors(gate: Gate) -> None:
    """Retention is housekeeping: a failed pass is logged and the next decision tries again."""
    try:
        gate.retain()
    except OSError:
        log.exception("registry retention failed; the gate carries on and tries again after its next decision")


def publish_rollback(registry: PolicyRegistry, version: int, reason: str) -> events_pb2.PolicyEvent:
    """`flywheel rollback --to VERSION`: force the live pointer back and describe it for the servers.

    Forced: it wins over whatever is live, including an approval that raced it, and a gate
    judging against the version it replaced will not make its candidate live afterwards.
    """
    record = registry.set_live(version, reason=reason, kind="rollback")
    return policy_event(events_pb2.POLICY_EVENT_KIND_ROLLBACK, version, record.previous_version, reasons=[reason])


def reject_canary(registry: PolicyRegistry, reason: str) -> events_pb2.PolicyEvent:
    """`flywheel canary --reject`: end the running canary as rejected, before its online test decides.

    Its verdict keeps the offline checks and adds the operator's reason under the online test's
    check name, so past canaries show it. Raises CanaryEnded when no canary runs (or it was decided meanwhile).
    """
    record = registry.canary()
    if record is None:
        raise CanaryEnded(None)
    detail = f"rejected by an operator: {reason}"
    check = VerdictCheck(name=CANARY_CHECK, value=0.0, threshold=0.0, passed=False, detail=detail)
    registry.close_canary(record.version, approved=False, checks=[*record.checks, check], reason=detail)
    return policy_event(events_pb2.POLICY_EVENT_KIND_REJECTED, record.version, record.against, reasons=[detail])
