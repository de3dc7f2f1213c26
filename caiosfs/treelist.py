"""Listings of a whole subtree at once, for a walk through a tree after a cold mount.

``git status`` after a cold remount lstat()s every file of a checkout in index order; every
directory it enters costs a LIST (and, with dirattrs, its record's GET) before the next one
can start: behind a remote store one round trip per directory, in a row. With
``list_ahead=N`` (the devbox profile), the first cold listing of a directory ``D`` lists
everything below ``D`` without a delimiter instead (ListObjectsV2 pages of 1,000 keys, at
most ``N`` pages, in the background). The listing of ``D`` and of every directory below it
whose keys the pages covered is then taken from them (the attribute records they name are
GET as soon as a page names them, several at a time), as a LIST of that directory made when
its page was requested would have answered.

When a page covers a directory: the keys come in order, so once a key past all of
``D/``'s keys has arrived (or the listing reached its end), every key of ``D`` is known. A
directory the pages did not reach (the page budget ran out first) is listed as before.
Changes this mount makes while a tree listing is kept (:meth:`TreeLister.note`) are applied
on top of it, as :class:`~caiosfs.storeview.StoreView` does for a LIST in flight; a
directory whose listing is dropped (a rename, an rmdir, a conflict) is never taken from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from .attrs import RECORD, valid_name
from .dirattrs import Record
from .errors import StoreError
from .paths import under
from .store.client import StoreClient

log = logging.getLogger(__name__)

MAX_TREES = 8  # tree listings kept (running or done) at once
RECORD_GETS = 16  # records GET at once
MAX_RECORDS = 256  # records a tree GETs ahead of their directories' listings
RECORDS_KEPT = 4096  # records (or their GETs in flight) kept for the trees
# A store whose quickest recent LIST of a directory took at least this long is across a
# network: a round trip per directory is what a tree listing saves. Nearer (a store on
# the same machine or rack), a page of 1,000 keys costs the server about what the
# directories' own LISTs do (SeaweedFS on the development VMs: ~70 ms for a page, 3-10 ms
# for a directory's LIST), and trees are not listed.
REMOTE_LIST_S = 0.015
LIST_SAMPLES = 8  # the LISTs that quickest is taken over
PAGE_KEYS = 1000


@dataclass
class Keys:
    """What a tree's pages said about one directory."""

    at: float  # when the first page holding a key of it was requested (monotonic)
    files: dict[str, tuple[int, str, float]] = field(default_factory=dict)  # size, ETag, mtime
    dirs: set[str] = field(default_factory=set)
    record: str | None = None  # ETag of its attribute record
    skipped: list[str] = field(default_factory=list)  # keys that cannot be paths


@dataclass
class Taken:
    """A directory's listing as a tree listing has it, for StoreView.list_dir."""

    keys: Keys
    changes: dict[str, object]  # name -> Entry | None: this mount's changes since
    landing: dict[str, object]  # path -> its marker: pending when the pages began
    record: Callable[[], Awaitable[Record | None]] | None  # its record, when it has one


class Tree:
    """One tree listing: the keys below ``path`` (``pre`` in the store)."""

    def __init__(self, path: str, pre: str, pages: int, landing: dict[str, object]) -> None:
        self.path, self.pre = path, pre
        self.pages_left = pages
        self.started = time.monotonic()
        self.dirs: dict[str, Keys] = {path: Keys(self.started)}
        self.last = ""  # the last key received
        self.done = False  # every key below ``pre`` received
        self.stopped = False  # no more pages will come (done, budget spent or failed)
        self.progress = trio.Event()  # set (and replaced) after each page
        self.changes: dict[str, object] = {}  # path -> Entry | None
        # Markers of directories made here that were not in the store when the pages began
        # (one landing meanwhile may be in neither the pages nor the write-back by the time
        # its directory is taken): path -> marker.
        self.landing = landing
        self.gone: set[str] = set()  # paths whose listings were dropped: not taken
        self.records = 0  # records it had GET ahead

    def changes_in(self, path: str) -> dict[str, object]:
        """This mount's changes since the pages to the entries of directory ``path``:
        name -> Entry | None."""
        return {p.rpartition("/")[2]: e for p, e in self.changes.items()
                if p.rpartition("/")[0] == path}

    def holds(self, path: str) -> bool:
        return under(path, self.path)

    def key_of(self, path: str) -> str:
        """The store prefix of the keys of directory ``path`` (below ``pre``)."""
        return self.pre + path[len(self.path):].lstrip("/") + "/" if path != self.path \
            else self.pre

    def covers(self, path: str) -> bool:
        """Whether every key of ``path`` has arrived."""
        if self.done:
            return True
        k = self.key_of(path)
        return bool(self.last) and self.last > k and not self.last.startswith(k)

    def reaching(self, path: str) -> bool:
        """Whether the pages are among the keys of ``path`` now."""
        return self.last.startswith(self.key_of(path))

    def fresh(self, path: str, ttl: float) -> bool:
        k = self.dirs.get(path)
        at = k.at if k is not None else self.started
        return time.monotonic() - at < ttl

    def dropped(self, path: str) -> bool:
        return any(under(path, g) for g in self.gone)

    def add(self, key: str, size: int, etag: str, mtime: float, at: float) -> str | None:
        """One listed key; the directory it is the attribute record of, if it is one."""
        *dirs, name = key[len(self.pre):].split("/")
        d = self.path
        self._dir(d, at)
        for part in dirs:
            if not valid_name(part):
                self.dirs[d].skipped.append(key)
                return None
            self.dirs[d].dirs.add(part)
            d = f"{d}/{part}" if d else part
            self._dir(d, at)
        if name == RECORD:
            self.dirs[d].record = etag
            return d
        if not valid_name(name):
            if name:  # ("": a directory's own marker)
                self.dirs[d].skipped.append(key)
            return None
        self.dirs[d].files[name] = (size, etag, mtime)
        return None

    def _dir(self, d: str, at: float) -> None:
        if d not in self.dirs:
            self.dirs[d] = Keys(at)


