"""Policy weights on disk."""

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_digest(model_dir: Path) -> str:
    """sha256, hex, over the names and bytes of the weight files in model_dir, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as weights:
            while chunk := weights.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
