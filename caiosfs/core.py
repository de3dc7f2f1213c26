"""The filesystem itself, without FUSE: plain async methods on inode numbers, names (str),
flags and :class:`~caiosfs.attrs.Attrs`, returning nodes, handle numbers and bytes, and
raising :class:`~caiosfs.errors.FsError` for an errno.

:mod:`.fs` adapts it to pyfuse3; tests drive it directly on the in-memory store. It is built
from its parts (:func:`caiosfs.compose.build_core` wires the usual ones): the store client, the block cache
and reader, the write-back, the namespace, and the two protocols it delegates to,
:mod:`.renames` and :mod:`.deletes`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .attrs import Attrs
from .cache import BlockCache
from .config import MountConfig
from .copies import copy_object
from .deletes import Deletes
from .dirattrs import DirAttrs
from .errors import FsError, StoreError
from .handles import Files
from .index import Index, ident_of
from .inodes import Node
from .metrics import Metrics
from .namespace import Namespace
from .reader import Fetcher, ObjRef, Reader
from .records import DeleteOp, MkdirOp
from .renames import RENAME_EXCHANGE, Renames, new_path
from .store.client import StoreClient
from .storeview import Entry, Listing
from .writeback import DirtyFile, WriteBack

log = logging.getLogger(__name__)
MAX_TTL = 365 * 86400.0


@dataclass(frozen=True)
class Caller:
    """Who asks: the owner of what is created, and the umask that applies."""
    uid: int
    gid: int
    umask: int = 0


@dataclass
class AttrChange:
    """What a setattr changes; None: unchanged. ``mode`` without its type bits."""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class FsStats:
    blocks: int
    free: int  # both in units of BLOCK
    files: int = 1 << 32
    namemax: int = 255


STAT_BLOCK = 4096


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[str, Node]] | None = None


@dataclass(eq=False)
class Core:
    """The filesystem, from its parts (see the module's docstring)."""
    cfg: MountConfig
    index: Index
    metrics: Metrics
    client: StoreClient
    cache: BlockCache
    fetcher: Fetcher
    reader: Reader
    wb: WriteBack
    ns: Namespace

    def __post_init__(self) -> None:
        self.wb.on_uploaded = self._uploaded
        self.deletes = Deletes(self.client, self.index, self.ns)
        self.renames = Renames(self.client, self.index, self.ns, self.wb, self.deletes)
        self.files = Files(self.cfg, self.ns, self.wb, self.reader, self.deletes)
        self.dir_handles: dict[int, DirHandle] = {}
        self.ttl = min(self.cfg.entry_ttl, MAX_TTL)
        # Per-directory attribute records (dirattrs.py): read by listings, written here.
        self.dirattrs = DirAttrs(self.client, self.ns.prefix, self.cfg.dirattrs,
                                 self.ns.view.fresh_files)
        self.ns.view.use_records(self.dirattrs)

    # lifecycle ---------------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> int:
        """Start background work in the caller's nursery; replay the journal and finish
        what a crash interrupted. Returns how many files the replay will upload."""
        self.fetcher.nursery = nursery
        self.ns.view.trees.nursery = nursery
        await nursery.start(self.wb.run)
        nursery.start_soon(self._housekeeping)
        nursery.start_soon(self.deletes.run)
        await nursery.start(self.dirattrs.run)
        journaled = {(j.key, j.base_etag) for j in self.index.all_journal().values()
                     if j.base_etag and not j.deleted}
        for oid, op in self.index.all_ops().items():
            if isinstance(op, DeleteOp):
                if self.deletes.superseded(op, journaled):
                    self.index.del_op(oid)  # the journaled file replaces that version
                else:
                    await self.deletes.resume(oid, op)
            elif isinstance(op, MkdirOp) and op.key.startswith(self.ns.prefix):
                # A directory whose marker the crash kept from the store.
                path = op.key[len(self.ns.prefix):].rstrip("/")
                self.wb.mkdir(path, op.key, op.meta,
                              time.time() if op.mtime is None else op.mtime, oid)
        return await self.renames.resume(self.wb.replay)

    async def settle_deletes(self, prefix: str | None = None) -> None:
        """Wait until queued DELETEs (of keys under ``prefix``, or all) are sent."""
        await self.deletes.settle(prefix)

    async def flush_records(self) -> None:
        """Write the directory attribute records still pending (flush, unmount)."""
        await self.dirattrs.flush()

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
            self.ns.drop_listing(self.ns.parent_of(f.path))
            return
        e = Entry(False, f.attrs.size, etag, f.attrs.mtime, f.attrs.to_meta())
        self.index.put_meta(ident_of(self.cfg.source.bucket, f.key, etag), e.meta or {})
        self.ns.set_entry(f.path, e)
        self.dirattrs.note_uploaded(f.path, etag, e.size, e.meta or {})

    def _check_rw(self) -> None:
        if self.cfg.ro:
            raise FsError(errno.EROFS)

    # nodes and attributes ----------------------------------------------------------------
    def attrs_of(self, n: Node) -> Attrs:
        """The attributes the kernel is shown: the local file's while there is one."""
        f = self.files.dirty_of(n)
        return f.attrs if f is not None else n.attrs

    def nlink(self, n: Node) -> int:
        """st_nlink: 0 once the name is gone while the kernel still holds the inode (an
        open file unlinked or replaced: SQLite checks it to warn of a deleted database), 2
        for a directory (its subdirectories are not counted: a listing per stat), else 1."""
        if not self.ns.attached(n):
            return 0
        return 2 if n.is_dir else 1

    @staticmethod
    def counted(n: Node) -> None:
        """The kernel now holds one more reference to ``n`` (a lookup it will forget)."""
        n.lookups += 1

    async def lookup(self, parent_ino: int, name: str) -> Node:
        """The node of ``name`` in a directory, counted as a kernel reference."""
        parent = self.ns.node(parent_ino)
        if name == ".":
            n = parent
        elif name == "..":
            n = self.ns.node(self.ns.by_path.get(self.ns.parent_of(parent.path), 1))
        else:
            n = await self.ns.lookup(parent, name)
        self.counted(n)
        return n

    def getattr(self, ino: int) -> Node:
        return self.ns.node(ino)

    def forget(self, inodes: Sequence[tuple[int, int]]) -> None:
        for ino, count in inodes:
            self.ns.forget(ino, count)

    def statfs(self) -> FsStats:
        # An object store has no fixed size: report 1 PiB, with what is free locally for
        # dirty data folded in as 'available'.
        total = (1 << 50) // STAT_BLOCK
        return FsStats(total, total - self.wb.dirty_bytes() // STAT_BLOCK)

    async def readlink(self, ino: int) -> bytes:
        n = self.ns.node(ino)
        if not stat.S_ISLNK(self.attrs_of(n).mode):
            raise FsError(errno.EINVAL)
        f = self.files.dirty_of(n)
        if f is not None:
            return self.wb.read(f, f.size, 0)
        obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag, n.entry.size)
        return await self.reader.read(obj, self.reader.new_readahead(), 0, obj.size)

    async def setattr(self, ino: int, ch: AttrChange, fh: int | None = None) -> Node:
        self._check_rw()
        n = self.ns.node(ino)
        f = self.files.dirty_of(n, fh)
        a = f.attrs if f is not None else n.attrs
        new = a.copy()
        if ch.mode is not None:
            new.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(ch.mode)
        new.uid = a.uid if ch.uid is None else ch.uid
        new.gid = a.gid if ch.gid is None else ch.gid
        new.mtime_ns = a.mtime_ns if ch.mtime_ns is None else ch.mtime_ns
        if ch.ctime_ns is not None:
            new.ctime_ns = ch.ctime_ns
        # The kernel (writeback cache) flushes its own mtime/ctime after writes, renames and
        # fsyncs. What is stored is mode/uid/gid and the times to the nanosecond (git compares
        # them). A change of ctime alone (the kernel's flush after a rename, say) is not worth
        # a request: it goes with the next upload of a dirty file, and on a clean object it
        # stays in this mount (a CopyObject per rename would double its cost).
        changed = (new.mode, new.uid, new.gid, new.mtime_ns) != (a.mode, a.uid, a.gid,
                                                                   a.mtime_ns)
        if ch.size is None and not changed:
            a.ctime_ns = new.ctime_ns
            if f is not None and not f.clean and self.ns.attached(n):
                self.wb.journal(f)
            return n
        if not self.ns.attached(n):
            # Unlinked (or replaced by a rename) while open: the name is gone, so only the
            # open file's own attributes change; nothing is written to the store.
            if ch.size is not None and f is not None:
                await self.wb.truncate(f, ch.size)
            a.mode, a.uid, a.gid = new.mode, new.uid, new.gid
            a.mtime_ns, a.ctime_ns = new.mtime_ns, new.ctime_ns
            return n
        if n.is_dir:
            await self._set_dir_attrs(n, new)
        elif ch.size is not None or f is not None:
            await self._set_file_attrs(n, f, new, ch)
        else:
            await self._set_object_meta(n, new)
        return n

    async def _set_dir_attrs(self, n: Node, new: Attrs) -> None:
        # (The root has no marker of its own; a directory made here whose marker is not sent
        # yet sends these attributes with it.)
        if n.path and not await self.wb.set_marker_meta(n.path, new.to_meta(), new.mtime):
            await self.client.put_file(self.ns.dir_key(n.path), None, 0, new.to_meta(),
                                       patient=False)
        n.attrs = new
        n.touched_ns = None  # (the times set, now the store's too)
        n.entry.meta = new.to_meta()
        n.entry.marker = n.entry.marker or bool(n.path)

    async def _set_file_attrs(self, n: Node, f: DirtyFile | None, new: Attrs,
                              ch: AttrChange) -> None:
        if ch.size is not None:
            if f is None:
                f = await self.files.dirty_copy(n, keep_content=ch.size > 0)
            await self.wb.truncate(f, ch.size)
        assert f is not None
        f.attrs.mode, f.attrs.uid, f.attrs.gid = new.mode, new.uid, new.gid
        if ch.mtime_ns is not None:
            f.attrs.mtime_ns = new.mtime_ns
        if ch.ctime_ns is not None:
            f.attrs.ctime_ns = new.ctime_ns
        f.gen += 1
        if f.writers == 0:
            self.wb.schedule(f, self.cfg.upload_delay)
        self.wb.journal(f)

    async def _set_object_meta(self, n: Node, new: Attrs) -> None:
        # Metadata only: a server-side copy onto itself, no data moves.
        if not n.entry.etag:
            # Not known yet: uploaded under this name while a rename was moving the inode
            # here. The store knows (ENOENT if it really is not there).
            n.validated = float("-inf")
            await self.ns.revalidate(n)
        if not n.entry.etag:
            raise FsError(errno.ENOENT)
        key = self.ns.key(n.path)
        etag = await copy_object(self.client, self.ns, key, key, new.to_meta(), n.entry.size,
                                 n.entry.etag)
        e = Entry(False, n.entry.size, etag, new.mtime, new.to_meta())
        # The copy keeps the content, so usually the ETag too: the metadata remembered for
        # this ETag must be replaced, or the next listing brings the old back.
        self.index.put_meta(ident_of(self.cfg.source.bucket, key, etag), new.to_meta())
        self.ns.set_entry(n.path, e)
        self.dirattrs.note_uploaded(n.path, etag, e.size, new.to_meta())
        n.entry, n.attrs = e, new
        n.attrs.size = e.size

    # directories -------------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        n = self.ns.node(ino)
        if not n.is_dir:
            raise FsError(errno.ENOTDIR)
        fh = self.files.new_fh()
        self.dir_handles[fh] = DirHandle(n)
        return fh

    async def readdir(self, fh: int, start: int) -> list[tuple[str, Node]]:
        """The entries of an open directory from index ``start`` on (a listing is taken at
        the first call and kept for the calls that continue it)."""
        d = self.dir_handles[fh]
        if start == 0 or d.entries is None:
            d.entries = await self.ns.readdir(d.node)
        return d.entries[start:]

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def fsyncdir(self, fh: int) -> None:
        # Directories made below it here whose markers are not in the store yet land now
        # (every other directory operation reached the store before it returned).
        await self.wb.settle_markers(self.dir_handles[fh].node.path)
        await self.deletes.settle(self.ns.dir_key(self.dir_handles[fh].node.path))

    async def mkdir(self, parent_ino: int, name: str, mode: int, who: Caller) -> Node:
        self._check_rw()
        parent = self.ns.node(parent_ino)
        path = new_path(self.ns, parent.path, name, is_dir=True)
        await self._must_not_exist(parent, name)
        await self.deletes.claim(path)
        attrs = Attrs(stat.S_IFDIR | (mode & 0o7777 & ~who.umask), who.uid, who.gid,
                      time.time())
        # The marker object is PUT in the background (a PUT per mkdir made `cp -r` and
        # `git checkout` wait ~4 ms per directory); until then the directory is local.
        self.wb.mkdir(path, self.ns.dir_key(path), attrs.to_meta(), attrs.mtime)
        e = Entry(True, mtime=attrs.mtime, meta=attrs.to_meta(), marker=True)
        self.ns.set_entry(path, e)
        self.ns.listings[path] = Listing({}, time.monotonic())
        self.dirattrs.seen(path, {})  # (no record: nothing to read before writing one)
        n = self.ns.node_for(path, e)
        self.ns.touch_dir(parent)
        self.counted(n)
        return n

    async def _must_not_exist(self, parent: Node, name: str) -> None:
        try:
            await self.ns.lookup(parent, name, want_meta=False)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        raise FsError(errno.EEXIST)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._check_rw()
        parent = self.ns.node(parent_ino)
        try:
            n = await self.ns.lookup(parent, name, want_meta=False)
        except FsError as exc:
            # A directory without a marker object vanishes from the store with its last
            # entry while the kernel still shows it (rm -r unlinks the children first): it
            # is removed already.
            known = self.ns.nodes.get(self.ns.by_path.get(self.ns.join(parent.path, name), 0))
            if exc.errno == errno.ENOENT and known is not None and known.is_dir:
                self.ns.drop_path(known.path)
                self.ns.touch_dir(parent)
                return
            raise
        if not n.is_dir:
            raise FsError(errno.ENOTDIR)
        async with self.dirattrs.removing(n.path) as held:  # no record PUT lands after it
            await self._remove_dir(parent, n)
            held.removed = True

    async def _remove_dir(self, parent: Node, n: Node) -> None:
        # Files unlinked below it leave the store before it does (else its prefix, listed
        # by a parent's listing, would bring it back for a moment). The listing that says
        # whether it is empty runs meanwhile (rm -r: a round trip per directory less): the
        # files whose DELETEs are queued or in flight (hidden now) do not count, and a
        # subdirectory's files left the store before its own rmdir returned.
        gone = {p: etag for p, etag in self.ns.hidden.items()
                if self.ns.parent_of(p) == n.path}
        busy = bool(self.wb.under(n.path) or self.wb.markers_below(n.path))

        async def check() -> None:
            nonlocal busy
            entries = await self.ns.list_dir(n.path, force=True)
            for k in [k for k, e in entries.items() if not e.is_dir and e.etag
                      and gone.get(self.ns.join(n.path, k)) == e.etag]:
                del entries[k]  # (deleted by now: not in the listing kept either)
            busy = busy or bool(entries)
        # Its attribute record (a directory holding only its record is empty) goes first,
        # meanwhile if the last listing (rm -r's readdir) showed one, and its marker last:
        # SeaweedFS keeps (and lists) a folder whose last two objects were deleted at once.
        # (Dropped for nothing if it turns out not empty: that costs HEADs, never data.)
        dropped = False

        async def drop_record() -> None:
            nonlocal dropped
            with contextlib.suppress(StoreError):  # (then deleted after the check below)
                await self.client.delete(self.dirattrs.key(n.path), patient=False)
                dropped = True
        async with trio.open_nursery() as nursery:
            if not busy:
                nursery.start_soon(check)
                if n.path in self.ns.view.records:
                    nursery.start_soon(drop_record)
            await self.deletes.settle(self.ns.dir_key(n.path))
        if busy or self.wb.under(n.path) or self.wb.markers_below(n.path):
            raise FsError(errno.ENOTEMPTY)
        if n.path in self.ns.view.records and not dropped:
            await self.client.delete(self.dirattrs.key(n.path), patient=False)
        if not await self.wb.rmdir(n.path):  # (True: its marker was never sent)
            await self.client.delete(self.ns.dir_key(n.path), patient=False)
        self.ns.view.records.pop(n.path, None)
        self.ns.drop_path(n.path)
        self.ns.touch_dir(parent)

    # files -------------------------------------------------------------------------------
    async def create(self, parent_ino: int, name: str, mode: int, who: Caller
                     ) -> tuple[int, Node]:
        """Create (or truncate: a create over an existing file) and open for writing;
        returns the handle and the node."""
        self._check_rw()
        parent = self.ns.node(parent_ino)
        path = new_path(self.ns, parent.path, name)
        doomed = self.deletes.take(path)
        if doomed is None:
            await self.deletes.claim(path)
        base = doomed[2] if doomed is not None else None
        attrs = Attrs(stat.S_IFREG | (mode & 0o7777 & ~who.umask), who.uid, who.gid,
                      time.time())
        try:
            try:
                existing = await self.ns.lookup(parent, name, want_meta=False)
                if existing.is_dir:
                    raise FsError(errno.EISDIR)
                base = existing.entry.etag or base
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            f = await self.wb.create(path, attrs, base_etag=base)
        except BaseException:
            if doomed is not None:
                self.deletes.give_back(path, doomed)
            raise
        if doomed is not None:
            self.deletes.taken(path, doomed)
        n = self.ns.node_for(path, Entry(False, 0, base or "", attrs.mtime, attrs.to_meta()))
        self.ns.negative.pop(path, None)
        self._add_to_listing(path, f)
        if base is None:  # (a new name, not a truncation of a file there)
            self.ns.touch_dir(parent)
        self.counted(n)
        return self.files.opened(n, True, None, f), n

    def _add_to_listing(self, path: str, f: DirtyFile) -> None:
        self.ns.set_entry(path, Entry(False, f.size, f.base_etag or "", f.attrs.mtime,
                                      f.attrs.to_meta()))

    async def open(self, ino: int, flags: int) -> int:
        return await self.files.open(self.ns.node(ino), flags)

    async def _new_file(self, parent_ino: int, name: str, attrs: Attrs,
                        content: bytes | None = None) -> Node:
        """A symlink or a special file: created here, uploaded after upload_delay."""
        self._check_rw()
        parent = self.ns.node(parent_ino)
        await self._must_not_exist(parent, name)
        path = new_path(self.ns, parent.path, name)
        await self.deletes.claim(path)
        f = await self.wb.create(path, attrs)
        if content is not None:
            await self.wb.write(f, 0, content)
        self.wb.schedule(f, self.cfg.upload_delay)
        self._add_to_listing(path, f)
        n = self.ns.node_for(path, Entry(False, len(content or b""), "", attrs.mtime,
                                         attrs.to_meta()))
        self.ns.touch_dir(parent)
        self.counted(n)
        return n

    async def symlink(self, parent_ino: int, name: str, target: bytes, who: Caller) -> Node:
        return await self._new_file(parent_ino, name,
                                    Attrs(stat.S_IFLNK | 0o777, who.uid, who.gid, time.time()),
                                    target)

    async def mknod(self, parent_ino: int, name: str, mode: int, rdev: int, who: Caller
                    ) -> Node:
        """A fifo, a unix socket's name, or a device node: an empty object whose
        x-amz-meta-mode carries the type (and x-amz-meta-rdev a device's number), as s3fs
        stores them. The kernel makes them work (pipes, sockets) while the mount lives."""
        self._check_rw()
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG):
            raise FsError(errno.EINVAL)
        attrs = Attrs(kind | (mode & 0o7777 & ~who.umask), who.uid, who.gid, 0.0,
                      mtime_ns=time.time_ns(), rdev=rdev if kind in (stat.S_IFCHR,
                                                                    stat.S_IFBLK) else 0)
        return await self._new_file(parent_ino, name, attrs)

    # names -------------------------------------------------------------------------------
    async def unlink(self, parent_ino: int, name: str) -> None:
        self._check_rw()
        parent = self.ns.node(parent_ino)
        n = await self.ns.lookup(parent, name, want_meta=False)
        if n.is_dir:
            raise FsError(errno.EISDIR)
        f = await self.wb.unlink(n.path)
        # What the store holds at the name: a local file's upload may have landed while
        # the unlink waited for it (the node still holds the version before it, and a
        # DELETE or a hidden name for that version would leave the new one listed).
        store_etag = (f.base_etag if f else None) or n.entry.etag
        if store_etag and f is None and self.files.is_open(n):
            # Open for reading from the store: delete at the last close, hide the name now.
            self.deletes.defer(n.ino, n.path, store_etag)
        elif store_etag and self.cfg.unlink == "batch":
            self.deletes.queue(n.path, self.ns.key(n.path), store_etag)
        elif store_etag:
            await self.client.delete(self.ns.key(n.path), patient=False)
        self.ns.set_entry(n.path, None)
        self.ns.by_path.pop(n.path, None)
        self.dirattrs.note_removed(n.path)
        self.ns.touch_dir(parent)

    async def rename(self, old_parent_ino: int, old_name: str, new_parent_ino: int,
                     new_name: str, flags: int = 0) -> None:
        """rename(2) / renameat2(2) with ``flags`` (RENAME_NOREPLACE; RENAME_EXCHANGE is
        refused)."""
        self._check_rw()
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent, new_parent = self.ns.node(old_parent_ino), self.ns.node(new_parent_ino)
        src = self.ns.join(old_parent.path, old_name)
        # A directory's records move with its objects: none may be written meanwhile, nor
        # after (an upload the rename waits for lands under the old name and notes it: a
        # record written after the move listed the old name empty brought it back).
        async with self.dirattrs.moving(src) as held:
            await self.renames.rename(old_parent, old_name, new_parent, new_name, flags)
            held.to = self.ns.join(new_parent.path, new_name)
        moved = self.ns.nodes.get(self.ns.by_path.get(self.ns.join(new_parent.path, new_name), 0))
        if moved is None or not moved.is_dir:
            self.dirattrs.note_removed(src)  # (a file left its directory's record)
        if (moved is not None and not moved.is_dir and moved.entry.etag
                and moved.entry.meta is not None and moved.path not in self.wb.files):
            # An uploaded file moved by a server-side copy (git's packs, fsynced under a
            # temp name): its new version's attributes go into its new directory's record.
            self.dirattrs.note_uploaded(moved.path, moved.entry.etag, moved.entry.size,
                                        moved.entry.meta)
        self.ns.touch_dir(old_parent)
        self.ns.touch_dir(new_parent)
