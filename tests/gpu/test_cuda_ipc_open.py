"""The cuda_ipc transport's import of a peer's handles, checked without a GPU: what it passes to
torch's `_new_shared_cuda` (which type-checks every argument: an event handle of None, or an int
where bytes are due, is a TypeError there) and the same-process shortcut. Not gpu-marked: runs on CPU.
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from pdserve.kv.messages import CudaIpcDescriptor
from pdserve.kv.transports import cuda_ipc


def descriptor(**kw) -> CudaIpcDescriptor:
    fields = dict(device=0, handle=b"h" * 64, size_bytes=2 * 3 * 4 * 2, offset_bytes=512,
                  ref_counter_handle=b"/torch_1", ref_counter_offset=3, event_handle=b"e" * 64,
                  event_sync_required=True, device_uuid="GPU-x")
    return CudaIpcDescriptor(**(fields | kw))


@pytest.mark.parametrize("event_handle", [b"e" * 64, b""])
def test_open_cache_passes_torch_the_types_it_checks(monkeypatch, event_handle):
    seen = []

    def new_shared_cuda(*args):
        seen.append(args)
        return torch.zeros(args[2], dtype=torch.uint8).untyped_storage()

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_cuda", staticmethod(new_shared_cuda))
    # As the peer's handshake reply brings it: through msgpack.
    desc = msgspec.msgpack.decode(
        msgspec.msgpack.encode(descriptor(event_handle=event_handle, event_sync_required=bool(event_handle))),
        type=CudaIpcDescriptor,
    )
    t = cuda_ipc.open_cache(desc, torch.float16, (2, 3, 4), torch.device("cpu"))
    (args,) = seen
    types = (int, bytes, int, int, bytes, int, bytes, bool)
    assert all(type(a) is ty for a, ty in zip(args, types, strict=True)), [type(a) for a in args]
    assert args[6] == event_handle and args[7] is bool(event_handle)
    assert t.shape == (2, 3, 4) and t.dtype == torch.float16 and t.is_contiguous()


def test_open_cache_in_the_exporting_process_uses_the_tensor():
    cache = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    desc = descriptor(handle=b"same-process", offset_bytes=0)
    cuda_ipc._EXPORTED[(desc.handle, desc.offset_bytes)] = cache
    try:
        t = cuda_ipc.open_cache(desc, torch.float32, (2, 3, 4), torch.device("cpu"))
        assert t.data_ptr() == cache.data_ptr() and torch.equal(t, cache)
    finally:
        cuda_ipc._EXPORTED.pop((desc.handle, desc.offset_bytes), None)
