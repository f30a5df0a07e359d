"""Builds the KV connector for an engine's role and parses `kv_transfer_params`."""

from __future__ import annotations

import msgspec

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Scheduler
from pdserve.kv.connector import KVConnectorBase
from pdserve.kv.messages import KVTransferParams


def make_connector(
    config: EngineConfig, model: ModelConfig, cache: KVCache, scheduler: Scheduler, runner: ModelRunner,
    token: str | None = None,
) -> KVConnectorBase | None:
    """None for a standalone engine; else a producer (prefill), a consumer (decode) or both (each
    request picks its half, kv/both.py), each over a TransferContext of its own (kv/context.py),
    wired to the scheduler's and runner's seams."""
    role = config.kv_transfer.role
    if role == "standalone":
        return None
    if role == "prefill":
        from pdserve.kv.producer import KVProducer

        conn: KVConnectorBase = KVProducer.open(config, model, cache, token)
    elif role == "decode":
        from pdserve.kv.consumer import KVConsumer

        consumer = KVConsumer.open(config, model, cache, token)
        consumer.allocate = scheduler.allocate_for_remote
        conn = consumer
    elif role == "both":
        from pdserve.kv.both import KVBoth

        both = KVBoth.open(config, model, cache, token)
        both.allocate = scheduler.allocate_for_remote
        conn = both
    else:
        raise ValueError(f"unknown role {role!r}; expected standalone, prefill, decode or both")
    conn.release = scheduler.release_blocks
    scheduler.connector = conn
    runner.layer_hook = conn.on_layer_done
    return conn


def parse_kv_transfer_params(value: KVTransferParams | dict | None) -> KVTransferParams | None:
    """Validate a request's kv_transfer_params (ValueError names the bad field)."""
    if value is None or isinstance(value, KVTransferParams):
        return value
    try:
        return msgspec.convert(value, KVTransferParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid kv_transfer_params: {e}") from None
