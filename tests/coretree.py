"""Drive the filesystem core without FUSE: started cores on the in-memory store (``Cores``),
a trio loop in a thread for synchronous tests (``Loop``), and ``CoreTree``, which does what
the kernel's VFS does in front of a mount (path walk, symlinks, the checks the kernel makes
itself before it asks the filesystem) so that path operations behave as on a mount."""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from conftest import xxh

from caiosfs.compose import build_core
from caiosfs.config import build_config
from caiosfs.core import AttrChange, Caller, Core
from caiosfs.errors import FsError
from caiosfs.index import Index
from caiosfs.inodes import ROOT_INO, Node
from caiosfs.store.memory import MemoryStore

T = TypeVar("T")
MAX_LINKS = 40  # the kernel's limit on symlinks followed in one path walk
OP_TIMEOUT = 120.0  # seconds: no operation on the in-memory store takes nearly that long
KERNEL_WRITE = 1 << 20  # the kernel sends writes of at most this much (max_write)


class Cores:
    """Cores on the in-memory store, each on its own cache directory and in its own
    nursery, so that one can die as a crashed daemon does (:meth:`crash`)."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp
        self.nursery = nursery
        self.running: dict[int, tuple[trio.CancelScope, trio.Event, Index, Core]] = {}

    async def __call__(self, store: MemoryStore, name: str = "c1", **opts: str) -> Core:
        """A started core (``name``: a new one is an empty cache, an old one the cache a
        crashed core left)."""
        cache = self.tmp / name
        cache.mkdir(exist_ok=True)
        cfg = build_config(f"s3://{store.bucket}", {
            "cache_dir": str(cache), "profile": "devbox", "upload_delay": "0", "uid": "0",
            # (no directory attribute records unless a test asks: tests compare what the
            # store holds; tests/test_dirattrs.py turns them on)
            "gid": "0", "dirattrs": "0", **opts})
        index = Index(cache / "index.lmdb")
        core = build_core(cfg, store, index)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as n:
                        await core.start(n)
                        task_status.started(scope)
                        await trio.sleep_forever()
            finally:
                done.set()
        scope = await self.nursery.start(run)
        self.running[id(core)] = (scope, done, index, core)
        return core

    async def crash(self, core: Core) -> None:
        """Stop ``core`` where it stands: nothing is drained, its index is closed."""
        await self._stop(id(core))

    async def stop_all(self) -> None:
        for core_id in list(self.running):
            await self._stop(core_id)

    async def _stop(self, core_id: int) -> None:
        scope, done, index, core = self.running.pop(core_id)
        scope.cancel()
        await done.wait()
        index.close()
        # Its spare data files (32 open descriptors), as a dead daemon's: the model test
        # starts two cores per example and ran out of descriptors after ~300 examples.
        core.wb.close_spares()


class Loop:
    """A trio loop in a thread, with ``Cores`` in it, for tests that are not async
    (hypothesis's state machines)."""

    def __init__(self, tmp: Path) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self.cores: Cores | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, tmp), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self, tmp: Path) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.cores = Cores(tmp, nursery)
            self._ready.set()
            await self._stop.wait()
            await self.cores.stop_all()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` on the loop; a hang fails (trio.TooSlowError) instead of
        stalling the test run."""
        async def bounded() -> T:
            with trio.fail_after(OP_TIMEOUT):
                return await fn(*args, **kw)
        return trio.from_thread.run(bounded, trio_token=self._token)

    def close(self) -> None:
        self.run(self._set_stop)
        self._thread.join()

    async def _set_stop(self) -> None:
        self._stop.set()


def _os_error(exc: FsError) -> OSError:
    return OSError(exc.errno, os.strerror(exc.errno))


class CoreTree:
    """Path operations on a core, with the names and errors of the ``os`` functions.

    What the kernel decides itself is decided here the same way: the path walk (ENOENT,
    ENOTDIR, ELOOP), EEXIST of mkdir and symlink, EISDIR of unlink and truncate, and
    rename's ancestor checks (EINVAL, ENOTEMPTY) and same-file no-op. Everything else is
    the core's answer. Methods are synchronous: they run on ``loop``."""

    def __init__(self, loop: Loop, core: Core, umask: int = 0o022) -> None:
        self.loop = loop
        self.core = core
        self.who = Caller(os.getuid(), os.getgid(), umask)

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return self.loop.run(fn, *args)
        except FsError as exc:
            raise _os_error(exc) from None

    # the path walk ------------------------------------------------------------------------
    async def _parent(self, path: str, links: list[int]) -> tuple[int, str]:
        """The directory inode that holds ``path``'s last component, and that component."""
        *dirs, name = path.split("/")
        ino = ROOT_INO
        for comp in dirs:
            n = await self._final(ino, comp)
            if n is None:
                raise FsError(errno.ENOENT)
            n = await self._follow(n, links)
            if n is None:
                raise FsError(errno.ENOENT)
            if not n.is_dir:
                raise FsError(errno.ENOTDIR)
            ino = n.ino
        return ino, name

    async def _final(self, dir_ino: int, name: str) -> Node | None:
        try:
            return await self.core.lookup(dir_ino, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def _follow(self, n: Node, links: list[int]) -> Node | None:
        """``n``, or what the symlink ``n`` leads to (None: a missing last component)."""
        while n is not None and stat.S_ISLNK(self.core.attrs_of(n).mode):
            dir_ino, name = await self._resolve_link(n, links)
            n = await self._final(dir_ino, name)  # type: ignore[assignment]
        return n

    async def _resolve_link(self, n: Node, links: list[int]) -> tuple[int, str]:
        links[0] += 1
        if links[0] > MAX_LINKS:
            raise FsError(errno.ELOOP)
        target = (await self.core.readlink(n.ino)).decode()
        where = posixpath.normpath(posixpath.join(posixpath.dirname(n.path), target))
        if where.startswith("..") or target.startswith("/"):
            raise AssertionError(f"symlink {n.path} -> {target} leaves the tree")
        return await self._parent(where, links)

    async def _walk(self, path: str, follow: bool) -> tuple[int, str, Node | None]:
        """(directory inode, name, node or None) of ``path``; ``follow``: through a final
        symlink, to the directory and name of what it points to."""
        links = [0]
        dir_ino, name = await self._parent(path, links)
        n = await self._final(dir_ino, name)
        while follow and n is not None and stat.S_ISLNK(self.core.attrs_of(n).mode):
            dir_ino, name = await self._resolve_link(n, links)
            n = await self._final(dir_ino, name)
        return dir_ino, name, n

    # path operations ----------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        async def op() -> None:
            d, name, n = await self._walk(path, follow=False)
            if n is not None:
                raise FsError(errno.EEXIST)
            await self.core.mkdir(d, name, 0o777, self.who)
        self._run(op)

    def unlink(self, path: str) -> None:
        self._run(self._remove, path, False)

    def rmdir(self, path: str) -> None:
        self._run(self._remove, path, True)

    async def _remove(self, path: str, is_dir: bool) -> None:
        d, name, n = await self._walk(path, follow=False)
        if n is None:
            raise FsError(errno.ENOENT)
        if n.is_dir != is_dir:
            raise FsError(errno.ENOTDIR if is_dir else errno.EISDIR)
        await (self.core.rmdir if is_dir else self.core.unlink)(d, name)

    def rename(self, src: str, dst: str) -> None:
        async def op() -> None:
            links = [0]
            sd, sname = await self._parent(src, links)
            dd, dname = await self._parent(dst, links)
            n = await self._final(sd, sname)
            if n is None:
                raise FsError(errno.ENOENT)
            target = await self._final(dd, dname)
            dst_parent = self.core.getattr(dd).path
            src_parent = self.core.getattr(sd).path
            if n.is_dir and (dst_parent + "/").startswith(n.path + "/"):
                raise FsError(errno.EINVAL)  # the source is an ancestor of the target
            if target is not None and (src_parent + "/").startswith(target.path + "/"):
                raise FsError(errno.ENOTEMPTY)  # the target is an ancestor of the source
            if target is n:
                return
            if target is not None and n.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target is not None and not n.is_dir and target.is_dir:
                raise FsError(errno.EISDIR)
            await self.core.rename(sd, sname, dd, dname, 0)
        self._run(op)

    def truncate(self, path: str, size: int) -> None:
        self._run(self._setattr, path, AttrChange(size=size))

    def chmod(self, path: str, mode: int) -> None:
        self._run(self._setattr, path, AttrChange(mode=mode))

    async def _setattr(self, path: str, ch: AttrChange) -> None:
        _, _, n = await self._walk(path, follow=True)
        if n is None:
            raise FsError(errno.ENOENT)
        if n.is_dir and ch.size is not None:
            raise FsError(errno.EISDIR)
        await self.core.setattr(n.ino, ch)

    def symlink(self, dest: str, path: str) -> None:
        async def op() -> None:
            d, name, n = await self._walk(path, follow=False)
            if n is not None:
                raise FsError(errno.EEXIST)
            await self.core.symlink(d, name, dest.encode(), self.who)
        self._run(op)

    # files --------------------------------------------------------------------------------
    async def _open(self, path: str, flags: int) -> tuple[int, Node]:
        d, name, n = await self._walk(path, follow=True)
        if n is None:
            if not flags & os.O_CREAT:
                raise FsError(errno.ENOENT)
            fh, n = await self.core.create(d, name, 0o644, self.who)
            return fh, n
        if n.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        return await self.core.open(n.ino, flags & (os.O_ACCMODE | os.O_TRUNC)), n

    async def _write(self, fh: int, body: bytes, off: int) -> int:
        done = 0
        while done < len(body):
            done += await self.core.files.write(fh, off + done,
                                                body[done:done + KERNEL_WRITE])
        return done

    async def _read_all(self, fh: int) -> bytes:
        out = bytearray()
        while True:
            chunk = await self.core.files.read(fh, len(out), KERNEL_WRITE)
            if not chunk:
                return bytes(out)
            out += chunk

    def write_at(self, path: str, body: bytes, offset: int | None, trunc: bool,
                 fsync: bool) -> None:
        async def op() -> None:
            fh, n = await self._open(path, os.O_WRONLY | os.O_CREAT
                                     | (os.O_TRUNC if trunc else 0))
            try:
                off = self.core.attrs_of(n).size if offset is None else offset
                if body:
                    await self._write(fh, body, off)
                if fsync:
                    await self.core.files.fsync(fh)
            finally:
                await self.core.files.release(fh)
        self._run(op)

    def read_bytes(self, path: str) -> bytes:
        async def op() -> bytes:
            fh, _ = await self._open(path, os.O_RDONLY)
            try:
                return await self._read_all(fh)
            finally:
                await self.core.files.release(fh)
        return self._run(op)

    def open_rw(self, path: str) -> tuple[int, Node]:
        return self._run(self._open, path, os.O_RDWR)

    def pwrite(self, fd: tuple[int, Node], body: bytes, off: int) -> int:
        return self._run(self._write, fd[0], body, off)

    def ftruncate(self, fd: tuple[int, Node], size: int) -> None:
        self._run(self.core.setattr, fd[1].ino, AttrChange(size=size), fd[0])

    def fsync(self, fd: tuple[int, Node]) -> None:
        self._run(self.core.files.fsync, fd[0])

    def fsize(self, fd: tuple[int, Node]) -> int:
        return self.core.attrs_of(fd[1]).size

    def pread_all(self, fd: tuple[int, Node]) -> bytes:
        return self._run(self._read_all, fd[0])

    def close(self, fd: tuple[int, Node]) -> None:
        self._run(self.core.files.release, fd[0])

    # the whole tree -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """path -> ('d',) | ('f', mode, size, xxh) | ('l', target), as a walk of a mount
        with os.walk / lstat / read_bytes sees it."""
        async def op() -> dict[str, tuple[Any, ...]]:
            out: dict[str, tuple[Any, ...]] = {}

            async def walk(ino: int) -> None:
                fh = self.core.opendir(ino)
                try:
                    entries = await self.core.readdir(fh, 0)
                finally:
                    self.core.releasedir(fh)
                for name, n in entries:
                    if name in (".", ".."):
                        continue
                    self.core.counted(n)
                    a = self.core.attrs_of(n)
                    if stat.S_ISLNK(a.mode):
                        out[n.path] = ("l", (await self.core.readlink(n.ino)).decode())
                    elif n.is_dir:
                        out[n.path] = ("d",)
                        await walk(n.ino)
                    else:
                        fh = await self.core.open(n.ino, os.O_RDONLY)
                        try:
                            body = await self._read_all(fh)
                        finally:
                            await self.core.files.release(fh)
                        out[n.path] = ("f", stat.S_IMODE(a.mode), a.size, xxh(body))
            await walk(ROOT_INO)
            return out
        return self._run(op)

    def drain(self) -> None:
        """Everything this core owes the store is there (what unmount does)."""
        async def op() -> None:
            await self.core.wb.flush_all()
            await self.core.settle_deletes()
            await self.core.flush_records()
        self._run(op)
