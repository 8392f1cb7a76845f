"""The join of answers and votes: either order, duplicates, latest vote wins, one label per vote, bounded
pairs, TTL, persistence."""

import random
import sqlite3

import pytest

from flywheel.v1 import events_pb2, serving_pb2
from trainer.config import RewardModelSettings
from trainer.join_store import JoinStore, PairBounds, is_heldout_prompt
from trainer.loop import labels_for_update

UP, DOWN = serving_pb2.RATING_UP, serving_pb2.RATING_DOWN
TTL = 100.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock) -> JoinStore:
    opened = JoinStore(tmp_path / "join.sqlite3", TTL, clock)
    yield opened
    opened.close()


def generation(
    response_id: str, prompt: str = "What is 1+1?", answer: tuple[int, ...] = (7, 2)
) -> events_pb2.GenerationLogged:
    return events_pb2.GenerationLogged(
        event_id=f"gen-{response_id}",
        response_id=response_id,
        rendered_prompt=prompt,
        prompt_token_ids=[len(prompt), 5, 6],
        response_token_ids=list(answer),
    )


def vote(
    response_id: str,
    rating=UP,
    given_at: int = 1,
    event_id: str | None = None,
    user_id: str = "ada",
    preferred_over: str = "",
    principal: str = "",
) -> events_pb2.FeedbackGiven:
    event = events_pb2.FeedbackGiven(
        event_id=event_id or f"vote-{response_id}-{principal}-{user_id}-{rating}-{given_at}",
        response_id=response_id,
        user_id=user_id,
        rating=rating,
        preferred_over_response_id=preferred_over,
        principal=principal,
    )
    event.given_at.FromSeconds(given_at)
    return event


def labels(store: JoinStore) -> dict[str, bool]:
    return {example.answer.response_id: example.thumbs_up for example in store.labelled_examples()}


def test_joins_in_either_order(store):
    assert store.add_generation(generation("r1"))
    assert store.add_feedback(vote("r1", UP))
    assert store.add_feedback(vote("r2", DOWN))
    assert labels(store) == {"r1": True}
    assert store.add_generation(generation("r2", answer=(9,)))
    assert labels(store) == {"r1": True, "r2": False}
    (example,) = [e for e in store.labelled_examples() if e.answer.response_id == "r2"]
    assert example.answer.prompt_token_ids == (12, 5, 6)
    assert example.answer.token_ids == (12, 5, 6, 9)


def test_an_event_seen_twice_changes_nothing(store):
    assert store.add_generation(generation("r1"))
    assert not store.add_generation(generation("r1"))
    first = vote("r1", UP, given_at=5, event_id="e1")
    assert store.add_feedback(first)
    store.mark_used(store.labelled_examples())
    assert not store.add_feedback(first)
    assert store.labelled_examples() == []


def test_a_redelivered_vote_does_not_win_a_tie_over_a_later_arrival(store):
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, given_at=5, event_id="e1"))
    store.add_feedback(vote("r1", DOWN, given_at=5, event_id="e2"))
    assert not store.add_feedback(vote("r1", UP, given_at=5, event_id="e1"))
    assert labels(store) == {"r1": False}


def test_latest_vote_wins_by_given_at_whatever_the_arrival_order(store):
    store.add_generation(generation("r1"))
    assert store.add_feedback(vote("r1", DOWN, given_at=20))
    assert not store.add_feedback(vote("r1", UP, given_at=10))
    assert labels(store) == {"r1": False}
    assert store.add_feedback(vote("r1", UP, given_at=30))
    assert labels(store) == {"r1": True}


def test_votes_of_different_users_stand_side_by_side(store):
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, user_id="ada"))
    store.add_feedback(vote("r1", DOWN, user_id="bob"))
    assert sorted(example.thumbs_up for example in store.labelled_examples()) == [False, True]


