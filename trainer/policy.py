"""The policy's published versions on the coordinator's disk, and models loaded from them.

The trainer exports each new version as an HF folder in the pool's dtype: exactly the weights
SHARDCAST ships and nodes generate with. Validators load the version a submission claims from
that folder, never from the trainer's live (fp32, being-updated) weights.

With LoRA (the trainer's model is a peft model), the first version exported is the base, a
full folder kept for as long as any adapter version applies to it; every later version holds
only the adapters, bound to the base's file hashes (`toploc/versions.py`, which loads both
kinds, for validators here and for nodes alike).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from toploc.models import resolve_dtype
from toploc.versions import VersionLoader, adapter_meta, folder_hashes, is_version
from trainer.lora import base_model, save_adapter_version


class PolicyStore:
    def __init__(
        self,
        root: Path,
        dtype: str,
        keep: int,
        cache_models: int,
        device: torch.device | str = "cpu",
    ) -> None:
        """`device`: where loaded models are placed (validators prefill there); versions are
        merged and checked on the CPU first, as nodes do, then moved."""
        self.root = Path(root)
        self.device = torch.device(device)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = resolve_dtype(dtype)
        self.keep = keep
        self.cache_models = cache_models
        self._models: OrderedDict[int, PreTrainedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loader = VersionLoader(self.dtype, reuse_base=False, find_base=self._held)
        self._base_files: dict[int, dict[str, str]] = {}
        """File hashes of LoRA base versions, computed once (the base never changes)."""

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*") if is_version(p))

    def _held(self, version: int) -> Path | None:
        folder = self.folder(version)
        return folder if is_version(folder) else None

    def lora_base(self) -> int | None:
        """The base version adapter versions apply to: the newest full version held."""
        full = [v for v in self.versions() if adapter_meta(self.folder(v)) is None]
        return full[-1] if full else None

    def export(self, model: PreTrainedModel, tokenizer: Any, version: int) -> Path:
        """Write `model` cast to the pool dtype as version `version` (atomically), and prune
        versions beyond `keep` (never a base that a kept adapter version applies to)."""
        target = self.folder(version)
        if is_version(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.root))
        hf_logging.disable_progress_bar()  # one bar per step would flood the coordinator's log
        try:
            base = self.lora_base() if isinstance(model, PeftModel) else None
            if base is not None:
                if base not in self._base_files:
                    self._base_files[base] = folder_hashes(self.folder(base))
                save_adapter_version(model, tmp, self.dtype, base, self._base_files[base])
            else:
                self._write_full(model, tokenizer, tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return target

    def _write_full(self, model: PreTrainedModel, tokenizer: Any, folder: Path) -> None:
        if isinstance(model, PeftModel):
            published = base_model(model, self.dtype)  # the base: adapters come later
        else:
            published = copy.deepcopy(model).to(self.dtype).eval()
        published.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def _prune(self) -> None:
        if self.keep <= 0:  # a reader of the store (validator workers): the coordinator prunes
            return
        kept = self.versions()[-self.keep :]
        metas = [adapter_meta(self.folder(v)) for v in kept]
        pinned = {m.base_version for m in metas if m is not None}
        for old in self.versions():
            if old in kept or old in pinned:
                continue
            shutil.rmtree(self.folder(old), ignore_errors=True)
            with self._lock:
                self._models.pop(old, None)

    def model(self, version: int) -> PreTrainedModel | None:
        """The model of `version`, loaded once and kept in a small LRU; None if not held."""
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
        model = self.load(version)
        if model is None:
            return None
        with self._lock:
            self._models[version] = model
            while len(self._models) > self.cache_models:
                self._models.popitem(last=False)
        return model

    def load(self, version: int) -> PreTrainedModel | None:
        """A model of its own for `version` (adapters merged onto the base); None if not held."""
        folder = self._held(version)
        return None if folder is None else self._loader.load(folder).to(self.device)

    @torch.no_grad()
    def latest_model(self) -> tuple[int, PreTrainedModel] | None:
        versions = self.versions()
        if not versions:
            return None
        model = self.model(versions[-1])
        return (versions[-1], model) if model is not None else None
