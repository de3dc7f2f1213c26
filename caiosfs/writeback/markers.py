"""Directories made here: their marker objects (``dir/``), PUT in the background like an
upload (after ``upload_delay`` and a pause in writing); an ``ops`` entry covers each until
then, so a crash before the PUT is finished by the next mount."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..errors import StoreError
from ..index import Index
from ..paths import under
from ..records import MkdirOp
from ..store.client import StoreClient
from .journal import Journal
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Marker:
    """A directory made here whose marker object (``dir/``) is not in the store yet."""

    oid: int  # its ``ops`` entry: a crash before the PUT is finished by the next mount
    path: str  # the directory (a rename of it, or above it, moves the marker before the PUT)
    key: str
    meta: dict[str, str]
    mtime: float
    urgent: bool = False
    started: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    hurry: trio.Event = field(default_factory=trio.Event)  # set with urgent

    def now(self) -> None:
        self.urgent = True
        self.hurry.set()


@dataclass
class DirMarkers:
    store: StoreClient
    index: Index
    journal: Journal
    sched: Scheduler
    upload_delay: float
    pending: dict[str, Marker] = field(default_factory=dict)  # dir path -> marker not sent
    nursery: trio.Nursery | None = None  # set while WriteBack.run runs

    def mkdir(self, path: str, key: str, meta: dict[str, str], mtime: float,
              oid: int | None = None) -> None:
        """A new directory: its marker object is PUT in the background. ``oid``: resume one
        a crash left."""
        resumed = oid is not None
        if oid is None:
            oid = self.index.next_id()
            self.journal.put_mkdir(oid, MkdirOp(key, meta, mtime))
        m = self.pending[path] = Marker(oid, path, key, meta, mtime)
        assert self.nursery is not None
        self.nursery.start_soon(self._put, m, 0.0 if resumed else self.upload_delay)

    async def _put(self, m: Marker, delay: float) -> None:
        # The scheduler keeps the time (one wake-up per pause, not one per marker) and sets
        # m.hurry when its turn comes; m.now() and rmdir set it earlier.
        if delay > 0 and not m.urgent:
            await self.sched.wait_turn(m.oid, delay, m.hurry)
        # Parents first, as a filesystem would: SeaweedFS can drop the marker of a directory
        # PUT at the same time as one below it (16 threads, 40 such pairs: one lost), and
        # `mkdir -p` makes markers that all become due together.
        for _ in range(1 << 16):  # (m.path is read again after every wait: a rename moves it)
            pm = self.pending.get(m.path.rpartition("/")[0])
            if pm is None or pm is m:
                break
            if m.urgent:
                pm.now()
            await pm.done.wait()
        path = m.path
        if self.pending.get(path) is not m:
            return  # removed before it was sent (rmdir)
        m.started = True
        try:
            await self.store.put_file(m.key, None, 0, m.meta)  # retried until it lands
            self.index.del_op(m.oid)
        except StoreError as exc:  # not retryable (denied...): the next mount tries again
            log.error("could not create the marker of directory %s: %s", path, exc)
        finally:
            if self.pending.get(path) is m:
                del self.pending[path]
            m.done.set()
            self.sched.signal_progress()

    def below(self, path: str) -> list[str]:
        """Directories made under ``path`` whose markers are not in the store yet."""
        pre = path + "/" if path else ""
        return [p for p in self.pending if p.startswith(pre)]

    async def settle(self, path: str) -> None:
        """Markers at or under ``path`` land now (a directory rename copies what the
        store holds)."""
        waiting = [m for p, m in self.pending.items() if under(p, path)]
        for m in waiting:
            m.now()
        for m in waiting:
            await m.done.wait()

    async def move(self, src: str, dst: str, dir_key: Callable[[str], str]) -> None:
        """A rename of directory ``src`` to ``dst``: the markers at or under ``src`` not sent
        yet move with it (their ops entries rewritten in place, one commit each: a crash
        finds the old key or the new one, and the rename's own entry moves what landed under
        the old key); those being sent land first (the move copies what the store holds)."""
        below = [(p, m) for p, m in self.pending.items() if under(p, src)]
        for p, m in below:
            if m.started:
                await m.done.wait()
                continue
            if self.pending.get(p) is not m or m.started:
                continue  # (sent or removed while we waited for another one)
            new = dst + p[len(src):]
            m.path, m.key = new, dir_key(new)
            self.journal.put_mkdir(m.oid, MkdirOp(m.key, m.meta, m.mtime))
            del self.pending[p]
            self.pending[new] = m

    def hurry_all(self) -> None:
        for m in self.pending.values():
            m.now()

    async def set_meta(self, path: str, meta: dict[str, str], mtime: float) -> bool:
        """New attributes for a directory made here: True if they go with its marker, not
        sent yet; False if the caller writes them (its marker is in the store by now)."""
        m = self.pending.get(path)
        if m is not None and m.started:
            await m.done.wait()
            return False
        if m is None:
            return False
        m.meta, m.mtime = meta, mtime
        self.journal.put_mkdir(m.oid, MkdirOp(m.key, meta, mtime))
        return True

    async def rmdir(self, path: str) -> bool:
        """Forget the marker of ``path`` if it was never sent; False if the store may hold
        one (the caller deletes it)."""
        m = self.pending.get(path)
        if m is None:
            return False
        if m.started:
            await m.done.wait()
            return False
        del self.pending[path]
        self.index.del_op(m.oid)
        m.done.set()
        m.hurry.set()  # its task sees it gone and ends
        return True
