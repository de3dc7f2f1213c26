"""When uploads start: the due heap, waiting for a pause in writing, back-off after a failure,
and back-pressure (writers wait while the dirty bytes are at the limit)."""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable

import trio

from ..metrics import Metrics
from .files import DirtyFile, FileTable

GAUGE_PERIOD = 0.1  # seconds between recomputations of the dirty totals
# Uploads that are due wait for a pause in writing: QUIET seconds without a create or write,
# but never more than MAX_DEFER seconds past their due time. On a small machine the uploads
# of a `cp -r` compete with the copy itself for the CPU (1,000 files on 2 cores: 2.7 s with
# uploads running alongside, 1.4 s without, and durable no later). fsync, flush and
# back-pressure do not wait.
QUIET = 0.05
MAX_DEFER = 5.0
BACKOFF = 30.0  # a failed upload waits this long, even for fsync/flush (no hot retry loop)
DIRS_KEPT = 1024  # directories whose last close is remembered before stale ones are pruned
# A large file of a directory written as a batch waits for the directory at most this long
# past its due time. Longer than MAX_DEFER: the Hugging Face Trainer writes the optimizer
# state (twice the model) after the model shards, and on a loaded 2-core machine the bench's
# 1.1 GiB checkpoint took over 5 s to write: shards that started uploading meanwhile were
# finished under the old name and copied (rename 14 s instead of 1.4 s).
BATCH_MAX_DEFER = 30.0
ALONE_GRACE = 0.1  # seconds a file alone at its close waits before its parts start


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


class DirBatches:
    """Directories whose files are written as a batch. A Hugging Face Trainer writes model
    shards, the optimizer state and small files into ``tmp-checkpoint-N/`` (one after the
    other, or several at once), then renames the directory: a large file of such a batch is
    not uploaded while the directory is being written (another file open for writing, or
    one closed less than ``upload_delay`` ago; at most BATCH_MAX_DEFER past its due time),
    and its parts do not start at its close (``Uploader.stream_rest``). A rename of the
    directory meanwhile moves it locally, so it is uploaded once, under its final name,
    instead of uploaded under the old name and then copied server-side (behind the WAN
    proxy, 9 x 128 MiB: ~2.9 s of UploadPartCopy after ~9 s of upload). A file that looks
    alone at its close (``dd`` of one file, a rank's own file) starts its parts
    ``ALONE_GRACE`` later, unless another file of its directory was created meanwhile (the
    next shard of a Trainer saving them one after the other)."""

    def __init__(self, upload_delay: float) -> None:
        self.upload_delay = upload_delay
        self._writers: Counter[str] = Counter()  # directory -> files open for writing
        self._closed: dict[str, float] = {}  # directory -> monotonic time of its last close

    def opened(self, path: str) -> None:
        self._writers[parent_of(path)] += 1

    def _drop_writer(self, d: str) -> None:
        self._writers[d] -= 1
        if self._writers[d] <= 0:
            del self._writers[d]

    def closed(self, path: str, since: float) -> bool:
        """The last writer of the file at ``path``, open for writing since ``since``
        (monotonic), closed it. True if the file belongs to a batch: another file of its
        directory is open for writing, or was closed while this one was open or less than
        ``upload_delay`` ago."""
        d = parent_of(path)
        now = time.monotonic()
        self._drop_writer(d)
        prev = self._closed.get(d, -1e9)
        batch = self._writers.get(d, 0) > 0 or prev >= min(since, now - self.upload_delay)
        self._closed[d] = now
        if len(self._closed) > DIRS_KEPT:
            stale = [k for k, t in self._closed.items() if now - t >= self.upload_delay]
            for k in stale:
                del self._closed[k]
        return batch

    def joined(self, path: str, since: float) -> bool:
        """Whether another file of ``path``'s directory is open for writing now, or was
        closed after ``since`` (monotonic): the file closed at ``since`` was not alone."""
        d = parent_of(path)
        return self._writers.get(d, 0) > 0 or self._closed.get(d, -1e9) > since

    def moved(self, src: str, dst: str, writers: int) -> None:
        """A file with ``writers`` open for writing was renamed from ``src`` to ``dst``."""
        for _ in range(writers):
            self._drop_writer(parent_of(src))
            self.opened(dst)

    def busy(self, path: str, now: float) -> bool:
        """Whether a file of ``path``'s directory is open for writing, or was closed less
        than ``upload_delay`` ago."""
        d = parent_of(path)
        return (self._writers.get(d, 0) > 0
                or now - self._closed.get(d, -1e9) < self.upload_delay)


