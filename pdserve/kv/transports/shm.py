"""Shared-memory transport: map the peer's KV segment and copy blocks one-sidedly.

The CPU analogue of RDMA READ/WRITE: no message per block, no peer CPU involved. Both caches are
POSIX shared-memory segments (mode 0600) on the same host.
"""

from __future__ import annotations

import os
from multiprocessing import resource_tracker, shared_memory

import torch

from pdserve.engine.kv_cache import OWNED_SEGMENTS
from pdserve.kv.messages import ShmDescriptor
from pdserve.kv.transports.base import TransferError, block_runs, check_ids, copy_blocks


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without adopting it: only its owner may unlink it."""
    try:
        shm = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        raise TransferError(f"shared-memory segment {name!r} does not exist (peer gone?)") from None
    # Python < 3.13 registers attached segments with the resource tracker, which would unlink
    # the peer's segment when this process exits.
    if name not in OWNED_SEGMENTS:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


class ShmTransport:
    name = "shm"

    def __init__(self, local: torch.Tensor, peer: ShmDescriptor, shape: tuple[int, ...]) -> None:
        self.local = local
        self._shm = attach_segment(peer.segment)
        count = 1
        for s in shape:
            count *= s
        if self._shm.size < count * local.element_size():
            raise TransferError("peer segment is smaller than its advertised layout")
        self.remote = torch.frombuffer(self._shm.buf, dtype=local.dtype, count=count).view(shape)
        self._path = f"/dev/shm/{peer.segment.lstrip('/')}"

    def _check_alive(self) -> None:
        # Our mapping outlives the peer: a segment its owner (or, after a kill, the owner's
        # resource tracker) unlinked means the peer is gone, and its blocks are no longer owned.
        if not os.path.exists(self._path):
            raise TransferError("the peer's KV segment is gone (peer exited)")

    def read(self, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str) -> int:
        self._check_alive()
        check_ids(src_block_ids, self.remote.shape[1])
        copy_blocks(self.local, self.remote, block_runs(src_block_ids, dst_block_ids))
        return len(dst_block_ids) * self.local[:, 0].numel() * self.local.element_size()

    def write_layer(
        self, layer: int, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str
    ) -> int:
        self._check_alive()
        check_ids(dst_block_ids, self.remote.shape[1])
        copy_blocks(self.remote, self.local, block_runs(src_block_ids, dst_block_ids), layer)
        return len(dst_block_ids) * self.local[0, 0].numel() * self.local.element_size()

    def close(self) -> None:
        self.remote = torch.empty(0)
        try:
            self._shm.close()
        except BufferError:
            pass
