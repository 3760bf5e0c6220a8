"""Command-line overrides of TOML configuration: `--set section.key=value`.

Values are parsed as TOML scalars or arrays (`3`, `1e-5`, `true`, `"text"`, `[1, 2]`); anything
that does not parse as TOML is taken as a bare string, so `--set model.name=tiny` works.
"""

from __future__ import annotations

import tomllib
from typing import Any

from protocol.errors import SwarmError


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `tree` with each `dotted.key=value` override applied."""
    out = _deep_copy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SwarmError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SwarmError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = parse_value(raw.strip())
    return out


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
