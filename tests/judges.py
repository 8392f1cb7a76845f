"""Judges for `flywheel simulate --judge` in tests."""


def undecided(prompt: str, answer: str) -> str:
    """Not a verdict: simulate must refuse it with a clear error."""
    return "maybe"
