"""Host-to-device copies of per-step inputs without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory and waits for the stream: a
host sync per tensor, which stalls the CPU behind the GPU's queued work. On CUDA the values go to
pinned memory (the caching host allocator reuses it safely once the copy is done) and are copied
with non_blocking=True, so the copy is queued behind the work already on the stream; on other
devices this is a plain tensor constructor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a flat or nested list) as a tensor on `device`, copied asynchronously on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
