"""Bounded admission: at most `max_in_flight` requests in the engine, at most `max_queued` waiting."""

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """No engine slot and the wait queue is full; maps to RESOURCE_EXHAUSTED."""


class AdmissionController:
    def __init__(self, max_in_flight: int, max_queued: int):
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold an engine slot for the body; raise Overloaded at once when the queue is full."""
        if self._slots.locked() and self.queued >= self.max_queued:
            raise Overloaded(
                f"server is at capacity: {self.in_flight} requests running and {self.queued} queued "
                f"(limits {self.max_in_flight} and {self.max_queued}); retry later"
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
