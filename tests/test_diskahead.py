"""Cached chunks read ahead of a streaming reader by worker threads (caiosfs.diskahead): the
reader finds them in memory, the loop reads nothing from disk, a corrupted chunk is never
handed out, and the memory they take is the read budget's."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import data, xxh

from caiosfs.cache import BlockCache
from caiosfs.index import Index
from caiosfs.metrics import Metrics
from caiosfs.reader import Fetcher, MemoryBudget, ObjRef, Reader
from caiosfs.store.client import StoreClient
from caiosfs.store.memory import MemoryStore

MiB = 1 << 20


def _setup(tmp: Path, body: bytes, memory: int = 256 * MiB
           ) -> tuple[MemoryStore, BlockCache, Reader, Fetcher, ObjRef]:
    """An object whose every chunk is in the cache (written as a GET writes them, so no
    chunk is in memory), and a reader over that cache."""
    store = MemoryStore("b")
    etag = store.put_bytes("k", body)
    obj = ObjRef("b", "k", etag, len(body))
    tmp.mkdir()
    m = Metrics()
    cache = BlockCache(tmp, Index(tmp / "index.lmdb"), m, 1 << 30, 4 * MiB)
    w = cache.writer(obj.ident, len(body))
    for off in range(0, len(body), MiB):
        w(off, body[off:off + MiB])
    w.close()
    cache.commit(obj.ident, len(body), w.done)
    fetcher = Fetcher(StoreClient(store, m, parallel=4, read_timeout=5), cache, m,
                      MemoryBudget(memory, m), max_request=8 * MiB)
    store.calls.clear()
    return store, cache, Reader(cache, fetcher, m, readahead_max=64 * MiB), fetcher, obj


async def _stream(reader: Reader, fetcher: Fetcher, obj: ObjRef, size: int = 128 * 1024,
                  check: Any = None) -> bytes:
    out = bytearray()
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        while len(out) < obj.size:
            out += await reader.read(obj, ra, len(out), size)
            if check is not None:
                check()
        while reader.disk.running:  # (bounded: each load ends by itself)
            await trio.sleep(0.01)
        n.cancel_scope.cancel()
    return bytes(out)


@pytest.mark.parametrize("mode", ["o_direct", "page_cache", "o_direct_refused"])
async def test_a_streaming_reader_finds_cached_chunks_read_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    body = data(40 * MiB + 77, "ahead")  # (the last chunk is short: read through the page cache)
    store, cache, reader, fetcher, obj = _setup(tmp_path / "c", body)
    cache.direct_read = mode != "page_cache"
    direct = mode == "o_direct"
    if mode == "o_direct_refused":  # (a file system without O_DIRECT: the page cache, at once)
        real_open = os.open

        def no_direct(path: Any, flags: int, *a: Any) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)
        monkeypatch.setattr(os, "open", no_direct)
    on_loop: list[int] = []  # chunk reads the loop did itself
    pread = cache._pread
    monkeypatch.setattr(cache, "_pread", lambda *a: on_loop.append(a[3]) or pread(*a))
    loads: list[int] = []
    load = cache.load
    monkeypatch.setattr(cache, "load", lambda todo, take: loads.extend(
        ld.chunk for ld in todo) or load(todo, take))
    preadv = os.preadv
    direct_calls: list[int] = []
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: direct_calls.append(len(bufs))
                        or preadv(fd, bufs, off))

    out = await _stream(reader, fetcher, obj)

    assert xxh(out) == xxh(body)
    assert store.calls.get("get", 0) == 0  # all of it from the cache
    # The first read's chunk is read by the loop (nothing is ahead of it yet); every other
    # chunk was read by a worker before its reader came for it, each exactly once.
    assert len(on_loop) <= 1, on_loop
    assert sorted(loads) == list(range(1, 41))
    assert bool(direct_calls) == direct  # (whole chunks, a preadv per block file)
    assert cache.direct_read == direct
    assert fetcher.budget.used == 0 and cache.fresh_bytes == 0
    assert cache.metrics.cache_checksum_failures._value.get() == 0


def _flip(path: Path, offset: int) -> None:
    """Corrupt one byte of a file, on disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


async def test_a_chunk_that_fails_its_checksum_is_refetched_not_handed_out(
        tmp_path: Path) -> None:
    body = data(24 * MiB, "bad")
    store, cache, reader, fetcher, obj = _setup(tmp_path / "c", body)
    _flip(cache.block_path(obj.ident, 1), MiB + 12345)  # chunk 5 (4 MiB blocks)

    out = await _stream(reader, fetcher, obj)

    assert xxh(out) == xxh(body)
    assert cache.metrics.cache_checksum_failures._value.get() == 1
    assert store.calls.get("get", 0) >= 1  # the bad chunk came again from the store
    assert cache.missing(obj.ident, 0, 23) == []  # and was cached anew


async def test_loads_stay_within_the_hold_and_the_read_budget(tmp_path: Path) -> None:
    body = data(48 * MiB, "budget")
    _, cache, reader, fetcher, obj = _setup(tmp_path / "c", body, memory=16 * MiB)
    seen: list[int] = []

    def check() -> None:
        seen.append(cache.fresh_bytes)
        assert cache.fresh_bytes <= fetcher.hold_limit
        assert fetcher.budget.used <= fetcher.budget.limit

    out = await _stream(reader, fetcher, obj, size=MiB, check=check)

    assert xxh(out) == xxh(body)
    assert max(seen) > 0  # (something was read ahead)
    assert fetcher.budget.used == 0


async def test_blocks_evicted_under_a_reader_are_fetched_again(tmp_path: Path) -> None:
    """The whole cache evicted between reads, loads in flight or not: every byte still
    matches the source (what a load could not read is fetched from the store)."""
    body = data(32 * MiB, "evict")
    store, cache, reader, fetcher, obj = _setup(tmp_path / "c", body)
    reads = 0

    def evict_sometimes() -> None:
        nonlocal reads
        reads += 1
        if reads % 37 == 0:
            cache.evict(0)

    out = await _stream(reader, fetcher, obj, check=evict_sometimes)

    assert xxh(out) == xxh(body)
    assert store.calls.get("get", 0) > 0  # (the evictions did take chunks away)
    assert cache.metrics.cache_checksum_failures._value.get() == 0
    assert fetcher.budget.used == 0
