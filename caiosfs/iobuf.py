"""Page-aligned byte buffers: what a ranged GET receives its pieces into.

A piece received straight into such a buffer is written to its block file with ``O_DIRECT``
(``cache.ChunkWriter``), which needs the buffer's address aligned: on the development VMs a
buffered ``pwrite`` of 1 GiB into the page cache cost 1.1-2 s of CPU (a quarter of the
daemon's CPU on a cold read, by perf), an ``O_DIRECT`` one 0.05 s.

The buffer is a plain ``bytearray`` (everything that took the ``bytes`` of a piece takes it):
one ``ALIGN`` larger when made, its front cut off to the aligned address - CPython only
moves a bytearray's start for that, it copies nothing - and its tail trimmed.
"""

from __future__ import annotations

import ctypes
import threading

ALIGN = 4096  # what O_DIRECT asks of a buffer's address (the page size; the device's is less)


def address(buf: bytearray) -> int:
    """The address of a bytearray's first byte (0 for an empty one)."""
    if not buf:
        return 0
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c  # (the buffer export ends here: the bytearray may be resized again)


def aligned(n: int) -> bytearray:
    """A zeroed bytearray of ``n`` bytes whose first byte's address is a multiple of
    ALIGN if ``n`` is at least ALIGN (a smaller one is moved when its tail is trimmed:
    nothing that small is written with O_DIRECT)."""
    buf = bytearray(n + ALIGN)
    skip = -address(buf) % ALIGN
    del buf[:skip]  # (moves the start: no copy)
    del buf[n:]
    return buf


def is_aligned(buf: object) -> bool:
    """Whether ``buf`` is a bytearray at an ALIGN-aligned address (as :func:`aligned`
    made it)."""
    return isinstance(buf, bytearray) and address(buf) % ALIGN == 0


class Pool:
    """Aligned buffers of ``size`` bytes, given back when their last user is done with them
    and handed out again (at most ``keep`` wait).

    A fresh 1 MiB buffer costs its zeroing and, after the heap was trimmed, 256 page faults.
    A GET's piece lives on after the GET as a cache chunk (held for its reader, then in the
    verified LRU): the cache gives it back when it drops the chunk and nothing else holds
    it (``BlockCache.recycle``)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self.reused = 0  # (tests and the curious)

    def take(self) -> bytearray:
        with self._lock:
            if self._free:
                self.reused += 1
                return self._free.pop()
        return aligned(self.size)

    def give(self, buf: bytearray) -> None:
        """Take back a buffer nobody else holds (the caller made sure)."""
        if len(buf) == self.size and is_aligned(buf):
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)
