"""Write-back: dirty files on local disk, journaled in LMDB, uploaded in the background.

A file with local changes is a :class:`DirtyFile`: its whole content lives in
``<cache_dir>/dirty/<id>`` and a journal entry in LMDB names the object it belongs to.
``write()`` is a ``pwrite`` to that file, so once it returns the data survives a killed
daemon (the kernel owns the page cache); ``fsync=local`` adds an ``fsync``.

Uploads start ``upload_delay`` seconds after the last writer closes. Large files are sent
as multipart uploads whose full parts are sent *while* the file is still being written
sequentially; a later write to a part already sent marks it for re-upload. Writes are
conditional (If-Match the version we started from, If-None-Match for new files): if someone
else changed the object meanwhile, our data goes to a ``.conflict-`` sibling and both
versions survive. Uploads retry forever; dirty data is never dropped.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from .attrs import Attrs
from .errors import FsError, PreconditionFailed, StoreError
from .index import Index
from .metrics import Metrics
from .records import JournalEntry, MkdirOp
from .store import Body, PartSource
from .store.client import StoreClient

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
MIN_PART = 5 << 20
CHUNK = 1 << 20  # granularity of the 'changed since the store version' map
GAUGE_PERIOD = 0.1  # seconds between recomputations of the dirty totals
# Uploads that are due wait for a pause in writing: QUIET seconds without a create or write,
# but never more than MAX_DEFER seconds past their due time. On a small machine the uploads
# of a `cp -r` compete with the copy itself for the CPU (1,000 files on 2 cores: 2.7 s with
# uploads running alongside, 1.4 s without, and durable no later). fsync, flush and
# back-pressure do not wait.
QUIET = 0.05
FLUSH_ROUND = 0.05  # flush_all looks at the dirty files at most this often
JOURNAL_SYNC_PERIOD = 0.02  # journal commits reach the disk (fdatasync) within about this
MAX_DEFER = 5.0
SPARES = 32  # empty data files kept open, ready for new files (see WriteBack.make_spares)
# Emptied data files kept (closed) for reuse, across remounts too: a new file then costs a
# rename instead of a new inode. Creating an inode costs ~0.85 ms of kernel CPU on an ext4
# without a journal that has seen many deletes (its allocator checks each free inode for a
# recent delete) and tens of microseconds elsewhere; an unlink after every upload is what
# fills a disk with recent deletes. An empty file costs an inode and no data.
IDLE_MAX = 4096
# A new or truncated file keeps its content in the journal itself (the ``inline`` LMDB
# database) while it is at most INLINE_MAX bytes: no inode of its own, so a `cp -r` of small
# files costs one commit per write instead of a new file each (see IDLE_MAX: an inode can
# cost a millisecond of kernel CPU; a commit of a few KiB costs tens of microseconds). A
# file that grows past it moves to a data file. Every write rewrites the whole value, so the
# limit stays small; the kernel's writeback cache hands small files over in one or two writes.
INLINE_MAX = 256 << 10


T = TypeVar("T")


def _lowest_priority() -> None:
    try:  # this thread only (Linux: a thread id is a PRIO_PROCESS target)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass


class IdleWorker:
    """One thread at the lowest CPU priority (nice 19), for work no caller waits for.

    Making spare files ahead costs a core's worth of kernel time during a `cp -r` on some
    disks (see IDLE_MAX); at normal priority that thread took the CPU from the copy and
    from the FUSE loop serving it (1,000 files: 1.57-1.68 s; niced: 1.39-1.50 s). If it
    starves, create() makes its own file.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name,
                                        initializer=_lowest_priority)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        fut = self._pool.submit(fn, *args)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):  # fn is short; never leave its result behind
            await done.wait()
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def part_size_for(size: int, base: int) -> int:
    """Part size for a file of ``size`` bytes: ``base``, doubled until it fits 10,000 parts."""
    ps = max(base, MIN_PART)
    while size > ps * MAX_PARTS:
        ps *= 2
    return ps


class _Changed(Exception):
    """The file changed too often during its upload; it is uploaded again."""


# Parts of a file being written that stay local before its parts start streaming (up to a
# quarter of dirty_limit). Sending parts while a fast writer is still writing takes CPU from
# it and gains little: the store is slower than the writer, so the backlog is uploaded after
# close either way (1 GiB written in 1 MiB writes on 2 cores: close 1.25 s instead of 1.6 s,
# durable the same 7.0 s). A longer file streams its older parts, so what is left to upload
# at close stays bounded.
STREAM_BACKLOG_PARTS = 16


@dataclass
class Marker:
    """A directory made here whose marker object (``dir/``) is not in the store yet."""

    oid: int  # its ``ops`` entry: a crash before the PUT is finished by the next mount
    key: str
    meta: dict[str, str]
    mtime: float
    urgent: bool = False
    started: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    hurry: trio.Event = field(default_factory=trio.Event)  # set with urgent

    def now(self) -> None:
        self.urgent = True
        self.hurry.set()


@dataclass
class _Stream:
    """A multipart upload in progress; parts may be sent before the file is closed."""

    upload_id: str
    part_size: int
    etags: dict[int, tuple[str, int]] = field(default_factory=dict)  # part no -> (etag, len)
    sending: set[int] = field(default_factory=set)
    part_gen: dict[int, int] = field(default_factory=dict)  # bumps on each write to a part


@dataclass
class DirtyFile:
    fid: int
    path: str  # relative to the mount root
    key: str  # full object key
    base_etag: str | None  # the store version our content started from (None: new)
    attrs: Attrs
    data_path: Path
    fd: int  # its data file, or -1 (inline, or closed)
    gen: int = 1  # bumps on every change; an upload makes `uploaded_gen` catch up
    uploaded_gen: int = 0
    writers: int = 0
    handles: int = 0
    uploading: bool = False
    holding: int = 0  # > 0: a truncate waits for uploads to stop reading the data file
    # 1 MiB chunks changed since the local copy last equalled the store object at key/
    # base_etag of base_size bytes; None: unknown (new file, renamed, replayed). Parts
    # untouched by it are copied server-side (UploadPartCopy) instead of sent again.
    touched: set[int] | None = None
    base_size: int = 0
    deleted: bool = False
    stream: _Stream | None = None
    stream_off: bool = False
    last_write_end: int = 0
    inline: bool = False  # the content is the journal's ``inline`` value, not data_path
    dirty_since: float = field(default_factory=time.time)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def clean(self) -> bool:
        return self.uploaded_gen >= self.gen

    @property
    def size(self) -> int:
        return self.attrs.size


