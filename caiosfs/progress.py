"""What the bulk commands share that needs nothing heavy: shard arguments and the progress
line (``caiosfs warm`` and ``caiosfs cp`` print the same one). Kept apart from warm.py so
that ``cp`` does not import the block cache (LMDB) to start."""

from __future__ import annotations

import sys
import time

import xxhash

from .errors import UserError


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"bad --shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"bad --shard {text!r}: need 0 <= I < N")
    return i, n


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    return xxhash.xxh64_intdigest(key.encode()) % shard[1] == shard[0]


class Progress:
    """Bytes, rate and ETA on stderr: one updating line on a terminal, else every 5 s."""

    def __init__(self, total: int, nobjects: int, quiet: bool = False,
                 label: str = "warm") -> None:
        self.total, self.nobjects, self.quiet, self.label = total, nobjects, quiet, label
        self.done = 0
        self.objects_done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        el = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (f"{self.label}: {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB ({pct:.0f}%), "
                f"{self.objects_done}/{self.nobjects} objects, {rate / 2**20:,.0f} MiB/s, "
                f"ETA {eta_s}")

    def update(self, nbytes: int, objects: int = 0) -> None:
        self.done += nbytes
        self.objects_done += objects
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty and now - self._last > 0.2:
            print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            self._last = now
        elif not self.tty and now - self._last > 5:
            print(self.line(), file=sys.stderr, flush=True)
            self._last = now

    def finish(self) -> None:
        if not self.quiet:
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)
