"""The trainer against the real (embedded) Kafka broker and real files.

- The reward model learns the demo users' thumbs and preferences: held-out pairwise accuracy.
- PPO raises the reward model's score on prompts it never saw, while the KL to the reference
  stays within the budget.
- A trainer whose candidates the gate keeps rejecting restarts its policy from the live one.
- `flywheel train`, SIGKILLed at several moments and restarted, ends with every published event
  taken exactly once and every label trained on exactly once.

Events are built the way the server logs answers (chat-rendered prompt ids, answer ids and the
end-of-turn token) and the way simulated users rate them (`judge_thumb`).
"""

import asyncio
import contextlib
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM, PreTrainedModel

from cli.config import REPO_ROOT, TrainConfig, load_config
from cli.main import trainer_config_of
from feedback.config import KafkaSettings, SpoolSettings
from feedback.connection import connection_options
from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.metrics import EventMetrics
from feedback.producer import EventProducer
from flywheel.demo.task import (
    DemoQuestion,
    evaluation_questions,
    hedged_answer,
    is_concise,
    judge_thumb,
    traffic_questions,
)
from flywheel.prompts import PromptRenderer
from flywheel.registry import PolicyRegistry, PolicyVerdict, VerdictCheck, Withheld
from flywheel.v1 import events_pb2, serving_pb2
from tests.kafka_fixtures import read_raw
from tests.test_reward_model import wrong_answer
from trainer.checkpoint import JOIN_STORE_FILE, LATEST, TrainerState, latest_checkpoint, load_state
from trainer.config import JoinStoreSettings, PPOSettings, RewardModelSettings, TrainerSettings
from trainer.join_store import JoinStore, PairBounds, PreferencePair
from trainer.loop import Trainer, TrainerConfig, rejections_in_a_row
from trainer.metrics import TrainerMetrics
from trainer.ppo import PolicyWithValue, Rollout, Sampler, TokenBatch, TransformersSampler, end_of_sequence_ids
from trainer.ppo_math import kl_per_answer, logprobs_from_logits
from trainer.reward_model import load_without_dropout

HANG_GUARD_S = 480  # only to fail instead of hanging; nothing here is a timing assertion
HELDOUT_FRACTION = 0.25
RATINGS = {"up": serving_pb2.RATING_UP, "down": serving_pb2.RATING_DOWN}


# ---------------------------------------------------------------- demo traffic


class DemoTraffic:
    """Answers logged as the server logs them, rated as the demo's simulated users rate them."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def prompt(self, question: DemoQuestion) -> tuple[str, list[int]]:
        """The chat-rendered prompt text and its token ids, as the server renders them."""
        rendered = PromptRenderer(self.tokenizer).chat([{"role": "user", "content": question.prompt}])
        return rendered.text, rendered.token_ids

    def answer(
        self, question: DemoQuestion, text: str, user_id: str = "alice", response_token_ids: Sequence[int] | None = None
    ) -> events_pb2.GenerationLogged:
        """A logged answer: `response_token_ids` as sampled, or else `text`'s ids and the end-of-turn token."""
        rendered, prompt_token_ids = self.prompt(question)
        if response_token_ids is None:
            response_token_ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        ended = response_token_ids[-1] == self.tokenizer.eos_token_id
        event = events_pb2.GenerationLogged(
            event_id=uuid.uuid4().hex,
            response_id=f"resp-{uuid.uuid4().hex}",
            rendered_prompt=rendered,
            response_text=text,
            prompt_token_ids=prompt_token_ids,
            response_token_ids=response_token_ids,
            finish_reason=serving_pb2.FINISH_REASON_STOP if ended else serving_pb2.FINISH_REASON_LENGTH,
            policy_version=1,
            user_id=user_id,
            server_id="test-server",
        )
        event.chat.messages.add(role="user", content=question.prompt)
        event.requested_at.GetCurrentTime()
        event.finished_at.GetCurrentTime()
        return event

    @staticmethod
    def feedback(answer: events_pb2.GenerationLogged, user_id: str, **vote) -> events_pb2.FeedbackGiven:
        event = events_pb2.FeedbackGiven(
            event_id=uuid.uuid4().hex, response_id=answer.response_id, user_id=user_id, policy_version=1, **vote
        )
        event.given_at.GetCurrentTime()
        return event

    def labelled(self, questions: Sequence[DemoQuestion]) -> list[Message]:
        """For each question the right answer and a wrong one, each thumbed by alice as `judge_thumb` says;
        for every third, also a hedged right answer, and bob preferring the plain one over it."""
        events: list[Message] = []
        for index, question in enumerate(questions):
            right, wrong = (
                self.answer(question, question.answer),
                self.answer(question, wrong_answer(self.rng, question)),
            )
            events += [right, wrong]
            for answer in (right, wrong):
                thumb = judge_thumb(question.prompt, answer.response_text)
                events.append(self.feedback(answer, "alice", rating=RATINGS[thumb]))
            if index % 3 == 0:
                hedged = self.answer(question, hedged_answer(question), user_id="bob")
                events += [hedged, self.feedback(right, "bob", preferred_over_response_id=hedged.response_id)]
        return events

    def policy_answers(self, sampler: Sampler, questions: Sequence[DemoQuestion], max_new_tokens: int) -> list[Message]:
        """The live policy's own sampled answers (temperature 1), each thumbed by carol as `judge_thumb` says."""
        responses = sampler([self.prompt(question)[1] for question in questions], max_new_tokens, 1.0)
        events: list[Message] = []
        for question, response in zip(questions, responses):
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            answer = self.answer(question, text, user_id="carol", response_token_ids=response)
            events += [answer, self.feedback(answer, "carol", rating=RATINGS[judge_thumb(question.prompt, text)])]
        return events


