"""The node's configuration: defaults < TOML file < environment < command line."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from protocol.config import apply_overrides
from protocol.errors import SwarmError
from protocol.paths import swarmrl_home

BOOTSTRAP_ENV = "SWARMRL_BOOTSTRAP"


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str = ""
    """ed25519 key file; created on first use. Default: $SWARMRL_HOME/node.key."""
    data_dir: str = ""
    """Weights cache and state. Default: $SWARMRL_HOME/node."""
    bootstrap: list[str] = []
    """libp2p multiaddrs of pool members to dial first; also $SWARMRL_BOOTSTRAP."""
    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    engine: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    max_batch: Annotated[int, msgspec.Meta(ge=1)] = 32
    relay_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """Also serve the weight shards this node holds on this HTTP port."""
    relay_host: str = "127.0.0.1"
    """Address the relay binds and announces (a public address for nodes elsewhere)."""
    nat: Literal["auto", "on", "off"] = "auto"
    """Serve held weights over libp2p, through the coordinator's relay hop, instead of HTTP:
    auto when the coordinator's dial-back check says this node cannot be dialled."""

    def resolved(self) -> NodeConfig:
        home = swarmrl_home()
        return msgspec.structs.replace(
            self,
            key=str(Path(self.key or home / "node.key").expanduser()),
            data_dir=str(Path(self.data_dir or home / "node").expanduser()),
        )


def default_config_path() -> Path:
    return swarmrl_home() / "node.toml"


def load_node_config(
    path: Path | None = None, flags: dict[str, Any] | None = None, overrides: list[str] = ()
) -> NodeConfig:
    """Merge the layers: a TOML file (explicit, or the default one if present), the
    environment, flags given on the command line (None means not given), then `--set` items."""
    tree: dict[str, Any] = {}
    file = path or default_config_path()
    if path is not None or file.exists():
        try:
            tree = tomllib.loads(Path(file).read_text())
        except OSError as e:
            raise SwarmError(f"cannot read node config {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SwarmError(f"node config {file} is not valid TOML: {e}") from None
    if env := os.environ.get(BOOTSTRAP_ENV, "").split():
        tree["bootstrap"] = env
    tree.update({k: v for k, v in (flags or {}).items() if v not in (None, [])})
    tree = apply_overrides(tree, list(overrides))
    try:
        return msgspec.convert(tree, NodeConfig).resolved()
    except msgspec.ValidationError as e:
        raise SwarmError(f"invalid node configuration: {e}") from None
