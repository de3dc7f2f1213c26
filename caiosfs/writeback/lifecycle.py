"""The write-back facade: a dirty file's life from create (or open of a stored object) to
upload, rename, unlink and release. The filesystem talks to :class:`WriteBack` only; the
jobs it hands out live in their own modules (see the package docstring)."""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..attrs import Attrs
from ..errors import FsError
from ..index import Index
from ..metrics import Metrics
from ..store.client import StoreClient
from .files import DirtyFile, FileTable, Phase
from .journal import Journal
from .local import LocalData
from .markers import DirMarkers, Marker
from .replay import Recovery
from .scheduler import Scheduler
from .uploader import Uploader

FLUSH_ROUND = 0.05  # flush_all looks at the dirty files at most this often


class WriteBack:
    """Dirty files on local disk, journaled in LMDB, uploaded in the background."""

    def __init__(self, store: StoreClient, index: Index, metrics: Metrics, cache_dir: Path,
                 prefix: str, *, part_size: int, dirty_limit: int, upload_delay: float,
                 fsync_local: bool, on_uploaded: Callable[[DirtyFile, str], None]) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics
        self.prefix = prefix
        self.part_size = part_size
        self.dirty_limit = dirty_limit
        self.upload_delay = upload_delay
        self.fsync_local = fsync_local
        self.files = FileTable()
        self._journal = Journal(index)
        self.local = LocalData(cache_dir / "dirty", index, self._journal)
        self.dir = self.local.dir
        self.sched = Scheduler(self.files, metrics, part_size=part_size,
                               dirty_limit=dirty_limit, upload_delay=upload_delay)
        self.uploader = Uploader(store, index, metrics, self.files, self.local, self._journal,
                                 self.sched, prefix, part_size=part_size,
                                 dirty_limit=dirty_limit, upload_delay=upload_delay,
                                 on_uploaded=on_uploaded, release=self._release_clean)
        self.dirs = DirMarkers(store, index, self._journal, self.sched, upload_delay)
        self.recovery = Recovery(store, index, self.files, self.local, self._journal,
                                 self.sched, self.uploader, prefix)
        self.nursery: trio.Nursery | None = None

    # what the filesystem (and the tests) read or set -------------------------------------
    @property
    def on_uploaded(self) -> Callable[[DirtyFile, str], None]:
        """Called with each file whose upload completed and its new ETag (set by whoever
        owns the inodes, possibly after construction: the uploader calls what is set now)."""
        return self.uploader.on_uploaded

    @on_uploaded.setter
    def on_uploaded(self, fn: Callable[[DirtyFile, str], None]) -> None:
        self.uploader.on_uploaded = fn

    @property
    def inline_max(self) -> int:
        return self.local.inline_max

    @inline_max.setter
    def inline_max(self, value: int) -> None:
        self.local.inline_max = value

    @property
    def tagged(self) -> Callable[[dict[str, str]], bool]:
        return self.uploader.tagged

    @tagged.setter
    def tagged(self, fn: Callable[[dict[str, str]], bool]) -> None:
        self.uploader.tagged = fn

    @property
    def markers(self) -> dict[str, Marker]:
        """Directories made here whose markers are not in the store yet, by path."""
        return self.dirs.pending

    @property
    def file_limiter(self) -> trio.CapacityLimiter:
        return self.uploader.limiter

    @property
    def _spares(self) -> deque[tuple[int, int]]:  # (tests look at the pool)
        return self.local.spares

    @property
    def _idle(self) -> deque[int]:
        return self.local.idle

    def key_of(self, path: str) -> str:
        return self.prefix + path

    def dirty_bytes(self) -> int:
        """Bytes not yet in the store (what back-pressure and statfs look at)."""
        return self.sched.dirty_bytes()

    def update_gauges(self, force: bool = False) -> None:
        self.sched.update_gauges(force)

    def journal(self, f: DirtyFile) -> None:
        """Commit f's journal entry (a killed daemon loses nothing); flushed to disk moments
        later, one fdatasync per burst."""
        self._journal.write(f)

    def children(self, dir_path: str) -> dict[str, DirtyFile]:
        """Local files directly inside ``dir_path`` ('' is the root)."""
        return self.files.children(dir_path)

    def under(self, dir_path: str) -> list[DirtyFile]:
        return self.files.under(dir_path)

    def schedule(self, f: DirtyFile, delay: float) -> None:
        self.sched.schedule(f, delay)

    async def make_spares(self) -> None:
        await self.local.make_spares()

    def close_spares(self) -> None:
        self.local.close_spares()

    # creating and opening ----------------------------------------------------------------
    def _new(self, path: str, base_etag: str | None, attrs: Attrs, inline: bool) -> DirtyFile:
        f = self.local.new_file(path, self.key_of(path), base_etag, attrs, inline)
        self.files[path] = f
        return f

    async def create(self, path: str, attrs: Attrs, base_etag: str | None = None) -> DirtyFile:
        old = self.files.get(path)
        if old is not None:
            await self._retire(old)
            base_etag = old.base_etag  # what the store holds now (its upload may have landed)
        f = self._new(path, base_etag, attrs, inline=True)
        self.journal(f)
        self.update_gauges()
        self.sched.wrote()
        return f

    async def open_existing(self, path: str, base_etag: str, attrs: Attrs,
                            fill: Callable[[int], Awaitable[None]] | None) -> DirtyFile:
        """A dirty copy of a store object. ``fill(fd)`` (run in a thread) writes the current
        content into the new local file; None means the caller truncates it anyway."""
        filled = fill is not None and attrs.size > 0
        f = self._new(path, base_etag, attrs, inline=not filled)
        try:
            if filled:
                assert fill is not None
                await fill(f.fd)
            else:
                self.local.truncate(f, 0)
                f.attrs.size = 0
        except BaseException:
            f.go(Phase.RELEASED)
            self.local.close(f)
            del self.files[path]
            raise
        f.uploaded_gen = f.gen if fill is not None else 0
        if fill is not None:
            f.touched, f.base_size = set(), f.attrs.size
        self.journal(f)
        self.update_gauges()
        return f

    # reading and writing -----------------------------------------------------------------
    def read(self, f: DirtyFile, size: int, offset: int) -> bytes:
        return self.local.read(f, size, offset)

    async def write(self, f: DirtyFile, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if self.sched.over_limit(f, end):
            await self.sched.wait_for_room(f, end)  # back-pressure
        n = self.local.pwrite(f, data, offset)
        end = offset + n
        self.sched.count_write(f, end)
        f.touch(offset, end)
        f.attrs.size = max(f.attrs.size, end)
        self.uploader.maybe_stream(f, offset, end)
        f.last_write_end = end
        self.sched.wrote()
        return n

    async def truncate(self, f: DirtyFile, size: int) -> None:
        if size < self.local.size(f):
            # An upload reading the part we cut off would fail (and the store client retries
            # dirty-data uploads forever): let running uploads finish first, start no new one.
            f.holding += 1
            try:
                while f.uploading or (f.stream is not None and f.stream.sending):
                    ev = f.progress
                    await ev.wait()
            finally:
                f.holding -= 1
            if f.deleted and f.handles == 0:  # its last handle closed meanwhile: fd gone
                raise FsError(errno.ENOENT, "unlinked during truncate")
        self.local.truncate(f, size)
        f.touch(min(size, f.attrs.size), max(size, f.attrs.size) + 1)
        f.attrs.size = size

    # handles, syncing --------------------------------------------------------------------
    def opened(self, f: DirtyFile, writable: bool) -> None:
        f.handles += 1
        if writable:
            f.writers += 1
            if f.writers == 1:
                f.write_opened = time.monotonic()
            self.sched.batches.opened(f.path)
            self.sched.unschedule(f.fid)

    def released(self, f: DirtyFile, writable: bool) -> None:
        f.handles -= 1
        if writable:
            f.writers -= 1
            batch = self.sched.batches.closed(f.path, f.write_opened)
            f.closed_at = time.monotonic()
            f.alone = not batch
            # (A file alone waits a moment, see Uploader.stream_rest_soon.)
            f.batched = f.size >= self.part_size
        if f.deleted and f.handles == 0:
            if not f.uploading:  # (else _retire, waiting for that upload, forgets it)
                self._forget(f)
            return
        if f.writers == 0 and not f.clean:
            self.schedule(f, self.upload_delay)
            self.uploader.stream_rest_soon(f)
        elif f.clean and f.handles == 0:
            self._release_clean(f)

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
            self.sched.urgent(f)
            await ev.wait()

    async def flush_all(self, progress: Callable[[dict[str, Any]], Awaitable[None]] | None = None
                        ) -> None:
        """Upload everything dirty now and wait until it is durable."""
        while True:
            pending = [f for f in self.files.values() if not f.clean and not f.deleted]
            if not pending and not self.markers:
                self.update_gauges(force=True)
                return
            ev = self.sched.progress
            for f in pending:
                self.sched.urgent(f)
            self.dirs.hurry_all()
            if progress:
                await progress({"files": len(pending), "bytes": sum(f.size for f in pending)})
            # (The timeout: a file whose upload is backing off after a failure sets nothing.)
            with trio.move_on_after(1):
                await ev.wait()
            # Small files finish uploading hundreds a second, and every round above looks at
            # every dirty file: one round per burst, not one per upload (1,000 files: a
            # third of the loop's CPU went here).
            await trio.sleep(FLUSH_ROUND)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The journal's flusher and the upload scheduler; lives in the filesystem's
        nursery."""
        async with trio.open_nursery() as nursery:
            self.nursery = self.uploader.nursery = self.dirs.nursery = nursery
            nursery.start_soon(self._journal.run)
            task_status.started()
            await self.sched.run(self.uploader.start)

    # directories -------------------------------------------------------------------------
    def mkdir(self, path: str, key: str, meta: dict[str, str], mtime: float,
              oid: int | None = None) -> None:
        self.dirs.mkdir(path, key, meta, mtime, oid)

    def markers_below(self, path: str) -> list[str]:
        return self.dirs.below(path)

    async def settle_markers(self, path: str) -> None:
        await self.dirs.settle(path)

    async def move_markers(self, src: str, dst: str, dir_key: Callable[[str], str]) -> None:
        await self.dirs.move(src, dst, dir_key)

    def upload_now(self, f: DirtyFile) -> None:
        """A closed file moved by a directory rename (the commit of a batch) uploads now,
        not ``upload_delay`` later."""
        if f.writers == 0 and not f.deleted and self.files.get(f.path) is f:
            self.sched.urgent(f)

    @staticmethod
    def worth_finishing(f: DirtyFile) -> bool:
        """Whether a rename should let f's upload finish under the old name (then copy the
        object server-side) rather than drop it and upload f again under the new one: its
        upload task runs, or its streamed parts sent or in flight (a part in flight cannot be
        called back) are at least a third of it (a server-side copy cost a third of an
        upload's time behind the WAN proxy: 1.1 GiB in 2.9 s against ~9 s)."""
        if f.uploading:
            return True
        st = f.stream
        if st is None or not st.upload_id:
            return False
        spent = sum(n for _, n in st.etags.values()) + len(st.sending) * st.part_size
        return spent * 3 >= f.size > 0

    async def set_marker_meta(self, path: str, meta: dict[str, str], mtime: float) -> bool:
        return await self.dirs.set_meta(path, meta, mtime)

    async def rmdir(self, path: str) -> bool:
        return await self.dirs.rmdir(path)

    # retiring ----------------------------------------------------------------------------
    def _release_clean(self, f: DirtyFile) -> None:
        """Uploaded and closed: the local copy is no longer needed."""
        if f.holding:
            return  # a truncate is about to change it
        f.go(Phase.RELEASED)
        if self.files.get(f.path) is f:
            del self.files[f.path]
        self.local.close(f, recycle=True)

    def _forget(self, f: DirtyFile) -> None:
        f.go(Phase.FORGOTTEN)
        if self.files.get(f.path) is f:
            del self.files[f.path]
        if f.stream is not None and f.stream.upload_id and self.nursery is not None:
            # Deleted while its parts streamed: no multipart upload may be left behind.
            self.nursery.start_soon(self.uploader.abort, f.key, f.stream.upload_id)
            f.stream = None
        self.index.del_journal(f.fid)
        self.sched.unschedule(f.fid)
        self.local.close(f)
        self.update_gauges()

    @staticmethod
    async def _wait_upload(f: DirtyFile) -> None:
        while f.uploading:
            await f.changed.wait()

    async def _retire(self, f: DirtyFile) -> None:
        """Drop a dirty file whose path is being replaced or deleted."""
        f.retire()
        self.journal(f)
        await self._wait_upload(f)  # its upload must not land after what replaces it
        if f.stream is not None and f.stream.upload_id:
            await self.uploader.abort(f.key, f.stream.upload_id)
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
        if f.writers:
            self.sched.batches.moved(src, dst, f.writers)
        else:
            self.schedule(f, self.upload_delay)
        if st is not None and st.upload_id:
            await self.uploader.abort(src_key, st.upload_id)
        return True, src_etag

    # crash recovery ----------------------------------------------------------------------
    async def rekey_journal(self, src_key: str, dst_key: str) -> None:
        """Before replay: journaled files under ``src_key`` belong under ``dst_key`` (a
        directory rename the crash interrupted)."""
        await self.recovery.rekey(src_key, dst_key)

    async def replay(self) -> int:
        """Resume what a previous run left: every journaled file is uploaded again."""
        return await self.recovery.replay(self.nursery)
