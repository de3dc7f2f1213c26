"""The namespace: inodes, directory listings and attributes, derived from ListObjectsV2.

A file ``P`` is object ``PREFIX/P``; a directory is a common prefix or a ``dir/`` marker.
Listings are cached for ``list_ttl``; misses for ``negative_ttl``. Attributes come from the
listing (size, ETag, Last-Modified) plus the object's ``x-amz-meta-*``, which is read by
parallel HEADs right after a listing (``metadata=head``) and remembered by ETag in LMDB.
Local changes not yet uploaded (:mod:`.writeback`) are overlaid on what the store says.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from dataclasses import dataclass, field

import trio
import xxhash

from .attrs import Attrs, from_meta
from .config import MountConfig
from .errors import FsError, StoreError
from .index import Index, ident_of
from .metrics import Metrics
from .store import ObjectInfo
from .store.client import GaveUp, StoreClient
from .writeback import WriteBack

log = logging.getLogger(__name__)

ROOT_INO = 1
MAX_NAME = 255
HEAD_PARALLEL = 32
# Probes of names in one directory (within list_ttl) after which it is listed instead: a
# probe is a HEAD and a LIST; a listing of up to 1,000 entries is one LIST.
LIST_AFTER_MISSES = 3
INO_MASK = (1 << 63) - 1  # positive in every signed 64-bit view of st_ino


class _TooBig(Exception):
    """A directory with more entries than a lookup's listing is worth."""


def tagged(etag: str) -> bool:
    """Whether a listed ETag is a multipart upload's ("...-N"): the mark of objects that
    carry attributes a listing must not hide (``WriteBack.tagged``), and of large objects."""
    return "-" in etag


def valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and \
        len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME and "\0" not in name


@dataclass
class Entry:
    """What the store says about one name."""

    is_dir: bool
    size: int = 0
    etag: str = ""
    mtime: float = 0.0
    meta: dict[str, str] | None = None
    marker: bool = False  # a directory with its own `dir/` marker object


@dataclass
class Listing:
    entries: dict[str, Entry]
    at: float
    # Made to answer lookups (after several probes), not for a readdir: it answers for the
    # names it has, and a name it lacks is still probed (a name created elsewhere since
    # must show within negative_ttl of being asked for, as without the listing).
    for_lookups: bool = False


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


