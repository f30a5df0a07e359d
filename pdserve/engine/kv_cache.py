"""Allocation of the paged KV cache: one tensor for all layers, optionally in POSIX shared memory.

Layout: see pdserve/model/attention.py. On CPU the cache can live in a shared-memory segment so
a peer process on the same host can map it and copy blocks one-sidedly (the shm transport).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from pdserve.config import CacheConfig, ModelConfig
from pdserve.model.kv_quant import KVScales

# Names of the segments this process created: attaching one of them must not touch its tracking.
OWNED_SEGMENTS: set[str] = set()
# The KV segment's name carries its creator's pid namespace and pid: a segment whose creator is gone
# (SIGKILLed with its whole process group, resource tracker included, so nobody unlinked it) is
# removed by the next instance of the same pid namespace that creates one (sweep_stale_segments).
# Segments of other namespaces (containers sharing /dev/shm) are never touched: their pids mean
# nothing here.
SEGMENT_PREFIX = "pdserve_kv_"
SHM_DIR = "/dev/shm"


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def segment_name() -> str:
    """A fresh KV segment name: prefix, pid namespace, pid, random suffix."""
    return f"{SEGMENT_PREFIX}{_pid_namespace() or 0}_{os.getpid()}_{secrets.token_hex(6)}"


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the KV segments of this pid namespace whose creating process no longer exists;
    returns their names."""
    ns = _pid_namespace()
    if ns is None:
        return []
    try:
        entries = list(os.scandir(shm_dir))
    except OSError:
        return []
    gone = []
    for entry in entries:
        fields = entry.name.removeprefix(SEGMENT_PREFIX).split("_")
        if (not entry.name.startswith(SEGMENT_PREFIX) or len(fields) != 3 or fields[0] != str(ns)
                or not fields[1].isdigit() or _pid_alive(int(fields[1]))):
            continue
        try:
            os.unlink(entry.path)
            gone.append(entry.name)
        except OSError:
            pass
    return gone


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the storage dtype: the model's, or float8 (--kv-cache-dtype)
    scales: tuple[KVScales, ...] = ()  # a float8 cache's, per layer (how to read its bytes); () otherwise

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes


def plan_layout(
    model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, scales: tuple[KVScales, ...] = ()
) -> KVLayout:
    """The cache for `dtype` (its storage dtype): as many blocks as kv_cache_gib holds, so a float8
    cache gets twice a bf16 one's."""
    per_block_all_layers = (
        model.num_hidden_layers * 2 * cache.block_size * model.num_key_value_heads * model.head_dim
    ) * dtype.itemsize
    if cache.num_kv_blocks is not None:
        num_blocks = cache.num_kv_blocks
    else:
        num_blocks = int(cache.kv_cache_gib * (1 << 30)) // per_block_all_layers
    if num_blocks < 1:
        raise ValueError(
            f"KV cache too small: {cache.kv_cache_gib} GiB holds no block of {per_block_all_layers} bytes"
        )
    return KVLayout(
        model.num_hidden_layers, num_blocks, cache.block_size, model.num_key_value_heads, model.head_dim, dtype,
        scales,
    )


class KVCache:
    """Owns the cache tensor (and its shared-memory segment, if any). Call close() to release it."""

    def __init__(self, layout: KVLayout, device: torch.device, shared: bool = False) -> None:
        self.layout = layout
        self.shm: shared_memory.SharedMemory | None = None
        if shared and device.type == "cpu":
            sweep_stale_segments()
            self.shm = shared_memory.SharedMemory(name=segment_name(), create=True, size=layout.total_bytes)
            OWNED_SEGMENTS.add(self.shm.name)
            # Only the owning user may map our KV (the name is otherwise guessable under /dev/shm).
            try:
                os.chmod(f"/dev/shm/{self.shm.name.lstrip('/')}", 0o600)
            except OSError:
                pass
            buf = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=layout.total_bytes)
            self.tensor = buf.view(layout.dtype).view(layout.shape)
            self.tensor.zero_()
        else:
            self.tensor = torch.zeros(layout.shape, dtype=layout.dtype, device=device)

    @property
    def shm_name(self) -> str | None:
        return None if self.shm is None else self.shm.name

    def close(self) -> None:
        if self.shm is not None:
            # Drop tensor views first: the mmap cannot close while exported buffers exist.
            self.tensor = torch.empty(0)
            shm, self.shm = self.shm, None
            OWNED_SEGMENTS.discard(shm.name)
            try:
                shm.close()
            except BufferError:
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
