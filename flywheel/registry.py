"""Policy weights on disk: a directory of immutable, checksummed policy versions.

The registry root (a PVC in Kubernetes) is shared by the trainer (publishes candidates), the
safety gate (reads them, records verdicts, moves the live pointer) and the servers (read the
live pointer, verify a version, load it). Its layout:

    v000001/               one complete version: the model's files and manifest.json
    v000001.verdict.json   the gate's verdict on it, outside the version so its digest stays put
    live.json              the version servers should run (the live pointer)
    history.jsonl          every move of the live pointer, one JSON object a line
    .lock                  flock target that serializes writers
    .tmp-*                 a write in progress, or one a crash left behind: ignored by readers

Every write is crash-safe: files are written and fsync'd under a `.tmp-` name, then renamed into
place, then the directory is fsync'd, so a reader sees either the old state or the new one.
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, Field

from flywheel.durable import fsync_path, write_atomically

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
MANIFEST_NAME = "manifest.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0
_VERSION_DIR = re.compile(r"v(\d{6,})")
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


class LiveRecord(BaseModel):
    """One move of the live pointer; live.json holds the latest, history.jsonl all of them."""

    version: int = Field(ge=1, description="The version servers should run from now on.")
    kind: LiveKind = Field(description="Why it moved: gate approval, rollback, first deploy.")
    reason: str = Field(description="Free text for the operator: the gate's summary, the rollback's test result.")
    at: AwareDatetime = Field(description="When the pointer moved, UTC.")
    previous_version: int | None = Field(description="The version live before this move; None for the first.")


class CorruptPolicy(Exception):
    """A version's files do not match its manifest: never load it."""


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
        self, source_dir: Path, *, parent_version: int | None, training_step: int, metrics: Mapping[str, float]
    ) -> PolicyManifest:
        """Copy a flat model directory into the registry as the next version and return its manifest.

        The copy happens outside the lock (it can be gigabytes); only numbering the version,
        writing its manifest and renaming it into place happen under the lock, so two
        publishers never get the same number and a crash leaves no half-version visible.
        """
        if parent_version is not None:
            self._require(parent_version)
        sources = _source_files(Path(source_dir))
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=TEMP_PREFIX))
        try:
            files = {source.name: _copy_and_hash(source, staging / source.name) for source in sources}
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
                )
                write_atomically(staging / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode(), TEMP_PREFIX)
                os.rename(staging, self._version_dir(version))
                fsync_path(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("published policy version %d (parent %s, digest %s)", version, parent_version, manifest.digest)
        return manifest

    def versions(self) -> list[int]:
        """Complete versions, ascending."""
        return sorted(v for v, path in self._version_dirs() if (path / MANIFEST_NAME).is_file())

    def latest(self) -> int | None:
        """The highest complete version, or None for an empty registry."""
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        """The directory of a complete version: what a server hands to its engine."""
        self._require(version)
        return self._version_dir(version)

    def manifest(self, version: int) -> PolicyManifest:
        """The manifest of a complete version, as written; `verify` checks it against the files."""
        return PolicyManifest.model_validate_json((self.path(version) / MANIFEST_NAME).read_bytes())

    def verify(self, version: int) -> PolicyManifest:
        """Re-hash every file of a version against its manifest; return the manifest when all match.

        Raises CorruptPolicy naming the version and the first file, in name order, that is
        missing, extra or different, or saying the manifest's digest does not match its files.
        """
        directory = self.path(version)
        try:
            manifest = self.manifest(version)
        except ValueError as error:
            raise CorruptPolicy(f"policy version {version}: unreadable {MANIFEST_NAME}: {error}") from error
        if manifest.version != version or files_digest(manifest.files) != manifest.digest:
            raise CorruptPolicy(f"policy version {version}: {MANIFEST_NAME} does not match its own version or digest")
        on_disk = {p.name: p for p in directory.iterdir() if p.name != MANIFEST_NAME}
        for name in sorted(set(on_disk) | set(manifest.files)):
            if name not in on_disk:
                raise CorruptPolicy(f"policy version {version}: file {name!r} is missing")
            if name not in manifest.files:
                raise CorruptPolicy(f"policy version {version}: file {name!r} is not in the manifest")
            if not on_disk[name].is_file():
                raise CorruptPolicy(f"policy version {version}: {name!r} is not a regular file")
            actual = file_sha256(on_disk[name])
            if actual != manifest.files[name]:
                raise CorruptPolicy(
                    f"policy version {version}: file {name!r} has sha256 {actual}, manifest says {manifest.files[name]}"
                )
        return manifest

    # -------------------------------------------------------- live pointer

    def set_live(self, version: int, *, reason: str, kind: LiveKind) -> LiveRecord:
        """Point the servers at `version`: rewrite live.json, then log the move to history.jsonl.

        live.json is the truth servers follow; history.jsonl is its log. Both happen under the
        writers' lock so previous_version is always the version this move replaced.
        """
        self._require(version)
        with self._lock():
            current = self.live()
            record = LiveRecord(
                version=version,
                kind=kind,
                reason=reason,
                at=_utc_now(),
                previous_version=current.version if current else None,
            )
            line = record.model_dump_json()
            write_atomically(self._live_path, line.encode(), TEMP_PREFIX)
            _append_line(self._history_path, line)
        log.info("live policy %s → %d (%s): %s", record.previous_version, version, kind, reason)
        return record

    def live(self) -> LiveRecord | None:
        """The current live pointer, or None before the first set_live."""
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

    # -------------------------------------------------------- gate verdicts

    def record_verdict(self, version: int, approved: bool, checks: list[dict[str, Any]]) -> None:
        """Store the gate's verdict on a version beside it (the version's own files stay untouched)."""
        self._require(version)
        verdict = {"version": version, "approved": approved, "checks": checks, "at": _utc_now().isoformat()}
        write_atomically(self._verdict_path(version), json.dumps(verdict, indent=2).encode(), TEMP_PREFIX)

    def verdict(self, version: int) -> dict[str, Any] | None:
        """The gate's verdict on a version: {version, approved, checks, at}, or None if not judged yet."""
        try:
            return json.loads(self._verdict_path(version).read_bytes())
        except FileNotFoundError:
            return None

    # -------------------------------------------------------- internals

    @property
    def _live_path(self) -> Path:
        return self.root / "live.json"

    @property
    def _history_path(self) -> Path:
        return self.root / "history.jsonl"

    def _version_dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def _verdict_path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.verdict.json"

    def _version_dirs(self) -> Iterator[tuple[int, Path]]:
        for path in self.root.iterdir():
            if (match := _VERSION_DIR.fullmatch(path.name)) and path.is_dir():
                yield int(match.group(1)), path

    def _highest_version_number(self) -> int:
        """The highest version number in use, complete or not (0 for none): never reused."""
        return max((v for v, _ in self._version_dirs()), default=0)

    def _require(self, version: int) -> None:
        if version not in self.versions():
            raise ValueError(f"policy version {version} does not exist in {self.root} (latest is {self.latest()})")

    def seed(self, model_dir: Path) -> LiveRecord:
        """The live record; an empty registry first gets `model_dir` as version 1, live.

        Every process calls this at start-up; the first one seeds, the others wait and find it done.
        """
        with self._lock(".seed.lock"):
            live = self.live()
            if live is None:
                manifest = self.publish(model_dir, parent_version=None, training_step=0, metrics={})
                live = self.set_live(manifest.version, reason=f"seeded from {model_dir}", kind="initial")
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
