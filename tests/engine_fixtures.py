"""One real vLLM engine per test session, owned by an asyncio loop in a background thread.

gRPC servers under test run on that loop; tests talk to them as ordinary clients over loopback.
vLLM is imported when an engine starts, not with this module: the fast tier imports it (conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cli.config import REPO_ROOT
from server.config import EngineSettings

if TYPE_CHECKING:
    from flywheel.adapters import PolicySettings
    from server.engine import PolicyEngine

T = TypeVar("T")


class EngineLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def test_model_path() -> Path:
    """The demo model, built once into the repo's cache (FLYWHEEL_TEST_MODEL points elsewhere)."""
    if override := os.environ.get("FLYWHEEL_TEST_MODEL"):
        return Path(override)
    from flywheel.demo.init_model import ensure_demo_model

    return ensure_demo_model(REPO_ROOT / ".cache" / "demo-model")


def start_engine(engine_loop: EngineLoop, model_path: Path, policy: PolicySettings | None = None) -> PolicyEngine:
    """An engine for the tests: float32, a small KV cache; `policy` as in `PolicyEngine.start` (adapters)."""
    from server.engine import PolicyEngine

    settings = EngineSettings(dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20)

    async def start() -> PolicyEngine:
        return PolicyEngine.start(settings, str(model_path), policy)

    return engine_loop.run(start())
