"""A policy's answers on an eval set, scored and judged by the gate's rules: one implementation for two users.

The safety gate judges each candidate with `PolicyEvaluator`; the trainer runs the same evaluation
on its own policy before proposing it (trainer/precheck.py), so it proposes only what the gate
would approve. The eval set is the operator's golden prompts plus recent held-out prompts from
logged traffic (`HeldoutPrompts`).
"""

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from feedback.identity import DEFAULT_PRINCIPAL, capped_per_principal
from flywheel.prompts import PromptRenderer
from flywheel.v1 import events_pb2
from trainer.config import CandidateCheckSettings
from trainer.gate_checks import EvalAnswer, GateVerdict, PolicyEval, decide, evaluate_policy, golden_accuracy
from trainer.join_store import is_heldout_prompt
from trainer.ppo import PolicyWithValue, Rollout, TokenBatch, TransformersSampler, end_of_sequence_ids
from trainer.ppo_math import kl_per_answer, logprobs_from_logits
from trainer.reward_model import RewardModelTrainer

KL_SAMPLING_SEED = 0


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the gate's eval set, as token ids for the policies and text for reports."""

    token_ids: tuple[int, ...]
    text: str
    expected: str | None = None
    must_not_contain: tuple[str, ...] = ()
    principal: str = DEFAULT_PRINCIPAL
    """Whose traffic the prompt came from (golden prompts: the operator's)."""

    @property
    def is_golden(self) -> bool:
        return self.expected is not None or bool(self.must_not_contain)


