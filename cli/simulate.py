"""`flywheel simulate`: simulated users ask demo questions and give thumbs by a hidden judge.

Each simulated user asks a training question of the demo task (sampled answers, as real
traffic), the judge looks at the answer, and its verdict goes back as a thumb. Every
`eval_every` feedback events the held-out thumbs-up rate is measured on a fixed set of held-out
questions with greedy answers, and a row goes to `learning_curve.csv`; at the end the curve is
plotted to `learning_curve.png`.
"""

import asyncio
import csv
import functools
import importlib
import inspect
import random
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import grpc
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flywheel.demo.task import evaluation_questions, traffic_questions
from flywheel.v1 import serving_pb2 as pb
from flywheel.v1 import serving_pb2_grpc

Verdict = Literal["up", "down"] | None
Judge = Callable[[str, str], Verdict]
RATINGS = {"up": pb.RATING_UP, "down": pb.RATING_DOWN}
CSV_COLUMNS = (
    "feedback_events", "seconds", "heldout_thumbs_up_rate", "traffic_thumbs_up_rate", "policy_version",
    "trainer_mean_score", "trainer_kl_to_reference",
)  # fmt: skip


class JudgeError(ValueError):
    """The judge given on the command line cannot be used, or returned something invalid."""


class SimulationSettings(BaseModel):
    target: str = Field("127.0.0.1:50051", description="gRPC address of a Flywheel server.")
    judge: str = Field(
        "flywheel.demo.task:judge_thumb",
        description="module:function(prompt, answer[, rng]) -> up/down/none: the users' votes. A judge that takes "
        "`rng` gets the simulation's seeded random.Random.",
    )
    eval_judge: str | None = Field(
        None,
        description="module:function(prompt, answer) that scores the held-out answers; None for the judge itself. "
        "Give a noisy judge's taste here, so the curve measures the policy, not the noise.",
    )
    events: int = Field(3000, ge=1, description="Feedback events to send, then stop.")
    concurrency: int = Field(4, ge=1, description="Simulated users asking at once.")
    rate: float | None = Field(
        None, gt=0, description="Most feedback events per second across all users; None for no limit."
    )
    users: int = Field(200, ge=1, description="Distinct simulated user ids (each has its own feedback rate limit).")
    out_dir: Path = Field(Path("runs/simulate"), description="Folder for learning_curve.csv and learning_curve.png.")
    seed: int = 0
    eval_every: int = Field(200, ge=1, description="Measure the held-out thumbs-up rate every this many events.")
    heldout_questions: int = Field(
        87, ge=1, description="Evaluation questions per measurement (greedy answers); all 87 by default."
    )
    max_tokens: int = Field(16, ge=1, description="Answer length limit of the simulated users' requests.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the simulated users' requests.")
    trainer_metrics_url: str = Field(
        "http://127.0.0.1:9401/metrics", description="Where to read the trainer's reward and KL; empty for nowhere."
    )
    api_key: str | None = None


def load_judge(spec: str, rng: random.Random) -> Judge:
    """Import `module:function`, handing it `rng` if it takes one; raise JudgeError saying what is wrong with the spec."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise JudgeError(f"--judge {spec!r}: expected module:function, e.g. flywheel.demo.task:judge_thumb")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise JudgeError(f"--judge {spec!r}: cannot import module {module_name!r} ({error})") from error
    judge = getattr(module, function_name, None)
    if not callable(judge):
        raise JudgeError(f"--judge {spec!r}: module {module_name!r} has no function {function_name!r}")
    if "rng" in inspect.signature(judge).parameters:
        return functools.partial(judge, rng=rng)
    return judge


def verdict_of(judge: Judge, prompt: str, answer: str) -> Verdict:
    """The judge's verdict as "up", "down" or None; JudgeError for anything else it returns or raises."""
    try:
        verdict = judge(prompt, answer)
    except Exception as error:
        raise JudgeError(f"the judge raised {type(error).__name__}: {error} for prompt {prompt!r}") from error
    if verdict in ("up", "down"):
        return verdict
    if verdict is None or verdict == "none":
        return None
    raise JudgeError(f"the judge returned {verdict!r} for prompt {prompt!r}; expected 'up', 'down' or 'none'")


