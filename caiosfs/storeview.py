"""What the store says about a directory and about one name: listings, probes, metadata.

A file ``P`` is object ``PREFIX/P``; a directory is a common prefix or a ``dir/`` marker.
Listings (ListObjectsV2) are cached for ``list_ttl``. Attributes come from the listing (size,
ETag, Last-Modified) plus the object's ``x-amz-meta-*``, taken from the directory's
attribute record where it holds the listed version (:mod:`.dirattrs`, GET along with a cold
listing's first page), else read by parallel HEADs right after a listing
(``metadata=head``), and remembered by ETag in LMDB. The record's name is never an entry. A name not in a
listing is probed (a HEAD and a one-key LIST). Markers of directories made here and not in
the store yet are added from the write-back. Inodes are kept by :mod:`.inodes`; lookups,
the negative cache and when to list instead of probe are decided in :mod:`.namespace`.
A cold listing may be taken from a listing of a whole subtree (:mod:`.treelist`,
``list_ahead``) made at an ancestor's first listing.
"""

from __future__ import annotations

import bisect
import errno
import logging
import stat
import time
from dataclasses import dataclass

import trio

from .attrs import RECORD, from_meta, valid_name
from .config import MountConfig
from .dirattrs import DirAttrs, Record, covered
from .errors import StoreError
from .index import Index, ident_of
from .metrics import Metrics
from .store import ObjectInfo
from .store.client import GaveUp, StoreClient
from .treelist import Taken, TreeLister
from .writeback import WriteBack

log = logging.getLogger(__name__)

HEAD_PARALLEL = 32


class TooBig(Exception):
    """A directory with more entries than a lookup's listing is worth."""


def tagged(etag: str) -> bool:
    """Whether a listed ETag is a multipart upload's ("...-N"): the mark of objects that
    carry attributes a listing must not hide (``WriteBack.tagged``), and of large objects."""
    return "-" in etag


def _known(e: Entry) -> bool:
    return e.meta is not None


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
    # False: the listed objects' metadata was not read after it (a listing made at a
    # directory's first lookup with dirattrs; its lookups HEAD in windows): a readdir does.
    headed: bool = True
    # Its names sorted (made on first need): where a lookup's metadata window starts.
    order: list[str] | None = None


