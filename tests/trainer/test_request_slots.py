"""The API's request slots (`trainer.request_slots`): bounded in total and per client, a
client's extra requests queued behind its own, only the wait bounded."""

from __future__ import annotations

import httpx
import pytest
import trio

from trainer.request_slots import RequestSlots

pytestmark = pytest.mark.trio


class Gate:
    """An ASGI app that holds every request until opened, counting those it holds."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.running: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        who = scope["client"][0]
        self.running[who] = self.running.get(who, 0) + 1
        await self.open.wait()
        self.running[who] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def client(app, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30)


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


async def test_one_client_cannot_take_every_slot_and_a_wait_is_bounded():
    gate = Gate()
    slots = RequestSlots(gate, total=3, per_client=2, wait_s=0.5)
    codes: dict[str, list[int]] = {"greedy": [], "other": []}

    async def get(http: httpx.AsyncClient, name: str) -> None:
        codes[name].append((await http.get("/api/status")).status_code)

    async with (
        client(slots, "198.51.100.1") as greedy,
        client(slots, "198.51.100.2") as other,
        trio.open_nursery() as nursery,
    ):
        for _ in range(4):
            nursery.start_soon(get, greedy, "greedy")
        await wait_until(lambda: gate.running.get("198.51.100.1") == 2)
        # the greedy client's other two wait for its own slots, not for the last free one
        nursery.start_soon(get, other, "other")
        nursery.start_soon(get, other, "other")
        await wait_until(lambda: gate.running.get("198.51.100.2") == 1)
        assert slots.in_progress() == 3
        # past `wait_s` whoever still waits is told to come back; those running go on
        await wait_until(lambda: len(codes["greedy"]) == 2 and len(codes["other"]) == 1)
        assert codes == {"greedy": [503, 503], "other": [503]}
        gate.open.set()
    assert codes == {"greedy": [503, 503, 200, 200], "other": [503, 200]}
    assert slots.in_progress() == 0 and not slots._clients and not slots._waiting


async def test_a_request_that_runs_past_the_wait_is_not_cut():
    gate = Gate()
    slots = RequestSlots(gate, total=1, per_client=1, wait_s=0.05)
    results = []
    async with client(slots, "198.51.100.1") as http, trio.open_nursery() as nursery:

        async def get() -> None:
            results.append((await http.get("/")).status_code)

        nursery.start_soon(get)
        await trio.sleep(0.2)  # four times the wait
        gate.open.set()
    assert results == [200]


async def test_per_client_must_fit_in_total():
    with pytest.raises(ValueError):
        RequestSlots(Gate(), total=2, per_client=3)