def test_a_vote_trains_once_however_often_it_is_changed_or_repeated(store):
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, given_at=1))
    taken = store.labelled_examples()
    store.add_feedback(vote("r1", DOWN, given_at=2))
    store.mark_used(taken)
    for given_at, rating in enumerate([UP, DOWN, UP, UP], start=3):  # flips, and a repeat through another replica
        assert store.add_feedback(vote("r1", rating, given_at=given_at, event_id=f"again-{given_at}"))
        assert store.labelled_examples() == []
    assert store.labelled_examples("heldout", heldout_fraction=1.0)[0].thumbs_up, (
        "the standing vote is still the latest"
    )


def test_a_vote_becomes_a_label_once_settled_with_the_value_standing_then(tmp_path, clock):
    store = JoinStore(tmp_path / "join.sqlite3", TTL, clock, vote_settle_seconds=30)
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, given_at=1))
    clock.now += 20
    store.add_feedback(vote("r1", DOWN, given_at=2))
    assert labels(store) == {}
    clock.now += 10
    assert labels(store) == {"r1": False}
    store.close()


def test_the_same_user_id_under_two_principals_is_two_voters(store):
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, principal="acme"))
    store.add_feedback(vote("r1", DOWN, principal="mallory"))
    assert sorted((e.principal, e.thumbs_up) for e in store.labelled_examples()) == [("acme", True), ("mallory", False)]


def test_preference_pairs_are_explicit_or_up_against_down_on_the_same_prompt(store):
    for response_id, prompt in [("a", "q1"), ("b", "q1"), ("c", "q1"), ("x", "q2"), ("y", "q3")]:
        store.add_generation(generation(response_id, prompt))
    store.add_feedback(vote("a", UP))
    store.add_feedback(vote("b", DOWN))
    store.add_feedback(vote("c", DOWN))
    store.add_feedback(vote("x", UP))
    store.add_feedback(vote("y", serving_pb2.RATING_UNSPECIFIED, preferred_over="x"))

    def pair_ids(pairs):
        return {(pair.chosen.response_id, pair.rejected.response_id) for pair in pairs}

    pairs = store.preference_pairs()
    assert pair_ids(pairs) == {("a", "b"), ("a", "c"), ("y", "x")}
    assert {pair.principal for pair in pairs} == {"default"}
    store.mark_used(pairs=pairs[:1])
    assert pair_ids(store.preference_pairs()) == pair_ids(pairs[1:])
    assert labels(store) == {"a": True, "b": False, "c": False, "x": True}


def test_heldout_prompts_are_never_in_training_and_are_not_used_up(store):
    prompts = [f"What is {n}+1?" for n in range(40)]
    for n, prompt in enumerate(prompts):
        store.add_generation(generation(f"r{n}", prompt))
        store.add_feedback(vote(f"r{n}", UP))
    heldout = store.labelled_examples("heldout", heldout_fraction=0.3)
    train = store.labelled_examples("train", heldout_fraction=0.3)
    expected_heldout = {f"r{n}" for n, prompt in enumerate(prompts) if is_heldout_prompt(prompt, 0.3)}
    assert {example.answer.response_id for example in heldout} == expected_heldout
    assert 0 < len(heldout) < len(train)
    store.mark_used(heldout + train)
    assert store.labelled_examples("train", heldout_fraction=0.3) == []
    assert len(store.labelled_examples("heldout", heldout_fraction=0.3)) == len(heldout)


def test_unmatched_items_expire_after_the_ttl_and_matched_ones_stay(store, clock):
    store.add_generation(generation("matched"))
    store.add_feedback(vote("matched", UP))
    store.add_generation(generation("lonely-answer"))
    store.add_feedback(vote("lonely-vote", UP))
    clock.now += TTL / 2
    assert store.expire_unmatched() == 0
    clock.now += TTL
    assert store.expire_unmatched() == 2
    store.add_generation(generation("lonely-vote"))
    assert labels(store) == {"matched": True}
    assert store.prompts_for_rollouts(3, random.Random(0)) == [[12, 5, 6]] * 3