class StoreView:
    def __init__(self, cfg: MountConfig, store: StoreClient, index: Index, metrics: Metrics,
                 wb: WriteBack) -> None:
        self.cfg = cfg
        self.store = store
        self.index = index
        self.metrics = metrics
        self.wb = wb
        self.prefix = cfg.source.prefix
        self.bucket = cfg.source.bucket
        self.listings: dict[str, Listing] = {}
        # path -> ETag of a stored version unlinked while open (deleted at the last close):
        # listings and probes do not show it meanwhile.
        self.hidden: dict[str, str] = {}
        # dir path -> changes we made (set_entry) while a LIST of it was in flight; they are
        # applied on top of its result, which may predate them.
        self._listing_now: dict[str, list[dict[str, Entry | None]]] = {}
        self._clash_logged: set[str] = set()
        # dir path -> (since, probes of names in it); -1 probes: too big to list for that
        self._misses: dict[str, tuple[float, int]] = {}
        # key -> set when the HEAD of a listed object (for its metadata) in flight ends
        self._heading: dict[str, trio.Event] = {}
        # dir path -> (since, lookups in it that needed a listed object's metadata)
        self._meta_runs: dict[str, tuple[float, int]] = {}
        # Directory attribute records (dirattrs.py): read for listings unless
        # metadata=list; set by the composition root.
        self.dirattrs: DirAttrs | None = None
        # dir path -> ETag of its record in its last listing (rmdir deletes it)
        self.records: dict[str, str] = {}
        # dir path -> ETag of the record last applied to a listing of it (not GET again)
        self._applied: dict[str, str] = {}
        # Listings of whole subtrees at a directory's first listing (list_ahead, treelist.py)
        self.trees = TreeLister(store, self.prefix, cfg.list_ahead, cfg.list_ttl,
                                lambda p: {q: wb.markers[q] for q in wb.markers_below(p)})

    def use_records(self, da: DirAttrs) -> None:
        """Read directories' attribute records with their listings (the composition root)."""
        self.dirattrs = da
        if da.write and self.cfg.metadata != "list":
            self.trees.load_record = da.load

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

    # listing -----------------------------------------------------------------------------
    async def list_dir(self, path: str, force: bool = False,
                       max_pages: int | None = None) -> dict[str, Entry]:
        """Entries of a directory as the store has them (cached for list_ttl). With
        ``max_pages``, TooBig if it has more pages than that."""
        cached = self.listings.get(path)
        if cached and not force and time.monotonic() - cached.at < self.cfg.list_ttl:
            if max_pages is None:
                cached.for_lookups = False  # a readdir of it: the listing it would make
                if not cached.headed and self.cfg.metadata != "list":
                    cached.headed = True
                    await self._head_all(self.dir_key(path), cached.entries,
                                         every=self.cfg.metadata == "head")
            return cached.entries
        pre = self.dir_key(path)
        entries: dict[str, Entry] = {}
        changes: dict[str, Entry | None] = {}
        # A marker that lands while the LIST runs may be missing from its result and gone
        # from the write-back's table by its end (the directory vanished for list_ttl).
        landing = {p: self.wb.markers[p] for p in self.wb.markers_below(path)}
        self._listing_now.setdefault(path, []).append(changes)
        record: list[Record | None] = []
        made = None
        try:
            taken = None if cached is not None or force else await self.trees.take(path)
            if taken is not None:
                made = await self._from_tree(path, pre, taken, entries, changes, record,
                                             max_pages)
                for p, m in taken.landing.items():
                    landing.setdefault(p, m)  # type: ignore[arg-type]
            else:
                await self._list_with_record(path, pre, entries, max_pages, record,
                                             eager=cached is None)
        except TooBig:
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
        await self._apply_record(path, pre, entries, record)
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
        # (With dirattrs, a listing made for a lookup leaves what its record lacks to the
        # lookups' windows of HEADs: one stat in a large foreign directory must not HEAD it
        # all. A readdir of it HEADs the rest, above.)
        headed = max_pages is None or not self.cfg.dirattrs
        self.listings[path] = Listing(entries, made or time.monotonic(),
                                      max_pages is not None, headed=headed)
        if self.cfg.metadata != "list" and headed:
            await self._head_all(pre, entries, every=self.cfg.metadata == "head")
        return entries

    async def _list_with_record(self, path: str, pre: str, entries: dict[str, Entry],
                                max_pages: int | None, record: list[Record | None],
                                eager: bool) -> None:
        """The LIST pages; with dirattrs=1, the directory's first listing here also GETs
        its attribute record meanwhile (into ``record``): a cold listing pays one round
        trip for both."""
        da = self.dirattrs
        if da is None or not da.write or not eager or self.cfg.metadata == "list":
            await self._list_pages(path, pre, entries, max_pages)
            return

        async def fetch() -> None:
            record.append(await self._load_record(da, path))
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            try:
                await self._list_pages(path, pre, entries, max_pages)
            except Exception as exc:  # noqa: BLE001  (raised as itself, not in a group)
                failed = exc
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def _from_tree(self, path: str, pre: str, taken: Taken, entries: dict[str, Entry],
                         changes: dict[str, Entry | None], record: list[Record | None],
                         max_pages: int | None) -> float:
        """A directory's listing taken from a tree listing (treelist.py) as a LIST of it
        would have given it when its page was requested; that moment."""
        keys = taken.keys
        self.records.pop(path, None)
        if keys.record is not None:
            self._note_record(path, keys.record)
        for key in keys.skipped:
            self._skip(key)
        for name, (size, etag, mtime) in keys.files.items():
            entries[name] = Entry(False, size, etag, mtime)
        for name in keys.dirs:
            if name in entries:
                self._clash(pre + name + "/")
            entries[name] = Entry(True, mtime=time.time())
        if max_pages is not None and len(entries) > max_pages * 1000:
            raise TooBig(path)
        for name, e in taken.changes.items():  # ours since the page: older than `changes`
            if name not in changes:
                changes[name] = e  # type: ignore[assignment]
        if taken.record is not None:
            record.append(await taken.record())
        return keys.at

    def _note_record(self, path: str, etag: str) -> None:
        self.records[path] = etag
        if len(self.records) > 100_000:
            self.records.clear()

    async def _load_record(self, da: DirAttrs, path: str) -> Record | None:
        try:
            return await da.load(path)
        except StoreError as exc:  # an optimisation: the listing goes on without it
            log.debug("attribute record of %r not read: %s", path or "/", exc)
            return None

    async def _apply_record(self, path: str, pre: str, entries: dict[str, Entry],
                            record: list[Record | None]) -> None:
        """Metadata of listed files from the directory's attribute record (dirattrs.py),
        where it holds their version; remembered by ETag like a HEAD's answer."""
        da, listed = self.dirattrs, self.records.get(path)
        if da is None or self.cfg.metadata == "list" or listed is None:
            return
        if not record:  # not fetched along with the LIST: only if it may help
            if self._applied.get(path) == listed or not any(
                    not e.is_dir and e.meta is None for e in entries.values()):
                return
            record.append(await self._load_record(da, path))
        rec = record[0]
        if rec is None:
            return
        self._applied[path] = rec.etag
        if len(self._applied) > 10_000:
            self._applied.clear()
        known = []
        for name, e in entries.items():
            if e.is_dir or e.meta is not None:
                continue
            meta = covered(rec, name, e.etag, e.size, e.mtime)
            if meta is not None:
                e.meta = meta
                known.append((ident_of(self.bucket, pre + name, e.etag), meta))
        self.index.put_metas(known)  # (one transaction: a listing's files are hundreds)

    async def _list_pages(self, path: str, pre: str, entries: dict[str, Entry],
                          max_pages: int | None = None) -> None:
        token = None
        pages = 0
        self.records.pop(path, None)
        while True:
            if max_pages is not None and pages >= max_pages:
                raise TooBig(path)
            pages += 1
            t0 = time.monotonic()
            page = await self.store.list(pre, "/", token)
            self.trees.observe(time.monotonic() - t0)
            for o in page.objects:
                name = o.key[len(pre):]
                if name == "":
                    continue  # the directory's own marker
                if name == RECORD:  # its attribute record: never a file
                    self._note_record(path, o.etag)
                    continue
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
        todo = [(name, e) for name, e in entries.items() if not e.is_dir and e.meta is None]
        if not todo:
            return
        metas = self.index.get_metas([ident_of(self.bucket, pre + n, e.etag) for n, e in todo])
        for (_, e), meta in zip(todo, metas, strict=True):
            e.meta = meta

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
        await self._head_some(pre, [(name, e) for name, e in entries.items()
                                    if not e.is_dir and e.meta is None
                                    and (every or tagged(e.etag))])

    async def _head_some(self, pre: str, todo: list[tuple[str, Entry]]) -> set[str]:
        """HEAD these listed objects, HEAD_PARALLEL at a time, for their metadata (an
        object's HEAD already in flight is waited for, not sent twice); an object whose
        ETag is no longer the listed one keeps ``meta`` None. Returns the names whose HEAD
        failed for another reason than the object's absence (the store did not answer)."""
        todo = [(n, e) for n, e in todo if e.meta is None]
        failed: set[str] = set()
        if not todo:
            return failed
        limiter = trio.CapacityLimiter(HEAD_PARALLEL)
        mine: dict[str, trio.Event] = {}
        for name, _ in todo:
            if pre + name not in self._heading:
                mine[pre + name] = self._heading[pre + name] = trio.Event()

        async def one(name: str, e: Entry) -> None:
            key = pre + name
            if key not in mine:  # another lookup's HEAD of it is in flight
                if (ev := self._heading.get(key)) is not None:
                    await ev.wait()
                return
            try:
                async with limiter:
                    try:
                        info = await self.store.head(key)
                    except StoreError as exc:
                        if exc.errno != errno.ENOENT:
                            failed.add(name)
                        return  # deleted meanwhile, or unreadable: defaults apply
                if info.etag == e.etag:
                    e.meta = info.metadata or {}
                    self.index.put_meta(ident_of(self.bucket, key, e.etag), e.meta)
            finally:
                if self._heading.get(key) is mine[key]:
                    del self._heading[key]
                mine[key].set()
        async with trio.open_nursery() as n:
            for name, e in todo:
                n.start_soon(one, name, e)
        return failed

    def _window(self, dir_path: str, listing: Listing | None, name: str
                ) -> list[tuple[str, Entry]]:
        """The listed objects whose metadata a lookup of ``name`` fetches along with its own:
        none for the first such lookup in a directory (within list_ttl), then the names
        after it in sorted order (git status, `ls -l`-like walks and imports go in order),
        a window doubling with each such lookup up to HEAD_PARALLEL: one round of parallel
        HEADs where each lookup paid a round trip of its own."""
        now = time.monotonic()
        start, n = self._meta_runs.get(dir_path, (now, 0))
        if now - start >= self.cfg.list_ttl:
            start, n = now, 0
        self._meta_runs[dir_path] = (start, n + 1)
        if len(self._meta_runs) > 10_000:
            self._meta_runs.clear()
        if n == 0 or listing is None:
            return []
        want = min(HEAD_PARALLEL, 1 << min(n, 8)) - 1
        if listing.order is None:
            listing.order = sorted(listing.entries)
        order, entries, pre = listing.order, listing.entries, self.dir_key(dir_path)
        out: list[tuple[str, Entry]] = []
        i = bisect.bisect_right(order, name)
        for other in order[i:i + 4 * want]:
            e = entries.get(other)
            if (e is not None and not e.is_dir and e.meta is None and e.etag
                    and pre + other not in self._heading):
                out.append((other, e))
                if len(out) >= want:
                    break
        return out

    # probes ------------------------------------------------------------------------------
    def missed(self, dir_path: str, now: float) -> int:
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

    async def from_listing(self, dir_path: str, e: Entry | None, name: str,
                            want_meta: bool = True) -> Entry | None:
        """A lookup answered by a listing: a file whose metadata is not known yet is HEADed
        (one request; a listing's defaults and Last-Modified would make the answer depend
        on the order of access, and git re-read the file), except with metadata=list."""
        if (e is None or e.is_dir or e.meta is not None or not want_meta
                or self.cfg.metadata == "list"):
            return e
        key = self.dir_key(dir_path) + name
        if key in self._heading:
            await self._heading[key].wait()
        else:
            ahead = self._window(dir_path, self.listings.get(dir_path), name)
            if name in await self._head_some(self.dir_key(dir_path), [(name, e), *ahead]):
                # The store did not answer its HEAD within read_timeout: a lookup waits
                # for it once, then answers with what the listing says.
                return e
        if _known(e):
            return e
        # (Its HEAD failed, or found another version than the listed one: asked again.)
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
        if path.rpartition("/")[2] == RECORD:
            return None  # a directory's attribute record is no file
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
            exc = eg.exceptions[0]
            if isinstance(exc, GaveUp):  # (a lookup, then a read of it: one wait, not two)
                self.store.gave_up(key, exc)
            raise exc from None
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

    def known_dir(self, path: str) -> tuple[dict[str, tuple[int, str]], set[str]] | None:
        """A directory's files (name -> size, ETag) and subdirectories as a fresh listing or
        a tree listing's pages have them, without a request; None if neither does."""
        listing = self.listings.get(path)
        if listing is not None and time.monotonic() - listing.at < self.cfg.list_ttl:
            return ({k: (e.size, e.etag) for k, e in listing.entries.items() if not e.is_dir},
                    {k for k, e in listing.entries.items() if e.is_dir})
        return self.trees.peek(path)

    def fresh_files(self, path: str) -> dict[str, str] | None:
        """The files (name -> ETag) of a fresh listing of a directory, or None."""
        listing = self.listings.get(path)
        if listing is None or time.monotonic() - listing.at >= self.cfg.list_ttl:
            return None
        return {n: e.etag for n, e in listing.entries.items() if not e.is_dir}

    # local changes -----------------------------------------------------------------------
    def deleted(self, path: str, etag: str) -> None:
        """The DELETE of a version hidden since its unlink was sent: the name no longer
        needs hiding, and a tree listing's page from before it must not show it (one made
        after the unlink did not hear of it: :meth:`set_entry` came first)."""
        if self.hidden.get(path) == etag:
            del self.hidden[path]
            self.trees.note(path, None)

    def set_entry(self, path: str, e: Entry | None) -> None:
        """Record a change we made in the cached listing of its parent, and in the LISTs of
        it in flight."""
        parent = self.listings.get(self.parent_of(path))
        name = path.rpartition("/")[2]
        self.trees.note(path, e)
        for changes in self._listing_now.get(self.parent_of(path), ()):
            changes[name] = e
        if parent is not None:
            if e is None:
                parent.entries.pop(name, None)
            else:
                parent.entries[name] = e
