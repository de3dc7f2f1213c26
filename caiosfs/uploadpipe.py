"""UploadPipe: how many multipart parts ``caiosfs cp`` keeps in flight, decided by measurement.

What limits an upload depends on the path to the store, which a constant cannot know.
Measured on the 2-core development VM (8 x 128 MiB, parts of 64 MiB, docs/cp.md "How it
moves data"): straight to SeaweedFS on loopback, and behind 20 ms and 50 MB/s per connection,
the server's own CPU is the limit (~13 s of CPU per GiB received, whatever the client):
8 parts in flight carry as much as 16 (7.5-9.8 s against 7.9-9.2 s), and 16 cost the server
~5 % more CPU. Behind 20 ms and 10 MB/s per connection, each connection is the limit: 8 parts
carried 74 MB/s (9.3 MB/s each), 16 carried 97 MB/s. So the pipe starts at ``floor`` parts
and climbs while the aggregate rate grows, like the mount's read pipe
(:mod:`caiosfs.store.pipe`):

- the sending threads add every piece of a part's body to one counter (:meth:`sent`);
- every interval (0.5-2 s: long enough for 32 MiB to leave) a controller thread calls
  :meth:`tick`: while every slot is busy and parts wait, it raises the parts allowed in
  flight by ``STEP`` and judges the raise on the interval after the next one (the one right after a raise holds the new connections'
  first bursts into their socket buffers): a gain of at least ``GAIN`` keeps it and tries
  the next one, less steps back to where it was and holds ``HOLD`` seconds before probing
  again. Stepping back starts no new part until fewer than the limit are in flight, but a
  part already started is never interrupted: a raise that did not pay is paid for until
  its parts end. Hence small steps, not the read pipe's doubling: doubling from 8 on
  loopback put all 16 parts of 8 x 128 MiB in flight at once, and the server spent 13.9-
  14.1 s of CPU on them instead of 12.7-13.2 s (wall 14.9-16.3 s against main's fixed
  8: 14.2-15.8 s, 3 runs each, load 6-7);
- the number never leaves [floor, ceiling]. A part in flight holds no body in memory (it is
  sent from its file: ``sendfile`` over plain http, one 1 MiB read at a time over TLS) but its
  connection's kernel send buffer (at most ``net.ipv4.tcp_wmem``'s maximum, 4 MiB here):
  the ceiling (``2 x parallel``, 32 by default) bounds that to ~160 MiB.

Thread-safe: the part threads call :meth:`try_take`, :meth:`give` and :meth:`sent`, one
controller thread calls :meth:`tick`; the clock is given, so tests drive it by hand.
"""

from __future__ import annotations

import logging
import math
import threading

log = logging.getLogger(__name__)

# A measuring interval: long enough for ``INTERVAL_BYTES`` to be sent at the last rate
# measured (bytes are counted in 1 MiB pieces: 32 of them keep the count's grain near 3 %),
# within [INTERVAL, MAX_INTERVAL] seconds.
INTERVAL = 0.5
MAX_INTERVAL = 2.0
INTERVAL_BYTES = 32 << 20
GAIN = 1.10  # a raise is kept only if the aggregate rate grew by at least 10 %
STEP = 1.25  # a raise: this many times the parts in flight (one more at least)
HOLD = 20.0  # seconds before probing again after a raise that did not pay
# A raise starts parts that cannot be taken back and is judged two intervals later: it is
# tried only while at least LEFT times the parts allowed in flight still wait. A short
# upload keeps its floor: 8 x 128 MiB (16 parts, 8 in flight) climbed to 10-13 and ran
# 0.87x as fast as the fixed 8 on the 2-core VM (docs/cp.md, "The pipe on this workload").
LEFT = 2


class UploadPipe:
    """The parts allowed in flight; see the module docstring."""

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = max(1, floor)
        self.ceiling = max(self.floor, ceiling)
        self.limit = self.floor
        self.in_flight = 0
        self.peak = 0  # most parts in flight at once (the summary's --json tells it)
        self._lock = threading.Lock()
        self._bytes = 0  # body bytes sent since the start
        self._t0: float | None = None  # start of the measuring interval
        self._b0 = 0
        self._settle = False  # the interval now running follows a change: not judged
        self._base = 0.0  # aggregate rate before the raise being judged (0: none)
        self._before = self.floor  # where to go back to if that raise does not pay
        self._hold_until = 0.0
        self.interval = INTERVAL  # seconds until the controller's next tick

    # (the part threads)
    def try_take(self) -> bool:
        """A slot for one more part, if the limit allows it now."""
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return True

    def give(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def free(self) -> bool:
        return self.in_flight < self.limit

    def sent(self, n: int) -> None:
        """``n`` more bytes of some part's body left this process."""
        with self._lock:
            self._bytes += n

    # (the controller thread)
    def tick(self, now: float, waiting: int) -> bool:
        """End a measuring interval at ``now`` (``waiting``: parts not started yet);
        True when the limit went up (the caller wakes the threads)."""
        with self._lock:
            if self._t0 is None or now <= self._t0:
                self._t0, self._b0 = now, self._bytes
                return False
            rate = (self._bytes - self._b0) / (now - self._t0)
            self._t0, self._b0 = now, self._bytes
            full = self.in_flight >= self.limit
        self.interval = min(MAX_INTERVAL, max(INTERVAL, INTERVAL_BYTES / max(rate, 1.0)))
        if self._settle:
            self._settle = False
            return False
        if self._base:  # judge the raise
            base, self._base = self._base, 0.0
            if rate < base * GAIN:
                log.debug("upload pipe: %d parts -> %d (%.0f MB/s, %.0f before)",
                          self.limit, self._before, rate / 1e6, base / 1e6)
                self.limit, self._settle = self._before, True
                self._hold_until = now + HOLD
                return False
        if (not full or waiting < LEFT * self.limit or now < self._hold_until
                or self.limit >= self.ceiling):
            return False
        self._base, self._before = rate, self.limit
        step = max(self.limit + 1, math.ceil(self.limit * STEP))
        self.limit, self._settle = min(self.ceiling, step), True
        log.debug("upload pipe: %d parts -> %d (%.0f MB/s)", self._before, self.limit,
                  rate / 1e6)
        return True