def test_the_store_persists_across_reopen_and_snapshots(tmp_path, clock):
    path = tmp_path / "join.sqlite3"
    store = JoinStore(path, TTL, clock)
    store.add_generation(generation("r1"))
    store.add_feedback(vote("r1", UP, given_at=1, event_id="e1"))
    store.snapshot_to(tmp_path / "snapshot.sqlite3")
    store.close()

    reopened = JoinStore(path, TTL, clock)
    assert not reopened.add_feedback(vote("r1", UP, given_at=1, event_id="e1"))
    assert labels(reopened) == {"r1": True}
    reopened.close()
    with sqlite3.connect(tmp_path / "snapshot.sqlite3") as snapshot:
        assert snapshot.execute("SELECT response_id, rating FROM votes").fetchall() == [("r1", UP)]


def test_rollout_prompts_follow_the_traffic(store):
    assert store.prompts_for_rollouts(4, random.Random(0)) == []
    store.add_generation(generation("r1", prompt="short"))
    store.add_generation(generation("r2", prompt="a longer one"))
    prompts = store.prompts_for_rollouts(200, random.Random(0))
    assert len(prompts) == 200
    assert {tuple(prompt) for prompt in prompts} == {(5, 5, 6), (12, 5, 6)}


def test_events_without_their_ids_are_refused_naming_the_field(store):
    with pytest.raises(ValueError, match="user_id"):
        store.add_feedback(events_pb2.FeedbackGiven(event_id="e", response_id="r"))
    with pytest.raises(ValueError, match="event_id"):
        store.add_generation(events_pb2.GenerationLogged(response_id="r"))


def test_up_and_down_votes_pair_only_within_one_principal(store):
    store.add_generation(generation("a", "q1"))
    store.add_generation(generation("b", "q1"))
    store.add_feedback(vote("a", UP, principal="acme"))
    store.add_feedback(vote("b", DOWN, principal="mallory"))
    assert store.preference_pairs() == []
    store.add_feedback(vote("b", DOWN, principal="acme"))
    assert [(p.chosen.response_id, p.rejected.response_id, p.principal) for p in store.preference_pairs()] == [
        ("a", "b", "acme")
    ]


def test_two_voters_who_disagree_on_one_answer_make_no_pair_of_it_with_itself(store):
    store.add_generation(generation("a", "q1"))
    store.add_feedback(vote("a", UP, user_id="ada"))
    store.add_feedback(vote("a", DOWN, user_id="bob"))
    assert store.preference_pairs() == []
    assert sorted(e.thumbs_up for e in store.labelled_examples()) == [False, True]


def test_one_flooded_prompt_yields_a_bounded_number_of_pairs_over_the_store_life(tmp_path, clock):
    store = JoinStore(tmp_path / "join.sqlite3", TTL, clock, pair_bounds=PairBounds(per_answer=2, per_prompt=5))
    for n in range(60):
        store.add_generation(generation(f"r{n}", "q1"))
        store.add_feedback(vote(f"r{n}", UP if n % 2 else DOWN, user_id=f"user-{n}"))
    first = store.preference_pairs()
    assert 0 < len(first) <= 5, "30 up and 30 down answers would make 900 pairs"
    chosen = [pair.chosen.response_id for pair in first]
    rejected = [pair.rejected.response_id for pair in first]
    assert max(chosen.count(r) for r in chosen) <= 2 and max(rejected.count(r) for r in rejected) <= 2
    store.mark_used(pairs=first)
    for n in range(60, 80):
        store.add_generation(generation(f"r{n}", "q1"))
        store.add_feedback(vote(f"r{n}", UP if n % 2 else DOWN, user_id=f"user-{n}"))
    later = store.preference_pairs()
    assert len(first) + len(later) <= 5, "the bound holds over the store's life, used pairs included"
    store.close()


