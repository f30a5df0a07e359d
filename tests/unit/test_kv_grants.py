"""The TCP data server touches only blocks granted to the request an op names, and never after the
grant is revoked (real sockets on loopback; `pdserve/kv/transports/grants.py`)."""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest
import torch

from pdserve.kv.transports import tcp
from pdserve.kv.transports.base import TransferError
from pdserve.kv.transports.tcp import TcpServer, TcpTransport

LAYERS, BLOCKS, BLOCK_ELEMS = 2, 8, 64  # cache [L, nb, ...]: one block of one layer is 256 bytes


@pytest.fixture
def pair():
    server_cache = torch.zeros(LAYERS, BLOCKS, BLOCK_ELEMS, dtype=torch.float32)
    client_cache = torch.arange(LAYERS * BLOCKS * BLOCK_ELEMS, dtype=torch.float32).view(LAYERS, BLOCKS, BLOCK_ELEMS)
    server = TcpServer(server_cache, "127.0.0.1")
    client = TcpTransport(client_cache, "127.0.0.1", server.port, timeout=10)
    yield server, client
    client.close()
    server.close()


def test_granted_write_and_read_round_trip(pair):
    server, client = pair
    server.grants.grant("r1", [3, 4])
    client.write_layer(1, [0, 1], [3, 4], request_id="r1")
    assert torch.equal(server.cache[1, 3:5], client.local[1, 0:2])
    assert not server.cache[0].any()  # only the layer written
    client.local.zero_()
    client.read([3, 4], [6, 7], request_id="r1")
    assert torch.equal(client.local[:, 6:8], server.cache[:, 3:5])


@pytest.mark.parametrize("grant", [None, ("r1", [3]), ("other", [3, 4])])
def test_write_outside_the_grant_is_refused_and_lands_nowhere(pair, grant):
    server, client = pair
    if grant is not None:
        server.grants.grant(*grant)
    with pytest.raises(TransferError, match="granted"):
        client.write_layer(0, [0, 1], [3, 4], request_id="r1")
    assert not server.cache.any()
    with pytest.raises(TransferError, match="granted"):
        client.read([3, 4], [0, 1], request_id="r1")


def test_revoked_grant_refuses_later_ops(pair):
    server, client = pair
    server.grants.grant("r1", [2])
    client.write_layer(0, [5], [2], request_id="r1")
    assert server.grants.revoke("r1")
    server.cache.zero_()
    with pytest.raises(TransferError, match="no blocks are granted"):
        client.write_layer(0, [5], [2], request_id="r1")
    assert not server.cache.any()


def _header(**fields) -> bytes:
    data = msgspec.msgpack.encode(tcp._Header(**fields))
    return tcp._LEN.pack(len(data)) + data


def test_revoke_cuts_a_write_in_flight(pair):
    """A peer sends half of a two-block write and stalls (a slow or cut link): revoke() cuts its
    connection and returns; what the peer sends after that lands nowhere."""
    server, _ = pair
    server.grants.grant("r1", [3, 4])
    block = BLOCK_ELEMS * 4
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_header(op="write", request_id="r1", layer=0, block_ids=[3, 4], nbytes=2 * block))
        s.sendall(b"\x01" * block)  # block 3's bytes; block 4's follow after the revoke
        pause = threading.Event()  # never set: a sleep
        for _ in range(1000):  # until the server has taken block 3's bytes
            if server.cache[0, 3].any():
                break
            pause.wait(0.01)
        assert server.cache[0, 3].any() and not server.cache[0, 4].any()
        assert server.grants.revoke("r1")
        server.cache.zero_()  # the blocks go to another request
        with pytest.raises(OSError):
            for _ in range(100):  # the connection is shut: sending fails within a few tries
                s.sendall(b"\x02" * block)
                pause.wait(0.01)
    assert not server.cache.any(), "bytes sent after revoke() landed in the cache"