class Namespace:
    def __init__(self, cfg: MountConfig, store: StoreClient, index: Index, metrics: Metrics,
                 wb: WriteBack) -> None:
        self.cfg = cfg
        self.store = store
        self.index = index
        self.metrics = metrics
        self.wb = wb
        self.prefix = cfg.source.prefix
        self.bucket = cfg.source.bucket
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[str, int] = {}
        self.listings: dict[str, Listing] = {}
        self.negative: dict[str, float] = {}
        # path -> ETag of a stored version unlinked while open (deleted at the last close):
        # listings and probes do not show it meanwhile.
        self.hidden: dict[str, str] = {}
        # dir path -> changes we made (set_entry) while a LIST of it was in flight; they are
        # applied on top of its result, which may predate them.
        self._listing_now: dict[str, list[dict[str, Entry | None]]] = {}
        self._heads: dict[str, trio.Event] = {}
        self._clash_logged: set[str] = set()
        # dir path -> (since, probes of names in it); -1 probes: too big to list for that
        self._misses: dict[str, tuple[float, int]] = {}
        root = Entry(True, mtime=time.time())
        self.nodes[ROOT_INO] = Node(ROOT_INO, "", root, self._attrs(root))
        self.by_path[""] = ROOT_INO
        self.nodes[ROOT_INO].lookups = 1

    # paths and keys ----------------------------------------------------------------------
    def key(self, path: str) -> str:
        return self.prefix + path

    def dir_key(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    @staticmethod
    def join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    @staticmethod
    def parent_of(path: str) -> str:
        return path.rpartition("/")[0]

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
        attrs = self._attrs(e)
        if ino is not None and ino in self.nodes:
            n = self.nodes[ino]
            new_version = (from_store and not e.is_dir and bool(n.entry.etag) and bool(e.etag)
                           and n.entry.etag != e.etag and path not in self.wb.files)
            if n.is_dir == e.is_dir and not new_version:
                if e.is_dir and e.meta is None and n.entry.meta is not None:
                    # A listing shows a directory as a bare prefix: keep the attributes we
                    # know (mkdir, chmod) instead of falling back to the mount's defaults.
                    e.meta, e.marker = n.entry.meta, e.marker or n.entry.marker
                    attrs = self._attrs(e)
                n.entry, n.attrs, n.validated = e, attrs, time.monotonic()
                self._keep_touch(n)
                return n
            self.by_path.pop(path, None)  # type or version changed: a new inode
        ino = self.free_ino(path)
        n = Node(ino, path, e, attrs)
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

    def overlay(self, n: Node) -> Attrs:
        """The node's attributes with local, not-yet-uploaded changes applied."""
        f = self.wb.files.get(n.path)
        if f is not None and not f.deleted and not n.is_dir:
            return f.attrs
        return n.attrs

    def forget(self, ino: int, count: int) -> None:
        n = self.nodes.get(ino)
        if n is None or ino == ROOT_INO:
            return
        n.lookups -= count
        if n.lookups <= 0:
            del self.nodes[ino]
            if self.by_path.get(n.path) == ino:
                del self.by_path[n.path]

    # listing -----------------------------------------------------------------------------
    async def list_dir(self, path: str, force: bool = False,
                       max_pages: int | None = None) -> dict[str, Entry]:
        """Entries of a directory as the store has them (cached for list_ttl). With
        ``max_pages``, _TooBig if it has more pages than that."""
        cached = self.listings.get(path)
        if cached and not force and time.monotonic() - cached.at < self.cfg.list_ttl:
            if max_pages is None:
                cached.for_lookups = False  # a readdir of it: the listing it would make
            return cached.entries
        pre = self.dir_key(path)
        entries: dict[str, Entry] = {}
        changes: dict[str, Entry | None] = {}
        # A marker that lands while the LIST runs may be missing from its result and gone
        # from the write-back's table by its end (the directory vanished for list_ttl).
        landing = {p: self.wb.markers[p] for p in self.wb.markers_below(path)}
        self._listing_now.setdefault(path, []).append(changes)
        try:
            await self._list_pages(path, pre, entries, max_pages)
        except _TooBig:
            self._misses[path] = (time.monotonic(), -1)
            raise
        finally:
            self._listing_now[path].remove(changes)
            if not self._listing_now[path]:
                del self._listing_now[path]
        for name, change in changes.items():  # e.g. an upload that finished meanwhile
            if change is None:
                entries.pop(name, None)
            else:
                entries[name] = change
        for name in [k for k, e in entries.items() if not e.is_dir and e.etag
                     and self.hidden.get(self.join(path, k)) == e.etag]:
            del entries[name]
        self._load_meta(entries, pre)
        for p, m in landing.items():
            name = p[len(path) + 1:] if path else p
            if ("/" not in name and p not in self.wb.markers and name not in changes
                    and name not in entries):
                entries[name] = Entry(True, mtime=m.mtime, meta=m.meta, marker=True)
        for p in self.wb.markers_below(path):  # made here, markers not in the store yet
            name = p[len(path) + 1:] if path else p
            if "/" not in name and (name not in entries or not entries[name].is_dir):
                m = self.wb.markers[p]
                entries[name] = Entry(True, mtime=m.mtime, meta=m.meta, marker=True)
        self.listings[path] = Listing(entries, time.monotonic(), max_pages is not None)
        if self.cfg.metadata != "list":
            await self._head_all(pre, entries, every=self.cfg.metadata == "head")
        return entries

    async def _list_pages(self, path: str, pre: str, entries: dict[str, Entry],
                          max_pages: int | None = None) -> None:
        token = None
        pages = 0
        while True:
            if max_pages is not None and pages >= max_pages:
                raise _TooBig(path)
            pages += 1
            page = await self.store.list(pre, "/", token)
            for o in page.objects:
                name = o.key[len(pre):]
                if name == "":
                    continue  # the directory's own marker
                if not valid_name(name):
                    self._skip(o.key)
                    continue
                entries[name] = Entry(False, o.size, o.etag, o.mtime)
            for p in page.prefixes:
                name = p[len(pre):-1]
                if not valid_name(name):
                    self._skip(p)
                    continue
                if name in entries and not entries[name].is_dir:
                    self._clash(p)
                entries[name] = Entry(True, mtime=time.time())
            token = page.next_token
            if not token:
                break

    def _skip(self, key: str) -> None:
        self.metrics.skipped_keys.inc()
        log.debug("skipping key that cannot be a path: %r", key)

    def _clash(self, key: str) -> None:
        if key not in self._clash_logged:
            self._clash_logged.add(key)
            log.warning("%r is both a file and a directory in the store; showing the "
                        "directory", key.rstrip("/"))

    def _load_meta(self, entries: dict[str, Entry], pre: str) -> None:
        for name, e in entries.items():
            if not e.is_dir and e.meta is None:
                e.meta = self.index.get_meta(ident_of(self.bucket, pre + name, e.etag))

    def needs_tag(self, meta: dict[str, str]) -> bool:
        """Whether an object with this metadata would look different if a listing's
        defaults stood for it: another type (symlink, ...), mode or owner than the mount's
        defaults. (Times are not: a listing's Last-Modified is shown until the object is
        looked up or opened.)"""
        c = self.cfg
        a = from_meta(meta, is_dir=False, default_mode=c.file_mode, uid=c.uid, gid=c.gid,
                      mtime=0)
        return (a.mode != stat.S_IFREG | c.file_mode or a.uid != c.uid or a.gid != c.gid)

    async def _head_all(self, pre: str, entries: dict[str, Entry], every: bool) -> None:
        """Read the x-amz-meta-* of listed objects whose metadata is not known yet: every
        one, or (``every`` false) those a tag marks (:func:`tagged`)."""
        todo = [(name, e) for name, e in entries.items() if not e.is_dir and e.meta is None
                and (every or tagged(e.etag))]
        if not todo:
            return
        limiter = trio.CapacityLimiter(HEAD_PARALLEL)

        async def one(name: str, e: Entry) -> None:
            async with limiter:
                try:
                    info = await self.store.head(pre + name)
                except StoreError:
                    return  # deleted meanwhile, or unreadable: defaults apply
                if info.etag == e.etag:
                    e.meta = info.metadata or {}
                    self.index.put_meta(ident_of(self.bucket, pre + name, e.etag), e.meta)
        async with trio.open_nursery() as n:
            for name, e in todo:
                n.start_soon(one, name, e)

    async def readdir(self, dnode: Node) -> list[tuple[str, Node]]:
        entries = dict(await self.list_dir(dnode.path))
        for name, f in self.wb.children(dnode.path).items():
            if name not in entries or not entries[name].is_dir:
                entries[name] = Entry(False, f.size, "", f.attrs.mtime, f.attrs.to_meta())
        local = self.wb.children(dnode.path)
        out = []
        for name in sorted(entries):
            out.append((name, self.node_for(self.join(dnode.path, name), entries[name],
                                             from_store=name not in local)))
        return out

    # lookup ------------------------------------------------------------------------------
    async def lookup(self, parent: Node, name: str, want_meta: bool = True) -> Node:
        """The node of ``name`` in ``parent``. ``want_meta``: the attributes go to the kernel
        (a FUSE lookup), so a file whose metadata is unknown is HEADed; unlink, rename and
        create only need to know what is there."""
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        if not valid_name(name):
            raise FsError(errno.ENAMETOOLONG if len(name.encode()) > MAX_NAME else errno.ENOENT)
        path = self.join(parent.path, name)
        f = self.wb.files.get(path)
        if f is not None and not f.deleted:
            e = Entry(False, f.size, f.base_etag or "", f.attrs.mtime, f.attrs.to_meta())
            return self.node_for(path, e, from_store=False)
        m = self.wb.markers.get(path)
        if m is not None:  # made here, its marker not in the store yet
            return self.node_for(path, Entry(True, mtime=m.mtime, meta=m.meta, marker=True))
        if self.wb.under(path):  # only local files below it so far
            return self.node_for(path, Entry(True, mtime=time.time()))
        found = await self._stat(parent.path, name, want_meta)
        if found is None:
            raise FsError(errno.ENOENT)
        return self.node_for(path, found)

    async def _stat(self, parent_path: str, name: str, want_meta: bool = True
                    ) -> Entry | None:
        path = self.join(parent_path, name)
        now = time.monotonic()
        listing = self.listings.get(parent_path)
        fresh = listing is not None and now - listing.at < self.cfg.list_ttl
        neg = self.negative.get(path)
        neg_fresh = neg is not None and now - neg < self.cfg.negative_ttl
        # (A name we removed ourselves beats a listing made for lookups: SeaweedFS, for one,
        # keeps listing an emptied directory's prefix for a while.)
        if listing and fresh and (not listing.for_lookups or (name in listing.entries
                                                              and not neg_fresh)):
            return await self._from_listing(parent_path, listing.entries.get(name), name,
                                            want_meta)
        if neg_fresh:
            return None
        try:
            if not fresh and self._missed(parent_path, now) > LIST_AFTER_MISSES:
                # Several names of this directory asked for in a row (git status, a `cp -r`
                # over an existing tree): one listing answers them all, where each probe
                # costs a HEAD and a LIST. (A store that does not answer it is not asked
                # again for the probe: GaveUp below.)
                try:
                    entries = await self.list_dir(parent_path, max_pages=1)
                except _TooBig:
                    entries = {}
                if name in entries:
                    return await self._from_listing(parent_path, entries[name], name,
                                                    want_meta)
            e = await self.probe(path)
        except GaveUp:
            # The store is unreachable: what we last knew is the best answer there is (a
            # create then goes ahead; its upload is conditional, so a name someone else
            # made meanwhile ends up as a conflict copy, never overwritten).
            ino = self.by_path.get(path)
            known = self.nodes.get(ino) if ino is not None else None
            if listing is not None:
                log.warning("store unreachable; answering %s from a listing %.0fs old",
                            path, now - listing.at)
                return listing.entries.get(name)
            if known is not None:
                log.warning("store unreachable; answering %s from what was known", path)
                return known.entry
            raise
        if e is None:
            self.negative[path] = now
            if len(self.negative) > 100_000:
                self.negative.clear()
        else:
            self.negative.pop(path, None)
        return e

    def _missed(self, dir_path: str, now: float) -> int:
        """Count a probe in ``dir_path``; how many it made within list_ttl (0 once a listing
        of it turned out too big to be worth it)."""
        start, n = self._misses.get(dir_path, (now, 0))
        if n < 0 and now - start < self.cfg.list_ttl:
            return 0
        if n < 0 or now - start >= self.cfg.list_ttl:
            start, n = now, 0
        self._misses[dir_path] = (start, n + 1)
        if len(self._misses) > 10_000:
            self._misses.clear()
        return n + 1

    async def _from_listing(self, dir_path: str, e: Entry | None, name: str,
                            want_meta: bool = True) -> Entry | None:
        """A lookup answered by a listing: a file whose metadata is not known yet is HEADed
        (one request; a listing's defaults and Last-Modified would make the answer depend
        on the order of access, and git re-read the file), except with metadata=list."""
        if (e is None or e.is_dir or e.meta is not None or not want_meta
                or self.cfg.metadata == "list"):
            return e
        key = self.dir_key(dir_path) + name
        try:
            info = await self.store.head(key)
        except StoreError as exc:
            if exc.errno == errno.ENOENT:
                return None  # deleted since the listing
            return e  # unreachable: what the listing says is the best answer there is
        if info.etag == e.etag:
            e.meta = info.metadata or {}
            self.index.put_meta(ident_of(self.bucket, key, e.etag), e.meta)
            return e
        fresh = Entry(False, info.size, info.etag, info.mtime, info.metadata or {})
        self.index.put_meta(ident_of(self.bucket, key, info.etag), fresh.meta or {})
        return fresh

    async def probe(self, path: str) -> Entry | None:
        """Ask the store about one path: HEAD the object and list one key under ``path/``."""
        key = self.key(path)
        result: dict[str, object] = {}

        async def head() -> None:
            try:
                result["head"] = await self.store.head(key)
            except StoreError as exc:
                if exc.errno != errno.ENOENT:
                    raise

        async def lst() -> None:
            page = await self.store.list(key + "/", None, None, 1)
            result["dir"] = bool(page.objects or page.prefixes)

        try:
            async with trio.open_nursery() as n:
                n.start_soon(head)
                n.start_soon(lst)
        except* StoreError as eg:
            raise eg.exceptions[0] from None
        if result.get("dir"):
            if "head" in result:
                self._clash(key + "/")
            return Entry(True, mtime=time.time())
        info = result.get("head")
        if isinstance(info, ObjectInfo) and self.hidden.get(path) != info.etag:
            e = Entry(False, info.size, info.etag, info.mtime, info.metadata or {})
            self.index.put_meta(ident_of(self.bucket, key, info.etag), e.meta or {})
            return e
        return None

    async def revalidate(self, n: Node) -> Node:
        """Close-to-open: refresh a file's ETag/size if its TTL has expired."""
        if time.monotonic() - n.validated < self.cfg.entry_ttl or n.path in self.wb.files:
            return n
        e = await self.probe(n.path)
        if e is None:
            raise FsError(errno.ENOENT, f"{n.path} no longer exists in the store")
        if e.is_dir != n.is_dir:
            raise FsError(errno.ESTALE)
        n.entry, n.attrs, n.validated = e, self._attrs(e), time.monotonic()
        self._keep_touch(n)
        parent = self.listings.get(self.parent_of(n.path))
        if parent is not None and n.path.rpartition("/")[2] in parent.entries:
            parent.entries[n.path.rpartition("/")[2]] = e
        return n

    # local changes -----------------------------------------------------------------------
    def set_entry(self, path: str, e: Entry | None) -> None:
        """Record a change we made in the cached listing of its parent."""
        parent = self.listings.get(self.parent_of(path))
        name = path.rpartition("/")[2]
        for changes in self._listing_now.get(self.parent_of(path), ()):
            changes[name] = e
        if parent is not None:
            if e is None:
                parent.entries.pop(name, None)
            else:
                parent.entries[name] = e
        if e is None:
            self.negative[path] = time.monotonic()
        else:
            self.negative.pop(path, None)
        ino = self.by_path.get(path)
        if ino is not None and ino in self.nodes and e is not None:
            n = self.nodes[ino]
            if n.is_dir == e.is_dir:
                n.entry, n.attrs, n.validated = e, self._attrs(e), time.monotonic()
                self._keep_touch(n)

    def drop_path(self, path: str) -> None:
        self.set_entry(path, None)
        self.by_path.pop(path, None)
        self.listings.pop(path, None)

    def move(self, src: str, dst: str) -> None:
        """Re-point inodes of ``src`` (and everything below it) to ``dst``."""
        self.by_path.pop(dst, None)
        for p in [p for p in self.by_path if p == src or p.startswith(src + "/")]:
            ino = self.by_path.pop(p)
            newp = dst + p[len(src):]
            self.by_path[newp] = ino
            if ino in self.nodes:
                self.nodes[ino].path = newp
                # What the store holds under the new name (a copy, maybe a new ETag; or an
                # upload that finished under the new name before the inode moved) is
                # asked for at the next revalidation.
                self.nodes[ino].validated = float("-inf")
        for p in [p for p in self.listings if p == src or p.startswith(src + "/")]:
            del self.listings[p]

    def file_type(self, n: Node) -> int:
        return stat.S_IFMT(self.overlay(n).mode)
