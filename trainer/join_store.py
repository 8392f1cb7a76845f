"""A persistent SQLite store joining logged answers (GenerationLogged) with votes (FeedbackGiven).

Events arrive from Kafka at least once and in any order across topics, so the store is
idempotent and order-free:
- every event is applied at most once, by event_id;
- a vote may arrive before or after the answer it is about; they join on response_id;
- each voter (principal, user_id) keeps one standing vote per response: the latest by given_at,
  and on a tie the later to arrive (within a response's Kafka partition, the higher offset);
- an answer nobody voted on, or a vote whose answer never came, is dropped after a TTL.

The reward model takes each vote once, whatever replica it came through and however often it
was changed or repeated: a vote becomes a label `vote_settle_seconds` after it first arrived,
with the value standing then, and `mark_used` records that it was trained on; a change after
that is kept (the gate's rollback reads it) but never trains again. Preference pairs, explicit
or an up-voted against a down-voted answer to the same prompt by voters of one principal, are
each taken once, and bounded per answer and per prompt over the store's life, so flooding one
prompt with votes yields a few pairs, not their product. Prompts are split between training
and held-out evaluation by a stable hash of their text, so both answers of a pair always fall
on the same side.
"""

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from feedback.identity import DEFAULT_PRINCIPAL, capped_shares
from flywheel.v1 import events_pb2, serving_pb2

Split = Literal["train", "heldout"]

