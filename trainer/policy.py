"""The policy's published versions on the coordinator's disk, and models loaded from them.

The trainer exports each new version as an HF folder in the pool's dtype: exactly the weights
SHARDCAST ships and nodes generate with. Validators load the version a submission claims from
that folder, never from the trainer's live (fp32, being-updated) weights.
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
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from toploc.models import resolve_dtype


class PolicyStore:
    def __init__(self, root: Path, dtype: str, keep: int, cache_models: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = resolve_dtype(dtype)
        self.keep = keep
        self.cache_models = cache_models
        self._models: OrderedDict[int, PreTrainedModel] = OrderedDict()
        self._lock = threading.Lock()

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*") if (p / "config.json").exists())

    def export(self, model: PreTrainedModel, tokenizer: Any, version: int) -> Path:
        """Write `model` cast to the pool dtype as version `version` (atomically), and prune
        versions beyond `keep`."""
        target = self.folder(version)
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.root))
        hf_logging.disable_progress_bar()  # one bar per step would flood the coordinator's log
        try:
            published = copy.deepcopy(model).to(self.dtype).eval()
            published.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.versions()[: -self.keep]:
            shutil.rmtree(self.folder(old), ignore_errors=True)
            with self._lock:
                self._models.pop(old, None)
        return target

    def model(self, version: int) -> PreTrainedModel | None:
        """The model of `version`, loaded once and kept in a small LRU; None if not held."""
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
        folder = self.folder(version)
        if not (folder / "config.json").exists():
            return None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with self._lock:
            self._models[version] = model
            while len(self._models) > self.cache_models:
                self._models.popitem(last=False)
        return model

    @torch.no_grad()
    def latest_model(self) -> tuple[int, PreTrainedModel] | None:
        versions = self.versions()
        if not versions:
            return None
        model = self.model(versions[-1])
        return (versions[-1], model) if model is not None else None