class FileTable(MutableMapping[str, "DirtyFile"]):
    """The local files by path, with the indexes that keep every lookup cheap when
    thousands of files are dirty at once (a `cp -r`, a `git checkout`): by id, by parent
    directory, and how many files each directory holds anywhere below it."""

    def __init__(self) -> None:
        self._by_path: dict[str, DirtyFile] = {}
        self._by_fid: dict[int, DirtyFile] = {}
        self._kids: dict[str, dict[str, DirtyFile]] = {}
        self._below: Counter[str] = Counter()

    @staticmethod
    def _ancestors(path: str) -> Iterator[str]:
        i = path.find("/")
        while i >= 0:
            yield path[:i]
            i = path.find("/", i + 1)

    def __getitem__(self, path: str) -> DirtyFile:
        return self._by_path[path]

    def __setitem__(self, path: str, f: DirtyFile) -> None:
        if path in self._by_path:
            del self[path]
        self._by_path[path] = f
        self._by_fid[f.fid] = f
        parent, _, name = path.rpartition("/")
        self._kids.setdefault(parent, {})[name] = f
        self._below.update(self._ancestors(path))

    def __delitem__(self, path: str) -> None:
        f = self._by_path.pop(path)
        if self._by_fid.get(f.fid) is f:
            del self._by_fid[f.fid]
        parent, _, name = path.rpartition("/")
        kids = self._kids[parent]
        del kids[name]
        if not kids:
            del self._kids[parent]
        for d in self._ancestors(path):
            self._below[d] -= 1
            if not self._below[d]:
                del self._below[d]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)

    def by_fid(self, fid: int) -> DirtyFile | None:
        return self._by_fid.get(fid)

    def children(self, dir_path: str) -> dict[str, DirtyFile]:
        return {n: f for n, f in self._kids.get(dir_path, {}).items() if not f.deleted}

    def under(self, dir_path: str) -> list[DirtyFile]:
        if not self._below.get(dir_path):
            return []
        pre = dir_path + "/"
        return [f for p, f in self._by_path.items() if p.startswith(pre) and not f.deleted]


