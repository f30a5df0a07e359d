"""Which of an instance's KV blocks its TCP data server lets peers touch, and until when.

The owner grants a request's blocks before it tells a peer their ids (decode: `write_dest`;
prefill: the `remote_block_ids` of its answer) and revokes the grant before it frees them. The
server serves an op only if every block id in it is granted to the request the op names.

Revoking also cuts any op still in flight on that grant (it is marked cancelled; the server's copy
loop checks the mark between socket waits of at most `POLL_SECONDS`, then drops its connection)
and returns once that op has stopped touching the blocks. So after `revoke()` no byte of that request can
land in, or be read from, those blocks, whatever the link or the peer does later: they can be
reused at once (no quarantine), and a slow reader cannot see blocks already given to another
request.

    owner (engine thread)          server thread (one per connection)
    grant(r, ids) ───────────────► use(r, ids): ids ⊆ granted[r]? else refused
    revoke(r): drop granted[r],     ...copying... (socket waits <= POLL_SECONDS)
               cancel r's ops ────► op.cancelled: drop the connection, leave `use`
               wait ◄────────────── notify

(Shutting the connection down instead would race: an op that has sent its last byte but not yet
left `use` would take down the connection its peer already uses for the next op.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator

from pdserve.kv.transports.base import TransferError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # longest socket wait of a server op between checks of its cancel mark
REVOKE_WAIT_SECONDS = 10.0  # a cancelled op leaves within POLL_SECONDS + one copy; this only bounds a bug


class Op:
    """One server op under a grant; `cancelled` is set by revoke()."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class BlockGrants:
    """Thread-safe: the owner calls grant/revoke, server threads call use."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._granted: dict[str, frozenset[int]] = {}
        self._active: dict[str, list[Op]] = {}  # ops in flight, by request

    def grant(self, request_id: str, block_ids: Iterable[int]) -> None:
        with self._cv:
            self._granted[request_id] = frozenset(block_ids)

    def revoke(self, request_id: str) -> bool:
        """End the grant; True once no op of it touches the blocks any more (False only if an op
        failed to stop within REVOKE_WAIT_SECONDS: then the blocks are not safe to reuse)."""
        with self._cv:
            self._granted.pop(request_id, None)
            ops = self._active.get(request_id)
            if not ops:
                return True
            for op in ops:
                op.cancelled = True
            t0 = time.monotonic()
            done = self._cv.wait_for(lambda: request_id not in self._active, REVOKE_WAIT_SECONDS)
        if done:
            log.info("kv tcp: cut a transfer of request %s in flight (%.3f s)", request_id, time.monotonic() - t0)
        else:
            log.error("kv tcp: a transfer of request %s did not stop within %g s", request_id, REVOKE_WAIT_SECONDS)
        return done

    @contextlib.contextmanager
    def use(self, request_id: str, block_ids: list[int]) -> Iterator[Op]:
        """Around one server op on `block_ids` for `request_id`; raises TransferError if not granted.
        The op must stop touching the blocks once the yielded `Op` is cancelled."""
        with self._cv:
            allowed = self._granted.get(request_id)
            if allowed is None:
                raise TransferError(f"no blocks are granted to request {request_id!r} (ended, or never sent)")
            stray = next((b for b in block_ids if b not in allowed), None)
            if stray is not None:
                raise TransferError(f"block {stray} is not granted to request {request_id!r}")
            op = Op()
            self._active.setdefault(request_id, []).append(op)
        try:
            yield op
        finally:
            with self._cv:
                ops = self._active[request_id]
                ops.remove(op)
                if not ops:
                    del self._active[request_id]
                self._cv.notify_all()