def trainer_gauges(url: str) -> dict[str, float]:
    """The trainer's mean score and KL to the reference, or {} when its metrics cannot be read (or no URL is given)."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    wanted = {
        "flywheel_trainer_mean_score": "trainer_mean_score",
        "flywheel_trainer_kl_to_reference": "trainer_kl_to_reference",
    }
    return {
        wanted[family.name]: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.name in wanted and family.samples
    }


def chat(prompt: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])


EVALUATORS_TO_TRY = 32
"""Evaluator user ids tried for one measurement; at a canary share of one half, 32 all in it has odds 2⁻³²."""


class Simulation:
    def __init__(self, settings: SimulationSettings, stub: serving_pb2_grpc.FlywheelStub):
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.judge = load_judge(settings.judge, self.rng)
        self.eval_judge = self.judge if settings.eval_judge is None else load_judge(settings.eval_judge, self.rng)
        self.stub = stub
        self.metadata = (("x-api-key", settings.api_key),) if settings.api_key else ()
        self.sent = 0
        self.recent_thumbs: deque[bool] = deque(maxlen=200)
        self.rows: list[dict] = []
        self.evaluator = 0
        """The number of the evaluator user id live last answered alone (`heldout_rate`)."""
        self.started = time.monotonic()
        self.next_event_at = self.started  # with a rate limit, when the next feedback event may go out

    async def ask(self, prompt: str, user_id: str, temperature: float) -> pb.GenerateResponse:
        sampling = pb.SamplingParams(max_tokens=self.settings.max_tokens, temperature=temperature)
        request = pb.GenerateRequest(chat=chat(prompt), sampling=sampling, user_id=user_id, tags={"source": "simulate"})
        return await self.stub.Generate(request, metadata=self.metadata, timeout=120)

    async def pace(self) -> None:
        """Wait for this user's turn under the rate limit, if there is one."""
        if self.settings.rate is None:
            return
        turn = self.next_event_at
        self.next_event_at = max(turn, time.monotonic()) + 1 / self.settings.rate
        await asyncio.sleep(max(0.0, turn - time.monotonic()))

    async def user(self) -> None:
        """One simulated user session after another until the event budget is spent."""
        while self.sent < self.settings.events:
            await self.pace()
            question = traffic_questions(self.rng, 1)[0]
            user_id = f"sim-user-{self.rng.randrange(self.settings.users)}"
            answer = await self.ask(question.prompt, user_id, self.settings.temperature)
            verdict = verdict_of(self.judge, question.prompt, answer.text)
            if verdict is None or self.sent >= self.settings.events:
                continue
            rated = pb.RatedResponse(response_id=answer.response_id, feedback_token=answer.feedback_token)
            await self.stub.SubmitFeedback(
                pb.SubmitFeedbackRequest(response=rated, user_id=user_id, rating=RATINGS[verdict]),
                metadata=self.metadata,
            )
            self.sent += 1
            self.recent_thumbs.append(verdict == "up")

    async def heldout_rate(self) -> tuple[float, int]:
        """Share of evaluation questions (never asked by the simulated users) whose greedy answer the eval judge
        likes, and the live version that answered them all.

        A canary answers its share of users: an evaluator among them would measure the canary, not live. So the
        evaluator is one whose every answer came from live; another is tried while one is not (or live moved),
        starting from the last one live answered, which a canary still running leaves where it was.
        """
        questions = evaluation_questions()[: self.settings.heldout_questions]
        for evaluator in range(self.evaluator, self.evaluator + EVALUATORS_TO_TRY):
            live = (await self.stub.GetPolicy(pb.GetPolicyRequest(), metadata=self.metadata)).policy_version
            user_id = f"sim-evaluator-{evaluator}"
            answers = await asyncio.gather(*(self.ask(q.prompt, user_id, 0.0) for q in questions))
            if {answer.policy_version for answer in answers} == {live}:
                self.evaluator = evaluator
                liked = [verdict_of(self.eval_judge, q.prompt, a.text) == "up" for q, a in zip(questions, answers)]
                return sum(liked) / len(questions), live
        raise RuntimeError(
            f"none of {EVALUATORS_TO_TRY} evaluators was answered by live alone: is a canary answering everyone?"
        )

    async def measure(self) -> dict:
        heldout, live = await self.heldout_rate()
        row = {
            "feedback_events": self.sent,
            "seconds": round(time.monotonic() - self.started, 1),
            "heldout_thumbs_up_rate": heldout,
            "traffic_thumbs_up_rate": sum(self.recent_thumbs) / len(self.recent_thumbs) if self.recent_thumbs else "",
            "policy_version": live,
            "trainer_mean_score": "",
            "trainer_kl_to_reference": "",
        } | await asyncio.to_thread(trainer_gauges, self.settings.trainer_metrics_url)
        self.rows.append(row)
        return row


