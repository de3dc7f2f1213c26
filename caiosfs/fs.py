"""The pyfuse3 adapter: decodes names, calls :class:`~caiosfs.core.Core`, builds the replies.

Everything the filesystem decides lives in the core (:mod:`.core` and the modules it
delegates to); a handler here only turns bytes into str, kernel structures into plain values
and back. :func:`handler` is the one place that turns errors into errno, counts and logs
them; only ``pyfuse3.FUSEError`` leaves a handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from .core import STAT_BLOCK, AttrChange, Caller, Core
from .errors import FsError, StoreError
from .inodes import Node

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, "object keys must be UTF-8") from None


def _caller(ctx: Any) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


class Filesystem(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core
        # What mount, warm and control use of the mount's parts.
        self.cfg = self.core.cfg
        self.metrics = self.core.metrics
        self.index = self.core.index
        self.client = self.core.client
        self.cache = self.core.cache
        self.fetcher = self.core.fetcher
        self.reader = self.core.reader
        self.wb = self.core.wb
        self.ns = self.core.ns
        self.initialized = trio.Event()

    # lifecycle ---------------------------------------------------------------------------
    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT arrived (settings made earlier, such as
        the mount's readahead, are clamped by the INIT exchange)."""
        self.initialized.set()

    async def start(self, nursery: trio.Nursery) -> int:
        """Start background work in the caller's nursery; replay the journal."""
        return await self.core.start(nursery)

    async def settle_deletes(self, prefix: str | None = None) -> None:
        """Wait until queued DELETEs (of keys under ``prefix``, or all) are sent."""
        await self.core.settle_deletes(prefix)

    async def flush_records(self) -> None:
        """Write the directory attribute records still pending."""
        await self.core.flush_records()

    def _entry(self, n: Node) -> pyfuse3.EntryAttributes:
        a = self.core.attrs_of(n)
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.generation = 0
        e.entry_timeout = self.core.ttl
        e.attr_timeout = self.core.ttl
        e.st_mode = a.mode
        e.st_nlink = self.core.nlink(n)
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_size = 0 if n.is_dir else a.size
        e.st_rdev = a.rdev
        e.st_blksize = 1 << 20
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    # lookups and attributes --------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.core.lookup(parent_inode, _name(name)))

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self.core.getattr(inode))

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        ch = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if getattr(fields, "update_ctime", False) else None,
            size=attr.st_size if fields.update_size else None)
        return self._entry(await self.core.setattr(inode, ch, fh))

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.core.readlink(inode)

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.core.forget(inode_list)

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = self.core.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = STAT_BLOCK
        s.f_blocks = st.blocks
        s.f_bfree = s.f_bavail = st.free
        s.f_files = s.f_ffree = s.f_favail = st.files
        s.f_namemax = st.namemax
        return s

    # directories -------------------------------------------------------------------------
    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self.core.opendir(inode)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.core.fsyncdir(fh)

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, (name, n) in enumerate(await self.core.readdir(fh, start_id), start_id):
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"),
                                         self._entry(n), i + 1):
                return
            self.core.counted(n)

    @handler
    async def releasedir(self, fh: int) -> None:
        self.core.releasedir(fh)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.core.mkdir(parent_inode, _name(name), mode,
                                                 _caller(ctx)))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.core.rmdir(parent_inode, _name(name))

    # files -------------------------------------------------------------------------------
    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, n = await self.core.create(parent_inode, _name(name), mode, _caller(ctx))
        return pyfuse3.FileInfo(fh=fh), self._entry(n)

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=await self.core.open(inode, flags), keep_cache=True)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.core.files.read(fh, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.core.files.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # close does not wait for the upload (fsync does: docs/DESIGN.md, "Durability"), so
        # a FLUSH has nothing to do. ENOSYS makes the kernel stop sending it: one round trip fewer per close(). The
        # kernel still writes its cached pages back first and reports their errors to close.
        self.metrics.op("flush")[0].inc()  # (tests check it is sent once per mount)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.core.files.fsync(fh)

    @handler
    async def release(self, fh: int) -> None:
        await self.core.files.release(fh)

    # names -------------------------------------------------------------------------------
    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.core.unlink(parent_inode, _name(name))

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.core.symlink(parent_inode, _name(name), target,
                                                   _caller(ctx)))

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.core.mknod(parent_inode, _name(name), mode, rdev,
                                                 _caller(ctx)))

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.ENOTSUP, "hard links are not supported on object storage")

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self.core.rename(parent_inode_old, _name(name_old), parent_inode_new,
                               _name(name_new), flags)
