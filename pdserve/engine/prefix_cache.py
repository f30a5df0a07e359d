"""Content hashes of full KV blocks, chained so that one hash names the whole prefix before it.

    hash(block i) = sha256(hash(block i-1) || token ids of block i, little-endian int32)

Equal hashes mean equal token prefixes (up to sha256 collisions), so the longest cached prefix of a
request is found with one dict lookup per block (BlockPool.cached_prefix).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pdserve.engine.request import Request

ROOT_HASH = b"pdserve-kv-prefix-v1"


def block_hashes(req: Request, block_size: int, num_blocks: int) -> list[bytes]:
    """The hashes of the request's first `num_blocks` full blocks of tokens (prompt, then output).
    Computed once per block and kept on the request."""
    hashes = req.block_hashes
    while len(hashes) < num_blocks:
        i = len(hashes)
        tokens = np.asarray(req.token_ids(i * block_size, (i + 1) * block_size), dtype="<i4")
        if len(tokens) != block_size:
            raise ValueError(f"block {i} of request {req.request_id!r} is not full")
        hashes.append(hashlib.sha256((hashes[-1] if hashes else ROOT_HASH) + tokens.tobytes()).digest())
    return hashes[:num_blocks]
