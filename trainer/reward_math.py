"""The math of the reward model, as pure functions of tensors.

The reward model reads one scalar score per sequence, at its last real token. It learns from
two kinds of feedback: pairs (a chosen and a rejected answer to the same prompt, trained with
the Bradley–Terry loss) and single thumbs up/down (trained with a logistic loss on the score).
"""

import torch
import torch.nn.functional as F

from trainer.ppo_math import last_true_indices


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last non-pad token in each row, where the reward is read.

    attention_mask: `(batch, seq_len)`, 1/True on real tokens; right or left padding.
    Returns `(batch,)` long. Raises ValueError when a row has no real token.
    """
    indices = last_true_indices(attention_mask.bool())
    if bool((indices < 0).any()):
        raise ValueError("attention_mask has a row with no real tokens: nothing to read a reward from")
    return indices


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected − margin), averaged over pairs, as a scalar.

    chosen_scores, rejected_scores: `(pairs,)`. margin: `(pairs,)` or None (no margin); with a
    margin (Llama 2) the chosen answer must win by at least that much before the loss fades.
    """
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def pointwise_logistic_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(score) against a thumb, averaged, as a scalar.

    scores: `(batch,)`. labels: `(batch,)`, 1 = thumbs up, 0 = thumbs down.
    """
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs the model orders correctly, as a scalar; a tie counts one half.

    chosen_scores, rejected_scores: `(pairs,)`. Counting ties as half keeps a constant
    (untrained) model at chance, 0.5, rather than 0.
    """
    wins = (chosen_scores > rejected_scores).to(chosen_scores.dtype)
    ties = (chosen_scores == rejected_scores).to(chosen_scores.dtype)
    return (wins + 0.5 * ties).mean()


def expected_calibration_error(scores: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """How far σ(score) is from the observed thumbs-up rate, as a scalar in [0, 1].

    ECE = Σ_b (n_b / N) · |mean label in b − mean σ(score) in b|, over `bins` equal-width
    bins of [0, 1] (a probability of exactly 1 falls in the top bin).
    scores: `(batch,)`. labels: `(batch,)`, 1 = thumbs up, 0 = thumbs down.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    probabilities = torch.sigmoid(scores)
    bin_ids = torch.clamp((probabilities * bins).long(), max=bins - 1)
    confidence_sum = torch.bincount(bin_ids, weights=probabilities, minlength=bins)
    label_sum = torch.bincount(bin_ids, weights=labels.to(probabilities.dtype), minlength=bins)
    # |Σ labels − Σ probabilities| / N per bin equals (n_b / N) · |accuracy − confidence|.
    return (label_sum - confidence_sum).abs().sum() / probabilities.numel()
