"""The threads that move a ``caiosfs cp``'s data, and their retry loop.

A copy is thousands of independent blocking requests: there is nothing for an event loop
to do between them. So ``cp`` runs them on plain threads, each calling the store
(:class:`caiosfs.store.s3.S3Store`: botocore-signed requests over one urllib3 pool for
GET/PUT/HEAD, the boto3 client for listings and multipart calls) and writing or reading
its files itself. Measured on the 2-core development VM (py-spy, 1,000 files of ~17 KB):
with a trio loop handing every object to a worker thread and back, the loop's scheduling,
``StoreClient``'s limiter and metrics took about as much CPU as the requests themselves.

Two kinds of work, two queues (:class:`Pool`):

- ``large``: one ranged GET of a large object, or one part of a multipart upload;
- ``small``: a whole small object (one GET or one PUT).

Some threads take large work first, the others small work first; a thread whose queue is
empty takes from the other one (unless told not to: uploads keep their 64 MiB parts at
``max(4, parallel / 2)`` in flight, see :func:`caiosfs.listing.store_for`). The long
transfers overlap with the many small ones, and neither kind waits for the other.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .listing import Item

from .errors import StoreError

T = TypeVar("T")

# As StoreClient's policy (exponential backoff, full jitter).
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0


class GaveUp(StoreError):
    """A request that kept failing until its deadline (the object fails, listed)."""

    def __init__(self, op: str, attempts: int, elapsed: float, last: StoreError) -> None:
        super().__init__(last.code, f"{op} gave up after {attempts} attempt(s) in "
                         f"{elapsed:.1f}s ({last})", last.status, retryable=False)


def retrying(op: str, deadline: float, fn: Callable[..., T], *args: Any,
             on_retry: Callable[[StoreError], None] | None = None) -> T:
    """``fn(*args)`` retried while it raises a retryable StoreError, for at most
    ``deadline`` seconds in all (each attempt is bounded by the store's socket timeout).
    Errors of anything else (a full disk: the sink's OSError) pass through at once.
    ``on_retry`` is told of each error that is retried."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn(*args)
        except StoreError as exc:
            if not exc.retryable:
                raise
            attempt += 1
            elapsed = time.monotonic() - start
            if deadline - elapsed < 0.05:
                raise GaveUp(op, attempt, elapsed, exc) from exc
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
            if elapsed + delay > deadline:
                delay = (deadline - elapsed) / 2  # one or two more tries in what is left
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay)


class Pool:
    """Threads draining two queues of callables; see the module docstring. Either
    :meth:`run` with every task at once, or :meth:`start`, :meth:`add` as tasks become known
    (a listing's pages), then :meth:`close` and :meth:`join`."""

    def __init__(self, n_large: int, n_small: int, small_takes_large: bool = True) -> None:
        self.n_large, self.n_small = max(1, n_large), max(1, n_small)
        self.small_takes_large = small_takes_large
        self.large: deque[Callable[[], None]] = deque()
        self.small: deque[Callable[[], None]] = deque()
        self.errors: list[BaseException] = []  # what a task let escape (a bug): re-raised
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []

    def run(self, large: Iterable[Callable[[], None]],
            small: Iterable[Callable[[], None]]) -> None:
        """Run every task to the end. A task reports its own failures; an exception that
        escapes one stops nothing but is raised here afterwards."""
        self.large.extend(large)
        self.small.extend(small)
        self.start(skip_idle=True)
        self.close()
        self.join()

    def start(self, skip_idle: bool = False) -> None:
        """Start the threads (``skip_idle``: not those with nothing they could take)."""
        for first, second in ([(self.large, self.small)] * self.n_large
                              + [(self.small, self.large if self.small_takes_large
                                  else None)] * self.n_small):
            if skip_idle and not first and not second:
                continue
            t = threading.Thread(target=self._work, args=(first, second), daemon=True,
                                 name="cp-large" if first is self.large else "cp-small")
            t.start()
            self._threads.append(t)

    def add(self, large: Iterable[Callable[[], None]],
            small: Iterable[Callable[[], None]]) -> None:
        with self._cond:
            self.large.extend(large)
            self.small.extend(small)
            self._cond.notify_all()

    def close(self) -> None:
        """No more tasks: each thread ends once the queues it takes from are empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def join(self) -> None:
        for t in self._threads:
            while t.is_alive():
                t.join(0.5)  # (a timeout keeps the main thread responsive to Ctrl-C)
        if self.errors:
            raise self.errors[0]

    def _take(self, first: deque[Callable[[], None]],
              second: deque[Callable[[], None]] | None) -> Callable[[], None] | None:
        """The next task, waiting while there is none yet; None once closed and empty."""
        while True:
            try:
                return first.popleft()
            except IndexError:
                pass
            if second is not None:
                try:
                    return second.popleft()
                except IndexError:
                    pass
            with self._cond:  # (add() extends under this lock: no wake-up is lost)
                if first or (second is not None and second):
                    continue
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self, first: deque[Callable[[], None]],
              second: deque[Callable[[], None]] | None) -> None:
        while True:
            task = self._take(first, second)
            if task is None:
                return
            try:
                task()
            except BaseException as exc:  # noqa: BLE001 (kept, raised by join())
                self.errors.append(exc)


MAX_PARTS = 10_000  # an object is at most this many ranged GETs or multipart parts


class Job:
    """One large object in flight: a download's temp file or an upload's multipart id, the
    pieces still to come, and the first error (the others are not reported)."""

    def __init__(self, it: Item, pieces: int) -> None:
        self.it = it
        self.lock = threading.Lock()
        self.left = pieces
        self.fd = -1  # download: the temp file, opened by the first piece to run
        self.upload_id = ""  # upload: created by the first part to run
        self.error: BaseException | None = None
        self.meta: dict[str, str] | None = None  # download: the first GET's x-amz-meta-*
        self.hashes: list[Any] = []  # --verify: (start, length, xxh3) per range
        self.etags: dict[int, str] = {}  # upload: part index -> ETag

    def piece_done(self, exc: BaseException | None) -> bool:
        """Count one piece finished (or failed); True for the caller that must finish or
        clean up the whole object (the last one)."""
        with self.lock:
            if exc is not None and self.error is None:
                self.error = exc
            self.left -= 1
            return self.left == 0
