"""Unit tests without FUSE: config, error mapping, cache, readahead, fetcher, write-back,
retries — all against the in-memory store."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import data, xxh

from caiosfs.attrs import Attrs, from_meta
from caiosfs.cache import BlockCache, fsck, lock_cache_dir
from caiosfs.compose import build_core
from caiosfs.config import build_config, parse_size, parse_source
from caiosfs.errors import FsError, PreconditionFailed, StoreError, UserError, s3_errno
from caiosfs.fs import Filesystem
from caiosfs.index import Index, open_index
from caiosfs.metrics import Metrics
from caiosfs.reader import Fetcher, MemoryBudget, ObjRef, Readahead, Reader
from caiosfs.store.client import GAVE_UP_MEMORY, GaveUp, StoreClient
from caiosfs.store.memory import MemoryStore
from caiosfs.writeback import INLINE_MAX, SPARES, DirtyFile, WriteBack, part_size_for

MiB = 1 << 20


# config ------------------------------------------------------------------------------
def test_source_and_options() -> None:
    assert parse_source("s3://bkt/a/b/").prefix == "a/b/"
    assert parse_source("s3://bkt").prefix == ""
    for bad in ("bkt/x", "s3://", "s3://UPPER/x", "s3://bkt/a//b", "s3://bkt/../x"):
        with pytest.raises(UserError):
            parse_source(bad)
    cfg = build_config("s3://bkt/p", "endpoint=caios,cache_size=2G,profile=dataset,ro")
    assert cfg.endpoint == "https://cwobject.com" and cfg.cache_size == 2 << 30
    assert cfg.entry_ttl == float("inf") and cfg.metadata == "list" and cfg.ro
    assert build_config("s3://b1b", "profile=devbox").metadata == "head"
    assert build_config("s3://b1b", "endpoint=lota").endpoint == "http://cwlota.com"
    assert not build_config("s3://b1b", "endpoint=caios").path_style
    # explicit options beat the profile
    assert build_config("s3://b1b", "profile=dataset,entry_ttl=3").entry_ttl == 3
    for bad in ("nope=1", "cache_size=x", "profile=fast", "fsync=maybe", "ro,rw",
                "endpoint=ftp://x", "part_size=1M", "aws_secret_access_key=s", "cache_dir"):
        with pytest.raises(UserError):
            build_config("s3://b1b", bad)
    assert parse_size("1.5G") == 3 << 29 and parse_size("64M") == 64 * MiB


def test_error_table() -> None:
    assert s3_errno("NoSuchKey") == errno.ENOENT
    assert s3_errno("AccessDenied") == errno.EACCES
    assert s3_errno("WeirdNewCode") == errno.EIO
    assert s3_errno("x", 404) == errno.ENOENT
    assert StoreError("SlowDown", retryable=True).errno == errno.EAGAIN


def test_attrs_roundtrip_and_bad_metadata() -> None:
    a = Attrs(0o100640, 5, 6, 1234.0, 10)
    b = from_meta(a.to_meta(), is_dir=False, default_mode=0o644, uid=0, gid=0, mtime=0, size=10)
    assert (b.mode, b.uid, b.gid, int(b.mtime)) == (0o100640, 5, 6, 1234)
    junk = from_meta({"mode": "banana", "uid": "-"}, is_dir=False, default_mode=0o600, uid=7,
                     gid=8, mtime=99.0)
    assert (junk.mode, junk.uid, junk.gid, junk.mtime) == (0o100600, 7, 8, 99.0)
    # a directory mode on a file object is ignored
    assert from_meta({"mode": str(0o40755)}, is_dir=False, default_mode=0o644, uid=0, gid=0,
                     mtime=0).mode == 0o100644


# cache -------------------------------------------------------------------------------
def _cache(tmp: Path, size: int = 1 << 30, block: int = 4 * MiB) -> BlockCache:
    tmp.mkdir(exist_ok=True)
    return BlockCache(tmp, Index(tmp / "index.lmdb"), Metrics(), size, block)


def _fill(cache: BlockCache, ident: bytes, body: bytes, start: int, length: int) -> None:
    w = cache.writer(ident, len(body))
    for off in range(start, start + length, 300_000):
        w(off, body[off:min(off + 300_000, start + length)])
    cache.commit(ident, len(body), w.done)


def test_cache_roundtrip_corruption_and_eviction(tmp_path: Path) -> None:
    c = _cache(tmp_path / "c", size=10 * MiB)
    body = data(9 * MiB + 5, "c")
    ident = b"b\0k\0etag1"
    assert c.read(ident, 0, 10, len(body)) is None
    _fill(c, ident, body, 0, len(body))
    assert c.read(ident, 123, 5 * MiB, len(body)) == body[123:123 + 5 * MiB]
    assert c.used == len(body)
    # corrupt chunk 5 on disk: the read must not return wrong bytes
    c.index.close()
    c2 = _cache(tmp_path / "c", size=10 * MiB)  # fresh: nothing verified in memory
    path = c2.block_path(ident, 1)
    with open(path, "r+b") as fh:
        fh.seek(MiB + 10)
        fh.write(b"\xff\xfe")
    assert c2.read(ident, 5 * MiB, MiB, len(body)) is None
    assert c2.metrics.value("caiosfs_cache_checksum_failures_total") == 1
    assert c2.missing(ident, 0, 9) == [5]
    # eviction keeps the cache under its limit and drops the oldest object first
    other = b"b\0k2\0e"
    body2 = data(4 * MiB, "o")
    time.sleep(0.01)
    _fill(c2, other, body2, 0, len(body2))
    assert c2.over_limit()
    c2.evict()
    assert c2.used <= 9 * MiB
    assert c2.read(other, 0, 10, len(body2)) == body2[:10]
    c2.index.close()



def test_small_reads_of_a_verified_chunk_check_only_their_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a small random read has verified a chunk whole, later small random reads of it
    (after it left the verified chunks kept in memory) read and check only the 64 KiB
    pieces they touch; a piece that no longer matches drops the chunk, and no wrong byte is
    returned. A streaming reader's reads check whole chunks, as before."""
    from caiosfs.cache import SUB_BLOCK

    c = BlockCache(tmp_path, Index(tmp_path / "index.lmdb"), Metrics(), 1 << 30, 4 * MiB,
                   verified_budget=0)  # (nothing stays verified in memory)
    body = data(3 * MiB + 12345, "s")
    ident = b"b\0k\0etag1"
    _fill(c, ident, body, 0, len(body))
    reads: list[int] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: (reads.append(n), real(fd, n, off))[1])
    assert c.read(ident, MiB + 100, 4096, len(body), random=True) == body[MiB + 100:MiB + 4196]
    assert reads == [MiB]  # the first: the whole chunk, checked against its checksum
    for off in (MiB + 200_000, MiB + SUB_BLOCK - 10, 3 * MiB + 12000):  # (the short last chunk)
        reads.clear()
        if off > 3 * MiB:  # (its first small read verifies it whole)
            assert c.read(ident, off, 300, len(body), random=True) == body[off:off + 300]
            reads.clear()
        assert c.read(ident, off, 300, len(body), random=True) == body[off:off + 300]
        assert reads == [2 * SUB_BLOCK if off == MiB + SUB_BLOCK - 10 else
                         min(SUB_BLOCK, len(body) - off // SUB_BLOCK * SUB_BLOCK)], (off, reads)
    # A large read, or a streaming reader's small one, still checks whole chunks.
    reads.clear()
    assert c.read(ident, 0, 2 * MiB, len(body), random=True) == body[:2 * MiB]
    assert reads == [MiB, MiB]
    reads.clear()
    assert c.read(ident, MiB + 100, 4096, len(body)) == body[MiB + 100:MiB + 4196]
    assert reads == [MiB]
    # Corruption in the piece a small read touches: the chunk is dropped, nothing wrong
    # comes back; in a piece it does not touch, the small read needs none of it.
    with open(c.block_path(ident, 0), "r+b") as fh:
        fh.seek(MiB + 300_000)
        fh.write(b"\xff\xfe")
    assert c.read(ident, MiB + 100, 4096, len(body), random=True) == body[MiB + 100:MiB + 4196]
    assert c.read(ident, MiB + 300_000 - 50, 100, len(body), random=True) is None
    assert c.metrics.value("caiosfs_cache_checksum_failures_total") == 1
    assert c.missing(ident, 0, 3) == [1]
    assert c.read(ident, MiB + 100, 4096, len(body), random=True) is None  # (gone: fetched again)
    # Digests are taken only from bytes that match the index's checksum of the chunk.
    c._note_pieces(ident, 2, b"x" * MiB)
    assert (ident, 2) not in c._subsums
    c._note_pieces(ident, 2, body[2 * MiB:3 * MiB])
    assert (ident, 2) in c._subsums
    c.index.close()


def test_free_space_is_looked_at_again_when_it_may_have_run_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """over_limit() after every GET does not statfs every time while the disk has room to
    spare, but does as soon as the room may be short or the last look is old; a disk below
    the floor is always seen."""
    import shutil
    from collections import namedtuple

    import caiosfs.cache as cache_mod
    c = _cache(tmp_path / "c", size=1 << 40)
    c.min_free = 100 * MiB
    free = [10 << 30]
    looks = []
    Usage = namedtuple("Usage", "total used free")

    def disk_usage(path: object) -> Usage:
        looks.append(path)
        return Usage(1 << 40, 0, free[0])
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    c.used = MiB
    assert not c.over_limit() and len(looks) == 1
    for _ in range(100):
        assert not c.over_limit()
    assert len(looks) == 1  # 10 GiB free a moment ago: no need to look again
    c.used += (10 << 30) - 300 * MiB  # the cache itself wrote most of the room since
    free[0] = 200 * MiB
    assert not c.over_limit() and len(looks) == 2  # near the floor: looked again
    free[0] = 50 * MiB  # something else filled the disk
    assert c.over_limit() and len(looks) == 3  # within the margin: looks every time
    free[0] = 10 << 30
    assert not c.over_limit() and len(looks) == 4
    monkeypatch.setattr(cache_mod, "FREE_RECHECK", 0.0)
    free[0] = 50 * MiB
    assert c.over_limit() and len(looks) == 5  # an old look is not trusted
    c.index.close()


def test_fuse_background_is_raised_never_lowered(tmp_path: Path) -> None:
    """The mount raises its FUSE connection's max_background/congestion_threshold through
    fusectl (/sys/fs/fuse/connections/<minor>/), keeps higher values an admin set, and
    without fusectl it only says so."""
    from caiosfs.mount import FUSE_CONGESTION, FUSE_MAX_BACKGROUND, raise_fuse_background
    conn = tmp_path / "57"
    conn.mkdir()
    (conn / "max_background").write_text("12\n")
    (conn / "congestion_threshold").write_text("9\n")
    assert raise_fuse_background("0:57", tmp_path)
    assert int((conn / "max_background").read_text()) == FUSE_MAX_BACKGROUND
    assert int((conn / "congestion_threshold").read_text()) == FUSE_CONGESTION
    (conn / "max_background").write_text("500\n")
    assert raise_fuse_background("0:57", tmp_path)
    assert int((conn / "max_background").read_text()) == 500
    assert not raise_fuse_background("0:58", tmp_path)  # no such connection: no error


def test_block_file_names_are_the_block_paths(tmp_path: Path) -> None:
    """The string path of the hot paths is the pathlib one (xxh3-128 of the ident, two
    hex digits of fan-out), for short and hashed idents, before and after its memo fills."""
    import xxhash
    c = _cache(tmp_path / "c")
    idents = [b"b\0k\0e", b"#xxh3-128:" + b"f" * 32, "b\0ü/ä\0\"e\"".encode()]
    for _ in range(2):
        for ident in idents:
            h = xxhash.xxh3_128_hexdigest(ident)
            for n in (0, 7, 1234):
                want = tmp_path / "c" / "blocks" / h[:2] / f"{h}.{n}"
                assert c.block_file(ident, n) == str(want) == str(c.block_path(ident, n))
    for i in range(5000):  # the memo is bounded
        c.block_file(i.to_bytes(4, "big"), 0)
    assert len(c._hexes) <= 4097
    c.index.close()


def test_fsck_finds_and_repairs(tmp_path: Path) -> None:
    c = _cache(tmp_path / "f")
    body = data(3 * MiB, "f")
    ident = b"b\0k\0e"
    _fill(c, ident, body, 0, len(body))
    with open(c.block_path(ident, 0), "r+b") as fh:
        fh.write(b"XX")
    (c.blocks_dir / "zz").mkdir()
    (c.blocks_dir / "zz" / "orphan.0").write_bytes(b"x")
    c.index.close()
    index = open_index(tmp_path / "f")
    try:
        s = fsck(index, tmp_path / "f", repair=True)
        assert s["chunks_bad"] == 1 and s["chunks_ok"] == 2 and s["orphan_files"] == 1
        s = fsck(index, tmp_path / "f", repair=False)
        assert s["chunks_bad"] == 0 and s["orphan_files"] == 0
    finally:
        index.close()


def test_cache_dir_lock_refuses_second_user(tmp_path: Path) -> None:
    fd = lock_cache_dir(tmp_path / "l")
    assert (tmp_path / "l").stat().st_mode & 0o777 == 0o700
    with pytest.raises(UserError, match="in use"):
        lock_cache_dir(tmp_path / "l")
    os.close(fd)
    os.close(lock_cache_dir(tmp_path / "l"))


# readahead and fetching ---------------------------------------------------------------
def test_readahead_window_doubles_and_resets() -> None:
    ra = Readahead(initial=1 * MiB, maximum=8 * MiB)
    windows = []
    off = 0
    for _ in range(6):
        assert ra.observe(off, 128 * 1024)
        windows.append(ra.window)
        off += 128 * 1024
    assert windows == [MiB, 2 * MiB, 4 * MiB, 8 * MiB, 8 * MiB, 8 * MiB]
    assert not ra.observe(500 * MiB, 4096)
    assert ra.window == 0


def _reader(tmp: Path, store: MemoryStore, memory: int = 64 * MiB
            ) -> tuple[Reader, Fetcher, MemoryBudget]:
    m = Metrics()
    cache = _cache(tmp)
    client = StoreClient(store, m, parallel=4, read_timeout=5)
    budget = MemoryBudget(memory, m)
    fetcher = Fetcher(client, cache, m, budget, max_request=16 * MiB)
    return Reader(cache, fetcher, m, readahead_max=64 * MiB), fetcher, budget


async def test_sequential_read_through_reader(tmp_path: Path) -> None:
    store = MemoryStore("b")
    body = data(40 * MiB + 77, "seq")
    etag = store.put_bytes("k", body)
    reader, fetcher, budget = _reader(tmp_path / "r", store)
    obj = ObjRef("b", "k", etag, len(body))
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        out = bytearray()
        while len(out) < len(body):
            out += await reader.read(obj, ra, len(out), 128 * 1024)
        n.cancel_scope.cancel()
    assert xxh(out) == xxh(body)
    # requests were large (readahead), not one per 128 KiB read
    assert store.calls["get"] <= 10
    assert budget.used == 0


async def test_random_reads_fetch_only_what_they_touch(tmp_path: Path) -> None:
    store = MemoryStore("b")
    body = data(64 * MiB, "rnd")
    etag = store.put_bytes("k", body)
    reader, fetcher, _ = _reader(tmp_path / "r", store)
    obj = ObjRef("b", "k", etag, len(body))
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        for off in (50 * MiB + 3, 7 * MiB, 33 * MiB + 999_999):
            assert await reader.read(obj, ra, off, 4096) == body[off:off + 4096]
        # a first touch fetches just the bytes asked for, nothing is cached
        assert reader.metrics.value("caiosfs_s3_bytes_in_total") == 3 * 4096
        assert reader.cache.used == 0
        # a second read in a chunk already touched fetches and caches that chunk
        off = 7 * MiB + 100_000
        assert await reader.read(obj, ra, off, 4096) == body[off:off + 4096]
        assert reader.cache.used == MiB
        assert await reader.read(obj, ra, off + 5000, 4096) == body[off + 5000:off + 9096]
        n.cancel_scope.cancel()
    assert reader.metrics.value("caiosfs_s3_bytes_in_total") == 3 * 4096 + MiB


async def test_fetched_chunks_wait_in_memory_for_their_reader(tmp_path: Path) -> None:
    store = MemoryStore("b")
    a, b = data(40 * MiB + 5, "a"), data(40 * MiB, "b")
    obj_a = ObjRef("b", "a", store.put_bytes("a", a), len(a))
    obj_b = ObjRef("b", "b", store.put_bytes("b", b), len(b))
    reader, fetcher, budget = _reader(tmp_path / "r", store, memory=32 * MiB)
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        got = bytearray()
        while len(got) < obj_a.size:
            got += await reader.read(obj_a, ra, len(got), 128 * 1024)
        assert xxh(got) == xxh(a)
        # every chunk went from the GET to the reader in memory: none was read back from disk
        assert reader.metrics.value("caiosfs_cache_hit_chunks_total") == 0
        with trio.fail_after(10):  # the last GET returns its charge as it ends
            while fetcher.running:
                await trio.sleep(0.01)
        assert budget.used == 0
        # A reader that stops: the chunks fetched ahead for it stay charged to the budget
        # (up to half of it) ...
        assert await reader.read(obj_b, reader.new_readahead(), 0, MiB) == b[:MiB]
        with trio.fail_after(10):
            while fetcher.running:
                await trio.sleep(0.01)
        assert 0 < reader.cache.fresh_bytes == budget.used <= 16 * MiB
        # ... and are dropped as soon as a request needs the memory.
        with trio.fail_after(1):
            await budget.acquire(32 * MiB)
        assert reader.cache.fresh_bytes == 0
        budget.release(32 * MiB)
        # what was dropped from memory is still on disk, and verified when read
        off = 5 * MiB + 3
        assert await reader.read(obj_b, reader.new_readahead(), off, MiB) == b[off:off + MiB]
        n.cancel_scope.cancel()


def _streaming_reader(tmp: Path, store: MemoryStore, memory: int, parallel: int
                      ) -> tuple[Reader, Fetcher, Metrics]:
    """A reader of 8 MiB requests, ``parallel`` GETs in flight, a ``memory`` budget."""
    m = Metrics()
    cache = _cache(tmp / "r")
    fetcher = Fetcher(StoreClient(store, m, parallel=parallel, read_timeout=5), cache, m,
                      MemoryBudget(memory, m), max_request=8 * MiB)
    return Reader(cache, fetcher, m, readahead_max=256 * MiB), fetcher, m


async def test_readahead_runs_no_further_ahead_than_the_hold_keeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader slower than the store: the stream asks for no more than its share of the
    hold ahead of it, so what arrives early waits in memory instead of being dropped and
    read back from the cache file (a cold 1 GiB read read back half its chunks when the
    window was the pipe's share, 20-40 requests, against a 128 MiB hold)."""
    import caiosfs.reader as reader_mod
    monkeypatch.setattr(reader_mod, "STALL_RECENT", -1.0)  # (waits do not widen the lead)
    store = MemoryStore("b")
    body = data(96 * MiB, "slow")
    obj = ObjRef("b", "k", store.put_bytes("k", body), len(body))
    reader, fetcher, m = _streaming_reader(tmp_path, store, memory=64 * MiB, parallel=8)
    assert fetcher.hold_limit == 32 * MiB  # half the budget
    lead = 0
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        got = bytearray()
        while len(got) < obj.size:
            got += await reader.read(obj, ra, len(got), MiB)
            lead = max(lead, ra.fetched_until - len(got))
            with trio.fail_after(10):  # the reader is the slow side: every GET is done
                while fetcher.running:
                    await trio.sleep(0.001)
        n.cancel_scope.cancel()
    assert xxh(got) == xxh(body)
    # the pipe's share would be 1.25 x 8 GETs x 8 MiB = 80 MiB ahead; the hold's is 32
    assert lead <= 32 * MiB
    assert m.value("caiosfs_cache_hit_chunks_total") == 0


class _RateStore(MemoryStore):
    """Each GET streams at a fixed rate, as one connection to a remote store does; counts
    the GETs running at once."""

    def __init__(self, seconds_per_mib: float) -> None:
        super().__init__("b")
        self.seconds_per_mib = seconds_per_mib
        self.running = self.most = 0
        self._lock = threading.Lock()

    def get_range(self, key: str, start: int, length: int, etag: str | None,
                  sink: Callable[[int, bytes], None]) -> None:
        def paced(off: int, piece: bytes) -> None:
            time.sleep(self.seconds_per_mib * len(piece) / MiB)
            sink(off, piece)
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            super().get_range(key, start, length, etag, paced)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_stream_waiting_on_the_store_fills_the_pipe(tmp_path: Path) -> None:
    """A reader faster than a rate-limited store: the stream keeps as many GETs in flight
    as the pipe allows, not only as many as its share of the hold would take whole (half of
    what is in flight has not arrived yet). One and a half times the hold kept a lone
    stream at 12 of 16 GETs here (behind 20 ms and 50 MB/s per connection: 8.7 on average,
    raw boto3 16)."""
    store = _RateStore(seconds_per_mib=0.02)  # 50 MB/s per GET
    body = data(256 * MiB, "rate")
    obj = ObjRef("b", "k", store.put_bytes("k", body), len(body))
    # (16 GETs of 3 MiB each and the hold fit in the budget)
    reader, fetcher, _ = _streaming_reader(tmp_path, store, memory=128 * MiB, parallel=16)
    budget = fetcher.budget
    assert fetcher.hold_limit == 64 * MiB and reader.pipe.size == 16
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        got = bytearray()
        while len(got) < obj.size:
            got += await reader.read(obj, ra, len(got), MiB)
        n.cancel_scope.cancel()
    assert xxh(got) == xxh(body)
    assert store.most >= 15  # (the pipe's 16; 13 at most with the lead at 1.5 x the hold)
    assert budget.used == 0


async def test_memory_budget_bounds_in_flight_bytes(tmp_path: Path) -> None:
    """What reads really hold in memory - pieces the running GETs delivered (in worker
    threads) that the loop has not committed yet, plus the fetched chunks kept for their
    readers - stays within memory_limit while six readers want more. (A GET's bytes still
    on the wire are not memory: each piece goes to its cache file as it arrives, and a GET
    waits while PENDING_PIECES of its chunks wait for the loop.)"""
    store = MemoryStore("b")
    peak = 0
    in_transit = 0  # delivered by a GET, not yet committed by the loop
    wire = 0  # bytes the running GETs may still deliver (not memory: for the last check)
    wire_peak = 0
    lock = threading.Lock()
    reader, fetcher, _ = _reader(tmp_path / "r", store, memory=16 * MiB)
    orig = store.get_range
    orig_commit = reader.cache.commit_many

    def spy(key: str, start: int, length: int, etag: str | None,
            sink: Callable[[int, bytes], None]) -> None:
        nonlocal peak, in_transit, wire, wire_peak
        delivered = 0

        def counting(off: int, piece: bytes) -> None:
            nonlocal peak, in_transit, wire, delivered
            with lock:
                in_transit += len(piece)
                wire -= len(piece)
                peak = max(peak, in_transit + reader.cache.fresh_bytes)
            delivered += len(piece)
            sink(off, piece)
        with lock:
            wire += length
            wire_peak = max(wire_peak, wire)
        try:
            time.sleep(0.005)  # long enough for the others to start theirs, if allowed
            orig(key, start, length, etag, counting)
        finally:
            with lock:
                wire -= length - delivered

    def commit(batches: list[tuple[bytes, int, list[tuple[int, int]]]]) -> None:
        nonlocal in_transit
        with lock:  # (one step: a chunk is either in transit or kept, never counted twice)
            orig_commit(batches)
            in_transit -= sum(reader.cache.chunk_len(c, obj_size)
                              for _, obj_size, chunks in batches for c, _ in chunks)
    store.get_range = spy  # type: ignore[method-assign]
    reader.cache.commit_many = commit  # type: ignore[method-assign]
    objs = []
    for i in range(6):
        body = data(24 * MiB, f"m{i}")
        objs.append((ObjRef("b", f"k{i}", store.put_bytes(f"k{i}", body), len(body)), body))
    async with trio.open_nursery() as n:
        fetcher.nursery = n

        async def readall(obj: ObjRef, body: bytes) -> None:
            ra = reader.new_readahead()
            got = bytearray()
            while len(got) < obj.size:
                got += await reader.read(obj, ra, len(got), MiB)
            assert xxh(got) == xxh(body)
        async with trio.open_nursery() as inner:
            for obj, body in objs:
                inner.start_soon(readall, obj, body)
        n.cancel_scope.cancel()
    # the readers wanted more than the limit in flight, and memory never held more
    assert wire_peak > 16 * MiB, wire_peak / MiB
    assert 2 * MiB < peak <= 16 * MiB, peak / MiB


def test_commit_many_records_several_objects_in_one_transaction(tmp_path: Path) -> None:
    """One commit of chunks of two objects (one chunk of a block already known, one
    recommitted): every chunk is readable and verified, sizes are counted once."""
    c = _cache(tmp_path / "c")
    a, b = data(3 * MiB, "a"), data(MiB + 7, "b")
    ia, ib = b"b\0a\0e", b"b\0b\0e"
    _fill(c, ia, a, 0, MiB)  # chunk 0 of a committed alone first
    wa, wb = c.writer(ia, len(a)), c.writer(ib, len(b))
    wa(MiB, a[MiB:])
    wb(0, b)
    c.commit_many([(ia, len(a), wa.done), (ib, len(b), wb.done), (ia, len(a), wa.done[:1])])
    assert c.missing(ia, 0, 2) == [] and c.missing(ib, 0, 1) == []
    assert c.used == len(a) + len(b)
    assert c.read(ia, 0, len(a), len(a)) == a
    assert c.read(ib, 0, len(b), len(b)) == b
    assert c.metrics.value("caiosfs_cache_miss_chunks_total") == 1 + 2 + 2 + 1
    c.index.close()


async def test_chunks_delivered_while_the_loop_is_busy_commit_together(
        tmp_path: Path) -> None:
    """GET threads deliver chunks while the loop is busy elsewhere: the loop then commits
    them in fewer transactions than chunks, and every byte still reads back right."""
    store = MemoryStore("b")
    reader, fetcher, _ = _reader(tmp_path / "r", store)
    objs = []
    for i in range(4):
        body = data(4 * MiB + 11 * i, f"busy{i}")
        objs.append((ObjRef("b", f"k{i}", store.put_bytes(f"k{i}", body), len(body)), body))
    calls: list[int] = []
    orig = reader.cache.commit_many

    def commit_many(batches: list[tuple[bytes, int, list[tuple[int, int]]]]) -> None:
        calls.append(sum(len(ch) for _, _, ch in batches))
        orig(batches)
    reader.cache.commit_many = commit_many  # type: ignore[method-assign]
    # (the GETs wait until the loop is about to be busy: under a loaded CI run a fixed
    # 50 ms let some deliver, and be committed one by one, before it was)
    go = threading.Event()
    arrived: list[int] = []
    get_range = store.get_range

    def held_get_range(*a: Any) -> None:
        arrived.append(1)
        go.wait(10)
        get_range(*a)
    store.get_range = held_get_range  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        for obj, _ in objs:
            fetcher.prefetch(obj, 0, (obj.size - 1) // MiB)
        with trio.fail_after(10):  # the GETs start and wait (all four)...
            while len(arrived) < len(objs):
                await trio.sleep(0.01)
        go.set()
        time.sleep(0.5)  # noqa: ASYNC251 - ... and deliver while the loop is busy
        for obj, _ in objs:
            await fetcher.ensure(obj, 0, (obj.size - 1) // MiB)
        n.cancel_scope.cancel()
    assert sum(calls) == sum(-(-obj.size // MiB) for obj, _ in objs)
    assert max(calls) > 1, calls  # some transactions took several chunks
    for obj, body in objs:
        assert reader.cache.read(obj.ident, 0, obj.size, obj.size) == body
    assert not fetcher._delivered and not fetcher._commit_queued


async def test_small_files_cost_one_get_each(tmp_path: Path) -> None:
    """A data loader's pattern: 16 readers each read small files whole. Each file is one
    GET (its only chunk, committed as the GET returns, is there for its reader: no second
    GET), the bytes are right, and the chunks were held for their readers, not read back."""
    store = MemoryStore("b")
    reader, fetcher, budget = _reader(tmp_path / "r", store)
    files = []
    for i in range(64):
        body = data(80_000 + 613 * i, f"small{i}")
        files.append((ObjRef("b", f"s{i}", store.put_bytes(f"s{i}", body), len(body)), body))
    before = store.calls["get"]
    async with trio.open_nursery() as n:
        fetcher.nursery = n

        async def worker(k: int) -> None:
            for obj, body in files[k::16]:
                assert await reader.read(obj, reader.new_readahead(), 0, MiB) == body
        async with trio.open_nursery() as inner:
            for k in range(16):
                inner.start_soon(worker, k)
        n.cancel_scope.cancel()
    assert store.calls["get"] - before == len(files)
    assert reader.metrics.value("caiosfs_cache_hit_chunks_total") == 0  # no read-back
    assert budget.used == 0 and reader.cache.fresh_bytes == 0


async def test_changed_object_is_never_served_stale(tmp_path: Path) -> None:
    store = MemoryStore("b")
    old = store.put_bytes("k", b"A" * MiB)
    reader, fetcher, _ = _reader(tmp_path / "r", store)
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        assert await reader.read(ObjRef("b", "k", old, MiB), reader.new_readahead(), 0,
                                 10) == b"A" * 10
        new = store.put_bytes("k", b"B" * MiB)
        assert await reader.read(ObjRef("b", "k", new, MiB), reader.new_readahead(), 0,
                                 10) == b"B" * 10
        n.cancel_scope.cancel()
    # reading the old version, now gone from the store, fails: it never returns B
    reader2, fetcher2, _ = _reader(tmp_path / "r2", store)
    async with trio.open_nursery() as n:
        fetcher2.nursery = n
        with pytest.raises(FsError) as ei:
            await reader2.read(ObjRef("b", "k", old, MiB), reader2.new_readahead(), 0, 10)
        assert ei.value.errno == errno.ESTALE
        n.cancel_scope.cancel()


# retries -------------------------------------------------------------------------------
async def test_reads_retry_then_give_up_in_bounded_time() -> None:
    store = MemoryStore("b")
    store.put_bytes("k", b"x" * 10)
    client = StoreClient(store, Metrics(), read_timeout=5)
    store.inject("head", StoreError("SlowDown", retryable=True, status=503), times=3)
    assert (await client.head("k")).size == 10
    assert client.metrics.value("caiosfs_s3_retries_total", op="head") == 3
    store.inject("head", StoreError("InternalError", retryable=True, status=500), times=10_000)
    t0 = trio.current_time()
    with pytest.raises(StoreError):
        await client.head("k")
    # (read_timeout, give or take the scheduling of a loaded machine: 5.004 s seen at load 9)
    assert trio.current_time() - t0 <= 5.25
    store._faults.clear()
    # Right after giving up, the same key fails at once (an open's lookup and its read are
    # back to back: a dead store must not cost read_timeout twice) ...
    t0 = trio.current_time()
    with pytest.raises(GaveUp):
        await client.head("k")
    assert trio.current_time() - t0 < 0.01
    # ... and is asked again once GAVE_UP_MEMORY has passed.
    await trio.sleep(GAVE_UP_MEMORY)
    assert (await client.head("k")).size == 10
    store.inject("head", StoreError("AccessDenied", status=403), times=1)
    with pytest.raises(StoreError) as ei:
        await client.head("k")
    assert ei.value.errno == errno.EACCES



async def test_status_counts_absent_objects_apart_from_errors() -> None:
    """A HEAD of a name that is not there (every lookup of a new name: git probes hundreds)
    is an answer, not a store error: `caiosfs status` counts it as "not found"."""
    store = MemoryStore("b")
    store.put_bytes("k", b"x")
    client = StoreClient(store, Metrics(), read_timeout=5)
    for _ in range(3):
        with pytest.raises(StoreError):
            await client.head("missing")
    store.inject("head", StoreError("AccessDenied", status=403), times=1)
    with pytest.raises(StoreError):
        await client.head("k")
    assert (await client.head("k")).size == 1
    snap = client.metrics.snapshot()
    assert (snap["s3_requests"], snap["s3_not_found"], snap["s3_errors"]) == (5, 3, 1)


# write-back ----------------------------------------------------------------------------
def _wb(tmp: Path, store: MemoryStore, inline_max: int = INLINE_MAX, **kw: object
        ) -> WriteBack:
    """A WriteBack on the in-memory store; ``inline_max=0`` gives every file a data file."""
    tmp.mkdir(exist_ok=True)
    m = Metrics()
    args: dict = {"part_size": 5 * MiB, "dirty_limit": 1 << 30, "upload_delay": 0.05,
                  "fsync_local": False, "on_uploaded": lambda f, e: None}
    args.update(kw)
    wb = WriteBack(StoreClient(store, m, read_timeout=5), Index(tmp / "index.lmdb"), m, tmp,
                   "pre/", **args)
    wb.inline_max = inline_max
    return wb


async def _write_open(wb: WriteBack, path: str, body: bytes,
                      attrs: Attrs | None = None) -> DirtyFile:
    """A new file written through ``wb`` and still open for writing."""
    f = await wb.create(path, attrs or Attrs(0o100644, 0, 0, 1.0))
    wb.opened(f, True)
    await wb.write(f, 0, body)
    return f


async def _write_closed(wb: WriteBack, path: str, body: bytes) -> DirtyFile:
    """A new file written through ``wb`` and closed (its upload then follows)."""
    f = await _write_open(wb, path, body)
    wb.released(f, True)
    return f


async def test_writeback_uploads_small_and_multipart(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        small = await wb.create("a.txt", Attrs(0o100600, 1, 2, 1000.0))
        wb.opened(small, True)
        await wb.write(small, 0, b"hello")
        wb.released(small, True)
        big = await wb.create("d/big.bin", Attrs(0o100644, 0, 0, 1000.0))
        wb.opened(big, True)
        body = data(23 * MiB + 11, "big")
        for off in range(0, len(body), MiB):
            await wb.write(big, off, body[off:off + MiB])
        await wb.fsync(big)  # durable in the store before returning
        assert store.objects["pre/d/big.bin"].data == body
        wb.released(big, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/a.txt"].data == b"hello"
    assert store.objects["pre/a.txt"].metadata["mode"] == str(0o100600)
    assert store.calls["upload_part"] >= 5 and not store.uploads
    assert wb.index.all_journal() == {}


async def _write_streaming(wb: WriteBack, path: str, body: bytes) -> DirtyFile:
    """A new file written sequentially in 1 MiB writes, still open; returned once its
    streaming multipart upload exists."""
    f = await wb.create(path, Attrs(0o100644, 0, 0, 1.0))
    wb.opened(f, True)
    for off in range(0, len(body), MiB):
        await wb.write(f, off, body[off:off + MiB])
    with trio.fail_after(10):
        while f.stream is None or not f.stream.upload_id:
            await trio.sleep(0.01)
    return f


async def test_parts_of_a_file_being_written_stream_beyond_a_backlog(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store)  # 5 MiB parts: the newest 16 (80 MiB) stay local
    body = data(120 * MiB, "backlog")
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_streaming(wb, "big", body)
        with trio.fail_after(10):
            while f.stream.sending:
                await trio.sleep(0.01)
        assert sorted(f.stream.etags) == list(range(1, 9))  # (120 - 80) / 5 parts
        wb.released(f, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/big"].data == body
    assert not store.uploads


async def test_complete_parts_of_a_streamed_file_go_at_close_not_after_the_delay(
        tmp_path: Path) -> None:
    """The parts a file being written kept local (its backlog) start at its last close; only
    the last part and the completion wait for upload_delay."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)  # 5 MiB parts, backlog 16 parts
    body = data(52 * MiB + 7, "atclose")
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_streaming(wb, "big", body)
        assert store.calls["upload_part"] == 0  # all within the backlog while written
        wb.released(f, True)
        with trio.fail_after(10):
            while f.stream.sending or len(f.stream.etags) < 10:
                await trio.sleep(0.01)
        assert sorted(f.stream.etags) == list(range(1, 11))  # the 10 full parts; not the 11th
        assert store.calls["upload_part"] == 10 and "pre/big" not in store.objects
        await wb.flush_all()  # (skips the delay) the last part and the completion
        n.cancel_scope.cancel()
    assert store.objects["pre/big"].data == body
    assert store.calls["upload_part"] == 11 and not store.uploads


async def test_a_part_rewritten_after_close_is_sent_again(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    body = bytearray(data(30 * MiB, "rewrite"))
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_streaming(wb, "big", bytes(body))
        wb.released(f, True)  # parts 1..6 start
        wb.opened(f, True)
        body[7 * MiB:8 * MiB] = b"x" * MiB  # part 2 again, while or after it was sent
        await wb.write(f, 7 * MiB, b"x" * MiB)
        wb.released(f, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/big"].data == bytes(body)
    assert not store.uploads


async def test_a_chmod_after_a_streamed_upload_began_reaches_the_store(tmp_path: Path) -> None:
    """A multipart upload's metadata is fixed when it is created: a chmod of a file whose
    parts were streaming starts a new one instead of completing the old (the model test
    found the old mode in the store)."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    body = data(30 * MiB, "chmod")
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_streaming(wb, "big", body)
        f.attrs.mode = 0o100600  # what Core._set_file_attrs does for fchmod
        f.gen += 1
        wb.released(f, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/big"].data == body
    assert store.objects["pre/big"].metadata["mode"] == str(0o100600)
    assert not store.uploads


async def test_writeback_keeps_both_versions_on_conflict(tmp_path: Path) -> None:
    store = MemoryStore("b")
    base = store.put_bytes("pre/c.txt", b"original")
    wb = _wb(tmp_path / "w", store)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await wb.create("c.txt", Attrs(0o100644, 0, 0, 1.0), base_etag=base)
        wb.opened(f, True)
        await wb.write(f, 0, b"ours")
        store.put_bytes("pre/c.txt", b"theirs")  # someone else writes meanwhile
        wb.released(f, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/c.txt"].data == b"theirs"
    sides = [k for k in store.objects if k.startswith("pre/c.txt.conflict-")]
    assert len(sides) == 1 and store.objects[sides[0]].data == b"ours"
    assert wb.metrics.value("caiosfs_conflicts_total") == 1


async def test_uploads_survive_a_failing_store(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store)
    store.inject("put", StoreError("ServiceUnavailable", status=503, retryable=True), times=8)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await wb.create("x", Attrs(0o100644, 0, 0, 1.0))
        wb.opened(f, True)
        await wb.write(f, 0, b"precious")
        wb.released(f, True)
        with trio.fail_after(60):
            await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/x"].data == b"precious"


async def test_journal_replay_uploads_after_crash(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await wb.create("r.bin", Attrs(0o100644, 0, 0, 1.0))
        wb.opened(f, True)
        await wb.write(f, 0, b"journaled" * 1000)
        n.cancel_scope.cancel()  # "crash": never released, never uploaded
    wb.index.close()
    assert "pre/r.bin" not in store.objects
    wb2 = _wb(tmp_path / "w", store)
    async with trio.open_nursery() as n:
        await n.start(wb2.run)
        assert await wb2.replay() == 1
        await wb2.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/r.bin"].data == b"journaled" * 1000


async def test_last_close_during_an_unlink_waiting_for_its_upload(tmp_path: Path) -> None:
    """unlink waits for an upload in flight; a reader closing meanwhile must not pull the
    data file from under that upload (it failed reading the cache, and the fd was closed
    twice: the second close could hit a descriptor reused by another file)."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=0)
    store.inject("put", StoreError("SlowDown", status=503, retryable=True), times=3)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_closed(wb, "x", b"data" * 1000)
        wb.opened(f, False)  # a reader keeps it open
        with trio.fail_after(10):
            while not f.uploading:
                await trio.sleep(0.005)
        async with trio.open_nursery() as ops:
            ops.start_soon(wb.unlink, "x")
            await trio.sleep(0.01)
            assert f.uploading  # the unlink is waiting for it
            wb.released(f, False)
        assert not f.data_path.exists()
        n.cancel_scope.cancel()
    assert wb.metrics.value("caiosfs_uploads_failed_total") == 0
    assert wb.index.all_journal() == {}


def test_part_size_grows_for_huge_files() -> None:
    assert part_size_for(10 << 30, 64 * MiB) == 64 * MiB
    ps = part_size_for(1 << 40, 64 * MiB)
    assert (1 << 40) / ps <= 10_000


def test_precondition_failed_is_not_retryable() -> None:
    assert not PreconditionFailed("x").retryable


def test_file_table_indexes_match_a_scan() -> None:
    """FileTable's per-directory and per-id indexes agree with a brute-force scan through
    any sequence of adds, replacements, renames and removals."""
    import random

    from caiosfs.writeback import FileTable
    rng = random.Random(7)
    t = FileTable()
    names = ["a", "a/b", "a/b/c", "a/x", "b", "b/y/z", "ab", "a/bb"]
    fid = 0
    for _ in range(2000):
        path = rng.choice(names)
        if path in t and rng.random() < 0.4:
            del t[path]
        elif rng.random() < 0.2 and path in t:
            f = t[path]
            dst = rng.choice(names)
            del t[path]
            f.path = dst
            t[dst] = f
        else:
            fid += 1
            t[path] = DirtyFile(fid, path, "k/" + path, None, Attrs(0o100644, 0, 0, 0.0),
                                Path("/nonexistent"), -1)
            t[path].deleted = rng.random() < 0.1
        for d in ["", "a", "a/b", "b", "b/y", "ab", "zz"]:
            pre = d + "/" if d else ""
            want_kids = {p[len(pre):]: f for p, f in t.items() if p.startswith(pre)
                         and "/" not in p[len(pre):] and not f.deleted}
            assert t.children(d) == want_kids
            if d:
                want_under = [f for p, f in t.items() if p.startswith(d + "/") and not f.deleted]
                assert t.under(d) == want_under
        for f in t.values():
            assert t.by_fid(f.fid) is f
        assert t.by_fid(10**9) is None


async def test_spare_files_are_used_and_reused_after_a_crash(tmp_path: Path) -> None:
    """New files take their data file from a pool made ahead of time; spares a crash left
    behind are kept, empty, for the next mount's new files (no new inodes), and journaled
    data files are uploaded."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, inline_max=0, upload_delay=3600)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        await wb.replay()  # starts the pool
        with trio.fail_after(10):
            while not wb._spares:
                await trio.sleep(0.01)
        fid = wb._spares[0][0]
        f = await wb.create("kept.bin", Attrs(0o100644, 0, 0, 1.0))
        assert f.fid == fid and f.data_path.exists()
        wb.opened(f, True)
        await wb.write(f, 0, b"keep me")
        await trio.sleep(0.1)
        n.cancel_scope.cancel()  # crash with spares on disk
    spares = [p for p in (tmp_path / "w" / "dirty").iterdir() if p.name != str(fid)]
    assert spares and all(p.stat().st_size == 0 for p in spares)
    inodes = {p.stat().st_ino for p in (tmp_path / "w" / "dirty").iterdir()}
    spares[0].write_bytes(b"stale")  # as if the crash came while it was being reused
    wb.index.close()
    wb2 = _wb(tmp_path / "w", store, inline_max=0)
    async with trio.open_nursery() as n:
        await n.start(wb2.run)
        assert await wb2.replay() == 1
        assert all(p.exists() and p.stat().st_size == 0 for p in spares)
        with trio.fail_after(10):
            while not wb2._spares:  # the pool refills from the kept files
                await trio.sleep(0.01)
        g = await wb2.create("new.bin", Attrs(0o100644, 0, 0, 1.0))
        assert os.fstat(g.fd).st_ino in inodes and os.fstat(g.fd).st_size == 0
        wb2.opened(g, True)
        await wb2.write(g, 0, b"new")
        wb2.released(g, True)
        await wb2.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/kept.bin"].data == b"keep me"
    assert store.objects["pre/new.bin"].data == b"new"


@pytest.mark.parametrize("endpoint,path_style,token,signing", [
    ("http://127.0.0.1:9000", True, None, None),
    ("http://127.0.0.1:80", True, "tok/en+=", None),
    ("https://s3.example.com", False, None, False),
    ("https://s3.example.com:8443", True, None, True),
])
def test_lean_signature_is_botocores(monkeypatch: pytest.MonkeyPatch, endpoint: str,
                                     path_style: bool, token: str | None,
                                     signing: bool | None) -> None:
    """The lean GET/HEAD/DELETE signer sends exactly the headers botocore's S3SigV4Auth
    would (same signature), whatever the key, headers, port, token and payload setting."""
    import datetime

    import botocore.auth
    from botocore.auth import _host_from_url
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    from caiosfs.store.lean import LeanS3
    from caiosfs.store.sigv4 import canonical_query
    when = datetime.datetime(2026, 12, 7, 0, 59, 1, tzinfo=datetime.UTC)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    cfg = Config(s3={"addressing_style": "path" if path_style else "virtual"}
                 | ({} if signing is None else {"payload_signing_enabled": signing}))
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", token)
    lean = LeanS3(endpoint, "my-bucket", "eu-west-3", path_style, creds, cfg, 4, 10, None)
    for method, key, headers in [
            ("GET", "data/s000001.jpg", {"Range": "bytes=0-1048575", "If-Match": '"e1"'}),
            ("HEAD", "dir with space/ümlaut+plus=eq&amp?q#h~t", {}),
            ("DELETE", "a//b/./c/../%41", {"X-Odd": "  two   spaces  "})]:
        req = AWSRequest(method, lean.url(key), headers=headers)
        req.context["client_config"] = cfg
        botocore.auth.S3SigV4Auth(creds.get_frozen_credentials(), "s3",
                                  "eu-west-3").add_auth(req)
        want = {k.lower(): v for k, v in req.headers.items()}
        got = lean.signed_headers(method, key, headers, now=when.timestamp())
        assert got.pop("host") == _host_from_url(lean.url(key)), (method, key)
        assert got == want, (method, key)
    # a listing: a request on the bucket itself, with a query
    query = canonical_query({"list-type": "2", "prefix": "a b/ü+&=", "max-keys": "1000",
                             "delimiter": "/", "continuation-token": "x/Y+z==",
                             "encoding-type": "url"})
    req = AWSRequest("GET", lean.url("", query))
    req.context["client_config"] = cfg
    botocore.auth.S3SigV4Auth(creds.get_frozen_credentials(), "s3", "eu-west-3").add_auth(req)
    got = lean.signed_headers("GET", "", {}, query, now=when.timestamp())
    got.pop("host")
    assert got == {k.lower(): v for k, v in req.headers.items()}
    assert lean.url("", "q=1").split("?")[0].rstrip("/").endswith(
        "/my-bucket" if path_style else "my-bucket.s3.example.com")


def test_lean_listing_parses_what_boto3_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """ListObjectsV2 through the lean path: URL-encoded keys and prefixes decoded as boto3
    decodes them (only when the server says it encoded them), sizes, quoted ETags,
    timestamps, the continuation token only while truncated; the request asks for it."""
    from caiosfs.store.s3 import S3Store
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    st = S3Store("bk", "http://127.0.0.1:9", "us-east-1", True)
    assert st._lean is not None
    ns = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    pages = {
        "first": f"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult{ns}><Name>bk</Name><Prefix>d%2F</Prefix><KeyCount>2</KeyCount>
<MaxKeys>2</MaxKeys><Delimiter>%2F</Delimiter><IsTruncated>true</IsTruncated>
<EncodingType>url</EncodingType><NextContinuationToken>tok+/=</NextContinuationToken>
<Contents><Key>d%2Fa+b%2Bc%C3%BC.txt</Key><LastModified>2026-12-07T00:02:55.000Z</LastModified>
<ETag>&quot;0123abc&quot;</ETag><Size>80123</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>d%2Fx%26y%3C%3E</Key><LastModified>2026-01-02T03:04:05Z</LastModified>
<ETag>"9f-2"</ETag><Size>0</Size></Contents>
<CommonPrefixes><Prefix>d%2Fsub+dir%2F</Prefix></CommonPrefixes></ListBucketResult>""",
        "last": """<ListBucketResult><IsTruncated>false</IsTruncated>
<NextContinuationToken>ignored</NextContinuationToken>
<Contents><Key>d/plain+key</Key><LastModified>2026-01-02T03:04:05.5+00:00</LastModified>
<ETag>e</ETag><Size>7</Size></Contents></ListBucketResult>"""}
    asked = []

    class Resp:
        def __init__(self, data: str) -> None:
            self.data = data.encode()

    def request(method: str, key: str, headers: dict[str, str], body: object = None,
                stream: bool = False, params: dict[str, str] | None = None) -> Resp:
        asked.append((method, key, params))
        return Resp(pages["last" if params and params.get("continuation-token") else "first"])
    monkeypatch.setattr(st._lean, "request", request)
    p = st.list("d/", "/", None, 2)
    assert asked[0] == ("GET", "", {"list-type": "2", "prefix": "d/", "max-keys": "2",
                                    "encoding-type": "url", "delimiter": "/"})
    assert [(o.key, o.size, o.etag) for o in p.objects] == [
        ("d/a b+cü.txt", 80123, '"0123abc"'), ("d/x&y<>", 0, '"9f-2"')]
    assert p.objects[0].mtime == 1796601775.0 and p.objects[1].mtime == 1767323045.0
    assert p.prefixes == ["d/sub dir/"] and p.next_token == "tok+/="
    q = st.list("d/", None, p.next_token, 1000)
    assert asked[1][2] is not None and asked[1][2]["continuation-token"] == "tok+/="
    assert "delimiter" not in asked[1][2]
    assert [(o.key, o.size, o.etag, o.mtime) for o in q.objects] == [
        ("d/plain+key", 7, '"e"', 1767323045.5)]  # not encoded: not decoded
    assert q.next_token is None and q.prefixes == []


def test_s3_client_settings_for_small_puts_and_https() -> None:
    """Small PUT bodies go without waiting for "100 Continue"; over https the body is not
    hashed for the signature (TLS guards it), over plain http it still is."""
    from caiosfs.store.s3 import SMALL_BODY, S3Store, _no_expect_for_small_bodies
    small = {"headers": {"Expect": "100-continue", "Content-Length": "17000"}}
    big = {"headers": {"Expect": "100-continue", "Content-Length": str(SMALL_BODY)}}
    _no_expect_for_small_bodies(small)
    _no_expect_for_small_bodies(big)
    assert "Expect" not in small["headers"] and big["headers"]["Expect"] == "100-continue"
    tls = S3Store("bkt", "https://cwobject.com", "us-east-1", False)
    plain = S3Store("bkt", "http://127.0.0.1:9", "us-east-1", True)
    assert tls._c.meta.config.s3["payload_signing_enabled"] is False
    assert plain._c.meta.config.s3["payload_signing_enabled"] is True
    # the hot calls skip the client, except for a dotted bucket name over virtual hosting
    assert tls._lean is not None and plain._lean is not None
    assert S3Store("a.b", "https://cwobject.com", "us-east-1", False)._lean is None


def test_mount_store_signs_with_the_keys_cp_would_use(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """One rule for which keys sign (sigv4.keys_from), for the boto3 client and the lean path
    of a mount alike: a credentials file beats the environment and is re-read when rotated;
    a named profile beats the environment's keys; an unknown profile is one line."""
    from caiosfs.store.s3 import S3Store

    def used(st: S3Store) -> tuple[str, str]:
        client = st._c._request_signer._credentials.get_frozen_credentials()
        assert st._lean is not None
        lean = st._lean.credentials.get_frozen_credentials()
        assert (client.access_key, client.secret_key) == (lean.access_key, lean.secret_key)
        return client.access_key, client.secret_key

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert used(S3Store("bk", "http://127.0.0.1:9", "us-east-1", True)) == ("env-id",
                                                                              "env-secret")
    f = tmp_path / "creds"
    f.write_text("[default]\naws_access_key_id = file-id\naws_secret_access_key = s1\n")
    st = S3Store("bk", "http://127.0.0.1:9", "us-east-1", True, credentials_file=str(f))
    assert used(st) == ("file-id", "s1")
    f.write_text("[default]\naws_access_key_id = file-id2\naws_secret_access_key = s22\n")
    assert used(st) == ("file-id2", "s22")  # a rotated secret, without a remount
    shared = tmp_path / "shared"
    shared.write_text("[team]\naws_access_key_id = team-id\naws_secret_access_key = t\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    assert used(S3Store("bk", "http://127.0.0.1:9", "us-east-1", True,
                        aws_profile="team")) == ("team-id", "t")
    with pytest.raises(UserError, match="'nope' not found"):
        S3Store("bk", "http://127.0.0.1:9", "us-east-1", True, aws_profile="nope")


async def test_uploaded_files_are_recycled_as_spares(tmp_path: Path) -> None:
    """Once uploaded and closed, a data file is emptied and kept for the next create()
    (creating files is the expensive part of many small writes): what the next file reads
    back is its own data only, and dirty/ holds nothing but empty spares."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, inline_max=0)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_closed(wb, "one", b"first file, longer than the second")
        fd = f.fd
        await wb.flush_all()
        assert fd in [s for _, s in wb._spares]  # recycled, not closed
        assert f.fd == -1  # and no longer the uploaded file's to use or close
        g = await wb.create("two", Attrs(0o100644, 0, 0, 1.0))
        assert g.fd == fd and os.fstat(g.fd).st_size == 0
        wb.opened(g, True)
        await wb.write(g, 0, b"second")
        wb.released(g, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/two"].data == b"second"
    assert store.objects["pre/one"].data == b"first file, longer than the second"
    left = list((tmp_path / "w" / "dirty").iterdir())
    assert left and all(p.stat().st_size == 0 for p in left)
    assert {p.name for p in left} == {str(fid) for fid, _ in wb._spares} | {
        str(fid) for fid in wb._idle}


async def test_many_uploaded_files_are_reused_without_new_inodes(tmp_path: Path) -> None:
    """Past the few open spares, uploaded data files are still kept (closed, empty) and the
    next burst of new files takes them: no new inode, nothing of the old content."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, inline_max=0)
    dirty = tmp_path / "w" / "dirty"
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        await wb.replay()
        for i in range(3 * SPARES):
            await _write_closed(wb, f"a/{i}", b"first burst %d " % i * 50)
        await wb.flush_all()
        # The spare maker (one thread at nice 19: starved on a loaded machine) may still be
        # making files the first burst asked for; they belong to "before". A no-op queued
        # behind its work returns once they exist, and no further round starts.
        await wb.local._spare_maker.run(lambda: None)
        before = {p.stat().st_ino for p in dirty.iterdir()}
        assert len(before) >= 3 * SPARES and all(p.stat().st_size == 0 for p in dirty.iterdir())
        # A second burst that the kept files cover even if none of its own uploads ends
        # before it does (its files plus the spares made again: 3 x SPARES). With 3 x SPARES
        # files, a loaded machine (uploads slower than the burst) emptied the pool and new
        # files were made.
        for i in range(2 * SPARES):
            await _write_closed(wb, f"b/{i}", b"second %d" % i)
        await wb.flush_all()
        after = {p.stat().st_ino for p in dirty.iterdir()}
        n.cancel_scope.cancel()
    assert after <= before  # every new file reused an inode
    for i in range(2 * SPARES):
        assert store.objects[f"pre/b/{i}"].data == b"second %d" % i
        assert store.objects[f"pre/a/{i}"].data == b"first burst %d " % i * 50


def test_mount_registry_ignores_reused_pids_and_keeps_newer_entries(tmp_path: Path) -> None:
    from caiosfs import control
    mp = str(tmp_path / "mnt")
    me = {"pid": os.getpid(), "mountpoint": mp}
    p = control.register(mp, me)
    try:
        assert [i for i in control.registered() if i["mountpoint"] == mp]
        # the same pid, another process (a stale entry whose pid was reused): not a mount,
        # and the file stays for the next mount of that mountpoint to replace
        p.write_text(json.dumps({**me, "started": 1}))
        assert not [i for i in control.registered() if i["mountpoint"] == mp]
        assert p.exists()
        # a daemon leaving after a lazy unmount keeps the entry of a newer mount
        p.write_text(json.dumps({**me, "pid": os.getpid() + 1}))
        control.unregister(mp)
        assert p.exists()
        control.register(mp, me)
        control.unregister(mp)
        assert not p.exists()
    finally:
        p.unlink(missing_ok=True)


async def test_idle_worker_runs_at_the_lowest_priority() -> None:
    """Spare files are made by a thread at nice 19: it yields the CPU to the FUSE loop and
    to the programs it serves; its results (or errors) reach the caller."""
    import threading

    from caiosfs.writeback import IdleWorker
    w = IdleWorker("test-idle")
    try:
        nice = await w.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        assert nice == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19
        with pytest.raises(ZeroDivisionError):
            await w.run(lambda: 1 // 0)
    finally:
        w.close()


async def test_small_new_files_live_in_the_journal(tmp_path: Path) -> None:
    """A new small file takes no data file: its bytes are the journal's inline value, read
    back, rewritten, truncated and uploaded from there; past INLINE_MAX it moves to a data
    file with every byte kept; once uploaded nothing of it is left in the journal."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    dirty = tmp_path / "w" / "dirty"
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        small = await _write_open(wb, "small.txt", b"hello world")
        await wb.write(small, 6, b"WORLD, and more")  # overwrite + extend
        await wb.write(small, 30, b"!")  # past the end: a zero-filled gap
        assert small.inline and small.fd == -1 and not small.data_path.exists()
        want = b"hello WORLD, and more" + bytes(9) + b"!"
        assert wb.read(small, 100, 0) == want and wb.read(small, 5, 6) == b"WORLD"
        await wb.truncate(small, 11)
        assert wb.read(small, 100, 0) == b"hello WORLD"
        assert wb.index.all_journal()[small.fid].inline is True

        big = await wb.create("grows.bin", Attrs(0o100644, 0, 0, 1.0))
        wb.opened(big, True)
        body = data(INLINE_MAX + 12345, seed=7)
        for off in range(0, len(body), 64 << 10):
            await wb.write(big, off, body[off:off + (64 << 10)])
        assert not big.inline and big.fd >= 0 and big.data_path.stat().st_size == len(body)
        assert wb.index.get_inline(big.fid) == b""  # the journal copy is gone
        assert wb.index.all_journal()[big.fid].inline is False
        assert wb.read(big, len(body), 0) == body

        for f in (small, big):
            wb.released(f, True)
        await wb.flush_all()
        assert wb.index.inline_ids() == [] and wb.index.all_journal() == {}
        assert str(small.fid) not in {p.name for p in dirty.iterdir()}
        n.cancel_scope.cancel()
    assert store.objects["pre/small.txt"].data == b"hello WORLD"
    assert xxh(store.objects["pre/grows.bin"].data) == xxh(body)


async def test_inline_files_survive_a_crash(tmp_path: Path) -> None:
    """Killed with inline files dirty, the next mount uploads them byte for byte; a data
    file that a crash left half-made for an inline file, and inline values no journal entry
    names any more, are dropped."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_open(wb, "d/kept.txt", b"written before the crash",
                              Attrs(0o100640, 5, 6, 1.0))
        gone = await wb.create("gone.txt", Attrs(0o100644, 0, 0, 1.0))
        await wb.write(gone, 0, b"its journal entry is removed below")
        n.cancel_scope.cancel()  # crash: nothing uploaded, nothing closed
    wb.index.del_journal(gone.fid)  # as if the crash came between the two removals
    f.data_path.write_bytes(b"half")  # as if it came while moving to a data file
    wb.index.close()
    # (A long upload_delay: with the default 0.05 s, a replay slower than that on a loaded
    # machine let the upload finish before the check below; flush_all uploads it anyway.)
    wb2 = _wb(tmp_path / "w", store, upload_delay=3600)
    async with trio.open_nursery() as n:
        await n.start(wb2.run)
        assert await wb2.replay() == 1
        assert not f.data_path.exists() and wb2.index.inline_ids() == [f.fid]
        await wb2.flush_all()
        n.cancel_scope.cancel()
    obj = store.objects["pre/d/kept.txt"]
    assert obj.data == b"written before the crash" and int(obj.metadata["mode"]) == 0o100640
    assert "pre/gone.txt" not in store.objects
    assert wb2.index.inline_ids() == []


async def test_a_full_journal_sends_small_files_to_data_files(tmp_path: Path) -> None:
    """If the journal cannot take a file's bytes (its map is full), the file moves to a data
    file instead of failing the write, and new files get data files for a while."""
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store, upload_delay=3600)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await _write_open(wb, "a.txt", b"first ")
        real = wb.index.put_inline

        def full(fid: int, value: bytes) -> None:
            raise OSError(errno.ENOSPC, "journal: MDB_MAP_FULL")
        wb.index.put_inline = full  # type: ignore[method-assign]
        await wb.write(f, 6, b"second")
        assert not f.inline and wb.read(f, 100, 0) == b"first second"
        g = await wb.create("b.txt", Attrs(0o100644, 0, 0, 1.0))
        assert not g.inline and g.fd >= 0
        wb.index.put_inline = real  # type: ignore[method-assign]
        wb.opened(g, True)
        await wb.write(g, 0, b"other")
        for x in (f, g):
            wb.released(x, True)
        await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/a.txt"].data == b"first second"
    assert store.objects["pre/b.txt"].data == b"other"


async def test_directory_metadata_reaches_the_store_but_not_a_fresh_mount(
        tmp_path: Path) -> None:
    """What SeaweedFS cannot show: it drops x-amz-meta-* on ``dir/`` markers, so the
    directory-metadata checks of test_write_ops.py never run there. Against the in-memory
    store, which keeps them as S3 does: mkdir sends the directory's mode/uid/gid/mtime with
    its marker, and a fresh mount (empty cache, metadata=head) reads a *file's* metadata
    back but shows a directory with dir_mode and the mount's owner - the gap documented in
    docs/SEMANTICS.md (listings carry no metadata; markers are not HEADed)."""
    import pyfuse3

    store = MemoryStore("bkt")

    def mount_fs(name: str) -> Filesystem:
        cache = tmp_path / name
        cache.mkdir()
        cfg = build_config("s3://bkt", {"cache_dir": str(cache), "profile": "devbox",
                                      "upload_delay": "0", "uid": "0", "gid": "0"})
        return Filesystem(build_core(cfg, store, Index(cache / "index.lmdb")))

    class Ctx:
        uid, gid, pid, umask = 1234, 5678, 1, 0o022

    fs = mount_fs("c1")
    async with trio.open_nursery() as n:
        await fs.start(n)
        await fs.mkdir(pyfuse3.ROOT_INODE, b"d", 0o751, Ctx())
        fh, _ = await fs.create(pyfuse3.ROOT_INODE, b"f", 0o640, os.O_WRONLY, Ctx())
        await fs.write(fh.fh, 0, b"content")
        await fs.release(fh.fh)
        await fs.wb.flush_all()
        n.cancel_scope.cancel()
    marker = store.head("d/").metadata
    assert int(marker["mode"]) == stat.S_IFDIR | 0o751, marker
    assert (marker["uid"], marker["gid"]) == ("1234", "5678"), marker
    assert abs(float(marker["mtime"]) - time.time()) < 60, marker
    assert int(store.head("f").metadata["mode"]) == stat.S_IFREG | 0o640

    fresh = mount_fs("c2")
    async with trio.open_nursery() as n:
        await fresh.start(n)
        f = await fresh.lookup(pyfuse3.ROOT_INODE, b"f")
        d = await fresh.lookup(pyfuse3.ROOT_INODE, b"d")
        n.cancel_scope.cancel()
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o640, 1234, 5678)
    assert stat.S_ISDIR(d.st_mode)
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o755, 0, 0), \
        "a fresh mount now reads directory metadata: update docs/SEMANTICS.md and this test"


def test_under_a_directory() -> None:
    from caiosfs.paths import under
    assert under("a/b", "a/b") and under("a/b/c", "a/b") and under("x", "")
    assert under("", "")
    assert not under("a/bc", "a/b")  # a sibling sharing a prefix is not below it
    assert not under("a", "a/b") and not under("", "a")


class _ThreadNoting(MemoryStore):
    """A store whose HEAD notes the name of the thread it runs in, and can be held."""

    def __init__(self) -> None:
        super().__init__("b")
        self.names: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def head(self, key: str) -> Any:
        self.names.append(threading.current_thread().name)
        assert self.release.wait(10)
        return super().head(key)


async def test_store_calls_run_in_threads_that_keep_their_names() -> None:
    """A store call's thread is not renamed for the call (trio.to_thread.run_sync renames
    it and back through ctypes, two GIL round trips per call: docs/ARCHITECTURE.md, "What
    a small file costs"); results and errors come back as from the call itself."""
    store = _ThreadNoting()
    store.put_bytes("k", b"abc")
    client = StoreClient(store, Metrics(), parallel=4, read_timeout=5)
    for _ in range(3):
        assert (await client.head("k")).size == 3
    assert store.names and all(n.startswith("Trio thread") for n in store.names), store.names
    with pytest.raises(StoreError) as err:
        await client.head("nope")
    assert err.value.errno == errno.ENOENT


async def test_a_store_call_past_its_deadline_leaves_its_thread_holding_the_limiter(
        ) -> None:
    """An abandoned call returns at the deadline; its thread keeps its limiter slot until
    it really ends, so a hung store cannot pile up threads past the limit."""
    store = _ThreadNoting()
    store.put_bytes("k", b"abc")
    client = StoreClient(store, Metrics(), parallel=8, read_timeout=0.3)
    store.put_bytes("k2", b"abcd")
    store.release.clear()
    t0 = time.monotonic()
    with pytest.raises(GaveUp):
        await client.head("k")
    assert time.monotonic() - t0 < 2
    assert client.meta_limiter.borrowed_tokens == 1  # (the thread still runs)
    store.release.set()
    with trio.fail_after(5):
        while client.meta_limiter.borrowed_tokens:
            await trio.sleep(0.01)
    assert (await client.head("k2")).size == 4  # ("k" fails at once for GAVE_UP_MEMORY)


def test_flush_shows_progress_once_a_second_and_times_out_as_a_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`caiosfs flush` and `umount` share control.flush: progress at most once a second,
    however often it arrives, and the timeout counts for the whole flush, not per read."""
    from caiosfs import control

    def endless(mp: object, req: dict, timeout: float | None = None) -> Iterator[dict]:
        assert req == {"cmd": "flush"}
        while True:  # a progress message every 10 ms, for ever
            time.sleep(0.01)
            yield {"progress": {"files": 1, "bytes": 10}}
    monkeypatch.setattr(control, "request", endless)
    shown: list[dict] = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        control.flush("/mnt", 1.5, shown.append)
    assert 1.5 <= time.monotonic() - t0 < 3
    assert 1 <= len(shown) <= 2  # ~150 messages arrived

    def done(mp: object, req: dict, timeout: float | None = None) -> Iterator[dict]:
        yield {"progress": {"files": 0, "bytes": 0}}
        yield {"result": {}}
    monkeypatch.setattr(control, "request", done)
    control.flush("/mnt", None, None)  # no timeout, no progress wanted: returns