SCHEMA_VERSION = 2  # 2: votes are keyed by (response, principal, user) and never made unused again

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_events (
    arrival INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS generations (
    response_id TEXT PRIMARY KEY,
    prompt_text TEXT NOT NULL,
    prompt_token_ids TEXT NOT NULL,
    response_token_ids TEXT NOT NULL,
    received_at REAL NOT NULL,
    principal TEXT NOT NULL DEFAULT '{principal}'
);
CREATE INDEX IF NOT EXISTS generations_by_prompt ON generations (prompt_text);
CREATE INDEX IF NOT EXISTS generations_by_principal ON generations (principal);
CREATE TABLE IF NOT EXISTS votes (
    response_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    rating INTEGER NOT NULL,
    preferred_over_response_id TEXT NOT NULL,
    given_at_ns INTEGER NOT NULL,
    arrival INTEGER NOT NULL,
    received_at REAL NOT NULL,
    first_received_at REAL NOT NULL,
    used_as_label INTEGER NOT NULL DEFAULT 0,
    used_as_pair INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (response_id, principal, user_id)
);
CREATE INDEX IF NOT EXISTS votes_by_preferred_over ON votes (preferred_over_response_id);
CREATE TABLE IF NOT EXISTS used_pairs (
    chosen_response_id TEXT NOT NULL,
    rejected_response_id TEXT NOT NULL,
    PRIMARY KEY (chosen_response_id, rejected_response_id)
) WITHOUT ROWID;
"""

# Stores written before principals (schema 1) keyed votes by (response, user): their voters become
# the default principal's.
MIGRATE_FROM_1 = """
ALTER TABLE generations ADD COLUMN principal TEXT NOT NULL DEFAULT '{principal}';
ALTER TABLE votes RENAME TO votes_v1;
DROP INDEX IF EXISTS votes_by_preferred_over;
{schema}
INSERT INTO votes (response_id, principal, user_id, event_id, rating, preferred_over_response_id, given_at_ns,
                   arrival, received_at, first_received_at, used_as_label)
SELECT response_id, '{principal}', user_id, event_id, rating, preferred_over_response_id, given_at_ns,
       arrival, received_at, received_at, used_as_label FROM votes_v1;
DROP TABLE votes_v1;
"""

# Replaces the standing vote only when the new one is later by (given_at, arrival). Whether the
# vote was trained on, and when it first arrived, stay: one vote, one label.
UPSERT_VOTE = """
INSERT INTO votes (response_id, principal, user_id, event_id, rating, preferred_over_response_id, given_at_ns, arrival,
                   received_at, first_received_at)
VALUES (:response_id, :principal, :user_id, :event_id, :rating, :preferred_over, :given_at_ns, :arrival, :now, :now)
ON CONFLICT (response_id, principal, user_id) DO UPDATE SET
    event_id = excluded.event_id, rating = excluded.rating,
    preferred_over_response_id = excluded.preferred_over_response_id,
    given_at_ns = excluded.given_at_ns, arrival = excluded.arrival, received_at = excluded.received_at
WHERE (excluded.given_at_ns, excluded.arrival) > (votes.given_at_ns, votes.arrival)
"""

SELECT_THUMBS = """
SELECT v.response_id, g.prompt_token_ids, g.response_token_ids, v.rating, v.principal, v.user_id, v.arrival
FROM votes v JOIN generations g ON g.response_id = v.response_id
WHERE v.rating IN (:up, :down)
  AND heldout_prompt(g.prompt_text, :heldout_fraction) = :heldout
  AND (:heldout OR (NOT v.used_as_label AND v.first_received_at <= :settled_before))
ORDER BY v.arrival
LIMIT :limit
"""

# Pairs are explicit preferences, and an up-voted and a down-voted answer to the same prompt by
# voters of one principal; both answers' prompts fall on the same side of the held-out split.
# Only the first :per_prompt up and down votes of a principal on a prompt pair up (by arrival),
# so one flooded prompt costs at most :per_prompt squared rows, not the product of its votes.
# Each pair is ranked by when its later vote arrived, after the pairs already used (whatever
# their votes became since): an answer keeps its first :per_answer pairs as the chosen one and
# as the rejected one, a prompt its first :per_prompt, so the bounds hold over the store's life.
# An explicit preference trains once per voter, however often its voter changes it.
SELECT_PAIRS = """
WITH thumbs AS (
    SELECT v.response_id, v.principal, v.rating, v.arrival, g.prompt_text,
           row_number() OVER (PARTITION BY g.prompt_text, v.principal, v.rating ORDER BY v.arrival) AS vote_rank
    FROM votes v JOIN generations g ON g.response_id = v.response_id
    WHERE v.rating IN (:up, :down) AND v.first_received_at <= :settled_before
),
formed (chosen_id, rejected_id, prompt_text, formed_at, principal) AS (
    SELECT u.chosen_response_id, u.rejected_response_id, c.prompt_text, -1, ''
    FROM used_pairs u JOIN generations c ON c.response_id = u.chosen_response_id
    UNION ALL
    SELECT v.response_id, v.preferred_over_response_id, c.prompt_text, v.arrival, v.principal
    FROM votes v JOIN generations c ON c.response_id = v.response_id
    WHERE v.preferred_over_response_id != '' AND NOT v.used_as_pair AND v.first_received_at <= :settled_before
    UNION ALL
    SELECT up.response_id, down.response_id, up.prompt_text, max(up.arrival, down.arrival), up.principal
    FROM thumbs up
    JOIN thumbs down ON down.prompt_text = up.prompt_text AND down.principal = up.principal
    WHERE up.rating = :up AND down.rating = :down AND up.vote_rank <= :per_prompt AND down.vote_rank <= :per_prompt
      AND up.response_id != down.response_id
),
distinct_pairs AS (
    SELECT chosen_id, rejected_id, min(prompt_text) AS prompt_text, min(formed_at) AS formed_at, max(principal) AS principal
    FROM formed GROUP BY chosen_id, rejected_id
),
ranked_per_answer AS (
    SELECT *, row_number() OVER (PARTITION BY chosen_id ORDER BY formed_at, rejected_id) AS chosen_rank,
              row_number() OVER (PARTITION BY rejected_id ORDER BY formed_at, chosen_id) AS rejected_rank
    FROM distinct_pairs
),
ranked_per_prompt AS (
    SELECT *, row_number() OVER (PARTITION BY prompt_text ORDER BY formed_at, chosen_id, rejected_id) AS prompt_rank
    FROM ranked_per_answer WHERE chosen_rank <= :per_answer AND rejected_rank <= :per_answer
)
SELECT p.chosen_id, c.prompt_token_ids, c.response_token_ids,
       p.rejected_id, r.prompt_token_ids, r.response_token_ids, p.principal, p.formed_at
FROM ranked_per_prompt p
JOIN generations c ON c.response_id = p.chosen_id
JOIN generations r ON r.response_id = p.rejected_id
WHERE p.prompt_rank <= :per_prompt AND p.formed_at >= 0
  AND heldout_prompt(c.prompt_text, :heldout_fraction) = :heldout
  AND heldout_prompt(r.prompt_text, :heldout_fraction) = :heldout
  AND (:heldout OR NOT EXISTS (
      SELECT 1 FROM used_pairs u WHERE u.chosen_response_id = p.chosen_id AND u.rejected_response_id = p.rejected_id))
ORDER BY p.formed_at, p.chosen_id, p.rejected_id
LIMIT :limit
"""

EXPIRE_UNMATCHED = (
    """DELETE FROM generations WHERE received_at < :cutoff
       AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.response_id = generations.response_id)
       AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.preferred_over_response_id = generations.response_id)""",
    """DELETE FROM votes WHERE received_at < :cutoff
       AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.response_id = votes.response_id)""",
)


@dataclass(frozen=True)
class LoggedAnswer:
    """One answer as the policy produced it: the token ids it was given and the ones it sampled."""

    response_id: str
    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt then response: the sequence the reward model scores."""
        return self.prompt_token_ids + self.response_token_ids


