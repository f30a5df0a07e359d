"""CUDA-IPC transport: GPUs of one node map each other's KV cache and copy blocks device-to-device.

The producer (or consumer) exports its cache storage with CUDA IPC handles; the peer opens them
once (at handshake) and copies blocks with plain tensor copies on its own stream, then
synchronises before reporting completion. The handles are bytes and ints on the wire (msgpack),
never pickled tensors.
"""

from __future__ import annotations

import weakref

import torch

from pdserve.kv.messages import CudaIpcDescriptor
from pdserve.kv.transports.base import TransferError, block_runs, check_ids, copy_blocks

# Caches this process exported, by (IPC handle, offset): CUDA cannot open a handle in the process
# that exported it, so a peer engine in the same process (tests, one-process setups) uses the tensor.
_EXPORTED: weakref.WeakValueDictionary[tuple[bytes, int], torch.Tensor] = weakref.WeakValueDictionary()


def export_cache(cache: torch.Tensor) -> CudaIpcDescriptor:
    """IPC handles of a CUDA cache tensor (which must own its whole storage)."""
    (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
        cache.untyped_storage()._share_cuda_()
    )
    _EXPORTED[(bytes(handle), int(offset))] = cache
    props = torch.cuda.get_device_properties(device)
    return CudaIpcDescriptor(
        device=int(device), handle=bytes(handle), size_bytes=int(size), offset_bytes=int(offset),
        ref_counter_handle=bytes(ref_handle), ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle or b""), event_sync_required=bool(event_sync),
        device_uuid=str(getattr(props, "uuid", device)),
    )


def open_cache(desc: CudaIpcDescriptor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device):
    local = _EXPORTED.get((desc.handle, desc.offset_bytes))
    if local is not None:  # exported by this very process
        return local.view(dtype).view(shape)
    # Every argument is type-checked (torch's THPStorage_newSharedCuda): the event handle must be
    # bytes even when no event is to be waited on (None is refused with a TypeError).
    storage = torch.UntypedStorage._new_shared_cuda(
        int(desc.device), bytes(desc.handle), int(desc.size_bytes), int(desc.offset_bytes),
        bytes(desc.ref_counter_handle), int(desc.ref_counter_offset), bytes(desc.event_handle),
        bool(desc.event_sync_required),
    )
    t = torch.empty(0, dtype=dtype, device=device)
    t.set_(storage, 0, shape)
    return t


class CudaIpcTransport:
    name = "cuda_ipc"

    def __init__(self, local: torch.Tensor, peer: CudaIpcDescriptor, shape: tuple[int, ...]) -> None:
        if local.device.type != "cuda":
            raise TransferError("the cuda_ipc transport needs the KV cache on a CUDA device")
        self.local = local
        try:
            self.remote = open_cache(peer, local.dtype, shape, local.device)
        except (RuntimeError, TypeError) as e:
            raise TransferError(f"cannot open the peer's CUDA IPC handle: {e}") from None
        self._stream = torch.cuda.Stream(local.device)

    def _run(self, dst: torch.Tensor, src: torch.Tensor, runs, layer: int | None) -> None:
        # Order the copy after the work the engine thread has queued on the device's default stream
        # so far: in write mode the layer's KV writes are queued, not yet done, when the producer
        # hands the layer to this (worker) thread.
        self._stream.wait_stream(torch.cuda.default_stream(self.local.device))
        with torch.cuda.stream(self._stream):
            copy_blocks(dst, src, runs, layer)
        self._stream.synchronize()

    def read(self, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str) -> int:
        check_ids(src_block_ids, self.remote.shape[1])
        self._run(self.local, self.remote, block_runs(src_block_ids, dst_block_ids), None)
        return len(dst_block_ids) * self.local[:, 0].numel() * self.local.element_size()

    def write_layer(
        self, layer: int, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str
    ) -> int:
        check_ids(dst_block_ids, self.remote.shape[1])
        self._run(self.remote, self.local, block_runs(src_block_ids, dst_block_ids), layer)
        return len(dst_block_ids) * self.local[0, 0].numel() * self.local.element_size()

    def close(self) -> None:
        self.remote = torch.empty(0)