def test_a_store_from_before_principals_is_migrated(tmp_path, clock):
    path = tmp_path / "join.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(
            """
            CREATE TABLE seen_events (arrival INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE);
            CREATE TABLE generations (response_id TEXT PRIMARY KEY, prompt_text TEXT NOT NULL,
                prompt_token_ids TEXT NOT NULL, response_token_ids TEXT NOT NULL, received_at REAL NOT NULL);
            CREATE TABLE votes (response_id TEXT NOT NULL, user_id TEXT NOT NULL, event_id TEXT NOT NULL,
                rating INTEGER NOT NULL, preferred_over_response_id TEXT NOT NULL, given_at_ns INTEGER NOT NULL,
                arrival INTEGER NOT NULL, received_at REAL NOT NULL, used_as_label INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (response_id, user_id));
            CREATE INDEX votes_by_preferred_over ON votes (preferred_over_response_id);
            INSERT INTO generations VALUES ('r1', 'q', '[1]', '[2]', 1.0);
            INSERT INTO votes VALUES ('r1', 'ada', 'e1', 1, '', 1, 1, 1.0, 0);
            """
        )
    store = JoinStore(path, TTL, clock)
    assert [(e.principal, e.user_id, e.thumbs_up) for e in store.labelled_examples()] == [("default", "ada", True)]
    store.close()


def test_an_explicit_preference_trains_once_however_often_its_voter_changes_it(store):
    for response_id in "abcd":
        store.add_generation(generation(response_id, "q1"))
    store.add_feedback(vote("a", serving_pb2.RATING_UNSPECIFIED, given_at=1, preferred_over="b"))
    store.mark_used(pairs=store.preference_pairs())
    for given_at, other in enumerate("cdbc", start=2):
        store.add_feedback(vote("a", serving_pb2.RATING_UNSPECIFIED, given_at=given_at, preferred_over=other))
        assert store.preference_pairs() == []


def test_flipped_votes_cannot_push_used_pairs_out_of_the_bounds(tmp_path, clock):
    store = JoinStore(tmp_path / "join.sqlite3", TTL, clock, pair_bounds=PairBounds(per_answer=1, per_prompt=2))
    for response_id in "abcd":
        store.add_generation(generation(response_id, "q1"))
    trained = []
    for round_number, (ups, downs) in enumerate([("ab", "cd"), ("cd", "ab"), ("ac", "bd")]):
        for response_id in ups + downs:
            store.add_feedback(vote(response_id, UP if response_id in ups else DOWN, given_at=round_number + 1))
        pairs = store.preference_pairs()
        store.mark_used(pairs=pairs)
        trained += pairs
    assert len(trained) <= 2, "a prompt yields two pairs over the store's life, whatever the votes became"


def test_an_explicit_preference_across_the_held_out_split_is_not_trained_on(store):
    train_prompt = next(f"q{n}" for n in range(100) if not is_heldout_prompt(f"q{n}", 0.5))
    heldout_prompt = next(f"q{n}" for n in range(100) if is_heldout_prompt(f"q{n}", 0.5))
    store.add_generation(generation("a", train_prompt))
    store.add_generation(generation("b", heldout_prompt))
    store.add_feedback(vote("a", serving_pb2.RATING_UNSPECIFIED, preferred_over="b"))
    assert store.preference_pairs("train", heldout_fraction=0.5) == []


def test_rollout_prompts_draw_a_flooding_principal_at_most_its_share(store):
    for n in range(200):
        event = generation(f"m{n}", prompt="spam")
        event.principal = "mallory"
        store.add_generation(event)
    store.add_generation(generation("a1", prompt="real question"))
    prompts = store.prompts_for_rollouts(400, random.Random(0), max_principal_share=0.5)
    spam = sum(prompt == [4, 5, 6] for prompt in prompts)
    assert 150 < spam < 250, "about half of the draws, not 200 of every 201"


def test_a_vote_changed_within_the_settle_time_trains_with_its_latest_value(tmp_path):
    settle_seconds = 30.0
    clock = [1000.0]
    store = JoinStore(tmp_path / "join.sqlite3", 1e9, lambda: clock[0], vote_settle_seconds=settle_seconds)
    store.add_generation(
        events_pb2.GenerationLogged(event_id="g", response_id="r", rendered_prompt="q", prompt_token_ids=[1])
    )
    for n, rating in enumerate([UP, DOWN]):
        event = events_pb2.FeedbackGiven(
            event_id=f"v{n}", response_id="r", user_id="ada", rating=rating, principal="acme"
        )
        event.given_at.FromSeconds(n + 1)
        store.add_feedback(event)
        clock[0] += settle_seconds / 3
    assert labels_for_update(store, RewardModelSettings(heldout_fraction=0.0)).waiting == 0
    clock[0] += settle_seconds
    (example,) = labels_for_update(store, RewardModelSettings(heldout_fraction=0.0)).examples
    assert not example.thumbs_up
    store.close()


