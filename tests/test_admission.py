"""Admission: bounded running and waiting requests, and no principal holding more than its places."""

import asyncio

import pytest

from server.admission import AdmissionController, Overloaded


async def hold(admission: AdmissionController, principal: str, release: asyncio.Event) -> None:
    async with admission.slot(principal):
        await release.wait()


def test_one_principal_cannot_take_every_place():
    async def scenario() -> None:
        admission = AdmissionController(max_in_flight=2, max_queued=2, max_per_principal=2)
        release = asyncio.Event()
        mallory = [asyncio.create_task(hold(admission, "mallory", release)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="principal mallory has 2 requests"):
            async with admission.slot("mallory"):
                pass
        acme = [asyncio.create_task(hold(admission, "acme", release)) for _ in range(2)]
        await asyncio.sleep(0)
        assert (admission.in_flight, admission.queued) == (2, 2), "acme's two requests hold the places left"
        release.set()
        await asyncio.gather(*mallory, *acme)
        assert (admission.in_flight, admission.queued) == (0, 0)

    asyncio.run(scenario())


def test_without_principals_there_is_no_share():
    async def scenario() -> None:
        admission = AdmissionController(max_in_flight=1, max_queued=3)
        release = asyncio.Event()
        held = [asyncio.create_task(hold(admission, "", release)) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="at capacity"):
            async with admission.slot(""):
                pass
        release.set()
        await asyncio.gather(*held)

    asyncio.run(scenario())
