"""A node's seeder that fails is started again on the same port (`node.seeding.keep_seeding`);
one that cannot start at all is an error."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from node.seeding import keep_seeding


class Seeder:
    """Stands in for `shardcast.relay.Relay`: really listens on a TCP port, then fails (when
    told to) or serves until cancelled. Every one made is in `MADE`."""

    def __init__(self, fail: bool, fail_to_start: bool = False) -> None:
        self.fail, self.fail_to_start = fail, fail_to_start
        self.port: int | None = None
        MADE.append(self)

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.fail_to_start:
            raise OSError("address already in use")
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(f"http://{host}:{self.port}")
            if self.fail:
                await trio.sleep(0.01)
                raise FileNotFoundError("a pruned version's folder")
            await trio.sleep_forever()
        finally:
            for listener in listeners:
                await listener.aclose()


MADE: list[Seeder] = []


@pytest.fixture(autouse=True)
def _fresh() -> None:
    MADE.clear()


@pytest.mark.trio
async def test_a_failed_seeder_is_started_again_on_the_same_port() -> None:
    def make() -> Seeder:
        return Seeder(fail=len(MADE) < 2)  # the first two fail

    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(keep_seeding, make, "127.0.0.1", 0, restart_s=0.01))
        with trio.fail_after(10):
            while len(MADE) < 3 or MADE[2].port is None:
                await trio.sleep(0.01)
        ports = [s.port for s in MADE]
        assert url == f"http://127.0.0.1:{ports[0]}"
        assert ports == [ports[0]] * 3
        await trio.sleep(0.1)
        assert len(MADE) == 3  # the healthy one is left to serve
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_seeder_that_cannot_start_is_an_error() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        await keep_seeding(lambda: Seeder(fail=False, fail_to_start=True), "127.0.0.1", 0)
    assert caught.group_contains(OSError, match="address already in use")
    assert len(MADE) == 1
