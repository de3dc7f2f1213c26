"""Uploads: one PUT, or a multipart upload whose parts are sent from the data file or copied
server-side (UploadPartCopy) where the store's version holds the same bytes; parts of a file
written sequentially stream while it is written; a conflict copy goes the same way.

Writes are conditional (If-Match the version we started from, If-None-Match for new files):
if someone else changed the object meanwhile, our data goes to a ``.conflict-`` sibling and
both versions survive. Uploads retry forever; dirty data is never dropped.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from ..errors import PreconditionFailed, StoreError
from ..index import Index
from ..metrics import Metrics
from ..store import Body, PartSource
from ..store.client import StoreClient
from .files import CHUNK, DirtyFile, FileTable, Phase, Stream
from .journal import Journal
from .local import LocalData
from .scheduler import ALONE_GRACE, Scheduler

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
MIN_PART = 5 << 20
# Parts of a file being written that stay local before its parts start streaming (up to a
# quarter of dirty_limit). Sending parts while a fast writer is still writing takes CPU from
# it and gains little: the store is slower than the writer, so the backlog is uploaded after
# close either way (1 GiB written in 1 MiB writes on 2 cores: close 1.25 s instead of 1.6 s,
# durable the same 7.0 s). A longer file streams its older parts, so what is left to upload
# at close stays bounded. The backlog's complete parts go at the last close (stream_rest), not
# upload_delay later: behind the WAN proxy the store was otherwise idle for that second.
STREAM_BACKLOG_PARTS = 16


def part_size_for(size: int, base: int) -> int:
    """Part size for a file of ``size`` bytes: ``base``, doubled until it fits 10,000 parts."""
    ps = max(base, MIN_PART)
    while size > ps * MAX_PARTS:
        ps *= 2
    return ps


def _owner_mode(meta: dict[str, str]) -> tuple[str | None, ...]:
    """What of an object's metadata a chmod/chown changes. (The times are those of the
    upload's creation: later writes move them on every time.)"""
    return tuple(meta.get(k) for k in ("mode", "uid", "gid", "rdev"))


class _Changed(Exception):
    """The file changed too often during its upload; it is uploaded again."""


