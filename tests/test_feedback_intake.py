"""The pure decisions of SubmitFeedback: tokens, bounds, replaced votes and rate limits."""

import pytest

from feedback.intake import FeedbackIntake, FeedbackRefused, IntakeLimits, Refusal, TokenBucket
from feedback.tokens import FeedbackClaims, issue_feedback_token
from flywheel.v1 import serving_pb2 as pb

SECRET = b"k"
NOW = 1_000_000.0


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def rated(
    response_id: str, user_id: str = "alice", expires_at: float = NOW + 60, secret: bytes = SECRET
) -> pb.RatedResponse:
    token = issue_feedback_token(secret, FeedbackClaims(response_id, 4, user_id, int(expires_at)))
    return pb.RatedResponse(response_id=response_id, feedback_token=token)


def thumb(response: pb.RatedResponse, rating=pb.RATING_UP, user_id="alice", **kwargs) -> pb.SubmitFeedbackRequest:
    return pb.SubmitFeedbackRequest(response=response, user_id=user_id, rating=rating, **kwargs)


def refusal_of(intake: FeedbackIntake, request: pb.SubmitFeedbackRequest) -> Refusal:
    with pytest.raises(FeedbackRefused) as refused:
        intake.accept(request)
    return refused.value.refusal


@pytest.fixture
def intake():
    return FeedbackIntake(SECRET, IntakeLimits(max_comment_chars=10, votes_per_minute=60, vote_burst=3), clock=Clock())


def test_accepted_thumb_becomes_an_event(intake):
    event, replaced = intake.accept(thumb(rated("r1"), comment="nice"))
    assert (event.response_id, event.user_id, event.rating, event.comment, event.policy_version) == (
        "r1",
        "alice",
        pb.RATING_UP,
        "nice",
        4,
    )
    assert event.event_id and not replaced
    assert event.given_at.seconds == int(NOW)


def test_second_vote_replaces_and_an_identical_vote_is_taken_again(intake):
    intake.accept(thumb(rated("r1")))
    _, replaced = intake.accept(thumb(rated("r1"), rating=pb.RATING_DOWN))
    assert replaced
    # Another replica may have taken a change in between; the join store keeps one standing vote.
    again, replaced = intake.accept(thumb(rated("r1"), rating=pb.RATING_DOWN))
    assert again.rating == pb.RATING_DOWN and not replaced


def test_tokens(intake):
    assert refusal_of(intake, thumb(rated("r1", secret=b"forged"))) == Refusal.FORBIDDEN
    assert refusal_of(intake, thumb(rated("r1", expires_at=NOW - 1))) == Refusal.FORBIDDEN
    assert refusal_of(intake, thumb(rated("r1"), user_id="mallory")) == Refusal.FORBIDDEN
    other = rated("r1")
    unknown = pb.RatedResponse(response_id="r-never-issued", feedback_token=other.feedback_token)
    assert refusal_of(intake, thumb(unknown)) == Refusal.UNKNOWN_RESPONSE


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"user_id": ""},
        {"comment": "x" * 11},
        {"rating": pb.RATING_UNSPECIFIED},
    ],
)
def test_invalid(intake, request_kwargs):
    assert refusal_of(intake, thumb(rated("r1"), **request_kwargs)) == Refusal.INVALID


def test_preference_needs_a_valid_token_for_both(intake):
    event, _ = intake.accept(thumb(rated("r1"), rating=pb.RATING_UNSPECIFIED, preferred_over=rated("r2")))
    assert event.preferred_over_response_id == "r2"
    forged = thumb(rated("r1"), rating=pb.RATING_UNSPECIFIED, preferred_over=rated("r3", secret=b"forged"))
    assert refusal_of(intake, forged) == Refusal.FORBIDDEN
    itself = thumb(rated("r1"), rating=pb.RATING_UNSPECIFIED, preferred_over=rated("r1"))
    assert refusal_of(intake, itself) == Refusal.INVALID


def test_rate_limit_per_user(intake):
    for i in range(3):
        intake.accept(thumb(rated(f"r{i}")))
    assert refusal_of(intake, thumb(rated("r9"))) == Refusal.RATE_LIMITED
    intake.accept(thumb(rated("r9", user_id="bob"), user_id="bob"))


def test_token_bucket_refills_at_its_rate():
    clock = Clock(0.0)
    bucket = TokenBucket(rate_per_second=2.0, burst=2, clock=clock)
    assert [bucket.allow("u") for _ in range(3)] == [True, True, False]
    clock.now = 0.5  # one token back: 0.5 s × 2 per second
    assert [bucket.allow("u") for _ in range(2)] == [True, False]
