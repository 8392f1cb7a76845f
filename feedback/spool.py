"""A durable first-in first-out queue of byte records on local disk.

Records are appended to segment files `<number>.seg`; each is framed as

    length (4 bytes, big-endian) | crc32 of length and payload (4 bytes) | payload

and fsync'd before `append` returns. A crash mid-write leaves a torn last record: it fails its
CRC or runs past the end of the file, and opening the spool cuts it off. Acknowledged segments
are deleted; how far into the first segment records were acknowledged is kept in memory only,
so after a restart that segment is read again from its start (consumers drop the repeats by
event id).

Beside the segments, `Quarantine` keeps what must not wait in the spool and has nowhere else to
go: events Kafka refuses for good whose dead letter it refused too.
"""

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from feedback.config import SpoolSettings
from flywheel.durable import fsync_path

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">II")


class SpoolPosition(NamedTuple):
    """A place in the spool: a segment number and a byte offset in that segment."""

    segment: int
    offset: int


@dataclass(frozen=True)
class SpooledRecord:
    payload: bytes
    end: SpoolPosition  # where the next record starts; pass it to `Spool.ack`


def frame(payload: bytes) -> bytes:
    length = struct.pack(">I", len(payload))
    return FRAME_HEADER.pack(len(payload), zlib.crc32(length + payload)) + payload


def unframe(data: bytes, offset: int = 0) -> Iterator[tuple[bytes, int]]:
    """Yield (payload, end offset) of each intact record from `offset` on; stop at the first torn one."""
    while offset + FRAME_HEADER.size <= len(data):
        length, crc = FRAME_HEADER.unpack_from(data, offset)
        start, end = offset + FRAME_HEADER.size, offset + FRAME_HEADER.size + length
        if length == 0 or end > len(data) or zlib.crc32(data[offset : offset + 4] + data[start:end]) != crc:
            return
        yield data[start:end], end
        offset = end


class SpoolLockedError(RuntimeError):
    pass


class Spool:
    """Append-only segment files under `settings.directory`, bounded by `settings.max_bytes`.

    Not thread-safe: one caller at a time (the producer runs it in a worker thread).
    """

    def __init__(self, settings: SpoolSettings) -> None:
        self._settings = settings
        self._directory = settings.directory
        self._directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self._directory / "lock", "wb")  # noqa: SIM115 (held for the spool's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLockedError(f"spool directory {self._directory} is in use by another process") from None
        self._sizes = {number: self._recover(number) for number in self._segment_numbers()}
        for number in [number for number, size in self._sizes.items() if size == 0 and number != max(self._sizes)]:
            self._path(number).unlink()
            del self._sizes[number]
        if not self._sizes:
            self._sizes[1] = 0
            self._path(1).touch()
            fsync_path(self._directory)
        self._head = SpoolPosition(min(self._sizes), 0)
        self._writer = open(self._path(max(self._sizes)), "ab")  # noqa: SIM115 (held for the spool's life)
        self._refusing = False

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk, acknowledged records of the first segment included."""
        return sum(self._sizes.values())

    @property
    def is_empty(self) -> bool:
        return self._head == SpoolPosition(max(self._sizes), self._sizes[max(self._sizes)])

    def append(self, payloads: Sequence[bytes]) -> int:
        """Write payloads in order and fsync; return how many were taken.

        When the next one would pass max_bytes it and all after it are refused, and a WARNING is
        logged once until a payload is taken again.
        """
        taken = 0
        for payload in payloads:
            if not payload:
                raise ValueError("spool records must not be empty")
            framed = frame(payload)
            if self.size_bytes + len(framed) > self._settings.max_bytes:
                if not self._refusing:
                    log.warning(
                        "spool %s is full (%d of max_bytes %d); dropping events until Kafka takes some back",
                        self._directory,
                        self.size_bytes,
                        self._settings.max_bytes,
                    )
                self._refusing = True
                break
            last = max(self._sizes)
            if self._sizes[last] and self._sizes[last] + len(framed) > self._settings.segment_bytes:
                self._roll()
                last = max(self._sizes)
            self._writer.write(framed)
            self._sizes[last] += len(framed)
            self._refusing = False
            taken += 1
        if taken:
            self._writer.flush()
            os.fsync(self._writer.fileno())
        return taken

    def read(self, max_records: int) -> list[SpooledRecord]:
        """The oldest unacknowledged records, at most `max_records`, without removing them."""
        records: list[SpooledRecord] = []
        for number in sorted(self._sizes):
            if number < self._head.segment:
                continue
            offset = self._head.offset if number == self._head.segment else 0
            data = self._path(number).read_bytes()[: self._sizes[number]]
            for payload, end in unframe(data, offset):
                records.append(SpooledRecord(payload, SpoolPosition(number, end)))
                if len(records) == max_records:
                    return records
        return records

    def ack(self, upto: SpoolPosition) -> None:
        """Forget every record before `upto` (a `SpooledRecord.end`): they are safely elsewhere."""
        done_through = upto.segment if upto.offset == self._sizes[upto.segment] else upto.segment - 1
        last = max(self._sizes)
        for number in [number for number in self._sizes if number <= done_through]:
            if number == last:
                self._writer.truncate(0)
                self._sizes[number] = 0
            else:
                self._path(number).unlink()
                del self._sizes[number]
        self._head = upto if upto.segment > done_through else SpoolPosition(min(self._sizes), 0)

    def close(self) -> None:
        self._writer.close()
        self._lock_file.close()

    def _path(self, number: int) -> Path:
        return self._directory / f"{number:012d}.seg"

    def _segment_numbers(self) -> list[int]:
        return sorted(int(path.stem) for path in self._directory.glob("*.seg"))

    def _recover(self, number: int) -> int:
        """Cut a torn tail off segment `number`; return its intact size in bytes."""
        data = self._path(number).read_bytes()
        intact = max((end for _, end in unframe(data)), default=0)
        if intact < len(data):
            log.warning(
                "spool segment %s ends in a torn record; ignoring its last %d bytes",
                self._path(number),
                len(data) - intact,
            )
            with open(self._path(number), "r+b") as segment:
                segment.truncate(intact)
                os.fsync(segment.fileno())
        return intact

    def _roll(self) -> None:
        self._writer.close()
        number = max(self._sizes) + 1
        self._writer = open(self._path(number), "ab")  # noqa: SIM115 (held for the spool's life)
        self._sizes[number] = 0
        fsync_path(self._directory)


class Quarantine:
    """An append-only file of lines, bounded by `max_bytes`; each line is fsync'd before `append` returns.

    A crash mid-write leaves a last line without its newline; opening the file cuts it off.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        existed = path.exists()
        data = path.read_bytes() if existed else b""
        self._size = data.rfind(b"\n") + 1
        self._file = open(path, "ab")  # noqa: SIM115 (held for the quarantine's life)
        if not existed:
            fsync_path(path.parent)
        if self._size < len(data):
            log.warning("quarantine %s ends in a torn line; ignoring its last %d bytes", path, len(data) - self._size)
            self._file.truncate(self._size)

    @property
    def size_bytes(self) -> int:
        return self._size

    def append(self, line: bytes) -> bool:
        """Write one line (it must not contain a newline) and fsync; False when it would pass max_bytes."""
        if b"\n" in line:
            raise ValueError("a quarantine line must not contain a newline")
        if self._size + len(line) + 1 > self._max_bytes:
            return False
        self._file.write(line + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(line) + 1
        return True

    def close(self) -> None:
        self._file.close()
