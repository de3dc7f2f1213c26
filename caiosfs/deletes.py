"""Deletes of stored objects that unlink does not send at once.

Two protocols, both crash-safe through an ``ops`` entry in the index written before the name
disappears (the next mount finishes it, see :meth:`Deletes.resume`):

- *deferred*: a stored file unlinked while open for reading is deleted at its last close, so
  the open handles keep reading it; its name is hidden meanwhile.
- *batched* (``unlink=batch``): the DELETE joins the next DeleteObjects request (up to 1,000
  keys). ``rm -rf`` of a tree paid a DELETE round trip per file; now a directory's files go
  in one request, sent before its rmdir returns (:meth:`Deletes.settle`).

Either way a deleted key is only deleted if it still is the version that was unlinked.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import trio

from .errors import StoreError
from .index import Index
from .namespace import Namespace
from .records import DeleteOp
from .store.client import GaveUp, StoreClient

log = logging.getLogger(__name__)
# How long queued DELETEs wait for more to batch with, unless something waits for them
# (rmdir, ...). rm -rf of 10 x 100 files sent 152 batches with 5 ms on a loaded machine.
DELETE_GATHER = 0.05
BATCH_MAX = 1000  # DeleteObjects takes at most 1,000 keys


@dataclass(eq=False)
class Deletes:
    client: StoreClient
    index: Index
    ns: Namespace
    # Stored files unlinked while open for reading: ino -> (ops id, path, key, etag).
    deferred: dict[int, tuple[int, str, str, str]] = field(default_factory=dict)
    # Unlinked stored files whose DELETE is queued: path -> (ops id, key, etag). Their
    # names are hidden meanwhile.
    doomed: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    _kick: trio.Event = field(default_factory=trio.Event)
    # someone waits for them: no more gathering
    _hurry: trio.Event = field(default_factory=trio.Event)
    _deleting: int = 0  # batches in flight
    # set (and replaced) whenever a batch ends
    _deleted: trio.Event = field(default_factory=trio.Event)

    async def resume(self, oid: int, op: DeleteOp) -> None:
        """An unlink whose last close (or batch) a crash prevented."""
        await self.delete_version(op.key, op.etag, oid)

    async def delete_version(self, key: str, etag: str, oid: int) -> bool:
        """Delete ``key`` if it still is version ``etag``; a failure leaves the ops entry
        for the next mount (and returns False)."""
        try:
            try:
                info = await self.client.head(key)
            except StoreError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                if info.etag == etag:
                    await self.client.delete(key, patient=False)
        except StoreError as exc:
            log.warning("deferred delete of %s failed (%s); retried at the next mount", key, exc)
            return False
        self.index.del_op(oid)
        return True

    def defer(self, ino: int, path: str, etag: str) -> None:
        """Delete at the last close of inode ``ino``; hide the name now."""
        oid = self.index.next_id()
        key = self.ns.key(path)
        self.index.put_op(oid, DeleteOp(key, etag))
        self.deferred[ino] = (oid, path, key, etag)
        self.ns.hidden[path] = etag

    async def closed(self, ino: int) -> None:
        """The last handle on ``ino`` was released: its deferred delete, if any, goes now."""
        if ino not in self.deferred:
            return
        oid, path, key, etag = self.deferred.pop(ino)
        await self.delete_version(key, etag, oid)
        self.ns.view.deleted(path, etag)

    def queue(self, path: str, key: str, etag: str) -> None:
        """The DELETE of ``key`` (version ``etag``) joins the next batch."""
        oid = self.index.next_id()
        self.index.put_op(oid, DeleteOp(key, etag), sync=False)
        self.doomed[path] = (oid, key, etag)
        self.ns.hidden[path] = etag
        self._kick.set()

    async def run(self) -> None:
        """Send queued DELETEs in batches, for ever (in the core's nursery)."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            with trio.move_on_after(DELETE_GATHER):
                await self._hurry.wait()
            self._hurry = trio.Event()
            while self.doomed:
                batch = dict(list(self.doomed.items())[:BATCH_MAX])
                for p in batch:
                    del self.doomed[p]
                self._deleting += 1
                try:
                    await self._send(batch)
                finally:
                    self._deleting -= 1
                    self._deleted.set()
                    self._deleted = trio.Event()

    async def _send(self, batch: dict[str, tuple[int, str, str]]) -> None:
        keys = [k for _, k, _ in batch.values()]
        try:
            failed = set(await self.client._run(
                "delete_many", self.client.store.delete_many, keys,  # type: ignore[attr-defined]
                limiter=self.client.write_limiter, deadline=self.client.read_timeout))
        except StoreError as exc:
            # (A store that does not know DeleteObjects answers at once: one by one then.)
            if isinstance(exc, GaveUp):
                log.warning("batch delete of %d objects failed (%s); retried at the next "
                            "mount", len(keys), exc)
                return
            log.warning("batch delete of %d objects failed (%s); deleting one by one",
                        len(keys), exc)
            failed = set(keys)
        for path, (oid, key, etag) in batch.items():
            if key in failed and not await self.delete_version(key, etag, oid):
                # The store keeps failing (bounded: rmdir and the others wait for this):
                # the name stays hidden here, the ops entry retries it at the next mount.
                continue
            if key not in failed:
                self.index.del_op(oid)
            self.ns.view.deleted(path, etag)

    async def settle(self, prefix: str | None = None) -> None:
        """Wait until queued DELETEs (of keys under ``prefix``, or all) are sent."""
        def pending() -> bool:
            return any(prefix is None or k.startswith(prefix)
                       for _, k, _ in self.doomed.values()) or self._deleting > 0
        while pending():
            self._kick.set()
            self._hurry.set()
            await self._deleted.wait()

    def take(self, path: str) -> tuple[int, str, str] | None:
        """A name whose batched DELETE is queued and not sent yet is created again as a file:
        the DELETE leaves the queue and its (ops id, key, ETag) is returned, so the new file
        replaces that version (an upload If-Match it) instead of waiting a round trip for
        the DELETE (git checkout unlinks and recreates every file it changes). The caller
        journals the new file, then calls :meth:`taken`; if it fails, :meth:`give_back`.
        A crash between the two leaves the ops entry and a journal entry over the same
        version: the file supersedes the delete at the next start (:meth:`superseded`)."""
        return self.doomed.pop(path, None)

    def taken(self, path: str, d: tuple[int, str, str]) -> None:
        oid, _, etag = d
        self.index.del_op(oid)
        if self.ns.hidden.get(path) == etag:
            del self.ns.hidden[path]

    def give_back(self, path: str, d: tuple[int, str, str]) -> None:
        self.doomed[path] = d
        self._kick.set()

    @staticmethod
    def superseded(op: DeleteOp, journaled: set[tuple[str, str]]) -> bool:
        """Whether a journaled file replaces the version this delete was for (see take)."""
        return (op.key, op.etag) in journaled

    async def moving(self, dir_path: str) -> None:
        """A directory is about to be renamed: the move copies every object below it, so
        the DELETEs of files unlinked there go first - queued ones are sent, and deferred
        ones happen now (a file unlinked while open came back under the new name; handles
        still open on it may then fail to read what is not cached, as with :meth:`claim`)."""
        for ino, d in list(self.deferred.items()):
            if d[1].startswith(dir_path + "/") and ino in self.deferred:
                await self.closed(ino)
        await self.settle(self.ns.dir_key(dir_path))

    async def claim(self, path: str) -> None:
        """A name is being reused: a deferred delete of the old object there happens now
        (handles still open on it may then fail to read what is not cached)."""
        if path in self.doomed or self._deleting:
            await self.settle(self.ns.key(path))
        if path in self.ns.hidden:
            for ino, d in list(self.deferred.items()):
                if d[1] == path:
                    await self.closed(ino)
