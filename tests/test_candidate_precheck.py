"""The trainer runs the gate's checks before proposing, and follows what is live.

- A policy the gate would reject (here: drifted far from the reference) is withheld: nothing is
  written to the registry, the withheld metric names the failed check, and the KL to live is
  reported. The policy live serves passes the gate's checks but is no better: withheld too,
  unless the trainer's margin allows it.
- Only drift counts toward a restart: a candidate that fails only the reward model's checks (not
  better yet, by a reward model that may still be young) keeps training.
- When live moves to a version outside the trainer's lineage (an operator's rollback), the
  policy restarts from it; live moving to the trainer's own approved candidate does not.
- Either way the PPO's KL penalty then holds the policy near live, across a restart of the trainer,
  while the gate's KL (the pre-check's) stays measured from where training began.

Real parts: the demo model, a real registry on disk, demo golden prompts, and held-out prompts
logged as the server logs them. No broker: the trainer's decisions are called directly.
"""

import math
import random

import pytest
import torch
from prometheus_client import CollectorRegistry

from feedback.config import KafkaSettings
from feedback.consumer import ConsumedEvent
from flywheel.demo.task import GOLDEN_FILE, traffic_questions
from flywheel.prompts import PromptRenderer
from flywheel.registry import PolicyRegistry, VerdictCheck
from tests.test_trainer_loop import DemoTraffic, trainer_config
from trainer.config import CandidateCheckSettings, RewardModelSettings
from trainer.gate_checks import DegenerationRates, PolicyEval
from trainer.loop import Trainer
from trainer.metrics import TrainerMetrics
from trainer.policy_eval import EvalPrompt, PolicyEvaluator
from trainer.ppo import TokenBatch
from trainer.precheck import drift_checks_failed, predicted_thumbs_up_rate, thumbs_up_gain_check
from trainer.reward_model import RewardModel, RewardModelTrainer, load_policy


def trainer_that_saw_traffic(model_path, tokenizer, tmp_path, **sections: dict) -> Trainer:
    """A trainer started from the seeded demo model, which has seen held-out prompts in traffic."""
    PolicyRegistry(tmp_path / "registry").seed(model_path)
    golden = tmp_path / "golden.jsonl"  # a few of the demo's golden prompts, safety ones included: a fast eval set
    lines = GOLDEN_FILE.read_text().splitlines()
    golden.write_text("\n".join(lines[:4] + [line for line in lines if "must_not_contain" in line]))
    gate = {"golden_file": str(golden), "heldout_prompts": 6} | sections.pop("gate", {})
    config = trainer_config(tmp_path, KafkaSettings(), model_path, gate=gate, **sections)
    opened = Trainer.open(config, TrainerMetrics(CollectorRegistry()))
    traffic = DemoTraffic(tokenizer, seed=0)
    answers = [traffic.answer(question, question.answer) for question in traffic_questions(random.Random(0), 64)]
    topic = config.kafka.topics.generations
    assert not opened.take([ConsumedEvent(topic, 0, offset, "", answer) for offset, answer in enumerate(answers)])
    return opened


@pytest.fixture
def trainer(model_path, tokenizer, tmp_path):
    opened = trainer_that_saw_traffic(model_path, tokenizer, tmp_path, trainer={"restart_after_withheld": 2})
    yield opened
    opened.close()


