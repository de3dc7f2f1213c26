"""Prometheus metrics of one mount. Every layer counts through one :class:`Metrics` object.

Each mount has its own ``CollectorRegistry`` (tests run many filesystems in one process).
``snapshot()`` gives the plain numbers that ``caiosfs status`` shows, without the HTTP port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WIN = tuple(float(1 << n) for n in range(20, 29))  # 1 MiB .. 256 MiB
# Store answers that an object is not there: what a lookup of a name that does not exist
# gets (git probes hundreds), counted apart from errors in ``snapshot``.
NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "caiosfs_"
        self.cache_hit_bytes = Counter(p + "cache_hit_bytes", "Bytes served from the local cache",
                                       registry=r)
        self.cache_miss_bytes = Counter(p + "cache_miss_bytes",
                                        "Bytes that had to be fetched from the store", registry=r)
        self.cache_hit_chunks = Counter(p + "cache_hit_chunks", "Cache chunks found locally",
                                        registry=r)
        self.cache_miss_chunks = Counter(p + "cache_miss_chunks", "Cache chunks fetched",
                                         registry=r)
        self.cache_evicted_blocks = Counter(p + "cache_evicted_blocks", "Blocks evicted (LRU)",
                                            registry=r)
        self.cache_evicted_bytes = Counter(p + "cache_evicted_bytes", "Bytes evicted (LRU)",
                                           registry=r)
        self.cache_checksum_failures = Counter(p + "cache_checksum_failures",
                                               "Cached chunks whose xxh3 did not match (refetched)",
                                               registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Clean bytes in the block cache", registry=r)
        self.cache_limit_bytes = Gauge(p + "cache_limit_bytes", "cache_size", registry=r)
        self.s3_requests = Counter(p + "s3_requests", "Object-store requests",
                                   ["op", "status"], registry=r)
        self.s3_latency = Histogram(p + "s3_request_seconds", "Object-store request latency",
                                    ["op"], buckets=_LAT, registry=r)
        self.s3_retries = Counter(p + "s3_retries", "Object-store requests retried", ["op"],
                                  registry=r)
        self.s3_bytes_in = Counter(p + "s3_bytes_in", "Bytes downloaded", registry=r)
        self.s3_bytes_out = Counter(p + "s3_bytes_out", "Bytes uploaded", registry=r)
        self.dirty_bytes = Gauge(p + "dirty_bytes", "Bytes written but not yet in the store",
                                 registry=r)
        self.dirty_files = Gauge(p + "dirty_files", "Files with data not yet in the store",
                                 registry=r)
        self.oldest_dirty_seconds = Gauge(p + "oldest_dirty_seconds",
                                          "Age of the oldest not-yet-uploaded change", registry=r)
        self.uploads_queued = Gauge(p + "uploads_queued", "Files waiting to upload", registry=r)
        self.uploads_in_flight = Gauge(p + "uploads_in_flight", "Uploads running", registry=r)
        self.uploads_done = Counter(p + "uploads_completed", "Files uploaded", registry=r)
        self.uploads_failed = Counter(p + "uploads_failed", "Upload attempts that failed",
                                      registry=r)
        self.conflicts = Counter(p + "conflicts", "Objects changed in the store while we had "
                                 "local changes (both versions kept)", registry=r)
        self.fuse_ops = Counter(p + "fuse_ops", "FUSE operations", ["op"], registry=r)
        self.fuse_errors = Counter(p + "fuse_errors", "FUSE operations that failed",
                                   ["op", "errno"], registry=r)
        self.fuse_latency = Histogram(p + "fuse_op_seconds", "FUSE operation latency", ["op"],
                                      buckets=_LAT, registry=r)
        self._op_children: dict[str, tuple[Any, Any]] = {}
        self._store_children: dict[str, tuple[Any, Any]] = {}
        self.readahead_window = Histogram(p + "readahead_window_bytes",
                                          "Readahead window size when a fetch is issued",
                                          buckets=_WIN, registry=r)
        self.read_parallel = Gauge(p + "read_parallel", "Ranged GETs the read pipe allows in "
                                   "flight (measured: see docs/ARCHITECTURE.md)", registry=r)
        self.read_latency = Gauge(p + "read_first_byte_seconds", "Moving average of a GET's "
                                  "time to its first piece", registry=r)
        self.read_connection_rate = Gauge(p + "read_connection_bytes_per_second",
                                          "Moving average of one GET's streaming rate",
                                          registry=r)
        self.memory_in_use = Gauge(p + "read_memory_bytes", "Read buffers in use (budgeted)",
                                   registry=r)
        self.skipped_keys = Counter(p + "skipped_keys", "Object keys that cannot be a path",
                                    registry=r)
        self.warm_bytes = Counter(p + "warm_bytes", "Bytes fetched by pre-warming", registry=r)
        self.dirahead_files = Counter(p + "dirahead_files", "Small files fetched ahead of a "
                                      "reader going through a directory", registry=r)

    def op(self, name: str) -> tuple[Any, Any]:
        """(count, latency) children of one FUSE operation, looked up once: labels() takes a
        lock and builds a key, and a `cp -r` makes thousands of calls a second."""
        c = self._op_children.get(name)
        if c is None:
            c = self._op_children[name] = (self.fuse_ops.labels(name),
                                           self.fuse_latency.labels(name))
        return c

    def store_op(self, op: str) -> tuple[Any, Any]:
        """(requests that succeeded, latency) children of one store operation, looked up
        once (see ``op``): every GET of a data loader's file counts through them."""
        c = self._store_children.get(op)
        if c is None:
            c = self._store_children[op] = (self.s3_requests.labels(op, "ok"),
                                            self.s3_latency.labels(op))
        return c

    def value(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching labels (tests and status)."""
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def _requests(self, status: Callable[[str | None], bool]) -> float:
        """Store requests whose status label ``status`` accepts."""
        return sum(s.value for m in self.registry.collect() for s in m.samples
                   if s.name == "caiosfs_s3_requests_total" and status(s.labels.get("status")))

    def snapshot(self) -> dict[str, Any]:
        v = self.value
        hits, misses = v("caiosfs_cache_hit_bytes_total"), v("caiosfs_cache_miss_bytes_total")
        return {
            "cache_bytes": int(v("caiosfs_cache_bytes")),
            "cache_limit_bytes": int(v("caiosfs_cache_limit_bytes")),
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "cache_hit_bytes": int(hits),
            "cache_miss_bytes": int(misses),
            "checksum_failures": int(v("caiosfs_cache_checksum_failures_total")),
            "dirty_bytes": int(v("caiosfs_dirty_bytes")),
            "dirty_files": int(v("caiosfs_dirty_files")),
            "oldest_dirty_seconds": round(v("caiosfs_oldest_dirty_seconds"), 1),
            "uploads_queued": int(v("caiosfs_uploads_queued")),
            "uploads_in_flight": int(v("caiosfs_uploads_in_flight")),
            "uploads_completed": int(v("caiosfs_uploads_completed_total")),
            "uploads_failed": int(v("caiosfs_uploads_failed_total")),
            "conflicts": int(v("caiosfs_conflicts_total")),
            "s3_requests": int(v("caiosfs_s3_requests_total")),
            "s3_get_requests": int(v("caiosfs_s3_requests_total", op="get")),
            "s3_head_requests": int(v("caiosfs_s3_requests_total", op="head")),
            "s3_not_found": int(self._requests(lambda st: st in NOT_FOUND)),
            "s3_errors": int(self._requests(lambda st: st not in ("ok", None)
                                            and st not in NOT_FOUND)),
            "fuse_errors": int(v("caiosfs_fuse_errors_total")),
            "bytes_in": int(v("caiosfs_s3_bytes_in_total")),
            "bytes_out": int(v("caiosfs_s3_bytes_out_total")),
            "skipped_keys": int(v("caiosfs_skipped_keys_total")),
            "warm_bytes": int(v("caiosfs_warm_bytes_total")),
            "dirahead_files": int(v("caiosfs_dirahead_files_total")),
        }
