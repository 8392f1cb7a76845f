"""The math of batched clipped PPO for language models, as pure functions of tensors.

Conventions shared by every function here:

- A response batch is `(batch, response_len)`: one row per sampled answer, one column per
  generated token. Rows are right-padded: the valid tokens of a row are a prefix.
- `mask` is `(batch, response_len)`, bool (or 0/1), True on valid tokens. What padding
  positions hold (garbage log-probs, zeros) never reaches a result: it is selected away with
  `torch.where`, not multiplied by zero, so NaN or inf in padding cannot leak into a value.
- Log-probabilities are natural-log, per token, at the sampling temperature.
"""

from typing import NamedTuple

import torch

# ---------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is True.

    values, mask: same shape, e.g. `(batch, response_len)`.
    Returns a scalar, or with `dim` the mean along that dimension (e.g. `(batch,)` for dim=-1).
    NaN where the mask selects nothing (0 / 0); no host sync, so it is safe in the hot loop.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)
    return total / mask.sum(dim=dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the positions where `mask` is True, as a scalar.

    values, mask: same shape. With `unbiased`, the sum of squared deviations is divided by
    n − 1 (Bessel's correction), else by n. Raises ValueError when the mask selects too few
    values for the estimate.
    """
    count = int(mask.bool().sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid values; mask selects {count}")
    squared_deviation = (values - masked_mean(values, mask)) ** 2
    variance = masked_mean(squared_deviation, mask)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize `values` to unit variance (and zero mean) over the valid positions.

    values, mask: `(batch, response_len)`. Returns the same shape, 0 on padding.
    With `shift_mean=False` the mean is kept, only the scale changes: PPO whitens advantages
    with the shift; rewards are whitened without it, so their sign still means good or bad.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------- positions in a row


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Column of the first True in each row, or the row length when a row has none.

    bools: `(batch, length)` bool. Returns `(batch,)` long.
    """
    length = bools.size(-1)
    columns = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, columns, length).min(dim=-1).values


def last_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Column of the last True in each row, or −1 when a row has none.

    bools: `(batch, length)` bool. Returns `(batch,)` long. Works for any padding side.
    """
    length = bools.size(-1)
    return length - 1 - first_true_indices(bools.flip(-1))


# ---------------------------------------------------------------- KL and rewards


class KLEstimates(NamedTuple):
    """Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman, 2020).

    Each field has the shape of the log-probs given, e.g. `(batch, response_len)`.
    """

    k1: torch.Tensor
    """log π − log π_ref: unbiased, high variance, can be negative on a single token."""
    k2: torch.Tensor
    """½ (log π − log π_ref)²: biased, low variance, never negative."""
    k3: torch.Tensor
    """(r − 1) − log r with r = π_ref / π: unbiased, low variance, never negative."""


def kl_estimators(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> KLEstimates:
    """The k1, k2, k3 estimators of KL(π ‖ π_ref), per token.

    logprobs: `(batch, response_len)`, log π of the sampled tokens (π sampled them).
    ref_logprobs: same shape, log π_ref of the same tokens.
    Padding is not masked here; reduce with `masked_mean`.
    """
    log_ratio = logprobs - ref_logprobs
    return KLEstimates(
        k1=log_ratio,
        k2=0.5 * log_ratio**2,
        k3=torch.expm1(-log_ratio) + log_ratio,
    )


def kl_per_answer(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(π ‖ π_ref) of each answer in nats: the k1 estimate Σ_t (log π − log π_ref) over its valid tokens.

    logprobs, ref_logprobs, mask: `(batch, response_len)`, the answers sampled from π.
    Returns `(batch,)`. Its mean over answers is unbiased; one answer's value can be negative.
    """
    log_ratio = kl_estimators(logprobs, ref_logprobs).k1
    return torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio)).sum(dim=-1)


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """The reward PPO maximizes: a KL penalty on every token plus the score at the last one.

    reward_t = −kl_coef · (log π − log π_ref)_t, and the reward model's `score` of the whole
    answer is added at the last valid token of its row (Ziegler et al., 2019).

    score: `(batch,)`, one reward-model score per answer (after any EOS penalty).
    logprobs, ref_logprobs: `(batch, response_len)`, log-probs of the sampled tokens under the
        sampling policy and the frozen reference policy (the trainer's: live, see Trainer.anchor_on_live).
    mask: `(batch, response_len)`, True on valid tokens; every row needs at least one.
    Returns `(batch, response_len)`, 0 on padding.
    """
    mask = mask.bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("mask has a row with no valid tokens: every response needs at least one token")
    kl_penalty = -kl_coef * kl_estimators(logprobs, ref_logprobs).k1
    rewards = torch.where(mask, kl_penalty, torch.zeros_like(kl_penalty))
    rows = torch.arange(rewards.size(0), device=rewards.device)
    return rewards.index_put((rows, last_true_indices(mask)), score.to(rewards.dtype), accumulate=True)