def load_golden(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[EvalPrompt]:
    """Golden prompts from a JSON-lines file: {"prompt", "expected"} and/or {"prompt", "must_not_contain": [...]}.

    Each prompt is asked as one user chat message. Raises ValueError naming the line of a bad entry.
    """
    renderer = PromptRenderer(tokenizer)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            prompt, expected, banned = entry["prompt"], entry.get("expected"), tuple(entry.get("must_not_contain", ()))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'prompt' ({error})") from error
        if expected is None and not banned:
            raise ValueError(f"{path}:{number}: give 'expected' or 'must_not_contain'")
        rendered = renderer.user_message(prompt)
        prompts.append(EvalPrompt(tuple(rendered.token_ids), prompt, expected, banned))
    return prompts


class HeldoutPrompts:
    """The most recent distinct held-out prompts seen in logged traffic, no principal holding more than its share.

    Each principal's own most recent prompts are kept apart, so one flooding its own cannot push
    another's out; `current` picks the newest within each principal's share.
    """

    def __init__(self, capacity: int, heldout_fraction: float, max_principal_share: float = 1.0):
        self._capacity = capacity
        self._heldout_fraction = heldout_fraction
        self._max_principal_share = max_principal_share
        self._by_principal: dict[str, deque[tuple[int, EvalPrompt]]] = {}
        self._offered = 0

    def offer(self, event: events_pb2.GenerationLogged) -> None:
        if not event.prompt_token_ids or not is_heldout_prompt(event.rendered_prompt, self._heldout_fraction):
            return
        principal = event.principal or DEFAULT_PRINCIPAL
        prompts = self._by_principal.setdefault(principal, deque(maxlen=self._capacity))
        if any(prompt.text == event.rendered_prompt for _, prompt in prompts):
            return
        self._offered += 1
        prompts.append(
            (self._offered, EvalPrompt(tuple(event.prompt_token_ids), event.rendered_prompt, principal=principal))
        )

    def current(self) -> list[EvalPrompt]:
        newest_first = sorted((entry for prompts in self._by_principal.values() for entry in prompts), reverse=True)
        chosen = capped_per_principal(
            [prompt for _, prompt in newest_first],
            lambda prompt: prompt.principal,
            self._max_principal_share,
            self._capacity,
        )
        distinct: dict[str, EvalPrompt] = {}
        for prompt in reversed(chosen):
            distinct.setdefault(prompt.text, prompt)
        return list(distinct.values())


class PolicyEvaluator:
    """Answers an eval set with a policy, scores the answers, measures KL, and judges a candidate against live
    (transformers, on CPU or GPU)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, reward_model: RewardModelTrainer, settings: CandidateCheckSettings
    ):
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        self.settings = settings

    def answers(self, model: PreTrainedModel, prompts: Sequence[EvalPrompt]) -> list[EvalAnswer]:
        """Greedy answers to every prompt."""
        if not prompts:
            return []
        eos = end_of_sequence_ids(model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        sampler = TransformersSampler(model, self.tokenizer.pad_token_id, eos)
        responses = sampler([list(p.token_ids) for p in prompts], self.settings.max_new_tokens, 0.0)
        return [
            EvalAnswer(
                prompt=prompt.text,
                text=self.tokenizer.decode(response, skip_special_tokens=True),
                token_ids=tuple(response),
                finished=bool(response) and response[-1] in eos,
                expected=prompt.expected,
                must_not_contain=prompt.must_not_contain,
            )
            for prompt, response in zip(prompts, responses)
        ]

    def scores(self, prompts: Sequence[EvalPrompt], answers: Sequence[EvalAnswer]) -> list[float]:
        sequences = [list(p.token_ids) + list(a.token_ids) for p, a in zip(prompts, answers)]
        return self.reward_model.score(sequences).tolist()

    def evaluation(self, prompts: Sequence[EvalPrompt], answers: Sequence[EvalAnswer]) -> PolicyEval:
        """One policy's answers summarized by the gate's rules, scored by this evaluator's reward model."""
        return evaluate_policy(answers, self.scores(prompts, answers), self.settings.safety, self.settings.thresholds)

    @torch.no_grad()
    def kl(
        self, policy: PreTrainedModel, others: Sequence[PreTrainedModel], prompts: Sequence[EvalPrompt]
    ) -> list[float]:
        """KL(policy ‖ other) for each of `others`, in nats per answer: Σ log-ratio over answers `policy`
        samples at temperature 1 (one sample, shared by all `others`).

        The gate's KL to the reference, and the trainer's KL to the reference and to live; the
        sampling is seeded, so the same policies on the same prompts give the same numbers.
        """
        eos = end_of_sequence_ids(policy.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        torch.manual_seed(KL_SAMPLING_SEED)
        repeated = [list(p.token_ids) for p in prompts for _ in range(self.settings.kl_samples_per_prompt)]
        responses = TransformersSampler(policy, self.tokenizer.pad_token_id, eos)(
            repeated, self.settings.max_new_tokens, 1.0
        )
        rollout = Rollout(repeated, responses, [r[-1] in eos for r in responses], 0.0)
        batch = TokenBatch.from_rollout(rollout, self.tokenizer.pad_token_id).to(policy.device)
        logprobs = logprobs_from_logits(PolicyWithValue.response_logits(policy, batch), batch.response_ids, 1.0)
        return [
            kl_per_answer(
                logprobs,
                logprobs_from_logits(PolicyWithValue.response_logits(other, batch), batch.response_ids, 1.0),
                batch.response_mask,
            )
            .mean()
            .item()
            for other in others
        ]

    def judge(
        self,
        candidate: PreTrainedModel,
        live: PreTrainedModel,
        reference: PreTrainedModel | None,
        prompts: Sequence[EvalPrompt],
    ) -> GateVerdict:
        """Judge `candidate` against `live` on `prompts`; `reference` None when live is the reference itself."""
        candidate_answers, live_answers = self.answers(candidate, prompts), self.answers(live, prompts)
        golden = [p for p in prompts if p.is_golden]
        reference_answers = (
            [a for a in live_answers if a.is_golden] if reference is None else self.answers(reference, golden)
        )
        [kl] = self.kl(candidate, [live if reference is None else reference], kl_prompts(prompts))
        return decide(
            self.evaluation(prompts, candidate_answers),
            self.evaluation(prompts, live_answers),
            self.settings.thresholds,
            kl,
            golden_accuracy(reference_answers),
        )


def kl_prompts(prompts: Sequence[EvalPrompt]) -> list[EvalPrompt]:
    """The prompts KL is measured on: the held-out ones (golden prompts are answered greedily), or all when none."""
    return [p for p in prompts if not p.is_golden] or list(prompts)
