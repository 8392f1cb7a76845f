"""The learning benchmark's own arithmetic: where a curve stops rising."""

from benchmarks.learning import plateau_index


def test_the_plateau_is_where_the_curve_never_again_rises_more_than_the_tolerance():
    assert plateau_index([0.01, 0.20, 0.30, 0.35, 0.34, 0.36, 0.35]) == 3
    assert plateau_index([0.01, 0.20, 0.30, 0.35, 0.34, 0.36, 0.45]) == 6  # still learning at the end
    assert plateau_index([0.30, 0.31, 0.29]) == 0  # never learnt
    assert plateau_index([0.01, 0.10], tolerance=0.2) == 0