class WriteBack:
    def __init__(self, store: StoreClient, index: Index, metrics: Metrics, cache_dir: Path,
                 prefix: str, *, part_size: int, dirty_limit: int, upload_delay: float,
                 fsync_local: bool, on_uploaded: Callable[[DirtyFile, str], None]) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics
        self.dir = cache_dir / "dirty"
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.prefix = prefix
        self.part_size = part_size
        self.dirty_limit = dirty_limit
        self.upload_delay = upload_delay
        self.fsync_local = fsync_local
        self.on_uploaded = on_uploaded
        self.files = FileTable()
        self.inline_max = INLINE_MAX
        self._inline_off_until = 0.0  # the journal was full: new files get data files a while
        self._spares: deque[tuple[int, int]] = deque()  # (id, fd) of empty data files
        self._idle: deque[int] = deque()  # ids of empty, closed data files (see IDLE_MAX)
        self._spare_maker = IdleWorker("caiosfs-spares")
        self._spares_low = trio.Event()
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
        self._marker_due: dict[int, Marker] = {}  # ops id -> marker waiting in _due for its turn
        self._backoff: dict[int, float] = {}  # fid -> no urgent retry before (after a failure)
        self._kick = trio.Event()
        self._journal_unsynced = trio.Event()
        self._last_write = 0.0  # monotonic time of the last create or write
        self.markers: dict[str, Marker] = {}  # dir path -> marker not in the store yet
        # Set (and replaced) whenever an upload or part finishes. Waiters take the current
        # event *before* starting what they wait for and never replace it themselves, so no
        # wake-up is lost (a lost one cost a full 1 s timeout per flush round).
        self._progress = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.file_limiter = trio.CapacityLimiter(8)

    # bookkeeping -------------------------------------------------------------------------
    def key_of(self, path: str) -> str:
        return self.prefix + path

    def dirty_bytes(self) -> int:
        """Bytes not yet in the store (what back-pressure and statfs look at)."""
        t = time.monotonic()
        if t - self._dirty_at > GAUGE_PERIOD:
            self._dirty_total = sum(f.size for f in self.files.values()
                                    if not f.clean and not f.deleted)
            self._dirty_at = t
        return self._dirty_total

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
        self.metrics.uploads_queued.set(len(self._due) - len(self._marker_due))
        oldest = min((f.dirty_since for f in dirty), default=None)
        self.metrics.oldest_dirty_seconds.set(time.time() - oldest if oldest else 0)

    def journal(self, f: DirtyFile) -> None:
        # Committed now (a killed daemon loses nothing); flushed to disk by _sync_journal
        # moments later, one fdatasync per burst (a `cp -r` creates a file a millisecond).
        self._journal_unsynced.set()
        self.index.put_journal(f.fid, self._journal_value(f), sync=False)

    @staticmethod
    def _journal_value(f: DirtyFile) -> JournalEntry:
        return JournalEntry(
            path=f.path, key=f.key, base_etag=f.base_etag, mode=f.attrs.mode,
            uid=f.attrs.uid, gid=f.attrs.gid, mtime=f.attrs.mtime,
            mtime_ns=f.attrs.mtime_ns, ctime_ns=f.attrs.ctime_ns,
            upload_id=f.stream.upload_id if f.stream else None, deleted=f.deleted,
            inline=f.inline)

    def children(self, dir_path: str) -> dict[str, DirtyFile]:
        """Local files directly inside ``dir_path`` ('' is the root)."""
        return self.files.children(dir_path)

    def under(self, dir_path: str) -> list[DirtyFile]:
        return self.files.under(dir_path)

    # creating and opening ----------------------------------------------------------------
    def _new(self, path: str, base_etag: str | None, attrs: Attrs,
             inline: bool = False) -> DirtyFile:
        """A new, empty local file at ``path``: inline (see INLINE_MAX) if asked and possible,
        else with a data file (a spare one if there is one)."""
        if inline and self.inline_max and time.monotonic() >= self._inline_off_until:
            fid = self.index.next_id()
            f = DirtyFile(fid, path, self.key_of(path), base_etag, attrs, self.dir / str(fid),
                          -1, inline=True)
            self.files[path] = f
            return f
        if self._spares:
            fid, fd = self._spares.popleft()
            data_path = self.dir / str(fid)
        else:
            fid = self._idle.popleft() if self._idle else self.index.next_id()
            data_path = self.dir / str(fid)
            try:
                fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO,
                              f"cannot create cache file: {exc.strerror}") from None
        if len(self._spares) < SPARES // 2:
            self._spares_low.set()
        f = DirtyFile(fid, path, self.key_of(path), base_etag, attrs, data_path, fd)
        self.files[path] = f
        return f

    async def make_spares(self) -> None:
        """Keep a few empty data files ready: creating a file costs ~1 ms on some disks,
        which a `cp -r` of small files would otherwise pay inside every create(). Kept
        files (IDLE_MAX) go first; the files are made by a low-priority thread."""
        failures = 0

        def make(ids: list[tuple[int, bool]]) -> list[tuple[int, int]]:
            out = []
            for fid, idle in ids:
                # A kept file is reused (O_TRUNC: empty for sure); a new id is a new file.
                flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if idle else os.O_EXCL)
                try:
                    fd = os.open(self.dir / str(fid), flags, 0o600)
                except OSError as exc:
                    # create() makes its own file (and reports the error) meanwhile.
                    (log.debug if failures else log.warning)(
                        "could not prepare cache files: %s", exc.strerror)
                    break
                out.append((fid, fd))
            return out
        while True:
            want = SPARES - len(self._spares)
            if want > 0:
                ids = []
                while self._idle and len(ids) < want:
                    ids.append((self._idle.popleft(), True))
                try:
                    ids += [(self.index.next_id(), False) for _ in range(want - len(ids))]
                except OSError:
                    pass
                made = await self._spare_maker.run(make, ids)
                self._spares.extend(made)
                while len(self._spares) > SPARES:  # recycled ones came in meanwhile
                    fid, fd = self._spares.pop()
                    os.close(fd)
                    self._keep_idle(fid)
                if len(made) < want:  # the disk is full, read-only or failing
                    failures += 1
                    await trio.sleep(min(600, 10 * failures))
                    continue
                failures = 0
            await self._spares_low.wait()
            self._spares_low = trio.Event()

    def close_spares(self) -> None:
        """At unmount: the empty files stay on disk for the next mount (see IDLE_MAX)."""
        self._spare_maker.close()
        while self._spares:
            fid, fd = self._spares.popleft()
            os.close(fd)
            self._keep_idle(fid)

    def _keep_idle(self, fid: int) -> None:
        """Keep the empty data file ``fid`` for reuse, or delete it past IDLE_MAX."""
        if len(self._idle) < IDLE_MAX:
            self._idle.append(fid)
        else:
            (self.dir / str(fid)).unlink(missing_ok=True)

    async def create(self, path: str, attrs: Attrs, base_etag: str | None = None) -> DirtyFile:
        old = self.files.get(path)
        if old is not None:
            await self._retire(old)
            base_etag = old.base_etag  # what the store holds now (its upload may have landed)
        f = self._new(path, base_etag, attrs, inline=True)
        self.journal(f)
        self.update_gauges()
        self._last_write = time.monotonic()
        return f

    async def open_existing(self, path: str, base_etag: str, attrs: Attrs,
                            fill: Callable[[int], Awaitable[None]] | None) -> DirtyFile:
        """A dirty copy of a store object. ``fill(fd)`` (run in a thread) writes the current
        content into the new local file; None means the caller truncates it anyway."""
        filled = fill is not None and attrs.size > 0
        f = self._new(path, base_etag, attrs, inline=not filled)
        try:
            if filled:
                await fill(f.fd)
            else:
                self._truncate_local(f, 0)
                f.attrs.size = 0
        except BaseException:
            self._close(f)
            del self.files[path]
            raise
        f.uploaded_gen = f.gen if fill is not None else 0
        if fill is not None:
            f.touched, f.base_size = set(), f.attrs.size
        self.journal(f)
        self.update_gauges()
        return f

    # writing -----------------------------------------------------------------------------
    async def write(self, f: DirtyFile, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if self.dirty_limit and self.dirty_bytes() + self._growth(f, end) > self.dirty_limit:
            await self._wait_for_room(f, end)
        n = self._pwrite(f, data, offset)
        end = offset + n
        if f.clean:
            self._dirty_at = -1.0  # its whole size becomes dirty: recount
        elif end > f.attrs.size:
            self._dirty_total += end - f.attrs.size
        self._touch(f, offset, end)
        f.attrs.size = max(f.attrs.size, end)
        self._maybe_stream(f, offset, end)
        f.last_write_end = end
        self._last_write = time.monotonic()
        return n

    @staticmethod
    def _growth(f: DirtyFile, end: int) -> int:
        """How much a write ending at ``end`` adds to the dirty bytes."""
        return max(f.size, end) if f.clean else max(0, end - f.size)

    async def _wait_for_room(self, f: DirtyFile, end: int) -> None:
        # Back-pressure: start uploads of files nobody is writing to, and wait until this
        # write fits under the limit (checking before it, not after: dirty bytes never pass
        # the limit, but for the two ways out below).
        with trio.move_on_after(600):
            while self.dirty_bytes() + self._growth(f, end) > self.dirty_limit:
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

    def _touch(self, f: DirtyFile, start: int, end: int) -> None:
        if f.clean:
            f.dirty_since = time.time()
        f.gen += 1
        f.attrs.mtime = time.time()
        if f.touched is not None:
            f.touched.update(range(start // CHUNK, (max(end, start + 1) - 1) // CHUNK + 1))
        if f.stream is not None:
            ps = f.stream.part_size
            for p in range(start // ps + 1, (max(end, start + 1) - 1) // ps + 2):
                f.stream.part_gen[p] = f.stream.part_gen.get(p, 0) + 1
                f.stream.etags.pop(p, None)

    async def truncate(self, f: DirtyFile, size: int) -> None:
        if size < self._local_size(f):
            # An upload reading the part we cut off would fail (and the store client retries
            # dirty-data uploads forever): let running uploads finish first, start no new one.
            f.holding += 1
            try:
                while f.uploading or (f.stream is not None and f.stream.sending):
                    ev = self._progress
                    with trio.move_on_after(0.5):
                        await ev.wait()
            finally:
                f.holding -= 1
            if f.deleted and f.handles == 0:  # its last handle closed meanwhile: fd gone
                raise FsError(errno.ENOENT, "unlinked during truncate")
        self._truncate_local(f, size)
        self._touch(f, min(size, f.attrs.size), max(size, f.attrs.size) + 1)
        f.attrs.size = size

    # the local content: a data file, or the journal's inline value ---------------------------
    def read(self, f: DirtyFile, size: int, offset: int) -> bytes:
        if f.inline:
            return self.index.get_inline(f.fid)[offset:offset + size]
        return os.pread(f.fd, size, offset)

    @staticmethod
    @contextlib.contextmanager
    def _source(f: DirtyFile) -> Iterator[str]:
        """A path the store layer reads f's data file by, valid for the whole with block:
        one of /proc/self/fd pointing at a duplicate of f's descriptor. So an upload never
        depends on the data file's name (recycled files are renamed; a cache directory
        deleted under a live mount still drains from its open files), and the number cannot
        come to mean another file while the upload's threads read it."""
        fd = os.dup(f.fd)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def _local_size(self, f: DirtyFile) -> int:
        return len(self.index.get_inline(f.fid)) if f.inline else os.fstat(f.fd).st_size

    def _put_inline(self, f: DirtyFile, data: bytes) -> bool:
        """Commit ``data`` as f's content; False if the journal is full (f needs a file)."""
        try:
            self.index.put_inline(f.fid, data)
        except OSError as exc:
            log.warning("small files go to data files for a minute: %s", exc.strerror)
            self._inline_off_until = time.monotonic() + 60
            return False
        self._journal_unsynced.set()
        return True

    def _pwrite(self, f: DirtyFile, data: bytes, offset: int) -> int:
        if f.inline:
            cur = self.index.get_inline(f.fid)
            end = offset + len(data)
            if end <= self.inline_max:
                gap = bytes(max(0, offset - len(cur)))
                if self._put_inline(f, cur[:offset] + gap + data + cur[end:]):
                    return len(data)
            self._to_file(f, cur)
        try:
            return os.pwrite(f.fd, data, offset)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cache disk: {exc.strerror}") from None

    def _truncate_local(self, f: DirtyFile, size: int) -> None:
        if f.inline:
            cur = self.index.get_inline(f.fid)
            if size == len(cur):
                return
            if size <= self.inline_max and self._put_inline(
                    f, cur[:size] + bytes(max(0, size - len(cur)))):
                return
            self._to_file(f, cur)
        try:
            os.ftruncate(f.fd, size)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cache disk: {exc.strerror}") from None

    def _to_file(self, f: DirtyFile, content: bytes) -> None:
        """Move an inline file to a data file of its own (it outgrew INLINE_MAX, or the
        journal is full). The data file is complete before one commit switches the journal
        entry to it and drops the inline value; a crash before that commit leaves the inline
        value in charge (replay removes the half-made file)."""
        path = self.dir / str(f.fid)
        try:
            if self._spares:
                sfid, fd = self._spares.popleft()
                try:
                    os.rename(self.dir / str(sfid), path)
                except OSError:
                    os.close(fd)
                    raise
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if content:
                    os.pwrite(fd, content, 0)
                f.fd, f.inline = fd, False
                self.index.end_inline(f.fid, self._journal_value(f))
            except OSError:
                f.fd, f.inline = -1, True
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cache disk: {exc.strerror}") from None
        self._journal_unsynced.set()
        if len(self._spares) < SPARES // 2:
            self._spares_low.set()

    def _maybe_stream(self, f: DirtyFile, start: int, end: int) -> None:
        """Send full parts of a file being written sequentially, while it is written."""
        if f.stream_off or self.nursery is None or f.holding or f.deleted:
            return  # (a deleted file is never uploaded: nothing to stream)
        if start != f.last_write_end and f.stream is None:
            return  # not sequential: upload at close
        ps = part_size_for(end, self.part_size)
        if f.stream is None:
            if end < 2 * ps:
                return
            f.stream = _Stream("", ps)
            self.nursery.start_soon(self._start_stream, f)
            return
        if f.stream.upload_id == "" or ps != f.stream.part_size:
            return
        full = end // ps  # parts 1..full are complete if the writer moved past them
        backlog = STREAM_BACKLOG_PARTS * ps
        if self.dirty_limit:
            backlog = min(backlog, self.dirty_limit // 4)
        for p in range(1, full + 1):
            if end - p * ps < backlog:
                break  # the newest parts wait (sent at close, in parallel)
            if p not in f.stream.etags and p not in f.stream.sending and (p * ps) <= start:
                f.stream.sending.add(p)
                self.nursery.start_soon(self._send_part, f, f.stream, p, ps)

    async def _start_stream(self, f: DirtyFile) -> None:
        st = f.stream
        assert st is not None
        key = f.key  # a rename meanwhile re-keys f: the upload belongs to this key
        try:
            st.upload_id = await self.store.create_multipart(key, f.attrs.to_meta())
        except StoreError as exc:
            log.warning("could not start a streaming upload of %s: %s", f.path, exc)
            if f.stream is st:
                f.stream, f.stream_off = None, True
            return
        if f.stream is not st or f.key != key or f.deleted:  # renamed or retired meanwhile
            if f.stream is st:
                f.stream = None
            await self._abort(key, st.upload_id)
            return
        self.journal(f)
        self._maybe_stream(f, f.last_write_end, f.last_write_end)

    async def _send_part(self, f: DirtyFile, st: _Stream, p: int, length: int) -> None:
        gen = st.part_gen.get(p, 0)
        try:
            etag = await self._upload_part(f, st, p, length)
        except (StoreError, OSError) as exc:  # OSError: the file shrank meanwhile
            log.warning("part %d of %s failed: %s (it will be sent at close)", p, f.path, exc)
            return
        finally:
            st.sending.discard(p)
        if st.part_gen.get(p, 0) == gen and f.stream is st:
            st.etags[p] = (etag, length)
        self._signal_progress()

    # closing and syncing -----------------------------------------------------------------
    def opened(self, f: DirtyFile, writable: bool) -> None:
        f.handles += 1
        if writable:
            f.writers += 1
            self._due.pop(f.fid, None)

    def released(self, f: DirtyFile, writable: bool) -> None:
        f.handles -= 1
        if writable:
            f.writers -= 1
        if f.deleted and f.handles == 0:
            if not f.uploading:  # (else _retire, waiting for that upload, forgets it)
                self._forget(f)
            return
        if f.writers == 0 and not f.clean:
            self.schedule(f, self.upload_delay)
        elif f.clean and f.handles == 0:
            self._release_clean(f)

    def _back_off(self, f: DirtyFile) -> None:
        """A failed upload waits 30 s, even for fsync/flush (no hot retry loop)."""
        self._backoff[f.fid] = time.monotonic() + 30
        self.schedule(f, 30)

    def _urgent(self, f: DirtyFile) -> None:
        if self._backoff.get(f.fid, 0.0) <= time.monotonic():
            self._backoff.pop(f.fid, None)
            self.schedule(f, 0)

    def schedule(self, f: DirtyFile, delay: float) -> None:
        # 0 means "now, even while a writer has it open" (fsync, flush, back-pressure).
        due = time.monotonic() + delay if delay > 0 else 0.0
        if due < self._due.get(f.fid, float("inf")):
            self._set_due(f.fid, due)
        self.update_gauges()

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

    async def fsync(self, f: DirtyFile) -> None:
        if self.fsync_local:
            if not f.inline:
                await trio.to_thread.run_sync(os.fsync, f.fd)
            # and its journal entry (and an inline file's content)
            await trio.to_thread.run_sync(self.index.sync_journal)
            return
        await self.wait_durable(f)

    async def wait_durable(self, f: DirtyFile) -> None:
        want = f.gen
        while f.uploaded_gen < want and not f.deleted and self.files.get(f.path) is f:
            ev = f.changed
            self._urgent(f)
            await ev.wait()

    async def flush_all(self, progress: Callable[[dict], Awaitable[None]] | None = None
                        ) -> None:
        """Upload everything dirty now and wait until it is durable."""
        while True:
            pending = [f for f in self.files.values() if not f.clean and not f.deleted]
            if not pending and not self.markers:
                self.update_gauges(force=True)
                return
            ev = self._progress
            for f in pending:
                self._urgent(f)
            for m in self.markers.values():
                m.now()
            if progress:
                await progress({"files": len(pending), "bytes": sum(f.size for f in pending)})
            with trio.move_on_after(1):
                await ev.wait()
            # Small files finish uploading hundreds a second, and every round above looks at
            # every dirty file: one round per burst, not one per upload (1,000 files: a
            # third of the loop's CPU went here).
            await trio.sleep(FLUSH_ROUND)

    # uploading ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The upload scheduler; lives in the filesystem's nursery."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._sync_journal)
            task_status.started()
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
                    f = self._by_fid(fid)
                    if f is None or f.deleted or f.clean:  # (clean: uploaded meanwhile)
                        del self._due[fid]
                        if (m := self._marker_due.pop(fid, None)) is not None:
                            m.hurry.set()  # a directory marker's turn (ids are never shared)
                    elif not f.uploading and not f.holding and (f.writers == 0 or due == 0):
                        del self._due[fid]
                        f.uploading = True
                        nursery.start_soon(self._upload, f)
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

    async def _sync_journal(self) -> None:
        while True:
            await self._journal_unsynced.wait()
            self._journal_unsynced = trio.Event()
            try:
                await trio.to_thread.run_sync(self.index.sync_journal)
            except OSError as exc:
                log.error("could not flush the journal to disk: %s", exc.strerror)
                await trio.sleep(1)
            # At most one flush per JOURNAL_SYNC_PERIOD: a `cp -r` commits twice per file,
            # and a flush per commit was 5% of the loop's CPU (fsync=local flushes itself).
            await trio.sleep(JOURNAL_SYNC_PERIOD)

    # directories ---------------------------------------------------------------------------
    def mkdir(self, path: str, key: str, meta: dict[str, str], mtime: float,
              oid: int | None = None) -> None:
        """A new directory: its marker object is PUT in the background (like an upload,
        after a pause in writing); an ``ops`` entry covers it until then. ``oid``: resume
        one a crash left."""
        resumed = oid is not None
        if oid is None:
            oid = self.index.next_id()
            self.index.put_op(oid, MkdirOp(key, meta, mtime),
                              sync=False)
            self._journal_unsynced.set()
        m = self.markers[path] = Marker(oid, key, meta, mtime)
        assert self.nursery is not None
        self.nursery.start_soon(self._put_marker, path, m,
                                0.0 if resumed else self.upload_delay)

    async def _put_marker(self, path: str, m: Marker, delay: float) -> None:
        # Like an upload: upload_delay first, then a pause in writing (at most MAX_DEFER).
        # The scheduler keeps the time (one wake-up per pause, not one per marker) and sets
        # m.hurry when its turn comes; m.now() and rmdir set it earlier.
        if delay > 0 and not m.urgent:
            self._marker_due[m.oid] = m
            self._set_due(m.oid, time.monotonic() + delay)
            await m.hurry.wait()
            self._marker_due.pop(m.oid, None)
            self._due.pop(m.oid, None)
        # Parents first, as a filesystem would: SeaweedFS can drop the marker of a directory
        # PUT at the same time as one below it (16 threads, 40 such pairs: one lost), and
        # `mkdir -p` makes markers that all become due together.
        parent = path.rpartition("/")[0]
        while (pm := self.markers.get(parent)) is not None and pm is not m:
            if m.urgent:
                pm.now()
            await pm.done.wait()
        if self.markers.get(path) is not m:
            return  # removed before it was sent (rmdir)
        m.started = True
        try:
            await self.store.put_file(m.key, None, 0, m.meta)  # retried until it lands
            self.index.del_op(m.oid)
        except StoreError as exc:  # not retryable (denied...): the next mount tries again
            log.error("could not create the marker of directory %s: %s", path, exc)
        finally:
            if self.markers.get(path) is m:
                del self.markers[path]
            m.done.set()
            self._signal_progress()

    def markers_below(self, path: str) -> list[str]:
        """Directories made under ``path`` whose markers are not in the store yet."""
        pre = path + "/" if path else ""
        return [p for p in self.markers if p.startswith(pre)]

    async def settle_markers(self, path: str) -> None:
        """Markers at or under ``path`` land now (a directory rename copies what the
        store holds)."""
        waiting = [m for p, m in self.markers.items() if not path or p == path
                   or p.startswith(path + "/")]
        for m in waiting:
            m.now()
        for m in waiting:
            await m.done.wait()

    async def set_marker_meta(self, path: str, meta: dict[str, str], mtime: float) -> bool:
        """New attributes for a directory made here: True if they go with its marker, not
        sent yet; False if the caller writes them (its marker is in the store by now)."""
        m = self.markers.get(path)
        if m is not None and m.started:
            await m.done.wait()
            return False
        if m is None:
            return False
        m.meta, m.mtime = meta, mtime
        self.index.put_op(m.oid, MkdirOp(m.key, meta, mtime),
                          sync=False)
        self._journal_unsynced.set()
        return True

    async def rmdir(self, path: str) -> bool:
        """Forget the marker of ``path`` if it was never sent; False if the store may hold
        one (the caller deletes it)."""
        m = self.markers.get(path)
        if m is None:
            return False
        if m.started:
            await m.done.wait()
            return False
        del self.markers[path]
        self.index.del_op(m.oid)
        m.done.set()
        m.hurry.set()  # its task sees it gone and ends
        return True

    def _by_fid(self, fid: int) -> DirtyFile | None:
        return self.files.by_fid(fid)

    async def _upload(self, f: DirtyFile) -> None:
        gen0 = f.gen
        try:
            async with self.file_limiter:
                self.metrics.uploads_in_flight.inc()
                try:
                    await self._upload_once(f)
                finally:
                    self.metrics.uploads_in_flight.dec()
        except _Changed as exc:
            log.info("%s; trying again", exc)
            self.schedule(f, self.upload_delay)
        except StoreError as exc:
            if exc.code == "NoSuchUpload" and f.stream is not None:
                # Our multipart upload was aborted under us: start a new one.
                log.info("multipart upload of %s vanished; starting over", f.path)
                f.stream = None
                self.schedule(f, self.upload_delay)
                return
            # Not retryable as such (e.g. AccessDenied): keep the data, try again later.
            self.metrics.uploads_failed.inc()
            log.error("upload of %s failed: %s; data kept locally, retrying in 30s", f.path, exc)
            self._back_off(f)
        except OSError as exc:
            if f.gen != gen0:  # truncated while being read: not a disk problem
                log.info("%s changed during its upload; trying again", f.path)
                self.schedule(f, self.upload_delay)
            else:
                self.metrics.uploads_failed.inc()
                log.error("upload of %s failed reading the cache: %s", f.path, exc)
                self._back_off(f)
        except Exception:
            # A bug must not take the whole mount down: the data stays in the journal.
            self.metrics.uploads_failed.inc()
            log.exception("upload of %s failed unexpectedly; retrying in 30s", f.path)
            self._back_off(f)
        finally:
            f.uploading = False
            self._signal_progress()
            self._notify(f)
            self.update_gauges()

    def _signal_progress(self) -> None:
        ev, self._progress = self._progress, trio.Event()
        ev.set()

    @staticmethod
    def _notify(f: DirtyFile) -> None:
        # Waiters hold the event they saw; a fresh one is installed for the next round.
        ev, f.changed = f.changed, trio.Event()
        ev.set()

    @staticmethod
    async def _wait_upload(f: DirtyFile) -> None:
        while f.uploading:
            await f.changed.wait()

    async def _put(self, f: DirtyFile, body: Body, size: int, meta: dict[str, str],
                   cond: dict[str, Any]) -> str:
        """Our content at f.key (one PUT, or a multipart upload), under ``cond``."""
        if size < 2 * MIN_PART or (size < self.part_size and f.stream is None):
            if f.stream is not None:
                await self._abort(f.key, f.stream.upload_id)
                f.stream = None
            if self.tagged(meta):
                return await self._tagged_put(f.key, body, size, meta, cond)
            return await self.store.put_file(f.key, body, size, meta, **cond)
        return await self._multipart(f, size, meta, cond)

    # Set by the filesystem: whether an object with this metadata must show it after a
    # listing (a symlink, an executable, ...). Such an object is uploaded as a one-part
    # multipart upload, whose ETag ("...-1") marks it in listings (namespace.tagged).
    tagged: Callable[[dict[str, str]], bool] = staticmethod(lambda meta: False)

    async def _tagged_put(self, key: str, body: Body, size: int, meta: dict[str, str],
                          cond: dict[str, Any]) -> str:
        """A small object as a multipart upload of one part (three requests instead of one
        PUT: only for the few objects whose metadata a listing must not hide)."""
        upload_id = await self.store.create_multipart(key, meta)
        try:
            if isinstance(body, str):
                part = PartSource(1, body, 0, size)
            else:
                part = PartSource(1, None, 0, size, data=(body or b"")[:size])
            etag = await self.store.upload_part(key, upload_id, part)
            return await self.store.complete_multipart(key, upload_id, [etag], **cond)
        except StoreError:
            await self._abort(key, upload_id)  # (after a crash, replay finds orphans)
            raise

    @contextlib.contextmanager
    def _body(self, f: DirtyFile) -> Iterator[tuple[Body, int]]:
        """What an upload of f sends, and its size: an inline file's bytes (a snapshot:
        writes during the upload change the journal, not it), else its data file."""
        if f.inline:
            data = self.index.get_inline(f.fid)
            yield data, len(data)
            return
        with self._source(f) as path:
            yield path, os.fstat(f.fd).st_size

    async def _upload_once(self, f: DirtyFile) -> None:
        gen = f.gen
        with self._body(f) as (body, size):
            await self._upload_body(f, gen, body, size)

    async def _upload_body(self, f: DirtyFile, gen: int, body: Body, size: int) -> None:
        f.attrs.size = size
        meta = f.attrs.to_meta()
        cond = {"if_match": f.base_etag, "if_none_match": f.base_etag is None}
        log.debug("upload of %s (file %d, %d bytes, over %s)", f.path, f.fid, size,
                  f.base_etag or "nothing")
        try:
            etag = await self._put(f, body, size, meta, cond)
        except PreconditionFailed:
            if not await self._exists(f.key):
                if f.base_etag is not None:
                    self._gone(f)
                    return
                # "If-None-Match: *" refused with nothing at the key: SeaweedFS does that
                # while an emptied folder of the same name lingers (the directory was renamed
                # or deleted away). Nobody else's version to keep: ours goes in unconditionally
                # (which also replaces the empty folder).
                log.info("%s: the store refused a new object where it holds none; writing it "
                         "without the condition", f.key)
                etag = await self._put(f, body, size, meta,
                                       {"if_match": None, "if_none_match": False})
            else:
                etag = await self._conflict(f, body, size, meta)
        except StoreError as exc:
            # If-Match on a key deleted meanwhile is NoSuchKey on AWS S3 (412 elsewhere).
            if exc.code != "NoSuchKey" or f.base_etag is None:
                raise
            self._gone(f)
            return
        # The store now holds this version at f.key, even if the file was unlinked during the
        # upload: whoever unlinks or replaces it must know there is an object to delete.
        f.base_etag = etag
        if f.deleted or self.files.get(f.path) is not f:
            return  # unlinked during the upload: handled by that operation
        f.uploaded_gen = gen
        f.stream = None
        # The store now equals the local copy (unless it changed during the upload).
        f.touched, f.base_size = (set(), size) if f.gen == gen else (None, 0)
        self.metrics.uploads_done.inc()
        if f.clean:
            self.index.del_journal(f.fid)
            self.on_uploaded(f, etag)
            if f.handles == 0:
                self._release_clean(f)
        else:
            self.journal(f)
            if f.writers == 0:
                self.schedule(f, self.upload_delay)

    async def _multipart(self, f: DirtyFile, size: int, meta: dict[str, str],
                         cond: dict) -> str:
        ps = part_size_for(size, self.part_size)
        while f.stream is not None and not f.stream.upload_id:
            await trio.sleep(0.02)  # a streaming upload is being created: use it
        st = f.stream
        if st is None or not st.upload_id or st.part_size != ps:
            new_id = await self.store.create_multipart(f.key, meta)
            # Read f.stream only now: a streaming upload may have started meanwhile.
            old = f.stream
            if old is not None and old.upload_id:
                await self._abort(f.key, old.upload_id)
            st = f.stream = _Stream(new_id, ps)
            self.journal(f)
        nparts = (size + ps - 1) // ps
        for _ in range(3):
            # Wait for parts already being sent, then send what is missing in parallel. A
            # write during the upload drops the parts it touched: they are sent again.
            while st.sending:
                ev = self._progress
                with trio.move_on_after(0.5):
                    await ev.wait()
            todo = []
            for p in range(1, nparts + 1):
                length = min(ps, size - (p - 1) * ps)
                have = st.etags.get(p)
                if have is None or have[1] != length:
                    todo.append((p, length))
            if not todo:
                break
            try:
                async with trio.open_nursery() as n:
                    for p, length in todo:
                        n.start_soon(self._send_part_patient, f, st, p, length)
            except* StoreError as eg:
                raise eg.exceptions[0] from None
        else:
            raise _Changed(f"{f.path} kept changing during its upload")
        etags = [st.etags[p][0] for p in range(1, nparts + 1)]
        try:
            return await self.store.complete_multipart(f.key, st.upload_id, etags, **cond)
        except PreconditionFailed:
            await self._abort(f.key, st.upload_id)
            f.stream = None
            raise

    async def _upload_part(self, f: DirtyFile, st: _Stream, p: int, length: int) -> str:
        """Send part ``p`` of ``st``: from the local file, or - if the store object holds
        exactly those bytes (an unchanged range of a modified object) - copied server-side."""
        off = (p - 1) * st.part_size
        if (f.touched is not None and f.base_etag and off + length <= f.base_size
                and not any(c in f.touched
                            for c in range(off // CHUNK, (off + length - 1) // CHUNK + 1))):
            return await self.store.upload_part(f.key, st.upload_id, PartSource(
                p, None, off, length, copy_key=f.key, copy_etag=f.base_etag))
        with self._source(f) as path:
            return await self.store.upload_part(f.key, st.upload_id,
                                                PartSource(p, path, off, length))

    async def _send_part_patient(self, f: DirtyFile, st: _Stream, p: int, length: int) -> None:
        gen = st.part_gen.get(p, 0)
        etag = await self._upload_part(f, st, p, length)
        if st.part_gen.get(p, 0) == gen:  # else written meanwhile: send it again
            st.etags[p] = (etag, length)
        self._signal_progress()

    async def _exists(self, key: str) -> bool:
        try:
            await self.store.head(key)
        except StoreError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _gone(self, f: DirtyFile) -> None:
        """The object we modified was deleted in the store meanwhile: nothing of anyone else
        to keep, so ours is written as a new object (If-None-Match) right away."""
        log.warning("%s was deleted in the store while it had local changes; uploading ours "
                    "as a new object", f.key)
        f.base_etag = None
        self.journal(f)
        self.schedule(f, 0)

    async def _conflict(self, f: DirtyFile, body: Body, size: int, meta: dict[str, str]
                        ) -> str:
        """The object changed in the store since our version: keep both. The store's
        version stays at the key; ours goes to ``<key>.conflict-<UTC time>-<id>``, and the
        local file lives on under that name (later writes through open handles go there).
        Returns the sibling's ETag."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        side = f"{f.key}.conflict-{stamp}-{f.fid}"
        self.metrics.conflicts.inc()
        log.warning("conflict: %s changed in the store while it had local changes; the store's "
                    "version stays, ours is saved as %s", f.key, side)
        if size >= 2 * MIN_PART and size >= self.part_size:
            ps = part_size_for(size, self.part_size)
            uid = await self.store.create_multipart(side, meta)
            etags = []
            with self._source(f) as path:
                for i, off in enumerate(range(0, size, ps)):
                    etags.append(await self.store.upload_part(side, uid, PartSource(
                        i + 1, path, off, min(ps, size - off))))
            etag = await self.store.complete_multipart(side, uid, etags)
        else:
            etag = await self.store.put_file(side, body, size, meta)
        # Our data is safe in the sibling; the path shows the store's version again.
        self.on_uploaded(f, "")
        if f.stream is not None and f.stream.upload_id:
            await self._abort(f.key, f.stream.upload_id)
        f.stream = None
        if not f.deleted:
            if self.files.get(f.path) is f:
                del self.files[f.path]
            f.path, f.key = side[len(self.prefix):], side
            f.touched = None
            self.files[f.path] = f
        return etag

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.store.abort_multipart(key, upload_id)
        except StoreError as exc:
            if exc.code != "NoSuchUpload":
                log.warning("could not abort multipart upload of %s: %s", key, exc)

    # retiring ----------------------------------------------------------------------------
    def _release_clean(self, f: DirtyFile) -> None:
        """Uploaded and closed: the local copy is no longer needed."""
        if f.holding:
            return  # a truncate is about to change it
        if self.files.get(f.path) is f:
            del self.files[f.path]
        self._close(f, recycle=True)

    def _forget(self, f: DirtyFile) -> None:
        if self.files.get(f.path) is f:
            del self.files[f.path]
        if f.stream is not None and f.stream.upload_id and self.nursery is not None:
            # Deleted while its parts streamed: no multipart upload may be left behind.
            self.nursery.start_soon(self._abort, f.key, f.stream.upload_id)
            f.stream = None
        self.index.del_journal(f.fid)
        self._due.pop(f.fid, None)
        self._close(f)
        self.update_gauges()

    def _close(self, f: DirtyFile, recycle: bool = False) -> None:
        if f.inline:
            f.inline = False  # closed (fd is -1): the content goes with its journal entry
            try:
                self.index.del_inline(f.fid)
            except OSError as exc:  # a leftover value: replay drops it
                log.warning("could not drop the journal copy of %s: %s", f.path, exc.strerror)
            return
        if f.fd < 0:
            return  # closed already
        kept = False
        if recycle and (len(self._spares) < SPARES or len(self._idle) < IDLE_MAX):
            # Emptied and renamed (a new id: no journal entry may name it), the file is kept
            # for a later create(): a rename costs ~20 us where a new inode can cost ~1 ms
            # of kernel time (see IDLE_MAX). Only uploaded files: nothing reads them any more.
            try:
                os.ftruncate(f.fd, 0)
                fid = self.index.next_id()
                os.rename(f.data_path, self.dir / str(fid))
            except OSError:
                pass
            else:
                if len(self._spares) < SPARES:
                    self._spares.append((fid, f.fd))
                    f.fd = -1  # the spare's now
                    return
                self._idle.append(fid)  # closed below, kept under its new name
                kept = True
        fd, f.fd = f.fd, -1  # never closed twice: the number may belong to another file by then
        try:
            os.close(fd)
        except OSError:
            pass
        if not kept:
            f.data_path.unlink(missing_ok=True)

    async def _retire(self, f: DirtyFile) -> None:
        """Drop a dirty file whose path is being replaced or deleted."""
        f.deleted = True
        self.journal(f)
        await self._wait_upload(f)  # its upload must not land after what replaces it
        if f.stream is not None and f.stream.upload_id:
            await self._abort(f.key, f.stream.upload_id)
            f.stream = None
        if self.files.get(f.path) is f:
            del self.files[f.path]
        self.update_gauges()
        if f.handles == 0:
            self._forget(f)
        else:
            self.index.del_journal(f.fid)

    async def unlink(self, path: str) -> DirtyFile | None:
        f = self.files.get(path)
        if f is not None:
            await self._retire(f)
        return f

    async def rename(self, src: str, dst: str, dst_etag: str | None
                     ) -> tuple[bool, str | None]:
        """Move a dirty file to a new path. Returns (moved, etag of the object the store
        holds at ``src`` for it, if any): the caller deletes that object. (False, None) when
        there is no local file at ``src`` (any more: an upload that finished meanwhile may
        have released it, and the caller moves the store object instead)."""
        f = self.files.get(src)
        if f is None or f.deleted:
            return False, None
        old = self.files.get(dst)
        if old is not None:
            await self._retire(old)
            dst_etag = old.base_etag  # what the store holds at dst now
        await self._wait_upload(f)
        if self.files.get(src) is not f or f.deleted:
            return False, None
        # No checkpoint from here until the file is re-keyed: no upload can start under the
        # old key and then be taken for an upload of the new one.
        st, src_key, src_etag = f.stream, f.key, f.base_etag
        f.stream = None
        del self.files[src]
        f.path, f.key, f.base_etag = dst, self.key_of(dst), dst_etag
        f.touched = None  # what the store holds at dst is not our content
        f.uploaded_gen = 0  # the new key has none of it yet
        f.gen += 1
        self.files[dst] = f
        self.journal(f)
        if f.writers == 0:
            self.schedule(f, self.upload_delay)
        if st is not None and st.upload_id:
            await self._abort(src_key, st.upload_id)
        return True, src_etag

    # crash recovery ----------------------------------------------------------------------
    async def rekey_journal(self, src_key: str, dst_key: str) -> None:
        """Before replay: journaled files under ``src_key`` belong under ``dst_key`` (a
        directory rename the crash interrupted)."""
        for fid, j in self.index.all_journal().items():
            if not j.key.startswith(src_key) or j.deleted:
                continue
            if j.upload_id:
                await self._abort(j.key, j.upload_id)
            key = dst_key + j.key[len(src_key):]
            j.key, j.path, j.base_etag, j.upload_id = key, key[len(self.prefix):], None, None
            self.index.put_journal(fid, j)

    async def replay(self) -> int:
        """Resume what a previous run left: every journaled file is uploaded again."""
        n = 0
        for fid, j in self.index.all_journal().items():
            data_path = self.dir / str(fid)
            inline = j.inline
            if j.upload_id:
                await self._abort(j.key, j.upload_id)
            have = inline or data_path.exists()
            if j.deleted or not have or not j.key.startswith(self.prefix):
                if j.deleted or not have:
                    self.index.del_journal(fid)
                    self.index.del_inline(fid)
                    data_path.unlink(missing_ok=True)
                continue
            if inline:
                data_path.unlink(missing_ok=True)  # a move to a data file cut short (_to_file)
                fd, size = -1, len(self.index.get_inline(fid))
            else:
                fd = os.open(data_path, os.O_RDWR)
                size = os.fstat(fd).st_size
            attrs = Attrs(j.mode, j.uid, j.gid, j.mtime, size,
                          mtime_ns=j.mtime_ns, ctime_ns=j.ctime_ns)
            path = j.path or j.key[len(self.prefix):]
            f = DirtyFile(fid, path, j.key, j.base_etag, attrs, data_path, fd,
                          inline=inline)
            self.files[path] = f
            self.journal(f)
            self.schedule(f, 0)
            n += 1
        # Data files no journal entry names: empty files kept for reuse (IDLE_MAX), spares
        # made ahead of a crash, or files whose journal entry was removed just before one.
        # Nothing refers to them: emptied, they are reused (ids are never handed out twice,
        # so no later journal entry can name one by accident).
        journal = self.index.all_journal()
        journaled = set(journal)
        # Inline contents whose journal entry is gone (removed just before a crash).
        for fid in self.index.inline_ids():
            if (j := journal.get(fid)) is None or not j.inline:
                self.index.del_inline(fid)
        taken = {fid for fid, _ in self._spares} | set(self._idle)
        for p in self.dir.iterdir():
            if not p.name.isdigit():
                continue
            fid = int(p.name)
            if fid in journaled or fid in taken or self.files.by_fid(fid) is not None:
                continue
            if len(self._idle) < IDLE_MAX:
                try:
                    os.truncate(p, 0)
                except OSError:
                    pass
                else:
                    self._idle.append(fid)
                    continue
            p.unlink(missing_ok=True)
        if self.nursery is not None:
            self.nursery.start_soon(self.make_spares)
        # Multipart uploads of journaled keys that the journal no longer names are orphans.
        keys = {f.key for f in self.files.values()}
        try:
            for up in await self.store.list_multipart(self.prefix):
                if up.key in keys and all(f.stream is None or f.stream.upload_id != up.upload_id
                                          for f in self.files.values()):
                    await self._abort(up.key, up.upload_id)
        except StoreError as exc:
            log.warning("could not list multipart uploads: %s", exc)
        self.update_gauges()
        return n

