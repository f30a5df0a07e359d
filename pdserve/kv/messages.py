"""Typed wire messages: registration, handshake, notify, and HTTP `kv_transfer_params`.

msgpack on ZMQ, decoded with msgspec into these structs (never pickle). See docs/protocol.md.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import zmq

PROTOCOL_VERSION = 3
MAX_MESSAGE_BYTES = 1 << 20  # larger ZMQ messages are dropped before decoding
MAX_BLOCK_IDS = 1 << 18


class KVTransferParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """The `kv_transfer_params` JSON object of requests and responses (vLLM's field names)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_handshake_port: int | None = None
    remote_notify_port: int | None = None
    remote_tp_size: int = 1
    remote_dp_size: int = 1
    transfer_mode: Literal["READ", "WRITE"] | None = None
    num_prompt_tokens: int | None = None
    lease_seconds: float | None = None
    num_cached_tokens: int | None = None  # prompt tokens the prefill found in its prefix cache


class Register(msgspec.Struct, tag_field="type", tag="register", forbid_unknown_fields=False):
    # B (a pdserve extension, as S): a `--role both` instance, usable as either half. Its
    # transfer_mode is only its default: it serves READ and WRITE halves alike, per request.
    role: Literal["P", "D", "S", "B"]
    request_address: str
    handshake_port: int = 0
    notify_port: int = 0
    dp_size: int = 1
    tp_size: int = 1
    transfer_mode: Literal["READ", "WRITE"] = "READ"
    engine_id: str = ""
    host: str = ""
    token: str | None = None


class HandshakeRequest(msgspec.Struct, tag_field="type", tag="handshake"):
    protocol_version: int
    engine_id: str
    fingerprint: str
    token: str | None = None
    hostname: str = ""  # the asking instance's: a peer of another host can only reach us over tcp
    shm_segment: str | None = None  # the asker's KV segment: gone from /dev/shm once it has died
    # The asker's KV storage dtype and, float8, its per-layer scales (k0, v0, k1, v1, ...): checked
    # before the fingerprint (which covers them too) for an error naming --kv-cache-dtype.
    kv_dtype: str = ""
    kv_scales: list[float] = msgspec.field(default_factory=list)


class KVLayoutInfo(msgspec.Struct):
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_bytes: int
    layer_stride_bytes: int
    kv_scales: list[float] = msgspec.field(default_factory=list)  # float8 caches: k0, v0, k1, v1, ...


class ShmDescriptor(msgspec.Struct):
    segment: str
    size_bytes: int
    hostname: str


class TcpDescriptor(msgspec.Struct):
    host: str
    port: int


class CudaIpcDescriptor(msgspec.Struct):
    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    device_uuid: str


class NixlDescriptor(msgspec.Struct):
    """A NIXL agent's coordinates: what a peer needs to READ from or WRITE into our KV cache."""

    agent_name: str  # the engine id
    metadata: bytes  # nixl_agent.get_agent_metadata(): UCX worker address, registered regions' keys
    base_addr: int  # the KV cache tensor, registered whole
    size_bytes: int
    mem_type: Literal["DRAM", "VRAM"] = "DRAM"
    device_id: int = 0


class Transports(msgspec.Struct, omit_defaults=True):
    shm: ShmDescriptor | None = None
    tcp: TcpDescriptor | None = None
    cuda_ipc: CudaIpcDescriptor | None = None
    nixl: NixlDescriptor | None = None
    hostname: str = ""


class HandshakeReply(msgspec.Struct, tag_field="type", tag="handshake_ok"):
    protocol_version: int
    engine_id: str
    fingerprint: str
    layout: KVLayoutInfo
    transports: Transports


class HandshakeError(msgspec.Struct, tag_field="type", tag="handshake_error"):
    reason: str


class ReadDone(msgspec.Struct, tag_field="type", tag="read_done"):
    request_id: str
    engine_id: str
    token: str | None = None


class WriteDest(msgspec.Struct, tag_field="type", tag="write_dest"):
    request_id: str
    engine_id: str
    block_ids: list[int]
    handshake_host: str
    handshake_port: int
    notify_port: int
    num_prompt_tokens: int
    token: str | None = None
    # Leading blocks the decode holds already (its prefix cache): the producer pushes only the rest.
    skip_blocks: int = 0


class WriteDone(msgspec.Struct, tag_field="type", tag="write_done"):
    request_id: str
    engine_id: str
    ok: bool = True
    reason: str | None = None
    token: str | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefill found in its prefix cache


class Abort(msgspec.Struct, tag_field="type", tag="abort"):
    request_id: str
    engine_id: str  # the sender's; PROXY_ENGINE_ID when the proxy sends it
    reason: str | None = None
    token: str | None = None


PROXY_ENGINE_ID = "proxy"  # `Abort.engine_id` of the proxy: it dropped this half's HTTP call


NotifyMessage = ReadDone | WriteDest | WriteDone | Abort
HandshakeMessage = HandshakeRequest | HandshakeReply | HandshakeError

_encoder = msgspec.msgpack.Encoder()
_notify_decoder = msgspec.msgpack.Decoder(NotifyMessage)
_handshake_decoder = msgspec.msgpack.Decoder(HandshakeMessage)
_register_decoder = msgspec.msgpack.Decoder(Register)


class MessageError(ValueError):
    """A message that is too large, malformed, or of the wrong shape."""


def bind_socket(ctx: zmq.Context, kind: int, host: str, port: int, max_bytes: int) -> tuple[zmq.Socket, int]:
    """A server socket on host:port (0: a free port), with a cap on incoming message size."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return sock, port
    return sock, sock.bind_to_random_port(f"tcp://{host}")


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes):
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MessageError(str(e)) from None


def decode_notify(data: bytes) -> NotifyMessage:
    msg = _decode(_notify_decoder, data)
    if isinstance(msg, WriteDest) and len(msg.block_ids) > MAX_BLOCK_IDS:
        raise MessageError("too many block ids")
    return msg


def decode_handshake(data: bytes) -> HandshakeMessage:
    return _decode(_handshake_decoder, data)


def decode_register(data: bytes) -> Register:
    """Registration, in pdserve's form or vLLM MoRIIO's heartbeat form (normalised to Register)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError("registration message too large")
    try:
        return _register_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as first:
        try:
            raw = msgspec.msgpack.decode(data, type=_VllmHeartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise MessageError(str(first)) from None
        return raw.to_register()


class _VllmHeartbeat(msgspec.Struct, forbid_unknown_fields=False):
    type: Literal["P", "D"]
    http_address: str
    zmq_address: str
    dp_size: int = 1
    tp_size: int = 1
    transfer_mode: Literal["READ", "WRITE"] = "READ"

    def to_register(self) -> Register:
        parts = dict(p.split(":", 1) for p in self.zmq_address.split(",") if ":" in p)
        try:
            hs, nt = int(parts.get("handshake", 0)), int(parts.get("notify", 0))
        except ValueError:
            raise MessageError(f"bad zmq_address {self.zmq_address!r}") from None
        return Register(
            role=self.type, request_address=self.http_address, handshake_port=hs, notify_port=nt,
            dp_size=self.dp_size, tp_size=self.tp_size, transfer_mode=self.transfer_mode,
            host=parts.get("host", ""),
        )
