"""Open files: the handle table, and reads and writes through it.

A handle reads either the local (dirty) file of its inode or the store version it was opened
on; a write makes a clean file a local one first (:meth:`Files.dirty_copy`). An inode keeps
its local file through its handles after its name is gone (unlinked or replaced by a rename).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import trio

from .config import MountConfig
from .deletes import Deletes
from .dirahead import DirAhead
from .errors import FsError
from .inodes import Node
from .namespace import Namespace
from .reader import ObjRef, Readahead, Reader
from .writeback import DirtyFile, WriteBack

FILL_CHUNK = 4 << 20  # a clean file made dirty is copied into its local file in these


@dataclass
class Handle:
    node: Node
    writable: bool
    obj: ObjRef | None  # the store version read by this handle (None: local file)
    ra: Readahead
    dirty: DirtyFile | None = None


@dataclass(eq=False)
class Files:
    cfg: MountConfig
    ns: Namespace
    wb: WriteBack
    reader: Reader
    deletes: Deletes
    handles: dict[int, Handle] = field(default_factory=dict)
    _next_fh: int = 1
    ahead: DirAhead | None = None  # told of every open for reading (see dirahead.py)

    def new_fh(self) -> int:
        """A handle number (file and directory handles share the numbers)."""
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def is_open(self, n: Node) -> bool:
        return any(h.node is n for h in self.handles.values())

    def dirty_of(self, n: Node, fh: int | None = None) -> DirtyFile | None:
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

    def opened(self, n: Node, writable: bool, obj: ObjRef | None, f: DirtyFile | None) -> int:
        """A new handle on ``n`` (reading ``obj`` from the store, or the local file ``f``)."""
        fh = self.new_fh()
        self.handles[fh] = Handle(n, writable, obj, self.reader.new_readahead(), f)
        if f is not None:
            self.wb.opened(f, writable)
        return fh

    async def dirty_copy(self, n: Node, keep_content: bool) -> DirtyFile:
        """Turn a clean store file into a local dirty file (content fetched if kept)."""
        await self.ns.revalidate(n)
        obj = ObjRef(self.cfg.source.bucket, self.ns.key(n.path), n.entry.etag, n.entry.size)

        async def fill(fd: int) -> None:
            ra = self.reader.new_readahead()
            off = 0
            while off < obj.size:
                data = await self.reader.read(obj, ra, off, FILL_CHUNK)
                await trio.to_thread.run_sync(os.pwrite, fd, data, off)
                off += len(data)
        attrs = n.attrs.copy()
        attrs.size = n.entry.size
        return await self.wb.open_existing(n.path, n.entry.etag, attrs,
                                           fill if keep_content else None)

    async def open(self, n: Node, flags: int) -> int:
        """Open the file ``n`` with open(2) ``flags`` (access mode, O_TRUNC)."""
        if n.is_dir:
            raise FsError(errno.EISDIR)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if (writable or flags & os.O_TRUNC) and self.cfg.ro:
            raise FsError(errno.EROFS)
        f = self.wb.files.get(n.path)
        if f is not None and f.deleted:
            f = None
        if f is None and (writable or flags & os.O_TRUNC):
            f = await self.dirty_copy(n, keep_content=not flags & os.O_TRUNC)
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
        if not writable and self.ahead is not None:
            self.ahead.opened(n)
        return self.opened(n, writable, obj, f)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        # A handle opened on the store version still sees what another handle wrote to the
        # same inode (a newer store version is another inode, which dirty_of keeps apart).
        f = h.dirty or self.dirty_of(h.node)
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

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if h.dirty is None:
            raise FsError(errno.EBADF)
        return await self.wb.write(h.dirty, off, buf)

    async def fsync(self, fh: int) -> None:
        h = self.handles[fh]
        if h.dirty is not None:
            await self.wb.fsync(h.dirty)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h.dirty is not None:
            self.wb.released(h.dirty, h.writable)
        if not self.is_open(h.node):
            await self.deletes.closed(h.node.ino)
