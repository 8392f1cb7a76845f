"""Signed feedback tokens: proof that a user was served a given response.

A token is `base64url(claims JSON) "." base64url(HMAC-SHA256(secret, claims JSON))`.
"""

import base64
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass, fields

from feedback.identity import DEFAULT_PRINCIPAL


@dataclass(frozen=True)
class FeedbackClaims:
    response_id: str
    policy_version: int
    user_id: str
    expires_at: int
    """Unix time in seconds after which the token is refused."""
    principal: str = DEFAULT_PRINCIPAL
    """The tenant whose key asked; tokens issued before principals existed name none, so the default."""


class InvalidFeedbackToken(Exception):
    """The token is malformed, forged, for another response or user, or expired."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded base64url; raise ValueError for any other spelling of the same bytes (padding,
    characters outside the alphabet, the standard alphabet's + and /), so one token has one form."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(raw) != text:
        raise ValueError("not canonical unpadded base64url")
    return raw


INT64 = range(-(2**63), 2**63)


def _well_typed(claims: FeedbackClaims) -> bool:
    """Every claim of its declared type (a JSON true is not an int here), integers within int64."""
    for claim in fields(FeedbackClaims):
        value = getattr(claims, claim.name)
        if type(value) is not claim.type or (claim.type is int and value not in INT64):
            return False
    return True


def _signature(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()


def issue_feedback_token(secret: bytes, claims: FeedbackClaims) -> str:
    payload = json.dumps(asdict(claims), separators=(",", ":"), sort_keys=True).encode()
    return f"{_b64encode(payload)}.{_b64encode(_signature(secret, payload))}"


def verify_feedback_token(secret: bytes, token: str, *, now: float | None = None) -> FeedbackClaims:
    """Return the token's claims, or raise InvalidFeedbackToken saying why."""
    try:
        payload_text, signature_text = token.split(".")
        payload, signature = _b64decode(payload_text), _b64decode(signature_text)
    except ValueError as error:
        raise InvalidFeedbackToken("feedback_token: is malformed") from error
    if not hmac.compare_digest(signature, _signature(secret, payload)):
        raise InvalidFeedbackToken("feedback_token: signature does not match")
    try:
        claims = FeedbackClaims(**json.loads(payload))
        if not _well_typed(claims):
            raise TypeError("a claim has the wrong type")
    except (ValueError, TypeError) as error:
        raise InvalidFeedbackToken("feedback_token: is malformed") from error
    if (time.time() if now is None else now) > claims.expires_at:
        raise InvalidFeedbackToken("feedback_token: has expired")
    return claims
