"""The inode table: which inode stands for which path, and the attributes it shows.

Inode numbers are a hash of the path (stable across remounts); a new version of a file in
the store gets a new inode, unless the file has local changes (:mod:`.writeback`). A
directory's mtime and ctime also change with what this mount does in it (``touch_dir``).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

import xxhash

from .attrs import Attrs, from_meta
from .config import MountConfig
from .errors import FsError
from .paths import under
from .storeview import Entry
from .writeback import WriteBack

ROOT_INO = 1
INO_MASK = (1 << 63) - 1  # positive in every signed 64-bit view of st_ino


@dataclass
class Node:
    ino: int
    path: str
    entry: Entry
    attrs: Attrs
    validated: float = field(default_factory=time.monotonic)
    lookups: int = 0
    # A directory: when an entry was last created, removed or renamed in it through this
    # mount (ns since the epoch; see touch_dir).
    touched_ns: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.entry.is_dir


class Inodes:
    def __init__(self, cfg: MountConfig, wb: WriteBack) -> None:
        self.cfg = cfg
        self.wb = wb
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[str, int] = {}
        root = Entry(True, mtime=time.time())
        self.nodes[ROOT_INO] = Node(ROOT_INO, "", root, self._attrs(root))
        self.by_path[""] = ROOT_INO
        self.nodes[ROOT_INO].lookups = 1

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"stale inode {ino}") from None

    def _attrs(self, e: Entry) -> Attrs:
        c = self.cfg
        return from_meta(e.meta, is_dir=e.is_dir, default_mode=c.dir_mode if e.is_dir
                         else c.file_mode, uid=c.uid, gid=c.gid, mtime=e.mtime,
                         size=0 if e.is_dir else e.size)

    def node_for(self, path: str, e: Entry, from_store: bool = True) -> Node:
        """The inode for ``path`` as ``e`` describes it.

        A new version of a file in the store (another ETag, no local changes) gets a *new*
        inode: the kernel keeps size and page cache per inode (and trusts its own size with
        the writeback cache), so a new inode is how a new version becomes visible, while
        handles still open on the old one keep reading the old version.
        """
        ino = self.by_path.get(path)
        if ino is not None and ino in self.nodes:
            n = self.nodes[ino]
            new_version = (from_store and not e.is_dir and bool(n.entry.etag) and bool(e.etag)
                           and n.entry.etag != e.etag and path not in self.wb.files)
            if n.is_dir == e.is_dir and not new_version:
                self.refresh(n, e)
                return n
            self.by_path.pop(path, None)  # type or version changed: a new inode
        ino = self.free_ino(path)
        n = Node(ino, path, e, self._attrs(e))  # (refresh builds an existing node's)
        self.nodes[ino] = n
        self.by_path[path] = ino
        return n

    def free_ino(self, path: str) -> int:
        """The inode number for a new inode of ``path``: a hash of the path, so an unchanged
        file has the same number after a remount (git compares st_ino with its index), and
        the next free number after it while that one is still in use (another version of
        the same path the kernel still holds, or a hash collision)."""
        ino = xxhash.xxh3_64_intdigest(path.encode("utf-8", "surrogateescape")) & INO_MASK
        while ino <= ROOT_INO or ino in self.nodes:
            ino = (ino + 1) & INO_MASK
        return ino

    def attached(self, n: Node) -> bool:
        """Whether ``n`` still owns its path (False once unlinked or replaced by a rename,
        while the kernel still holds it, e.g. through an open file)."""
        return self.by_path.get(n.path) == n.ino

    def touch_dir(self, n: Node) -> None:
        """An entry was created, removed or renamed in directory ``n``: its mtime and ctime
        become now (importlib, make and editors watch a directory's mtime). In this mount's
        view only, while the inode lives: storing it would cost a request per create (a
        marker PUT or copy), which `cp -r` and `git checkout` must not pay; after a remount
        the directory shows what the store has (docs/SEMANTICS.md)."""
        n.touched_ns = time.time_ns()
        self._keep_touch(n)

    @staticmethod
    def _keep_touch(n: Node) -> None:
        # Reapplied whenever the attributes are rebuilt from the store (a listing of the
        # parent, a lookup): the later of the store's times and ours.
        t = n.touched_ns
        if t is not None:
            a = n.attrs
            ctime = a.ctime_ns
            a.mtime_ns = max(a.mtime_ns, t)
            a.ctime_ns = max(ctime, t)

    def forget(self, ino: int, count: int) -> None:
        n = self.nodes.get(ino)
        if n is None or ino == ROOT_INO:
            return
        n.lookups -= count
        if n.lookups <= 0:
            del self.nodes[ino]
            if self.by_path.get(n.path) == ino:
                del self.by_path[n.path]

    def refresh(self, n: Node, e: Entry) -> None:
        """``n`` is as ``e`` describes it, as of now."""
        if e.is_dir and e.meta is None and n.entry.meta is not None:
            # A listing or a probe shows a directory as a bare prefix (and SeaweedFS drops
            # a marker's metadata): keep the attributes we know (mkdir, chmod) instead of
            # falling back to the mount's defaults once the entry's TTL ran out.
            e.meta, e.marker = n.entry.meta, e.marker or n.entry.marker
        n.entry, n.attrs, n.validated = e, self._attrs(e), time.monotonic()
        self._keep_touch(n)

    def move(self, src: str, dst: str) -> None:
        """Re-point inodes of ``src`` (and everything below it) to ``dst``."""
        self.by_path.pop(dst, None)
        for p in [p for p in self.by_path if under(p, src)]:
            ino = self.by_path.pop(p)
            newp = dst + p[len(src):]
            self.by_path[newp] = ino
            if ino in self.nodes:
                self.nodes[ino].path = newp
                # What the store holds under the new name (a copy, maybe a new ETag; or an
                # upload that finished under the new name before the inode moved) is
                # asked for at the next revalidation.
                self.nodes[ino].validated = float("-inf")
