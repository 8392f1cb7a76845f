"""`flywheel train`: the feedback stream in, a better policy out, surviving a crash at any moment.

One pass of the loop:
1. read a batch of events and put answers and votes in the join store (idempotent by event id);
   an event the store refuses (a required field empty) goes to the dead-letter topic instead;
2. once enough new labels stand, update the reward model on them (and mark them used);
3. once the reward model has learnt enough and new traffic arrived, take a PPO step on prompts
   from the logged traffic; every `candidate_every_steps` steps run the gate's checks on the policy
   (trainer/precheck.py) and propose it to the gate only when they pass; steps then wait for the
   gate's decision on it (and on any canary) before going on. The policy follows live:
   the KL penalty holds it near live, and when live moves elsewhere than to the trainer's own
   candidate (a rollback, an operator), or after candidates rejected or withheld in a row, it
   restarts from live;
4. after every `checkpoint_every_steps` updates, write one atomic checkpoint, then commit the
   Kafka offsets of everything read so far.

A crash loses only work after the last checkpoint: the checkpoint's join store is put back, and
Kafka hands out again every event after the committed offsets. An event the checkpoint already
holds (read after the commit, before the crash) is dropped by its id. So no label is trained on
twice, and none is skipped.

Under torchrun rank 0 runs this loop and the other ranks follow its orders (trainer/ranks.py):
only rank 0 touches Kafka, the join store, checkpoints and the registry.
"""

import asyncio
import hashlib
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from aiokafka import TopicPartition
from rich.live import Live
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from feedback.consumer import ConsumedEvent, EventConsumer
from feedback.identity import capped_per_principal
from feedback.metrics import EventMetrics
from feedback.policy_events import policy_event
from feedback.producer import EventProducer
from flywheel.adapters import ADAPTER_WEIGHTS_FILE, is_adapter
from flywheel.registry import REWARD_MODEL_DIR, LiveRecord, PolicyRegistry, PolicyRemoved, PolicyVerdict
from flywheel.v1 import events_pb2
from trainer.checkpoint import (
    VALUE_HEAD_FILE,
    TrainerState,
    latest_checkpoint,
    load_state,
    remove_join_store,
    restore_join_store,
    restore_optimizers,
    save_checkpoint,
)
from trainer.config import RewardModelSettings, TrainerConfig
from trainer.distributed import SINGLE_PROCESS, Ranks
from trainer.join_store import JoinStore, LabelledExample, PairBounds, PreferencePair
from trainer.metrics import TrainerMetrics
from trainer.ppo import PolicyWithValue, PPOStepStats, PPOTrainer, ValueHead, end_of_sequence_ids
from trainer.precheck import CandidatePrecheck, PrecheckResult
from trainer.progress import live_display, progress_table
from trainer.ranks import (
    AnchorPolicy,
    Idle,
    Order,
    RestartPolicy,
    SaveCandidate,
    SaveCheckpoint,
    Stop,
    TakePPOStep,
    UpdateRewardModel,
    rank_seed,
)
from trainer.reward_model import RewardModel, RewardModelTrainer, load_without_dropout
from trainer.vllm_rollouts import VLLMSampler

log = logging.getLogger(__name__)

CANARY_RUNNING = "canary_running"
"""The label of flywheel_trainer_candidates_withheld for a candidate held while the gate decides a canary."""