@dataclass(frozen=True)
class LabelledExample:
    """A standing thumbs-up or thumbs-down joined with its answer."""

    answer: LoggedAnswer
    thumbs_up: bool
    principal: str
    user_id: str
    arrival: int
    """The store's arrival number of the standing vote: labels are trained on in this order."""


@dataclass(frozen=True)
class PreferencePair:
    """Two answers where users preferred `chosen` over `rejected`."""

    chosen: LoggedAnswer
    rejected: LoggedAnswer
    principal: str
    """Whose voters formed the pair."""
    arrival: int
    """The later arrival number of its two standing votes (of the preference vote, for an explicit one)."""


@dataclass(frozen=True)
class PairBounds:
    """How many preference pairs one answer (as chosen, and as rejected) and one prompt yield, ever."""

    per_answer: int = 4
    per_prompt: int = 16


def is_heldout_prompt(prompt_text: str, heldout_fraction: float) -> bool:
    """Whether a prompt belongs to the held-out split: a stable hash of its text below the fraction."""
    digest = hashlib.sha256(prompt_text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def _require(event_name: str, **fields: str) -> None:
    missing = [name for name, value in fields.items() if not value]
    if missing:
        raise ValueError(f"{event_name}: {', '.join(missing)} must be set")


def _first_sighting(connection: sqlite3.Connection, event_id: str) -> int | None:
    """The arrival number of a new event, or None when this event_id was seen before."""
    cursor = connection.execute("INSERT OR IGNORE INTO seen_events (event_id) VALUES (?)", (event_id,))
    return cursor.lastrowid if cursor.rowcount else None


def _answer(response_id: str, prompt_token_ids: str, response_token_ids: str) -> LoggedAnswer:
    return LoggedAnswer(response_id, tuple(json.loads(prompt_token_ids)), tuple(json.loads(response_token_ids)))


class JoinStore:
    """The join of answers and votes in one SQLite file. Use from one thread at a time (any thread)."""

    def __init__(
        self,
        path: Path,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        vote_settle_seconds: float = 0.0,
        pair_bounds: PairBounds = PairBounds(),
    ):
        """Open (or create) the store at `path`; `clock` gives wall-clock seconds, for the TTL and the settling."""
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._vote_settle_seconds = vote_settle_seconds
        self._pair_bounds = pair_bounds
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly by `_transaction`.
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.create_function("heldout_prompt", 2, is_heldout_prompt, deterministic=True)
        self._create_or_migrate()

    def _create_or_migrate(self) -> None:
        with self._transaction() as connection:
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            has_votes = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'votes'").fetchone()
            if has_votes and version < 2:
                for statement in MIGRATE_FROM_1.format(schema=SCHEMA, principal=DEFAULT_PRINCIPAL).split(";"):
                    connection.execute(statement)
            else:
                for statement in SCHEMA.format(principal=DEFAULT_PRINCIPAL).split(";"):
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield self._connection
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def add_generation(self, event: events_pb2.GenerationLogged) -> bool:
        """Record a logged answer; returns False when the event (or its response_id) was seen before."""
        _require("GenerationLogged", event_id=event.event_id, response_id=event.response_id)
        with self._transaction() as connection:
            if _first_sighting(connection, event.event_id) is None:
                return False
            cursor = connection.execute(
                "INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?)",
                (
                    event.response_id,
                    event.rendered_prompt,
                    json.dumps(list(event.prompt_token_ids)),
                    json.dumps(list(event.response_token_ids)),
                    self._clock(),
                    event.principal or DEFAULT_PRINCIPAL,
                ),
            )
            return cursor.rowcount == 1

    def add_feedback(self, event: events_pb2.FeedbackGiven) -> bool:
        """Record a vote; returns True when it became the standing vote of its (response, user).

        False for an event seen before and for one older than the standing vote.
        """
        _require("FeedbackGiven", event_id=event.event_id, response_id=event.response_id, user_id=event.user_id)
        with self._transaction() as connection:
            arrival = _first_sighting(connection, event.event_id)
            if arrival is None:
                return False
            cursor = connection.execute(
                UPSERT_VOTE,
                {
                    "response_id": event.response_id,
                    "principal": event.principal or DEFAULT_PRINCIPAL,
                    "user_id": event.user_id,
                    "event_id": event.event_id,
                    "rating": event.rating,
                    "preferred_over": event.preferred_over_response_id,
                    "given_at_ns": event.given_at.ToNanoseconds(),
                    "arrival": arrival,
                    "now": self._clock(),
                },
            )
            return cursor.rowcount == 1

    def _query(self, sql: str, split: Split, heldout_fraction: float, limit: int | None) -> list[tuple]:
        parameters = {
            "up": serving_pb2.RATING_UP,
            "down": serving_pb2.RATING_DOWN,
            "heldout": split == "heldout",
            "heldout_fraction": heldout_fraction,
            "limit": -1 if limit is None else limit,
            "settled_before": self._clock() - self._vote_settle_seconds,
            "per_answer": self._pair_bounds.per_answer,
            "per_prompt": self._pair_bounds.per_prompt,
        }
        return self._connection.execute(sql, parameters).fetchall()

    def labelled_examples(
        self, split: Split = "train", heldout_fraction: float = 0.0, limit: int | None = None
    ) -> list[LabelledExample]:
        """Standing thumbs joined with their answers, oldest vote first.

        The train split gives only settled votes not yet marked used; the held-out split gives all
        of its thumbs every time (evaluation does not use them up).
        """
        rows = self._query(SELECT_THUMBS, split, heldout_fraction, limit)
        return [
            LabelledExample(
                _answer(response_id, prompt, response), rating == serving_pb2.RATING_UP, principal, user_id, arrival
            )
            for response_id, prompt, response, rating, principal, user_id, arrival in rows
        ]

    def preference_pairs(
        self, split: Split = "train", heldout_fraction: float = 0.0, limit: int | None = None
    ) -> list[PreferencePair]:
        """Explicit preferences, and up- against down-voted answers to the same prompt text by one principal's voters.

        Each (chosen, rejected) pair appears once, within the pair bounds; the train split leaves
        out pairs marked used.
        """
        rows = self._query(SELECT_PAIRS, split, heldout_fraction, limit)
        return [PreferencePair(_answer(*row[:3]), _answer(*row[3:6]), row[6], row[7]) for row in rows]

    def mark_used(self, examples: Sequence[LabelledExample] = (), pairs: Sequence[PreferencePair] = ()) -> None:
        """Record that the reward model trained on these, so no later query returns them again."""
        with self._transaction() as connection:
            connection.executemany(
                "UPDATE votes SET used_as_label = 1 WHERE response_id = ? AND principal = ? AND user_id = ?",
                [(example.answer.response_id, example.principal, example.user_id) for example in examples],
            )
            connection.executemany(
                "INSERT OR IGNORE INTO used_pairs VALUES (?, ?)",
                [(pair.chosen.response_id, pair.rejected.response_id) for pair in pairs],
            )
            connection.executemany(
                "UPDATE votes SET used_as_pair = 1 WHERE response_id = ? AND preferred_over_response_id = ?",
                [(pair.chosen.response_id, pair.rejected.response_id) for pair in pairs],
            )

    def prompts_for_rollouts(self, n: int, rng: random.Random, max_principal_share: float = 1.0) -> list[list[int]]:
        """`n` prompts drawn from logged traffic (with replacement, as often as users asked them).

        Each principal's traffic is drawn at most `max_principal_share` of the time (an equal share
        when fewer principals have traffic); within a principal, as often as its users asked.
        Returns token id lists; empty when nothing has been logged yet.
        """
        counts = dict(self._connection.execute("SELECT principal, count(*) FROM generations GROUP BY principal"))
        if not counts:
            return []
        shares = capped_shares(counts, max_principal_share)
        principals = sorted(shares)
        prompts = []
        for principal in rng.choices(principals, weights=[shares[p] for p in principals], k=n):
            (prompt,) = self._connection.execute(
                "SELECT prompt_token_ids FROM generations WHERE principal = ? ORDER BY rowid LIMIT 1 OFFSET ?",
                (principal, rng.randrange(counts[principal])),
            ).fetchone()
            prompts.append(json.loads(prompt))
        return prompts

    def generation_count(self) -> int:
        """Logged answers in the store."""
        return self._connection.execute("SELECT count(*) FROM generations").fetchone()[0]

    def expire_unmatched(self) -> int:
        """Drop answers without votes and votes without answers older than the TTL; returns how many."""
        cutoff = self._clock() - self.ttl_seconds
        with self._transaction() as connection:
            return sum(connection.execute(sql, {"cutoff": cutoff}).rowcount for sql in EXPIRE_UNMATCHED)

    def snapshot_to(self, path: Path) -> None:
        """Copy the whole store, consistently, into a new SQLite file at `path` (for checkpoints)."""
        destination = sqlite3.connect(path)
        try:
            self._connection.backup(destination)
        finally:
            destination.close()

    def close(self) -> None:
        self._connection.close()
