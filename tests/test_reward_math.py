"""CPU tests of trainer/reward_math.py, pinned to numbers worked out by hand in the comments."""

import math

import pytest
import torch

from trainer.reward_math import (
    bradley_terry_loss,
    expected_calibration_error,
    last_token_indices,
    pairwise_accuracy,
    pointwise_logistic_loss,
)

F64 = torch.float64
LN2, LN3 = math.log(2.0), math.log(3.0)


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=tol)


def test_last_token_index_with_right_padding():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_indices(attention_mask).tolist() == [2, 3, 0]


def test_last_token_index_with_left_padding():
    attention_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_indices(attention_mask).tolist() == [3, 3, 3]


def test_last_token_index_refuses_an_all_padding_row():
    with pytest.raises(ValueError, match="no real tokens"):
        last_token_indices(torch.tensor([[1, 1], [0, 0]]))


def test_bradley_terry_loss_by_hand():
    chosen = t([1.0, LN3])
    rejected = t([1.0, 0.0])
    # pair 1: r_c − r_r = 0,    −ln σ(0)    = ln 2            = 0.6931472
    # pair 2: r_c − r_r = ln 3, −ln σ(ln 3) = −ln(3/4)        = 0.2876821
    # mean = (0.6931472 + 0.2876821) / 2 = 0.4904146
    close(bradley_terry_loss(chosen, rejected), (LN2 - math.log(0.75)) / 2.0)


def test_bradley_terry_loss_with_margin():
    chosen, rejected = t([LN3, LN3]), t([0.0, 0.0])
    # margin ln 3 leaves a difference of 0: −ln σ(0) = ln 2 on both pairs
    close(bradley_terry_loss(chosen, rejected, margin=t([LN3, LN3])), LN2)


def test_pointwise_logistic_loss_by_hand():
    scores = t([0.0, LN3])
    labels = t([1, 0], torch.long)
    # thumbs up at σ(0) = 1/2: −ln ½ = ln 2 = 0.6931472
    # thumbs down at σ(ln 3) = 3/4: −ln(1 − 3/4) = ln 4 = 1.3862944
    # mean = (ln 2 + ln 4) / 2 = 1.0397208
    close(pointwise_logistic_loss(scores, labels), (LN2 + math.log(4.0)) / 2.0)


def test_pairwise_accuracy_counts_ties_as_half():
    chosen = t([2.0, 1.0, 0.0, 3.0])
    rejected = t([1.0, 2.0, 0.0, 0.0])
    # right, wrong, tie, right: (1 + 0 + ½ + 1) / 4 = 0.625
    close(pairwise_accuracy(chosen, rejected), 0.625)


def test_expected_calibration_error_by_hand():
    # σ(−ln 3) = 1/4, σ(ln 3) = 3/4
    scores = t([-LN3, LN3, LN3, LN3])
    labels = t([0, 1, 1, 0])
    # 2 bins: [0, ½) holds 1/4 with label 0; [½, 1] holds three 3/4 with labels 1, 1, 0
    # bin 0: weight 1/4, |0 − 1/4|   = 1/4  → 1/16
    # bin 1: weight 3/4, |2/3 − 3/4| = 1/12 → 1/16
    # ECE = 1/16 + 1/16 = 0.125
    close(expected_calibration_error(scores, labels, bins=2), 0.125)
    # one bin: |mean label − mean σ| = |1/2 − (1/4 + 3·3/4)/4| = |1/2 − 5/8| = 0.125
    close(expected_calibration_error(scores, labels, bins=1), 0.125)


def test_expected_calibration_error_is_zero_when_calibrated():
    # σ(0) = ½ with one thumb up and one down
    close(expected_calibration_error(t([0.0, 0.0]), t([1, 0]), bins=10), 0.0)
