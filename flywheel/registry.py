"""Policy weights on disk: a directory of immutable, checksummed policy versions.

The registry root (a PVC in Kubernetes) is shared by the trainer (publishes candidates), the
safety gate (reads them, records verdicts, moves the live pointer) and the servers (read the
live pointer, verify a version, load it). Its layout:

    v000001/               one complete version: the model's files and manifest.json
    v000001/reward_model/  the reward model the trainer published with it, which the gate judges it by
    v000001.verdict.json   the gate's verdict on it, outside the version so its digest stays put
    v000001.manifest.json  the manifest of a version whose weights retention removed
    v000001.claim          flock target of the gate judging the version (removed once it has a verdict)
    live.json              the version servers should run (the live pointer)
    canary.json            a candidate serving a share of users beside live, while the gate's online test runs
    history.jsonl          every move of the live pointer, one JSON object a line
    .lock                  flock target that serializes writers
    .tmp-*                 a write in progress, or one a crash left behind: ignored by readers

Every write is crash-safe: files are written and fsync'd under a `.tmp-` name, then renamed into
place, then the directory is fsync'd, so a reader sees either the old state or the new one.

Every move of the live pointer happens under the writers' lock. A mover acting on what it saw
(the gate approving a candidate judged against the live version, the automatic rollback) names
the version it expects live and is refused with LiveMoved when another move came first; only an
operator's rollback is forced, and its record says so.

Every version keeps its manifest and verdict for good; `retain` removes the weights of versions
outside the retention windows (RegistryRetention), renaming each directory away under the lock
before deleting it, so a reader finds a version whole or gone (PolicyRemoved), never half-deleted.
"""

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field

from flywheel.durable import fsync_path, write_atomically
from flywheel.settings import Settings

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
MANIFEST_NAME = "manifest.json"
REWARD_MODEL_DIR = "reward_model"
MODEL_SETTINGS_FILE = "flywheel.toml"
"""A model directory may carry the training and gate settings that suit it (the demo model does):
cli.config reads it as the lowest-priority file, limited to MODEL_DIR_MAY_SET. Named here, in
the ground, so that what writes a model directory (flywheel.demo.init_model) needs not the command line."""
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0
_VERSION_DIR = re.compile(r"v(\d{6,})")
_REMOVED_MANIFEST = re.compile(r"v(\d{6,})\.manifest\.json")
_CHUNK_BYTES = 1 << 20

LiveKind = Literal["approved", "rollback", "initial"]
"""Why the live pointer moved: the gate approved a version, a rollback, or the first deploy."""


