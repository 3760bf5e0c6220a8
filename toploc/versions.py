"""Loading a published version: a full HF folder, or LoRA adapters merged onto their base.

With LoRA, only the base version is a full folder; every later version holds the adapters
(`adapter_model.safetensors`), their peft config, and `lora_base.json`: the base version they
apply to and the BLAKE3 hash of each of the base's files. That file is part of the signed
version, so an adapter version is bound to exact base bytes, and a base that is missing or
differs is refused rather than merged onto.

Nodes and validators both load through `VersionLoader`, so they prefill with the same weights:
the merge `W + scale * (B @ A)` runs on the CPU in float64 as elementwise products summed over
the rank in a fixed order, then rounds once to the weight's dtype. Elementwise IEEE operations
give the same bits on every machine, so the merged weights do not depend on the device, the
BLAS library or the thread count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from toploc.hub import ModelError

ADAPTER_FILE = "adapter_model.safetensors"
META_FILE = "lora_base.json"
# peft's key for adapter weights: `base_model.model.<module>.lora_A.weight`.
_PEFT_PREFIX = "base_model.model."
_HASH_CHUNK = 16 * 1024 * 1024

BaseFinder = Callable[[int], Path | None]
"""Where the folder of a base version is held (None when it is not)."""


def sibling_versions(folder: Path) -> BaseFinder:
    """A finder for versions held beside `folder` as `v{N}` (the SHARDCAST client's layout)."""

    def find(version: int) -> Path | None:
        path = Path(folder).parent / f"v{version}"
        return path if path.is_dir() else None

    return find


class BaseVersionError(ModelError):
    """An adapter version's base cannot be used: missing, or not the bytes it was made for."""


class BaseMissingError(BaseVersionError):
    pass


class BaseMismatchError(BaseVersionError):
    pass


@dataclass(frozen=True)
class AdapterMeta:
    base_version: int
    base_files: dict[str, str]
    """Each file of the base folder (relative path) and its BLAKE3 hash."""
    scale: float
    """peft's scaling of B @ A (alpha / rank)."""


def hash_file(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """The BLAKE3 hash of every file under `folder`, by relative POSIX path."""
    return {
        p.relative_to(folder).as_posix(): hash_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_meta(folder: Path, base_version: int, base_files: dict[str, str], scale: float) -> None:
    """Bind the adapter version in `folder` to the base files `base_files` (`folder_hashes`)."""
    meta = {"base_version": base_version, "base_files": base_files, "scale": scale}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))


def adapter_meta(folder: Path) -> AdapterMeta | None:
    """The base binding of an adapter version; None for a full version."""
    path = Path(folder) / META_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return AdapterMeta(int(raw["base_version"]), dict(raw["base_files"]), float(raw["scale"]))


def is_version(folder: Path) -> bool:
    """Whether `folder` holds a complete version (full or adapters)."""
    return (folder / "config.json").exists() or (folder / META_FILE).exists()


def check_base(meta: AdapterMeta, base_folder: Path | None) -> Path:
    """`base_folder` if it holds exactly the files `meta` names (extra files aside)."""
    if base_folder is None or not base_folder.is_dir():
        raise BaseMissingError(
            f"this adapter version applies to base version v{meta.base_version}, which is not "
            "held here; fetch the base version first"
        )
    root = base_folder.resolve()
    for name, want in meta.base_files.items():
        path = base_folder / name
        if not path.resolve().is_relative_to(root):
            raise BaseMismatchError(f"the base binding names {name!r}, outside the base folder")
        got = hash_file(path) if path.is_file() else "missing"
        if got != want:
            raise BaseMismatchError(
                f"base version v{meta.base_version} at {base_folder}: {name} is {got[:16]}, the "
                f"adapter version was made for {want[:16]}; refusing to merge onto other weights"
            )
    return base_folder


def merged_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`weight + scale * (b @ a)` on the CPU, rounded once to `weight`'s dtype; the same bits
    on every machine (see the module docstring)."""
    a64, b64 = a.cpu().double(), b.cpu().double()
    delta = torch.zeros(b64.shape[0], a64.shape[1], dtype=torch.float64)
    for r in range(a64.shape[0]):
        delta += torch.outer(b64[:, r], a64[r])
    return (weight.detach().cpu().double() + delta * scale).to(weight.dtype)


def adapter_pairs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name in the base model -> (A, B) from the adapter file."""
    tensors = load_file(Path(folder) / ADAPTER_FILE)
    pairs = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        pairs[f"{module}.weight"] = (a, b)
    return pairs


class VersionLoader:
    """Loads published versions into models, merging adapter versions onto their base.

    With `reuse_base` (one engine that swaps versions), the model of an adapter version is
    kept and the next adapter version on the same base only re-merges the adapted weights from
    their base values, kept in memory: the base folder need not stay on disk after the first
    merge. Without it (validators, which hold several versions at once), every load returns a
    model of its own. `find_base` defaults to versions held beside the loaded folder.
    """

    def __init__(
        self, dtype: torch.dtype | str, reuse_base: bool, find_base: BaseFinder | None = None
    ) -> None:
        self.dtype = dtype
        self.reuse_base = reuse_base
        self.find_base = find_base
        self.config_folder: Path | None = None
        """The folder the last model's config and tokenizer came from (adapters: the base)."""
        self._held: tuple[AdapterMeta, PreTrainedModel] | None = None
        """With `reuse_base`: the base of the last adapter version and the model it is in."""
        self._originals: dict[str, torch.Tensor] = {}
        """Base values of the weights merged into the held model."""

    def load(self, folder: Path) -> PreTrainedModel:
        folder = Path(folder)
        meta = adapter_meta(folder)
        if meta is None:
            return self._from_pretrained(folder)
        model = self._base_model(meta, self.find_base or sibling_versions(folder))
        originals = self._originals if self.reuse_base else {}
        params = dict(model.named_parameters())
        pairs = adapter_pairs(folder)
        unfit = sorted(
            name
            for name, (a, b) in pairs.items()
            if name not in params or params[name].shape != (b.shape[0], a.shape[1])
        )
        if unfit:
            raise BaseMismatchError(f"adapters that fit no weight of the base: {unfit[:3]}")
        with torch.no_grad():
            for name, (a, b) in pairs.items():
                original = originals.setdefault(name, params[name].detach().cpu().clone())
                params[name].copy_(merged_weight(original, a, b, meta.scale))
        return model

    def _base_model(self, meta: AdapterMeta, find_base: BaseFinder) -> PreTrainedModel:
        """The base `meta` names: the one kept from the last load when it is the same."""
        if self._held is not None:
            held_meta, held_model = self._held
            if (held_meta.base_version, held_meta.base_files) == (
                meta.base_version,
                meta.base_files,
            ):
                return held_model
        model = self._from_pretrained(check_base(meta, find_base(meta.base_version)))
        if self.reuse_base:
            self._held, self._originals = (meta, model), {}
        return model

    def _from_pretrained(self, folder: Path) -> PreTrainedModel:
        if self.config_folder is not None:
            # The first load may be long (a big model) and keeps its progress bar; a bar per
            # version after it filled a node's log (98 lines in a 60 s run of the tiny pool).
            hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).eval()
        self.config_folder = folder
        for p in model.parameters():
            p.requires_grad_(False)
        return model
