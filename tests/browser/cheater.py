"""A byzantine node for the dashboard tests: the real node, except that it shifts every
completion token by one before proving and signing. The coordinator's TOPLOC check catches it
(hard rejects with numbers), and its reputation falls until it is banned with evidence.

    python -m tests.browser.cheater join --pool ID --bootstrap ADDR ...   (as `node join`)
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from node import worker
from node.behaviour import Behaviour


class ShiftTokens(Behaviour):
    name = "shift-tokens"

    def generate(self, engine: Any, lease: Any) -> list[Any]:
        results = engine.generate(lease)
        return [
            msgspec.structs.replace(
                r,
                completions=[
                    msgspec.structs.replace(c, tokens=[t - 1 if t > 0 else t + 1 for t in c.tokens])
                    for c in r.completions
                ],
            )
            for r in results
        ]


def main() -> int:
    honest_init = worker.Worker.__init__

    def init(self: worker.Worker, *args: Any, **kwargs: Any) -> None:
        kwargs["behaviour"] = ShiftTokens()
        honest_init(self, *args, **kwargs)

    worker.Worker.__init__ = init
    from node.cli import main as node_main

    return node_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
