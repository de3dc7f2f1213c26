"""The namespace: the facade the core's parts use for names, inodes and what the store has.

It composes the inode table (:mod:`.inodes`) and what the store says about directories and
names (:mod:`.storeview`), and answers lookups: from local changes not yet uploaded
(:mod:`.writeback`) first, then a fresh listing, the negative cache (misses remembered for
``negative_ttl``), a listing made after several probes of one directory, or a probe.
"""

from __future__ import annotations

import errno
import logging
import time

from .attrs import MAX_NAME, RECORD, valid_name
from .config import MountConfig
from .errors import FsError
from .index import Index
from .inodes import Inodes, Node
from .metrics import Metrics
from .paths import under
from .store.client import GaveUp, StoreClient
from .storeview import Entry, StoreView, TooBig
from .writeback import WriteBack

log = logging.getLogger(__name__)

# Probes of names in one directory (within list_ttl) after which it is listed instead: a
# probe is a HEAD and a LIST; a listing of up to 1,000 entries is one LIST.
LIST_AFTER_MISSES = 3


class Namespace:
    def __init__(self, cfg: MountConfig, store: StoreClient, index: Index, metrics: Metrics,
                 wb: WriteBack) -> None:
        self.cfg = cfg
        self.wb = wb
        self.inodes = Inodes(cfg, wb)
        self.view = StoreView(cfg, store, index, metrics, wb)
        self.prefix = cfg.source.prefix
        self.negative: dict[str, float] = {}
        # With dirattrs (the devbox profile) the first lookup in a directory lists it: the
        # LIST and its attribute record's GET cost one round trip, as a probe does, and
        # answer the lookups after it (git status: no HEAD per file). A name it lacks is
        # still probed, as without it: one created elsewhere shows when asked for.
        self._list_after = 0 if cfg.dirattrs else LIST_AFTER_MISSES
        # The parts' tables and methods the other modules use, under their old names (the
        # same objects: tables are changed in place, never replaced).
        self.nodes, self.by_path = self.inodes.nodes, self.inodes.by_path
        self.listings, self.hidden = self.view.listings, self.view.hidden
        self.node, self.node_for = self.inodes.node, self.inodes.node_for
        self.attached, self.touch_dir = self.inodes.attached, self.inodes.touch_dir
        self.forget = self.inodes.forget
        self.key, self.dir_key = self.view.key, self.view.dir_key
        self.list_dir, self.needs_tag = self.view.list_dir, self.view.needs_tag

    join = staticmethod(StoreView.join)
    parent_of = staticmethod(StoreView.parent_of)

    # readdir -----------------------------------------------------------------------------
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
        if name == RECORD:
            raise FsError(errno.ENOENT)  # a directory's attribute record (dirattrs.py)
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
        age = now - listing.at if listing is not None else float("inf")
        fresh = age < self.cfg.list_ttl
        neg = self.negative.get(path)
        neg_fresh = neg is not None and now - neg < self.cfg.negative_ttl
        # (A name we removed ourselves beats a listing made for lookups: SeaweedFS, for one,
        # keeps listing an emptied directory's prefix for a while.)
        if listing and fresh and (not listing.for_lookups or (name in listing.entries
                                                              and not neg_fresh)):
            return await self.view.from_listing(parent_path, listing.entries.get(name), name,
                                            want_meta)
        if neg_fresh:
            return None
        by_listing = self.cfg.lookup_misses == "listing"
        if (by_listing and listing and listing.for_lookups and name not in listing.entries
                and age < self.cfg.negative_ttl):
            # A name a listing made for lookups lacks is a miss as fresh as a probe's made
            # when the listing was: answered as the negative cache would answer it (git's
            # loose-object and ref probes, one after another, cost a round trip each).
            return None
        try:
            after = LIST_AFTER_MISSES if fresh else self._list_after
            if ((not fresh or (by_listing and listing and listing.for_lookups))
                    and self.view.missed(parent_path, now) > after):
                # Several names of this directory asked for in a row (git status, git log's
                # loose-object probes, a `cp -r` over an existing tree): one listing answers
                # them all, where each probe costs a HEAD and a LIST (with
                # lookup_misses=listing a name it lacks is a miss for negative_ttl, else it
                # is probed: a file another client just made shows at once). (A store that
                # does not answer it is not asked again for the probe: GaveUp below.)
                try:
                    entries = await self.list_dir(parent_path, force=fresh,
                                                  max_pages=1)
                except TooBig:
                    pass
                else:
                    if name in entries:
                        return await self.view.from_listing(parent_path, entries[name],
                                                            name, want_meta)
                    if by_listing:
                        return None
            e = await self.view.probe(path)
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

    async def revalidate(self, n: Node) -> Node:
        """Close-to-open: refresh a file's ETag/size if its TTL has expired."""
        if time.monotonic() - n.validated < self.cfg.entry_ttl or n.path in self.wb.files:
            return n
        e = await self.view.probe(n.path)
        if e is None:
            raise FsError(errno.ENOENT, f"{n.path} no longer exists in the store")
        if e.is_dir != n.is_dir:
            raise FsError(errno.ESTALE)
        self.inodes.refresh(n, e)
        parent = self.listings.get(self.parent_of(n.path))
        if parent is not None and n.path.rpartition("/")[2] in parent.entries:
            parent.entries[n.path.rpartition("/")[2]] = e
        return n

    # local changes -----------------------------------------------------------------------
    def set_entry(self, path: str, e: Entry | None) -> None:
        """Record a change we made: in the cached listing of its parent (and the LISTs of it
        in flight), the negative cache, and its inode."""
        self.view.set_entry(path, e)
        if e is None:
            self.negative[path] = time.monotonic()
        else:
            self.negative.pop(path, None)
        ino = self.by_path.get(path)
        if ino is not None and ino in self.nodes and e is not None:
            n = self.nodes[ino]
            if n.is_dir == e.is_dir:
                self.inodes.refresh(n, e)

    def drop_listing(self, path: str) -> None:
        """Forget what the store said about a directory (listed again when asked)."""
        self.listings.pop(path, None)
        self.view.trees.drop(path)

    def drop_path(self, path: str) -> None:
        self.set_entry(path, None)
        self.by_path.pop(path, None)
        self.drop_listing(path)

    def move(self, src: str, dst: str) -> None:
        """Re-point inodes of ``src`` (and everything below it) to ``dst``; its listings
        and those below it are gone."""
        self.inodes.move(src, dst)
        for p in [p for p in self.listings if under(p, src)]:
            del self.listings[p]
        self.view.trees.drop(src)
        self.view.trees.drop(dst)

