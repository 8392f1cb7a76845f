"""`flywheel canary`: the running canary and its online test, in the terminal.

The canary pointer comes from the registry; the test's counts live in the gate (it counts the
votes), so they are read from the gate's /metrics. Past canaries are read from their verdicts.
"""

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from flywheel.registry import CanaryRecord, PolicyRegistry
from gate.canary import CANARY_CHECK


def gate_samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gate's canary samples from its /metrics text: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name.startswith("flywheel_gate_canary")
    }


def canary_report(
    record: CanaryRecord | None,
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float] | None,
    past: list[tuple[int, bool, str]],
) -> str:
    """What `flywheel canary` prints: the canary now, the test's state, and the last decided canaries.

    past: (version, promoted, reason) of canaries the gate decided, newest last.
    """
    lines = []
    if record is None:
        lines.append("no canary running")
    else:
        lines.append(
            f"canary: policy {record.version} answers {record.share:.1%} of users beside live {record.against}, "
            f"since {record.started_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        if samples is None:
            lines.append("  the gate's /metrics is unreachable: no vote counts")
        else:

            def value(name: str, **labels: str) -> float:
                return samples.get((name, tuple(sorted(labels.items()))), float("nan"))

            for role in ("live", "canary"):
                votes = value("flywheel_gate_canary_votes", role=role)
                rate = value("flywheel_gate_canary_thumbs_up_rate", role=role)
                lines.append(f"  {role:<6} {votes:>6.0f} votes, thumbs-up {rate:.1%}")
            lines.append(
                f"  test: log-likelihood ratio {value('flywheel_gate_canary_log_likelihood_ratio'):.2f}; "
                f"reject at <= {value('flywheel_gate_canary_bound', bound='lower'):.2f}, "
                f"promote at >= {value('flywheel_gate_canary_bound', bound='upper'):.2f}"
            )
    for version, promoted, reason in past:
        lines.append(f"policy {version}: {'promoted' if promoted else 'rejected'}: {reason}")
    return "\n".join(lines)


def past_canaries(registry: PolicyRegistry, last: int = 5) -> list[tuple[int, bool, str]]:
    """The last decided canaries: (version, promoted, the online test's reason), oldest first."""
    decided = []
    for version in registry.versions():
        verdict = registry.verdict(version)
        for check in verdict.checks if verdict is not None else []:
            if check.name == CANARY_CHECK:
                decided.append((version, verdict.approved, check.detail))
    return decided[-last:]
