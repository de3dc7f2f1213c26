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
