"""The floor of pyfuse3 + trio for a workload: a filesystem that keeps files in memory and
does nothing else, with the kernel options caiosfs uses (writeback cache,
default_permissions). Whatever a command takes on it is what the FUSE round trips and the
Python event loop cost, before caiosfs does any work of its own.

    python bench/floor.py MOUNTPOINT &      # mounts until unmounted (fusermount3 -u)
    time cp -r SRC MOUNTPOINT/copy

Files only grow (no unlink, rename, truncate); it is a measuring stick, not a filesystem.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time

import pyfuse3
import trio


class MemoryFloor(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self._next = pyfuse3.ROOT_INODE + 1
        self._names: dict[tuple[int, bytes], int] = {}
        self._modes = {pyfuse3.ROOT_INODE: stat.S_IFDIR | 0o755}
        self._data: dict[int, bytearray] = {}

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink = ino, self._modes[ino], 1
        e.st_size = len(self._data.get(ino, b""))
        e.entry_timeout = e.attr_timeout = 5
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = time.time_ns()
        return e

    def _add(self, parent: int, name: bytes, mode: int) -> int:
        ino, self._next = self._next, self._next + 1
        self._names[(parent, name)] = ino
        self._modes[ino] = mode
        return ino

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        return self._entry(inode)

    async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
        ino = self._names.get((parent_inode, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(ino)

    async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
        return self._entry(self._add(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
        ino = self._add(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        self._data[ino] = bytearray()
        return pyfuse3.FileInfo(fh=ino), self._entry(ino)

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        self._data[fh][off : off + len(buf)] = buf
        return len(buf)

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        return self._entry(inode)

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        raise pyfuse3.FUSEError(errno.ENOSYS)  # as caiosfs: the kernel stops sending FLUSH

    async def release(self, fh):  # type: ignore[no-untyped-def]
        return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("mountpoint")
    a = ap.parse_args()
    opts = set(pyfuse3.default_options) | {"fsname=caiosfs-floor", "default_permissions"}
    pyfuse3.init(MemoryFloor(), a.mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