class Scheduler:
    def __init__(self, files: FileTable, metrics: Metrics, *, part_size: int,
                 dirty_limit: int, upload_delay: float = 0.0) -> None:
        self.files = files
        self.batches = DirBatches(upload_delay)
        self.metrics = metrics
        self.part_size = part_size
        self.dirty_limit = dirty_limit
        # Gauges and the dirty total are sums over every local file: recomputed at most
        # every GAUGE_PERIOD (writes in between are added to the total as they happen).
        self._gauges_at = -1.0
        self._gauges_stale = False
        self._dirty_total = 0
        self._dirty_at = -1.0
        self._due: dict[int, float] = {}  # fid -> when to upload (0: now, even if open)
        # The same as a heap, earliest first, so a wake-up costs what is due, not what is
        # queued (a `cp -r` queues thousands). Entries _due no longer agrees with are stale.
        self._due_heap: list[tuple[float, int]] = []
        self._wake_at = 0.0  # when the scheduler wakes by itself (no kick needed before)
        # Ids that are not files (directory markers) waiting in _due for their turn: the
        # event is set when it comes (ids are never shared).
        self._turns: dict[int, trio.Event] = {}
        self._backoff: dict[int, float] = {}  # fid -> no urgent retry before (after a failure)
        self._kick = trio.Event()
        self._last_write = 0.0  # monotonic time of the last create or write
        # Set (and replaced) whenever an upload, a part or a marker finishes: what
        # back-pressure and flush_all wait on, as they wait for any file, not one.
        self._progress = trio.Event()

    # the dirty totals --------------------------------------------------------------------
    def wrote(self) -> None:
        """A create or a write happened (uploads wait for a pause, see QUIET)."""
        self._last_write = time.monotonic()

    def dirty_bytes(self) -> int:
        """Bytes not yet in the store (what back-pressure and statfs look at)."""
        t = time.monotonic()
        if t - self._dirty_at > GAUGE_PERIOD:
            self._dirty_total = sum(f.size for f in self.files.values()
                                    if not f.clean and not f.deleted)
            self._dirty_at = t
        return self._dirty_total

    def count_write(self, f: DirtyFile, end: int) -> None:
        """A write to f ending at ``end`` is about to be accounted in f's size."""
        if f.clean:
            self._dirty_at = -1.0  # its whole size becomes dirty: recount
        elif end > f.attrs.size:
            self._dirty_total += end - f.attrs.size

    def update_gauges(self, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self._gauges_at < GAUGE_PERIOD:
            self._gauges_stale = True  # the scheduler refreshes them shortly
            return
        self._gauges_at, self._gauges_stale = t, False
        dirty = [f for f in self.files.values() if not f.clean and not f.deleted]
        self._dirty_total, self._dirty_at = sum(f.size for f in dirty), t
        self.metrics.dirty_bytes.set(self._dirty_total)
        self.metrics.dirty_files.set(len(dirty))
        self.metrics.uploads_queued.set(len(self._due) - len(self._turns))
        oldest = min((f.dirty_since for f in dirty), default=None)
        self.metrics.oldest_dirty_seconds.set(time.time() - oldest if oldest else 0)

    # back-pressure -----------------------------------------------------------------------
    @staticmethod
    def growth(f: DirtyFile, end: int) -> int:
        """How much a write ending at ``end`` adds to the dirty bytes."""
        return max(f.size, end) if f.clean else max(0, end - f.size)

    def over_limit(self, f: DirtyFile, end: int) -> bool:
        return bool(self.dirty_limit) and (
            self.dirty_bytes() + self.growth(f, end) > self.dirty_limit)

    async def wait_for_room(self, f: DirtyFile, end: int) -> None:
        # Start uploads of files nobody is writing to, and wait until this write fits under
        # the limit (checking before it, not after: dirty bytes never pass the limit, but for
        # the two ways out below). The dirty total is recounted every GAUGE_PERIOD, not at
        # each upload's end: hence the timeout on the wait.
        with trio.move_on_after(600):
            while self.dirty_bytes() + self.growth(f, end) > self.dirty_limit:
                for other in self.files.values():
                    if not other.clean and not other.uploading and other.writers == 0:
                        self._set_due(other.fid, 0)
                if f.stream is None and f.size >= self.part_size and f.fid not in self._due:
                    self._set_due(f.fid, time.monotonic() + 3600)
                ev = self._progress
                self._kick.set()
                with trio.move_on_after(1):
                    await ev.wait()
                # A single file larger than the limit streams its parts: let it proceed.
                if all(o is f or o.clean for o in self.files.values()):
                    return

    @property
    def progress(self) -> trio.Event:
        """The event the next finished upload, part or marker sets (take it before
        starting what you wait for)."""
        return self._progress

    def signal_progress(self) -> None:
        ev, self._progress = self._progress, trio.Event()
        ev.set()

    # what is due -------------------------------------------------------------------------
    def schedule(self, f: DirtyFile, delay: float) -> None:
        # 0 means "now, even while a writer has it open" (fsync, flush, back-pressure).
        due = time.monotonic() + delay if delay > 0 else 0.0
        if due < self._due.get(f.fid, float("inf")):
            self._set_due(f.fid, due)
        self.update_gauges()

    def unschedule(self, fid: int) -> None:
        self._due.pop(fid, None)

    def urgent(self, f: DirtyFile) -> None:
        """Upload f now, unless a failure put it on hold (see BACKOFF)."""
        if self._backoff.get(f.fid, 0.0) <= time.monotonic():
            self._backoff.pop(f.fid, None)
            self.schedule(f, 0)

    def back_off(self, f: DirtyFile) -> None:
        self._backoff[f.fid] = time.monotonic() + BACKOFF
        self.schedule(f, BACKOFF)

    async def wait_turn(self, oid: int, delay: float, turn: trio.Event) -> None:
        """Wait ``delay`` seconds, then for a pause in writing, like an upload; ``turn`` set
        by someone else ends the wait early."""
        self._turns[oid] = turn
        self._set_due(oid, time.monotonic() + delay)
        await turn.wait()
        self._turns.pop(oid, None)
        self._due.pop(oid, None)

    def in_batch(self, f: DirtyFile, now: float) -> bool:
        """A large file whose directory is still being written (see DirBatches): its
        upload waits (fsync, flush and back-pressure, due 0, do not)."""
        return f.size >= self.part_size and self.batches.busy(f.path, now)

    def _set_due(self, fid: int, due: float) -> None:
        self._due[fid] = due
        heapq.heappush(self._due_heap, (due, fid))
        if due < self._wake_at:  # else the scheduler is awake by then anyway
            self._kick.set()

    def _due_top(self) -> tuple[float, int] | None:
        """The earliest live entry of the heap (stale ones dropped on the way)."""
        h = self._due_heap
        while h and self._due.get(h[0][1]) != h[0][0]:
            heapq.heappop(h)
        return h[0] if h else None

    async def run(self, start: Callable[[DirtyFile], None]) -> None:
        """Start the uploads that are due (``start(f)``), for ever."""
        while True:
            now = time.monotonic()
            busy = now - self._last_write < QUIET
            deferred = False
            blocked = []  # due, but not startable yet: looked at again next round
            while (top := self._due_top()) is not None and top[0] <= now:
                due, fid = top
                if busy and due and now < due + MAX_DEFER:
                    # The writer goes first (see QUIET); later entries are due later,
                    # so they wait too. (Urgent ones, due 0, came first.)
                    deferred = True
                    break
                heapq.heappop(self._due_heap)
                f = self.files.by_fid(fid)
                if f is None or f.deleted or f.clean:  # (clean: uploaded meanwhile)
                    del self._due[fid]
                    if (turn := self._turns.pop(fid, None)) is not None:
                        turn.set()  # not a file: a directory marker's turn
                elif (not f.uploading and not f.holding and (f.writers == 0 or due == 0)
                      and not (due and self.in_batch(f, now) and now < due + BATCH_MAX_DEFER)):
                    del self._due[fid]
                    start(f)
                else:
                    blocked.append(top)
            for item in blocked:
                heapq.heappush(self._due_heap, item)
            self.update_gauges()
            self._kick = trio.Event()
            top = self._due_top()
            wait = (top[0] if top else now + 5) - now
            if deferred:
                wait = self._last_write + QUIET - now
            if self._gauges_stale:
                wait = min(wait, GAUGE_PERIOD)
            wait = max(0.02, min(wait, 5))
            self._wake_at = now + wait
            with trio.move_on_after(wait):
                await self._kick.wait()
                # Kicks come in bursts (a `cp -r` closes a file every millisecond):
                # one scan per burst, not one per kick.
                await trio.sleep(0.005)