def weights_digest(model_dir: Path) -> str:
    """sha256, hex, over the names and bytes of the weight files in model_dir, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as weights:
            while chunk := weights.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- records


class RewardModelFiles(BaseModel):
    """The reward model published with a version, in its reward_model/ folder: what the gate scores it with."""

    files: dict[str, str] = Field(description="File name (relative to reward_model/, flat) → sha256 hex.")
    digest: str = Field(description="sha256 hex over the sorted 'name\\0sha256\\n' lines of files.")


class PolicyManifest(BaseModel):
    """What one policy version holds, written last into its directory."""

    version: int = Field(ge=1, description="Version number, allocated by the registry: 1, 2, 3, …")
    parent_version: int | None = Field(description="Version the trainer started from; None for a base model.")
    files: dict[str, str] = Field(
        description="File name (relative, flat) → sha256 hex, for every file but the manifest."
    )
    digest: str = Field(description="sha256 hex over the sorted 'name\\0sha256\\n' lines of files: names the version.")
    training_step: int = Field(ge=0, description="Trainer step (PPO steps) at which the weights were saved.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Trainer metrics at that step.")
    created_at: AwareDatetime = Field(description="When the version was published, UTC.")
    reward_model: RewardModelFiles | None = Field(
        None, description="The reward model published with the version (reward_model/); None for a base model."
    )
    reference_version: int | None = Field(
        None, description="The version the trainer began from: the gate's KL reference; retention keeps its weights."
    )
    base_version: int | None = Field(
        None, description="For an adapter: the whole-weight version it applies to; None for whole weights."
    )
    base_digest: str | None = Field(
        None, description="For an adapter: the digest of base_version, which a server must serve to load it."
    )

    @property
    def is_adapter(self) -> bool:
        return self.base_digest is not None


class LiveRecord(BaseModel):
    """One move of the live pointer; live.json holds the latest, history.jsonl all of them."""

    version: int = Field(ge=1, description="The version servers should run from now on.")
    kind: LiveKind = Field(description="Why it moved: gate approval, rollback, first deploy.")
    reason: str = Field(description="Free text for the operator: the gate's summary, the rollback's test result.")
    at: AwareDatetime = Field(description="When the pointer moved, UTC.")
    previous_version: int | None = Field(description="The version live before this move; None for the first.")
    forced: bool = Field(
        False,
        description="An operator's move (`flywheel rollback`), made whatever was live: it overrode previous_version "
        "and any move racing it. Other moves happen only while the version they expect is live.",
    )


class Withheld(StrEnum):
    """Why a candidate is not live for a reason other than failing one of its checks."""

    SUPERSEDED = "superseded"
    """A newer candidate was waiting: this one was never judged."""
    LIVE_MOVED = "live_moved"
    """It passed its checks, but the live pointer moved off the version it was judged against
    before it could go live (an operator's rollback, the automatic rollback, another approval)."""


class VerdictCheck(BaseModel):
    """One check of the gate's verdict: what was measured, what it was held to, and whether it passed."""

    name: str = Field(description="The check, e.g. kl_to_reference; `superseded` or `digest` for one never measured.")
    value: float | None = Field(None, description="What was measured; None when nothing was.")
    threshold: float | None = Field(None, description="What it was held to; None when nothing was.")
    passed: bool = Field(False, description="Whether the candidate passed it.")
    detail: str = Field("", description="What happened, for the operator.")


class CanaryRecord(BaseModel):
    """A candidate that passed the gate's offline checks, serving a share of users beside the live version."""

    version: int = Field(ge=1, description="The candidate serving the canary share.")
    against: int = Field(ge=1, description="The live version it is compared with; the canary ends if live moves.")
    share: float = Field(gt=0, lt=1, description="Share of users (sticky per principal and user) it serves.")
    started_at: AwareDatetime = Field(description="When it started serving, UTC: the test counts votes since.")
    checks: list[VerdictCheck] = Field(
        default_factory=list, description="The offline checks it passed, for its verdict when the online test ends."
    )


class PolicyVerdict(BaseModel):
    """The gate's verdict on a version, stored beside it as v000001.verdict.json."""

    version: int = Field(ge=1, description="The version judged.")
    approved: bool = Field(description="True when the gate made it live.")
    checks: list[VerdictCheck] = Field(description="Each check of the gate, in the gate's order.")
    at: AwareDatetime = Field(description="When the verdict was recorded, UTC.")
    judged_against: int | None = Field(
        None, description="The live version it was judged against; None if never judged."
    )
    withheld: Withheld | None = Field(None, description="Why it is not live though no check failed; None otherwise.")
    withheld_detail: str = Field("", description="What happened, for the operator, when withheld is set.")

    @property
    def judged_on_checks(self) -> bool:
        """Whether its checks decided it: not withheld for another reason (superseded, live moved)."""
        # A verdict written before `withheld` existed marked a superseded candidate by its one check's name.
        never_judged = [check.name for check in self.checks] == [Withheld.SUPERSEDED.value]
        return self.withheld is None and not never_judged

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [check.name for check in self.checks if not check.passed]


class CorruptPolicy(Exception):
    """A version's files do not match its manifest: never load it."""


class PolicyRemoved(ValueError):
    """Retention removed a version's weights: it can no longer be loaded or made live (its manifest stays)."""


class CanaryEnded(Exception):
    """The version a decider meant to decide is no longer the running canary: someone else decided or ended it first."""

    def __init__(self, version: int | None):
        """`version`: the canary the decider read, or None when it found none running."""
        self.version = version
        super().__init__(
            "no canary is running"
            if version is None
            else f"policy {version} is no longer the canary: it was decided or ended first, so nothing was written"
        )


class LiveMoved(Exception):
    """The live pointer no longer names the version a mover expected: another move came first, and this one was not made."""

    def __init__(self, wanted: int, expected: int | None, live: LiveRecord | None):
        self.wanted = wanted
        self.expected = expected
        self.live = live
        now = (
            "no version"
            if live is None
            else f"version {live.version} ({live.kind}{', forced' if live.forced else ''}: {live.reason})"
        )
        super().__init__(
            f"live policy is {now}, not version {expected} as expected, so version {wanted} was not made live; "
            f"judge it again against the live version, or make it live by hand with `flywheel rollback --to {wanted}`"
        )


class RegistryRetention(Settings):
    """Which versions keep their weights; every version keeps its manifest and verdict."""

    keep_approved: int = Field(
        3,
        ge=1,
        description="Newest approved versions that keep their weights (rollback targets), besides the live one.",
    )
    keep_rejected: int = Field(
        3, ge=0, description="Newest versions the gate did not approve that keep their weights, to inspect why."
    )
    recently_live_seconds: float = Field(
        86400.0,
        ge=0,
        description="A version the live pointer named within this many seconds keeps its weights: a server may still "
        "be loading or serving it.",
    )


@dataclass(frozen=True)
class VersionStanding:
    """What retention needs to know of one version."""

    version: int
    parent_version: int | None
    approved: bool | None
    """The gate's verdict: True approved, False not approved, None still waiting for the gate."""
    reference_version: int | None = None
    """The version the trainer that published this one began from: the gate's KL reference."""


def versions_to_keep(
    standings: Sequence[VersionStanding],
    live: LiveRecord | None,
    history: Sequence[LiveRecord],
    retention: RegistryRetention,
    now: datetime,
    pinned: Collection[int] = (),
) -> set[int]:
    """The versions whose weights stay: each rule below, then the parent and lineage root of each.

    - live, and the version live before it (where the automatic rollback goes);
    - every version the live pointer named within `recently_live_seconds` (a server may be loading it);
    - candidates waiting for the gate, and the newest `keep_approved` approved and `keep_rejected`
      not approved versions;
    - `pinned`, and the trainer's reference policy as the newest version names it (it loads those
      weights when it resumes).
    Parents are kept one level deep, so the chain of approvals does not keep everything; lineage
    roots are kept because the gate measures a candidate's KL against its root.
    """
    by_version = {standing.version: standing for standing in standings}
    approved = sorted(s.version for s in standings if s.approved)
    rejected = sorted(s.version for s in standings if s.approved is False)
    kept = set(pinned) | {s.version for s in standings if s.approved is None}
    naming_a_reference = [s for s in standings if s.reference_version is not None]
    if naming_a_reference:
        kept.add(max(naming_a_reference, key=lambda s: s.version).reference_version)
    kept |= set(approved[-retention.keep_approved :])
    kept |= set(rejected[-retention.keep_rejected :]) if retention.keep_rejected else set()
    if live is not None:
        kept |= {live.version, live.previous_version}
    cutoff = now - timedelta(seconds=retention.recently_live_seconds)
    for record in history:
        if record.at >= cutoff:  # it, and the version it replaced, were live within the window
            kept |= {record.version, record.previous_version}
    kept.discard(None)
    for version in list(kept):
        kept |= _parent_and_root(version, by_version)
    return {version for version in kept if version in by_version}


def _parent_and_root(version: int, by_version: Mapping[int, VersionStanding]) -> set[int]:
    """The parent of `version` and the first ancestor without a parent (empty for an unknown version)."""
    found: set[int] = set()
    parent = by_version[version].parent_version if version in by_version else None
    if parent is not None:
        found.add(parent)
    seen = {version}
    while parent is not None and parent in by_version and parent not in seen:
        seen.add(parent)
        version, parent = parent, by_version[parent].parent_version
    if version in by_version and by_version[version].parent_version is None:
        found.add(version)
    return found


@dataclass(frozen=True)
class RetentionReport:
    """What one `retain` pass did."""

    kept: list[int]
    """Versions with weights after the pass."""
    removed: list[int]
    """Versions whose weights it removed."""


# ---------------------------------------------------------------- file helpers


def file_sha256(path: Path) -> str:
    """sha256 hex of the bytes of one file."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(files: Mapping[str, str]) -> str:
    """sha256 hex over the lines 'name\\0sha256\\n' of `files` (name → sha256 hex), sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def _copy_and_hash(source: Path, target: Path) -> str:
    """Copy source to a new file target, fsync it, and return the sha256 hex of the bytes written."""
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _append_line(path: Path, line: str) -> None:
    """Append one line to a JSON-lines log and fsync it; drop a torn last line a crash left first."""
    with path.open("ab+") as log_file:
        size = log_file.seek(0, os.SEEK_END)
        if size:
            log_file.seek(0)
            content = log_file.read()
            if not content.endswith(b"\n"):
                log_file.truncate(content.rfind(b"\n") + 1)
        log_file.write(line.encode() + b"\n")
        log_file.flush()
        os.fsync(log_file.fileno())


def _source_files(source_dir: Path) -> list[Path]:
    """The files of a flat Hugging Face model directory, in name order.

    Hidden entries (.gitattributes, the .cache/ that `hf download --local-dir` leaves) are tool
    metadata, not model, and are skipped. Any other subdirectory is refused: versions are flat.
    """
    entries = sorted(p for p in Path(source_dir).iterdir() if not p.name.startswith("."))
    subdirs = [p.name for p in entries if p.is_dir()]
    if subdirs:
        raise ValueError(f"{source_dir}: policy directories must be flat, found subdirectories {subdirs}")
    if not entries:
        raise ValueError(f"{source_dir}: no files to publish")
    if any(p.name == MANIFEST_NAME for p in entries):
        raise ValueError(f"{source_dir}: holds a {MANIFEST_NAME}, a name the registry reserves for its own manifest")
    return entries


def _check_files(
    directory: Path, files: Mapping[str, str], what: str, digest: str | None = None, skipped: Collection[str] = ()
) -> None:
    """Raise CorruptPolicy naming the first file, in name order, of `directory` missing, extra or different from `files`.

    `digest`, when given, must be files_digest(files). Names in `skipped` are not looked at.
    """
    if digest is not None and files_digest(files) != digest:
        raise CorruptPolicy(f"{what}: its files do not match its digest in {MANIFEST_NAME}")
    on_disk = {p.name: p for p in directory.iterdir() if p.name not in skipped}
    for name in sorted(set(on_disk) | set(files)):
        if name not in on_disk:
            raise CorruptPolicy(f"{what}: file {name!r} is missing")
        if name not in files:
            raise CorruptPolicy(f"{what}: file {name!r} is not in the manifest")
        if not on_disk[name].is_file():
            raise CorruptPolicy(f"{what}: {name!r} is not a regular file")
        actual = file_sha256(on_disk[name])
        if actual != files[name]:
            raise CorruptPolicy(f"{what}: file {name!r} has sha256 {actual}, manifest says {files[name]}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- the registry


class PolicyRegistry:
    """Policy versions, the live pointer and the gate's verdicts under one root directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    # -------------------------------------------------------- versions

    def publish(
        self,
        source_dir: Path,
        *,
        parent_version: int | None,
        training_step: int,
        metrics: Mapping[str, float],
        reward_model_dir: Path | None = None,
        reference_version: int | None = None,
        base_version: int | None = None,
    ) -> PolicyManifest:
        """Copy a flat model directory into the registry as the next version and return its manifest.

        `reward_model_dir` (flat) goes into the version's reward_model/ folder: the gate judges the
        version with it. A reward model file with the same name and bytes as the newest earlier
        version's is hard-linked from there, not copied again (registry files are never written in place).
        `base_version`: the directory is an adapter on that whole-weight version, whose digest
        the manifest records (ValueError when it is itself an adapter).

        The copy happens outside the lock (it can be gigabytes); only numbering the version,
        writing its manifest and renaming it into place happen under the lock, so two
        publishers never get the same number and a crash leaves no half-version visible.
        """
        if parent_version is not None:
            self._require(parent_version)
        if reference_version is not None:
            self._require(reference_version)
        base_digest = None
        if base_version is not None:
            base = self.manifest(base_version)
            if base.is_adapter:
                raise ValueError(f"policy version {base_version} is an adapter: an adapter's base has whole weights")
            base_digest = base.digest
        sources = _source_files(Path(source_dir))
        reward_model_sources = _source_files(Path(reward_model_dir)) if reward_model_dir is not None else None
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=TEMP_PREFIX))
        try:
            files = {source.name: _copy_and_hash(source, staging / source.name) for source in sources}
            reward_model = None
            if reward_model_sources is not None:
                (staging / REWARD_MODEL_DIR).mkdir()
                reward_model_files = self._copy_reward_model(reward_model_sources, staging / REWARD_MODEL_DIR)
                reward_model = RewardModelFiles(files=reward_model_files, digest=files_digest(reward_model_files))
            with self._lock():
                version = self._highest_version_number() + 1
                manifest = PolicyManifest(
                    version=version,
                    parent_version=parent_version,
                    files=files,
                    digest=files_digest(files),
                    training_step=training_step,
                    metrics=dict(metrics),
                    created_at=_utc_now(),
                    reward_model=reward_model,
                    reference_version=reference_version,
                    base_version=base_version,
                    base_digest=base_digest,
                )
                write_atomically(staging / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode(), TEMP_PREFIX)
                if reward_model is not None:
                    fsync_path(staging / REWARD_MODEL_DIR)
                os.rename(staging, self._version_dir(version))
                fsync_path(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("published policy version %d (parent %s, digest %s)", version, parent_version, manifest.digest)
        return manifest

    def _copy_reward_model(self, sources: Sequence[Path], target: Path) -> dict[str, str]:
        """Put the reward model files into `target`: hard links to the newest earlier version's identical files, copies otherwise.

        Returns file name → sha256 hex.
        """
        earlier = self._newest_reward_model()
        files = {}
        for source in sources:
            sha256 = file_sha256(source)
            if earlier is not None and earlier[1].files.get(source.name) == sha256:
                try:
                    os.link(earlier[0] / source.name, target / source.name)
                    files[source.name] = sha256
                    continue
                except OSError as error:  # retention removed it meanwhile, or a filesystem without hard links
                    log.debug("copying %s instead of linking it: %s", source.name, error)
            files[source.name] = _copy_and_hash(source, target / source.name)
        return files

    def _newest_reward_model(self) -> tuple[Path, RewardModelFiles] | None:
        """The reward_model/ folder and record of the newest version with weights that has one."""
        for version in reversed(self.versions_with_weights()):
            try:
                manifest = self.manifest(version)
            except ValueError:
                continue
            if manifest.reward_model is not None:
                return self._version_dir(version) / REWARD_MODEL_DIR, manifest.reward_model
        return None

    def reward_model_path(self, version: int) -> Path:
        """The reward model published with `version`, every file checked against its manifest.

        Raises CorruptPolicy when a file is missing, extra or different, or the version has none;
        PolicyRemoved when retention removed the version.
        """
        manifest = self.manifest(version)
        if manifest.reward_model is None:
            raise CorruptPolicy(f"policy version {version} was published without a reward model to judge it by")
        directory = self.path(version) / REWARD_MODEL_DIR
        try:
            _check_files(
                directory,
                manifest.reward_model.files,
                f"policy version {version}'s reward model",
                manifest.reward_model.digest,
            )
        except FileNotFoundError as error:
            self.path(version)  # raises PolicyRemoved when retention took it meanwhile
            raise CorruptPolicy(f"policy version {version}'s reward model: {error}") from error
        return directory

    def versions(self) -> list[int]:
        """Every published version, ascending, whether retention kept its weights or not."""
        return sorted(set(self.versions_with_weights()) | set(self._removed_versions()))

    def versions_with_weights(self) -> list[int]:
        """Complete versions whose weights are on disk, ascending: those a server can load."""
        return sorted(v for v, path in self._version_dirs() if (path / MANIFEST_NAME).is_file())

    def latest(self) -> int | None:
        """The highest published version, or None for an empty registry."""
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        """The directory of a version with its weights: what a server hands to its engine.

        Raises PolicyRemoved when retention removed its weights, ValueError when there is no such version.
        """
        if (self._version_dir(version) / MANIFEST_NAME).is_file():
            return self._version_dir(version)
        if self._removed_manifest_path(version).is_file():
            raise PolicyRemoved(
                f"policy version {version}: its weights were removed by the registry's retention (gate.retention.*), "
                f"so it cannot be loaded or made live; versions with weights: {self.versions_with_weights()}"
            )
        self._require(version)
        raise ValueError(f"policy version {version} is incomplete in {self.root}")  # only its number is taken

    def manifest(self, version: int) -> PolicyManifest:
        """The manifest of a published version, as written (kept when retention removed the weights)."""
        for path in (self._version_dir(version) / MANIFEST_NAME, self._removed_manifest_path(version)):
            try:
                return PolicyManifest.model_validate_json(path.read_bytes())
            except FileNotFoundError:
                continue  # retention may move it between the two reads: the second then finds it
        self._require(version)
        raise ValueError(f"policy version {version} has no manifest in {self.root}")

    def verify(self, version: int) -> PolicyManifest:
        """Re-hash every file of a version against its manifest; return the manifest when all match.

        Raises CorruptPolicy naming the version and the first file, in name order, that is
        missing, extra or different, or saying the manifest's digest does not match its files;
        PolicyRemoved when retention removed the version, before or while it was read.
        """
        try:
            return self._verify(version)
        except FileNotFoundError as error:
            self.path(version)  # raises PolicyRemoved when retention took it meanwhile
            raise CorruptPolicy(f"policy version {version}: a file vanished while it was read: {error}") from error

    def _verify(self, version: int) -> PolicyManifest:
        directory = self.path(version)
        try:
            manifest = PolicyManifest.model_validate_json((directory / MANIFEST_NAME).read_bytes())
        except ValueError as error:
            raise CorruptPolicy(f"policy version {version}: unreadable {MANIFEST_NAME}: {error}") from error
        if manifest.version != version or files_digest(manifest.files) != manifest.digest:
            raise CorruptPolicy(f"policy version {version}: {MANIFEST_NAME} does not match its own version or digest")
        skipped = {MANIFEST_NAME} | ({REWARD_MODEL_DIR} if manifest.reward_model is not None else set())
        _check_files(directory, manifest.files, f"policy version {version}", skipped=skipped)
        return manifest

    # -------------------------------------------------------- live pointer

    def move_live(self, version: int, *, expected: int | None, reason: str, kind: LiveKind) -> LiveRecord:
        """Point the servers at `version` if `expected` is still live (None: no version live yet): a compare-and-set.

        Raises LiveMoved, moving nothing, when another move came first; PolicyRemoved or ValueError
        when `version` cannot be served. Atomic across processes sharing the root (the writers' lock).
        """
        with self._lock():
            self._expect_live(expected, version)
            return self._move_live_locked(version, reason=reason, kind=kind, forced=False)

    def set_live(self, version: int, *, reason: str, kind: LiveKind) -> LiveRecord:
        """Point the servers at `version` whatever is live now: an operator's forced move (`flywheel rollback`).

        It still takes the writers' lock, so it lands between other moves, never inside one; its
        record says it was forced and which version it overrode (previous_version). A mover acting
        on what it saw uses `move_live` or `approve`, which then refuse to undo this move.
        """
        with self._lock():
            return self._move_live_locked(version, reason=reason, kind=kind, forced=True)

    def approve(self, version: int, *, judged_against: int, checks: Sequence[VerdictCheck], reason: str) -> LiveRecord:
        """Record the gate's approval of `version` and make it live, both only if `judged_against` is still live.

        Raises LiveMoved, writing nothing, when the pointer moved while the candidate was judged.
        """
        with self._lock():
            self._expect_live(judged_against, version)
            self._require_weights(version)
            verdict = PolicyVerdict(
                version=version, approved=True, checks=list(checks), at=_utc_now(), judged_against=judged_against
            )
            write_atomically(self._verdict_path(version), verdict.model_dump_json(indent=2).encode(), TEMP_PREFIX)
            return self._move_live_locked(version, reason=reason, kind="approved", forced=False)

    def _expect_live(self, expected: int | None, wanted: int) -> None:
        """Raise LiveMoved unless `expected` is live (None: nothing is). Call under the writers' lock."""
        live = self.live()
        if (None if live is None else live.version) != expected:
            raise LiveMoved(wanted, expected, live)

    def _move_live_locked(self, version: int, *, reason: str, kind: LiveKind, forced: bool) -> LiveRecord:
        """Rewrite live.json, then log the move to history.jsonl. Call under the writers' lock.

        live.json is the truth servers follow; history.jsonl is its log; a canary against the version
        moved from ends with the move (`canary`). Under the lock
        previous_version is always the version this move replaced, and retention cannot remove
        `version` between the check here and the move.
        """
        self._require_weights(version)
        current = self.live()
        record = LiveRecord(
            version=version,
            kind=kind,
            reason=reason,
            at=_utc_now(),
            previous_version=current.version if current else None,
            forced=forced,
        )
        line = record.model_dump_json()
        write_atomically(self._live_path, line.encode(), TEMP_PREFIX)
        _append_line(self._history_path, line)
        log.info(
            "live policy %s → %d (%s%s): %s",
            record.previous_version,
            version,
            kind,
            ", forced" if forced else "",
            reason,
        )
        return record

    def live(self) -> LiveRecord | None:
        """The current live pointer, or None before the first move."""
        try:
            return LiveRecord.model_validate_json(self._live_path.read_bytes())
        except FileNotFoundError:
            return None

    def history(self) -> list[LiveRecord]:
        """Every move of the live pointer, oldest first.

        A last line without its newline is an append a crash cut short; it never took effect
        in live.json's log order and is left out.
        """
        try:
            text = self._history_path.read_text()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1]
        return [LiveRecord.model_validate_json(line) for line in complete.splitlines() if line]

    # -------------------------------------------------------- canary pointer

    def start_canary(
        self, version: int, *, against: int, share: float, checks: Sequence[VerdictCheck] = ()
    ) -> CanaryRecord:
        """Serve `version` to `share` of users beside live, if `against` is still live (LiveMoved otherwise)."""
        with self._lock():
            self._expect_live(against, version)
            self._require_weights(version)
            record = CanaryRecord(
                version=version, against=against, share=share, started_at=_utc_now(), checks=list(checks)
            )
            write_atomically(self._canary_path, record.model_dump_json().encode(), TEMP_PREFIX)
        log.info("policy %d serves a canary share of %.3f beside live %d", version, share, against)
        return record

    def canary(self, *, include_ended: bool = False) -> CanaryRecord | None:
        """The canary serving beside live, or None. A canary whose live version moved is no canary
        (servers stop serving it); `include_ended` returns it anyway, for the gate to close it."""
        try:
            record = CanaryRecord.model_validate_json(self._canary_path.read_bytes())
        except FileNotFoundError:
            return None
        live = self.live()
        return record if include_ended or (live is not None and live.version == record.against) else None

    def end_canary(self, version: int) -> None:
        """Stop serving `version` as the canary (a no-op when another, or none, is)."""
        with self._lock():
            try:
                record = CanaryRecord.model_validate_json(self._canary_path.read_bytes())
            except FileNotFoundError:
                return
            if record.version == version:
                self._canary_path.unlink()
                fsync_path(self.root)

    def close_canary(
        self, version: int, *, approved: bool, checks: Sequence[VerdictCheck], reason: str
    ) -> PolicyVerdict:
        """Decide the running canary `version`: store the verdict, make it live when approved, stop serving it.

        One step under the writers' lock, so the gate's online test and an operator's `flywheel canary
        --reject` never both decide one canary. Raises CanaryEnded when `version` is not the running
        canary (decided already, or its live version moved), and LiveMoved when approving over a
        move of live; either way nothing is written.
        """
        with self._lock():
            record = self.canary()
            if record is None or record.version != version:
                raise CanaryEnded(version)
            if approved:
                self._expect_live(record.against, version)
                self._require_weights(version)
            verdict = PolicyVerdict(
                version=version, approved=approved, checks=list(checks), at=_utc_now(), judged_against=record.against
            )
            write_atomically(self._verdict_path(version), verdict.model_dump_json(indent=2).encode(), TEMP_PREFIX)
            if approved:
                self._move_live_locked(version, reason=reason, kind="approved", forced=False)
            self._canary_path.unlink()
            fsync_path(self.root)
        log.info("canary %d %s: %s", version, "promoted" if approved else "rejected", reason)
        return verdict

    # -------------------------------------------------------- gate verdicts and claims

    def record_verdict(
        self,
        version: int,
        approved: bool,
        checks: Sequence[VerdictCheck],
        *,
        judged_against: int | None = None,
        withheld: Withheld | None = None,
        withheld_detail: str = "",
    ) -> None:
        """Store the gate's verdict on a version beside it (the version's own files stay untouched).

        An approval that moves the live pointer goes through `approve` instead, which checks live first.
        """
        self._require(version)
        verdict = PolicyVerdict(
            version=version,
            approved=approved,
            checks=list(checks),
            at=_utc_now(),
            judged_against=judged_against,
            withheld=withheld,
            withheld_detail=withheld_detail,
        )
        write_atomically(self._verdict_path(version), verdict.model_dump_json(indent=2).encode(), TEMP_PREFIX)

    def verdict(self, version: int) -> PolicyVerdict | None:
        """The gate's verdict on a version, or None if not judged yet."""
        try:
            return PolicyVerdict.model_validate_json(self._verdict_path(version).read_bytes())
        except FileNotFoundError:
            return None

    @contextmanager
    def claim(self, version: int) -> Iterator[bool]:
        """Hold the right to judge `version` for the block; yields False when another gate holds it.

        An flock on v000001.claim: the kernel (or, on NFSv4, the server's lease) lets go when its
        holder dies, so a crashed gate blocks nobody. Leaving the block once the version has a
        verdict, the holder removes the file: a gate that opened it before then still sees the
        verdict once it gets the claim, and one that comes later makes a new file and sees it too.
        """
        path = self._claim_path(version)
        with path.open("a") as claim_file:
            try:
                fcntl.flock(claim_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                if self.verdict(version) is not None:
                    path.unlink(missing_ok=True)
                fcntl.flock(claim_file, fcntl.LOCK_UN)

    # -------------------------------------------------------- retention

    def retain(
        self, retention: RegistryRetention, *, pinned: Collection[int] = (), now: datetime | None = None
    ) -> RetentionReport:
        """Remove the weights of every version `versions_to_keep` does not keep; manifests and verdicts stay.

        Under the writers' lock (so no move, approval or publish interleaves) each removed version's
        manifest is copied beside it, then its directory is renamed away; servers then see it gone
        (PolicyRemoved), never half-deleted, and a file a loader already opened stays readable.
        The renamed directories are deleted after the lock is released.
        """
        with self._lock():
            standings = [self._standing(version) for version in self.versions()]
            kept = versions_to_keep(standings, self.live(), self.history(), retention, now or _utc_now(), pinned)
            removed = [version for version in self.versions_with_weights() if version not in kept]
            doomed = [self._retire(version) for version in removed]
            if doomed:
                fsync_path(self.root)
            kept_with_weights = self.versions_with_weights()
        for directory in doomed:
            shutil.rmtree(directory, ignore_errors=True)
        if removed:
            log.info("retention removed the weights of policy versions %s; kept %s", removed, kept_with_weights)
        return RetentionReport(kept=kept_with_weights, removed=removed)

    def size_bytes(self) -> int:
        """Bytes of every file under the root: weights, manifests, verdicts, logs and writes in progress.

        A file hard-linked into several versions (an unchanged reward model) is counted once.
        """
        sizes: dict[tuple[int, int], int] = {}
        for directory, _, files in os.walk(self.root):
            for name in files:
                try:
                    status = os.lstat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue  # removed while walked
                sizes[status.st_dev, status.st_ino] = status.st_size
        return sum(sizes.values())

    def _standing(self, version: int) -> VersionStanding:
        verdict = self.verdict(version)
        manifest = self.manifest(version)
        return VersionStanding(
            version,
            manifest.parent_version,
            None if verdict is None else verdict.approved,
            manifest.reference_version,
        )

    def _retire(self, version: int) -> Path:
        """Keep the manifest of `version` beside it, then rename its directory away; returns the new name."""
        directory = self._version_dir(version)
        write_atomically(self._removed_manifest_path(version), (directory / MANIFEST_NAME).read_bytes(), TEMP_PREFIX)
        doomed = self.root / f"{TEMP_PREFIX}removed-{directory.name}-{os.urandom(4).hex()}"
        os.rename(directory, doomed)
        return doomed

    # -------------------------------------------------------- internals

    @property
    def _live_path(self) -> Path:
        return self.root / "live.json"

    @property
    def _canary_path(self) -> Path:
        return self.root / "canary.json"

    @property
    def _history_path(self) -> Path:
        return self.root / "history.jsonl"

    def _version_dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def _verdict_path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.verdict.json"

    def _removed_manifest_path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.manifest.json"

    def _claim_path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.claim"

    def _version_dirs(self) -> Iterator[tuple[int, Path]]:
        for path in self.root.iterdir():
            if (match := _VERSION_DIR.fullmatch(path.name)) and path.is_dir():
                yield int(match.group(1)), path

    def _removed_versions(self) -> Iterator[int]:
        for path in self.root.iterdir():
            if match := _REMOVED_MANIFEST.fullmatch(path.name):
                yield int(match.group(1))

    def _highest_version_number(self) -> int:
        """The highest version number in use, complete, removed or not (0 for none): never reused."""
        return max([*(v for v, _ in self._version_dirs()), *self._removed_versions()], default=0)

    def _require(self, version: int) -> None:
        """Raise ValueError unless `version` was published (its weights may since have been removed)."""
        if version not in self.versions():
            raise ValueError(f"policy version {version} does not exist in {self.root} (latest is {self.latest()})")

    def _require_weights(self, version: int) -> None:
        """Raise PolicyRemoved or ValueError unless `version` can be served."""
        self.path(version)

    def seed(self, model_dir: Path) -> LiveRecord:
        """The live record; an empty registry first gets `model_dir` as version 1, live.

        Every process calls this at start-up; the first one seeds, the others wait and find it done.
        """
        with self._lock(".seed.lock"):
            live = self.live()
            if live is None:
                manifest = self.publish(model_dir, parent_version=None, training_step=0, metrics={})
                live = self.move_live(
                    manifest.version, expected=None, reason=f"seeded from {model_dir}", kind="initial"
                )
            return live

    @contextmanager
    def _lock(self, name: str = ".lock") -> Iterator[None]:
        """Exclusive lock among writers sharing the root: flock on a file there (across hosts where
        the filesystem carries flock, as NFSv4 and CephFS do)."""
        with (self.root / name).open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _remove_stale_temps(self) -> None:
        """Delete .tmp-* entries untouched for an hour: crashed writes. Younger ones may be live writes."""
        now = time.time()
        for path in self.root.glob(TEMP_PREFIX + "*"):
            try:
                if now - _last_modified(path) < STALE_TEMP_SECONDS:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                log.warning("removed %s, left behind by an interrupted registry write", path)
            except OSError as error:  # another process removed it first, or a read-only mount
                log.debug("could not remove %s: %s", path, error)


def _last_modified(path: Path) -> float:
    """Newest mtime of path and, for a directory, its entries (a file being copied keeps it fresh)."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [entry.stat().st_mtime for entry in path.iterdir()]
    return max(times)
