"""Directory attribute records: the x-amz-meta-* of a directory's files in one small object.

A listing (ListObjectsV2) carries no user metadata, so with an empty cache (a remount,
another node) the exact mode, owner and times of each listed file cost a HEAD
(``metadata=head``: ``git status`` of a checkout made ~1,000 HEADs per 1,000 files). With
``-o dirattrs=1`` (the devbox profile) this mount also writes, per directory it uploads
files into, one object ``PREFIX/DIR/.caiosfs-attrs`` (:data:`RECORD`) holding what it
uploaded there, keyed by name::

    {"v": 1, "files": {"name": ["<ETag>", size, {"mode": "33188", "mtime": "..."}]}}

A listing then GETs that record (in parallel with its first LIST page) and takes a listed
object's metadata from it only when the record's ETag and size for that name equal the
listing's, and the object is not newer than the record (:func:`covered`; a metadata-only
copy by another client keeps the ETag but not the Last-Modified). Everything else is HEADed
as before: the record is an optimisation, never a source of truth, and not part of crash
safety - a record lost, stale, corrupt or written by someone else costs HEADs, never a
wrong attribute.

Writing (:class:`DirAttrs`): every upload that lands is noted (:meth:`DirAttrs.note_uploaded`),
every name that leaves a directory too (:meth:`DirAttrs.note_removed`); a directory's record
is written DEBOUNCE seconds after the last change noted in it (at most MAX_DEFER after the
first), one PUT per directory in flight, starting from the record read at its last listing
(or a GET of it), with our changes applied and names a fresh listing no longer has pruned.
A directory of more than MAX_NAMES names gets no record. ``caiosfs flush`` and unmount write
what is pending (:meth:`DirAttrs.flush`). A failed write is logged once at warning and
dropped. rmdir and a directory rename hold the directory's tree while they run
(:class:`Hold`): no record there is written meanwhile, and what is noted there (an upload the
rename waited for lands under the old name) is kept aside, so that no record PUT lands in a
directory that is gone (a record written after the move listed the old name empty made the
directory come back, holding only its record, at the next mount). A rename first writes what
is pending there (the records move with the objects, and must not move stale: the copies'
fresh Last-Modified would make a stale entry look current) and notes what was kept aside
under the new names; an rmdir that failed notes it again, one that succeeded drops it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from .attrs import RECORD
from .errors import StoreError
from .paths import under
from .store.client import StoreClient

log = logging.getLogger(__name__)

VERSION = 1
MAX_NAMES = 10_000  # a directory with more names gets no record
MAX_BYTES = 8 << 20  # a record read is at most this big (10,000 names are ~2 MB)
DEBOUNCE = 1.0  # seconds after the last change noted in a directory
MAX_DEFER = 5.0  # ...and at most this long after the first one
KNOWN_MAX = 2048  # records (or their absence) kept in memory, least recently seen dropped
WRITERS = 8  # record PUTs in flight at once

# name -> (ETag, size, x-amz-meta-*)
Files = dict[str, tuple[str, int, dict[str, str]]]
Change = tuple[str, int, dict[str, str]] | None  # a name's new entry (None: removed)


@dataclass(eq=False)
class Hold:
    """A directory tree being moved or removed: no record in it is written meanwhile."""

    top: str
    noted: dict[str, Change] = field(default_factory=dict)  # path -> change, kept aside
    to: str | None = None  # moved there (set by the caller once the move is done)
    removed: bool = False  # removed (set by the caller once it is gone)


@dataclass
class Record:
    """A record as read from the store: its files, and its own ETag and Last-Modified."""

    files: Files
    etag: str
    mtime: float


# Records larger than this are encoded and parsed in a worker thread, not on the trio loop.
ON_LOOP_BYTES = 64 << 10
ON_LOOP_NAMES = 256


def encode(files: Files) -> bytes:
    body = {"v": VERSION, "files": {n: [e, s, m] for n, (e, s, m) in sorted(files.items())}}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def parse(data: bytes) -> Files | None:
    """The files of a record, or None (logged at debug) if it is not one we understand."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("unknown version")
        raw = doc["files"]
        if not isinstance(raw, dict):
            raise TypeError("files is not an object")
        out: Files = {}
        for name, v in raw.items():
            etag, size, meta = v
            if not (isinstance(etag, str) and isinstance(size, int) and isinstance(meta, dict)
                    and all(isinstance(k, str) and isinstance(x, str)
                            for k, x in meta.items())):
                raise ValueError(f"bad entry for {name!r}")
            out[name] = (etag, size, meta)
        return out
    except (ValueError, KeyError, TypeError) as exc:
        log.debug("ignoring a directory attribute record: %s", exc)
        return None


