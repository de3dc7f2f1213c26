"""Deterministic, fast, incompressible test content.

A run seeds several GiB and writes several more; generating that with a PRNG would cost more
time than some of the measurements. Instead one 17 MiB random base is made once, and MiB ``i``
of stream ``seed`` is a window of that base at a ``(seed, i)``-dependent byte offset, stamped
with ``(seed, i)`` in its first 16 bytes. So every MiB of every stream is
distinct (a read from the wrong offset changes the hash), and making a chunk costs one slice.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from functools import lru_cache
from typing import Any

import xxhash

MiB = 1 << 20
_BASE = 16 * MiB


@lru_cache(maxsize=1)
def _base() -> bytes:
    return random.Random("caiosfs-bench").randbytes(_BASE + MiB)


def chunk(seed: str, index: int, n: int = MiB) -> bytes:
    """MiB number ``index`` of stream ``seed``, cut to ``n`` bytes (n <= 1 MiB)."""
    # One base for all seeds (expanding a base per seed would cost 0.1 s for every small
    # file); the seed moves the window and is stamped in, so streams still differ.
    s = zlib.crc32(seed.encode())
    # A large odd multiplier spreads windows over the base; a prime keeps them from lining up.
    off = (s * 7919 + index * 1_000_003) % _BASE
    stamp = struct.pack("<QQ", s, index)
    return (stamp + _base()[off + len(stamp) : off + MiB])[:n]


def make_bytes(seed: str, size: int) -> bytes:
    """The first ``size`` bytes of stream ``seed`` as one buffer (for small objects)."""
    return b"".join(chunk(seed, i // MiB, min(MiB, size - i)) for i in range(0, size, MiB))


def digest(seed: str, size: int) -> str:
    """xxh3-64 hex digest of ``make_bytes(seed, size)`` without building it."""
    h = xxhash.xxh3_64()
    for i in range(0, size, MiB):
        h.update(chunk(seed, i // MiB, min(MiB, size - i)))
    return h.hexdigest()


class Stream(io.RawIOBase):
    """A read-only file object of ``size`` bytes of stream ``seed``, hashing what it yields.

    boto3's managed upload reads from it, so multi-GiB objects never sit in memory whole.
    """

    def __init__(self, seed: str, size: int) -> None:
        self.seed = seed
        self.size = size
        self.pos = 0
        self.hasher = xxhash.xxh3_64()
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.pos >= self.size:
            return 0
        if not self._buf:
            idx = self.pos // MiB
            self._buf = memoryview(chunk(self.seed, idx, min(MiB, self.size - idx * MiB)))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self.hasher.update(self._buf[:n])
        self._buf = self._buf[n:]
        self.pos += n
        return n


def range_bytes(seed: str, off: int, n: int) -> bytes:
    """Bytes ``[off, off + n)`` of stream ``seed`` (the caller keeps the range inside the
    object: a stream's MiB ``i`` does not depend on the object's size, only its length does)."""
    out = []
    pos = off
    end = off + n
    for _ in range(n // MiB + 2):
        if pos >= end:
            break
        idx = pos // MiB
        lo = pos - idx * MiB
        hi = min(MiB, end - idx * MiB)
        out.append(chunk(seed, idx, hi)[lo:hi])
        pos = idx * MiB + hi
    return b"".join(out)


def range_digest(seed: str, off: int, n: int) -> str:
    """xxh3-64 hex digest of ``range_bytes(seed, off, n)``."""
    return xxhash.xxh3_64(range_bytes(seed, off, n)).hexdigest()
