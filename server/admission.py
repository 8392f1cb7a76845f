"""Bounded admission: at most `max_in_flight` requests in the engine, at most `max_queued` waiting.

Admission can also be paused (for a weight swap): new requests wait in the queue, and the
pause begins once every running request has finished, so no request ever spans two policies.

With principals (API keys), one principal may hold at most `max_per_principal` of the running and
waiting places together, so one tenant flooding the server leaves room for the others.
"""

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """No engine slot and the wait queue is full; maps to RESOURCE_EXHAUSTED."""


class AdmissionController:
    def __init__(self, max_in_flight: int, max_queued: int, max_per_principal: int | None = None):
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.max_per_principal = max_per_principal
        self._held_by: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pause_lock = asyncio.Lock()
        self.in_flight = 0
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self, principal: str = "") -> AsyncIterator[None]:
        """Hold an engine slot for the body; raise Overloaded at once when the queue, or the principal's share, is full."""
        if (self._slots.locked() or not self._open.is_set()) and self.queued >= self.max_queued:
            raise Overloaded(
                f"server is at capacity: {self.in_flight} requests running and {self.queued} queued "
                f"(limits {self.max_in_flight} and {self.max_queued}); retry later"
            )
        if self.max_per_principal is not None and self._held_by[principal] >= self.max_per_principal:
            raise Overloaded(
                f"principal {principal} has {self._held_by[principal]} requests running or queued, its most "
                f"(server.max_principal_share of the server's places); retry later"
            )
        self._held_by[principal] += 1
        try:
            async with self._engine_slot():
                yield
        finally:
            self._held_by[principal] -= 1
            if not self._held_by[principal]:
                del self._held_by[principal]

    @contextlib.asynccontextmanager
    async def _engine_slot(self) -> AsyncIterator[None]:
        self.queued += 1
        try:
            while True:
                await self._open.wait()
                await self._slots.acquire()
                if self._open.is_set():
                    break
                self._slots.release()  # a pause began while this request waited for its slot
        finally:
            self.queued -= 1
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            self._slots.release()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Run the body with no request in the engine: stop admitting, drain, resume after."""
        async with self._pause_lock:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()