class Uploader:
    def __init__(self, store: StoreClient, index: Index, metrics: Metrics, files: FileTable,
                 local: LocalData, journal: Journal, sched: Scheduler, prefix: str, *,
                 part_size: int, dirty_limit: int, upload_delay: float,
                 on_uploaded: Callable[[DirtyFile, str], None],
                 release: Callable[[DirtyFile], None]) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics
        self.files = files
        self.local = local
        self.journal = journal
        self.sched = sched
        self.prefix = prefix
        self.part_size = part_size
        self.dirty_limit = dirty_limit
        self.upload_delay = upload_delay
        self.on_uploaded = on_uploaded
        self._release = release  # uploaded and closed: drop the local copy
        self.limiter = trio.CapacityLimiter(8)
        self.nursery: trio.Nursery | None = None  # set while WriteBack.run runs
        # Set by the filesystem: whether an object with this metadata must show it after a
        # listing (a symlink, an executable, ...). Such an object is uploaded as a one-part
        # multipart upload, whose ETag ("...-1") marks it in listings (storeview.tagged).
        self.tagged: Callable[[dict[str, str]], bool] = lambda meta: False

    # one upload of a file ----------------------------------------------------------------
    def start(self, f: DirtyFile) -> None:
        assert self.nursery is not None
        f.go(Phase.UPLOADING)
        self.nursery.start_soon(self._upload, f)

    async def _upload(self, f: DirtyFile) -> None:
        gen0 = f.gen
        release = False
        try:
            async with self.limiter:
                self.metrics.uploads_in_flight.inc()
                try:
                    gen = f.gen
                    with self.local.body(f) as (body, size):
                        release = await self._upload_body(f, gen, body, size)
                finally:
                    self.metrics.uploads_in_flight.dec()
        except _Changed as exc:
            log.info("%s; trying again", exc)
            self.sched.schedule(f, self.upload_delay)
        except StoreError as exc:
            if exc.code == "NoSuchUpload" and f.stream is not None:
                # Our multipart upload was aborted under us: start a new one.
                log.info("multipart upload of %s vanished; starting over", f.path)
                f.stream = None
                self.sched.schedule(f, self.upload_delay)
                return
            # Not retryable as such (e.g. AccessDenied): keep the data, try again later.
            self.metrics.uploads_failed.inc()
            log.error("upload of %s failed: %s; data kept locally, retrying in 30s", f.path, exc)
            self.sched.back_off(f)
        except OSError as exc:
            if f.gen != gen0:  # truncated while being read: not a disk problem
                log.info("%s changed during its upload; trying again", f.path)
                self.sched.schedule(f, self.upload_delay)
            else:
                self.metrics.uploads_failed.inc()
                log.error("upload of %s failed reading the cache: %s", f.path, exc)
                self.sched.back_off(f)
        except Exception:
            # A bug must not take the whole mount down: the data stays in the journal.
            self.metrics.uploads_failed.inc()
            log.exception("upload of %s failed unexpectedly; retrying in 30s", f.path)
            self.sched.back_off(f)
        finally:
            f.end_upload()
            if release and f.handles == 0 and f.phase is Phase.IDLE:
                self._release(f)
            self.sched.signal_progress()
            self.sched.update_gauges()

    async def _upload_body(self, f: DirtyFile, gen: int, body: Body, size: int) -> bool:
        """Upload f's content as of ``gen``; True if f is clean and closed now (its local
        copy can go)."""
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
                    return False
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
            return False
        # The store now holds this version at f.key, even if the file was unlinked during the
        # upload: whoever unlinks or replaces it must know there is an object to delete.
        f.base_etag = etag
        if f.deleted or self.files.get(f.path) is not f:
            return False  # unlinked during the upload: handled by that operation
        f.uploaded_gen = gen
        f.stream = None
        # The store now equals the local copy (unless it changed during the upload).
        f.touched, f.base_size = (set(), size) if f.gen == gen else (None, 0)
        self.metrics.uploads_done.inc()
        if f.clean:
            self.index.del_journal(f.fid)
            self.on_uploaded(f, etag)
            return f.handles == 0
        self.journal.write(f)
        if f.writers == 0:
            self.sched.schedule(f, self.upload_delay)
        return False

    async def _put(self, f: DirtyFile, body: Body, size: int, meta: dict[str, str],
                   cond: dict[str, Any]) -> str:
        """Our content at f.key (one PUT, or a multipart upload), under ``cond``."""
        if size < 2 * MIN_PART or (size < self.part_size and f.stream is None):
            if f.stream is not None:
                await self.abort(f.key, f.stream.upload_id)
                f.stream = None
            if self.tagged(meta):
                return await self._tagged_put(f.key, body, size, meta, cond)
            return await self.store.put_file(f.key, body, size, meta, **cond)
        return await self._multipart(f, size, meta, cond)

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
            await self.abort(key, upload_id)  # (after a crash, replay finds orphans)
            raise

    # multipart uploads -------------------------------------------------------------------
    async def _multipart(self, f: DirtyFile, size: int, meta: dict[str, str],
                         cond: dict[str, Any]) -> str:
        ps = part_size_for(size, self.part_size)
        while f.stream is not None and not f.stream.upload_id:
            ev = f.progress  # a streaming upload is being created: use it
            await ev.wait()
        st = f.stream
        if (st is None or not st.upload_id or st.part_size != ps
                or _owner_mode(st.meta) != _owner_mode(meta)):
            new_id = await self.store.create_multipart(f.key, meta)
            # Read f.stream only now: a streaming upload may have started meanwhile.
            old = f.stream
            if old is not None and old.upload_id:
                await self.abort(f.key, old.upload_id)
            st = f.stream = Stream(new_id, ps, f.key, meta=meta)
            self.journal.write(f)
        etags = await self._send_parts(f, st, size)
        try:
            return await self.store.complete_multipart(f.key, st.upload_id, etags, **cond)
        except PreconditionFailed:
            await self.abort(f.key, st.upload_id)
            f.stream = None
            raise

    async def _send_parts(self, f: DirtyFile, st: Stream, size: int) -> list[str]:
        """Every part of ``st`` for f's first ``size`` bytes sent; their ETags in order."""
        nparts = (size + st.part_size - 1) // st.part_size
        for _ in range(3):
            # Wait for parts already being sent, then send what is missing in parallel. A
            # write during the upload drops the parts it touched: they are sent again.
            while st.sending:
                ev = f.progress
                await ev.wait()
            todo = []
            for p in range(1, nparts + 1):
                length = min(st.part_size, size - (p - 1) * st.part_size)
                have = st.etags.get(p)
                if have is None or have[1] != length:
                    todo.append((p, length))
            if not todo:
                break
            try:
                async with trio.open_nursery() as n:
                    for p, length in todo:
                        n.start_soon(self._send_part, f, st, p, length)
            except* StoreError as eg:
                raise eg.exceptions[0] from None
            except* OSError as eg:  # (reading the data file: the caller tells which it is)
                raise eg.exceptions[0] from None
        else:
            raise _Changed(f"{f.path} kept changing during its upload")
        return [st.etags[p][0] for p in range(1, nparts + 1)]

    async def _send_part(self, f: DirtyFile, st: Stream, p: int, length: int) -> None:
        """Send part ``p`` of ``st``: from the local file, or - if the store object holds
        exactly those bytes (an unchanged range of a modified object) - copied server-side.
        A write to the part meanwhile leaves it unsent (it is sent again)."""
        gen = st.part_gen.get(p, 0)
        off = (p - 1) * st.part_size
        if (st.key == f.key and f.touched is not None and f.base_etag
                and off + length <= f.base_size
                and not any(c in f.touched
                            for c in range(off // CHUNK, (off + length - 1) // CHUNK + 1))):
            etag = await self.store.upload_part(st.key, st.upload_id, PartSource(
                p, None, off, length, copy_key=f.key, copy_etag=f.base_etag))
        else:
            with self.local.source(f) as path:
                etag = await self.store.upload_part(st.key, st.upload_id,
                                                    PartSource(p, path, off, length))
        if st.part_gen.get(p, 0) == gen:
            st.etags[p] = (etag, length)
        f.moved_on()
        self.sched.signal_progress()

    # parts sent while the file is written ------------------------------------------------
    def maybe_stream(self, f: DirtyFile, start: int, end: int) -> None:
        """Send full parts of a file being written sequentially, while it is written."""
        if f.stream_off or self.nursery is None or f.holding or f.deleted:
            return  # (a deleted file is never uploaded: nothing to stream)
        if start != f.last_write_end and f.stream is None:
            return  # not sequential: upload at close
        ps = part_size_for(end, self.part_size)
        if f.stream is None:
            if end < 2 * ps:
                return
            st = f.stream = Stream("", ps, f.key)
            self.nursery.start_soon(self._start_stream, f, st)
            return
        if f.stream.upload_id == "" or ps != f.stream.part_size:
            return
        backlog = STREAM_BACKLOG_PARTS * ps
        if self.dirty_limit:
            backlog = min(backlog, self.dirty_limit // 4)
        # parts 1..end // ps are complete if the writer moved past them; the newest wait
        self._stream_parts(f, f.stream, min(start, end - backlog) // ps)

    def stream_rest(self, f: DirtyFile) -> None:
        """The last writer closed f: its complete parts not sent yet go now, in parallel,
        instead of after upload_delay (which only the last part and the completion wait
        for), unless other files of its directory are being written (see
        ``Scheduler.in_batch``). A rewrite meanwhile drops the parts it touches: they are
        sent again."""
        st = f.stream
        if (st is None or not st.upload_id or self.nursery is None or f.holding or f.deleted
                or f.writers or f.uploading or part_size_for(f.attrs.size, self.part_size) != st.part_size):
            return
        if f.batched:
            return  # written with other files of its directory: the upload waits (DirBatches)
        self._stream_parts(f, st, f.attrs.size // st.part_size)

    def stream_rest_soon(self, f: DirtyFile) -> None:
        """The last writer closed f: a large file alone in its directory starts its complete
        parts ``ALONE_GRACE`` later (stream_rest), unless another file of the directory was
        created or closed meanwhile (a batch, see DirBatches). Files of a batch wait for
        their upload."""
        if f.batched and f.alone and self.nursery is not None:
            self.nursery.start_soon(self._after_grace, f, f.closed_at)
        else:
            self.stream_rest(f)

    async def _after_grace(self, f: DirtyFile, closed_at: float) -> None:
        await trio.sleep(ALONE_GRACE)
        if f.closed_at != closed_at or f.writers or f.deleted:
            return  # reopened (its next close decides) or gone
        if self.sched.batches.joined(f.path, closed_at):
            return  # the next file of a batch: f stays batched
        f.batched = False
        self.stream_rest(f)

    def _stream_parts(self, f: DirtyFile, st: Stream, last: int) -> None:
        """Start sending parts 1..``last`` of ``st`` that are neither sent nor being sent."""
        assert self.nursery is not None
        for p in range(1, last + 1):
            if p not in st.etags and p not in st.sending:
                st.sending.add(p)
                self.nursery.start_soon(self._stream_part, f, st, p, st.part_size)

    async def _start_stream(self, f: DirtyFile, st: Stream) -> None:
        if f.stream is not st:  # dropped (truncated, restarted) before this task ran
            f.moved_on()
            return
        try:
            try:
                st.meta = f.attrs.to_meta()
                st.upload_id = await self.store.create_multipart(st.key, st.meta)
            except StoreError as exc:
                log.warning("could not start a streaming upload of %s: %s", f.path, exc)
                if f.stream is st:
                    f.stream, f.stream_off = None, True
                return
            if f.stream is not st or f.key != st.key or f.deleted:  # renamed or retired
                if f.stream is st:
                    f.stream = None
                await self.abort(st.key, st.upload_id)
                return
        finally:
            f.moved_on()  # an upload waiting for this stream goes on
        self.journal.write(f)
        if f.writers:
            self.maybe_stream(f, f.last_write_end, f.last_write_end)
        else:
            self.stream_rest(f)  # closed while the upload was being created

    async def _stream_part(self, f: DirtyFile, st: Stream, p: int, length: int) -> None:
        try:
            await self._send_part(f, st, p, length)
        except (StoreError, OSError) as exc:  # OSError: the file shrank meanwhile
            log.warning("part %d of %s failed: %s (it will be sent at close)", p, f.path, exc)
        finally:
            st.sending.discard(p)
            f.moved_on()

    # when the store's object is not the version we started from --------------------------
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
        self.journal.write(f)
        self.sched.schedule(f, 0)

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
            st = Stream(await self.store.create_multipart(side, meta),
                        part_size_for(size, self.part_size), side)
            etags = await self._send_parts(f, st, size)
            etag = await self.store.complete_multipart(side, st.upload_id, etags)
        else:
            etag = await self.store.put_file(side, body, size, meta)
        # Our data is safe in the sibling; the path shows the store's version again.
        self.on_uploaded(f, "")
        if f.stream is not None and f.stream.upload_id:
            await self.abort(f.key, f.stream.upload_id)
        f.stream = None
        if not f.deleted:
            if self.files.get(f.path) is f:
                del self.files[f.path]
            f.path, f.key = side[len(self.prefix):], side
            f.touched = None
            self.files[f.path] = f
        return etag

    async def abort(self, key: str, upload_id: str) -> None:
        try:
            await self.store.abort_multipart(key, upload_id)
        except StoreError as exc:
            if exc.code != "NoSuchUpload":
                log.warning("could not abort multipart upload of %s: %s", key, exc)
