"""How a random read larger than a few pieces is fetched: its own bytes first, in parallel.

The cache's unit is a chunk (1 MiB). A 1 MiB read at a random 4 KiB-aligned offset spans two
chunks; fetching them as one GET of 2 MiB made the reader wait for twice its bytes on one
connection: behind 20 ms and 50 MB/s per connection 59 ms a read, against 38 ms for raw
boto3's one 1 MiB GET (docs/ARCHITECTURE.md, "Random reads"). Here the chunks the read
touches are fetched into one buffer by several GETs at once:

- the read's own bytes, split evenly into GETs of at most ``PART`` bytes (the reader waits
  for these only: one round trip plus ``PART`` at one connection's rate);
- the rest of its first and last chunk (*fillers*), in the background; once every GET has
  come in, the whole chunks are written to the cache and committed, so a re-read of the
  region is a cache hit.

A filler that fails only means the chunks are not cached; a GET of the read's own bytes that
fails fails the read. Every GET is pinned to the object's ETag (``If-Match``), and the cache
keeps its checksums: the chunks are hashed as they are written, like any fetched chunk.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from typing import cast

import trio

from .cache import BlockCache
from .errors import FsError, StoreError
from .iobuf import aligned

log = logging.getLogger(__name__)

# A random read's own bytes go out as GETs of at most this size, in parallel. Behind 20 ms
# and 50 MB/s per connection a GET of 512 KiB takes ~31 ms against ~41 ms for 1 MiB; halving
# again saves 5 ms more per read for one more request each (CPU on a loopback store).
PART = 512 << 10

Range = tuple[int, int]  # (start, length)


def plan(offset: int, size: int, obj_size: int, chunk_size: int
         ) -> tuple[Range, list[Range], list[Range]]:
    """For a read of [offset, offset+size) (within the object): the span of whole chunks it
    touches, the GETs of its own bytes (at most ``PART`` each, of about equal size) and the
    fillers (the rest of the span before and after it)."""
    end = offset + size
    base = offset - offset % chunk_size
    top = min(obj_size, -(-end // chunk_size) * chunk_size)
    n = max(1, math.ceil(size / PART))
    step = -(-size // n)
    step += -step % 4096  # (page-aligned boundaries, as pieces land in the buffer)
    own = [(s, min(step, end - s)) for s in range(offset, end, step)]
    fill = [(a, b - a) for a, b in ((base, offset), (end, top)) if b > a]
    return (base, top - base), own, fill


class Assembly:
    """The chunks one random read touches, filled by parallel GETs into one buffer."""

    def __init__(self, offset: int, size: int, obj_size: int, chunk_size: int) -> None:
        (self.base, n), self.own, self.fill = plan(offset, size, obj_size, chunk_size)
        self.offset, self.size, self.obj_size = offset, size, obj_size
        self.cs = chunk_size
        # One buffer per chunk (page-aligned: a whole chunk is written with O_DIRECT).
        self.chunks = [aligned(min(chunk_size, n - i)) for i in range(0, n, chunk_size)]
        self.own_done = trio.Event()  # the read's bytes are in (or one of their GETs failed)
        self.error: BaseException | None = None  # why the read's bytes could not be had
        self.complete = False  # every GET succeeded: the chunks may be cached
        self._left = len(self.own)

    def sink(self, off: int, piece: bytes) -> None:
        """Where a GET's pieces land (in its worker thread); a retry writes them again."""
        cs, view, end = self.cs, memoryview(piece), off + len(piece)
        while off < end:  # (bounded: one step per chunk the piece overlaps)
            k, i = divmod(off - self.base, cs)
            n = min(end - off, cs - i)
            self.chunks[k][i:i + n] = view[:n]
            view, off = view[n:], off + n

    def data(self) -> bytes:
        """The read's bytes (once ``own_done`` is set without an error)."""
        lo = self.offset - self.base
        hi = lo + self.size
        parts = []
        for k, chunk in enumerate(self.chunks):
            a, b = max(lo - k * self.cs, 0), min(hi - k * self.cs, len(chunk))
            if a < b:
                parts.append(memoryview(chunk)[a:b])
        return b"".join(parts)

    async def run(self, get: Callable[[int, int], Awaitable[None]],
                  failed: Callable[[BaseException], BaseException]) -> None:
        """Run every GET (``get(start, length)``, awaited); ``failed`` maps a GET's error
        to what the reader sees. Returns when all are done or the read's bytes failed."""
        fill_ok = [True]
        async with trio.open_nursery() as nursery:
            for start, length in self.own:
                nursery.start_soon(self._one, get, start, length, True, failed, fill_ok,
                                   nursery.cancel_scope)
            for start, length in self.fill:
                nursery.start_soon(self._one, get, start, length, False, failed, fill_ok,
                                   nursery.cancel_scope)
        self.complete = self.error is None and fill_ok[0]
        self.own_done.set()

    def end(self) -> None:
        """Whatever happened (cancelled before its GETs came in too), the reader wakes, and
        only with its bytes or an error."""
        if self._left and self.error is None:
            self.error = FsError(errno.EIO, "random read abandoned")
        self.own_done.set()

    async def _one(self, get: Callable[[int, int], Awaitable[None]], start: int, length: int,
                   own: bool, failed: Callable[[BaseException], BaseException],
                   fill_ok: list[bool], scope: trio.CancelScope) -> None:
        try:
            await get(start, length)
        except Exception as exc:  # (a store error or a bug: never the whole mount)
            if not isinstance(exc, StoreError):
                log.exception("GET of %d+%d failed unexpectedly", start, length)
            if not own:
                fill_ok[0] = False
                return
            if self.error is None:
                self.error = failed(exc)
            scope.cancel()  # the rest is of no use to this read
            self.own_done.set()
            return
        if own:
            self._left -= 1
            if not self._left:
                self.own_done.set()


def write_chunks(cache: BlockCache, ident: bytes, asm: Assembly) -> list[tuple[int, int]]:
    """In a worker thread: write the assembled chunks to their block file (hashed as they
    go, like any fetched chunk); returns (chunk, xxh3) for the loop to commit."""
    w = cache.writer(ident, asm.obj_size)
    try:
        for k, chunk in enumerate(asm.chunks):
            w(asm.base + k * asm.cs, cast(bytes, chunk))  # (a bytearray, as GET pieces)
    finally:
        w.close()
    return w.done
