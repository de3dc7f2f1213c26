"""Reads: where the readahead window is decided, and how cache misses are fetched.

- :class:`Readahead` (per open handle) detects sequential access and grows a window by
  doubling up to a cap; random access keeps it at zero so only touched chunks are fetched.
  The cap is the stream's share of the read pipe (:mod:`caiosfs.store.pipe`: how many GETs
  the mount keeps in flight, by measurement) times the request size, within ``readahead_max``.
- A random read larger than ``SMALL_RANDOM`` behind a remote store gets its own bytes by
  parallel GETs and its chunks cached after (:mod:`caiosfs.randfetch`, ``Fetcher.split``).
- :class:`Fetcher` (one per mount) turns missing chunks into ranged GETs of up to
  ``max_request`` bytes, deduplicates chunks already in flight, and charges what each request
  really holds in memory (a few pieces on their way to the cache file, and the chunks kept for
  their reader) to the global :class:`MemoryBudget`, so memory never grows with file size,
  open files or requests in flight.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .cache import BlockCache
from .diskahead import AHEAD as DISK_AHEAD
from .diskahead import DiskAhead
from .errors import FsError, PreconditionFailed, StoreError
from .index import ident_of
from .metrics import Metrics
from .randfetch import Assembly, write_chunks
from .store.client import GaveUp, StoreClient

log = logging.getLogger(__name__)
FAILURE_MEMORY = 0.5  # seconds a chunk whose fetch gave up fails at once (see Fetcher)
SMALL_RANDOM = 256 << 10  # random reads up to this size fetch only their bytes, at first
# Larger random reads are split into parallel GETs (caiosfs.randfetch) when the store's
# first byte takes at least this long (measured by the pipe): behind 20 ms the split made
# 1 MiB reads 1.34x raw boto3's rate (main: 0.71x); on loopback (a few ms) its 3.6 times
# the GETs only cost CPU (0.95x main's rate), so there the chunks come as one GET.
SPLIT_LATENCY = 0.010
TOUCHED_MAX = 100_000  # chunks remembered as touched by a random read
# Pieces (chunks) of one GET that may wait for the loop to commit them: the worker thread
# goes on reading its socket while the loop catches up (a round trip per chunk throttled every
# stream to the loop's pace), but no further, so a GET holds at most this many + 1 chunks.
PENDING_PIECES = 2
PENDING_WAIT = 30.0  # seconds a worker waits for the loop before going on regardless
HOLD_STALE = 10.0  # seconds a held chunk waits for its reader before it may be dropped
STREAM_SHARE = 1.25  # a stream asks for this much more than its share of the pipe
ACTIVE_STREAM = 1.0  # seconds since its last read that a stream still counts as active
STALL_RECENT = 1.0  # seconds a stream's last wait for data marks it as limited by the store
FETCHING_RECENT = 1.0  # seconds since its last GET that a stream's cached chunks are not loaded


@dataclass(frozen=True)
class ObjRef:
    """One version of one object: what cached data is keyed by."""

    bucket: str
    key: str
    etag: str
    size: int

    @property
    def ident(self) -> bytes:
        return ident_of(self.bucket, self.key, self.etag)


class MemoryBudget:
    """A byte-counting semaphore shared by every read of the mount."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.used = 0
        self.metrics = metrics
        self._waiters: list[tuple[int, trio.Event]] = []
        # Frees memory held for later (fetched chunks not read yet) when a request needs it:
        # reclaim(n) releases up to n bytes through release() and returns how many.
        self.reclaim: Callable[[int], int] = lambda n: 0

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they are free now (never reclaims, never waits)."""
        n = min(n, self.limit)
        if self.used + n > self.limit:
            return False
        self.used += n
        self.metrics.memory_in_use.set(self.used)
        return True

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)
        while self.used + n > self.limit:
            if self.reclaim(self.used + n - self.limit):
                continue
            ev = trio.Event()
            self._waiters.append((n, ev))
            await ev.wait()
        self.used += n
        self.metrics.memory_in_use.set(self.used)

    def release(self, n: int) -> None:
        n = min(n, self.limit)
        self.used -= n
        self.metrics.memory_in_use.set(self.used)
        waiters, self._waiters = self._waiters, []
        for _, ev in waiters:
            ev.set()  # each re-checks; cheap at this scale


@dataclass
class Readahead:
    """Sequential detection and window growth for one open handle."""

    initial: int
    maximum: int
    window: int = 0
    next_offset: int = 0
    fetched_until: int = 0  # end of what this handle already asked the fetcher for
    loaded_until: int = 0  # end of the cached range asked to be read ahead (diskahead)
    stalled: float = -1e9  # when (trio clock) a read of this handle last waited for a GET
    fetching: float = -1e9  # when (trio clock) this handle last started or waited for one
    # Small jumps still count as sequential (the kernel reorders and splits requests).
    slack: int = 1 << 20

    def observe(self, offset: int, size: int) -> bool:
        sequential = self.next_offset - self.slack <= offset <= self.next_offset + self.slack
        if offset == 0 and self.next_offset == 0:
            sequential = True
        if sequential:
            self.window = min(self.maximum, max(self.initial, self.window * 2))
        else:
            self.window = 0
            self.fetched_until = 0
            self.loaded_until = 0
        self.next_offset = offset + size
        return sequential


class CacheWriteError(FsError):
    """Fetched bytes could not be stored in the cache (disk full, read-only, I/O error):
    the read can still be served straight from the store."""


@dataclass
class _Flight:
    order: int = 0  # chunks asked for before this request's first (see BlockCache.hold)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    # Set (and replaced) each time some of the request's chunks are committed: a reader
    # waits for *its* chunks, not for the whole 16 MiB request.
    progress: trio.Event = field(default_factory=trio.Event)

    def bump(self) -> None:
        ev, self.progress = self.progress, trio.Event()
        ev.set()


@dataclass(eq=False)
class _Get:
    """One GET in flight, as the loop's commits see it."""

    obj: ObjRef
    ident: bytes
    first: int  # its first chunk
    flight: _Flight
    keep: bool  # hold its chunks for their reader
    pending: threading.Semaphore  # chunks it may deliver ahead of the loop's commits
    commit_error: list[OSError] = field(default_factory=list)