class TreeLister:
    """The tree listings of a mount (``pages`` per tree; 0: none)."""

    def __init__(self, client: StoreClient, prefix: str, pages: int, ttl: float,
                 pending_markers: Callable[[str], dict[str, object]]) -> None:
        self.client = client
        self.prefix = prefix
        self.pages = pages
        self.ttl = ttl
        self.pending_markers = pending_markers
        # GETs a directory's attribute record (set when records are read with listings)
        self.load_record: Callable[[str], Awaitable[Record | None]] | None = None
        self.nursery: trio.Nursery | None = None  # set when the mount starts
        self.trees: list[Tree] = []
        self._lists: deque[float] = deque(maxlen=LIST_SAMPLES)  # recent LISTs' durations
        # (dir path, record ETag) -> its GET: done when the event is set, the record in the
        # list (empty: none). Shared by the trees: nested trees name the same records.
        self._records: dict[tuple[str, str], tuple[trio.Event, list[Record | None]]] = {}
        self._record_gets = trio.CapacityLimiter(RECORD_GETS)

    def _pre(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def _tree_for(self, path: str) -> Tree | None:
        """The deepest tree listing that holds ``path`` and may still cover it."""
        best = None
        for t in self.trees:
            usable = t.holds(path) and not t.dropped(path) and t.fresh(path, self.ttl)
            if usable and (t.covers(path) or not t.stopped) and (
                    best is None or len(t.path) > len(best.path)):
                best = t
        return best

    async def take(self, path: str) -> Taken | None:
        """``path``'s listing from a tree listing that covers it, or None: list it as
        usual. A tree whose pages are among ``path``'s keys right now, or whose first page
        has not come yet, is waited for, one page at most (a large directory is listed as usual rather than waited for page by
        page). When no tree will cover it, a tree listing of ``path`` starts in the
        background, for the directories below it: ``path`` itself is listed as before,
        meanwhile, so a directory's first listing never waits longer than it did."""
        if self.pages <= 0 or self.nursery is None:
            return None
        self._expire()
        t = self._tree_for(path)
        if t is not None and not t.covers(path) and (t.reaching(path) or not t.last):
            # (and a tree whose first page is on its way: a walk down a path outruns it,
            # and a small tree is whole in it)
            await self._wait(t)
        if t is not None and t.covers(path):
            if t.dropped(path) or not t.fresh(path, self.ttl):
                return None
            keys = t.dirs.get(path) or Keys(t.started)
            changes = t.changes_in(path)
            landing = {p: m for p, m in t.landing.items() if p.rpartition("/")[0] == path}
            return Taken(keys, changes, landing, self._record_of(path, keys.record)
                         if keys.record and self.load_record is not None else None)
        if ((t is None or not t.reaching(path)) and len(self.trees) < MAX_TREES
                and self.remote()):
            t = Tree(path, self._pre(path), self.pages, self.pending_markers(path))
            self.trees.append(t)
            self.nursery.start_soon(self._run, t)
        return None

    def peek(self, path: str) -> tuple[dict[str, tuple[int, str]], set[str]] | None:
        """What a fresh tree listing that covers ``path`` says of it now, without waiting
        or listing: its files (name -> size, ETag) and subdirectories; names this mount
        changed since the pages are left out. None when no tree has it (dirahead.py)."""
        if self.pages <= 0:
            return None
        t = self._tree_for(path)
        keys = t.dirs.get(path) if t is not None else None
        if (t is None or keys is None or not t.covers(path) or t.dropped(path)
                or not t.fresh(path, self.ttl)):
            return None
        changed = set(t.changes_in(path))
        return ({n: (s, e) for n, (s, e, _m) in keys.files.items() if n not in changed},
                keys.dirs - changed)

    def observe(self, seconds: float) -> None:
        """How long a directory's LIST (one page, with a delimiter) took."""
        self._lists.append(seconds)

    def remote(self) -> bool:
        """Whether the store is far enough for trees to pay (REMOTE_LIST_S)."""
        return bool(self._lists) and min(self._lists) >= REMOTE_LIST_S

    @staticmethod
    async def _wait(t: Tree) -> None:
        """Until the tree's next page."""
        if not t.stopped:
            await t.progress.wait()

    def _record_of(self, d: str, etag: str) -> Callable[[], Awaitable[Record | None]]:
        async def get() -> Record | None:
            ev, out = self._record_get(d, etag)
            await ev.wait()
            return out[0] if out else None
        return get

    def _record_get(self, d: str, etag: str) -> tuple[trio.Event, list[Record | None]]:
        """The GET of directory ``d``'s record of that ETag: started if it was not."""
        got = self._records.get((d, etag))
        if got is not None:
            return got
        ev, out = trio.Event(), cast(list[Record | None], [])
        if len(self._records) >= RECORDS_KEPT:
            self._records = {k: v for k, v in self._records.items() if not v[0].is_set()}
        self._records[(d, etag)] = (ev, out)
        load, nursery = self.load_record, self.nursery
        if load is None or nursery is None:
            ev.set()
            return ev, out

        async def one() -> None:
            try:
                async with self._record_gets:
                    out.append(await load(d))
            except StoreError as exc:  # an optimisation: the listing goes on without it
                log.debug("attribute record of %r not read: %s", d or "/", exc)
            finally:
                ev.set()
        nursery.start_soon(one)
        return ev, out

    async def _run(self, t: Tree) -> None:
        token = None
        try:
            while t.pages_left > 0:
                t.pages_left -= 1
                at = time.monotonic()
                page = await self.client.list(t.pre, None, token, PAGE_KEYS)
                known = len(t.dirs)
                for o in page.objects:
                    d = t.add(o.key, o.size, o.etag, o.mtime, at)
                    # (its own directory's record: GET by the listing it was started by)
                    if (d is not None and d != t.path and t.records < MAX_RECORDS
                            and self.load_record is not None):
                        t.records += 1
                        self._record_get(d, o.etag)
                if page.objects:
                    t.last = max(t.last, page.objects[-1].key)
                token = page.next_token
                if not token:
                    t.done = True
                    break
                # Go on while it is a tree: a page of one large directory's files is what
                # its own LIST gives (a listing waits for one page at most).
                if len(t.dirs) - known < 2:
                    break
                self._wake(t)
        except StoreError as exc:
            log.debug("tree listing of %r stopped: %s", t.path or "/", exc)
        except Exception:  # a bug here must not take the mount down: lists as before
            log.exception("tree listing of %r failed", t.path or "/")
        finally:
            t.stopped = True
            self._wake(t)

    @staticmethod
    def _wake(t: Tree) -> None:
        t.progress.set()
        t.progress = trio.Event()

    def _expire(self) -> None:
        now = time.monotonic()
        self.trees = [t for t in self.trees if not t.stopped or now - t.started < self.ttl
                      or math.isinf(self.ttl)]
        if len(self.trees) >= MAX_TREES:  # the oldest finished ones make room
            done = sorted((t for t in self.trees if t.stopped), key=lambda t: t.started)
            for t in done[:len(self.trees) - MAX_TREES + 1]:
                self.trees.remove(t)

    # this mount's changes ------------------------------------------------------------------
    def note(self, path: str, entry: object) -> None:
        """A change this mount made to ``path`` (an Entry, None: removed)."""
        for t in self.trees:
            if t.holds(path) and path != t.path:
                t.changes[path] = entry

    def drop(self, path: str) -> None:
        """``path``'s listing (and those below it) dropped: never taken from a tree."""
        for t in self.trees:
            if t.holds(path) or under(t.path, path):
                t.gone.add(path)