def topic_of(kafka: KafkaSettings, event: Message) -> str:
    return kafka.topics.generations if isinstance(event, events_pb2.GenerationLogged) else kafka.topics.feedback


async def publish(kafka: KafkaSettings, spool_dir: Path, events: Sequence[Message]) -> None:
    """Publish events the way the server does (keyed by response_id) and wait until Kafka has them all."""
    producer = EventProducer(kafka, SpoolSettings(directory=spool_dir), EventMetrics.register(CollectorRegistry()))
    await producer.start()
    try:
        for event in events:
            producer.publish(topic_of(kafka, event), event.response_id, event)
        async with asyncio.timeout(HANG_GUARD_S):
            await producer.flush()
    finally:
        await producer.stop()


def unused_train_labels(store: JoinStore) -> int:
    """Train-split thumbs and pairs the reward model has not trained on (all of them in a new store)."""
    return len(store.labelled_examples("train", HELDOUT_FRACTION)) + len(
        store.preference_pairs("train", HELDOUT_FRACTION)
    )


def train_labels(
    events: Sequence[Message], directory: Path, pair_bounds: PairBounds | None = None
) -> tuple[int, list[PreferencePair]]:
    """How many train-split labels the join store makes of `events`, and its held-out pairs (a scratch store's)."""
    store = JoinStore(directory / "expected.sqlite3", ttl_seconds=1e9, pair_bounds=pair_bounds or PairBounds())
    try:
        for event in events:
            if isinstance(event, events_pb2.GenerationLogged):
                store.add_generation(event)
            else:
                store.add_feedback(event)
        return unused_train_labels(store), store.preference_pairs("heldout", HELDOUT_FRACTION)
    finally:
        store.close()


@dataclass(frozen=True)
class LabelAccount:
    """What the trainer's last checkpoint says it took and trained on, beside what the events allow."""

    checkpoint: Path
    state: TrainerState
    seen: list[str]
    """Event ids in the checkpoint's join store: each event taken, once."""
    thumbs_used: int
    pairs_used: int
    waiting: int
    """Train labels not yet trained on."""
    expected_train: int
    """Train labels a scratch store makes of the published events."""

    @classmethod
    def of(cls, checkpoint_dir: Path, published: Sequence[Message], scratch: Path) -> "LabelAccount":
        checkpoint = latest_checkpoint(checkpoint_dir)
        snapshot = scratch / "final-join-store.sqlite3"
        shutil.copyfile(checkpoint / JOIN_STORE_FILE, snapshot)
        connection = sqlite3.connect(snapshot)
        seen = [event_id for (event_id,) in connection.execute("SELECT event_id FROM seen_events")]
        (thumbs_used,) = connection.execute("SELECT count(*) FROM votes WHERE used_as_label").fetchone()
        (pairs_used,) = connection.execute("SELECT count(*) FROM used_pairs").fetchone()
        connection.close()
        store = JoinStore(snapshot, ttl_seconds=1e9)
        waiting = unused_train_labels(store)
        store.close()
        expected_train, _ = train_labels(published, scratch)
        return cls(checkpoint, load_state(checkpoint), seen, thumbs_used, pairs_used, waiting, expected_train)

    def summary(self, events: int) -> str:
        return (
            f"final {self.checkpoint.name}: {self.state.model_dump()}; {events} events; train labels "
            f"{self.expected_train} = {self.thumbs_used} thumbs + {self.pairs_used} pairs used + {self.waiting} waiting"
        )


# ---------------------------------------------------------------- the trainer in this process


