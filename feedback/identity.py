"""Who sent an event: principals (the tenants API keys belong to), and how far one principal may
weigh in anything learnt from many.

A voter is (principal, user_id): a user id is the caller's own name for its user, unique only
within its principal, so one key cannot speak for another tenant's users. Keys are stored as
SHA-256 digests; the key itself is shown once, when it is made.
"""

import hashlib
import re
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import Field

from flywheel.settings import Settings

DEFAULT_PRINCIPAL = "default"
"""The one principal of a server without API keys, and of events logged before principals existed."""

PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ApiKey(Settings):
    """One accepted API key: the tenant it belongs to and the SHA-256 of the key, hex."""

    principal: str = Field(pattern=PRINCIPAL_NAME.pattern, description="Tenant name, as events and metrics show it.")
    sha256: str = Field(pattern=SHA256_HEX.pattern, description="sha256 of the key, lower-case hex.")


def key_digest(key: str) -> str:
    # The HTTP door's headers come decoded with surrogateescape: bytes that are not UTF-8 stay as surrogates,
    # and are hashed as the bytes they were.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_api_key(principal: str) -> tuple[str, ApiKey]:
    """A fresh random key for `principal`, and the entry that accepts it (the key is not stored anywhere)."""
    key = f"fw-{secrets.token_urlsafe(32)}"
    return key, ApiKey(principal=principal, sha256=key_digest(key))


def read_api_keys_file(path: Path) -> list[ApiKey]:
    """Lines `PRINCIPAL SHA256HEX`; blank lines and lines starting with # are skipped.

    Raises ValueError naming the file and line of a malformed entry.
    """
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not PRINCIPAL_NAME.match(parts[0]) or not SHA256_HEX.match(parts[1]):
            raise ValueError(
                f"{path}:{number}: expected 'PRINCIPAL SHA256HEX' (a name of letters, digits, . _ -, and the key's "
                "sha256 in lower-case hex; `flywheel key new PRINCIPAL` makes one)"
            )
        keys.append(ApiKey(principal=parts[0], sha256=parts[1]))
    return keys


def principals_by_digest(keys: Sequence[ApiKey]) -> dict[str, str]:
    """Key digest -> principal; raises ValueError when one digest is given to two principals."""
    by_digest: dict[str, str] = {}
    for key in keys:
        if by_digest.setdefault(key.sha256, key.principal) != key.principal:
            raise ValueError(f"one API key (sha256 {key.sha256[:12]}...) is given to two principals")
    return by_digest


Item = TypeVar("Item")


def effective_share(max_share: float, principals: int) -> float:
    """The most one of `principals` may weigh: max_share, or an equal share when there are too few to
    honour it (one principal alone keeps everything: there is nobody to weigh it against)."""
    return max(max_share, 1 / principals)


def capped_per_principal(
    items: Sequence[Item], principal_of: Callable[[Item], str], max_share: float, limit: int | None = None
) -> list[Item]:
    """The largest selection, in the given order, in which no principal holds more than its share.

    A principal's share is max_share, or an equal share when fewer than 1 / max_share principals
    have items (one principal alone keeps everything: there is nobody to weigh it against). Each
    principal keeps its first items; `limit` caps the selection's size. When more principals have items
    than the limit, the selection is one item each of the first `limit` principals to appear (each then
    holds 1 / limit of it, over its share when the limit is under 1 / max_share).

    With shares s and counts c_p, each principal keeps min(c_p, q) for the largest q with
    q <= s * sum_p min(c_p, q). The right side minus q is concave in q, so the q that satisfy it
    form an interval from 0 and a bisection finds its end.
    """
    counts = Counter(principal_of(item) for item in items)
    if not counts:
        return []
    share = effective_share(max_share, len(counts))

    def total(q: int) -> int:
        return sum(min(count, q) for count in counts.values())

    low, high = 0, max(counts.values())
    while low < high:
        mid = (low + high + 1) // 2
        if mid <= share * total(mid) + 1e-9 and (limit is None or total(mid) <= limit):
            low = mid
        else:
            high = mid - 1
    quota = max(low, 1)  # low is 0 only when more principals have items than the limit
    size = len(items) if limit is None else limit
    kept: Counter[str] = Counter()
    selection = []
    for item in items:
        principal = principal_of(item)
        if kept[principal] < quota and len(selection) < size:
            kept[principal] += 1
            selection.append(item)
    return selection


def capped_shares(counts: dict[str, int], max_share: float) -> dict[str, float]:
    """Each principal's share of draws: proportional to its count, but at most max_share (or an
    equal share when fewer than 1 / max_share principals have any), the rest spread proportionally
    over the others. The shares sum to 1."""
    active = {principal: count for principal, count in counts.items() if count > 0}
    cap = effective_share(max_share, len(active))
    shares: dict[str, float] = {}
    while True:
        free_mass = 1 - cap * len(shares)
        free = {principal: count for principal, count in active.items() if principal not in shares}
        total = sum(free.values())
        over = [principal for principal, count in free.items() if count / total * free_mass > cap]
        if not over:
            return shares | {principal: count / total * free_mass for principal, count in free.items()}
        shares |= {principal: cap for principal in over}