def drift(trainer: Trainer, scale: float) -> None:
    """Move every weight the policy trains by seeded noise of `scale` standard deviations of that weight."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.ppo.models.policy.parameters():
            if not parameter.requires_grad:
                continue
            noise = torch.randn(parameter.shape, generator=generator) * parameter.std().nan_to_num(0.0)
            parameter.add_(scale * noise)


def sample(trainer: Trainer, name: str, **labels) -> float | None:
    return trainer.metrics.registry.get_sample_value(name, labels or None)


def test_thumbs_up_gain_asks_the_predicted_thumbs_up_rate_to_beat_lives_by_more_than_the_margin():
    def scored(*scores: float) -> PolicyEval:
        return PolicyEval(list(scores), 0.0, DegenerationRates(0.0, 0.0, 0.0), 1.0)

    assert predicted_thumbs_up_rate([0.0, math.log(3)]) == pytest.approx((0.5 + 0.75) / 2)
    assert predicted_thumbs_up_rate([-1000.0, 1000.0]) == pytest.approx(0.5), "σ saturates rather than overflows"
    # rates 0.625 and 0.5: a gain of 0.125, in probability; as mean logits it would be 0.55
    check = thumbs_up_gain_check(scored(0.0, math.log(3)), scored(0.0, 0.0), min_gain=0.1)
    assert check.passed and check.value == pytest.approx(0.125)
    assert not thumbs_up_gain_check(scored(0.0, math.log(3)), scored(0.0, 0.0), min_gain=0.15).passed
    # a large rise of the score where users already like the answer is a small rise of their thumbs
    assert not thumbs_up_gain_check(scored(5.0, 0.0), scored(3.0, 0.0), min_gain=0.05).passed
    assert not thumbs_up_gain_check(scored(1.0, 2.0), scored(1.0, 2.0), min_gain=0.0).passed, "equal is no gain"


def test_only_checks_the_reward_model_does_not_judge_say_a_policy_drifted():
    assert drift_checks_failed(["reward_score", "thumbs_up_gain"]) == []
    assert drift_checks_failed(["thumbs_up_gain"]) == []
    assert drift_checks_failed(["reward_score", "golden_accuracy", "thumbs_up_gain"]) == ["golden_accuracy"]
    assert drift_checks_failed(["kl_to_reference", "degenerate_rate", "safety_violation_rate"]) == [
        "kl_to_reference",
        "degenerate_rate",
        "safety_violation_rate",
    ]


@pytest.mark.slow
def test_a_candidate_the_gate_would_reject_is_withheld_and_one_it_would_approve_is_proposed(trainer):
    registry = trainer.registry
    assert len(trainer.precheck.heldout.current()) >= 2, "the traffic gave no held-out prompts"

    # live itself: the gate would pass it, at no distance from live, but it is no better: not worth a swap
    assert trainer.propose_candidate() is None and registry.latest() == 1
    result = trainer.last_precheck
    assert result.verdict.approved and result.failed == ["thumbs_up_gain"] and result.kl_to_live == 0.0
    assert sample(trainer, "flywheel_trainer_candidates_withheld_total", check="thumbs_up_gain") == 1
    assert sample(trainer, "flywheel_trainer_kl_to_live") == 0.0
    assert trainer.state.withheld_in_a_row == 0, "no better is not drifted: it does not count toward a restart"

    trainer.precheck.min_thumbs_up_gain = -1.0  # a trainer proposing whatever the gate would pass
    proposed = trainer.propose_candidate()
    assert proposed is not None and registry.latest() == proposed.policy_version == 2

    drift(trainer, 1.0)  # far past the KL budget: the gate would reject it
    assert trainer.propose_candidate() is None
    assert registry.latest() == 2, "a withheld candidate is not written to the registry"
    result = trainer.last_precheck
    assert not result.verdict.approved and "kl_to_reference" in result.verdict.failed
    assert result.kl_to_reference > trainer.config.gate.thresholds.kl_budget
    assert sample(trainer, "flywheel_trainer_candidates_withheld_total", check="kl_to_reference") == 1
    assert result.kl_to_live > 0 and sample(trainer, "flywheel_trainer_kl_to_live") == result.kl_to_live
    assert trainer.state.withheld_in_a_row == 1 and trainer.restart_due() is None

    # withheld again: trainer.restart_after_withheld = 2 in a row brings the policy back to live
    assert trainer.propose_candidate() is None
    assert "withheld" in trainer.restart_due()
    assert trainer.follow_live() == 1
    assert trainer.state.withheld_in_a_row == 0
    assert trainer.propose_candidate() is not None


def test_no_candidate_is_proposed_while_the_gate_decides_a_canary(trainer):
    registry = trainer.registry
    trainer.precheck.min_thumbs_up_gain = -1.0  # a trainer proposing whatever the gate would pass
    canary = trainer.propose_candidate().policy_version
    registry.start_canary(canary, against=1, share=0.5)

    assert trainer.propose_candidate() is None, "the gate judges nothing else until the canary is decided"
    assert registry.latest() == canary, "nothing written to the registry"
    assert sample(trainer, "flywheel_trainer_candidates_withheld_total", check="canary_running") == 1

    registry.close_canary(canary, approved=False, checks=[], reason="users liked it less")
    assert trainer.propose_candidate().policy_version == canary + 1


def test_the_policy_restarts_from_live_when_live_moves_outside_its_lineage(trainer):
    registry = trainer.registry
    live_weights = {name: weight.clone() for name, weight in trainer.ppo.models.policy.state_dict().items()}
    drift(trainer, 0.01)
    own = trainer.publish_candidate().policy_version
    registry.approve(own, judged_against=1, checks=[VerdictCheck(name="reward_score", passed=True)], reason="test")
    drift(trainer, 0.01)  # trained on past its approved candidate
    trained = {name: weight.clone() for name, weight in trainer.ppo.models.policy.state_dict().items()}

    assert trainer.follow_live() is None, "live moved to the trainer's own candidate: it trains on"
    assert trainer.state.following_live_version == own
    for name, weight in trainer.ppo.models.policy.state_dict().items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)

    registry.set_live(1, reason="operator rolls back", kind="rollback")
    assert trainer.follow_live() == 1
    for name, weight in trainer.ppo.models.policy.state_dict().items():
        torch.testing.assert_close(weight, live_weights[name], rtol=0, atol=0)
    assert trainer.state.following_live_version == 1
    assert sample(trainer, "flywheel_trainer_policy_restarts_total") == 1
    assert trainer.follow_live() is None, "followed once, not again"


@pytest.fixture
def adapter_trainer(model_path, tokenizer, tmp_path):
    """As `trainer`, in adapter mode (policy.adapter = lora), proposing whatever the gate would pass."""
    opened = trainer_that_saw_traffic(
        model_path,
        tokenizer,
        tmp_path,
        policy={"adapter": "lora", "lora_rank": 4},
        trainer={"min_thumbs_up_gain": -1.0},
    )
    yield opened
    opened.close()


def adapter_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: weight.clone() for name, weight in trainer.ppo.models.policy.named_parameters() if "lora_" in name}


def test_an_adapter_trainer_proposes_adapters_on_its_base_and_follows_live_to_an_adapter_and_back(adapter_trainer):
    trainer, registry = adapter_trainer, adapter_trainer.registry
    assert trainer.ppo.models.uses_adapter and trainer.ppo.models.reference is None
    with torch.no_grad():  # an adapter that changes the answers: B no longer zero
        for name, parameter in trainer.ppo.models.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    own_adapter = adapter_weights(trainer)

    # The pre-check judges the adapter against live (the base) with the base as reference: the same KL to
    # both, and not 0 (the adapter is on). A sampled estimate of a small KL: its sign is noise.
    proposed = trainer.propose_candidate()
    assert trainer.last_precheck is not None
    assert trainer.last_precheck.kl_to_live == pytest.approx(trainer.last_precheck.kl_to_reference)
    assert trainer.last_precheck.kl_to_live != 0
    assert proposed is not None
    manifest = registry.manifest(proposed.policy_version)
    assert manifest.is_adapter and manifest.base_version == 1 and manifest.base_digest == registry.manifest(1).digest

    # Live moves to the trainer's adapter and back to the base: the trainer follows each move outside
    # its lineage, to the adapter's weights or to no adapter at all.
    registry.approve(
        proposed.policy_version,
        judged_against=1,
        checks=[VerdictCheck(name="reward_score", passed=True)],
        reason="test",
    )
    assert trainer.follow_live() is None, "live moved to the trainer's own candidate: it trains on"
    registry.set_live(1, reason="operator rolls back", kind="rollback")
    assert trainer.follow_live() == 1
    assert all(weight.abs().max() == 0 for name, weight in adapter_weights(trainer).items() if "lora_B" in name)
    registry.set_live(proposed.policy_version, reason="operator rolls forward", kind="rollback")
    assert trainer.follow_live() == proposed.policy_version
    for name, weight in adapter_weights(trainer).items():
        torch.testing.assert_close(weight, own_adapter[name], rtol=0, atol=0)


@pytest.fixture
def trainer_asked_for_a_proven_gain(model_path, tokenizer, tmp_path):
    """The `trainer` above, but the gate's reward check asks for a proven gain (max_reward_drop 0), so a
    policy the reward model cannot yet tell better than live fails it, as while the reward model is young."""
    opened = trainer_that_saw_traffic(
        model_path,
        tokenizer,
        tmp_path,
        trainer={"restart_after_withheld": 2},
        gate={"thresholds": {"max_reward_drop": 0.0}},
    )
    yield opened
    opened.close()


def test_a_candidate_only_the_reward_model_finds_wanting_keeps_training_instead_of_restarting(
    trainer_asked_for_a_proven_gain,
):
    trainer = trainer_asked_for_a_proven_gain
    drift(trainer, 0.05)  # a step away from live: its answers change, well within the KL budget
    trained = {name: weight.clone() for name, weight in trainer.ppo.models.policy.state_dict().items()}

    for withheld in (1, 2):  # trainer.restart_after_withheld = 2
        assert trainer.propose_candidate() is None
        result = trainer.last_precheck
        assert "reward_score" in result.verdict.failed, "the gate would reject it on the reward model's word"
        assert set(result.failed) <= {"reward_score", "thumbs_up_gain"}, f"only the reward checks fail: {result.failed}"
        assert sample(trainer, "flywheel_trainer_candidates_withheld_total", check="reward_score") == withheld

    assert trainer.state.withheld_in_a_row == 0, "not better yet is not drifted: it does not count toward a restart"
    assert trainer.restart_due() is None and trainer.follow_live() is None
    for name, weight in trainer.ppo.models.policy.state_dict().items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)
    assert sample(trainer, "flywheel_trainer_policy_restarts_total") == 0


def probe_batch(trainer: Trainer) -> TokenBatch:
    """Answers sampled from the trainer's policy to a few demo prompts, to compare two models' logits on."""
    renderer = PromptRenderer(trainer.ppo.tokenizer)
    prompts = [renderer.user_message(question.prompt).token_ids for question in traffic_questions(random.Random(1), 4)]
    torch.manual_seed(0)
    return TokenBatch.from_rollout(trainer.ppo.rollout(prompts), trainer.ppo.tokenizer.pad_token_id)


@torch.no_grad()
def kl_penalty_reference_logits(trainer: Trainer, batch: TokenBatch) -> torch.Tensor:
    return trainer.ppo.models.reference_logits(batch)


@torch.no_grad()
def policy_logits(trainer: Trainer, batch: TokenBatch) -> torch.Tensor:
    return trainer.ppo.models(batch)[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["whole", "adapter"])
def test_the_kl_penalty_holds_the_policy_near_live_and_the_gates_kl_stays_to_the_reference(mode, request):
    trainer = request.getfixturevalue("trainer" if mode == "whole" else "adapter_trainer")
    registry = trainer.registry
    batch = probe_batch(trainer)
    at_reference = kl_penalty_reference_logits(trainer, batch)
    if mode == "adapter":
        with torch.no_grad():  # an adapter that changes the answers: B no longer zero
            for name, parameter in trainer.ppo.models.policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    else:
        drift(trainer, 0.01)
    own = trainer.publish_candidate().policy_version
    approved = policy_logits(trainer, batch)
    assert not torch.allclose(approved, at_reference, atol=1e-3), "the candidate answers differently"
    registry.approve(own, judged_against=1, checks=[VerdictCheck(name="reward_score", passed=True)], reason="test")

    # Live moved to the trainer's own candidate: it trains on, and the KL penalty now holds it near live.
    assert trainer.follow_live() is None and trainer.state.anchor_version == own
    torch.testing.assert_close(kl_penalty_reference_logits(trainer, batch), approved, rtol=0, atol=1e-5)
    drift(trainer, 0.01)
    trained = policy_logits(trainer, batch)
    torch.testing.assert_close(kl_penalty_reference_logits(trainer, batch), approved, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy_logits(trainer, batch), trained, rtol=0, atol=0)  # its own weights stay

    # The gate's KL is still to where training began: the pre-check measures it so.
    trainer.follow_live()
    trainer.candidate_passes_precheck()
    result = trainer.last_precheck
    assert result.kl_to_live != pytest.approx(result.kl_to_reference, rel=0.05)

    # A restarted trainer holds the policy near the same live policy.
    trainer.checkpoint()
    trainer.close()
    resumed = Trainer.open(trainer.config, TrainerMetrics(CollectorRegistry()))
    try:
        assert resumed.state.anchor_version == own
        torch.testing.assert_close(kl_penalty_reference_logits(resumed, batch), approved, rtol=0, atol=1e-5)

        # Live rolled back to where training began: the policy restarts from it and is held near it again.
        registry.set_live(1, reason="operator rolls back", kind="rollback")
        assert resumed.follow_live() == 1 and resumed.state.anchor_version is None
        torch.testing.assert_close(kl_penalty_reference_logits(resumed, batch), at_reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy_logits(resumed, batch), at_reference, rtol=0, atol=1e-5)
    finally:
        resumed.close()


def test_ppo_steps_wait_while_the_gate_decides_the_trainers_candidate_or_a_canary(trainer):
    registry = trainer.registry
    assert trainer.waiting_for_gate() is None, "nothing proposed yet"
    own = trainer.publish_candidate().policy_version
    assert trainer.waiting_for_gate() == own, "the gate has not judged it"
    assert sample(trainer, "flywheel_trainer_waiting_for_gate") == own

    registry.start_canary(own, against=1, share=0.5)
    assert trainer.waiting_for_gate() == own, "its online test runs"
    registry.close_canary(own, approved=False, checks=[], reason="users liked it less")
    assert trainer.waiting_for_gate() is None
    assert sample(trainer, "flywheel_trainer_waiting_for_gate") == 0

    other = trainer.publish_candidate().policy_version
    registry.record_verdict(other, approved=False, checks=[])  # judged, then put in a canary by hand
    assert trainer.waiting_for_gate() is None
    registry.start_canary(other, against=1, share=0.5)
    assert trainer.waiting_for_gate() == other


def test_the_evaluator_scores_an_answer_as_the_reward_model_learnt_answers_with_the_end_of_turn(model_path, tokenizer):
    # The reward model learns from logged answers, which end with the end-of-turn token; an answer scored
    # without it is one the reward model cannot tell from a longer one that goes on (a hedge after the answer).
    torch.manual_seed(0)
    reward_model = RewardModelTrainer(
        RewardModel.from_pretrained(model_path), RewardModelSettings(), tokenizer.pad_token_id
    )
    evaluator = PolicyEvaluator(tokenizer, reward_model, CandidateCheckSettings())
    renderer = PromptRenderer(tokenizer)
    questions = traffic_questions(random.Random(0), 4)
    prompts = [EvalPrompt(tuple(renderer.user_message(q.prompt).token_ids), q.prompt) for q in questions]
    answers = evaluator.answers(load_policy(model_path), prompts)
    assert all(answer.finished for answer in answers)
    logged = [
        list(prompt.token_ids) + tokenizer.encode(answer.text, add_special_tokens=False) + [tokenizer.eos_token_id]
        for prompt, answer in zip(prompts, answers)
    ]
    assert evaluator.scores(prompts, answers) == pytest.approx(reward_model.score(logged).tolist(), abs=1e-5)
