"""Writing files so that a crash leaves the old state or the new, never half of one."""

import os
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries (creations, renames), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: bytes, temp_prefix: str = ".tmp-") -> None:
    """Replace `path` with `data`: readers and crashes see the old bytes or the new, never a mix.

    The bytes go to a temporary file named `temp_prefix…` beside `path`, which is fsync'd and renamed.
    """
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix)
    try:
        with os.fdopen(descriptor, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
