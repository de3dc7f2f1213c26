"""ReadPipe: how many ranged GETs the mount keeps in flight, decided by measurement.

A remote store gives each connection a limited rate and charges a round trip per request;
throughput comes from many requests in flight. How many is enough depends on the store and
the path to it, which a constant cannot know: on loopback 16 GETs of 16 MiB already saturate
two cores, behind 20 ms and 50 MB/s per connection they carry ~750 MB/s at most and the
client wants more. So the pipe measures and climbs (docs/ARCHITECTURE.md, "Read pipe"):

- every GET reports its bytes, its time to first piece and its streaming rate (one
  connection's rate), kept as moving averages (the metrics show them);
- while the pipe is full (every slot busy) and readers still wait for data, it compares the
  aggregate rate of one measuring interval with the one before: after a raise, a gain of at
  least ``GAIN`` keeps the raise and tries the next one; no gain takes it back and holds for
  ``HOLD`` seconds before probing again. The number never leaves [floor, ceiling]; the
  ceiling comes from the memory budget (each GET in flight is charged a few pieces).

The interval is a few request times long (``ROUNDS`` x (latency + request / rate)), so that a
raise has shown in the rate before it is judged. Counting is cheap: the worker threads add
bytes to one integer, the loop does the rest once per finished GET.
"""

from __future__ import annotations

import logging
import math

import trio

from ..metrics import Metrics

log = logging.getLogger(__name__)
GAIN = 1.10  # a raise is kept only if the aggregate rate grew by at least 10 %
HOLD = 20.0  # seconds before probing again after a raise that did not pay
ROUNDS = 2.0  # measuring interval, in request times
MIN_INTERVAL = 0.25  # seconds
EWMA = 0.2  # weight of a new sample in the moving averages


class ReadPipe:
    """Owns the read limiter's size; see the module docstring."""

    def __init__(self, limiter: trio.CapacityLimiter, floor: int, ceiling: int,
                 metrics: Metrics) -> None:
        self.limiter = limiter
        self.floor = max(1, floor)
        self.ceiling = max(self.floor, ceiling)
        self.metrics = metrics
        self.latency = 0.0  # seconds from sending a GET to its first piece (moving average)
        self.conn_rate = 0.0  # bytes/s one GET streams at once started (moving average)
        self.request_bytes = 0.0  # bytes per GET (moving average)
        self.bytes_in = 0  # added to by worker threads: bytes received since start
        self._t0: float | None = None  # start of the measuring interval (trio clock)
        self._b0 = 0  # bytes_in at its start
        self._busy = 0  # finished GETs in this interval that found the pipe full
        self.stalls = 0  # reads that waited for a GET in this interval (the reader adds)
        self._done = 0  # finished GETs in this interval
        self._base = 0.0  # aggregate rate before the raise being judged (0: none)
        self._before = self.floor  # size to go back to if the raise does not pay
        self._hold_until = 0.0
        self._set(self.floor)

    @property
    def size(self) -> int:
        return int(self.limiter.total_tokens)

    def _set(self, n: int, why: str = "start") -> None:
        log.debug("read pipe: %d GETs in flight (%s; first byte %.0f ms, %.1f MB/s per GET)",
                  n, why, self.latency * 1e3, self.conn_rate / 1e6)
        self.limiter.total_tokens = n
        self.metrics.read_parallel.set(n)

    def request_time(self) -> float:
        """Seconds one GET of the usual size takes (0 until measured)."""
        if not self.conn_rate:
            return 0.0
        return self.latency + self.request_bytes / self.conn_rate

    def finished(self, nbytes: int, sent: float, first: float, end: float) -> None:
        """A GET of ``nbytes`` finished (times from time.monotonic() in its thread: sent,
        first piece in, last piece in). Runs on the loop."""
        if nbytes <= 0 or first < sent:
            return
        # The first piece (1 MiB) arrived at latency + piece/rate: the rate comes from the
        # rest of the body, the latency from the first piece less its own transfer time.
        piece = min(nbytes, 1 << 20)
        if end > first and nbytes > piece:
            rate = (nbytes - piece) / (end - first)
            self.conn_rate = rate if not self.conn_rate else (
                self.conn_rate + EWMA * (rate - self.conn_rate))
        lat = max(0.0, first - sent - (piece / self.conn_rate if self.conn_rate else 0.0))
        self.latency = lat if not self.request_bytes else (
            self.latency + EWMA * (lat - self.latency))
        self.request_bytes = nbytes if not self.request_bytes else (
            self.request_bytes + EWMA * (nbytes - self.request_bytes))
        self.metrics.read_latency.set(self.latency)
        self.metrics.read_connection_rate.set(self.conn_rate)
        self._done += 1
        st = self.limiter.statistics()
        if st.borrowed_tokens + st.tasks_waiting + 1 >= st.total_tokens:  # ours just left
            self._busy += 1
        self._tick(trio.current_time())

    def _tick(self, now: float) -> None:
        if self._t0 is None:
            self._t0, self._b0 = now, self.bytes_in
            return
        elapsed = now - self._t0
        if elapsed < max(MIN_INTERVAL, ROUNDS * self.request_time()) or self._done < 4:
            return
        rate = (self.bytes_in - self._b0) / elapsed
        saturated = self._busy * 2 >= self._done and self.stalls > 0
        self._t0, self._b0, self._busy, self._done = now, self.bytes_in, 0, 0
        self.stalls = 0
        if self._base:  # judging a raise
            if rate >= self._base * GAIN and saturated:
                self._raise(rate, rate / self._base)
            elif rate < self._base * GAIN:
                self._set(self._before, f"{rate / 1e6:.0f} MB/s did not beat "
                                        f"{self._base / 1e6:.0f}")
                self._base = 0.0
                self._hold_until = now + HOLD
            else:  # grew, but demand fell away: keep it, nothing to judge further
                self._base = 0.0
        elif saturated and now >= self._hold_until:
            self._raise(rate, 0.0)

    def _raise(self, rate: float, gain: float) -> None:
        """Probe a wider pipe: double it first and while each raise paid well (the pipe was
        far too narrow, as behind a per-connection rate), then in smaller steps."""
        n = self.size
        if n >= self.ceiling:
            self._base = 0.0
            return
        self._before = n
        self._base = rate
        step = 2.0 if not gain or gain >= 1.4 else 1.25
        self._set(min(self.ceiling, max(n + 2, math.ceil(n * step))),
                  f"{rate / 1e6:.0f} MB/s with {n}")
