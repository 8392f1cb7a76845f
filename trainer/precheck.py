"""The trainer's own run of the gate's checks, before it proposes a candidate.

A candidate the gate rejects costs a gate evaluation and a full copy in the registry, and a
trainer whose policy drifted keeps proposing them. So at candidate time the trainer evaluates
its policy against live exactly as the gate will (trainer/policy_eval.py, the same rules, the
same `gate` settings) on the golden prompts and the held-out prompts it saw in traffic, and
proposes only when every check passes. It also measures how far its policy is from live.

Live's answers are cached per live version and prompt (greedy, so they do not change); its
scores are taken again each time, as the reward model moves.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.v1 import events_pb2
from trainer.config import CandidateCheckSettings
from trainer.gate_checks import EvalAnswer, GateVerdict, golden_accuracy
from trainer.policy_eval import EvalPrompt, HeldoutPrompts, PolicyEvaluator, kl_prompts, load_golden
from trainer.reward_model import RewardModelTrainer, load_without_dropout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecheckResult:
    """The gate's verdict as the trainer predicts it, and the distances it measured (nats per answer)."""

    verdict: GateVerdict
    live_version: int
    kl_to_reference: float
    kl_to_live: float
    prompts: int


@dataclass
class _LiveEvaluation:
    version: int
    model: PreTrainedModel
    answers: dict[str, EvalAnswer] = field(default_factory=dict)
    """Greedy answers by prompt text."""


class CandidatePrecheck:
    """Predicts the gate's verdict on the trainer's policy; keeps the eval set and live's answers between calls."""

    def __init__(self, settings: CandidateCheckSettings, heldout_fraction: float, tokenizer: PreTrainedTokenizerBase):
        self.settings = settings
        self.tokenizer = tokenizer
        self.heldout = HeldoutPrompts(settings.heldout_prompts, heldout_fraction, settings.max_principal_share)
        golden_path = settings.golden_path()
        self.golden = [] if golden_path is None else load_golden(golden_path, tokenizer)
        self._live: _LiveEvaluation | None = None
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
        reference: PreTrainedModel,
        reward_model: RewardModelTrainer,
        live_version: int,
        live_path: Path,
    ) -> PrecheckResult | None:
        """The gate's checks on `policy` against live; None when the eval set cannot be judged (no golden
        prompts, or fewer than two prompts), as the gate could not either."""
        prompts = self.eval_prompts()
        if not self.golden or len(prompts) < 2:
            return None
        evaluator = PolicyEvaluator(self.tokenizer, reward_model, self.settings)
        live = self._live_evaluation(live_version, live_path, policy.device)
        missing = [p for p in prompts if p.text not in live.answers]
        live.answers |= {answer.prompt: answer for answer in evaluator.answers(live.model, missing)}
        if self._reference_golden_accuracy is None:  # the reference never changes while the trainer runs
            self._reference_golden_accuracy = golden_accuracy(evaluator.answers(reference, self.golden))
        kl_set = kl_prompts(prompts)
        kl_to_reference = evaluator.kl(policy, reference, kl_set)
        verdict = evaluator.verdict(
            prompts,
            evaluator.answers(policy, prompts),
            [live.answers[p.text] for p in prompts],
            kl_to_reference,
            self._reference_golden_accuracy,
        )
        return PrecheckResult(
            verdict, live_version, kl_to_reference, evaluator.kl(policy, live.model, kl_set), len(prompts)
        )

    def _live_evaluation(self, version: int, path: Path, device) -> _LiveEvaluation:
        """Live's weights and answers, loaded again only when live has moved to another version."""
        if self._live is None or self._live.version != version:
            model = load_without_dropout(AutoModelForCausalLM, path).to(device).requires_grad_(False)
            self._live = _LiveEvaluation(version, model)
            log.info("pre-check: live policy %d loaded from %s", version, path)
        return self._live
