"""The trainer's own run of the gate's checks, before it proposes a candidate.

A candidate the gate rejects costs a gate evaluation and a full copy in the registry, and a
trainer whose policy drifted keeps proposing them. So at candidate time the trainer evaluates
its policy against live exactly as the gate will (trainer/policy_eval.py, the same rules, the
same `gate` settings) on the golden prompts and the held-out prompts it saw in traffic, and
proposes only when every check passes and the policy is worth proposing: the reward model predicts
that users give it more thumbs up than live by at least `trainer.min_thumbs_up_gain` (`thumbs_up_gain`,
the trainer's own rule; a policy no better than live would pass the gate's non-inferiority check and
cost a swap for nothing, and one only a little better fails the canary, which asks for a rise of
`gate.canary.min_improvement`). It also measures how far its policy is from live.

Only a candidate that fails a check the reward model does not judge (KL, safety, degeneration,
golden answers) has drifted; one that fails only the reward checks is not better yet, by a reward
model that may still be young, and should train on rather than restart from live.

Live's answers are cached per live version and prompt (greedy, so they do not change); its
scores are taken again each time, as the reward model moves.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.v1 import events_pb2
from trainer.config import CandidateCheckSettings
from trainer.gate_checks import (
    REWARD_SCORE_CHECK,
    EvalAnswer,
    GateCheck,
    GateVerdict,
    PolicyEval,
    decide,
    golden_accuracy,
)
from trainer.policy_eval import EvalPrompt, HeldoutPrompts, PolicyEvaluator, kl_prompts, load_golden
from trainer.reward_model import RewardModelTrainer, load_policy

log = logging.getLogger(__name__)

THUMBS_UP_GAIN_CHECK = "thumbs_up_gain"
CHECKS_JUDGED_BY_REWARD_MODEL = frozenset({REWARD_SCORE_CHECK, THUMBS_UP_GAIN_CHECK})


def drift_checks_failed(failed: list[str]) -> list[str]:
    """Of the names of failed checks, those that say the policy drifted where the gate forbids it: every
    check but the ones the reward model judges, whose failure alone means only "not better yet"."""
    return [name for name in failed if name not in CHECKS_JUDGED_BY_REWARD_MODEL]


@dataclass(frozen=True)
class PrecheckResult:
    """The gate's verdict as the trainer predicts it, the trainer's own gain check, and the distances it
    measured (nats per answer)."""

    verdict: GateVerdict
    thumbs_up_gain: GateCheck
    live_version: int
    kl_to_reference: float
    kl_to_live: float
    prompts: int

    @property
    def propose(self) -> bool:
        return self.verdict.approved and self.thumbs_up_gain.passed

    @property
    def checks(self) -> list[GateCheck]:
        return [*self.verdict.checks, self.thumbs_up_gain]

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    @property
    def drifted(self) -> bool:
        """Whether a check the reward model does not judge failed (see `drift_checks_failed`)."""
        return bool(drift_checks_failed(self.failed))


def predicted_thumbs_up_rate(reward_scores: Sequence[float]) -> float:
    """The share of thumbs up the reward model predicts for these answers: the mean of σ(score), as its
    pointwise loss trains σ(score) toward the chance of a thumbs up."""
    return torch.sigmoid(torch.tensor(reward_scores, dtype=torch.float64)).mean().item()


def thumbs_up_gain_check(candidate: PolicyEval, live: PolicyEval, min_gain: float) -> GateCheck:
    """Whether the reward model predicts the candidate's thumbs-up rate above live's by more than `min_gain`
    (an absolute rise, as the canary's), on the same prompts: worth a gate evaluation, a canary and a swap."""
    gain = predicted_thumbs_up_rate(candidate.reward_scores) - predicted_thumbs_up_rate(live.reward_scores)
    return GateCheck(
        name=THUMBS_UP_GAIN_CHECK,
        value=gain,
        threshold=min_gain,
        passed=gain > min_gain,
        detail=f"predicted thumbs-up rate candidate − live {gain:+.3f} on {len(candidate.reward_scores)} prompts; "
        f"must be > {min_gain:+.3f}",
    )


@dataclass
class _LiveEvaluation:
    version: int
    model: PreTrainedModel
    answers: dict[str, EvalAnswer] = field(default_factory=dict)
    """Greedy answers by prompt text."""


class CandidatePrecheck:
    """Predicts the gate's verdict on the trainer's policy; keeps the eval set and live's answers between calls."""

    def __init__(
        self,
        settings: CandidateCheckSettings,
        heldout_fraction: float,
        tokenizer: PreTrainedTokenizerBase,
        min_thumbs_up_gain: float,
    ):
        self.settings = settings
        self.min_thumbs_up_gain = min_thumbs_up_gain
        self.tokenizer = tokenizer
        self.heldout = HeldoutPrompts(settings.heldout_prompts, heldout_fraction, settings.max_principal_share)
        golden_path = settings.golden_path()
        self.golden = [] if golden_path is None else load_golden(golden_path, tokenizer)
        self._live: _LiveEvaluation | None = None
        self._base: PreTrainedModel | None = None
        self._reference_golden_accuracy: float | None = None

    def offer(self, event: events_pb2.GenerationLogged) -> None:
        """A logged answer: its prompt joins the eval set when it is a held-out one (as the gate's)."""
        self.heldout.offer(event)

    def eval_prompts(self) -> list[EvalPrompt]:
        """The gate's eval set: held-out prompts from traffic, then the golden ones."""
        return self.heldout.current() + self.golden

    def check(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel | None,
        reward_model: RewardModelTrainer,
        live_version: int,
        live_path: Path,
        base_path: Path,
        live_model: PreTrainedModel | None = None,
    ) -> PrecheckResult | None:
        """The gate's checks on `policy` against live; None when the eval set cannot be judged (no golden
        prompts, or fewer than two prompts), as the gate could not either.

        `base_path`: the base model, which an adapter (the policy's or live's) applies to, and the gate's
        KL reference; `reference` is that model when the trainer holds it (whole weights, its KL penalty not
        moved to live), else None and it is loaded once from `base_path`. `live_model`: live's weights when the
        trainer holds them already (whole weights, its KL penalty anchored on live), else loaded from `live_path`."""
        prompts = self.eval_prompts()
        if not self.golden or len(prompts) < 2:
            return None
        evaluator = PolicyEvaluator(self.tokenizer, reward_model, self.settings)
        live = self._live_evaluation(live_version, live_path, base_path, policy.device, live_model)
        if reference is None:
            reference = self._base_reference(base_path, policy.device)
        missing = [p for p in prompts if p.text not in live.answers]
        live.answers |= {answer.prompt: answer for answer in evaluator.answers(live.model, missing)}
        if self._reference_golden_accuracy is None:  # the reference never changes while the trainer runs
            self._reference_golden_accuracy = golden_accuracy(evaluator.answers(reference, self.golden))
        kl_to_reference, kl_to_live = evaluator.kl(policy, [reference, live.model], kl_prompts(prompts))
        candidate_eval = evaluator.evaluation(prompts, evaluator.answers(policy, prompts))
        live_eval = evaluator.evaluation(prompts, [live.answers[p.text] for p in prompts])
        verdict = decide(
            candidate_eval, live_eval, self.settings.thresholds, kl_to_reference, self._reference_golden_accuracy
        )
        gain = thumbs_up_gain_check(candidate_eval, live_eval, self.min_thumbs_up_gain)
        return PrecheckResult(verdict, gain, live_version, kl_to_reference, kl_to_live, len(prompts))

    def _base_reference(self, base_path: Path, device) -> PreTrainedModel:
        if self._base is None:
            self._base = load_policy(base_path).to(device).requires_grad_(False)
        return self._base

    def _live_evaluation(
        self, version: int, path: Path, base_path: Path, device, model: PreTrainedModel | None
    ) -> _LiveEvaluation:
        """Live's weights (`model`, or loaded: an adapter merged into its base) and answers, taken again only
        when live has moved to another version."""
        if self._live is None or self._live.version != version:
            model = model or load_policy(path, base_path).to(device).requires_grad_(False)
            self._live = _LiveEvaluation(version, model)
            log.info("pre-check: live policy %d loaded from %s", version, path)
        return self._live
