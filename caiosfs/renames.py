"""Rename: a file is copy + delete; a directory moves every object below it, resumably.

A directory rename writes an ``ops`` entry (``rename_dir``) before it moves anything, and
the move (:meth:`Renames.move_prefix`) is idempotent, so the next mount finishes a move that
a crash interrupted (:meth:`Renames.resume`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .attrs import RECORD
from .copies import copy_object
from .deletes import Deletes
from .errors import FsError, StoreError
from .index import Index
from .inodes import Node
from .namespace import Namespace
from .records import RenameDirOp
from .store.client import StoreClient
from .storeview import Entry
from .writeback import DirtyFile, WriteBack

log = logging.getLogger(__name__)
MAX_KEY = 1024  # S3's limit on object keys, in UTF-8 bytes
# renameat2(2) flags (Linux values, as the kernel sends them)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MOVES_IN_FLIGHT = 16  # copies of one listing page run this many at a time


def new_path(ns: Namespace, parent: str, name: str, is_dir: bool = False) -> str:
    """The path of a name about to be created; its object key must fit S3's 1,024 bytes
    (a longer one could never be uploaded and would stay dirty for ever). The name of
    directory attribute records is refused (EPERM)."""
    if name == RECORD:
        raise FsError(errno.EPERM, f"{RECORD} is reserved for directory attribute records")
    path = ns.join(parent, name)
    key = ns.dir_key(path) if is_dir else ns.key(path)
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY:
        raise FsError(errno.ENAMETOOLONG, f"object key would exceed {MAX_KEY} bytes")
    return path


@dataclass(eq=False)
class Renames:
    client: StoreClient
    index: Index
    ns: Namespace
    wb: WriteBack
    deletes: Deletes

    async def not_empty(self, path: str) -> bool:
        """Whether the directory ``path`` has anything below it, here or in the store."""
        return bool(self.wb.under(path) or self.wb.markers_below(path)
                    or await self.ns.list_dir(path, force=True))

    async def rename(self, old_parent: Node, src_name: str, new_parent: Node, dst_name: str,
                     flags: int) -> None:
        n = await self.ns.lookup(old_parent, src_name, want_meta=False)
        src = n.path
        dst = new_path(self.ns, new_parent.path, dst_name, is_dir=n.is_dir)
        if src == dst:
            return
        await self.deletes.claim(dst)
        try:
            target: Node | None = await self.ns.lookup(new_parent, dst_name, want_meta=False)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            target = None
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target.is_dir and not n.is_dir:
                raise FsError(errno.EISDIR)
            if n.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and await self.not_empty(dst):
                raise FsError(errno.ENOTEMPTY)
        if n.is_dir:
            if dst.startswith(src + "/"):
                raise FsError(errno.EINVAL)
            if target is not None:
                if not await self.wb.rmdir(dst):
                    await self.client.delete(self.ns.dir_key(dst), patient=False)
                # Its listing (empty, cached by mkdir, say) must not answer for what moves
                # in: lookups below it met ENOENT for list_ttl.
                self.ns.drop_path(dst)
            await self._rename_dir(src, dst)
            local = False
        else:
            local = await self._rename_file(n, src, dst, target)
        self.ns.set_entry(src, None)
        self.ns.move(src, dst)
        moved = self.ns.nodes.get(self.ns.by_path.get(dst, 0))
        if moved is None:
            return
        if local and dst not in self.wb.files:
            # BEHAVIOUR FIX: the local file's upload under dst landed while this rename
            # waited (deleting src), before the inode moved there, so the inode still holds
            # src's ETag: recording it made the next open or truncate ask the store for a
            # version dst never had (ESTALE). The next open asks the store instead.
            moved.validated = float("-inf")
        else:
            self.ns.set_entry(dst, moved.entry)

    async def _rename_file(self, n: Node, src: str, dst: str, target: Node | None) -> bool:
        """Rename a file; True if it was a local (dirty) file that moved with it."""
        dst_etag = target.entry.etag if target is not None and target.entry.etag else None
        f = self.wb.files.get(src)
        if f is not None and self.wb.worth_finishing(f):
            await self.wb.wait_durable(f)  # then copied server-side, below
        # wb.rename waits for an upload of src in flight and says what the store holds at src.
        moved, src_etag = await self.wb.rename(src, dst, dst_etag)
        if moved:
            src_in_store = bool(src_etag)
        else:
            src_in_store = bool(n.entry.etag)
            # A local file at dst goes first: its upload must not land after the copy.
            await self.wb.unlink(dst)
            etag = await copy_object(self.client, self.ns, self.ns.key(src), self.ns.key(dst),
                                     None, n.entry.size, n.entry.etag, known=n.entry.meta)
            n.entry = Entry(False, n.entry.size, etag, n.entry.mtime, n.entry.meta)
        if src_in_store:
            await self.client.delete(self.ns.key(src), patient=False)
        return moved

    async def _rename_dir(self, src: str, dst: str) -> None:
        await self.deletes.moving(src)  # the move must not copy unlinked files
        oid = self.index.next_id()
        src_key, dst_key = self.ns.dir_key(src), self.ns.dir_key(dst)
        self.index.put_op(oid, RenameDirOp(src_key, dst_key))
        # Markers not sent yet move with the directory (the ops entry above covers those
        # that land under the old name meanwhile).
        await self.wb.move_markers(src, dst, self.ns.dir_key)
        # Local files move locally and upload at once under their new names; a file whose
        # upload is far along finishes it under the old name first and is copied with the
        # objects below (see WriteBack.worth_finishing), all of them at once.
        local = self.wb.under(src)
        finishing = [f for f in local if self.wb.worth_finishing(f)]
        # The others start no upload (nor part) until the rename is done: the move awaits
        # the store between files, and a file of the old directory, quiet by then, would
        # start under its old name (then be waited for and copied). And the copies go first:
        # the moved files' parts would hold every upload slot meanwhile.
        held = [f for f in local if f not in finishing]
        for f in held:
            f.holding += 1
        moved: dict[str, DirtyFile] = {}
        try:
            for f in held:
                await self._move_local(f, src, dst, moved)
            if finishing:
                async with trio.open_nursery() as nursery:
                    for f in finishing:
                        nursery.start_soon(self.wb.wait_durable, f)
                for f in finishing:  # (still here: open, or written again meanwhile)
                    if (not f.deleted and self.wb.files.get(f.path) is f
                            and f.path.startswith(src + "/")):
                        await self._move_local(f, src, dst, moved)
            await self.move_prefix(src_key, dst_key, oid, set(moved))
        finally:
            for f in held:
                f.holding -= 1
            for f in [*held, *moved.values()]:
                self.wb.upload_now(f)

    async def _move_local(self, f: DirtyFile, src: str, dst: str,
                          moved: dict[str, DirtyFile]) -> None:
        new = dst + f.path[len(src):]
        if (await self.wb.rename(f.path, new, None))[0]:
            moved[self.ns.key(new)] = f

    async def resume(self, replay: Callable[[], Awaitable[int]]) -> int:
        """Finish the directory renames a crash interrupted, around ``replay`` (the journal
        replay of the write-back, whose count is returned)."""
        ops = {oid: op for oid, op in self.index.all_ops().items()
               if isinstance(op, RenameDirOp)}
        if ops:
            await self.wb.settle_markers("")  # the moves below copy what the store holds
        for op in ops.values():  # local files the crash left under the old name move too
            await self.wb.rekey_journal(op.src, op.dst)
        # What is journaled now is newer than the store's objects of the old names (replayed
        # uploads may land, and leave the table, before the moves below copy those).
        journaled = {j.key for j in self.index.all_journal().values() if not j.deleted}
        n = await replay()
        for oid, op in ops.items():
            log.info("resuming rename of %s to %s", op.src, op.dst)
            await self.move_prefix(op.src, op.dst, oid, journaled)
        return n

    async def move_prefix(self, src_key: str, dst_key: str, oid: int,
                          local_keys: set[str] | frozenset[str] = frozenset()) -> None:
        """Copy every object under src_key to dst_key, then delete it. Idempotent, so a
        crash in the middle is resumed at the next mount from the journal's ops entry.

        ``local_keys``: destination keys that local files moved to; their objects at
        src_key are older than them and only deleted. (Checking the local files at copy
        time is not enough: one may have uploaded and left the table meanwhile, and the
        copy would overwrite its new content with the old.)"""
        folders = {src_key}
        while True:
            page = await self.client.list(src_key, None, None, 1000)
            if not page.objects:
                break
            limiter = trio.CapacityLimiter(MOVES_IN_FLIGHT)
            local = set(local_keys) | {f.key for f in self.wb.files.values() if not f.deleted}

            async def move(o: Any, limiter: trio.CapacityLimiter = limiter,
                           local: set[str] = local) -> None:
                dst = dst_key + o.key[len(src_key):]
                async with limiter:
                    if dst in local:
                        pass  # a local file took this name: it uploads its whole content
                    elif o.key.endswith("/"):
                        # A directory marker: re-created by a PUT (SeaweedFS, for one, refuses
                        # CopyObject of a key ending in '/').
                        try:
                            meta = (await self.client.head(o.key)).metadata or {}
                        except StoreError as exc:
                            if exc.errno != errno.ENOENT:
                                raise
                            meta = {}
                        await self.client.put_file(dst, None, 0, meta)
                    else:
                        try:
                            await copy_object(self.client, self.ns, o.key, dst, None, o.size,
                                              o.etag, patient=True)
                        except StoreError as exc:
                            if exc.errno != errno.ENOENT:
                                raise
                            return  # deleted meanwhile: nothing to move
                    await self.client.delete(o.key)
            async with trio.open_nursery() as nursery:
                for o in page.objects:
                    nursery.start_soon(move, o)
            for o in page.objects:
                rel = o.key[len(src_key):]
                while "/" in rel.rstrip("/"):
                    rel = rel.rstrip("/").rsplit("/", 1)[0] + "/"
                    folders.add(src_key + rel)
        await self._drop_folders(folders)
        self.index.del_op(oid)

    async def _drop_folders(self, folders: set[str]) -> None:
        """DELETE the directory keys of a moved tree, deepest first. A store with real
        folders (SeaweedFS's filer) keeps a directory whose last object left, and lists it
        under its parent (or as the key ``dir/`` itself): the moved directory would stay
        visible under its old name, and a file created there later is refused. On a flat
        store these are no-op DELETEs, one per directory."""
        by_depth: dict[int, list[str]] = {}
        for k in folders:
            by_depth.setdefault(k.count("/"), []).append(k)
        limiter = trio.CapacityLimiter(MOVES_IN_FLIGHT)

        async def drop(key: str) -> None:
            async with limiter:
                await self.client.delete(key)
        for depth in sorted(by_depth, reverse=True):
            async with trio.open_nursery() as nursery:
                for k in by_depth[depth]:
                    nursery.start_soon(drop, k)
