"""Cached chunks read ahead of a streaming reader, off the loop.

A sequential reader of a cached object used to find its chunks in the page cache (the loop
asked the kernel to read them ahead with ``posix_fadvise``) and copy each out with a
``pread`` on the loop: on a warm 1 GiB read that copy was a fifth of the loop's CPU, and the
block files' pages were a second copy, in memory, of what the kernel keeps of the mounted
file anyway. Here a worker thread reads the next chunks with ``O_DIRECT`` into recycled GET
buffers, checks them against the index's checksums and hands them to the cache's hold
(:meth:`caiosfs.cache.BlockCache.hold`), as a GET hands it the chunks it fetched: the loop
finds them in memory and only copies them into the FUSE reply.

What is read ahead is charged to the read memory budget and bounded by the hold's limit, like
fetched chunks; a reader that reaches a chunk being loaded waits for the load instead of
reading it a second time. Not while the stream's data still comes from the store (a GET of
its started or waited for within ``reader.FETCHING_RECENT``): the hold and the budget are its
GETs' then, and a load that took the budget a fetched chunk needed sent that chunk to disk
to be read back too (a 40 MiB stream with a 32 MiB budget read 3-7 chunks back, against
none); the chunks a cold stream did send to disk are read back by the loop, as before.

A chunk that fails its checksum is not held: its reader reads it itself and drops and
refetches it (:meth:`caiosfs.cache.BlockCache.read`), the one place that does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

import trio

from .cache import Load, load_runs
from .iobuf import aligned
from .metrics import Metrics

if TYPE_CHECKING:
    from .reader import Fetcher

log = logging.getLogger(__name__)
# How far ahead of a streaming reader cached chunks are read (at most its window, within the
# hold's room), and how many loads run at once (each a preadv of one block file's chunks).
# On the development VMs the disk gives ~1.3-1.4 GB/s of 1-8 MiB O_DIRECT reads whatever the
# queue depth; with 16 MiB ahead and 2 loads a warm 1 GiB read was 1.0-1.1 GB/s, with 64 MiB
# and 4 loads 1.2-1.5 GB/s, as the page cache's own readahead gave.
AHEAD = 64 << 20
THREADS = 4


class DiskAhead:
    """Loads for the streaming readers of one mount: chunks in memory, charged to the
    fetcher's budget and hold, in the fetcher's nursery."""

    def __init__(self, fetcher: Fetcher, metrics: Metrics) -> None:
        self.fetcher = fetcher
        self.cache = fetcher.cache
        self.metrics = metrics
        cs = self.cache.chunk_size
        # (the GETs' recycled buffers where the store pools them: one pool for both)
        self.take = fetcher.store.take_buffer or (lambda: aligned(cs))
        self.limiter = trio.CapacityLimiter(THREADS)
        self._loading: dict[tuple[bytes, int], trio.Event] = {}
        self.running = 0  # loads not finished (tests wait for them)
        self.pending = 0  # bytes those loads will hold (the hold's room counts them)

    def loading(self, ident: bytes, first: int, last: int) -> trio.Event | None:
        """An event that is set when the load of one of chunks [first, last] ends."""
        if self._loading:
            for c in range(first, last + 1):
                ev = self._loading.get((ident, c))
                if ev is not None:
                    return ev
        return None

    def start(self, ident: bytes, obj_size: int, first: int, last: int, order: int) -> int:
        """Load the cached chunks of [first, last] that are not in memory, as far as the
        first one that is not cached, within the hold's room and the budget; the chunk
        where a later call should start (``last + 1`` if every chunk was seen to).
        ``order``: where the hold ranks them against fetched chunks."""
        nursery = self.fetcher.nursery
        if nursery is None:
            return first
        todo, upto = self.cache.loadable(ident, first, last, obj_size)
        todo = [ld for ld in todo if (ident, ld.chunk) not in self._loading]
        room = self.fetcher.hold_limit - self.cache.fresh_bytes - self.pending
        n, keep = 0, 0
        for ld in todo:
            if n + ld.length > room:
                upto = ld.chunk  # (not loaded now: a later call tries again)
                break
            n += ld.length
            keep += 1
        todo = todo[:keep]
        if not todo:
            return upto
        if not self.fetcher.budget.try_acquire(n):
            return todo[0].chunk
        # One load per run of a block file's chunks (a preadv each), in order: a reader
        # waits for the load of its own chunk, not for all of them.
        for run in load_runs(todo, self.cache.chunk_size):
            ev = trio.Event()
            for ld in run:
                self._loading[(ident, ld.chunk)] = ev
            self.running += 1
            charge = sum(ld.length for ld in run)
            self.pending += charge
            nursery.start_soon(self._run, ident, run, charge, ev, order)
        return upto

    async def _run(self, ident: bytes, todo: list[Load], charge: int, ev: trio.Event,
                   order: int) -> None:
        held = 0
        try:
            got = await trio.to_thread.run_sync(self.cache.load, todo, self.take,
                                                limiter=self.limiter)
            n = 0
            for ld, data in got:
                if data is None:
                    continue
                # (a bytearray, as a GET's chunks are: the cache takes either as bytes)
                self.cache.hold(ident, ld.chunk, cast(bytes, data), ld.length, order)
                held += ld.length
                n += 1
            self.metrics.cache_hit_chunks.inc(n)
        except Exception:  # a bug here must not take the mount down: readers read themselves
            log.exception("loading cached chunks ahead failed")
        finally:
            self.pending -= charge
            self.fetcher.budget.release(charge - held)
            for ld in todo:
                if self._loading.get((ident, ld.chunk)) is ev:
                    del self._loading[(ident, ld.chunk)]
            self.running -= 1
            ev.set()
