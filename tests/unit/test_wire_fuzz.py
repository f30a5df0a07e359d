"""Every wire decoder rejects malformed, truncated, oversized or wrong-typed input with
MessageError (or TransferError) — never another exception, never an unbounded allocation."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.kv import messages as m
from pdserve.kv.transports import tcp

DECODERS = [m.decode_register, m.decode_handshake, m.decode_notify]
VALID = [
    m.encode(m.Register(role="P", request_address="127.0.0.1:1", handshake_port=2, notify_port=3)),
    m.encode(m.HandshakeRequest(m.PROTOCOL_VERSION, "e", "f")),
    m.encode(m.WriteDest("r", "e", [1, 2], "127.0.0.1", 1, 2, 3)),
    m.encode(m.ReadDone("r", "e")),
    m.encode(m.Abort("r", "e", "why")),
]

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def _rejects_cleanly(decode, data: bytes) -> None:
    try:
        decode(data)
    except m.MessageError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_random_bytes(data):
    for decode in DECODERS:
        _rejects_cleanly(decode, data)


@settings(max_examples=300)
@given(obj=json_like)
def test_wrong_shapes(obj):
    data = msgspec.msgpack.encode(obj)
    for decode in DECODERS:
        _rejects_cleanly(decode, data)


@settings(max_examples=200)
@given(cut=st.integers(min_value=0, max_value=200), which=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated(cut, which):
    data = VALID[which][: cut % max(1, len(VALID[which]))]
    for decode in DECODERS:
        _rejects_cleanly(decode, data)


def test_oversized_rejected_before_decoding():
    big = msgspec.msgpack.encode({"type": "abort", "request_id": "x" * (m.MAX_MESSAGE_BYTES + 1), "engine_id": "e"})
    for decode in DECODERS:
        with pytest.raises(m.MessageError):
            decode(big)


def test_wrong_field_types_rejected():
    bad = msgspec.msgpack.encode({"type": "write_dest", "request_id": 5, "engine_id": "e", "block_ids": "x"})
    with pytest.raises(m.MessageError):
        m.decode_notify(bad)
    with pytest.raises(m.MessageError):
        m.decode_register(msgspec.msgpack.encode({"type": "register", "role": "X", "request_address": "a"}))


@settings(max_examples=200)
@given(data=st.binary(max_size=256))
def test_tcp_header_decoder(data):
    class FakeSock:
        def __init__(self, b: bytes):
            self.b = b

        def recvmsg_into(self, views):
            n = min(len(self.b), views[0].nbytes)
            views[0][:n] = self.b[:n]
            self.b = self.b[n:]
            return (n, [], 0, None)

    try:
        tcp._recv_header(FakeSock(data))
    except (tcp.TransferError, ConnectionError):
        pass


def test_instance_survives_garbage_on_its_ports():
    """Real sockets: garbage to the handshake, notify and TCP data ports of a live prefill engine."""
    import socket

    from tests.unit.test_kv_transfer import close, make

    p = make("dummy:qwen3-tiny", "prefill")
    c = p.engine.connector
    ctx = zmq.Context.instance()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{c.notify_port}")
        for junk in (b"", b"\x00\xff", msgspec.msgpack.encode({"type": "abort"}), b"x" * 5_000_000):
            dealer.send(junk)
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(f"tcp://127.0.0.1:{c.handshake_port}")
        req.send(b"\x93garbage")
        reply = m.decode_handshake(req.recv())
        assert isinstance(reply, m.HandshakeError)
        with socket.create_connection(("127.0.0.1", c.tcp_server.port)) as s:
            s.sendall(b"\xff\xff\xff\xff" + b"junk")
        # Still serving, and a good handshake still works.
        req.send(m.encode(m.HandshakeRequest(m.PROTOCOL_VERSION, "x", c.ctx.fingerprint)))
        assert isinstance(m.decode_handshake(req.recv()), m.HandshakeReply)
        assert p.is_alive
        dealer.close(0)
        req.close(0)
    finally:
        close(p)


def test_no_pickle_on_any_wire():
    root = Path(__file__).resolve().parents[2] / "pdserve"
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if not line.lstrip().startswith(("#", '"', "never"))  # prose that names what we avoid
        and "(never pickle)" not in line
        and re.search(r"\b(pickle|cloudpickle|dill|marshal)\b|recv_pyobj|send_pyobj|torch\.load", line)
    ]
    assert offenders == []
