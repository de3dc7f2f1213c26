"""Random reads larger than SMALL_RANDOM (caiosfs.randfetch): the read's own bytes come by
parallel GETs of at most PART bytes, the rest of its chunks in the background, and the chunks
are cached once all are in. Behind 20 ms and 50 MB/s per connection one GET of the two chunks
a 1 MiB read spans cost 59 ms a read against raw boto3's 38 (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import data, xxh
from faultproxy import FaultProxy

from caiosfs.cache import BlockCache
from caiosfs.errors import FsError, PreconditionFailed, StoreError
from caiosfs.index import Index
from caiosfs.metrics import Metrics
from caiosfs.randfetch import PART, plan
from caiosfs.reader import SPLIT_LATENCY, Fetcher, MemoryBudget, ObjRef, Reader
from caiosfs.store.client import StoreClient
from caiosfs.store.memory import MemoryStore

MiB = 1 << 20


def test_plan_splits_the_read_and_fills_the_rest_of_its_chunks() -> None:
    off = 5 * MiB + 12 * 4096
    (base, n), own, fill = plan(off, MiB, 64 * MiB, MiB)
    assert (base, n) == (5 * MiB, 2 * MiB)
    assert own == [(off, MiB // 2), (off + MiB // 2, MiB // 2)]
    assert fill == [(5 * MiB, 12 * 4096), (off + MiB, MiB - 12 * 4096)]
    # together: the two chunks exactly once
    spans = sorted(own + fill)
    assert spans[0][0] == base and all(a + la == b for (a, la), (b, _) in itertools.pairwise(spans))
    assert sum(la for _, la in spans) == n
    # a chunk-aligned read needs no filler; the object's end bounds the last chunk
    assert plan(3 * MiB, MiB, 64 * MiB, MiB)[2] == []
    (base, n), own, fill = plan(10 * MiB - 300_000, 300_000, 10 * MiB - 1000, MiB)
    assert (base, n) == (9 * MiB, MiB - 1000)
    assert sum(la for _, la in own) == 300_000 and max(la for _, la in own) <= PART
    assert fill == [(9 * MiB, MiB - 300_000)]


class _Spy:
    """Records every GET (start, length) the store serves; can fail chosen ones."""

    def __init__(self, store: MemoryStore) -> None:
        self.store, self.gets, self.lock = store, [], threading.Lock()
        self.orig = store.get_range
        self.fail: Callable[[int, int], BaseException | None] = lambda s, n: None
        self.latency = 0.02
        store.get_range = self  # type: ignore[method-assign]

    def __call__(self, key: str, start: int, length: int, etag: str | None,
                 sink: Callable[[int, bytes], None]) -> None:
        with self.lock:
            self.gets.append((start, length))
        err = self.fail(start, length)
        if err is not None:
            raise err
        time.sleep(self.latency)  # (a remote store's first byte: the pipe measures it)
        self.orig(key, start, length, etag, sink)


def _setup(tmp: Path, size: int = 64 * MiB) -> tuple[Reader, Fetcher, MemoryBudget, ObjRef,
                                                        bytes, _Spy]:
    store = MemoryStore("b")
    body = data(size, "rand")
    obj = ObjRef("b", "k", store.put_bytes("k", body), size)
    m = Metrics()
    (tmp / "c").mkdir()
    cache = BlockCache(tmp / "c", Index(tmp / "c" / "index.lmdb"), m, 1 << 30, 4 * MiB)
    budget = MemoryBudget(64 * MiB, m)
    fetcher = Fetcher(StoreClient(store, m, parallel=8, read_timeout=2), cache, m, budget,
                      max_request=16 * MiB)
    fetcher.store.pipe.latency = 0.02  # (as measured behind the WAN proxy)
    return (Reader(cache, fetcher, m, readahead_max=64 * MiB), fetcher, budget, obj, body,
            _Spy(store))


async def _idle(fetcher: Fetcher) -> None:
    with trio.fail_after(10):
        while fetcher.running:
            await trio.sleep(0.005)


async def test_random_1m_reads_wait_for_their_own_bytes_only_and_cache_the_chunks(
        tmp_path: Path) -> None:
    reader, fetcher, budget, obj, body, spy = _setup(tmp_path)
    rng = random.Random(3)
    # (each in a 3 MiB slot of its own, unaligned: it spans two chunks no other read touches)
    offs = [slot * 3 * MiB + rng.randrange(1, 256) * 4096 for slot in rng.sample(range(20), 12)]
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        for off in offs:
            before = len(spy.gets)
            assert await reader.read(obj, ra, off, MiB) == body[off:off + MiB]
            await _idle(fetcher)
            got = spy.gets[before:]
            # the read's bytes came as GETs of at most PART; with the rest of its two chunks
            # every byte of them was fetched once
            own = [g for g in got if off <= g[0] < off + MiB]
            assert own and max(ln for _, ln in own) <= PART, got
            assert sum(ln for _, ln in got) == 2 * MiB, got
        gets = len(spy.gets)
        # a re-read of the same regions is served from the cache: no GET
        for off in offs:
            assert await reader.read(obj, ra, off + 4096, MiB) == body[off + 4096:off + 4096
                                                                       + MiB]
        assert len(spy.gets) == gets
        n.cancel_scope.cancel()
    assert reader.cache.used == 2 * MiB * len(offs)
    assert budget.used == 0 and not fetcher._inflight


async def test_a_read_half_cached_fetches_only_its_missing_bytes_in_parallel(
        tmp_path: Path) -> None:
    reader, fetcher, budget, obj, body, spy = _setup(tmp_path)
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        ra = reader.new_readahead()
        a = 30 * MiB + 40 * 4096  # caches chunks 30 and 31
        assert await reader.read(obj, ra, a, MiB) == body[a:a + MiB]
        await _idle(fetcher)
        for off in (31 * MiB + 7 * 4096, 29 * MiB + 200 * 4096):  # chunk 31 / 30 cached
            before = len(spy.gets)
            ra = reader.new_readahead()  # (another handle: nothing sequential)
            assert await reader.read(obj, ra, off, MiB) == body[off:off + MiB]
            await _idle(fetcher)
            got = spy.gets[before:]
            assert sum(ln for _, ln in got) == MiB, got  # the missing chunk, once
            own = [g for g in got if off <= g[0] < off + MiB]
            assert max(ln for _, ln in own) <= PART, got
        n.cancel_scope.cancel()
    assert reader.cache.used == 4 * MiB
    assert budget.used == 0 and not fetcher._inflight


async def test_near_the_store_a_random_read_gets_its_chunks_in_one_request(
        tmp_path: Path) -> None:
    """On loopback the split's extra GETs cost CPU and save nothing: one GET of the chunks
    (as measured, the pipe's latency decides)."""
    reader, fetcher, budget, obj, body, spy = _setup(tmp_path)
    spy.latency = 0.0
    fetcher.store.pipe.latency = 0.0  # (not measured yet: the same)
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        off = 3 * MiB + 4096
        assert await reader.read(obj, reader.new_readahead(), off, MiB) == body[off:off + MiB]
        assert spy.gets == [(3 * MiB, 2 * MiB)]
        assert fetcher.store.pipe.latency < SPLIT_LATENCY  # (measured: ~0)
        off = 9 * MiB + 4096
        assert await reader.read(obj, reader.new_readahead(), off, MiB) == body[off:off + MiB]
        assert spy.gets[1:] == [(9 * MiB, 2 * MiB)]
        n.cancel_scope.cancel()
    assert budget.used == 0


async def test_a_failed_filler_costs_the_cache_not_the_read(tmp_path: Path) -> None:
    reader, fetcher, budget, obj, body, spy = _setup(tmp_path)
    off = 9 * MiB + 4096
    spy.fail = lambda s, n: (StoreError("AccessDenied", "no", 403)
                             if s == 9 * MiB else None)
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        assert await reader.read(obj, reader.new_readahead(), off, MiB) == body[off:off + MiB]
        await _idle(fetcher)
        assert reader.cache.used == 0  # not cached: one chunk was never whole
        # the next read of the region fetches (and caches) what it needs
        spy.fail = lambda s, n: None
        assert await reader.read(obj, reader.new_readahead(), off, MiB) == body[off:off + MiB]
        await _idle(fetcher)
        n.cancel_scope.cancel()
    assert reader.cache.used == 2 * MiB
    assert budget.used == 0 and not fetcher._inflight


@pytest.mark.parametrize("error, code", [
    (StoreError("AccessDenied", "no", 403), errno.EACCES),
    (PreconditionFailed("k"), errno.ESTALE),
])
async def test_a_failed_get_of_its_own_bytes_fails_the_read(
        tmp_path: Path, error: StoreError, code: int) -> None:
    reader, fetcher, budget, obj, _, spy = _setup(tmp_path)
    off = 20 * MiB + 8192
    spy.fail = lambda s, n: error if s == off + MiB // 2 else None
    async with trio.open_nursery() as n:
        fetcher.nursery = n
        with pytest.raises((FsError, StoreError)) as info:
            await reader.read(obj, reader.new_readahead(), off, MiB)
        assert info.value.errno == code
        await _idle(fetcher)
        n.cancel_scope.cancel()
    assert reader.cache.used == 0
    assert budget.used == 0 and not fetcher._inflight


@pytest.fixture
def slow_store(seaweed: Any) -> Any:
    """SeaweedFS behind a proxy that holds every answer 20 ms (a remote store's first byte)."""
    with FaultProxy(seaweed.endpoint, lifetime=300, seed=5) as p:
        p.configure(rate=1.0, kinds=("stall",), stall=0.02)
        yield p


def test_random_mib_reads_through_a_mount(s3: Any, bucket: str, mounter: Any,
                                          slow_store: FaultProxy) -> None:
    """Byte-exact random 1 MiB reads behind 20 ms: after the first (one GET of its two
    chunks: the pipe has measured nothing yet), each costs the GETs of its two chunks (its
    own bytes in two, the rest in two), a re-read of the region is a cache hit, and with the
    store gone such a read fails with EIO within read_timeout."""
    size = 96 * MiB
    body = data(size, "mnt-rand")
    s3.upload_fileobj(__import__("io").BytesIO(body), bucket, "r.bin")
    m = mounter(bucket, "", f"endpoint={slow_store.endpoint},profile=dataset,read_timeout=3")
    _wait_for_readahead(m.path)
    rng = random.Random(5)
    offs = sorted({rng.randrange(1, size // 4096 - 512) * 4096 for _ in range(24)})
    offs = [o for i, o in enumerate(offs) if o % MiB and (not i or o - offs[i - 1] > 3 * MiB)]
    rng.shuffle(offs)  # (in no order: nothing sequential about them)
    fd = os.open(m.path / "r.bin", os.O_RDONLY)
    try:
        st = m.status()
        gets0, in0 = st["s3_get_requests"], st["bytes_in"]
        got = [os.pread(fd, MiB, off) for off in offs[1:]]
        assert [xxh(g) for g in got] == [xxh(body[o:o + MiB]) for o in offs[1:]]
        st = m.status()
        assert st["s3_get_requests"] - gets0 == 1 + 4 * (len(offs) - 2)
        assert st["bytes_in"] - in0 == 2 * MiB * (len(offs) - 1)
        # a re-read (the page cache dropped) is served from the cache
        subprocess_drop_caches()
        for off in offs[1:]:
            assert xxh(os.pread(fd, MiB, off)) == xxh(body[off:off + MiB])
        assert m.status()["s3_get_requests"] == st["s3_get_requests"]
        slow_store.down("blackhole")
        slow_store.stall = 120
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            os.pread(fd, MiB, offs[0])
        took = time.monotonic() - t0
        slow_store.heal()
        assert info.value.errno == errno.EIO and took <= 3 + 2, (info.value, took)
    finally:
        os.close(fd)
    assert m.status()["checksum_failures"] == 0


def _wait_for_readahead(path: Path) -> None:
    """Until the mount has raised its kernel readahead (set just after INIT, in the
    background): at the kernel's 128 KiB a 1 MiB pread comes as eight READs."""
    from caiosfs import mountinfo
    dev = next(x.device for x in mountinfo.read() if x.mount_point == str(path))
    ra = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and int(ra.read_text()) < 1024:
        time.sleep(0.05)
    assert int(ra.read_text()) >= 1024


def subprocess_drop_caches() -> None:
    import subprocess
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