def without_nulls(settings: dict) -> dict:
    return {
        key: without_nulls(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if value is not None
    }


def trainer_config(tmp_path: Path, kafka: KafkaSettings, model_path: Path, **sections: dict) -> TrainerConfig:
    """The trainer's config as `flywheel train` reads it: the model directory's own settings (the demo
    model's flywheel.toml) below the test's `sections`; state, registry and spool under tmp_path. Whole
    weights unless `sections` say otherwise: the demo model learns as an adapter, and a test of adapter
    mode asks for it."""
    config = load_config(
        overrides={
            "state_dir": str(tmp_path),
            "policy": {"adapter": "none"} | sections.pop("policy", {}),
            "kafka": without_nulls(kafka.model_dump(mode="json")),
            "reward_model": {"heldout_fraction": HELDOUT_FRACTION} | sections.pop("reward_model", {}),
            # Votes train as soon as they arrive: these tests send each vote once and never change it.
            "join_store": {"vote_settle_seconds": 0} | sections.pop("join_store", {}),
            **sections,
        },
        model_dir=model_path,
    )
    return trainer_config_of(config.for_process(TrainConfig))


async def run_until(trainer: Trainer, config: TrainerConfig, done: Callable[[Trainer], bool], waiting_for: str) -> None:
    """Run `trainer` against Kafka, as `run_trainer` does, until `done(trainer)`; then stop it cleanly."""
    event_metrics = EventMetrics.register(CollectorRegistry())
    producer = EventProducer(config.kafka, config.spool, event_metrics)
    topics = [config.kafka.topics.generations, config.kafka.topics.feedback]
    consumer = EventConsumer(config.kafka, config.trainer.consumer_group, event_metrics, topics)
    stopping = asyncio.Event()
    await producer.start()
    await consumer.start()
    running = asyncio.create_task(trainer.run(consumer, producer, stopping))
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not done(trainer):
            if running.done():
                running.result()
                raise AssertionError(f"the trainer stopped by itself at {trainer.state}")
            assert time.monotonic() < deadline, f"gave up waiting for {waiting_for}; trainer state {trainer.state}"
            await asyncio.sleep(0.2)
        stopping.set()
        await running
    finally:
        if not running.done():
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        await consumer.stop()
        await producer.stop()


def logged(caplog, message: str) -> list:
    return [record for record in caplog.records if record.getMessage().startswith(message)]


def test_the_reward_model_learns_the_demo_users_feedback(model_path, tokenizer, kafka_settings, tmp_path, caplog):
    torch.manual_seed(0)
    PolicyRegistry(tmp_path / "registry").seed(model_path)
    traffic, questions = DemoTraffic(tokenizer, seed=0), traffic_questions(random.Random(0), 90)
    # Feedback arrives in three waves, each enough for one update of the reward model.
    waves = [traffic.labelled(questions[start : start + 30]) for start in range(0, 90, 30)]
    events = [event for wave in waves for event in wave]
    expected_train, heldout_pairs = train_labels(events, tmp_path)
    update_every_labels = 48
    config = trainer_config(
        tmp_path, kafka_settings, model_path,
        # One pass over ~250 labels, 48 an update: twice the demo's rate, whose reward model sees thousands.
        reward_model={"learning_rate": 2e-4, "update_every_labels": update_every_labels},
        trainer={"min_labels_before_ppo": 10**9, "checkpoint_every_steps": 1000},  # checkpoints are another test's
    )  # fmt: skip
    started = time.perf_counter()

    async def scenario() -> tuple[Trainer, float]:
        trainer = await asyncio.to_thread(Trainer.open, config, TrainerMetrics(CollectorRegistry()))
        untrained = trainer.reward_model.evaluate(heldout_pairs, [])["pairwise_accuracy"]

        async def feed() -> None:
            for wave in waves:
                updates = trainer.state.reward_model_updates
                await publish(kafka_settings, tmp_path / "test-spool", wave)
                while trainer.state.reward_model_updates == updates:
                    await asyncio.sleep(0.2)

        feeding = asyncio.create_task(feed())
        # All waves are in, and every label but the last few (under one update's worth) has been trained on.
        enough = expected_train - update_every_labels
        waiting_for = f"three waves, and more than {enough} of {expected_train} labels trained on"
        await run_until(trainer, config, lambda t: feeding.done() and t.state.labels_trained > enough, waiting_for)
        feeding.result()
        return trainer, untrained

    trainer, untrained = asyncio.run(scenario())
    try:
        updates = logged(caplog, "reward model updated")
        # The last update of those due at once evaluates: one a wave at least.
        accuracies = [round(record.pairwise_accuracy, 3) for record in updates if hasattr(record, "pairwise_accuracy")]
        evaluation = trainer.last_reward_model_eval
        final = trainer.reward_model.evaluate(
            trainer.join_store.preference_pairs("heldout", HELDOUT_FRACTION),
            trainer.join_store.labelled_examples("heldout", HELDOUT_FRACTION),
        )
        print(
            f"reward model: {len(events)} events, {trainer.state.labels_trained} of {expected_train} train labels, "
            f"{len(heldout_pairs)} held-out pairs; held-out accuracy untrained {untrained:.3f}, "
            f"after each update {accuracies}; "
            f"all held-out feedback {final}; {time.perf_counter() - started:.1f}s"
        )
        assert trainer.state.reward_model_updates == len(updates) >= len(accuracies) >= 3
        assert evaluation["pairwise_accuracy"] >= 0.75
        assert final["pairwise_accuracy"] >= 0.75
        assert final["pairwise_accuracy"] > untrained
        assert trainer.state.ppo_steps == 0
    finally:
        trainer.close()


def test_a_backlog_of_labels_drains_in_updates_of_the_set_size_and_is_evaluated_once(
    model_path, tokenizer, tmp_path, caplog
):
    PolicyRegistry(tmp_path / "registry").seed(model_path)
    events = DemoTraffic(tokenizer, seed=0).labelled(traffic_questions(random.Random(0), 30))
    expected_train, _ = train_labels(events, tmp_path)
    update_every_labels = 16
    config = trainer_config(
        tmp_path, KafkaSettings(), model_path,
        reward_model={"update_every_labels": update_every_labels}, trainer={"min_labels_before_ppo": 10**9},
    )  # fmt: skip
    trainer = Trainer.open(config, TrainerMetrics(CollectorRegistry()))
    try:
        assert not trainer.take([ConsumedEvent(topic_of(config.kafka, e), 0, n, "", e) for n, e in enumerate(events)])
        while trainer.update_reward_model() is not None:  # as the loop does after a poll
            pass
        updates = logged(caplog, "reward model updated")
        assert [record.labels for record in updates] == [update_every_labels] * (expected_train // update_every_labels)
        assert [hasattr(record, "pairwise_accuracy") for record in updates][-2:] == [False, True], "the last evaluates"
        assert trainer.last_reward_model_eval
    finally:
        trainer.close()


@torch.no_grad()
def score_and_kl(
    trainer: Trainer, policy: PreTrainedModel, prompts: list[list[int]], answers_per_prompt: int
) -> tuple[float, float, list[str]]:
    """The reward model's mean score of `policy`'s sampled answers to `prompts`, their KL to the
    reference (nats per answer, Σ log π − log π_ref at the PPO temperature), and one answer per
    prompt. Every call draws the same random numbers, so two policies are compared on equal terms."""
    settings, tokenizer, models = trainer.config.ppo, trainer.ppo.tokenizer, trainer.ppo.models
    torch.manual_seed(1234)
    repeated = [prompt for prompt in prompts for _ in range(answers_per_prompt)]
    sampler = TransformersSampler(policy, tokenizer.pad_token_id, trainer.ppo.eos_token_ids)
    responses = sampler(repeated, settings.max_new_tokens, settings.temperature)
    batch = TokenBatch.from_rollout(Rollout(repeated, responses, [False] * len(responses), 0.0), tokenizer.pad_token_id)
    scores = trainer.reward_model.model(batch.input_ids, batch.attention_mask)
    logprobs, reference = (
        logprobs_from_logits(PolicyWithValue.response_logits(model, batch), batch.response_ids, settings.temperature)
        for model in (policy, models.reference)
    )
    kl = kl_per_answer(logprobs, reference, batch.response_mask).mean().item()
    return (
        scores.mean().item(),
        kl,
        [tokenizer.decode(r, skip_special_tokens=True) for r in responses[::answers_per_prompt]],
    )


def test_ppo_raises_the_reward_models_score_on_unseen_prompts_within_the_kl_budget(
    model_path, tokenizer, kafka_settings, tmp_path, caplog
):
    torch.manual_seed(0)
    PolicyRegistry(tmp_path / "registry").seed(model_path)
    questions = traffic_questions(random.Random(2), 40)
    ppo_steps, max_new_tokens = 12, 16
    # Users thumb the live policy's own answers, and the right and wrong answers of other sources.
    traffic = DemoTraffic(tokenizer, seed=2)
    policy = load_without_dropout(AutoModelForCausalLM, model_path)
    eos_token_ids = end_of_sequence_ids(policy.generation_config.eos_token_id, tokenizer.eos_token_id)
    sampler = TransformersSampler(policy, tokenizer.pad_token_id, eos_token_ids)
    torch.manual_seed(0)
    own = traffic.policy_answers(sampler, questions * 2, max_new_tokens)
    hedged = [event.response_text for event in own[::2] if not is_concise(event.response_text)]
    assert hedged, (
        f"the demo model at {model_path} never hedges, so its users' feedback leaves PPO nothing it can learn: it "
        "is not a demo model built by flywheel/demo/init_model.py"
    )
    events = traffic.labelled(questions) + own
    # Benign traffic that asks each question many times: every pair its votes make is a label, as
    # before pairs were bounded against floods (the bounds are the join store's tests').
    unbounded = PairBounds(per_answer=10**6, per_prompt=10**6)
    expected_train, _ = train_labels(events, tmp_path, unbounded)
    update_every_labels = 48
    config = trainer_config(
        tmp_path, kafka_settings, model_path,
        join_store={"max_pairs_per_answer": unbounded.per_answer, "max_pairs_per_prompt": unbounded.per_prompt},
        reward_model={"learning_rate": 5e-4, "update_every_labels": update_every_labels},
        # PPO starts once the reward model has learnt from (nearly) every label.
        trainer={"min_labels_before_ppo": expected_train - update_every_labels + 1, "checkpoint_every_steps": 1000},
        # The demo model's own PPO settings, but shorter answers (a hedged answer takes about 10 tokens) and no candidates.
        ppo={"max_new_tokens": max_new_tokens, "candidate_every_steps": 1000},
    )  # fmt: skip
    started = time.perf_counter()

    async def scenario() -> Trainer:
        await publish(kafka_settings, tmp_path / "test-spool", events)
        trainer = await asyncio.to_thread(Trainer.open, config, TrainerMetrics(CollectorRegistry()))
        await run_until(trainer, config, lambda t: t.state.ppo_steps >= ppo_steps, f"{ppo_steps} PPO steps")
        return trainer

    trainer = asyncio.run(scenario())
    try:
        # The loop's evaluation split: questions the demo model learnt, but no user asks.
        prompts = [traffic.prompt(question)[1] for question in evaluation_questions()[::4]]
        before, _, answers_before = score_and_kl(trainer, trainer.ppo.models.reference, prompts, answers_per_prompt=8)
        after, kl, answers_after = score_and_kl(trainer, trainer.ppo.models.policy, prompts, answers_per_prompt=8)
        steps = logged(caplog, "PPO step")
        print(
            f"PPO on {len(events)} events: reward-model score on {len(prompts)} unseen prompts {before:.3f} -> {after:.3f}, "
            f"KL to reference {kl:.3f} nats (target {config.ppo.target_kl}); per step score "
            f"{[round(step.mean_score, 2) for step in steps]}, KL {[round(step.kl_to_reference, 2) for step in steps]}; "
            f"answers before {answers_before[-6:]}, after {answers_after[-6:]}; {time.perf_counter() - started:.1f}s"
        )
        assert len(steps) == trainer.state.ppo_steps >= ppo_steps
        assert all(step.first_minibatch_ratio == 1.0 for step in steps)
        assert after > before + 1.0
        # The budget holds on unseen prompts, and on average over the steps (one step's 16 answers are a noisy estimate).
        assert 0 <= kl < config.ppo.target_kl
        assert sum(step.kl_to_reference for step in steps) / len(steps) < config.ppo.target_kl
    finally:
        trainer.close()


# ---------------------------------------------------------------- the join store's TTL


def test_a_checkpoint_drops_unmatched_answers_past_the_ttl_and_the_steps_they_were_owed_stay_owed(
    tmp_path, monkeypatch
):
    clock = [0.0]
    store = JoinStore(tmp_path / "join.sqlite3", ttl_seconds=100.0, clock=lambda: clock[0])
    for n in range(10):
        store.add_generation(
            events_pb2.GenerationLogged(event_id=f"g{n}", response_id=f"r{n}", rendered_prompt=f"q{n}")
        )
    store.add_feedback(
        events_pb2.FeedbackGiven(event_id="v", response_id="r0", user_id="u", rating=serving_pb2.RATING_UP)
    )
    store.add_feedback(
        events_pb2.FeedbackGiven(event_id="w", response_id="gone", user_id="u", rating=serving_pb2.RATING_UP)
    )
    # 10 answers logged, 8 accounted for by earlier steps: 2 owed, one step's worth (prompts_per_step 2).
    state = TrainerState(reference_path="ref", reference_version=1, labels_trained=1, generations_at_last_step=8)
    config = TrainerConfig(
        trainer=TrainerSettings(checkpoint_dir=tmp_path / "checkpoint", min_labels_before_ppo=1),
        reward_model=RewardModelSettings(),
        ppo=PPOSettings(prompts_per_step=2),
        join_store=JoinStoreSettings(ttl_seconds=100.0),
        kafka=KafkaSettings(),
        spool=SpoolSettings(),
        registry_dir=tmp_path / "registry",
    )
    trainer = Trainer(config, state, ppo=None, reward_model=None, join_store=store, registry=None, metrics=None)
    saved = []  # (answers in the store, answers accounted for) as each checkpoint would write them

    def save_checkpoint(directory, state, ppo, reward_model, join_store, keep):
        saved.append((join_store.generation_count(), state.generations_at_last_step))

    monkeypatch.setattr("trainer.loop.save_checkpoint", save_checkpoint)
    clock[0] = 50.0  # within the TTL: nothing goes
    trainer.checkpoint()
    assert saved == [(10, 8)] and trainer.ppo_step_due()
    clock[0] = 150.0  # past it: r1..r9 (no vote) and the vote on "gone" (no answer) go; r0 and its vote stay
    trainer.checkpoint()
    # 1 answer kept; the 9 dropped leave the accounted-for count with it: 8 − 9 = −1, and 1 − (−1) = 2 still owed
    assert saved[-1] == (1, -1) and trainer.ppo_step_due()
    assert [example.answer.response_id for example in store.labelled_examples("train", 0.0)] == ["r0"]
    store.close()


# ---------------------------------------------------------------- restarting from the live policy


def verdict(approved: bool, check: str = "reward_score", withheld: Withheld | None = None) -> PolicyVerdict:
    checks = [VerdictCheck(name=check, passed=approved)]
    return PolicyVerdict(version=2, approved=approved, checks=checks, at=datetime.now(UTC), withheld=withheld)


def test_rejections_in_a_row_counts_judged_rejections_since_the_last_approval():
    superseded = verdict(False, Withheld.SUPERSEDED.value)  # written before `withheld` existed
    assert rejections_in_a_row([]) == 0
    assert rejections_in_a_row([verdict(False), verdict(True), verdict(False), superseded, None, verdict(False)]) == 2
    assert rejections_in_a_row([verdict(False)] * 3 + [None]) == 3
    assert rejections_in_a_row([verdict(False), verdict(True)]) == 0
    live_moved = verdict(False, withheld=Withheld.LIVE_MOVED)  # passed, but an operator rolled back meanwhile
    assert rejections_in_a_row([verdict(False), live_moved, verdict(False)]) == 2


def test_a_trainer_whose_candidates_keep_failing_restarts_from_the_live_policy(model_path, kafka_settings, tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    registry.seed(model_path)
    config = trainer_config(tmp_path, kafka_settings, model_path, trainer={"restart_after_rejections": 2})
    trainer = Trainer.open(config, TrainerMetrics(CollectorRegistry()))
    try:
        policy = trainer.ppo.models.policy
        live_weights = {name: weight.clone() for name, weight in policy.state_dict().items()}
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(0.01)
        trainer.ppo.policy_optimizer.state[next(policy.parameters())]["step"] = torch.tensor(1.0)
        first, second = trainer.publish_candidate(), trainer.publish_candidate()
        # each carries the reward model to judge it by, the unchanged one linked, not copied, and the trainer's reference
        reward_models = [registry.reward_model_path(event.policy_version) for event in (first, second)]
        assert [registry.manifest(event.policy_version).reference_version for event in (first, second)] == [1, 1]
        assert reward_models[0].joinpath("model.safetensors").samefile(reward_models[1] / "model.safetensors")
        assert not trainer.restart_due()  # not judged yet
        registry.record_verdict(first.policy_version, False, verdict(False).checks)
        assert not trainer.restart_due()
        registry.record_verdict(second.policy_version, False, verdict(False).checks)
        assert trainer.restart_due()

        assert trainer.restart_from_live() == 1
        for name, weight in policy.state_dict().items():
            torch.testing.assert_close(weight, live_weights[name], rtol=0, atol=0)
        assert not trainer.ppo.policy_optimizer.state
        assert trainer.state.restarted_after_version == second.policy_version
        assert not trainer.restart_due()  # the rejections before the restart no longer count
        third = trainer.publish_candidate()
        registry.record_verdict(third.policy_version, False, verdict(False).checks)
        assert not trainer.restart_due()
        assert trainer.metrics.registry.get_sample_value("flywheel_trainer_policy_restarts_total") == 1
    finally:
        trainer.close()


async def committed_offsets(kafka: KafkaSettings, group_id: str) -> dict[str, int]:
    """Per topic, the offsets `group_id` committed, summed over its partitions: how many records it has used."""
    reader = AIOKafkaConsumer(**connection_options(kafka), group_id=group_id, enable_auto_commit=False)
    await reader.start()
    try:
        committed = {}
        for topic in (kafka.topics.generations, kafka.topics.feedback):
            partitions = [TopicPartition(topic, partition) for partition in range(kafka.partitions)]
            committed[topic] = sum([await reader.committed(partition) or 0 for partition in partitions])
        return committed
    finally:
        await reader.stop()


def test_a_vote_the_join_store_refuses_is_dead_lettered_and_the_trainer_reads_on(model_path, kafka_settings, tmp_path):
    """Before, the store's ValueError stopped the trainer before its commit: restarted, it read the vote again, forever."""
    PolicyRegistry(tmp_path / "registry").seed(model_path)
    config = trainer_config(
        tmp_path, kafka_settings, model_path,
        reward_model={"update_every_labels": 10**9}, trainer={"min_labels_before_ppo": 10**9, "checkpoint_every_steps": 1000},
    )  # fmt: skip
    answer = events_pb2.GenerationLogged(
        event_id=uuid.uuid4().hex,
        response_id="resp-1",
        rendered_prompt="2+2?",
        prompt_token_ids=[5],
        response_token_ids=[6],
    )
    no_user = DemoTraffic.feedback(answer, "", rating=serving_pb2.RATING_DOWN)
    vote = DemoTraffic.feedback(answer, "alice", rating=serving_pb2.RATING_UP)
    later_answer = events_pb2.GenerationLogged(event_id=uuid.uuid4().hex, response_id="resp-2", response_token_ids=[7])
    events = [answer, no_user, vote, later_answer]

    async def scenario():
        trainer = await asyncio.to_thread(Trainer.open, config, TrainerMetrics(CollectorRegistry()))
        try:
            await publish(kafka_settings, tmp_path / "test-spool", events)
            await run_until(trainer, config, lambda t: t.events_consumed >= len(events), "all four events")
        finally:
            trainer.close()
        dead = await read_raw(kafka_settings, kafka_settings.topics.dead_letters, 1)
        return dead, await committed_offsets(kafka_settings, config.trainer.consumer_group)

    dead, committed = asyncio.run(scenario())

    (letter,) = [events_pb2.DeadLetter.FromString(record.value) for record in dead]
    assert letter.reason == "refused_by_trainer: FeedbackGiven: user_id must be set"
    assert (letter.source_topic, letter.key) == (kafka_settings.topics.feedback, b"resp-1")
    assert events_pb2.FeedbackGiven.FromString(letter.value) == no_user
    # The answers and alice's vote after the refused one are in the store; the refused one is not.
    assert seen_event_ids(config.join_store.path) == {answer.event_id, vote.event_id, later_answer.event_id}
    assert committed == {kafka_settings.topics.generations: 2, kafka_settings.topics.feedback: 2}  # all four events


# ---------------------------------------------------------------- `flywheel train` in a child process


def toml_document(tables: dict, prefix: str = "") -> str:
    """Nested dicts of strings, numbers and booleans as TOML (JSON's literals are TOML's for these)."""
    scalars = [f"{key} = {json.dumps(value)}" for key, value in tables.items() if not isinstance(value, dict)]
    lines = ([f"[{prefix}]"] if prefix else []) + scalars
    for key, value in tables.items():
        if isinstance(value, dict):
            lines.append(toml_document(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines) + "\n"


class TrainProcess:
    """`flywheel train --config FILE` as a child process; its JSON log lines are collected as they arrive.

    With `ranks` > 1, under torchrun on CPU (gloo): every rank's log lines arrive here interleaved.
    """

    def __init__(self, config_file: Path, ranks: int = 1):
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        self.process = subprocess.Popen(
            [*launcher, "-m", "cli", "train", "--config", str(config_file)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[dict] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="flywheel-train-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stderr:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = None
            with self._arrived:
                self.lines.append(line if isinstance(line, dict) else {"message": raw.rstrip()})
                self._arrived.notify_all()

    def wait_for(self, message: str, after: int = 0) -> int:
        """The index of the first log line from `after` on whose message starts with `message`."""
        deadline = time.monotonic() + HANG_GUARD_S
        with self._arrived:
            while True:
                for index in range(after, len(self.lines)):
                    if self.lines[index].get("message", "").startswith(message):
                        return index
                if self.process.poll() is not None and not self._reader.is_alive():
                    exited = self.process.returncode
                    raise AssertionError(f"flywheel train exited ({exited}) before {message!r}:\n{self.tail()}")
                assert time.monotonic() < deadline, f"no {message!r} in the log of flywheel train:\n{self.tail()}"
                self._arrived.wait(timeout=1)

    def line(self, index: int) -> dict:
        with self._arrived:
            return self.lines[index]

    def logged(self, message: str) -> list[dict]:
        """Every log line so far whose message starts with `message`."""
        with self._arrived:
            return [line for line in self.lines if line.get("message", "").startswith(message)]

    def logged_since(self, index: int, message: str) -> bool:
        with self._arrived:
            return any(line.get("message", "").startswith(message) for line in self.lines[index + 1 :])

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join()

    def stop(self) -> int:
        """SIGTERM, as an orchestrator stops it; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=HANG_GUARD_S)
        self._reader.join()
        return code

    def tail(self, lines: int = 30) -> str:
        return "\n".join(json.dumps(line) for line in self.lines[-lines:])


def latest_name(checkpoint_dir: Path) -> str | None:
    try:
        return (checkpoint_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def wait_for_new_checkpoint(checkpoint_dir: Path, trainer: TrainProcess, than: str | None) -> str:
    """Poll LATEST (every 10 ms, so a kill can follow a checkpoint closely) until it names another checkpoint than `than`."""
    deadline = time.monotonic() + HANG_GUARD_S
    while (name := latest_name(checkpoint_dir)) == than:
        assert trainer.process.poll() is None, (
            f"flywheel train exited ({trainer.process.returncode}):\n{trainer.tail()}"
        )
        assert time.monotonic() < deadline, f"no new checkpoint; LATEST is {name}:\n{trainer.tail()}"
        time.sleep(0.01)
    return name


def seen_event_ids(join_store_path: Path) -> set[str]:
    """The event ids in a join store another process may be writing (read-only; WAL readers do not block it)."""
    connection = sqlite3.connect(f"file:{join_store_path}?mode=ro", uri=True)
    try:
        return {event_id for (event_id,) in connection.execute("SELECT event_id FROM seen_events")}
    except sqlite3.OperationalError:  # not created yet
        return set()
    finally:
        connection.close()


@pytest.mark.subprocess
@pytest.mark.timeout(900)  # four starts of `flywheel train`, each importing torch and transformers
def test_flywheel_train_survives_sigkill_with_every_event_and_label_counted_once(
    model_path, tokenizer, kafka_settings, tmp_path
):
    state_dir, registry_dir = tmp_path / "state", tmp_path / "registry"
    checkpoint_dir, join_store_path = state_dir / "trainer" / "checkpoint", state_dir / "trainer" / "join_store.sqlite3"
    PolicyRegistry(registry_dir).seed(model_path)
    update_every_labels = 16
    settings = {
        "state_dir": str(state_dir),
        "registry_dir": str(registry_dir),
        "engine": {"model": str(model_path)},  # its flywheel.toml (the demo model's settings) ranks below this file
        "policy": {"adapter": "none"},  # whole weights: the demo's adapters are test_flywheel_up_adapters.py's
        # A SIGKILLed member keeps its partitions until its session times out: keep that short.
        "kafka": without_nulls(kafka_settings.model_dump(mode="json")) | {"session_timeout_ms": 4000},
        # Every candidate_every_steps-th policy is proposed, so that the registry shows candidates were: the
        # pre-check that may withhold them (on by default) is tests/test_candidate_precheck.py's.
        "trainer": {"metrics_port": 0, "min_labels_before_ppo": 60, "checkpoint_every_steps": 1,
                    "precheck_candidates": False},
        "join_store": {"vote_settle_seconds": 0},  # each vote is sent once and never changed
        "reward_model": {
            "update_every_labels": update_every_labels, "heldout_fraction": HELDOUT_FRACTION, "learning_rate": 5e-4,
        },
        "ppo": {
            "prompts_per_step": 8, "responses_per_prompt": 2, "max_new_tokens": 12, "epochs": 2, "minibatch_size": 8,
            "candidate_every_steps": 2,
        },
    }  # fmt: skip
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text(toml_document(settings))

    traffic = DemoTraffic(tokenizer, seed=1)
    questions = traffic_questions(random.Random(1), 70)
    rounds = [
        traffic.labelled(questions[start:end]) for start, end in ((0, 10), (10, 35), (35, 45), (45, 55), (55, 70))
    ]
    published: list[Message] = []

    def publish_round(events: list[Message]) -> None:
        asyncio.run(publish(kafka_settings, tmp_path / "test-spool", events))
        published.extend(events)

    started = time.perf_counter()
    moments: list[str] = []

    def killed(trainer: TrainProcess, moment: str) -> None:
        trainer.kill()
        moments.append(f"{moment} ({time.perf_counter() - started:.0f}s)")

    # 1. Killed right after a reward-model update: its checkpoint (if any) was not finished.
    trainer = TrainProcess(config_file)
    publish_round(rounds[0])
    trainer.wait_for("reward model updated")
    killed(trainer, f"right after a reward-model update, LATEST {latest_name(checkpoint_dir)}")

    # 2. Killed in the middle of a PPO step. Round 2 lifts the labels past min_labels_before_ppo and
    # leaves many steps owed; from then on, the loop pass that updates the reward model on round 3
    # goes straight on to a PPO step, and checkpoints only after it.
    trainer = TrainProcess(config_file)
    publish_round(rounds[1])
    first_step = trainer.wait_for("PPO step")
    publish_round(rounds[2])
    update = trainer.wait_for("reward model updated", after=first_step)
    time.sleep(0.1)
    in_step = not trainer.logged_since(update, "PPO step")
    killed(trainer, f"{'in' if in_step else 'after'} the PPO step after a reward-model update")

    # 3. Events published while no trainer runs; killed just after the restarted one's first checkpoint,
    # before (or while) it commits the Kafka offsets.
    publish_round(rounds[3])
    restored = latest_name(checkpoint_dir)
    trainer = TrainProcess(config_file)
    trainer.wait_for(f"training resumes from {restored}")
    written = wait_for_new_checkpoint(checkpoint_dir, trainer, than=restored)
    killed(trainer, f"right after checkpoint {written}")

    # 4. The last round; once every event is in the join store, a clean stop (SIGTERM) checkpoints it all.
    restored = latest_name(checkpoint_dir)
    trainer = TrainProcess(config_file)
    trainer.wait_for(f"training resumes from {restored}")
    publish_round(rounds[4])
    published_ids = [event.event_id for event in published]
    deadline = time.monotonic() + HANG_GUARD_S
    while not seen_event_ids(join_store_path) >= set(published_ids):
        assert time.monotonic() < deadline, f"the trainer did not take every event:\n{trainer.tail()}"
        time.sleep(0.2)
    assert trainer.stop() == 0, trainer.tail()

    account = LabelAccount.of(checkpoint_dir, published, tmp_path)
    print(f"flywheel train killed {moments}; {account.summary(len(published))}; {time.perf_counter() - started:.1f}s")

    # Every published event was taken exactly once (seen_events is keyed by event id) and no other.
    assert sorted(account.seen) == sorted(published_ids)
    # No label was trained on twice: the counter of trained labels is the number of distinct labels marked used ...
    assert account.state.labels_trained == account.thumbs_used + account.pairs_used
    # ... and none was skipped: every train label is used, but for fewer than one update's worth still waiting.
    assert account.thumbs_used + account.pairs_used + account.waiting == account.expected_train
    assert account.waiting < update_every_labels
    assert account.state.ppo_steps >= 2
    assert PolicyRegistry(registry_dir).latest() > 1  # candidates were proposed
