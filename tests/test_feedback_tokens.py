import pytest

from feedback.tokens import FeedbackClaims, InvalidFeedbackToken, issue_feedback_token, verify_feedback_token

SECRET = b"secret"
CLAIMS = FeedbackClaims(response_id="resp-1", policy_version=3, user_id="alice", expires_at=1_000)


def test_round_trip():
    assert verify_feedback_token(SECRET, issue_feedback_token(SECRET, CLAIMS), now=999) == CLAIMS


def test_expired():
    with pytest.raises(InvalidFeedbackToken, match="expired"):
        verify_feedback_token(SECRET, issue_feedback_token(SECRET, CLAIMS), now=1_001)


def test_other_secret_is_refused():
    with pytest.raises(InvalidFeedbackToken, match="signature"):
        verify_feedback_token(b"other", issue_feedback_token(SECRET, CLAIMS), now=0)


def test_edited_claims_are_refused():
    token = issue_feedback_token(SECRET, CLAIMS)
    forged = issue_feedback_token(b"attacker", FeedbackClaims("resp-1", 3, "mallory", 1_000))
    with pytest.raises(InvalidFeedbackToken, match="signature"):
        verify_feedback_token(SECRET, forged.split(".")[0] + "." + token.split(".")[1], now=0)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "!!!.???"])
def test_malformed(token):
    with pytest.raises(InvalidFeedbackToken):
        verify_feedback_token(SECRET, token, now=0)


def respellings(token: str) -> list[str]:
    """The same bytes spelt otherwise: padded, with characters base64 decoders skip, in the standard alphabet."""
    payload, signature = token.split(".")
    standard = token.translate(str.maketrans("-_", "+/"))
    spelt = [f"{payload}=.{signature}", f"{payload}.{signature}==", f"{payload[:4]} {payload[4:]}.{signature}"]
    spelt.append(f"{payload[:4]}\x00{payload[4:]}.{signature}")
    return spelt + ([standard] if standard != token else [])


def test_one_token_has_one_spelling():
    claims = FeedbackClaims(response_id="resp-1?>", policy_version=3, user_id="alice~~~", expires_at=1_000)
    token = issue_feedback_token(SECRET, claims)
    for other in respellings(token):
        with pytest.raises(InvalidFeedbackToken, match="malformed"):
            verify_feedback_token(SECRET, other, now=0)


@pytest.mark.parametrize("policy_version", [True, 2**70, 1.5])
def test_a_signed_claim_of_the_wrong_type_is_malformed(policy_version):
    forged = FeedbackClaims(response_id="resp-1", policy_version=policy_version, user_id="alice", expires_at=1_000)
    with pytest.raises(InvalidFeedbackToken, match="malformed"):
        verify_feedback_token(SECRET, issue_feedback_token(SECRET, forged), now=0)
