import pytest

from pdserve.engine.block_pool import BlockPool, NoFreeBlocksError


def test_allocate_free_roundtrip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free == 0 and len(set(a + b)) == 8
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8
    pool.check_integrity()


def test_refcount_keeps_block_until_last_free():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.incref([blk])
    pool.free([blk])
    assert pool.num_free == 1
    pool.free([blk])
    assert pool.num_free == 2
    pool.check_integrity()


def test_double_free_and_bad_size_rejected():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.free([blk])
    with pytest.raises(ValueError, match="double free"):
        pool.free([blk])
    with pytest.raises(ValueError):
        BlockPool(0)


def test_integrity_detects_leak():
    pool = BlockPool(4)
    pool.allocate(1)
    pool._ref[next(iter(pool._free))] = 1  # corrupt: a free block marked used
    with pytest.raises(AssertionError):
        pool.check_integrity()