async def simulate(settings: SimulationSettings, on_progress: Callable[[Simulation], None]) -> list[dict]:
    """Run the users and the periodic measurements; returns the measurement rows."""
    async with grpc.aio.insecure_channel(settings.target) as channel:
        simulation = Simulation(settings, serving_pb2_grpc.FlywheelStub(channel))
        await simulation.measure()
        users = [asyncio.create_task(simulation.user()) for _ in range(settings.concurrency)]
        next_measurement = settings.eval_every
        try:
            while not all(task.done() for task in users):
                await asyncio.wait(users, timeout=0.5)
                on_progress(simulation)
                if simulation.sent >= next_measurement:
                    await simulation.measure()
                    next_measurement += settings.eval_every
            for task in users:
                task.result()  # a judge error or a failed RPC ends the run with its message
        finally:
            for task in users:
                task.cancel()
        if simulation.rows[-1]["feedback_events"] != simulation.sent:
            await simulation.measure()
        return simulation.rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, rate_axis = pyplot.subplots(figsize=(8, 4.5))
    events = [row["feedback_events"] for row in rows]
    rate_line = rate_axis.plot(
        events, [row["heldout_thumbs_up_rate"] for row in rows], marker="o", label="held-out thumbs-up rate (greedy)"
    )
    rate_axis.set_xlabel("feedback events")
    rate_axis.set_ylabel("thumbs-up rate")
    rate_axis.set_ylim(0, 1)
    version_axis = rate_axis.twinx()
    version_line = version_axis.step(
        events,
        [row["policy_version"] for row in rows],
        where="post",
        color="grey",
        alpha=0.6,
        label="live policy version",
    )
    version_axis.set_ylabel("live policy version")
    rate_axis.legend(handles=rate_line + version_line, loc="center right")
    rate_axis.set_title("Flywheel: learning from thumbs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def run_simulation(settings: SimulationSettings) -> int:
    """The `flywheel simulate` command; returns the exit code."""
    try:
        for spec in (settings.judge, settings.eval_judge):
            if spec is not None:
                load_judge(spec, random.Random())
    except JudgeError as error:
        print(f"flywheel simulate: {error}")
        return 2
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    columns = (
        TextColumn("[bold]simulate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        bar = progress.add_task("", total=settings.events)

        def on_progress(simulation: Simulation) -> None:
            traffic = sum(simulation.recent_thumbs) / len(simulation.recent_thumbs) if simulation.recent_thumbs else 0.0
            last = simulation.rows[-1]
            progress.update(
                bar,
                completed=simulation.sent,
                description=f"thumbs-up {traffic:.0%} (recent traffic), {last['heldout_thumbs_up_rate']:.0%} held-out, "
                f"policy {last['policy_version']}",
            )

        try:
            rows = asyncio.run(simulate(settings, on_progress))
        except JudgeError as error:
            print(f"flywheel simulate: {error}")
            return 2
    write_csv(rows, settings.out_dir / "learning_curve.csv")
    plot(rows, settings.out_dir / "learning_curve.png")
    first, last = rows[0], rows[-1]
    print(
        f"held-out thumbs-up rate {first['heldout_thumbs_up_rate']:.0%} -> {last['heldout_thumbs_up_rate']:.0%} "
        f"over {last['feedback_events']} feedback events in {last['seconds']:.0f} s; policy {first['policy_version']} -> "
        f"{last['policy_version']}; curve in {settings.out_dir}"
    )
    return 0
