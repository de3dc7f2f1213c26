"""The pyfuse3 adapter: thin handlers that translate between FUSE and the filesystem parts.

Each handler only parses its arguments, calls into :mod:`.namespace`, :mod:`.reader` or
:mod:`.writeback`, and builds the reply. :func:`handler` is the one place that turns errors
into errno, counts and logs them; only ``pyfuse3.FUSEError`` leaves a handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .attrs import Attrs
from .cache import BlockCache
from .config import MountConfig
from .errors import FsError, StoreError
from .index import Index, ident_of
from .metrics import Metrics
from .namespace import Entry, Listing, Namespace, Node, tagged
from .reader import Fetcher, MemoryBudget, ObjRef, Readahead, Reader
from .records import DeleteOp, MkdirOp, RenameDirOp
from .store import ObjectStore, PartSource
from .store.client import GaveUp, StoreClient
from .writeback import DirtyFile, WriteBack

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
MAX_TTL = 365 * 86400.0
MAX_KEY = 1024  # S3's limit on object keys, in UTF-8 bytes
MAX_TAGGED_COPY = 5 << 30
# How long queued DELETEs wait for more to batch with, unless something waits for them
# (rmdir, ...). rm -rf of 10 x 100 files sent 152 batches with 5 ms on a loaded machine.
DELETE_GATHER = 0.05  # one UploadPartCopy moves at most 5 GiB
RENAME_NOREPLACE = getattr(pyfuse3, "RENAME_NOREPLACE", 1)
RENAME_EXCHANGE = getattr(pyfuse3, "RENAME_EXCHANGE", 2)


def handler(fn: F) -> F:
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Filesystem, *args: Any) -> Any:
        m = self.metrics
        count, latency = m.op(op)
        count.inc()
        t0 = time.monotonic()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            m.fuse_errors.labels(op, errno.errorcode.get(exc.errno, "?")).inc()
            raise
        except FsError as exc:
            err = exc.errno
        except StoreError as exc:
            err = exc.errno
            log.warning("%s: store error %s", op, exc)
        except OSError as exc:
            err = exc.errno or errno.EIO
            log.warning("%s: %s", op, exc.strerror)
        except Exception:
            log.exception("%s failed unexpectedly", op)
            err = errno.EIO
        finally:
            latency.observe(time.monotonic() - t0)
        m.fuse_errors.labels(op, errno.errorcode.get(err, "?")).inc()
        raise pyfuse3.FUSEError(err)
    return wrapper  # type: ignore[return-value]


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[str, Node]] | None = None


@dataclass
class Handle:
    node: Node
    writable: bool
    obj: ObjRef | None  # the store version read by this handle (None: local file)
    ra: Readahead
    dirty: DirtyFile | None = None


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, "object keys must be UTF-8") from None


class Filesystem(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, cfg: MountConfig, store: ObjectStore, index: Index,
                 metrics: Metrics | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.index = index
        self.client = StoreClient(store, self.metrics, cfg.parallel, cfg.read_timeout,
                                  cfg.parallel_max)
        self.cache = BlockCache(cfg.cache_dir, index, self.metrics, cfg.cache_size,
                                cfg.block_size, cfg.chunk_size)
        self.budget = MemoryBudget(cfg.memory_limit, self.metrics)
        self.fetcher = Fetcher(self.client, self.cache, self.metrics, self.budget,
                               cfg.max_request)
        self.reader = Reader(self.cache, self.fetcher, self.metrics, cfg.readahead_max)
        self.wb = WriteBack(self.client, index, self.metrics, cfg.cache_dir, cfg.source.prefix,
                            part_size=cfg.part_size, dirty_limit=cfg.dirty_limit,
                            upload_delay=cfg.upload_delay, fsync_local=cfg.fsync == "local",
                            on_uploaded=self._uploaded)
        self.ns = Namespace(cfg, self.client, index, self.metrics, self.wb)
        self.wb.tagged = self.ns.needs_tag
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        # Stored files unlinked while open for reading: ino -> (ops id, path, key, etag).
        # The DELETE waits for the last close so the open handles keep reading.
        self.deferred: dict[int, tuple[int, str, str, str]] = {}
        self._next_fh = 1
        self.ttl = min(cfg.entry_ttl, MAX_TTL)
        self.initialized = trio.Event()
        # Unlinked stored files whose DELETE is queued (sent in batches): path -> (ops id,
        # key, etag). Their names are hidden meanwhile; the ops entry finishes them after a
        # crash.
        self.doomed: dict[str, tuple[int, str, str]] = {}
        self._doomed_kick = trio.Event()
        self._doomed_hurry = trio.Event()  # someone waits for them: no more gathering
        self._deleting = 0  # batches in flight
        self._deleted = trio.Event()  # set (and replaced) whenever a batch ends

    # lifecycle ---------------------------------------------------------------------------
    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT arrived (settings made earlier, such as
        the mount's readahead, are clamped by the INIT exchange)."""
        self.initialized.set()

    async def start(self, nursery: trio.Nursery) -> int:
        """Start background work in the caller's nursery; replay the journal."""
        self.fetcher.nursery = nursery
        await nursery.start(self.wb.run)
        nursery.start_soon(self._housekeeping)
        nursery.start_soon(self._delete_batches)
        for oid, op in self.index.all_ops().items():
            if isinstance(op, DeleteOp):  # an unlink whose last close the crash prevented
                await self._delete_version(op.key, op.etag, oid)
            elif isinstance(op, MkdirOp) and op.key.startswith(self.ns.prefix):
                # A directory whose marker the crash kept from the store.
                path = op.key[len(self.ns.prefix):].rstrip("/")
                self.wb.mkdir(path, op.key, op.meta,
                              time.time() if op.mtime is None else op.mtime, oid)
        ops = {oid: op for oid, op in self.index.all_ops().items()
               if isinstance(op, RenameDirOp)}
        if ops:
            await self.wb.settle_markers("")  # the moves below copy what the store holds
        for op in ops.values():  # local files the crash left under the old name move too
            await self.wb.rekey_journal(op.src, op.dst)
        # What is journaled now is newer than the store's objects of the old names (replayed
        # uploads may land, and leave the table, before the moves below copy those).
        journaled = {j.key for j in self.index.all_journal().values() if not j.deleted}
        n = await self.wb.replay()
        for oid, op in ops.items():
            log.info("resuming rename of %s to %s", op.src, op.dst)
            await self._move_prefix(op.src, op.dst, oid, journaled)
        return n

    async def _delete_version(self, key: str, etag: str, oid: int) -> bool:
        """Delete ``key`` if it still is version ``etag``; a failure leaves the ops entry
        for the next mount (and returns False)."""
        try:
            try:
                info = await self.client.head(key)
            except StoreError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                if info.etag == etag:
                    await self.client.delete(key, patient=False)
        except StoreError as exc:
            log.warning("deferred delete of %s failed (%s); retried at the next mount", key, exc)
            return False
        self.index.del_op(oid)
        return True

    def _defer_delete(self, n: Node, etag: str) -> None:
        oid = self.index.next_id()
        key = self.ns.key(n.path)
        self.index.put_op(oid, DeleteOp(key, etag))
        self.deferred[n.ino] = (oid, n.path, key, etag)
        self.ns.hidden[n.path] = etag

    async def _finish_delete(self, ino: int) -> None:
        oid, path, key, etag = self.deferred.pop(ino)
        await self._delete_version(key, etag, oid)
        if self.ns.hidden.get(path) == etag:
            del self.ns.hidden[path]

    def _queue_delete(self, path: str, key: str, etag: str) -> None:
        """unlink of a stored file: its DELETE joins the next batch (DeleteObjects, up to
        1,000 keys). `rm -rf` of a tree paid a DELETE round trip per file; now a directory's
        files go in one request, sent before its rmdir returns."""
        oid = self.index.next_id()
        self.index.put_op(oid, DeleteOp(key, etag), sync=False)
        self.doomed[path] = (oid, key, etag)
        self.ns.hidden[path] = etag
        self._doomed_kick.set()

    async def _delete_batches(self) -> None:
        while True:
            await self._doomed_kick.wait()
            self._doomed_kick = trio.Event()
            with trio.move_on_after(DELETE_GATHER):
                await self._doomed_hurry.wait()
            self._doomed_hurry = trio.Event()
            while self.doomed:
                batch = dict(list(self.doomed.items())[:1000])
                for p in batch:
                    del self.doomed[p]
                self._deleting += 1
                try:
                    await self._send_deletes(batch)
                finally:
                    self._deleting -= 1
                    self._deleted.set()
                    self._deleted = trio.Event()

    async def _send_deletes(self, batch: dict[str, tuple[int, str, str]]) -> None:
        keys = [k for _, k, _ in batch.values()]
        try:
            failed = set(await self.client._run(
                "delete_many", self.client.store.delete_many, keys,  # type: ignore[attr-defined]
                limiter=self.client.write_limiter, deadline=self.client.read_timeout))
        except StoreError as exc:
            # (A store that does not know DeleteObjects answers at once: one by one then.)
            if isinstance(exc, GaveUp):
                log.warning("batch delete of %d objects failed (%s); retried at the next "
                            "mount", len(keys), exc)
                return
            log.warning("batch delete of %d objects failed (%s); deleting one by one",
                        len(keys), exc)
            failed = set(keys)
        for path, (oid, key, etag) in batch.items():
            if key in failed and not await self._delete_version(key, etag, oid):
                # The store keeps failing (bounded: rmdir and the others wait for this):
                # the name stays hidden here, the ops entry retries it at the next mount.
                continue
            if key not in failed:
                self.index.del_op(oid)
            if self.ns.hidden.get(path) == etag:
                del self.ns.hidden[path]

    async def settle_deletes(self, prefix: str | None = None) -> None:
        """Wait until queued DELETEs (of keys under ``prefix``, or all) are sent."""
        def pending() -> bool:
            return any(prefix is None or k.startswith(prefix)
                       for _, k, _ in self.doomed.values()) or self._deleting > 0
        while pending():
            self._doomed_kick.set()
            self._doomed_hurry.set()
            await self._deleted.wait()

    async def _claim(self, path: str) -> None:
        """A name is being reused: a deferred delete of the old object there happens now
        (handles still open on it may then fail to read what is not cached)."""
        if path in self.doomed or self._deleting:
            await self.settle_deletes(self.ns.key(path))
        if path in self.ns.hidden:
            for ino, d in list(self.deferred.items()):
                if d[1] == path:
                    await self._finish_delete(ino)

    async def _housekeeping(self) -> None:
        gone = False
        while True:
            await trio.sleep(2)
            self.cache.flush_atimes()
            if not gone and not self.wb.dir.is_dir():
                gone = True
                log.error("the cache directory %s was deleted under the live mount: files "
                          "written so far still upload (from their open descriptors); new "
                          "files over %d bytes fail with EIO and nothing is cached until "
                          "remounted", self.wb.dir.parent, self.wb.inline_max)

    def _uploaded(self, f: DirtyFile, etag: str) -> None:
        if not etag:  # went to a conflict sibling: forget our view of the path
            self.ns.listings.pop(self.ns.parent_of(f.path), None)
            return
        e = Entry(False, f.attrs.size, etag, f.attrs.mtime, f.attrs.to_meta())
        self.index.put_meta(ident_of(self.cfg.source.bucket, f.key, etag), e.meta or {})
        self.ns.set_entry(f.path, e)

    def _check_rw(self) -> None:
        if self.cfg.ro:
            raise FsError(errno.EROFS)

    def _dirty_of(self, n: Node, fh: int | None = None) -> DirtyFile | None:
        """The local file behind a node: by path while the node still owns its path; once it
        was unlinked or replaced by a rename while open, through a handle open on it."""
        if n.is_dir:
            return None
        h = self.handles.get(fh) if fh is not None else None
        if h is not None and h.node is n and h.dirty is not None:
            return h.dirty
        if self.ns.attached(n):
            f = self.wb.files.get(n.path)
            return f if f is not None and not f.deleted else None
        for h in self.handles.values():
            if h.node is n and h.dirty is not None:
                return h.dirty
        return None

    def _attrs_of(self, n: Node) -> Attrs:
        f = self._dirty_of(n)
        return f.attrs if f is not None else n.attrs

    def _entry(self, n: Node) -> pyfuse3.EntryAttributes:
        a = self._attrs_of(n)
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.generation = 0
        e.entry_timeout = self.ttl
        e.attr_timeout = self.ttl
        e.st_mode = a.mode
        e.st_nlink = 2 if n.is_dir else 1
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_size = 0 if n.is_dir else a.size
        e.st_rdev = a.rdev
        e.st_blksize = 1 << 20
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _new_path(self, parent: str, name: str, is_dir: bool = False) -> str:
        """The path of a name about to be created; its object key must fit S3's 1,024 bytes
        (a longer one could never be uploaded and would stay dirty for ever)."""
        path = self.ns.join(parent, name)
        key = self.ns.dir_key(path) if is_dir else self.ns.key(path)
        if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY:
            raise FsError(errno.ENAMETOOLONG, f"object key would exceed {MAX_KEY} bytes")
        return path

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # lookups and attributes --------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        parent = self.ns.node(parent_inode)
        sname = _name(name)
        if sname == ".":
            n = parent
        elif sname == "..":
            n = self.ns.node(self.ns.by_path.get(self.ns.parent_of(parent.path), 1))
        else:
            n = await self.ns.lookup(parent, sname)  # (the kernel gets its attributes)
        n.lookups += 1
        return self._entry(n)

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self.ns.node(inode))

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._check_rw()
        n = self.ns.node(inode)
        f = self._dirty_of(n, fh)
        a = f.attrs if f is not None else n.attrs
        new = a.copy()
        if fields.update_mode:
            new.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            new.uid = attr.st_uid
        if fields.update_gid:
            new.gid = attr.st_gid
        if fields.update_mtime:
            new.mtime_ns = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            new.ctime_ns = attr.st_ctime_ns
        # The kernel (writeback cache) flushes its own mtime/ctime after writes, renames and
        # fsyncs. What is stored is mode/uid/gid and the times to the nanosecond (git compares
        # them). A change of ctime alone (the kernel's flush after a rename, say) is not worth
        # a request: it goes with the next upload of a dirty file, and on a clean object it
        # stays in this mount (a CopyObject per rename would double its cost).
        changed = (new.mode, new.uid, new.gid, new.mtime_ns) != (a.mode, a.uid, a.gid,
                                                                   a.mtime_ns)
        if not fields.update_size and not changed:
            a.ctime_ns = new.ctime_ns
            if f is not None and not f.clean and self.ns.attached(n):
                self.wb.journal(f)
            return self._entry(n)
        if not self.ns.attached(n):
            # Unlinked (or replaced by a rename) while open: the name is gone, so only the
            # open file's own attributes change; nothing is written to the store.
            if fields.update_size and f is not None:
                await self.wb.truncate(f, attr.st_size)
            a.mode, a.uid, a.gid = new.mode, new.uid, new.gid
            a.mtime_ns, a.ctime_ns = new.mtime_ns, new.ctime_ns
            return self._entry(n)
        if n.is_dir:
            # (The root has no marker of its own; a directory made here whose marker is
            # not sent yet sends these attributes with it.)
            if n.path and not await self.wb.set_marker_meta(n.path, new.to_meta(), new.mtime):
                await self.client.put_file(self.ns.dir_key(n.path), None, 0, new.to_meta(),
                                           patient=False)
            n.attrs = new
            n.entry.meta = new.to_meta()
            n.entry.marker = n.entry.marker or bool(n.path)
            return self._entry(n)
        if fields.update_size:
            if f is None:
                f = await self._dirty_copy(n, keep_content=attr.st_size > 0)
            await self.wb.truncate(f, attr.st_size)
        if f is not None:
            f.attrs.mode, f.attrs.uid, f.attrs.gid = new.mode, new.uid, new.gid
            if fields.update_mtime:
                f.attrs.mtime_ns = new.mtime_ns
            if getattr(fields, "update_ctime", False):
                f.attrs.ctime_ns = new.ctime_ns
            f.gen += 1
            if f.writers == 0:
                self.wb.schedule(f, self.cfg.upload_delay)
            self.wb.journal(f)
        else:
            # Metadata only: a server-side copy onto itself, no data moves.
            if not n.entry.etag:
                # Not known yet: uploaded under this name while a rename was moving the
                # inode here. The store knows (ENOENT if it really is not there).
                n.validated = float("-inf")
                await self.ns.revalidate(n)
            if not n.entry.etag:
                raise FsError(errno.ENOENT)
            etag = await self._copy(self.ns.key(n.path), self.ns.key(n.path), new.to_meta(),
                                    n.entry.size, n.entry.etag)
            e = Entry(False, n.entry.size, etag, new.mtime, new.to_meta())
            # The copy keeps the content, so usually the ETag too: the metadata remembered
            # for this ETag must be replaced, or the next listing brings the old back.
            self.index.put_meta(ident_of(self.cfg.source.bucket, self.ns.key(n.path), etag),
                                new.to_meta())
            self.ns.set_entry(n.path, e)
            n.entry, n.attrs = e, new
            n.attrs.size = e.size
        return self._entry(n)

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        n = self.ns.node(inode)
        if not stat.S_ISLNK(self._attrs_of(n).mode):
            raise FsError(errno.EINVAL)
        f = self._dirty_of(n)
        if f is not None:
            return self.wb.read(f, f.size, 0)
        obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag, n.entry.size)
        return await self.reader.read(obj, self.reader.new_readahead(), 0, obj.size)

    @handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.ns.forget(ino, count)

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        # An object store has no fixed size: report 1 PiB, with what is free locally
        # for dirty data folded in as 'available'.
        total = (1 << 50) // 4096
        s.f_blocks = total
        s.f_bfree = s.f_bavail = total - (self.wb.dirty_bytes() // 4096)
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # directories -------------------------------------------------------------------------
    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        n = self.ns.node(inode)
        if not n.is_dir:
            raise FsError(errno.ENOTDIR)
        fh = self._new_fh()
        self.dir_handles[fh] = DirHandle(n)
        return fh

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Directories made below it here whose markers are not in the store yet land now
        # (every other directory operation reached the store before it returned).
        await self.wb.settle_markers(self.dir_handles[fh].node.path)
        await self.settle_deletes(self.ns.dir_key(self.dir_handles[fh].node.path))

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.dir_handles[fh]
        if start_id == 0 or d.entries is None:
            d.entries = await self.ns.readdir(d.node)
        entries = d.entries
        for i in range(start_id, len(entries)):
            name, n = entries[i]
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"),
                                         self._entry(n), i + 1):
                return
            n.lookups += 1

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        self._check_rw()
        parent = self.ns.node(parent_inode)
        path = self._new_path(parent.path, _name(name), is_dir=True)
        await self._must_not_exist(parent, _name(name))
        await self._claim(path)
        attrs = Attrs(stat.S_IFDIR | (mode & 0o7777 & ~ctx.umask), ctx.uid, ctx.gid, time.time())
        # The marker object is PUT in the background (a PUT per mkdir made `cp -r` and
        # `git checkout` wait ~4 ms per directory); until then the directory is local.
        self.wb.mkdir(path, self.ns.dir_key(path), attrs.to_meta(), attrs.mtime)
        e = Entry(True, mtime=attrs.mtime, meta=attrs.to_meta(), marker=True)
        self.ns.set_entry(path, e)
        self.ns.listings[path] = Listing({}, time.monotonic())
        n = self.ns.node_for(path, e)
        n.lookups += 1
        return self._entry(n)

    async def _must_not_exist(self, parent: Node, name: str) -> None:
        try:
            await self.ns.lookup(parent, name, want_meta=False)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        raise FsError(errno.EEXIST)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_rw()
        parent = self.ns.node(parent_inode)
        try:
            n = await self.ns.lookup(parent, _name(name), want_meta=False)
        except FsError as exc:
            # A directory without a marker object vanishes from the store with its last
            # entry while the kernel still shows it (rm -r unlinks the children first): it
            # is removed already.
            known = self.ns.nodes.get(self.ns.by_path.get(self.ns.join(parent.path,
                                                                       _name(name)), 0))
            if exc.errno == errno.ENOENT and known is not None and known.is_dir:
                self.ns.drop_path(known.path)
                return
            raise
        if not n.is_dir:
            raise FsError(errno.ENOTDIR)
        # Files unlinked below it leave the store before it does (else its prefix, listed
        # by a parent's listing, would bring it back for a moment).
        await self.settle_deletes(self.ns.dir_key(n.path))
        if (self.wb.under(n.path) or self.wb.markers_below(n.path)
                or await self.ns.list_dir(n.path, force=True)):
            raise FsError(errno.ENOTEMPTY)
        if not await self.wb.rmdir(n.path):  # (True: its marker was never sent)
            await self.client.delete(self.ns.dir_key(n.path), patient=False)
        self.ns.drop_path(n.path)

    # files -------------------------------------------------------------------------------
    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_rw()
        parent = self.ns.node(parent_inode)
        sname = _name(name)
        path = self._new_path(parent.path, sname)
        await self._claim(path)
        base = None
        try:
            existing = await self.ns.lookup(parent, sname, want_meta=False)
            if existing.is_dir:
                raise FsError(errno.EISDIR)
            base = existing.entry.etag or None
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        attrs = Attrs(stat.S_IFREG | (mode & 0o7777 & ~ctx.umask), ctx.uid, ctx.gid,
                      time.time())
        f = await self.wb.create(path, attrs, base_etag=base)
        n = self.ns.node_for(path, Entry(False, 0, base or "", attrs.mtime, attrs.to_meta()))
        self.ns.negative.pop(path, None)
        self._add_to_listing(path, f)
        n.lookups += 1
        fh = self._new_fh()
        self.handles[fh] = Handle(n, True, None, self.reader.new_readahead(), f)
        self.wb.opened(f, True)
        return pyfuse3.FileInfo(fh=fh), self._entry(n)

    def _add_to_listing(self, path: str, f: DirtyFile) -> None:
        self.ns.set_entry(path, Entry(False, f.size, f.base_etag or "", f.attrs.mtime,
                                      f.attrs.to_meta()))

    async def _dirty_copy(self, n: Node, keep_content: bool) -> DirtyFile:
        """Turn a clean store file into a local dirty file (content fetched if kept)."""
        await self.ns.revalidate(n)
        obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag, n.entry.size)

        async def fill(fd: int) -> None:
            ra = self.reader.new_readahead()
            off = 0
            while off < obj.size:
                data = await self.reader.read(obj, ra, off, 4 << 20)
                await trio.to_thread.run_sync(os.pwrite, fd, data, off)
                off += len(data)
        attrs = n.attrs.copy()
        attrs.size = n.entry.size
        return await self.wb.open_existing(n.path, n.entry.etag, attrs,
                                           fill if keep_content else None)

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        n = self.ns.node(inode)
        if n.is_dir:
            raise FsError(errno.EISDIR)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._check_rw()
        f = self.wb.files.get(n.path)
        if f is not None and f.deleted:
            f = None
        if f is None and (writable or flags & os.O_TRUNC):
            f = await self._dirty_copy(n, keep_content=not flags & os.O_TRUNC)
        elif f is not None and flags & os.O_TRUNC:
            await self.wb.truncate(f, 0)
        obj = None
        if f is None:
            # No revalidation here: the lookup before open did it (entry_ttl), and a new
            # store version is a new inode, so this inode's page cache is always valid -
            # except after a rename moved the inode (Namespace.move): the kernel keeps its
            # dentries and sends no lookup, and the ETag the node holds may be the one the
            # move copied while an upload landed under the new name (a read then met 412,
            # ESTALE: test_directory_rename_keeps_changes_uploaded_during_the_move).
            if n.validated == float("-inf"):
                await self.ns.revalidate(n)
            obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag,
                         n.entry.size)
        fh = self._new_fh()
        self.handles[fh] = Handle(n, writable, obj, self.reader.new_readahead(), f)
        if f is not None:
            self.wb.opened(f, writable)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        # A handle opened on the store version still sees what another handle wrote to the
        # same inode (a newer store version is another inode, which _dirty_of keeps apart).
        f = h.dirty or self._dirty_of(h.node)
        if f is not None:
            return self.wb.read(f, size, off)
        assert h.obj is not None
        n = h.node
        if n.entry.etag and n.entry.etag != h.obj.etag and self.ns.attached(n):
            # This inode was written through this mount (another store version would be
            # another inode) and its upload replaced the version the handle started on.
            h.obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag,
                           n.entry.size)
        return await self.reader.read(h.obj, h.ra, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if h.dirty is None:
            raise FsError(errno.EBADF)
        return await self.wb.write(h.dirty, off, buf)

    async def flush(self, fh: int) -> None:
        # close does not wait for the upload (DESIGN: fsync does), so a FLUSH has nothing to
        # do. ENOSYS makes the kernel stop sending it: one round trip fewer per close(). The
        # kernel still writes its cached pages back first and reports their errors to close.
        self.metrics.op("flush")[0].inc()  # (tests check it is sent once per mount)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        if h.dirty is not None:
            await self.wb.fsync(h.dirty)

    @handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h.dirty is not None:
            self.wb.released(h.dirty, h.writable)
        if h.node.ino in self.deferred and not any(
                o.node is h.node for o in self.handles.values()):
            await self._finish_delete(h.node.ino)

    # names -------------------------------------------------------------------------------
    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_rw()
        parent = self.ns.node(parent_inode)
        n = await self.ns.lookup(parent, _name(name), want_meta=False)
        if n.is_dir:
            raise FsError(errno.EISDIR)
        f = await self.wb.unlink(n.path)
        store_etag = n.entry.etag or (f.base_etag if f else None)
        if store_etag and f is None and any(h.node is n for h in self.handles.values()):
            # Open for reading from the store: delete at the last close, hide the name now.
            self._defer_delete(n, store_etag)
        elif store_etag and self.cfg.unlink == "batch":
            self._queue_delete(n.path, self.ns.key(n.path), store_etag)
        elif store_etag:
            await self.client.delete(self.ns.key(n.path), patient=False)
        self.ns.set_entry(n.path, None)
        self.ns.by_path.pop(n.path, None)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._check_rw()
        parent = self.ns.node(parent_inode)
        sname = _name(name)
        await self._must_not_exist(parent, sname)
        path = self._new_path(parent.path, sname)
        await self._claim(path)
        attrs = Attrs(stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, time.time())
        f = await self.wb.create(path, attrs)
        await self.wb.write(f, 0, target)
        self.wb.schedule(f, self.cfg.upload_delay)
        self._add_to_listing(path, f)
        n = self.ns.node_for(path, Entry(False, len(target), "", attrs.mtime, attrs.to_meta()))
        n.lookups += 1
        return self._entry(n)

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        """A fifo, a unix socket's name, or a device node: an empty object whose
        x-amz-meta-mode carries the type (and x-amz-meta-rdev a device's number), as s3fs
        stores them. The kernel makes them work (pipes, sockets) while the mount lives."""
        self._check_rw()
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG):
            raise FsError(errno.EINVAL)
        parent = self.ns.node(parent_inode)
        sname = _name(name)
        await self._must_not_exist(parent, sname)
        path = self._new_path(parent.path, sname)
        await self._claim(path)
        attrs = Attrs(kind | (mode & 0o7777 & ~ctx.umask), ctx.uid, ctx.gid, 0.0,
                      mtime_ns=time.time_ns(), rdev=rdev if kind in (stat.S_IFCHR,
                                                                    stat.S_IFBLK) else 0)
        f = await self.wb.create(path, attrs)
        self.wb.schedule(f, self.cfg.upload_delay)
        self._add_to_listing(path, f)
        n = self.ns.node_for(path, Entry(False, 0, "", attrs.mtime, attrs.to_meta()))
        n.lookups += 1
        return self._entry(n)

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.ENOTSUP, "hard links are not supported on object storage")

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._check_rw()
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent = self.ns.node(parent_inode_old)
        new_parent = self.ns.node(parent_inode_new)
        src_name, dst_name = _name(name_old), _name(name_new)
        n = await self.ns.lookup(old_parent, src_name, want_meta=False)
        src = n.path
        dst = self._new_path(new_parent.path, dst_name, is_dir=n.is_dir)
        if src == dst:
            return
        await self._claim(dst)
        try:
            target: Node | None = await self.ns.lookup(new_parent, dst_name,
                                                             want_meta=False)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            target = None
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target.is_dir and not n.is_dir:
                raise FsError(errno.EISDIR)
            if n.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and (self.wb.under(dst) or self.wb.markers_below(dst)
                                  or await self.ns.list_dir(dst, force=True)):
                raise FsError(errno.ENOTEMPTY)
        if n.is_dir:
            if dst.startswith(src + "/"):
                raise FsError(errno.EINVAL)
            if target is not None and not await self.wb.rmdir(dst):
                await self.client.delete(self.ns.dir_key(dst), patient=False)
            await self._rename_dir(src, dst)
        else:
            await self._rename_file(n, src, dst, target)
        self.ns.set_entry(src, None)
        self.ns.move(src, dst)
        moved = self.ns.nodes.get(self.ns.by_path.get(dst, 0))
        if moved is not None:
            self.ns.set_entry(dst, moved.entry)

    async def _rename_file(self, n: Node, src: str, dst: str, target: Node | None) -> None:
        dst_etag = target.entry.etag if target is not None and target.entry.etag else None
        # wb.rename waits for an upload of src in flight and says what the store holds at src.
        moved, src_etag = await self.wb.rename(src, dst, dst_etag)
        if moved:
            src_in_store = bool(src_etag)
        else:
            src_in_store = bool(n.entry.etag)
            # A local file at dst goes first: its upload must not land after the copy.
            await self.wb.unlink(dst)
            etag = await self._copy(self.ns.key(src), self.ns.key(dst), None, n.entry.size,
                                    n.entry.etag, known=n.entry.meta)
            n.entry = Entry(False, n.entry.size, etag, n.entry.mtime, n.entry.meta)
        if src_in_store:
            await self.client.delete(self.ns.key(src), patient=False)

    async def _copy(self, src: str, dst: str, meta: dict[str, str] | None, size: int,
                    src_etag: str, patient: bool = False,
                    known: dict[str, str] | None = None) -> str:
        """CopyObject ``src`` to ``dst`` (``meta``: new metadata, None: the source's, which
        is ``known`` if given), keeping what a listing shows: a copy of an object that needs
        the tag (see ``Namespace.needs_tag``) is made as a one-part multipart copy, whose
        ETag carries the mark (a CopyObject would make it a plain one)."""
        want = meta if meta is not None else known
        if tagged(src_etag) or (want is not None and self.ns.needs_tag(want)):
            if want is None:
                want = (await self.client.head(src)).metadata or {}
            if self.ns.needs_tag(want) and size <= MAX_TAGGED_COPY:
                return await self._copy_tagged(src, dst, want, size)
        return await self.client.copy(src, dst, meta, size, patient=patient)

    async def _copy_tagged(self, src: str, dst: str, meta: dict[str, str], size: int) -> str:
        upload_id = await self.client.create_multipart(dst, meta)
        try:
            part = (PartSource(1, None, 0, size, copy_key=src) if size
                    else PartSource(1, None, 0, 0, data=b""))
            etag = await self.client.upload_part(dst, upload_id, part)
            return await self.client.complete_multipart(dst, upload_id, [etag])
        except StoreError:
            try:
                await self.client.abort_multipart(dst, upload_id)
            except StoreError:
                pass
            raise

    async def _rename_dir(self, src: str, dst: str) -> None:
        await self.wb.settle_markers(src)  # the move copies what the store holds
        await self.settle_deletes(self.ns.dir_key(src))  # ... and must not copy unlinked files
        oid = self.index.next_id()
        src_key, dst_key = self.ns.dir_key(src), self.ns.dir_key(dst)
        self.index.put_op(oid, RenameDirOp(src_key, dst_key))
        moved: set[str] = set()
        for f in self.wb.under(src):
            new = dst + f.path[len(src):]
            if (await self.wb.rename(f.path, new, None))[0]:
                moved.add(self.ns.key(new))
        await self._move_prefix(src_key, dst_key, oid, moved)

    async def _move_prefix(self, src_key: str, dst_key: str, oid: int,
                           local_keys: set[str] | frozenset[str] = frozenset()) -> None:
        """Copy every object under src_key to dst_key, then delete it. Idempotent, so a
        crash in the middle is resumed at the next mount from the journal's ops entry.

        ``local_keys``: destination keys that local files moved to; their objects at
        src_key are older than them and only deleted. (Checking the local files at copy
        time is not enough: one may have uploaded and left the table meanwhile, and the
        copy would overwrite its new content with the old.)"""
        while True:
            page = await self.client.list(src_key, None, None, 1000)
            if not page.objects:
                break
            limiter = trio.CapacityLimiter(16)
            local = set(local_keys) | {f.key for f in self.wb.files.values() if not f.deleted}

            async def move(o: Any, limiter: trio.CapacityLimiter = limiter,
                           local: set[str] = local) -> None:
                dst = dst_key + o.key[len(src_key):]
                async with limiter:
                    if dst in local:
                        pass  # a local file took this name: it uploads its whole content
                    elif o.key.endswith("/"):
                        # A directory marker: re-created by a PUT (SeaweedFS, for one, refuses
                        # CopyObject of a key ending in '/').
                        try:
                            meta = (await self.client.head(o.key)).metadata or {}
                        except StoreError as exc:
                            if exc.errno != errno.ENOENT:
                                raise
                            meta = {}
                        await self.client.put_file(dst, None, 0, meta)
                    else:
                        try:
                            await self._copy(o.key, dst, None, o.size, o.etag, patient=True)
                        except StoreError as exc:
                            if exc.errno != errno.ENOENT:
                                raise
                            return  # deleted meanwhile: nothing to move
                    await self.client.delete(o.key)
            async with trio.open_nursery() as nursery:
                for o in page.objects:
                    nursery.start_soon(move, o)
        self.index.del_op(oid)
