"""The local content of dirty files: data files under ``<cache_dir>/dirty/``, a pool of empty
ones made ahead, and small files kept inline in the journal itself.

``write()`` is a ``pwrite`` to the data file, so once it returns the data survives a killed
daemon (the kernel owns the page cache); an inline file's write is a journal commit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import trio

from ..attrs import Attrs
from ..errors import FsError
from ..index import Index
from ..store import Body
from .files import DirtyFile, Storage
from .journal import Journal

log = logging.getLogger(__name__)

SPARES = 32  # empty data files kept open, ready for new files (see LocalData.make_spares)
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


def _disk_error(exc: OSError) -> FsError:
    return FsError(exc.errno or errno.EIO, f"cache disk: {exc.strerror}")


class LocalData:
    def __init__(self, dirty_dir: Path, index: Index, journal: Journal) -> None:
        self.dir = dirty_dir
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.index = index
        self.journal = journal
        self.inline_max = INLINE_MAX
        self._inline_off_until = 0.0  # the journal was full: new files get data files a while
        self.spares: deque[tuple[int, int]] = deque()  # (id, fd) of empty data files
        self.idle: deque[int] = deque()  # ids of empty, closed data files (see IDLE_MAX)
        self._spare_maker = IdleWorker("caiosfs-spares")
        self._spares_low = trio.Event()

    # new files and the pool of spare data files ------------------------------------------
    def new_file(self, path: str, key: str, base_etag: str | None, attrs: Attrs,
                 inline: bool) -> DirtyFile:
        """A new, empty local file: inline (see INLINE_MAX) if asked and possible, else with
        a data file (a spare one if there is one)."""
        if inline and self.inline_max and time.monotonic() >= self._inline_off_until:
            fid = self.index.next_id()
            return DirtyFile(fid, path, key, base_etag, attrs, self.dir / str(fid), -1,
                             inline=True)
        if self.spares:
            fid, fd = self.spares.popleft()
        else:
            fid = self.idle.popleft() if self.idle else self.index.next_id()
            try:
                fd = os.open(self.dir / str(fid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO,
                              f"cannot create cache file: {exc.strerror}") from None
        self._spare_taken()
        return DirtyFile(fid, path, key, base_etag, attrs, self.dir / str(fid), fd)

    def _spare_taken(self) -> None:
        if len(self.spares) < SPARES // 2:
            self._spares_low.set()

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
            want = SPARES - len(self.spares)
            if want > 0:
                ids: list[tuple[int, bool]] = []
                while self.idle and len(ids) < want:
                    ids.append((self.idle.popleft(), True))
                try:
                    ids += [(self.index.next_id(), False) for _ in range(want - len(ids))]
                except OSError:
                    pass
                made = await self._spare_maker.run(make, ids)
                self.spares.extend(made)
                while len(self.spares) > SPARES:  # recycled ones came in meanwhile
                    fid, fd = self.spares.pop()
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
        while self.spares:
            fid, fd = self.spares.popleft()
            os.close(fd)
            self._keep_idle(fid)

    def _keep_idle(self, fid: int) -> None:
        """Keep the empty data file ``fid`` for reuse, or delete it past IDLE_MAX."""
        if len(self.idle) < IDLE_MAX:
            self.idle.append(fid)
        else:
            (self.dir / str(fid)).unlink(missing_ok=True)

    def reclaim(self, named: set[int]) -> None:
        """After a crash: data files nothing names (``named``: journaled or in use) are
        empty files kept for reuse, spares made ahead of the crash, or files whose journal
        entry was removed just before it. Emptied, they are reused (ids are never handed out
        twice, so no later journal entry can name one by accident)."""
        taken = {fid for fid, _ in self.spares} | set(self.idle)
        for p in self.dir.iterdir():
            if not p.name.isdigit():
                continue
            fid = int(p.name)
            if fid in named or fid in taken:
                continue
            if len(self.idle) < IDLE_MAX:
                try:
                    os.truncate(p, 0)
                except OSError:
                    pass
                else:
                    self.idle.append(fid)
                    continue
            p.unlink(missing_ok=True)

    # reading and changing the content ----------------------------------------------------
    def read(self, f: DirtyFile, size: int, offset: int) -> bytes:
        if f.inline:
            return self.index.get_inline(f.fid)[offset:offset + size]
        return os.pread(f.fd, size, offset)

    def size(self, f: DirtyFile) -> int:
        return len(self.index.get_inline(f.fid)) if f.inline else os.fstat(f.fd).st_size

    @staticmethod
    @contextlib.contextmanager
    def source(f: DirtyFile) -> Iterator[str]:
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

    @contextlib.contextmanager
    def body(self, f: DirtyFile) -> Iterator[tuple[Body, int]]:
        """What an upload of f sends, and its size: an inline file's bytes (a snapshot:
        writes during the upload change the journal, not it), else its data file."""
        if f.inline:
            data = self.index.get_inline(f.fid)
            yield data, len(data)
            return
        with self.source(f) as path:
            yield path, os.fstat(f.fd).st_size

    def _put_inline(self, f: DirtyFile, data: bytes) -> bool:
        """Commit ``data`` as f's content; False if the journal is full (f needs a file)."""
        try:
            self.index.put_inline(f.fid, data)
        except OSError as exc:
            log.warning("small files go to data files for a minute: %s", exc.strerror)
            self._inline_off_until = time.monotonic() + 60
            return False
        self.journal.committed()
        return True

    def pwrite(self, f: DirtyFile, data: bytes, offset: int) -> int:
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
            raise _disk_error(exc) from None

    def truncate(self, f: DirtyFile, size: int) -> None:
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
            raise _disk_error(exc) from None

    def _to_file(self, f: DirtyFile, content: bytes) -> None:
        """Move an inline file to a data file of its own (it outgrew INLINE_MAX, or the
        journal is full). The data file is complete before one commit switches the journal
        entry to it and drops the inline value; a crash before that commit leaves the inline
        value in charge (replay removes the half-made file)."""
        path = self.dir / str(f.fid)
        try:
            if self.spares:
                sfid, fd = self.spares.popleft()
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
                self.index.end_inline(f.fid, self.journal.entry(f, inline=False))
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise _disk_error(exc) from None
        f.fd = fd
        f.go(Storage.FILE)
        self.journal.committed()
        self._spare_taken()

    def close(self, f: DirtyFile, recycle: bool = False) -> None:
        """Drop f's local content. ``recycle``: it is uploaded and nothing reads it any more,
        so its data file may be kept for a later file."""
        if f.inline:
            f.go(Storage.CLOSED)  # the content goes with its journal entry
            try:
                self.index.del_inline(f.fid)
            except OSError as exc:  # a leftover value: replay drops it
                log.warning("could not drop the journal copy of %s: %s", f.path, exc.strerror)
            return
        if f.fd < 0:
            f.go(Storage.CLOSED)
            return  # closed already
        kept = False
        if recycle and (len(self.spares) < SPARES or len(self.idle) < IDLE_MAX):
            # Emptied and renamed (a new id: no journal entry may name it), the file is kept
            # for a later create(): a rename costs ~20 us where a new inode can cost ~1 ms
            # of kernel time (see IDLE_MAX).
            try:
                os.ftruncate(f.fd, 0)
                fid = self.index.next_id()
                os.rename(f.data_path, self.dir / str(fid))
            except OSError:
                pass
            else:
                if len(self.spares) < SPARES:
                    self.spares.append((fid, f.fd))
                    f.fd = -1  # the spare's now
                    f.go(Storage.CLOSED)
                    return
                self.idle.append(fid)  # closed below, kept under its new name
                kept = True
        fd, f.fd = f.fd, -1  # never closed twice: the number may belong to another file by then
        f.go(Storage.CLOSED)
        try:
            os.close(fd)
        except OSError:
            pass
        if not kept:
            f.data_path.unlink(missing_ok=True)
