"""What a node tells the coordinator about its machine when it joins."""

from __future__ import annotations

import os
import platform
import time

import torch

from protocol import messages as msg


def probe(device: str, self_test_s: float = 0.3) -> msg.Hardware:
    """Device, memory, cores, and a short matmul self-test (GFLOP/s, as `tokens_per_s` is only
    known once generating; heartbeats report that)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        props = torch.cuda.get_device_properties(torch.device(device))
        name, memory = props.name, props.total_memory
    else:
        name, memory = platform.processor() or platform.machine(), _system_memory()
    return msg.Hardware(
        device=device,
        device_name=f"{name} ({_gflops(device, self_test_s):.0f} GFLOP/s)"[:256],
        memory_bytes=memory,
        cpu_count=os.cpu_count() or 0,
    )


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gflops(device: str, seconds: float) -> float:
    a = torch.randn(512, 512, device=device)
    b = torch.randn(512, 512, device=device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n * 2 * 512**3 / (time.perf_counter() - t0) / 1e9
