"""A swarmrl host in its own OS process, for the integration tests.

    python tests/protocol/helpers/peer_process.py --seed HEX --role ROLE [options]

Roles:

- `echo` (needs `--pool`): serves `/swarmrl-test/echo/1`; with `--call MULTIADDR` also calls
  that peer's echo protocol once and prints `CALLED <n> <signer hex>`.
- `coordinator`: makes a pool spec naming its own key, serves discovery with its signed record
  and the echo protocol; prints `POOL <pool id>`.
- `member` (needs `--pool`, `--bootstrap`): discovers the pool through `--bootstrap`, then
  serves discovery with what it learned.
- `publisher` (needs `--pool`, `--topic`): gossips `Announcement(version=1, 2, ...)` every
  0.2 s.
- `forwarder` (needs `--pool`, `--topic`, `--connect`): connects to `--connect`, subscribes to
  the topic (accepting any signer, so it forwards), and gossips its own, unauthorised
  `Announcement(version=666)` every 0.2 s.

Every role prints `ADDR <multiaddr>` once it listens, then runs until its stdin closes, so it
dies with the test that started it even if that test crashes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import ClassVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for `protocol`

from protocol import poolspec
from protocol.discovery import PoolBook, discover, make_pool_record, serve_discovery
from protocol.envelope import Verified
from protocol.host import Host
from protocol.identity import Identity
from protocol.wire import Message

ECHO_PROTOCOL = "/swarmrl-test/echo/1"


class Echo(Message, tag="test-echo"):
    max_bytes: ClassVar[int] = 1024 * 1024
    n: int
    data: bytes = b""


class EchoReply(Message, tag="test-echo-reply"):
    max_bytes: ClassVar[int] = 1024 * 1024
    n: int
    signer: bytes
    size: int


class Announcement(Message, tag="test-announcement"):
    max_bytes: ClassVar[int] = 4096
    version: int


async def echo(request: Verified[Echo]) -> EchoReply:
    # Answer with who signed the request, so the caller can check the link key == signer.
    return EchoReply(n=request.message.n + 1, signer=request.signer, size=len(request.message.data))


def coordinator_spec(identity: Identity) -> poolspec.PoolSpec:
    return poolspec.from_dict(
        {"name": "process-pool", "coordinator": {"public_key": identity.public_key.hex()}}
    )


class PeerProcess:
    """Test side: start this script as a child process, read its lines, stop it.

    `async with PeerProcess(seed=..., role=...) as peer:` then `await peer.line("ADDR")`.
    Leaving the block closes the child's stdin (its signal to stop), then kills it if it has
    not exited within 10 s; `returncode` is checked by the caller if it cares.
    """

    def __init__(self, **options: str) -> None:
        self.argv = [sys.executable, __file__]
        for key, value in options.items():
            self.argv += [f"--{key}", value]
        self.process: trio.Process | None = None
        self._buffer = bytearray()

    async def __aenter__(self) -> PeerProcess:
        import subprocess

        self.process = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        with trio.CancelScope(shield=True):
            await self.process.stdin.aclose()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def line(self, expect: str, timeout_s: float = 30.0) -> list[str]:
        """The next line printed, split; it must start with `expect`."""
        assert self.process is not None
        with trio.fail_after(timeout_s):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"peer exited early after {bytes(self._buffer)!r}")
                self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        words = line.decode().split()
        assert words and words[0] == expect, f"expected {expect}, got {words}"
        return words[1:]


async def wait_for_stdin_eof() -> None:
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def run(args: argparse.Namespace) -> None:
    identity = Identity(bytes.fromhex(args.seed))
    pool = args.pool
    if args.role == "coordinator":
        pool = poolspec.pool_id(coordinator_spec(identity))
    async with Host.open(identity, pool) as host, trio.open_nursery() as nursery:
        host.serve(ECHO_PROTOCOL, echo, Echo, EchoReply)
        if args.role == "coordinator":
            book = PoolBook(pool)
            book.learn(make_pool_record(identity, coordinator_spec(identity), host.addrs))
            serve_discovery(host, book)
            print("POOL", pool, flush=True)
        elif args.role == "member":
            book = PoolBook(pool)
            await discover(host, [args.bootstrap], book=book, timeout_s=20)
            serve_discovery(host, book)
        elif args.role == "publisher":
            nursery.start_soon(publish_forever, host, args.topic, 1)
        elif args.role == "forwarder":
            await host.connect(args.connect)
            nursery.start_soon(forward_forever, host, args.topic)
            nursery.start_soon(publish_forever, host, args.topic, 666)
        print("ADDR", host.addrs[0], flush=True)
        if args.call:
            reply = await host.request(
                args.call, ECHO_PROTOCOL, Echo(n=41), EchoReply, timeout_s=20
            )
            print("CALLED", reply.message.n, reply.signer.hex(), flush=True)
        await wait_for_stdin_eof()
        nursery.cancel_scope.cancel()


async def publish_forever(host: Host, topic: str, version: int) -> None:
    while True:
        await host.publish(topic, Announcement(version=version))
        if version != 666:
            version += 1
        await trio.sleep(0.2)


async def forward_forever(host: Host, topic: str) -> None:
    async with host.subscribe(topic, Announcement) as announcements:
        async for _ in announcements:
            pass  # being subscribed is what makes gossipsub forward; nothing to do here


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", required=True)
    parser.add_argument("--role", default="echo")
    parser.add_argument("--pool")
    parser.add_argument("--call")
    parser.add_argument("--bootstrap")
    parser.add_argument("--connect")
    parser.add_argument("--topic")
    trio.run(run, parser.parse_args())
