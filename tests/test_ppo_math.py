"""CPU tests of trainer/ppo_math.py, pinned to numbers worked out by hand in the comments."""

import math

import pytest
import torch

from trainer.ppo_math import (
    AdaptiveKLController,
    answers_to_learn_from,
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    first_true_indices,
    gae_advantages,
    kl_estimators,
    kl_over_vocabulary,
    kl_per_answer,
    last_true_indices,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=tol)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding_even_when_it_is_nan():
    values = t([[1.0, 2.0, 3.0, float("nan")], [5.0, 6.0, float("inf"), 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    # (1 + 2 + 3 + 5 + 6) / 5 = 17 / 5
    close(masked_mean(values, mask), 3.4)
    # per row: (1 + 2 + 3) / 3 = 2, (5 + 6) / 2 = 5.5
    close(masked_mean(values, mask, dim=-1), [2.0, 5.5])


def test_masked_var_is_unbiased_by_default():
    values = t([[2.0, 4.0, 6.0, 100.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    # mean 4; squared deviations 4, 0, 4 sum to 8; unbiased 8 / 2 = 4, biased 8 / 3
    close(masked_var(values, mask), 4.0)
    close(masked_var(values, mask, unbiased=False), 8.0 / 3.0)


def test_masked_var_refuses_a_single_value():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([[1.0, 2.0]]), t([[1, 0]], torch.bool))


def test_masked_whiten_with_and_without_mean_shift():
    values = t([[2.0, 4.0, 6.0, 100.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    # mean 4, unbiased variance 4, std 2: (2−4)/2, (4−4)/2, (6−4)/2 = −1, 0, 1; padding → 0
    close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-8)
    # without the shift the mean 4 is added back: 3, 4, 5
    close(masked_whiten(values, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], tol=1e-8)


# ---------------------------------------------------------------- positions


def test_first_true_indices_returns_row_length_when_none():
    bools = t([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], torch.bool)
    assert first_true_indices(bools).tolist() == [1, 4, 0]


def test_last_true_indices_any_padding_side():
    bools = t([[1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], torch.bool)
    assert last_true_indices(bools).tolist() == [2, 3, 2, -1]


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators_by_hand():
    # token 1: π = 0.5, π_ref = 0.25;  token 2: π = 0.25, π_ref = 0.5;  token 3: equal
    logprobs = torch.log(t([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(t([[0.25, 0.5, 0.3]]))
    estimates = kl_estimators(logprobs, ref_logprobs)
    ln2 = math.log(2.0)
    # k1 = log π − log π_ref = ln 2, −ln 2, 0
    close(estimates.k1, [[ln2, -ln2, 0.0]])
    # k2 = ½ (ln 2)² = 0.2402265...
    close(estimates.k2, [[0.5 * ln2**2, 0.5 * ln2**2, 0.0]])
    # k3 = (r − 1) − ln r, r = π_ref/π:  r = 0.5 → −0.5 + ln 2 = 0.1931472;  r = 2 → 1 − ln 2 = 0.3068528
    close(estimates.k3, [[-0.5 + ln2, 1.0 - ln2, 0.0]])


def test_kl_per_answer_sums_the_log_ratio_over_each_answers_tokens():
    logprobs = torch.log(t([[0.5, 0.25, 0.3, 0.9], [0.25, 0.1, 0.1, 0.1]]))
    ref_logprobs = torch.log(t([[0.25, 0.5, 0.3, 0.1], [0.5, 0.9, 0.9, 0.9]]))
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]], torch.bool)
    ln2 = math.log(2.0)
    # row 0: ln 2 − ln 2 + 0 = 0 (padding's ln 9 left out);  row 1: ln(0.25 / 0.5) = −ln 2
    close(kl_per_answer(logprobs, ref_logprobs, mask), [0.0, -ln2])


def test_per_token_rewards_kl_penalty_plus_score_at_last_token():
    # log π − log π_ref per token; padding holds garbage (TRL's INVALID_LOGPROB is 1.0)
    logprobs = t([[0.1, -0.2, 0.3, 1.0], [0.5, 0.0, 1.0, 1.0]])
    ref_logprobs = torch.zeros_like(logprobs)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    score = t([1.0, 2.0])
    rewards = per_token_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # −0.1 · k1 = −0.01, 0.02, −0.03 | −0.05, 0;  score added at columns 2 and 1:
    # row 0: −0.03 + 1 = 0.97;  row 1: 0 + 2 = 2.0;  padding 0
    close(rewards, [[-0.01, 0.02, 0.97, 0.0], [-0.05, 2.0, 0.0, 0.0]], tol=1e-12)


def test_per_token_rewards_refuses_an_empty_row():
    with pytest.raises(ValueError, match="no valid tokens"):
        per_token_rewards(t([1.0]), t([[0.0]]), t([[0.0]]), t([[0]], torch.bool), kl_coef=0.1)


def test_missing_eos_penalty_is_subtracted_only_from_unended_answers():
    scores = t([1.0, 2.0, -0.5])
    ended_with_eos = t([1, 0, 0], torch.bool)
    # 1.0 unchanged; 2.0 − 1.0 = 1.0; −0.5 − 1.0 = −1.5
    close(apply_missing_eos_penalty(scores, ended_with_eos, penalty=1.0), [1.0, 1.0, -1.5])
    with pytest.raises(ValueError, match="penalty must be >= 0"):
        apply_missing_eos_penalty(scores, ended_with_eos, penalty=-1.0)


# ---------------------------------------------------------------- GAE


def test_gae_gamma_1_lambda_095_by_hand():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = torch.ones_like(rewards, dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: δ = 1 + 0 − 0.7 = 0.3                      A2 = 0.3
    # t=1: δ = 0 + 0.7 − 0.6 = 0.1                    A1 = 0.1 + 0.95·0.3   = 0.385
    # t=0: δ = 0 + 0.6 − 0.5 = 0.1                    A0 = 0.1 + 0.95·0.385 = 0.46575
    close(advantages, [[0.46575, 0.385, 0.3]], tol=1e-12)
    # returns = A + V = 0.96575, 0.985, 1.0
    close(returns, [[0.96575, 0.985, 1.0]], tol=1e-12)


def test_gae_discounts_next_value_with_gamma():
    rewards = t([[0.0, 1.0]])
    values = t([[1.0, 2.0]])
    mask = torch.ones_like(rewards, dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    # t=1: δ = 1 − 2 = −1, A1 = −1;  t=0: δ = 0 + 0.5·2 − 1 = 0, A0 = 0 + 0.25·(−1) = −0.25
    close(advantages, [[-0.25, -1.0]])
    close(returns, [[0.75, 1.0]])


def test_gae_with_right_padding_by_hand():
    # row 0 is the 1×3 example above plus one pad; row 1 has one token. Garbage on padding.
    rewards = t([[0.0, 0.0, 1.0, 5.0], [2.0, 5.0, 5.0, 5.0]])
    values = t([[0.5, 0.6, 0.7, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]], torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: δ = 2 + 0 − 0.5 = 1.5 (no value after the last token), return 2.0
    close(advantages, [[0.46575, 0.385, 0.3, 0.0], [1.5, 0.0, 0.0, 0.0]], tol=1e-12)
    close(returns, [[0.96575, 0.985, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]], tol=1e-12)


def test_padding_does_not_change_rewards_or_advantages():
    logprobs = t([[-1.0, -2.0, -0.5]])
    ref_logprobs = t([[-1.2, -1.5, -0.5]])
    values = t([[0.3, -0.1, 0.4]])
    score = t([0.8])
    mask = torch.ones_like(logprobs, dtype=torch.bool)

    def pad(row, filler):
        return torch.cat([row, torch.full((1, 2), filler, dtype=F64)], dim=-1)

    padded_mask = t([[1, 1, 1, 0, 0]], torch.bool)
    rewards = per_token_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.05)
    padded_rewards = per_token_rewards(score, pad(logprobs, 1.0), pad(ref_logprobs, -7.0), padded_mask, 0.05)
    close(padded_rewards[:, :3], rewards, tol=1e-12)
    close(padded_rewards[:, 3:], [[0.0, 0.0]])

    advantages, returns = gae_advantages(rewards, values, mask)
    padded_advantages, padded_returns = gae_advantages(padded_rewards, pad(values, 3.0), padded_mask)
    close(padded_advantages[:, :3], advantages, tol=1e-12)
    close(padded_returns[:, :3], returns, tol=1e-12)


# ---------------------------------------------------------------- policy loss


def test_answers_to_learn_from_are_those_of_prompts_whose_answers_score_apart():
    # Three prompts, two answers each: thumbs-up probabilities 0.5 and 0.5 (alike), 0.5 and 0.73
    # (apart), 0.12 and 0.119 (alike: a hopeless prompt's noise).
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, -2.0, -2.01])
    learn = answers_to_learn_from(scores, answers_per_prompt=2, min_spread=0.02)
    assert learn.tolist() == [False, False, True, True, False, False]
    assert answers_to_learn_from(scores, answers_per_prompt=2, min_spread=0.0).all()


def test_answers_to_learn_from_groups_adjacent_answers():
    scores = torch.tensor([0.0, 0.0, 3.0, 3.0, 3.0, -3.0])
    assert answers_to_learn_from(scores, 3, 0.1).tolist() == [True] * 3 + [True] * 3
    assert answers_to_learn_from(scores, 2, 0.1).tolist() == [False, False, False, False, True, True]


def test_policy_loss_is_minus_mean_advantage_when_policy_unchanged():
    logprobs = t([[-1.0, -2.0, -0.3, 1.0]])
    advantages = t([[1.0, -2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    loss, stats = clipped_policy_loss(logprobs, logprobs.clone(), advantages, mask)
    # ratio = 1 everywhere: loss = −(1 − 2 + 3) / 3 = −2/3
    close(loss, -2.0 / 3.0)
    close(stats["ratio_mean"], 1.0)
    close(stats["clip_fraction"], 0.0)
    close(stats["approx_kl"], 0.0)


def policy_loss_of_one_token(advantage, ratio, clip_eps=0.2):
    old_logprobs = t([[-1.0]])
    logprobs = (old_logprobs + math.log(ratio)).requires_grad_()
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, t([[advantage]]), t([[1]], torch.bool), clip_eps)
    loss.backward()
    return loss, stats, logprobs.grad


def test_policy_loss_positive_advantage_clipped_above():
    # A = 2, ρ = 1.5: −2·1.5 = −3, −2·clip(1.5) = −2·1.2 = −2.4; max = −2.4 (clipped, no gradient)
    loss, stats, grad = policy_loss_of_one_token(2.0, 1.5)
    close(loss, -2.4)
    close(stats["clip_fraction"], 1.0)
    close(grad, [[0.0]])


def test_policy_loss_positive_advantage_unclipped_below():
    # A = 2, ρ = 0.5: −2·0.5 = −1, −2·0.8 = −1.6; max = −1 (unclipped)
    # gradient d(−A·ρ)/d log π = −A·ρ = −1
    loss, stats, grad = policy_loss_of_one_token(2.0, 0.5)
    close(loss, -1.0)
    close(stats["clip_fraction"], 0.0)
    close(grad, [[-1.0]])


def test_policy_loss_negative_advantage_clipped_below():
    # A = −2, ρ = 0.5: 2·0.5 = 1, 2·0.8 = 1.6; max = 1.6 (clipped, no gradient)
    loss, stats, grad = policy_loss_of_one_token(-2.0, 0.5)
    close(loss, 1.6)
    close(stats["clip_fraction"], 1.0)
    close(grad, [[0.0]])


def test_policy_loss_negative_advantage_unclipped_above():
    # A = −2, ρ = 1.5: 2·1.5 = 3, 2·1.2 = 2.4; max = 3 (unclipped); gradient −A·ρ = 3
    loss, stats, grad = policy_loss_of_one_token(-2.0, 1.5)
    close(loss, 3.0)
    close(stats["clip_fraction"], 0.0)
    close(grad, [[3.0]])


def test_policy_loss_stats_over_the_four_regimes():
    ratios = t([[1.5, 0.5, 0.5, 1.5, 1.0]])
    old_logprobs = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    advantages = t([[2.0, 2.0, -2.0, -2.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]], torch.bool)
    loss, stats = clipped_policy_loss(old_logprobs + torch.log(ratios), old_logprobs, advantages, mask)
    # per-token losses from the four tests above: (−2.4 − 1 + 1.6 + 3) / 4 = 0.3
    close(loss, 0.3)
    # tokens 1 and 3 clipped: 2 / 4
    close(stats["clip_fraction"], 0.5)
    # (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1
    close(stats["ratio_mean"], 1.0)
    # k3 of KL(π_old ‖ π_θ) = (ρ − 1) − ln ρ:  ρ = 1.5 → 0.5 − ln 1.5 = 0.0945349;  ρ = 0.5 → −0.5 + ln 2 = 0.1931472
    # mean = (2·0.0945349 + 2·0.1931472) / 4 = 0.1438410
    close(stats["approx_kl"], ((0.5 - math.log(1.5)) + (-0.5 + math.log(2.0))) / 2.0)


def test_policy_loss_gradient_on_padding_is_zero_even_when_ratio_would_overflow():
    logprobs = t([[-1.0, 1000.0]]).requires_grad_()
    old_logprobs = t([[-1.0, 1.0]])
    mask = t([[1, 0]], torch.bool)
    # exp(1000 − 1) overflows to inf; the padding token must still get gradient 0, not NaN
    loss, _ = clipped_policy_loss(logprobs, old_logprobs, t([[1.0, 0.0]]), mask)
    loss.backward()
    # valid token: ρ = 1, gradient −A·ρ = −1
    close(logprobs.grad, [[-1.0, 0.0]])


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    old_values = t([[1.0, 1.0, 1.0, 1.0]])
    values = t([[1.5, 1.1, 0.5, 40.0]])
    returns = t([[2.0, 2.0, 2.0, 2.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_eps_value=0.2)
    # token 0: V 1.5 → clipped 1.2;  (1.5−2)² = 0.25, (1.2−2)² = 0.64 → 0.64 (clipped term wins)
    # token 1: V 1.1 within ±0.2;    (1.1−2)² = 0.81 both                → 0.81
    # token 2: V 0.5 → clipped 0.8;  (0.5−2)² = 2.25, (0.8−2)² = 1.44 → 2.25 (unclipped wins)
    # loss = ½ · (0.64 + 0.81 + 2.25) / 3 = ½ · 3.7 / 3 = 0.6166667
    close(loss, 0.5 * 3.7 / 3.0, tol=1e-12)
    close(stats["value_clip_fraction"], 1.0 / 3.0)


def test_value_clip_fraction_counts_only_values_outside_the_clip_range():
    # As TRL and verl do, the value itself is clipped: clip(V, V_old − ε, V_old + ε). Clipping the
    # change instead, V_old + clip(V − V_old, −ε, ε), rounds: −0.25 + (−0.08 + 0.25) is
    # −0.25 + 0.16999999999999998 = −0.08000000000000002 in float64, a hair below V = −0.08, so
    # its error to R = 0.5 is a hair larger and a token that moved 0.17 < ε would count as clipped.
    old_values = t([[-0.25, -0.25, 0.0]])
    values = t([[-0.08, 0.5, 7.0]])
    returns = t([[0.5, 0.5, 0.0]])
    mask = t([[1, 1, 0]], torch.bool)
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_eps_value=0.2)
    # token 0: V −0.08 within [−0.45, −0.05], clipped V is V: (−0.08 − 0.5)² = 0.3364 both → not clipped
    # token 1: V 0.5 → clipped −0.05:  (0.5 − 0.5)² = 0, (−0.05 − 0.5)² = 0.3025 → 0.3025 (clipped wins)
    # loss = ½ · (0.3364 + 0.3025) / 2 = 0.159725;  clip fraction 1 / 2
    close(loss, 0.159725, tol=1e-12)
    assert stats["value_clip_fraction"].item() == 0.5


# ---------------------------------------------------------------- from logits


def test_logprobs_from_logits_divides_by_temperature():
    ln3 = math.log(3.0)
    # softmax([0, ln 3]) = [1/4, 3/4]; at temperature 2, logits [0, 2 ln 3] give the same
    logits = t([[[0.0, ln3], [0.0, 2.0 * ln3]]])
    token_ids = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, token_ids, temperature=1.0)[:, :1], [[math.log(0.75)]])
    # temperature 2: row 2 is [0, ln 3] → token 0 has log(1/4)
    close(logprobs_from_logits(logits, token_ids, temperature=2.0)[:, 1:], [[math.log(0.25)]])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_from_logits(logits, token_ids, temperature=0.0)


def test_logprobs_from_bf16_logits_are_computed_in_float32():
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    logprobs = logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), temperature=1.0)
    assert logprobs.dtype == torch.float32
    close(logprobs, [[-math.log(4.0), -math.log(4.0)]], tol=1e-6)


def test_entropy_from_logits_by_hand():
    ln3 = math.log(3.0)
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, ln3, -1e4, -1e4]]])
    # uniform over 4: ln 4 = 1.3862944
    # [1/4, 3/4, 0, 0]: −(¼ ln ¼ + ¾ ln ¾) = 0.3465736 + 0.2157616 = 0.5623351
    expected = [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]
    close(entropy_from_logits(logits), expected)
    close(entropy_from_logits(2.0 * logits, temperature=2.0), expected)


def test_kl_over_vocabulary_by_hand():
    ln3 = math.log(3.0)
    # π = [1/4, 3/4], π_ref = [1/2, 1/2]: ¼ ln(½) + ¾ ln(3/2) = −0.1732868 + 0.3040988 = 0.1308120
    logits, ref_logits = t([[[0.0, ln3], [0.0, ln3]]]), t([[[0.0, 0.0], [0.0, ln3]]])
    expected = [[0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0]]
    close(kl_over_vocabulary(logits, ref_logits), expected)
    close(kl_over_vocabulary(2.0 * logits, 2.0 * ref_logits, temperature=2.0), expected)
    # KL is not symmetric: KL(π_ref ‖ π) = ½ ln 2 + ½ ln(2/3) = 0.1438410
    close(kl_over_vocabulary(ref_logits, logits)[0, 0], 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0))


def test_explained_variance_by_hand():
    returns = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    # Var[returns] = ((−1)² + 0 + 1²) / 2 = 1
    close(explained_variance(t([[1.0, 2.0, 3.0, 0.0]]), returns, mask), 1.0)
    # residuals −0.5, 0, 0.5: variance 0.25 → 1 − 0.25 / 1 = 0.75
    close(explained_variance(t([[1.5, 2.0, 2.5, 0.0]]), returns, mask), 0.75)
    # predicting the mean: residuals −1, 0, 1 → 1 − 1 = 0
    close(explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)
    assert torch.isnan(explained_variance(t([[0.0, 1.0]]), t([[5.0, 5.0]]), t([[1, 1]], torch.bool)))


# ---------------------------------------------------------------- KL controller


def test_adaptive_kl_controller_update_by_hand():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10_000)
    # KL 9: 9/6 − 1 = 0.5, clipped to 0.2 → β = 0.1 · (1 + 0.2 · 256 / 10000) = 0.1 · 1.00512
    controller.update(current_kl=9.0, n_steps=256)
    assert controller.kl_coef == pytest.approx(0.100512, abs=1e-15)
    # KL 6.6: 6.6/6 − 1 = 0.1 → β ·= 1 + 0.1 · 256 / 10000 = 1.00256
    controller.update(current_kl=6.6, n_steps=256)
    assert controller.kl_coef == pytest.approx(0.100512 * 1.00256, abs=1e-15)
    # KL 3: 3/6 − 1 = −0.5, clipped to −0.2 → β ·= 1 − 0.2 · 256 / 10000 = 0.99488
    controller.update(current_kl=3.0, n_steps=256)
    assert controller.kl_coef == pytest.approx(0.100512 * 1.00256 * 0.99488, abs=1e-15)


def test_adaptive_kl_controller_round_trips_through_state_dict():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10_000)
    controller.update(current_kl=9.0, n_steps=256)
    restored = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.kl_coef == controller.kl_coef


def test_adaptive_kl_controller_refuses_a_step_longer_than_its_horizon():
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=100)
    # 100 answers: KL 0 → e = −1, clipped to −0.2 → β = 0.1 · (1 − 0.2 · 100 / 100) = 0.08
    controller.update(current_kl=0.0, n_steps=100)
    assert controller.kl_coef == pytest.approx(0.08, abs=1e-15)
    # 500 answers would give 1 − 0.2 · 500 / 100 = 0: β stuck at 0 for good (below 0 past it)
    with pytest.raises(ValueError, match="500 answers in one update; the horizon is 100"):
        controller.update(current_kl=0.0, n_steps=500)
    assert controller.kl_coef == pytest.approx(0.08, abs=1e-15)


def test_adaptive_kl_controller_refuses_non_positive_settings():
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(init_kl_coef=0.1, target_kl=0.0, horizon=10_000)
