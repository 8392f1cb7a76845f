"""The numbers of a run: per (system, concurrency) summaries, and Flywheel's ratios to the other two systems."""

from dataclasses import dataclass

import numpy as np

from benchmarks.serving.workload import SYSTEMS, Run

RATIO_KEYS = ("flywheel_over_engine_throughput", "flywheel_over_openai_throughput", "flywheel_over_openai_p99")
ADDED_CPU_KEYS = ("flywheel_added_front_cpu_ms_per_answer", "openai_added_front_cpu_ms_per_answer")


@dataclass(frozen=True)
class LevelSummary:
    """All rounds of one system at one concurrency level."""

    system: str
    concurrency: int
    requests: int
    """Over all rounds."""
    tokens_per_second: float
    """Median over rounds."""
    tokens_per_second_min: float
    tokens_per_second_max: float
    p50_seconds: float
    """Request latency percentiles over every request of every round."""
    p99_seconds: float
    front_cpu_ms_per_token: float
    """Client and front-end CPU per completion token, over all rounds."""
    front_cpu_ms_per_request: float
    engine_cpu_ms_per_token: float

    @classmethod
    def of(cls, runs: list["Run"]) -> "LevelSummary":
        latencies = [latency for run in runs for latency in run.latencies_seconds]
        throughputs = [run.tokens_per_second for run in runs]
        tokens = sum(run.completion_tokens for run in runs)
        return cls(
            system=runs[0].system,
            concurrency=runs[0].concurrency,
            requests=len(latencies),
            tokens_per_second=float(np.median(throughputs)),
            tokens_per_second_min=min(throughputs),
            tokens_per_second_max=max(throughputs),
            p50_seconds=float(np.percentile(latencies, 50)),
            p99_seconds=float(np.percentile(latencies, 99)),
            front_cpu_ms_per_token=1000 * sum(run.front_cpu_seconds for run in runs) / tokens,
            front_cpu_ms_per_request=1000 * sum(run.front_cpu_seconds for run in runs) / len(latencies),
            engine_cpu_ms_per_token=1000 * sum(run.engine_cpu_seconds for run in runs) / tokens,
        )


def summarize(runs: list[Run]) -> list[LevelSummary]:
    """One summary per (system, concurrency), systems in SYSTEMS order, then by concurrency."""
    keys = sorted({(run.system, run.concurrency) for run in runs}, key=lambda key: (SYSTEMS.index(key[0]), key[1]))
    return [LevelSummary.of([run for run in runs if (run.system, run.concurrency) == key]) for key in keys]


def paired_ratios(runs: list[Run], numerator: str, denominator: str, concurrency: int) -> list[float]:
    """Throughput of `numerator` over `denominator` in each round where both ran at this concurrency."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.concurrency == concurrency:
            by_round.setdefault(run.round, {})[run.system] = run.tokens_per_second
    return [
        systems[numerator] / systems[denominator]
        for systems in by_round.values()
        if numerator in systems and denominator in systems
    ]


def ratios(runs: list[Run], summaries: list[LevelSummary]) -> list[dict]:
    """Per concurrency: Flywheel's throughput over the ceiling's and over the OpenAI server's, its p99 over the latter's,
    and the client and front-end CPU each server spends per answer beyond the ceiling's.

    Throughput ratios are taken round by round, between measurements seconds apart, then the median over rounds
    (with the range): the machine's speed drifts more between rounds than between the systems of one round.
    """
    p99 = {(summary.system, summary.concurrency): summary.p99_seconds for summary in summaries}
    front_cpu = {(summary.system, summary.concurrency): summary.front_cpu_ms_per_request for summary in summaries}
    rows = []
    for concurrency in sorted({run.concurrency for run in runs}):
        row: dict = {"concurrency": concurrency}
        for key, other in (
            ("flywheel_over_engine_throughput", "engine"),
            ("flywheel_over_openai_throughput", "openai"),
        ):
            paired = paired_ratios(runs, "flywheel", other, concurrency)
            if paired:
                row[key] = float(np.median(paired))
                row[f"{key}_range"] = [min(paired), max(paired)]
        if ("flywheel", concurrency) in p99 and ("openai", concurrency) in p99:
            row["flywheel_over_openai_p99"] = p99["flywheel", concurrency] / p99["openai", concurrency]
        for key, system in zip(ADDED_CPU_KEYS, ("flywheel", "openai")):
            if (system, concurrency) in front_cpu and ("engine", concurrency) in front_cpu:
                row[key] = front_cpu[system, concurrency] - front_cpu["engine", concurrency]
        rows.append(row)
    return rows
