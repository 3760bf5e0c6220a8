"""A real pool (coordinator, two honest nodes, one cheating node, all separate processes) and a
real headless Chromium driven by Playwright, shared by the dashboard tests of this folder.

Skipped only when no Chromium binary exists (`apt-get install chromium`); Playwright itself is a
dev dependency and must be installed. Screenshots go to tests/browser/output/ (or
$SWARMRL_BROWSER_OUT).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.pool import Coordinator, Node, start_relaying_nodes

CHROMIUM = (
    os.environ.get("SWARMRL_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
TOKEN = "operator-secret-for-tests"
OUTPUT = Path(os.environ.get("SWARMRL_BROWSER_OUT", Path(__file__).parent / "output"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A developer without a browser may skip these; CI (which installs Chromium) never does:
    # there a missing browser fails the tests instead of hiding them.
    if CHROMIUM or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="no chromium binary found (apt-get install chromium)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@dataclass
class Pool:
    coordinator: Coordinator
    honest: list[Node]
    cheater: Node
    base: str
    relay_url: str

    def api(self, path: str) -> Any:
        return self.coordinator.api(path)

    def node_key(self, node: Node) -> str:
        """The hex public key in a node's key file."""
        from protocol.identity import Identity

        return Identity.load(node.home / f"{node.name}.key").public_key.hex()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("pool")
    coordinator = Coordinator.create(tmp)
    nodes: list[Node] = []
    try:
        # No step limit: the pool trains until the module ends. Nodes leave a finished pool,
        # alice's relay with them, and a CI run slow enough to pass 12 steps before the
        # weights test found no relay to show and only the cheater's late rejections.
        coordinator.start(args=["--operator-token", TOKEN])
        # alice also re-serves the weights on a known port, so the relay tree has a relay in it
        relay_port = start_relaying_nodes(coordinator, tmp / "nodes", nodes)
        *honest, cheater = nodes
        coordinator.wait_for(
            lambda s: s["step"] >= 1 and s["counts"]["banned"] >= 1, 240, "a step and a ban"
        )
        yield Pool(
            coordinator,
            honest,
            cheater,
            f"http://127.0.0.1:{coordinator.http_port}",
            f"http://127.0.0.1:{relay_port}",
        )
    finally:
        for n in nodes:
            n.kill()
        coordinator.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@dataclass
class Watched:
    """A page, with every console error, uncaught exception, failed or non-2xx request and
    off-site request it saw."""

    page: Any
    base: str
    problems: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    def goto(self, route: str) -> None:
        self.page.goto(f"{self.base}/{route}")
        self.wait_loaded()

    def wait_loaded(self, name: str | None = None, times: int = 1) -> None:
        """Wait until the shown page (optionally `name`) has fetched its data `times` times."""
        check = f"document.getElementById('page').dataset.page === '{name}' && " if name else ""
        self.page.wait_for_function(
            f"{check}Number(document.body.dataset.loaded || 0) >= {times}", timeout=30_000
        )

    def shot(self, name: str) -> Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        path = OUTPUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a in p for a in self.allowed)]


@pytest.fixture
def page(browser: Any, pool: Pool) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    w = Watched(pg, pool.base)

    def on_console(m: Any) -> None:
        if m.type == "error":
            w.problems.append(f"console: {m.text}")

    def on_request(r: Any) -> None:
        if not r.url.startswith((pool.base, "data:")):
            w.problems.append(f"off-site request: {r.url}")

    def on_response(r: Any) -> None:
        if r.status >= 400:
            w.problems.append(f"HTTP {r.status}: {r.request.method} {r.url}")

    pg.on("console", on_console)
    pg.on("pageerror", lambda e: w.problems.append(f"page error: {e}"))
    pg.on("requestfailed", lambda r: w.problems.append(f"failed: {r.url} {r.failure}"))
    pg.on("request", on_request)
    pg.on("response", on_response)
    yield w
    # Let in-flight polls land, so an error they cause is seen by the test that caused it.
    time.sleep(0.2)
    context.close()
    assert not w.unexpected(), "\n".join(w.unexpected())
