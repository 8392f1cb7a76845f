"""Deciding whether a piece of feedback is accepted. Pure of I/O: the server turns the outcome into
a gRPC status and a FeedbackGiven event on Kafka.

A response is "known" when the request carries a feedback token the servers signed for it: tokens
are stateless, so any replica accepts feedback on any replica's answers. A token names the
principal and user it was issued to, and only they may vote with it.

A vote the user gives again is accepted again: a replica cannot know what the user sent through
another since (refusing would lose a change made there), and the trainer's join store and the
gate keep one standing vote per voter and response, trained once, whichever replica took it.
`replaced_previous` says what this replica remembers.
"""

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field

from feedback.identity import DEFAULT_PRINCIPAL
from feedback.tokens import FeedbackClaims, InvalidFeedbackToken, verify_feedback_token
from flywheel.errors import shown
from flywheel.settings import Settings
from flywheel.v1 import events_pb2, serving_pb2


class Refusal(Enum):
    """Why feedback was refused; each maps to one gRPC status code."""

    INVALID = "INVALID_ARGUMENT"
    FORBIDDEN = "PERMISSION_DENIED"
    UNKNOWN_RESPONSE = "NOT_FOUND"
    RATE_LIMITED = "RESOURCE_EXHAUSTED"


RATINGS = frozenset(serving_pb2.Rating.values())


class FeedbackRefused(Exception):
    def __init__(self, refusal: Refusal, message: str):
        super().__init__(message)
        self.refusal = refusal


class IntakeLimits(Settings):
    """What SubmitFeedback accepts from one user."""

    max_comment_chars: int = Field(2000, ge=0, description="Longest feedback comment, in characters.")
    max_response_id_chars: int = Field(
        64, ge=1, description="Longest response_id (the server issues 37-character ids)."
    )
    max_feedback_token_chars: int = Field(1024, ge=1, description="Longest feedback_token, in characters.")
    votes_per_minute: float = Field(
        60.0, gt=0, description="Sustained feedback rate per user; bursts up to vote_burst."
    )
    vote_burst: int = Field(20, ge=1, description="Votes a user may send at once before the per-minute rate applies.")
    principal_votes_per_minute: float = Field(
        6000.0,
        gt=0,
        description="Sustained feedback rate per principal (all its users); bursts up to principal_vote_burst.",
    )
    principal_vote_burst: int = Field(
        500, ge=1, description="Votes a principal may send at once before its rate applies."
    )
    remembered_votes: int = Field(
        100_000,
        ge=1,
        description="(response, principal, user) votes remembered for replaced_previous; oldest forgotten first.",
    )


class TokenBucket:
    """Per-key token buckets; `allow(key)` spends one token if there is one."""

    def __init__(
        self, rate_per_second: float, burst: int, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ):
        self._rate = rate_per_second
        self._burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> bool:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self._burst), now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed


