"""Principals: API keys stored hashed, and the share cap that keeps one principal from outweighing the rest."""

import pytest

from feedback.identity import (
    ApiKey,
    capped_per_principal,
    capped_shares,
    key_digest,
    new_api_key,
    principals_by_digest,
    read_api_keys_file,
)
from flywheel.v1 import events_pb2, serving_pb2
from gate.service import HeldoutPrompts, ThumbsByVersion


def principals(selection: list[tuple[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for principal, _ in selection:
        counts[principal] = counts.get(principal, 0) + 1
    return counts


def test_a_flooding_principal_is_cut_to_its_share_and_keeps_its_first_items():
    items = [("mallory", n) for n in range(1000)] + [(f"tenant-{t}", n) for t in range(4) for n in range(30)]
    chosen = capped_per_principal(items, lambda item: item[0], max_share=0.2)
    counts = principals(chosen)
    # Four tenants of 30 and Mallory: q <= 0.2 * (q + 4 * 30) gives q = 30, an equal 20% each.
    assert counts == {"mallory": 30, "tenant-0": 30, "tenant-1": 30, "tenant-2": 30, "tenant-3": 30}
    assert [n for principal, n in chosen if principal == "mallory"] == list(range(30))


def test_the_share_is_at_least_an_equal_one_so_few_principals_still_learn():
    alone = [("default", n) for n in range(50)]
    assert capped_per_principal(alone, lambda item: item[0], max_share=0.5) == alone
    two = [("big", n) for n in range(100)] + [("small", n) for n in range(10)]
    # Two principals: each may hold half, so the big one keeps as many as the small one has.
    assert principals(capped_per_principal(two, lambda item: item[0], max_share=0.25)) == {"big": 10, "small": 10}


def test_a_share_of_one_keeps_everything_and_the_limit_caps_the_size():
    items = [("a", n) for n in range(7)] + [("b", n) for n in range(3)]
    assert capped_per_principal(items, lambda item: item[0], max_share=1.0) == items
    assert len(capped_per_principal(items, lambda item: item[0], max_share=1.0, limit=5)) <= 5
    assert capped_per_principal([], lambda item: item[0], max_share=0.5) == []


def test_more_principals_than_the_limit_still_fill_it_one_item_each():
    items = [(f"tenant-{t}", n) for n in range(2) for t in range(10)]
    chosen = capped_per_principal(items, lambda item: item[0], max_share=0.5, limit=4)
    assert chosen == [("tenant-0", 0), ("tenant-1", 0), ("tenant-2", 0), ("tenant-3", 0)]


def test_keys_are_stored_hashed_and_files_name_the_bad_line(tmp_path):
    key, entry = new_api_key("acme")
    assert entry.sha256 == key_digest(key) and key not in entry.model_dump_json()
    path = tmp_path / "keys"
    path.write_text(f"# tenants\nacme {entry.sha256}\n\nglobex {key_digest('other')}\n")
    assert principals_by_digest(read_api_keys_file(path)) == {entry.sha256: "acme", key_digest("other"): "globex"}
    path.write_text(f"acme {entry.sha256}\nglobex not-a-digest\n")
    with pytest.raises(ValueError, match=":2: expected 'PRINCIPAL SHA256HEX'"):
        read_api_keys_file(path)
    with pytest.raises(ValueError, match="two principals"):
        principals_by_digest([entry, ApiKey(principal="globex", sha256=entry.sha256)])


def vote(response_id: str, principal: str, user_id: str, down: bool, version: int = 2) -> events_pb2.FeedbackGiven:
    event = events_pb2.FeedbackGiven(
        event_id=f"{response_id}-{principal}-{user_id}",
        response_id=response_id,
        principal=principal,
        user_id=user_id,
        rating=serving_pb2.RATING_DOWN if down else serving_pb2.RATING_UP,
        policy_version=version,
    )
    event.given_at.FromSeconds(len(response_id) + int(response_id.split("-")[-1]))
    return event


def test_the_rollback_evidence_of_one_principal_is_capped():
    thumbs = ThumbsByVersion(max_principal_share=0.5)
    for n in range(1000):  # one key speaking as 1,000 users, all thumbs down
        thumbs.add(vote(f"r-{n}", "mallory", f"user-{n}", down=True))
    for n in range(40):
        thumbs.add(vote(f"r-{n}", "acme", "ada", down=n % 10 == 0))
    downs, votes = thumbs.counts(2)
    assert votes == 80 and downs == 40 + 4, "Mallory's votes count as many as acme's, no more"


def test_held_out_prompts_of_a_flooding_principal_do_not_push_out_the_others():
    heldout = HeldoutPrompts(capacity=8, heldout_fraction=1.0, max_principal_share=0.5)
    for n in range(3):
        heldout.offer(events_pb2.GenerationLogged(prompt_token_ids=[n], rendered_prompt=f"acme {n}", principal="acme"))
    for n in range(500):
        heldout.offer(
            events_pb2.GenerationLogged(prompt_token_ids=[n], rendered_prompt=f"spam {n}", principal="mallory")
        )
    texts = [prompt.text for prompt in heldout.current()]
    assert sorted(t for t in texts if t.startswith("acme")) == ["acme 0", "acme 1", "acme 2"]
    assert sum(t.startswith("spam") for t in texts) == 3


def test_draw_shares_are_capped_and_the_rest_spread_by_traffic():
    shares = capped_shares({"mallory": 1000, "acme": 30, "globex": 10}, max_share=0.5)
    assert shares["mallory"] == 0.5
    assert shares["acme"] == pytest.approx(0.375) and shares["globex"] == pytest.approx(0.125)
    assert capped_shares({"default": 5}, max_share=0.2) == {"default": 1.0}
    assert sum(capped_shares({"a": 9, "b": 1, "c": 0}, max_share=0.1).values()) == pytest.approx(1.0)