def covered(rec: Record, name: str, etag: str, size: int, mtime: float) -> dict[str, str] | None:
    """The metadata the record holds for a listed object, if it may be trusted: same ETag
    and size, and the object not modified after the record was written (whole seconds:
    HTTP dates have no fraction)."""
    got = rec.files.get(name)
    if got is None or not etag or got[0] != etag or got[1] != size:
        return None
    if math.floor(mtime) > math.floor(rec.mtime):
        return None
    return dict(got[2])


class DirAttrs:
    """Reads records for listings; with ``write``, keeps this mount's records up to date.

    ``listed(dir_path)``: the files (name -> ETag) of a fresh listing of the directory, or
    None; used to prune names that left it.
    """

    def __init__(self, client: StoreClient, prefix: str, write: bool,
                 listed: Callable[[str], dict[str, str] | None]) -> None:
        self.client = client
        self.prefix = prefix
        self.write = write
        self.listed = listed
        # dir path -> files of its record in the store as last read or written ({}: none)
        self.known: OrderedDict[str, Files] = OrderedDict()
        # dir path -> name -> entry (None: removed) not written yet
        self.pending: dict[str, dict[str, Change]] = {}
        self.due: dict[str, tuple[float, float]] = {}  # dir -> (first change, write at)
        self.writing: dict[str, trio.Event] = {}
        self.holds: list[Hold] = []  # trees being moved or removed
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(WRITERS)
        self._warned = False

    # paths ---------------------------------------------------------------------------------
    def key(self, dir_path: str) -> str:
        return self.prefix + (dir_path + "/" if dir_path else "") + RECORD

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        d, _, name = path.rpartition("/")
        return d, name

    # reading -------------------------------------------------------------------------------
    async def load(self, dir_path: str) -> Record | None:
        """GET a directory's record (None: there is none, or it is not one we understand);
        what it holds becomes the base of this mount's next write of it."""
        info = await self.client.get_small(self.key(dir_path), MAX_BYTES)
        data = (info.data or b"") if info is not None else b""
        # (A record of thousands of names is ~0.1-1.5 MB of JSON: parsed off the loop.)
        files = None if info is None else (
            parse(data) if len(data) <= ON_LOOP_BYTES
            else await trio.to_thread.run_sync(parse, data))
        self.seen(dir_path, files or {})
        if info is None or files is None:
            return None
        return Record(files, info.etag, info.mtime)

    def seen(self, dir_path: str, files: Files) -> None:
        """What the store holds as ``dir_path``'s record ({}: none; a directory made here):
        the base of the next write (kept only by a mount that writes records)."""
        if not self.write:
            return
        self.known[dir_path] = files
        self.known.move_to_end(dir_path)
        while len(self.known) > KNOWN_MAX:
            self.known.popitem(last=False)

    # changes -------------------------------------------------------------------------------
    def note_uploaded(self, path: str, etag: str, size: int, meta: dict[str, str]) -> None:
        if self.write and etag:
            self._note(path, (etag, size, dict(meta)))

    def note_removed(self, path: str) -> None:
        if self.write:
            self._note(path, None)

    def _note(self, path: str, entry: Change) -> None:
        d, name = self._split(path)
        for h in self.holds:
            if under(d, h.top):
                h.noted[path] = entry  # (its objects are being moved or deleted)
                return
        self.pending.setdefault(d, {})[name] = entry
        now = trio.current_time()
        first = self.due.get(d, (now, 0.0))[0]
        self.due[d] = (first, min(now + DEBOUNCE, first + MAX_DEFER))
        self._wake.set()

    def held(self, d: str) -> bool:
        return any(under(d, h.top) for h in self.holds)

    def moving(self, dir_path: str) -> AbstractAsyncContextManager[Hold]:
        """While a directory (and everything below it) is renamed: what is pending there is
        written first (its records move with its objects), then nothing there is written;
        the caller sets ``to`` once it moved, and what was noted meanwhile is noted there."""
        return self._holding(dir_path, self._write_held)

    def removing(self, dir_path: str) -> AbstractAsyncContextManager[Hold]:
        """While a directory is removed (rmdir): no record in it is written (a write in
        flight is waited for); the caller sets ``removed`` once it is gone, else what is
        pending there, and what was noted meanwhile, is written later as usual."""
        return self._holding(dir_path, self._writes_done)

    @asynccontextmanager
    async def _holding(self, dir_path: str, first: Callable[[str], Awaitable[None]]
                       ) -> AsyncIterator[Hold]:
        h = Hold(dir_path)
        self.holds.append(h)
        try:
            await first(dir_path)
            yield h
        finally:
            self._release(h)

    def _release(self, h: Hold) -> None:
        self.holds.remove(h)
        for d in [d for d in self.known if under(d, h.top)]:
            del self.known[d]  # (moved or deleted by the caller: read again if needed)
        if h.to is not None or h.removed:
            self._forget(h.top)  # (nothing is left there; never written there again)
        for path, entry in h.noted.items():
            if h.to is not None:
                self._note(h.to + path[len(h.top):], entry)
            elif not h.removed:
                self._note(path, entry)  # (not moved nor removed after all)
        self._wake.set()  # (what is due there may be written again)

    def _forget(self, dir_path: str) -> None:
        for d in [d for d in self.pending if under(d, dir_path)]:
            del self.pending[d]
            self.due.pop(d, None)

    async def _writes_done(self, top: str) -> None:
        for ev in [ev for d, ev in self.writing.items() if under(d, top)]:
            await ev.wait()

    async def _write_held(self, top: str) -> None:
        """Write what is pending under the held ``top`` now (after the writes in flight)."""
        await self._writes_done(top)
        async with trio.open_nursery() as nursery:
            for d in [d for d in self.pending if under(d, top) and d not in self.writing]:
                self._start(nursery, d)

    # writing -------------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background writer: each directory's record DEBOUNCE s after its last change."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for d in [d for d, (_, at) in self.due.items()
                          if at <= now and d not in self.writing and not self.held(d)]:
                    self._start(nursery, d)
                self._wake = trio.Event()
                nxt = min((at for d, (_, at) in self.due.items()
                           if d not in self.writing and not self.held(d)), default=math.inf)
                with trio.move_on_at(nxt):
                    await self._wake.wait()

    def _start(self, nursery: trio.Nursery, d: str) -> None:
        self.due.pop(d, None)
        self.writing[d] = trio.Event()
        nursery.start_soon(self._write, d)

    async def flush(self) -> None:
        """Write every pending record now (``caiosfs flush``, unmount), after the writes in
        flight; each PUT is bounded by read_timeout."""
        for _ in range(3):  # (changes noted while it runs get another round, twice)
            for ev in list(self.writing.values()):
                await ev.wait()
            if not [d for d in self.pending if not self.held(d)]:
                return
            async with trio.open_nursery() as nursery:
                for d in [d for d in self.pending if d not in self.writing and not self.held(d)]:
                    self._start(nursery, d)

    async def _write(self, d: str) -> None:
        try:
            async with self._limiter:
                await self._write_now(d)
        except StoreError as exc:
            if not self._warned:
                self._warned = True
                log.warning("directory attribute record of %r not written (%s); listings "
                            "of it will HEAD its files (logged once)", d or "/", exc)
            else:
                log.debug("directory attribute record of %r not written: %s", d or "/", exc)
        finally:
            self.writing.pop(d).set()
            self._wake.set()

    async def _write_now(self, d: str) -> None:
        changes = self.pending.pop(d, None)
        if not changes:
            return
        base = self.known.get(d)
        if base is None:
            await self.load(d)
            base = self.known.get(d, {})
        files = dict(base)
        for name, entry in changes.items():
            if entry is None:
                files.pop(name, None)
            else:
                files[name] = entry
        listed = self.listed(d)
        if listed is not None:  # names that left the directory, versions replaced since
            files = {n: v for n, v in files.items()
                     if n in listed and (not listed[n] or listed[n] == v[0])}
        if files == base:
            return
        key = self.key(d)
        if len(files) > MAX_NAMES or not files:
            if base:
                await self.client.delete(key, patient=False)
            self.seen(d, {})
            return
        body = (encode(files) if len(files) <= ON_LOOP_NAMES
                else await trio.to_thread.run_sync(encode, files))
        await self.client.put_file(key, body, len(body), {}, patient=False)
        self.seen(d, files)