class Trainer:
    """The models, the join store and the counters; `run` drives them from Kafka.

    Under several ranks, rank 0's Trainer runs and the others `follow` it; they have no join store.
    """

    def __init__(
        self,
        config: TrainerConfig,
        state: TrainerState,
        ppo: PPOTrainer,
        reward_model: RewardModelTrainer,
        join_store: JoinStore | None,
        registry: PolicyRegistry,
        metrics: TrainerMetrics,
        ranks: Ranks = SINGLE_PROCESS,
        precheck: CandidatePrecheck | None = None,
    ):
        self.ranks = ranks
        self.config = config
        self.state = state
        self.ppo = ppo
        self.reward_model = reward_model
        self.join_store = join_store
        self.registry = registry
        self.metrics = metrics
        self.precheck = precheck
        """Runs the gate's checks before each candidate; None proposes every one (trainer.precheck_candidates off)."""
        self.last_precheck: PrecheckResult | None = None
        self.last_step: PPOStepStats | None = None
        self.waiting_for: int | None = None
        """The version PPO steps last waited for the gate's decision on (`waiting_for_gate`)."""
        self.last_reward_model_eval: dict[str, float] = {}
        self.events_consumed = 0

    @classmethod
    def open(cls, config: TrainerConfig, metrics: TrainerMetrics, ranks: Ranks = SINGLE_PROCESS) -> "Trainer":
        """Resume from the latest checkpoint, or start from the registry's live policy.

        Under several ranks every rank calls this: rank 0 picks the checkpoint (or live policy) and
        every rank loads it (checkpoints and registry on a filesystem all ranks share).
        """
        registry = PolicyRegistry(config.registry_dir)
        checkpoint = live_version = live_is_adapter = reference_version = None
        if ranks.leads:
            checkpoint = latest_checkpoint(config.trainer.checkpoint_dir)
            live = registry.live() if checkpoint is None else None
            if checkpoint is None and live is None:
                raise RuntimeError(
                    f"the policy registry {config.registry_dir} has no live policy to start training from"
                )
            if live is not None:
                live_manifest = registry.manifest(live.version)
                # An adapter trains on its base; the reference is the base, the adapter switched off.
                live_version, live_is_adapter = live.version, live_manifest.is_adapter
                reference_version = live_manifest.base_version or live.version
        checkpoint, live_version, live_is_adapter, reference_version = ranks.broadcast(
            (checkpoint, live_version, live_is_adapter, reference_version)
        )
        # New heads (the reward model's score head, the value head) start the same on every rank.
        if ranks.distributed:
            torch.manual_seed(config.trainer.seed)
        if checkpoint is None:
            policy_path = registry.path(reference_version)
            state = TrainerState(
                reference_path=str(policy_path),
                reference_version=reference_version,
                following_live_version=live_version,
            )
            tokenizer = AutoTokenizer.from_pretrained(policy_path)
            reward_model = RewardModelTrainer(
                RewardModel.from_pretrained(config.reward_model.model_path or policy_path),
                config.reward_model,
                tokenizer.pad_token_id,
                ranks,
            )
            if live_is_adapter:
                models = PolicyWithValue.resume(registry.path(live_version), policy_path, None)
            else:
                models = PolicyWithValue.from_pretrained(policy_path, config.policy)
            if ranks.leads:
                # Labels a crashed run marked used never reached a checkpoint: start the store afresh,
                # and Kafka (no offsets committed yet) hands every event out again.
                remove_join_store(config.join_store.path)
                log.info("training starts from live policy %d at %s", live_version, registry.path(live_version))
        else:
            state = load_state(checkpoint)
            tokenizer = AutoTokenizer.from_pretrained(state.reference_path)
            reward_model = RewardModelTrainer.load(
                checkpoint / "reward_model", config.reward_model, tokenizer.pad_token_id, ranks
            )
            value_head = None
            if (checkpoint / VALUE_HEAD_FILE).exists():
                hidden_size = AutoConfig.from_pretrained(state.reference_path).hidden_size
                value_head = ValueHead.load(checkpoint / VALUE_HEAD_FILE, hidden_size)
            else:
                log.warning(
                    "checkpoint %s predates the value head (its critic was a separate model): starting a new one",
                    checkpoint.name,
                )
            models = PolicyWithValue.resume(checkpoint / "policy", state.reference_path, value_head)
            if models.uses_adapter != config.policy.uses_adapters:
                log.warning(
                    "checkpoint %s holds %s and policy.adapter is %r: training resumes as the checkpoint is; "
                    "the mode changes with a fresh trainer state (remove %s)",
                    checkpoint.name, "an adapter" if models.uses_adapter else "whole weights",
                    config.policy.adapter, config.trainer.checkpoint_dir,
                )  # fmt: skip
            if ranks.leads:
                restore_join_store(checkpoint, config.join_store.path)
                log.info("training resumes from %s", checkpoint.name, extra=state.model_dump())
        sampler = None
        if config.ppo.rollouts == "vllm":
            sampler = VLLMSampler(
                models.policy,
                state.reference_path,
                end_of_sequence_ids(models.policy.generation_config.eos_token_id, tokenizer.eos_token_id),
                config.ppo.rollout_engine,
                config.policy,
                sync_dir=config.trainer.checkpoint_dir.parent / "rollout-weights",
                seed=config.trainer.seed,
                ranks=ranks,
            )
        ppo = PPOTrainer(models, tokenizer, config.ppo, sampler=sampler, ranks=ranks)
        if checkpoint is not None:
            restore_optimizers(checkpoint, ppo, state)
        join_store = None
        if ranks.leads:
            join_store = JoinStore(
                config.join_store.path,
                config.join_store.ttl_seconds,
                vote_settle_seconds=config.join_store.vote_settle_seconds,
                pair_bounds=PairBounds(config.join_store.max_pairs_per_answer, config.join_store.max_pairs_per_prompt),
            )
        if ranks.distributed:
            role = "leads" if ranks.leads else "follows"
            log.info(
                "rank %d of %d %s",
                ranks.rank,
                ranks.world_size,
                role,
                extra={"rank": ranks.rank, "parallelism": ranks.parallelism, "pid": os.getpid()},
            )
        # The pre-check evaluates whole weights on rank 0 alone: under FSDP no rank holds them.
        precheck = (
            CandidatePrecheck(
                config.gate, config.reward_model.heldout_fraction, tokenizer, config.trainer.min_thumbs_up_gain
            )
            if config.trainer.precheck_candidates and ranks.leads and not ranks.sharded
            else None
        )
        trainer = cls(config, state, ppo, reward_model, join_store, registry, metrics, ranks, precheck)
        if state.anchor_version is not None:
            trainer.restore_anchor()
        return trainer

    def restore_anchor(self) -> None:
        """Every rank, on resume: the KL penalty's reference back from the registry, where rank 0 finds it (the
        ranks must agree while retention may remove it). Gone from there, the reference training began with,
        until the next step anchors on live."""
        anchor = None
        if self.ranks.leads:
            try:
                anchor = str(self.registry.path(self.state.anchor_version))
            except PolicyRemoved:
                log.warning(
                    "the KL reference, policy %d, is gone from the registry: anchoring on live again",
                    self.state.anchor_version,
                )
        anchor = self.ranks.broadcast(anchor)
        if anchor is None:
            self.state.anchor_version = None
        else:
            self.apply_anchor(anchor)

    # ------------------------------------------------------------ what every rank runs

    def order(self, order: Order) -> None:
        """Rank 0: tell the other ranks what every rank does next (nothing in one process)."""
        if self.ranks.distributed:
            self.ranks.broadcast(order)

    def follow(self) -> None:
        """Ranks other than 0: carry out rank 0's orders until it says stop."""
        while not isinstance(order := self.ranks.broadcast(None), Stop):
            match order:
                case UpdateRewardModel():
                    self.apply_reward_model_update(order)
                case TakePPOStep():
                    self.apply_ppo_step(order)
                case RestartPolicy(policy_path=path):
                    self.apply_restart(path)
                case AnchorPolicy(policy_path=path):
                    self.apply_anchor(path)
                case SaveCandidate():
                    self.save_candidate(Path("unwritten"), Path("unwritten"))  # only rank 0 writes
                case SaveCheckpoint():
                    self._save_checkpoint()
                case Idle():
                    pass
        self.log_weights_digest()

    def apply_reward_model_update(self, update: UpdateRewardModel) -> tuple[dict[str, float], dict[str, float]]:
        """Every rank: the update (same labels and shuffle everywhere), then rank 0's held-out evaluation."""
        if self.ranks.distributed:
            torch.manual_seed(update.seed)
        stats = self.reward_model.update(update.pairs, update.examples)
        if update.evaluate and self.ranks.sharded:
            return stats, self.reward_model.evaluate(update.heldout_pairs, update.heldout_examples)
        if update.evaluate and self.ranks.leads:
            settings = self.config.reward_model
            return stats, self.reward_model.evaluate(
                self.join_store.preference_pairs("heldout", settings.heldout_fraction),
                self.join_store.labelled_examples("heldout", settings.heldout_fraction),
            )
        return stats, {}

    def apply_ppo_step(self, step: TakePPOStep) -> PPOStepStats:
        """Every rank: sample answers to its share of the prompts and train on them; statistics over all ranks."""
        if self.ranks.distributed:
            torch.manual_seed(rank_seed(step.seed, self.ranks.rank, 0))
        rollout = self.ppo.rollout(step.prompts)
        if self.ranks.distributed:
            torch.manual_seed(rank_seed(step.seed, self.ranks.rank, 1))
        return self.ranks.reduce_stats(self.ppo.ppo_step(rollout, self.reward_model.model))

    def policy_weights(self, policy_path: str | Path) -> dict[str, torch.Tensor]:
        """The weights of the registry policy at `policy_path`, as the trainer's policy holds them: whole
        weights, or training an adapter, the adapter's (none when `policy_path` is the base itself)."""
        if not self.ppo.models.uses_adapter:
            return load_without_dropout(AutoModelForCausalLM, policy_path).state_dict()
        if is_adapter(Path(policy_path)):
            return load_file(Path(policy_path) / ADAPTER_WEIGHTS_FILE)
        return {}

    def apply_restart(self, policy_path: str | Path) -> None:
        """Every rank: the policy's weights from `policy_path`, its optimizer moments forgotten."""
        self.ppo.restart_policy(self.policy_weights(policy_path))

    def apply_anchor(self, policy_path: str | Path) -> None:
        """Every rank: the KL penalty's reference from `policy_path`; empty, the reference training began with."""
        self.ppo.anchor_policy(self.policy_weights(policy_path or self.state.reference_path))

    def save_candidate(self, policy_dir: Path, reward_model_dir: Path) -> None:
        """Every rank: the policy and the reward model the gate judges it with, whole; only rank 0 writes."""
        self.ppo.save_policy(policy_dir)
        weights = self.ranks.full_state_dict(self.reward_model.model)
        if self.ranks.leads:
            self.reward_model.model.save_pretrained(reward_model_dir, weights)

    def weights_digest(self) -> dict[str, str]:
        """SHA-256 of this rank's policy, value head and reward model weights (whole models only, not shards)."""
        digests = {}
        for name, model in (
            ("policy", self.ppo.models.policy),
            ("critic", self.ppo.models.critic),
            ("reward_model", self.reward_model.model),
        ):
            digest = hashlib.sha256()
            for key, tensor in sorted(model.state_dict().items()):
                digest.update(key.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
            digests[f"{name}_digest"] = digest.hexdigest()
        return digests

    def log_weights_digest(self) -> None:
        """Log, as it stops, what each rank's weights are: under DDP every rank's must be the same."""
        digests = {} if self.ranks.sharded else self.weights_digest()
        sampler = self.ppo.sampler
        engine_syncs = {"rollout_engine_syncs": sampler.syncs} if isinstance(sampler, VLLMSampler) else {}
        log.info("rank %d stops", self.ranks.rank, extra={"rank": self.ranks.rank, **digests, **engine_syncs})

    # ------------------------------------------------------------ the decisions

    def take(self, events: list[ConsumedEvent]) -> list[tuple[ConsumedEvent, str]]:
        """Put a batch of consumed events into the join store; repeats are dropped there by event id.

        Returns the events the store refused, each with its reason: dead-letter them, or the
        restarted trainer reads them again, and is refused again, forever.
        """
        self.events_consumed += len(events)
        refused = []
        for consumed in events:
            self.metrics.events_consumed.labels(topic=consumed.topic).inc()
            event = consumed.event
            try:
                if isinstance(event, events_pb2.GenerationLogged):
                    self.join_store.add_generation(event)
                    if self.precheck is not None:
                        self.precheck.offer(event)
                elif isinstance(event, events_pb2.FeedbackGiven):
                    self.join_store.add_feedback(event)
            except ValueError as refusal:  # the store checks the fields it joins on before it writes
                refused.append((consumed, str(refusal)))
        return refused

    def update_reward_model(self) -> dict[str, float] | None:
        """Train on the next `update_every_labels` standing labels once that many wait; None until they do.

        Only the last of the updates due at once evaluates the reward model on the held-out labels: a
        backlog drains without an evaluation per update.
        """
        settings = self.config.reward_model
        labels = labels_for_update(self.join_store, settings)
        # Counted before the share cap: labels one principal holds back must not stall the others'. The cap
        # keeps at least one label of what waits, so a due update is never empty.
        if labels.waiting < settings.update_every_labels:
            return None
        examples, pairs = labels.examples, labels.pairs
        taken = len(examples) + len(pairs)
        update = UpdateRewardModel(
            examples,
            pairs,
            seed=self.config.trainer.seed * 1_000_003 + self.state.reward_model_updates,
            evaluate=labels.waiting - taken < settings.update_every_labels,
        )
        if self.ranks.sharded and update.evaluate:
            update = replace(
                update,
                heldout_examples=self.join_store.labelled_examples("heldout", settings.heldout_fraction),
                heldout_pairs=self.join_store.preference_pairs("heldout", settings.heldout_fraction),
            )
        self.order(update)
        stats, evaluation = self.apply_reward_model_update(update)
        self.join_store.mark_used(examples, pairs)
        self.state.reward_model_updates += 1
        self.state.labels_trained += taken
        self.metrics.reward_model_updates.inc()
        if evaluation:
            self.last_reward_model_eval = evaluation
            if evaluation["pairwise_accuracy"] == evaluation["pairwise_accuracy"]:  # not NaN
                self.metrics.reward_model_accuracy.set(evaluation["pairwise_accuracy"])
            if evaluation["ece"] == evaluation["ece"]:
                self.metrics.reward_model_calibration_error.set(evaluation["ece"])
        log.info("reward model updated", extra={**stats, **evaluation, "labels": taken})
        return stats

    def ppo_step_due(self) -> bool:
        """One PPO step is owed for every `prompts_per_step` answers logged, once the reward model has learnt enough."""
        new_generations = self.join_store.generation_count() - self.state.generations_at_last_step
        return (
            self.state.labels_trained >= self.config.trainer.min_labels_before_ppo
            and new_generations >= self.config.ppo.prompts_per_step
        )

    def waiting_for_gate(self) -> int | None:
        """The version whose decision PPO steps wait for, or None: a canary being decided, or else the trainer's
        last candidate while the gate has not judged it. The steps stay owed and are taken after.

        Steps taken meanwhile could not be proposed, nor checked against the policy that comes out of the
        decision, and drift: in the demo a policy trained on through a five-minute canary answered 8% of
        the golden prompts (live 71%). A gate that is down holds PPO until it is back (the reward model
        keeps learning); `flywheel_trainer_waiting_for_gate` shows it.
        """
        canary = self.registry.canary()
        last = self.state.last_candidate_version
        if canary is not None:
            waiting = canary.version
        elif last is not None and self.registry.verdict(last) is None:
            waiting = last
        else:
            waiting = None
        if waiting is not None and waiting != self.waiting_for:
            log.info("PPO steps wait for the gate's decision on policy %d", waiting)
        self.waiting_for = waiting
        self.metrics.waiting_for_gate.set(waiting or 0)
        return waiting

    def ppo_step(self) -> PPOStepStats:
        """One PPO step on prompts drawn from logged traffic."""
        started = time.perf_counter()
        rng = random.Random(self.config.trainer.seed * 1_000_003 + self.state.ppo_steps)
        prompts = self.join_store.prompts_for_rollouts(
            self.config.ppo.prompts_per_step, rng, self.config.reward_model.max_principal_share
        )
        if self.ranks.distributed:
            step = TakePPOStep(prompts, seed=self.config.trainer.seed * 1_000_003 + self.state.ppo_steps)
            self.order(step)
            stats = self.apply_ppo_step(step)
        else:  # one process draws from torch's global stream, unseeded per step, as it always has
            stats = self.ppo.ppo_step(self.ppo.rollout(prompts), self.reward_model.model)
        self.state.ppo_steps += 1
        self.state.generations_at_last_step += self.config.ppo.prompts_per_step
        self.last_step = stats
        self.metrics.ppo_steps.inc()
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.last_step_timestamp.set(time.time())
        for name, gauge in self.metrics.ppo.items():
            gauge.set(getattr(stats, name))
        log.info("PPO step %d", self.state.ppo_steps, extra=asdict(stats))
        return stats

    def restart_due(self) -> str | None:
        """Why the policy should restart from live now, or None: the gate rejected the last
        `restart_after_rejections` candidates judged since the last restart, or the pre-check withheld
        the last `restart_after_withheld` candidates in a row as drifted (`PrecheckResult.drifted`; one
        the reward model alone finds no better than live neither counts nor breaks the row).

        A trainer whose candidates keep failing has drifted from what is served; training on from
        there would only drift further.
        """
        withheld_needed = self.config.trainer.restart_after_withheld
        if withheld_needed and self.state.withheld_in_a_row >= withheld_needed:
            return f"{self.state.withheld_in_a_row} candidates in a row withheld by the pre-check as drifted"
        needed = self.config.trainer.restart_after_rejections
        if needed == 0:
            return None
        verdicts = [
            self.registry.verdict(version)
            for version in self.registry.versions()
            if version > self.state.restarted_after_version
            and self.registry.manifest(version).parent_version is not None
        ]
        rejected = rejections_in_a_row(verdicts)
        return f"{rejected} candidates in a row rejected by the gate" if rejected >= needed else None

    def live_moved_elsewhere(self, live: LiveRecord | None) -> LiveRecord | None:
        """`live`, when it moved to a version outside the policy's own lineage since the policy last followed it.

        The policy's own lineage is what it trained on from: the version it (re)started from, and its
        candidates proposed since then that the gate approved. Live moving to one of those is followed
        silently (the policy trained on past it); moving anywhere else (a rollback, an operator's move)
        is returned, and the policy should restart from it.
        """
        if live is None or live.version == self.state.following_live_version:
            return None
        if self.state.following_live_version is None or (
            live.kind == "approved" and live.version > self.state.restarted_after_version
        ):
            self.state.following_live_version = live.version
            log.info("live moved to policy %d, which this policy trained on from", live.version)
            return None
        return live

    def follow_live(self) -> int | None:
        """Before a PPO step: restart the policy from live when live moved outside its lineage, or when
        candidates keep failing (`restart_due`); then anchor the KL penalty on live (`anchor_on_live`).
        Returns the version restarted from, None when none."""
        live = self.registry.live()  # read once: a move landing meanwhile waits for the next step
        restarted = None
        if (moved := self.live_moved_elsewhere(live)) is not None:
            restarted = self.restart_from_live(
                f"live moved to policy {moved.version} ({moved.kind}: {moved.reason})", live
            )
        elif (reason := self.restart_due()) is not None:
            restarted = self.restart_from_live(reason, live)
        self.anchor_on_live(live)
        return restarted

    def anchor_on_live(self, live: LiveRecord | None) -> None:
        """Make `live` the reference the PPO's KL penalty holds the policy near, when live moved since.

        Every approval then starts a new trust region around what users approved: held near where
        training began instead, a policy that follows a live one far from it is pulled back (and loses
        what users liked) by the penalty, and never beats live again. The gate still bounds the
        distance from where training began (its kl_to_reference check; the pre-check's too).
        """
        anchor = None if live is None or live.version == self.state.reference_version else live.version
        if anchor == self.state.anchor_version:
            return
        order = AnchorPolicy("" if anchor is None else str(self.registry.path(anchor)))
        self.order(order)
        self.apply_anchor(order.policy_path)
        self.state.anchor_version = anchor
        log.info(
            "the KL penalty now holds the policy near %s",
            "its reference" if anchor is None else f"live policy {anchor}",
        )

    def restart_from_live(self, reason: str = "", live: LiveRecord | None = None) -> int:
        """Restart the policy from the weights of `live` (by default, the registry's live version); the value
        head and reward model stay, and the next step's `anchor_on_live` moves the KL penalty's reference to it.
        Returns the version."""
        live = live or self.registry.live()
        if live is None:
            raise RuntimeError(f"the policy registry {self.config.registry_dir} has no live policy to restart from")
        restart = RestartPolicy(str(self.registry.path(live.version)))
        self.order(restart)
        self.apply_restart(restart.policy_path)
        self.state.restarted_after_version = self.registry.latest() or 0
        self.state.following_live_version = live.version
        self.state.withheld_in_a_row = 0
        self.metrics.policy_restarts.inc()
        log.warning("policy restarted from live version %d: %s", live.version, reason or "asked to")
        return live.version

    def candidate_due(self) -> bool:
        return self.state.ppo_steps > 0 and self.state.ppo_steps % self.config.ppo.candidate_every_steps == 0

    def propose_candidate(self) -> events_pb2.PolicyEvent | None:
        """Publish the policy as a candidate if the gate's checks pass on it (`candidate_passes_precheck`);
        the event to announce, or None when the candidate was withheld.

        Held while the gate decides a canary: it judges nothing else meanwhile, so a candidate proposed
        then would wait for the canary's votes and be superseded by the next one.
        """
        canary = self.registry.canary()
        if canary is not None:
            self.metrics.candidates_withheld.labels(check=CANARY_RUNNING).inc()
            log.info("candidate held at PPO step %d: canary %d is being decided", self.state.ppo_steps, canary.version)
            return None
        return self.publish_candidate() if self.candidate_passes_precheck() else None

    def candidate_passes_precheck(self) -> bool:
        """Run the gate's checks on the policy against live; a candidate that fails one, or that the reward model
        predicts no more than trainer.min_thumbs_up_gain better liked than live, is withheld.

        True without a pre-check, and when the eval set cannot be judged (then the gate decides).
        """
        live = self.registry.live()
        if self.precheck is None or live is None:
            return True
        models, anchored = self.ppo.models, self.state.anchor_version is not None
        result = self.precheck.check(
            models.policy,
            None if anchored else models.reference,
            self.reward_model,
            live.version,
            self.registry.path(live.version),
            Path(self.state.reference_path),
            live_model=models.reference if anchored and self.state.anchor_version == live.version else None,
        )
        if result is None:
            log.warning("pre-check skipped: no golden prompts, or fewer than two eval prompts")
            return True
        self.last_precheck = result
        self.metrics.kl_to_live.set(result.kl_to_live)
        values = {check.name: check.value for check in result.checks}
        distances = {"kl_to_live": result.kl_to_live, "live_version": live.version, "prompts": result.prompts}
        if result.propose:
            self.state.withheld_in_a_row = 0
            log.info("pre-check passed at PPO step %d", self.state.ppo_steps, extra=values | distances)
            return True
        if result.drifted:
            self.state.withheld_in_a_row += 1
        for name in result.failed:
            self.metrics.candidates_withheld.labels(check=name).inc()
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
        log.info("candidate withheld at PPO step %d: %s", self.state.ppo_steps, reasons, extra=values | distances)
        return False

    def publish_candidate(self) -> events_pb2.PolicyEvent:
        """Write the policy into the registry as a new version and describe it for the gate."""
        live = self.registry.live()
        metrics = {"ppo_steps": float(self.state.ppo_steps)}
        if self.last_step is not None:
            metrics |= {"kl_to_reference": self.last_step.kl_to_reference, "mean_score": self.last_step.mean_score}
        with tempfile.TemporaryDirectory(prefix="candidate-") as staging:
            policy_dir, reward_model_dir = Path(staging) / "policy", Path(staging) / REWARD_MODEL_DIR
            self.order(SaveCandidate())
            self.save_candidate(policy_dir, reward_model_dir)
            manifest = self.registry.publish(
                policy_dir,
                parent_version=None if live is None else live.version,
                training_step=self.state.ppo_steps,
                metrics=metrics,
                reward_model_dir=reward_model_dir,
                reference_version=self.state.reference_version,
                base_version=self.state.reference_version if self.ppo.models.uses_adapter else None,
            )
        self.state.last_candidate_version = manifest.version
        self.metrics.candidates.inc()
        log.info("candidate policy %d proposed", manifest.version)
        return policy_event(
            events_pb2.POLICY_EVENT_KIND_CANDIDATE,
            manifest.version,
            manifest.parent_version,
            event_id=f"candidate-{manifest.version}-{manifest.digest[:16]}",
            path=str(self.registry.path(manifest.version)),
            digest=manifest.digest,
        )

    def expire_unmatched(self) -> int:
        """Drop answers nobody voted on and votes whose answer never came, once older than join_store.ttl_seconds.

        The answers dropped stay counted as logged: the PPO steps they were owed are not lost with them.
        Returns how many answers and votes went.
        """
        kept = self.join_store.generation_count()
        expired = self.join_store.expire_unmatched()
        self.state.generations_at_last_step -= kept - self.join_store.generation_count()
        if expired:
            log.info("join store: %d unmatched answers and votes expired", expired)
        return expired

    def checkpoint(self) -> Path:
        """Expire what the join store's TTL allows, then write the store and the counters as one checkpoint."""
        self.expire_unmatched()
        self.order(SaveCheckpoint())
        return self._save_checkpoint()

    def _save_checkpoint(self) -> Path | None:
        return save_checkpoint(
            self.config.trainer.checkpoint_dir,
            self.state,
            self.ppo,
            self.reward_model,
            self.join_store,
            keep=self.config.trainer.keep_checkpoints,
        )

    def close(self) -> None:
        if self.join_store is not None:
            self.join_store.close()
        if isinstance(self.ppo.sampler, VLLMSampler):
            self.ppo.sampler.shutdown()

    # ------------------------------------------------------------ the loop

    async def run(self, consumer: EventConsumer, producer: EventProducer, stopping: asyncio.Event) -> None:
        """Consume, train and checkpoint until `stopping` is set."""
        with live_display() as display:
            await self._run(consumer, producer, stopping, display)

    async def _run(
        self, consumer: EventConsumer, producer: EventProducer, stopping: asyncio.Event, display: Live | None
    ) -> None:
        uncommitted: dict[TopicPartition, int] = {}
        updates_since_checkpoint = 0
        while not stopping.is_set():
            batch = await consumer.poll(timeout_ms=500)
            for consumed, reason in self.take(batch.events):
                await consumer.dead_letter(consumed, "refused_by_trainer", reason)
            uncommitted.update(batch.next_offsets)
            while await asyncio.to_thread(self.update_reward_model) is not None:  # a backlog must not grow
                updates_since_checkpoint += 1
            if self.ppo_step_due() and await asyncio.to_thread(self.waiting_for_gate) is None:
                await asyncio.to_thread(self.follow_live)
                await asyncio.to_thread(self.ppo_step)
                updates_since_checkpoint += 1
                if self.candidate_due() and (event := await asyncio.to_thread(self.propose_candidate)) is not None:
                    producer.publish(self.config.kafka.topics.policy, str(event.policy_version), event)
            if updates_since_checkpoint >= self.config.trainer.checkpoint_every_steps:
                await self._checkpoint_then_commit(consumer, uncommitted)
                uncommitted, updates_since_checkpoint = {}, 0
            for topic, behind in (await consumer.lag()).items():
                self.metrics.consumer_lag.labels(topic=topic).set(behind)
            if display is not None:
                display.update(
                    progress_table(self.state, self.events_consumed, self.last_step, self.last_reward_model_eval)
                )
            await asyncio.to_thread(self.order, Idle())
        if uncommitted or updates_since_checkpoint:
            await self._checkpoint_then_commit(consumer, uncommitted)
        await asyncio.to_thread(self.order, Stop())
        if self.ranks.distributed:
            self.log_weights_digest()

    async def _checkpoint_then_commit(self, consumer: EventConsumer, uncommitted: dict[TopicPartition, int]) -> None:
        """Checkpoint, then commit the offsets of what was read before it; in that order a crash loses nothing."""
        await asyncio.to_thread(self.checkpoint)
        if uncommitted:  # nothing was read since the last commit (PPO steps on earlier traffic): aiokafka refuses {}
            await consumer.commit(uncommitted)


@dataclass(frozen=True)
class LabelsForUpdate:
    examples: list[LabelledExample]
    pairs: list[PreferencePair]
    waiting: int
    """Unused settled labels before the share cap: whether an update is due."""


def labels_for_update(join_store: JoinStore, settings: RewardModelSettings) -> LabelsForUpdate:
    """The next update's labels: at most `update_every_labels` unused settled training labels, thumbs
    and pairs in arrival order, each principal's oldest, none supplying more than its share.

    With one principal they are the oldest that many: each update's labels are a matter of the
    events, not of how many had arrived when it ran. A principal's share is counted over every
    label waiting, so with several it also depends on what waits. The rest wait for a later update.
    """
    waiting = sorted(
        [
            *join_store.labelled_examples("train", settings.heldout_fraction),
            *join_store.preference_pairs("train", settings.heldout_fraction),
        ],
        key=lambda label: label.arrival,
    )
    labels = capped_per_principal(
        waiting, lambda label: label.principal, settings.max_principal_share, settings.update_every_labels
    )
    return LabelsForUpdate(
        [label for label in labels if isinstance(label, LabelledExample)],
        [label for label in labels if isinstance(label, PreferencePair)],
        len(waiting),
    )


def rejections_in_a_row(verdicts: list[PolicyVerdict | None]) -> int:
    """How many of the latest judged candidates the gate rejected in a row, oldest to newest verdicts
    (None: not judged yet). Candidates withheld for another reason than their checks (superseded
    before they were judged, or passed while live moved away) do not count either way."""
    judged = [verdict for verdict in verdicts if verdict is not None and verdict.judged_on_checks]
    count = 0
    for verdict in reversed(judged):
        if verdict.approved:
            break
        count += 1
    return count


async def run_trainer(
    config: TrainerConfig,
    metrics: TrainerMetrics,
    event_metrics: EventMetrics,
    stopping: asyncio.Event,
    ranks: Ranks = SINGLE_PROCESS,
) -> None:
    """Open (or resume) the trainer and run it against Kafka until `stopping` is set.

    Ranks other than 0 ignore `stopping`: they follow rank 0's orders until it stops them.
    """
    trainer = await asyncio.to_thread(Trainer.open, config, metrics, ranks)
    if not ranks.leads:
        try:
            await asyncio.to_thread(trainer.follow)
        finally:
            trainer.close()
        return
    producer = EventProducer(config.kafka, config.spool, event_metrics)
    consumer = EventConsumer(
        config.kafka,
        config.trainer.consumer_group,
        event_metrics,
        [config.kafka.topics.generations, config.kafka.topics.feedback],
    )
    await producer.start()
    try:
        await consumer.start()
        try:
            await trainer.run(consumer, producer, stopping)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        trainer.close()