class FeedbackIntake:
    def __init__(
        self,
        token_secret: bytes,
        limits: IntakeLimits,
        clock: Callable[[], float] = time.time,
        max_user_id_chars: int = 128,
    ):
        """`max_user_id_chars`: the server's bound on user ids (RequestLimits), the same for Generate and feedback."""
        self._secret = token_secret
        self._limits = limits
        self._max_user_id_chars = max_user_id_chars
        self._clock = clock
        self._user_rate = TokenBucket(limits.votes_per_minute / 60, limits.vote_burst, clock)
        self._principal_rate = TokenBucket(limits.principal_votes_per_minute / 60, limits.principal_vote_burst, clock)
        self._last_votes: OrderedDict[tuple[str, str, str], tuple] = OrderedDict()

    def accept(
        self, request: serving_pb2.SubmitFeedbackRequest, principal: str = DEFAULT_PRINCIPAL
    ) -> tuple[events_pb2.FeedbackGiven, bool]:
        """Return the event to log and whether it replaces the user's earlier vote; raise FeedbackRefused.

        `principal`: the tenant whose API key sent the request; the vote is (principal, user_id)'s.
        """
        self._check_bounds(request)
        response_id = request.response.response_id
        claims = self._verified(request.response, request.user_id, principal, "response")
        preferred_over = ""
        if request.HasField("preferred_over"):
            if request.preferred_over.response_id == response_id:
                raise FeedbackRefused(
                    Refusal.INVALID, "preferred_over.response_id: must differ from response.response_id"
                )
            preferred_over = self._verified(
                request.preferred_over, request.user_id, principal, "preferred_over"
            ).response_id
        # A principal's budget is spent only by votes its own users may still send.
        if not self._user_rate.allow(f"{principal}/{request.user_id}"):
            raise FeedbackRefused(
                Refusal.RATE_LIMITED,
                f"user_id: this user sends feedback faster than {self._limits.votes_per_minute:g} per minute; retry later",
            )
        if not self._principal_rate.allow(principal):
            raise FeedbackRefused(
                Refusal.RATE_LIMITED,
                f"principal {principal} sends feedback faster than {self._limits.principal_votes_per_minute:g} per "
                "minute; retry later",
            )
        vote = (request.rating, request.comment, preferred_over)
        key = (response_id, principal, request.user_id)
        previous = self._last_votes.pop(key, None)
        self._last_votes[key] = vote
        if len(self._last_votes) > self._limits.remembered_votes:
            self._last_votes.popitem(last=False)
        given_at = Timestamp()
        given_at.FromNanoseconds(int(self._clock() * 1e9))
        event = events_pb2.FeedbackGiven(
            event_id=uuid.uuid4().hex,
            response_id=response_id,
            user_id=request.user_id,
            rating=request.rating,
            comment=request.comment,
            preferred_over_response_id=preferred_over,
            policy_version=claims.policy_version,
            given_at=given_at,
            principal=principal,
        )
        return event, previous is not None and previous != vote

    def _check_bounds(self, request: serving_pb2.SubmitFeedbackRequest) -> None:
        """Every field present and within its limit, before any token is looked at."""
        limits = self._limits
        if not request.user_id:
            raise FeedbackRefused(Refusal.INVALID, "user_id: required; it must match the user_id of the Generate call")
        bounded = [
            ("user_id", request.user_id, self._max_user_id_chars),
            ("comment", request.comment, limits.max_comment_chars),
            ("response.response_id", request.response.response_id, limits.max_response_id_chars),
            ("response.feedback_token", request.response.feedback_token, limits.max_feedback_token_chars),
            ("preferred_over.response_id", request.preferred_over.response_id, limits.max_response_id_chars),
            ("preferred_over.feedback_token", request.preferred_over.feedback_token, limits.max_feedback_token_chars),
        ]
        for field, value, limit in bounded:
            if len(value) > limit:
                raise FeedbackRefused(Refusal.INVALID, f"{field}: is {len(value)} characters; at most {limit}")
        if not request.response.response_id:
            raise FeedbackRefused(Refusal.INVALID, "response.response_id: required")
        if request.rating not in RATINGS:
            raise FeedbackRefused(
                Refusal.INVALID, f"rating: {request.rating} is not a Rating (RATING_UP = 1, RATING_DOWN = 2, or unset)"
            )
        if request.rating == serving_pb2.RATING_UNSPECIFIED and not request.HasField("preferred_over"):
            raise FeedbackRefused(
                Refusal.INVALID, "rating: give RATING_UP or RATING_DOWN, or a preferred_over response"
            )

    def _verified(self, rated: serving_pb2.RatedResponse, user_id: str, principal: str, field: str) -> FeedbackClaims:
        try:
            claims = verify_feedback_token(self._secret, rated.feedback_token, now=self._clock())
        except InvalidFeedbackToken as error:
            raise FeedbackRefused(Refusal.FORBIDDEN, f"{field}.{error}") from error
        if claims.response_id != rated.response_id:
            raise FeedbackRefused(
                Refusal.UNKNOWN_RESPONSE,
                f"{field}.response_id: no response {shown(rated.response_id)} was issued with this token",
            )
        if claims.principal != principal:
            raise FeedbackRefused(Refusal.FORBIDDEN, f"{field}.feedback_token: was issued to another principal's user")
        if claims.user_id != user_id:
            raise FeedbackRefused(Refusal.FORBIDDEN, f"{field}.feedback_token: was issued to another user")
        return claims
