"""Directory readahead: the next small files of a directory fetched ahead of a reader.

A reader that goes through a directory's files one at a time (a restore, ``tar c``, ``cp
-r``, ``find -exec cat``) pays one round trip per file, in sequence: it opens file k+1 only
after file k came back. :class:`DirAhead` watches which files of a directory are opened
(read-only) and, once a reader is seen going through them, fetches the next small ones whole
into the block cache, several GETs in flight, so the reader finds them local.

How it decides (per directory, from the listing the kernel's readdir or the lookups left;
a directory without a fresh listing is never looked at, so no LIST is ever added):

- **In order**: files are numbered in listing order (readdir's). An open of file i after
  file j with j < i <= j + GAP continues a run. The third file of a run (or the second, if
  the run began at the directory's first file; or the first file of a directory opened
  within WALK_CARRY seconds after another directory was read in order to its end) starts
  fetching ahead: the next ``window`` files (4, doubling per open of the run up to 32, and
  no more than AHEAD_BYTES ahead of the reader). A jump breaks the run: nothing more is
  fetched for it.
- **Most of a small directory** (an import of a package reads its modules in import order,
  not listing order): once a third of a directory of at most DENSE_MAX files (and at least
  DENSE_MIN) were opened, the rest of its small files are fetched.
- **A tiny directory** (at most TINY_MAX files, TINY_BYTES in all: git's `.git/` with HEAD,
  config, index, packed-refs; a pack and its index): the first open fetches the others, a
  round trip each that the reader would otherwise pay one after another.
  And its tiny subdirectories, and theirs (`.git/refs/heads/`, `info/`, `objects/pack/`),
  as far as fresh listings or a tree listing's pages (treelist.py) know them, at most
  BELOW_BYTES and BELOW_DIRS directories in all: what git reads after HEAD, one round
  later each, comes in the same round.
- What is fetched: files of at most SMALL_MAX bytes (a larger one is the readahead window's
  job), with an ETag (in the store), not dirty, not hidden (unlinked while open); queued
  files the reader reached, or whose directory it left (no open for STALE seconds), are
  skipped. At most DEPTH of these GETs run at once (the reader's own GETs are not held up:
  they share the fetcher, which never fetches one chunk twice).

A random reader (a data loader over thousands of files) almost never makes a run of three
neighbours and reads a small fraction of a large directory, so it costs a dict lookup per
open and fetches nothing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .config import MountConfig
from .errors import FsError, StoreError
from .inodes import Node
from .metrics import Metrics
from .reader import Fetcher, ObjRef
from .storeview import Listing, StoreView
from .writeback import WriteBack

log = logging.getLogger(__name__)

GAP = 3  # an open at most this many files past the last one continues a run
FIRST_WINDOW = 4  # files fetched ahead when a run is recognised; doubles per open
MAX_WINDOW = 32  # ...up to this many files
AHEAD_BYTES = 32 << 20  # and at most this many bytes ahead of the reader
SMALL_MAX = 4 << 20  # files fetched ahead whole are at most this big
DEPTH = 16  # GETs of this module in flight at once
DENSE_MAX = 256  # "most of a small directory": directories of at most this many files
DENSE_MIN = 4  # ...once at least this many and
DENSE_SHARE = 3  # ...1/DENSE_SHARE of its files were opened
TINY_MAX = 8  # "a tiny directory": at most this many files
TINY_BYTES = 1 << 20  # ...of at most this many bytes in all
BELOW_BYTES = 1 << 20  # a tiny directory's tiny subdirectories: this many bytes in all
BELOW_DIRS = 32  # ...looked at, at most
STALE = 2.0  # seconds without an open in a directory after which its queue is dropped
WALK_CARRY = 2.0  # seconds a finished in-order directory makes the next one's first open count
MAX_DIRS = 256  # directories whose state is kept (least recently opened dropped)


@dataclass(eq=False)
class _Dir:
    path: str
    listing: Listing
    names: list[str]  # its files (not subdirectories) in listing order
    pos: dict[str, int]
    at: float = 0.0  # last open in it (monotonic)
    last: int = -1  # the file last opened
    start: int = -1  # where the current run began
    run: int = 0  # opens in order so far in the current run (after its first)
    window: int = 0  # files fetched ahead of the reader (0: not in order)
    seen: set[int] | None = None  # files opened (small directories only)
    dense: bool = False  # the rest of it was queued (most of it read)
    tiny: bool = False  # few and small files: the rest is queued at the first open
    asked: set[int] = field(default_factory=set)  # files queued already


class DirAhead:
    def __init__(self, cfg: MountConfig, view: StoreView, wb: WriteBack, fetcher: Fetcher,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.view = view
        self.wb = wb
        self.fetcher = fetcher
        self.metrics = metrics
        self.cs = cfg.chunk_size
        self._dirs: OrderedDict[str, _Dir] = OrderedDict()
        self._queue: deque[tuple[_Dir, int]] = deque()
        self._below: deque[tuple[float, ObjRef]] = deque()  # (when asked, file) of _below_tiny
        self.in_flight = 0
        self.issued = 0  # files fetched ahead so far (tests, status)
        self._walk_end = float("-inf")  # when an in-order run last reached a directory's end

    # the hook ----------------------------------------------------------------------------
    def opened(self, n: Node) -> None:
        """A file was opened for reading (called by the handle table, on the loop)."""
        parent, _, name = n.path.rpartition("/")
        listing = self.view.listings.get(parent)
        now = time.monotonic()
        if listing is None or now - listing.at >= self.cfg.list_ttl:
            return
        d = self._dirs.get(parent)
        if d is None or d.listing is not listing:
            d = self._new_dir(parent, listing)
        else:
            self._dirs.move_to_end(parent)
        i = d.pos.get(name)
        if i is None or i == d.last:
            return
        d.at = now
        if d.last < i <= d.last + GAP:
            d.run += 1
        else:
            d.run, d.start, d.window = 0, i, 0
            d.asked.clear()
        d.last = i
        if (d.run >= 2 or (d.run >= 1 and d.start == 0)
                or (i == 0 and now - self._walk_end < WALK_CARRY)):
            d.window = min(MAX_WINDOW, max(FIRST_WINDOW, d.window * 2))
            self._ahead(d, i)
            if i >= len(d.names) - GAP:
                self._walk_end = now
        if d.seen is not None:
            d.seen.add(i)
            if not d.dense and (d.tiny or len(d.seen) >= max(DENSE_MIN,
                                                              len(d.names) // DENSE_SHARE)):
                d.dense = True
                self._rest(d)
                if d.tiny:
                    self._below_tiny(d)
        if self._queue or self._below:
            self._pump()

    def _new_dir(self, path: str, listing: Listing) -> _Dir:
        names = sorted(k for k, e in listing.entries.items() if not e.is_dir)
        d = _Dir(path, listing, names, {k: i for i, k in enumerate(names)})
        if len(names) <= DENSE_MAX:
            d.seen = set()
        d.tiny = len(names) <= TINY_MAX and sum(
            self._size(d, j) for j in range(len(names))) <= TINY_BYTES
        self._dirs[path] = d
        self._dirs.move_to_end(path)
        while len(self._dirs) > MAX_DIRS:
            self._dirs.popitem(last=False)
        return d

    # what to fetch -----------------------------------------------------------------------
    def _size(self, d: _Dir, j: int) -> int:
        e = d.listing.entries.get(d.names[j])
        return e.size if e is not None else 0

    def _wanted(self, d: _Dir, j: int) -> ObjRef | None:
        """The store version of file j of ``d`` if it is worth fetching ahead."""
        e = d.listing.entries.get(d.names[j])
        if e is None or e.is_dir:
            return None
        return self._wanted_at(self.view.join(d.path, d.names[j]), e.size, e.etag)

    def _wanted_at(self, path: str, size: int, etag: str) -> ObjRef | None:
        if not etag or not 0 < size <= SMALL_MAX:
            return None
        f = self.wb.files.get(path)
        if (f is not None and not f.deleted) or self.view.hidden.get(path) == etag:
            return None
        return ObjRef(self.cfg.source.bucket, self.view.key(path), etag, size)

    def _below_tiny(self, d: _Dir) -> None:
        """Queue the files of the tiny directories below tiny ``d`` (breadth first)."""
        budget, looked, now = BELOW_BYTES, 0, time.monotonic()
        todo = deque(self.view.join(d.path, k) for k in sorted(d.listing.entries)
                     if d.listing.entries[k].is_dir)
        while todo and looked < BELOW_DIRS:
            path = todo.popleft()
            looked += 1
            known = self.view.known_dir(path)
            if known is None:
                continue
            files, dirs = known
            total = sum(size for size, _etag in files.values())
            if len(files) <= TINY_MAX and total <= budget:
                budget -= total
                for name in sorted(files):
                    obj = self._wanted_at(self.view.join(path, name), *files[name])
                    if obj is not None:
                        self._below.append((now, obj))
            todo.extend(self.view.join(path, k) for k in sorted(dirs))

    def _ahead(self, d: _Dir, i: int) -> None:
        """Queue the files of the window after file ``i`` not queued yet."""
        hi = min(len(d.names) - 1, i + d.window)
        ahead = 0
        for j in range(i + 1, hi + 1):
            ahead += self._size(d, j)
            if ahead > AHEAD_BYTES:
                break
            self._ask(d, j)

    def _rest(self, d: _Dir) -> None:
        """Queue every small file of ``d`` not opened yet (within AHEAD_BYTES)."""
        assert d.seen is not None
        total = 0
        for j in range(len(d.names)):
            if j in d.seen or j in d.asked:
                continue
            total += self._size(d, j)
            if total > AHEAD_BYTES:
                break
            self._ask(d, j)

    def _ask(self, d: _Dir, j: int) -> None:
        if j not in d.asked:
            d.asked.add(j)
            self._queue.append((d, j))

    # fetching ----------------------------------------------------------------------------
    def _pump(self) -> None:
        nursery = self.fetcher.nursery
        if nursery is None:
            return
        now = time.monotonic()
        while self._queue and self.in_flight < DEPTH:
            d, j = self._queue.popleft()
            if now - d.at > STALE or d.listing is not self.view.listings.get(d.path):
                d.asked.discard(j)  # (asked again if its reader comes back in order)
                continue  # the reader left, or the directory was listed again
            if d.seen is not None and j in d.seen:
                continue  # opened meanwhile: its reader fetches it
            if not d.dense and (j <= d.last or j > d.last + d.window):
                continue  # reached by the reader, or its run broke
            obj = self._wanted(d, j)
            if obj is None or not self.fetcher.cache.missing(obj.ident, 0,
                                                             (obj.size - 1) // self.cs):
                continue  # (not worth it, or cached already)
            self._start(obj)
        while self._below and not self._queue and self.in_flight < DEPTH:
            at, obj = self._below.popleft()
            if now - at <= STALE and self.fetcher.cache.missing(obj.ident, 0,
                                                                (obj.size - 1) // self.cs):
                self._start(obj)

    def _start(self, obj: ObjRef) -> None:
        nursery = self.fetcher.nursery
        assert nursery is not None
        self.in_flight += 1
        self.issued += 1
        self.metrics.dirahead_files.inc()
        nursery.start_soon(self._fetch, obj)

    async def _fetch(self, obj: ObjRef) -> None:
        try:
            await self.fetcher.ensure(obj, 0, (obj.size - 1) // self.cs, keep=True)
        except (FsError, StoreError) as exc:  # the reader, if it comes, fetches (and reports) again
            log.debug("fetch ahead of %s failed: %r", obj.key, exc)
        finally:
            self.in_flight -= 1
            if self._queue or self._below:
                self._pump()
