"""Content hashes of full KV blocks, chained so that one hash names the whole prefix before it.

    hash(block i) = sha256(hash(block i-1) || token ids of block i, little-endian int32)
    hash(block -1) = a constant, or one per LoRA adapter id and/or cache salt

Equal hashes mean equal token prefixes (up to sha256 collisions), so the longest cached prefix of a
request is found with one dict lookup per block (BlockPool.cached_prefix).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pdserve.engine.request import Request

ROOT_HASH = b"pdserve-kv-prefix-v1"


def root_hash(req: Request) -> bytes:
    """The chain's start: the same for every request without an adapter or a salt; per adapter id
    (its KV differs for the same tokens) and per vLLM `cache_salt` otherwise. vLLM mixes the salt into
    the first block's hash: chained, every later hash differs too, so requests share cached blocks
    only with requests of the same salt (none: only with unsalted ones)."""
    if req.lora is None and req.cache_salt is None:
        return ROOT_HASH
    root = ROOT_HASH
    if req.lora is not None:
        root = hashlib.sha256(root + b"lora" + req.lora.lora_int_id.to_bytes(8, "little")).digest()
    if req.cache_salt is not None:
        root = hashlib.sha256(root + b"salt" + req.cache_salt.encode("utf-8", "surrogatepass")).digest()
    return root


def block_hashes(req: Request, block_size: int, num_blocks: int) -> list[bytes]:
    """The hashes of the request's first `num_blocks` full blocks of tokens (prompt, then output).
    Computed once per block and kept on the request."""
    hashes = req.block_hashes
    while len(hashes) < num_blocks:
        i = len(hashes)
        tokens = np.asarray(req.token_ids(i * block_size, (i + 1) * block_size), dtype="<i4")
        if len(tokens) != block_size:
            raise ValueError(f"block {i} of request {req.request_id!r} is not full")
        hashes.append(hashlib.sha256((hashes[-1] if hashes else root_hash(req)) + tokens.tobytes()).digest())
    return hashes[:num_blocks]
