"""Models named by a Hugging Face id (`org/name`, optionally `org/name@revision`).

An id resolves through the Hugging Face cache: offline (`HF_HUB_OFFLINE=1`) it works when the
model is cached, online it downloads what is missing. Only the coordinator resolves ids; nodes
get the weights it publishes through SHARDCAST, never from the hub.

`coordinator init` pins the revision it checked (`org/name@<commit>`), so a later `run` loads
the very snapshot `init` inspected even if the hub's main branch moves on.
"""

from __future__ import annotations

import re
from pathlib import Path

from protocol.errors import SwarmError

# Hub ids: `org/name` with the hub's allowed characters, optionally `@revision`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?$")
# What a causal LM needs, and nothing else a repository may also carry (GGUF, ONNX, .bin
# copies of the same weights), so a download fetches one copy.
_WANTED = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ModelError(SwarmError):
    """A model could not be found, exported or loaded."""


class ModelNotFoundError(ModelError):
    """A model id or folder that names nothing this machine can load."""


def is_hub_id(name: str) -> bool:
    """A name shaped like `org/name[@revision]` that is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def split_revision(name: str) -> tuple[str, str | None]:
    repo, _, revision = name.partition("@")
    return repo, revision or None


def resolve_hub_id(name: str) -> Path:
    """The local snapshot folder of a hub id (downloaded into the HF cache when allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = split_revision(name)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_WANTED))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model {name!r} is not in the Hugging Face cache and downloads are off or failed: "
            f"on a machine with network run `hf download {repo}` (or unset HF_HUB_OFFLINE), "
            "or pass a local folder with config.json"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {repo!r} is gated: accept its licence on huggingface.co and log in with "
            "`hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"model {repo!r} has no revision {revision!r}: check the part after '@'"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo!r} does not exist on the Hugging Face hub (or is private: log in "
            "with `hf auth login`); check the id"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"model {name!r} could not be fetched: {e}") from None


def pinned(name: str, folder: Path) -> str:
    """`org/name@<commit>` for a resolved id: the cache names each snapshot by its commit."""
    repo, _ = split_revision(name)
    return f"{repo}@{folder.name}"