def apply_missing_eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every answer that never produced end-of-sequence.

    scores: `(batch,)` reward-model scores. ended_with_eos: `(batch,)` bool.
    penalty: a non-negative amount. Returns `(batch,)`; answers that ended are unchanged.
    Subtract rather than replace (as TRL's `missing_eos_penalty` does): the reward model's
    ordering among truncated answers still carries signal, only shifted down.
    """
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0 (it is subtracted), got {penalty}")
    return torch.where(ended_with_eos.bool(), scores, scores - penalty)


# ---------------------------------------------------------------- advantages


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over right-padded rows.

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, where the value after the last
    valid token is 0 (the answer has ended). Padding's rewards and values are treated as 0,
    so a padded row gets the same advantages on its valid tokens as the unpadded row.

    rewards, values, mask: `(batch, response_len)`.
    Returns (advantages, returns), both `(batch, response_len)` and 0 on padding;
    returns = advantages + values are the value head's regression targets.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards, zeros)
    values = torch.where(mask, values, zeros)
    response_len = values.size(-1)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(response_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = advantages + values
    return torch.where(mask, advantages, zeros), torch.where(mask, returns, zeros)


def answers_to_learn_from(scores: torch.Tensor, answers_per_prompt: int, min_spread: float) -> torch.Tensor:
    """Which answers the policy learns from: those of prompts whose answers the reward model tells apart.

    A prompt whose answers all score alike (every one right, or every one hopeless) shows the policy
    no direction, only the reward model's noise, which whitened advantages blow up to full-size updates.
    DAPO (Yu et al., 2025) leaves such prompts out ("dynamic sampling"); with a learnt reward model
    "alike" is a spread of the predicted thumbs-up probabilities, σ(score), below `min_spread`.

    scores: `(prompts × answers_per_prompt,)`, a prompt's answers adjacent (the rewards' scores: the
    missing-EOS penalty counts). Returns `(same,)` bool; with `min_spread` 0 every answer.
    """
    if min_spread == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    probabilities = torch.sigmoid(scores.float()).view(-1, answers_per_prompt)
    spread = probabilities.max(-1).values - probabilities.min(-1).values
    return (spread >= min_spread).repeat_interleave(answers_per_prompt)


# ---------------------------------------------------------------- losses


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss (Schulman et al., 2017), averaged over valid tokens.

    loss = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)), ρ_t = π_θ / π_old of token t.

    logprobs: `(batch, response_len)`, log π_θ of the sampled tokens (carries the gradient).
    old_logprobs: same shape, log π_old recorded when the rollout was scored.
    advantages: same shape, usually whitened. mask: same shape, True on valid tokens.
    Returns (loss, stats); loss is a scalar, stats are detached scalars:
      clip_fraction: share of tokens where the clipped term wins (their gradient is 0);
      approx_kl: KL(π_old ‖ π_θ) by the k3 estimator, (ρ − 1) − log ρ, averaged;
      ratio_mean: average ρ.
    """
    # Zero padding's log-ratio before exp: an overflowed ratio there would turn the (zero)
    # gradient of a padding token into 0 · inf = NaN.
    log_ratio = logprobs - old_logprobs
    log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl_estimators(old_logprobs, logprobs).k3, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value head's squared error, pessimistic over a clipped update of the prediction.

    loss = ½ mean_t max((V_t − R_t)², (clip(V_t, V_old,t − ε, V_old,t + ε) − R_t)²).

    values: `(batch, response_len)`, V_θ now (carries the gradient).
    old_values: same shape, V at rollout time. returns: same shape, GAE returns.
    mask: same shape, True on valid tokens.
    Returns (loss, stats); stats["value_clip_fraction"] is the share of tokens where the
    clipped term wins.
    """
    # Clamp the value itself, as TRL and verl do: V_old + clip(V − V_old, −ε, ε) rounds, so a
    # value inside the range could come back a hair off and count as clipped.
    clipped_values = torch.clamp(values, old_values - clip_eps_value, old_values + clip_eps_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------- from logits


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the sampling temperature, in at least float32 (bf16 log-softmax drifts)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probability of each given token under softmax(logits / temperature).

    Recompute log-probs at the temperature the answers were sampled at, so they match the
    sampler's and the PPO ratio is 1 before the first update.
    logits: `(batch, response_len, vocab)`; token_ids: `(batch, response_len)` long.
    Returns `(batch, response_len)`, float32 or wider.
    """
    scaled = _scaled_logits(logits, temperature)
    token_logits = torch.gather(scaled, -1, token_ids.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature) at each position.

    logits: `(batch, response_len, vocab)`. Returns `(batch, response_len)`.
    H = logsumexp(z) − Σ softmax(z) · z, which needs no log of a zero probability.
    """
    scaled = _scaled_logits(logits, temperature)
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def kl_over_vocabulary(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(π ‖ π_ref) in nats at each position, summed exactly over the vocabulary: Σ π · (log π − log π_ref),
    with π = softmax(logits / temperature) and π_ref likewise. No sampled token's noise, unlike `kl_estimators`.

    logits, ref_logits: `(batch, response_len, vocab)`. Returns `(batch, response_len)`.
    """
    logprobs = torch.log_softmax(_scaled_logits(logits, temperature), dim=-1)
    ref_logprobs = torch.log_softmax(_scaled_logits(ref_logits, temperature), dim=-1)
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over valid tokens, as a scalar.

    values, returns, mask: `(batch, response_len)`. 1 is a perfect value head, 0 is no better
    than predicting the mean, negative is worse. NaN when the returns do not vary.
    """
    returns_variance = masked_var(returns, mask)
    residual_variance = masked_var(returns - values, mask)
    explained = 1.0 - residual_variance / returns_variance
    return torch.where(returns_variance == 0, torch.full_like(explained, float("nan")), explained)


# ---------------------------------------------------------------- KL coefficient


class AdaptiveKLController:
    """Steers the KL coefficient β so the policy's KL to the reference tracks a target.

    Ziegler et al. 2019, §2.2: e = clip(KL / target − 1, −0.2, 0.2), then
    β ← β · (1 + e · n_steps / horizon). β rises when the policy drifts past the target
    and falls when it stays close. Only β is state; target and horizon come from config.
    One update may count at most `horizon` samples: β then moves by at most 20%, where from
    5 · horizon a low KL would take β to 0 (for good) or below (paying the policy to drift).
    """

    PROPORTIONAL_ERROR_LIMIT = 0.2
    """Bounds one update's relative error, so a single outlier batch cannot swing β."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if init_kl_coef <= 0 or target_kl <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController needs init_kl_coef, target_kl and horizon > 0; "
                f"got {init_kl_coef}, {target_kl}, {horizon}"
            )
        self.kl_coef = init_kl_coef
        self.target_kl = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt β after `n_steps` samples (answers) whose mean KL was `current_kl` nats."""
        if n_steps > self.horizon:
            raise ValueError(f"the KL controller got {n_steps} answers in one update; the horizon is {self.horizon}")
        limit = self.PROPORTIONAL_ERROR_LIMIT
        proportional_error = min(max(float(current_kl) / self.target_kl - 1.0, -limit), limit)
        self.kl_coef *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])
