"""Crash recovery: what a previous run left in the journal becomes local files again, and
is uploaded; leftovers (data files, inline values, multipart uploads) nothing names go."""

from __future__ import annotations

import logging
import os

import trio

from ..attrs import Attrs
from ..errors import StoreError
from ..index import Index
from ..store.client import StoreClient
from .files import DirtyFile, FileTable
from .journal import Journal
from .local import LocalData
from .scheduler import Scheduler
from .uploader import Uploader

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, store: StoreClient, index: Index, files: FileTable, local: LocalData,
                 journal: Journal, sched: Scheduler, uploader: Uploader, prefix: str) -> None:
        self.store = store
        self.index = index
        self.files = files
        self.local = local
        self.journal = journal
        self.sched = sched
        self.uploader = uploader
        self.prefix = prefix

    async def rekey(self, src_key: str, dst_key: str) -> None:
        """Before replay: journaled files under ``src_key`` belong under ``dst_key`` (a
        directory rename the crash interrupted)."""
        for fid, j in self.index.all_journal().items():
            if not j.key.startswith(src_key) or j.deleted:
                continue
            if j.upload_id:
                await self.uploader.abort(j.key, j.upload_id)
            key = dst_key + j.key[len(src_key):]
            j.key, j.path, j.base_etag, j.upload_id = key, key[len(self.prefix):], None, None
            self.index.put_journal(fid, j)

    async def replay(self, nursery: trio.Nursery | None) -> int:
        """Resume what a previous run left: every journaled file is uploaded again."""
        n = 0
        for fid, j in self.index.all_journal().items():
            data_path = self.local.dir / str(fid)
            inline = j.inline
            if j.upload_id:
                await self.uploader.abort(j.key, j.upload_id)
            have = inline or data_path.exists()
            if j.deleted or not have or not j.key.startswith(self.prefix):
                if j.deleted or not have:
                    self.index.del_journal(fid)
                    self.index.del_inline(fid)
                    data_path.unlink(missing_ok=True)
                continue
            if inline:
                data_path.unlink(missing_ok=True)  # a move to a data file cut short (_to_file)
                fd, size = -1, len(self.index.get_inline(fid))
            else:
                fd = os.open(data_path, os.O_RDWR)
                size = os.fstat(fd).st_size
            attrs = Attrs(j.mode, j.uid, j.gid, j.mtime, size,
                          mtime_ns=j.mtime_ns, ctime_ns=j.ctime_ns)
            path = j.path or j.key[len(self.prefix):]
            f = DirtyFile(fid, path, j.key, j.base_etag, attrs, data_path, fd, inline=inline)
            self.files[path] = f
            self.journal.write(f)
            self.sched.schedule(f, 0)
            n += 1
        journal = self.index.all_journal()
        # Inline contents whose journal entry is gone (removed just before a crash).
        for fid in self.index.inline_ids():
            if (entry := journal.get(fid)) is None or not entry.inline:
                self.index.del_inline(fid)
        self.local.reclaim(set(journal) | {f.fid for f in self.files.values()})
        if nursery is not None:
            nursery.start_soon(self.local.make_spares)
        # Multipart uploads of journaled keys that the journal no longer names are orphans.
        keys = {f.key for f in self.files.values()}
        try:
            for up in await self.store.list_multipart(self.prefix):
                if up.key in keys and all(f.stream is None or f.stream.upload_id != up.upload_id
                                          for f in self.files.values()):
                    await self.uploader.abort(up.key, up.upload_id)
        except StoreError as exc:
            log.warning("could not list multipart uploads: %s", exc)
        self.sched.update_gauges()
        return n