class Fetcher:
    def __init__(self, store: StoreClient, cache: BlockCache, metrics: Metrics,
                 budget: MemoryBudget, max_request: int) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.budget = budget
        self.max_chunks = max(1, max_request // cache.chunk_size)
        self._inflight: dict[tuple[bytes, int], _Flight] = {}
        self.running = 0  # GETs launched and not yet ended (tests wait for them)
        self.asked = 0  # chunks asked for so far: orders the hold
        # Chunks whose fetch just failed: (ident, chunk) -> (monotonic time, error). When an
        # async readahead fails, the kernel at once retries the page with a synchronous read;
        # without this memory that read would wait out a whole second read_timeout.
        self._failed: dict[tuple[bytes, int], tuple[float, BaseException]] = {}
        self.nursery: trio.Nursery | None = None  # set by the filesystem's run()
        # Chunks the GETs' worker threads delivered that the loop has not committed yet:
        # (get, chunk, xxh3, bytes), and whether a _commit_delivered call is queued.
        self._delivered: list[tuple[_Get, int, int, bytes]] = []
        self._delivered_lock = threading.Lock()
        self._commit_queued = False
        # Chunks fetched for a reader wait for it in memory (BlockCache.hold), charged to
        # the budget, up to half of it; a request short of budget drops them first, those
        # asked for last first.
        cache.release_charge = budget.release
        cache.recycle = store.recycle  # (chunk buffers back to the GETs, if they pool them)
        budget.reclaim = self._reclaim
        self.hold_limit = budget.limit // 2
        # What one GET in flight holds: the piece its socket is filling and the pieces
        # waiting for the loop. The rest of the budget bounds the pipe's ceiling.
        self.request_charge = (PENDING_PIECES + 1) * cache.chunk_size
        pipe = store.pipe
        pipe.ceiling = max(pipe.floor, min(
            pipe.ceiling, (budget.limit - self.hold_limit) // self.request_charge))

    def _reclaim(self, want: int) -> int:
        """Budget for a request: stale held chunks first, then the farthest."""
        before = self.cache.fresh_bytes
        self.cache.drop_stale(HOLD_STALE)
        freed = before - self.cache.fresh_bytes
        if freed < want:
            freed += self.cache.drop_farther(-1, want - freed)
        return freed

    def _plan(self, obj: ObjRef, first: int, last: int) -> tuple[list[tuple[int, int]],
                                                                 list[_Flight]]:
        """Split the missing chunks of [first, last] into requests; return new requests
        and the flights (new and already running) that cover the range."""
        ident = obj.ident
        waits: list[_Flight] = []
        todo: list[int] = []
        for chunk in self.cache.missing(ident, first, last):
            f = self._inflight.get((ident, chunk))
            if f is not None:
                if f not in waits:
                    waits.append(f)
            else:
                todo.append(chunk)
        runs: list[tuple[int, int]] = []
        for chunk in todo:
            if runs and runs[-1][1] == chunk - 1 and chunk - runs[-1][0] < self.max_chunks:
                runs[-1] = (runs[-1][0], chunk)
            else:
                runs.append((chunk, chunk))
        return runs, waits

    def _launch(self, obj: ObjRef, runs: list[tuple[int, int]], keep: bool
                ) -> list[_Flight]:
        assert self.nursery is not None
        flights = []
        for a, b in runs:
            f = _Flight(order=self.asked)
            self.asked += b - a + 1
            for c in range(a, b + 1):
                self._inflight[(obj.ident, c)] = f
            self.running += 1
            self.nursery.start_soon(self._fetch, obj, a, b, f, keep)
            flights.append(f)
        return flights

    async def ensure(self, obj: ObjRef, first: int, last: int, keep: bool = False) -> None:
        """Make chunks [first, last] local (fetching what is missing) and wait for them;
        ``keep``: a reader is about to read them (hold fetched chunks in memory for it)."""
        self._raise_failed(obj, first, last)
        runs, waits = self._plan(obj, first, last)
        waits += self._launch(obj, runs, keep)
        ident = obj.ident
        for f in waits:
            while not f.done.is_set() and any(
                    self._inflight.get((ident, c)) is f for c in range(first, last + 1)):
                await f.progress.wait()
            if f.error is not None and self.cache.missing(ident, first, last):
                raise f.error

    def _raise_failed(self, obj: ObjRef, first: int, last: int) -> None:
        """Fail at once for a chunk whose fetch just gave up (see ``_failed``)."""
        if self._failed:
            now = trio.current_time()
            for k, (t, _) in list(self._failed.items()):
                if now - t > FAILURE_MEMORY:
                    del self._failed[k]
            for c in range(first, last + 1):
                hit = self._failed.get((obj.ident, c))
                if hit is not None:
                    raise hit[1]

    async def split(self, obj: ObjRef, offset: int, size: int) -> bytes | None:
        """A random read whose chunks are all missing and none in flight: its bytes by
        parallel GETs, the rest of its chunks in the background, cached once all are in
        (:mod:`caiosfs.randfetch`). None if some chunk is cached or in flight already
        (``ensure`` then waits for those and fetches the rest)."""
        cs = self.cache.chunk_size
        first, last = offset // cs, (offset + size - 1) // cs
        ident = obj.ident
        self._raise_failed(obj, first, last)
        if (len(self.cache.missing(ident, first, last)) != last - first + 1
                or any((ident, c) in self._inflight for c in range(first, last + 1))):
            return None
        assert self.nursery is not None
        asm = Assembly(offset, size, obj.size, cs)
        charge = sum(len(c) for c in asm.chunks)
        await self.budget.acquire(charge)
        flight = _Flight(order=self.asked)
        self.asked += last - first + 1
        for c in range(first, last + 1):  # later readers of these chunks wait for them
            self._inflight[(ident, c)] = flight
        self.running += 1
        self.nursery.start_soon(self._assemble, obj, asm, flight, charge)
        await asm.own_done.wait()
        if asm.error is not None:
            raise asm.error
        return asm.data()

    async def _assemble(self, obj: ObjRef, asm: Assembly, flight: _Flight, charge: int
                        ) -> None:
        ident = obj.ident

        async def get(start: int, length: int) -> None:
            await self.store.get_range(obj.key, start, length, obj.etag, asm.sink)

        def failed(exc: BaseException) -> BaseException:
            if isinstance(exc, PreconditionFailed):
                err = FsError(errno.ESTALE, f"{obj.key} changed in the store while reading")
                err.__cause__ = exc
                return err
            if isinstance(exc, StoreError):
                return exc
            return FsError(errno.EIO, f"fetch failed: {exc!r}")
        try:
            await asm.run(get, failed)
            if asm.error is None:  # (what came: the read's bytes, the fillers' if all did)
                self.metrics.cache_miss_bytes.inc(charge if asm.complete else asm.size)
            if asm.complete:
                done = await trio.to_thread.run_sync(write_chunks, self.cache, ident, asm)
                self.cache.commit(ident, obj.size, done)
                if self.cache.over_limit():
                    self.cache.evict(protect={ident})
        except OSError as exc:  # the read has its bytes; its chunks are just not cached
            log.error("cache write failed for %s: %s", obj.key, exc.strerror)
        finally:
            self.running -= 1
            self.budget.release(charge)
            for c in range(asm.base // self.cache.chunk_size,
                           asm.base // self.cache.chunk_size + len(asm.chunks)):
                if self._inflight.get((ident, c)) is flight:
                    del self._inflight[(ident, c)]
            flight.done.set()
            flight.bump()
            asm.end()

    async def direct(self, obj: ObjRef, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) straight from the store, bypassing the cache — for
        when the cache cannot take them. Charged to the memory budget like any fetch."""
        buf = bytearray(size)

        def sink(off: int, piece: bytes) -> None:
            buf[off - offset:off - offset + len(piece)] = piece
        await self.budget.acquire(size)
        try:
            await self.store.get_range(obj.key, offset, size, obj.etag, sink)
        except PreconditionFailed as exc:
            raise FsError(errno.ESTALE, f"{obj.key} changed in the store while reading"
                          ) from exc
        finally:
            self.budget.release(size)
        self.metrics.cache_miss_bytes.inc(size)
        return bytes(buf)

    def prefetch(self, obj: ObjRef, first: int, last: int, keep: bool = False) -> bool:
        """Start fetching the missing chunks of [first, last]; whether any was."""
        runs, _ = self._plan(obj, first, last)
        self._launch(obj, runs, keep)
        return bool(runs)

    def _commit_delivered(self) -> None:
        """On the loop: record every chunk the GETs delivered since the last call in the
        index (one LMDB transaction for all of them), then hand each one to its readers.
        When the loop is busy, the chunks of several GETs wait together: one wakeup and one
        transaction for all of them instead of one per chunk."""
        with self._delivered_lock:
            items, self._delivered = self._delivered, []
            self._commit_queued = False
        if not items:
            return
        for get, _, _, _ in items:
            get.pending.release()
        live = [it for it in items if not it[0].commit_error]
        try:
            self.cache.commit_many([(g.ident, g.obj.size, [(c, csum)])
                                    for g, c, csum, _ in live])
        except OSError as exc:  # the index is full or broken: each GET fails (in _get)
            for g, _, _, _ in live:
                if not g.commit_error:
                    g.commit_error.append(exc)
            return
        miss = 0
        for get, chunk, _, data in live:
            ident, flight, size = get.ident, get.flight, get.obj.size
            if get.keep:
                # Parallel GETs deliver near and far chunks interleaved. When the hold is
                # full, chunks asked for later than this one (farther from their readers)
                # make room, and chunks unread for long (their reader left); else this one
                # goes to disk only (read back from the page cache).
                n = len(data)
                order = flight.order + chunk - get.first
                over = self.cache.fresh_bytes + n - self.hold_limit
                if over > 0:
                    self.cache.drop_stale(HOLD_STALE)
                    over = self.cache.fresh_bytes + n - self.hold_limit
                    if over > 0:
                        self.cache.drop_farther(order, over)
                if (self.cache.fresh_bytes + n <= self.hold_limit
                        and self.budget.try_acquire(n)):
                    self.cache.hold(ident, chunk, data, n, order)
            miss += self.cache.chunk_len(chunk, size)
            if self._inflight.get((ident, chunk)) is flight:
                del self._inflight[(ident, chunk)]
            flight.bump()
        self.metrics.cache_miss_bytes.inc(miss)

    async def _fetch(self, obj: ObjRef, a: int, b: int, flight: _Flight, keep: bool
                     ) -> None:
        try:
            await self._get(obj, a, b, flight, keep)
        finally:
            self.running -= 1

    async def _get(self, obj: ObjRef, a: int, b: int, flight: _Flight, keep: bool) -> None:
        cs = self.cache.chunk_size
        start = a * cs
        length = min((b + 1) * cs, obj.size) - start
        ident = obj.ident
        charge = min(length, self.request_charge)
        await self.budget.acquire(charge)
        get = _Get(obj, ident, a, flight, keep, threading.Semaphore(PENDING_PIECES))
        try:
            self.metrics.readahead_window.observe(length)
            token = trio.lowlevel.current_trio_token()

            def on_chunk(chunk: int, csum: int, data: bytes) -> None:  # in the worker thread
                # Fire and forget: the GET thread goes on reading its socket instead of
                # waiting for the loop (a round trip per chunk throttled every stream to
                # the loop's pace), and the loop commits what all GETs delivered since it
                # last looked in one go (_commit_delivered). Chunks are committed in order,
                # and all of them before get_range's own completion, which trio queues
                # after the commit that will take this chunk.
                get.pending.acquire(timeout=PENDING_WAIT)
                with self._delivered_lock:
                    self._delivered.append((get, chunk, csum, data))
                    if self._commit_queued or chunk == b:
                        # The request's last chunk: _get commits it when get_range
                        # returns, a moment later - one wakeup of the loop less per GET
                        # (the only one for a small file's GET).
                        return
                    self._commit_queued = True
                try:
                    token.run_sync_soon(self._commit_delivered)
                except BaseException:  # the loop is gone: never leave the flag set
                    with self._delivered_lock:
                        self._commit_queued = False
                    raise
            writer = self.cache.writer(ident, obj.size, on_chunk, start + length)
            try:
                await self.store.get_range(obj.key, start, length, obj.etag, writer)
            finally:
                # This GET's last chunk, and whatever else waits: committed before the
                # flight ends, so its readers find every chunk (a commit still queued
                # then finds less to do).
                if self._delivered:
                    self._commit_delivered()
            if get.commit_error:
                raise get.commit_error[0]
            if self.cache.over_limit():
                self.cache.evict(protect={ident})
        except PreconditionFailed as exc:
            flight.error = FsError(errno.ESTALE, f"{obj.key} changed in the store while "
                                   "reading")
            flight.error.__cause__ = exc
        except StoreError as exc:
            flight.error = exc
            if isinstance(exc, GaveUp) and len(self._failed) < 100_000:
                t = trio.current_time()
                for c in range(a, b + 1):
                    self._failed[(ident, c)] = (t, exc)
        except OSError as exc:
            log.error("cache write failed for %s: %s", obj.key, exc.strerror)
            flight.error = CacheWriteError(exc.errno or errno.EIO,
                                           f"cache write failed: {exc.strerror}")
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The disk is full (of dirty data, or of other things): clean blocks make
                # room, least recently used first.
                try:
                    self.cache.evict(max(0, self.cache.used - 2 * length
                                         - self.cache.block_size), protect={ident})
                except OSError as exc2:
                    log.error("could not evict to make room: %s", exc2.strerror)
        except Exception as exc:  # a bug in one fetch must not take the mount down
            log.exception("fetch of %s failed unexpectedly", obj.key)
            flight.error = FsError(errno.EIO, f"fetch failed: {exc!r}")
        except BaseException as exc:  # cancelled: never leave waiters hanging
            flight.error = FsError(errno.EIO, f"fetch failed: {exc!r}")
            raise
        finally:
            self.budget.release(charge)
            for c in range(a, b + 1):
                if self._inflight.get((ident, c)) is flight:
                    del self._inflight[(ident, c)]
            flight.done.set()
            flight.bump()


class Reader:
    """Serves reads of clean (store-backed) files through the block cache."""

    def __init__(self, cache: BlockCache, fetcher: Fetcher, metrics: Metrics,
                 readahead_max: int, initial_window: int = 8 << 20) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.pipe = fetcher.store.pipe
        self.metrics = metrics
        self.readahead_max = readahead_max
        self.initial_window = min(initial_window, readahead_max)
        # Streaming handles (id of their Readahead -> last read), to share the pipe fairly.
        self._streams: dict[int, float] = {}
        self._share = (0.0, self.initial_window)  # (when computed, window cap per stream)
        self.disk = DiskAhead(fetcher, metrics)
        # Chunks a random read touched once (ident, chunk): the first small random read of a
        # chunk fetches just its bytes; a second one fetches and caches the whole chunk.
        self._touched: OrderedDict[tuple[bytes, int], None] = OrderedDict()

    def new_readahead(self) -> Readahead:
        return Readahead(self.initial_window, self.readahead_max)

    async def read(self, obj: ObjRef, ra: Readahead, offset: int, size: int) -> bytes:
        if offset >= obj.size or size <= 0:
            return b""
        size = min(size, obj.size - offset)
        end = offset + size
        cs = self.cache.chunk_size
        ra.maximum = self._stream_cap(ra)
        seq = ra.observe(offset, size)
        if not seq and size <= SMALL_RANDOM and self._first_touch(obj, offset, end):
            data = self.cache.read(obj.ident, offset, size, obj.size, random=True)
            if data is not None:
                return data
            # A small random read of a chunk not read before: fetching all of its 1 MiB
            # (the unit of the cache) would cost 256 times the bytes asked for. The bytes
            # alone are fetched; the chunk is cached if it is read again.
            return await self.fetcher.direct(obj, offset, size)
        if not seq and size > SMALL_RANDOM:
            data = await self._random(obj, offset, size)
            if data is not None:
                return data
        loading = self.disk.loading(obj.ident, offset // cs, (end - 1) // cs)
        if loading is not None:  # (a worker reads it from disk already: no second read)
            await loading.wait()
        for _attempt in range(3):
            data = self.cache.read(obj.ident, offset, size, obj.size, random=not seq)
            if data is not None:
                break
            last = (end - 1) // cs
            if seq and ra.window:
                self.pipe.stalls += 1  # a stream waits for data: the pipe may be too narrow
                ra.stalled = trio.current_time()
                if end < obj.size:  # (not a whole small file) the window from here first:
                    self._readahead(obj, ra, offset)  # this read's chunk opens a request
            ra.fetching = trio.current_time()
            try:
                await self.fetcher.ensure(obj, offset // cs, last, keep=True)
            except CacheWriteError:
                return await self.fetcher.direct(obj, offset, size)
        else:
            # The cache cannot hold verified copies of these chunks (its disk corrupts
            # them, or its index cannot be updated): the store still has the bytes.
            log.warning("%s: cached data kept failing verification; reading it directly",
                        obj.key)
            return await self.fetcher.direct(obj, offset, size)
        if seq and ra.window:
            self._readahead(obj, ra, end)
            ahead = min(ra.window, DISK_AHEAD)
            if trio.current_time() - ra.fetching < FETCHING_RECENT:
                # Its data still comes from the store: the hold and the read budget are its
                # GETs' (a load there took the budget a fetched chunk needed to be held,
                # which then went to disk and had to be read back too).
                ahead = 0
            until = min(obj.size, end + ahead)
            if ahead and until - max(end, ra.loaded_until) >= min(ahead // 2,
                                                                  self.cache.block_size):
                # Cached chunks ahead of us: read from the local disk by a worker thread
                # into memory before we come for them (caiosfs.diskahead). As far as the
                # first chunk that is not cached (still being fetched: a later read looks
                # again). Not for a whole small file read at once: a thread hop per file
                # for nothing.
                first = max(end, ra.loaded_until) // cs
                upto = self.disk.start(obj.ident, obj.size, first, (until - 1) // cs,
                                       self.fetcher.asked)
                ra.loaded_until = max(ra.loaded_until, min(until, upto * cs))
        return data

    async def _random(self, obj: ObjRef, offset: int, size: int) -> bytes | None:
        """A random read: from the cache, or its missing bytes by parallel GETs
        (``Fetcher.split``) with the cached rest around them; None where that does not
        apply (its missing chunks are not one run, or some are in flight)."""
        cs = self.cache.chunk_size
        end = offset + size
        missing = self.cache.missing(obj.ident, offset // cs, (end - 1) // cs)
        if not missing:
            return self.cache.read(obj.ident, offset, size, obj.size, random=True)
        if missing[-1] - missing[0] + 1 != len(missing) or self.pipe.latency < SPLIT_LATENCY:
            return None
        lo, hi = max(offset, missing[0] * cs), min(end, (missing[-1] + 1) * cs)
        # (the cached parts first: nothing can evict them while the GETs run)
        before = self.cache.read(obj.ident, offset, lo - offset, obj.size)
        after = self.cache.read(obj.ident, hi, end - hi, obj.size)
        if before is None or after is None:
            return None
        mid = await self.fetcher.split(obj, lo, hi - lo)
        if mid is None:
            return None
        return before + mid + after if before or after else mid

    def _stream_cap(self, ra: Readahead) -> int:
        """The window cap of one stream: its share of the GETs the pipe keeps in flight
        (a little more, so the pipe never runs dry), in whole requests."""
        now = trio.current_time()
        if ra.window:
            self._streams[id(ra)] = now
        when, cap = self._share
        if now - when < 0.1:
            return cap
        for k, t in list(self._streams.items()):
            if now - t > ACTIVE_STREAM:
                del self._streams[k]
        request = self.fetcher.max_chunks * self.cache.chunk_size
        share = math.ceil(STREAM_SHARE * self.pipe.size / max(1, len(self._streams)))
        cap = max(self.initial_window, min(self.readahead_max, max(2, share) * request))
        self._share = (now, cap)
        return cap

    def _first_touch(self, obj: ObjRef, offset: int, end: int) -> bool:
        """Record the chunks of [offset, end); True if none was touched before."""
        cs = self.cache.chunk_size
        keys = [(obj.ident, c) for c in range(offset // cs, (end - 1) // cs + 1)]
        first = not any(k in self._touched for k in keys)
        for k in keys:
            self._touched[k] = None
            self._touched.move_to_end(k)
        while len(self._touched) > TOUCHED_MAX:
            self._touched.popitem(last=False)
        return first

    def _lead(self, ra: Readahead) -> int:
        """How far a stream may ask for data ahead of its reader (docs/ARCHITECTURE.md,
        "How far ahead"). While its reader keeps up with nothing (no wait for data within
        ``STALL_RECENT``), everything it asks for arrives before it is read and waits in the
        hold: its share of the hold, two requests at least. While its reader waits for data
        (the store is the limit), each chunk is read as soon as the requests before it are
        in, and the requests in flight are about half in on average: twice its share of the
        hold keeps what waits near that share, and three requests at least. (One and a half
        times the share kept a lone stream at 8-12 GETs of 16 MiB, whatever the pipe
        allowed: 0.6x raw boto3's 16 behind a per-connection rate.)"""
        request = self.fetcher.max_chunks * self.cache.chunk_size
        share = self.fetcher.hold_limit // max(1, len(self._streams))
        if trio.current_time() - ra.stalled <= STALL_RECENT:
            return max(2 * share, 3 * request)
        return max(share, 2 * request)

    def _readahead(self, obj: ObjRef, ra: Readahead, end: int) -> None:
        target = min(obj.size, end + ra.window)
        start = max(end, ra.fetched_until)
        # Keep the window full one whole request at a time (or up to the object's end):
        # every GET is as large as allowed, and the pipe never waits for half a window.
        cs = self.cache.chunk_size
        step = max(cs, min(self.fetcher.max_chunks * cs, ra.window // 2))
        if start - end >= step:
            # Beyond the first request ahead, no further than the hold keeps for the reader.
            target = min(target, end + self._lead(ra))
        if target < obj.size:
            # Whole requests only: a target cut anywhere left a 1 MiB GET behind (a round
            # trip for 1 MiB; 6 of the 71 GETs of a cold 1 GiB read).
            target = start + (target - start) // step * step
        if start >= target:
            return
        if self.fetcher.prefetch(obj, start // cs, (target - 1) // cs, keep=True):
            ra.fetching = trio.current_time()
        ra.fetched_until = target