def test_a_principal_with_one_label_waiting_does_not_stall_the_updates(tmp_path):
    store = JoinStore(tmp_path / "join.sqlite3", 1e9)
    for n in range(101):
        principal = "big" if n < 100 else "small"
        store.add_generation(
            events_pb2.GenerationLogged(event_id=f"g{n}", response_id=f"r{n}", rendered_prompt=f"q{n}")
        )
        store.add_feedback(events_pb2.FeedbackGiven(
            event_id=f"v{n}", response_id=f"r{n}", user_id="u", rating=UP, principal=principal
        ))  # fmt: skip
    labels = labels_for_update(store, RewardModelSettings(heldout_fraction=0.0, max_principal_share=0.5))
    assert [e.principal for e in labels.examples] == ["big", "small"], "half each, while both have labels waiting"
    assert labels.waiting == 101, "an update is due on what waits, so the small principal cannot hold it back"
    store.mark_used(labels.examples)
    assert labels_for_update(store, RewardModelSettings(heldout_fraction=0.0)).waiting == 99
    store.close()


def test_more_principals_than_one_update_holds_do_not_stall_the_updates(tmp_path):
    store = JoinStore(tmp_path / "join.sqlite3", 1e9)
    for n in range(20):
        store.add_generation(generation(f"r{n}", f"q{n}"))
        store.add_feedback(vote(f"r{n}", UP, principal=f"tenant-{n}"))
    labels = labels_for_update(store, RewardModelSettings(heldout_fraction=0.0, update_every_labels=8))
    assert [e.principal for e in labels.examples] == [f"tenant-{n}" for n in range(8)], "the oldest, one each"
    store.close()


def update_batches(store: JoinStore, settings: RewardModelSettings) -> list[list[tuple]]:
    """Take every reward-model update now due, as the trainer does; each update's labels by identity."""
    batches = []
    while (labels := labels_for_update(store, settings)).waiting >= settings.update_every_labels:
        batches.append(
            [(e.answer.response_id, e.user_id, e.thumbs_up) for e in labels.examples]
            + [(p.chosen.response_id, p.rejected.response_id) for p in labels.pairs]
        )
        store.mark_used(labels.examples, labels.pairs)
    return batches


def test_each_update_trains_on_one_principals_oldest_labels_however_the_events_were_batched(tmp_path):
    rng = random.Random(0)
    events = []
    for n in range(60):
        prompt = f"What is {n}+{n}?"
        for answer in range(2):
            response_id = f"r{n}-{answer}"
            events.append(generation(response_id, prompt, (answer,)))
            for user in range(rng.randint(1, 3)):
                events.append(vote(response_id, rng.choice([UP, DOWN]), user_id=f"user-{user}"))
    settings = RewardModelSettings(heldout_fraction=0.0, update_every_labels=16)

    def batches_when_taken_in(chunk_sizes: list[int], name: str) -> list[list[tuple]]:
        store = JoinStore(tmp_path / f"{name}.sqlite3", 1e9)
        batches, start = [], 0
        for size in chunk_sizes:  # the trainer takes what each poll brings, then every update due
            for event in events[start : start + size]:
                (store.add_generation if isinstance(event, events_pb2.GenerationLogged) else store.add_feedback)(event)
            start += size
            batches += update_batches(store, settings)
        store.close()
        return batches

    at_once = batches_when_taken_in([len(events)], "at-once")
    trickled = batches_when_taken_in([rng.randint(1, 40) for _ in range(len(events))], "trickled")
    assert len(at_once) >= 5
    assert all(len(batch) == settings.update_every_labels for batch in at_once)
    assert trickled == at_once
