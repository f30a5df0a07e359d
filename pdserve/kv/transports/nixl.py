"""NIXL transport: one-sided READ / WRITE between the registered KV caches of two NIXL agents, over UCX.

What vLLM's NixlConnector moves KV with. Each instance started with `--kv-transport nixl` creates one
agent, named after its engine id, with the UCX backend, and registers its whole KV cache tensor once
(all layers are one allocation: DRAM for a CPU cache, VRAM for a CUDA one) until it closes. Its
handshake reply carries the agent's metadata (UCX worker address, the region's remote keys), the
cache's base address and size (`NixlDescriptor`). The initiator — decode in READ, prefill in WRITE —
loads the peer's metadata once and moves each (layer, run of consecutive blocks) as one descriptor;
the peer's CPU takes no part. pdserve's own notify messages still say when a transfer is done.

UCX is confined to the network interface that holds `--kv-host` (its TCP transport listens there on
an ephemeral port per agent; shared-memory transports serve peers of the same host); a wildcard
`--kv-host` leaves UCX its defaults (every device, RDMA included). A peer that dies fails the transfer
(UCX's peer error handling), one that hangs fails it at the transfer timeout: never a hang.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np
import psutil
import torch

from pdserve.kv.messages import NixlDescriptor
from pdserve.kv.transports.base import TransferError, block_runs, check_ids

log = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::", "*")
_POLL_MAX_S = 2e-4  # completion polling backs off to this (5k checks/s at most, only while in flight)


class NixlUnavailable(RuntimeError):
    """NIXL cannot be used here: not installed, no UCX backend, or no interface for --kv-host."""


def _api() -> Any:
    """The nixl `_api` module, imported on first use only (it configures logging and loads UCX)."""
    raise_exceptions = logging.raiseExceptions
    try:
        try:
            from nixl_cu12 import _api as api
        except ImportError:
            from nixl import _api as api  # the `nixl` meta package's module name
    except ImportError as e:
        raise NixlUnavailable(f"--kv-transport nixl needs NIXL: pip install 'pdserve[nixl]' ({e})") from None
    finally:
        logging.raiseExceptions = raise_exceptions  # nixl's logging setup turns it off process-wide
    nixl_log = logging.getLogger("nixl")
    if not os.environ.get("NIXL_LOG_LEVEL") and nixl_log.handlers:
        # nixl logs INFO to stdout on its own handler; route it through ours, warnings and up.
        nixl_log.handlers.clear()
        nixl_log.propagate = True
        nixl_log.setLevel(logging.WARNING)
    return api


def ucx_net_device(host: str) -> str | None:
    """The network interface that holds `host` (pdserve's --kv-host), for UCX_NET_DEVICES; None for
    a wildcard address (UCX then uses every device)."""
    if host in _WILDCARDS:
        return None
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise NixlUnavailable(f"--kv-host {host!r} does not resolve: {e}") from None
    if addrs & {"0.0.0.0", "::"}:
        return None
    for name, entries in sorted(psutil.net_if_addrs().items()):
        if any(e.address.split("%")[0] in addrs for e in entries if e.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    raise NixlUnavailable(f"no network interface holds --kv-host {host!r} ({', '.join(sorted(addrs))}): "
                          "UCX cannot be confined to it")


class NixlAgent:
    """This instance's NIXL agent: the KV cache registered once, peers' metadata loaded on demand.

    Transfers and `close` take `lock`, so the registration is never dropped under a transfer."""

    def __init__(self, name: str, cache: torch.Tensor, host: str) -> None:
        if not cache.is_contiguous():
            raise NixlUnavailable("the KV cache must be one contiguous allocation to be registered with NIXL")
        api = _api()
        self.name = name
        self.lock = threading.Lock()
        self.mem_type = "VRAM" if cache.is_cuda else "DRAM"
        self.device_id = cache.device.index or 0 if cache.is_cuda else 0
        self.base_addr = cache.data_ptr()
        self.size_bytes = cache.numel() * cache.element_size()
        self._closed = False
        self._remotes: dict[str, int] = {}  # loaded peer agents -> transports using them
        # No listener thread: metadata travels in pdserve's handshake, not on NIXL's port 8888.
        self.agent = api.nixl_agent(name, api.nixl_agent_config(backends=[]))
        if "UCX" not in self.agent.get_plugin_list():
            raise NixlUnavailable("this NIXL build has no UCX plugin")
        params = dict(self.agent.get_plugin_params("UCX"))
        device = ucx_net_device(host)
        if device is not None:
            # UCX's own key: NIXL applies it unless UCX_NET_DEVICES is set in the environment.
            params["engine_config"] = f"NET_DEVICES={device}"
            env = os.environ.get("UCX_NET_DEVICES")
            if env and env != device:
                log.warning("UCX_NET_DEVICES=%s in the environment overrides --kv-host %s (interface %s)",
                            env, host, device)
        try:
            self.agent.create_backend("UCX", params)
            self._reg = self.agent.register_memory(self.agent.get_reg_descs(cache))
        except Exception as e:  # nixl's binding errors are plain Exceptions
            raise NixlUnavailable(f"NIXL UCX backend or KV registration failed: {e}") from None
        self.net_device = device
        log.info("NIXL agent %s: %.1f MiB of %s registered, UCX on %s", name, self.size_bytes / (1 << 20),
                 self.mem_type, device or "every device")

    def descriptor(self) -> NixlDescriptor:
        return NixlDescriptor(self.name, bytes(self.agent.get_agent_metadata()), self.base_addr, self.size_bytes,
                              self.mem_type, self.device_id)  # type: ignore[arg-type]

    def load(self, peer: NixlDescriptor) -> str:
        """Load a peer's metadata (once per peer agent); returns its agent name."""
        with self.lock:
            if self._closed:
                raise TransferError("the NIXL agent is closed")
            if peer.agent_name not in self._remotes:
                try:
                    name = self.agent.add_remote_agent(peer.metadata)
                except Exception as e:
                    raise TransferError(f"cannot load NIXL agent {peer.agent_name!r}'s metadata: {e}") from None
                name = name.decode() if isinstance(name, bytes) else name
                if name != peer.agent_name:
                    self._forget(name)
                    raise TransferError(f"NIXL metadata names agent {name!r}, the handshake {peer.agent_name!r}")
                self._remotes[name] = 0
            self._remotes[peer.agent_name] += 1
            return peer.agent_name

    def unload(self, name: str) -> None:
        with self.lock:
            n = self._remotes.get(name, 0) - 1
            if n > 0:
                self._remotes[name] = n
            elif name in self._remotes:
                del self._remotes[name]
                if not self._closed:
                    self._forget(name)

    def _forget(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:
            log.debug("NIXL: removing agent %s: %s", name, e)

    def close(self) -> None:
        """Deregister the cache (after any transfer in flight has ended) and disconnect every peer."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._remotes):
                self._forget(name)
            self._remotes.clear()
            try:
                self.agent.deregister_memory(self._reg)
            except Exception as e:
                log.warning("NIXL: deregistering the KV cache failed: %s", e)
            self.agent = None  # type: ignore[assignment]

    @property
    def closed(self) -> bool:
        return self._closed


class NixlTransport:
    """One peer: READ its blocks into ours, or WRITE one layer of ours into its blocks."""

    name = "nixl"

    def __init__(self, agent: NixlAgent, local: torch.Tensor, peer: NixlDescriptor, shape: tuple[int, ...],
                 timeout: float) -> None:
        if peer.mem_type != agent.mem_type and "VRAM" in (peer.mem_type, agent.mem_type):
            log.info("NIXL between %s (ours) and %s (peer's) memory", agent.mem_type, peer.mem_type)
        self.agent = agent
        self.local = local
        self.peer = peer
        self.timeout = timeout
        self.num_layers, self.remote_blocks = shape[0], shape[1]
        self.block_bytes = local[0, 0].numel() * local.element_size()
        self.local_layer = local.shape[1] * self.block_bytes
        self.remote_layer = self.remote_blocks * self.block_bytes
        if peer.size_bytes < self.num_layers * self.remote_layer:
            raise TransferError("the peer's registered KV cache is smaller than its advertised layout")
        self.remote_name = agent.load(peer)
        self._open = True

    def _spans(self, runs: list[tuple[int, int, int]], layers: list[int], read: bool) -> tuple[np.ndarray, np.ndarray]:
        """(local, remote) descriptor arrays [(addr, len, device)], one row per (layer, run)."""
        r = np.array(runs, dtype=np.uint64).reshape(-1, 3)
        layer = np.array(layers, dtype=np.uint64)[:, None]
        bb = np.uint64(self.block_bytes)
        src, dst, n = r[:, 0][None, :], r[:, 1][None, :], (r[:, 2] * bb)[None, :]
        remote_block, local_block = (src, dst) if read else (dst, src)
        local_addr = np.uint64(self.agent.base_addr) + layer * np.uint64(self.local_layer) + local_block * bb
        remote_addr = np.uint64(self.peer.base_addr) + layer * np.uint64(self.remote_layer) + remote_block * bb
        lens = np.broadcast_to(n, local_addr.shape)

        def rows(addr: np.ndarray, device: int) -> np.ndarray:
            return np.stack([addr.ravel(), lens.ravel(), np.full(addr.size, device, dtype=np.uint64)], axis=1)

        return rows(local_addr, self.agent.device_id), rows(remote_addr, self.peer.device_id)

    def _transfer(self, op: str, local: np.ndarray, remote: np.ndarray) -> None:
        if self.agent.mem_type == "VRAM" and op == "WRITE":
            # The layer's KV writes were queued on the engine thread's stream; they must land first.
            torch.cuda.default_stream(self.local.device).synchronize()
        with self.agent.lock:
            if not self._open or self.agent.closed:
                raise TransferError("the NIXL transport is closed")
            a = self.agent.agent
            handle = None
            try:
                handle = a.initialize_xfer(op, a.get_xfer_descs(local, self.agent.mem_type),
                                           a.get_xfer_descs(remote, self.peer.mem_type), self.remote_name)
                state = a.transfer(handle)
                deadline = time.monotonic() + self.timeout
                delay = 0.0
                while state == "PROC":
                    if time.monotonic() > deadline:
                        raise TransferError(f"NIXL {op} from agent {self.remote_name!r} timed out after "
                                            f"{self.timeout:g} s")
                    time.sleep(delay)
                    delay = min(max(delay * 2, 1e-5), _POLL_MAX_S)
                    state = a.check_xfer_state(handle)
                if state != "DONE":
                    raise TransferError(f"NIXL {op} with agent {self.remote_name!r} failed (peer gone?)")
                handle.release()
                handle = None
            except TransferError:
                raise
            except Exception as e:  # nixl's errors (nixlRemoteDisconnectError, ...) are plain Exceptions
                raise TransferError(f"NIXL {op} with agent {self.remote_name!r} failed: "
                                    f"{type(e).__name__}: {e}") from None
            finally:
                if handle is not None:
                    self._abandon(handle)

    def _abandon(self, handle: Any) -> None:
        """Cancel a transfer that did not complete; if it cannot be, cut the connection so that nothing
        of it lands after we report the failure (our blocks may be reused at once)."""
        try:
            handle.release()
            return
        except Exception:
            pass
        self.agent._forget(self.remote_name)
        self.agent._remotes.pop(self.remote_name, None)  # the next load connects afresh
        try:
            handle.release()
        except Exception as e:
            log.warning("NIXL: a failed transfer with %s could not be released: %s", self.remote_name, e)

    def read(self, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str) -> int:
        check_ids(src_block_ids, self.remote_blocks)
        check_ids(dst_block_ids, self.local.shape[1])
        runs = block_runs(src_block_ids, dst_block_ids)
        if runs:
            self._transfer("READ", *self._spans(runs, list(range(self.num_layers)), read=True))
        return len(dst_block_ids) * self.num_layers * self.block_bytes

    def write_layer(
        self, layer: int, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str
    ) -> int:
        check_ids(dst_block_ids, self.remote_blocks)
        check_ids(src_block_ids, self.local.shape[1])
        runs = block_runs(src_block_ids, dst_block_ids)
        if runs:
            self._transfer("WRITE", *self._spans(runs, [layer], read=False))
        return len(dst_block_ids) * self.block_bytes

    def close(self) -> None:
        if self._open:
            self._open = False
            self.agent.unload(self.remote_name)
