"""The read pipe: its controller (caiosfs.store.pipe) against simulated stores, on trio's
mock clock (it widens behind a per-connection rate and stays narrow where more GETs do not
pay), and the hold that keeps fetched chunks nearest their readers in memory."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from caiosfs.cache import BlockCache
from caiosfs.index import Index
from caiosfs.metrics import Metrics
from caiosfs.store.pipe import ReadPipe

MiB = 1 << 20


async def _simulate(pipe: ReadPipe, limiter: trio.CapacityLimiter, seconds: float, *,
                    total: float, per_conn: float, latency: float,
                    request: int = 16 * MiB, readers: int = 96) -> float:
    """Readers that always want more GETs than run (a streaming load wider than the
    ceiling); each GET's time follows the store's shape at its start. Returns the
    aggregate rate of the last quarter."""
    active = 0
    done: list[tuple[float, int]] = []

    async def reader() -> None:
        nonlocal active
        while True:
            async with limiter:
                active += 1
                rate = min(per_conn, total / active)
                sent = trio.current_time()
                await trio.sleep(latency + MiB / rate)
                first = trio.current_time()
                await trio.sleep((request - MiB) / rate)
                active -= 1
            pipe.bytes_in += request
            pipe.stalls += 1  # its reader is waiting for the data
            end = trio.current_time()
            done.append((end, request))
            pipe.finished(request, sent, first, end)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:
            for _ in range(readers):
                n.start_soon(reader)
    start = trio.current_time() - seconds / 4
    return sum(b for t, b in done if t >= start) / (seconds / 4)


def _pipe(floor: int = 16, ceiling: int = 64) -> tuple[ReadPipe, trio.CapacityLimiter]:
    limiter = trio.CapacityLimiter(floor)
    return ReadPipe(limiter, floor, ceiling, Metrics()), limiter


def test_widens_behind_a_per_connection_rate() -> None:
    # 20 ms to first byte, 50 MB/s per connection, 2 GB/s in all: 40 GETs fill it.
    async def main() -> None:
        pipe, limiter = _pipe()
        rate = await _simulate(pipe, limiter, 60.0, total=2e9, per_conn=50e6, latency=0.02)
        assert pipe.size >= 36, pipe.size
        assert rate >= 0.85 * 2e9, rate
        # What it measured is the store's shape: 20 ms, and one GET's share of the rate.
        assert 0.015 < pipe.latency < 0.03
        share = min(50e6, 2e9 / pipe.size)
        assert abs(pipe.conn_rate - share) < 0.1 * share, (pipe.conn_rate, share)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_stays_narrow_where_more_requests_do_not_pay() -> None:
    # Loopback-like: the whole pipe (700 MB/s) is shared, one connection could take it all.
    async def main() -> None:
        pipe, limiter = _pipe()
        await _simulate(pipe, limiter, 60.0, total=700e6, per_conn=5e9, latency=0.001)
        assert pipe.size == 16, pipe.size
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_respects_its_ceiling_and_does_not_widen_without_waiting_readers() -> None:
    async def main() -> None:
        pipe, limiter = _pipe(floor=8, ceiling=20)
        await _simulate(pipe, limiter, 30.0, total=10e9, per_conn=50e6, latency=0.02)
        assert pipe.size == 20
        # Readers that never wait (the pipe keeps ahead of them): no reason to widen.
        pipe2, limiter2 = _pipe(floor=8, ceiling=64)

        async def idle_reader() -> None:
            for _ in range(200):
                async with limiter2:
                    sent = trio.current_time()
                    await trio.sleep(0.05)
                    pipe2.bytes_in += 16 * MiB
                    pipe2.finished(16 * MiB, sent, sent + 0.02, trio.current_time())
        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(idle_reader)
        assert pipe2.size == 8
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_full_hold_keeps_the_chunks_nearest_their_readers(tmp_path: Path) -> None:
    # Parallel GETs deliver near and far chunks interleaved: when the hold is full, a
    # chunk asked for earlier displaces ones asked for later, never the other way round.
    released: list[int] = []
    cache = BlockCache(tmp_path, Index(tmp_path / "index"), Metrics(), 1 << 30, 8 * MiB)
    cache.release_charge = released.append
    for order in (5, 1, 9, 3):
        cache.hold(b"x", order, b"d" * 10, 10, order)
    assert cache.fresh_bytes == 40
    assert cache.drop_farther(4, 15) == 20  # the two asked for after 4: 9, then 5
    assert released == [10, 10] and cache.fresh_bytes == 20
    assert cache.drop_farther(0, 100) == 20  # 3 and 1 are both farther than order 0
    cache.hold(b"x", 7, b"d" * 10, 10, 7)
    assert cache.drop_farther(7, 10) == 0  # nothing was asked for after 7
    assert cache.fresh_bytes == 10


def test_a_large_server_side_copy_goes_as_parallel_parts() -> None:
    # The rename of an uploaded checkpoint file: UploadPartCopy of 64 MiB parts in parallel,
    # same bytes and metadata as the source; a source that changed meanwhile is refused.
    from caiosfs.errors import PreconditionFailed
    from caiosfs.store.client import COPY_PART, StoreClient
    from caiosfs.store.memory import MemoryStore

    async def main() -> None:
        store = MemoryStore("b")
        body = bytes(range(256)) * (5 * COPY_PART // 256 // 2)  # 2.5 parts
        store.put_bytes("src", body, {"mode": "33188"})
        client = StoreClient(store, Metrics(), read_timeout=5)
        before = client.metrics.value("caiosfs_s3_requests_total", op="upload_part")
        await client.copy("src", "dst", None, len(body))
        assert store.objects["dst"].data == body
        assert store.objects["dst"].metadata == {"mode": "33188"}
        assert client.metrics.value("caiosfs_s3_requests_total", op="upload_part") \
            - before == 3
        small = b"x" * 1000
        store.put_bytes("s", small)
        await client.copy("s", "t", {"mode": "33261"}, len(small))  # one CopyObject
        assert store.objects["t"].data == small and store.objects["t"].metadata == {
            "mode": "33261"}
        orig = store.upload_part

        def changing(*a: object) -> str:
            store.put_bytes("src", b"new", {})
            return orig(*a)  # type: ignore[arg-type]
        store.upload_part = changing  # type: ignore[method-assign]
        try:
            await client.copy("src", "dst2", None, len(body))
        except PreconditionFailed:
            pass
        else:
            raise AssertionError("a copy from a source that changed went through")
        assert "dst2" not in store.objects and not store.list_multipart("")
    trio.run(main)
