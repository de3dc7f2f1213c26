"""The journal of dirty files and pending directory markers: what is committed, and the task
that flushes commits to disk.

Every entry commits before the call that made it returns (a killed daemon loses nothing);
the flush to disk (fdatasync) follows within ~JOURNAL_SYNC_PERIOD, one per burst of commits
(a `cp -r` creates a file a millisecond). ``fsync=local`` flushes by itself.
"""

from __future__ import annotations

import logging

import trio

from ..index import Index
from ..records import JournalEntry, MkdirOp
from .files import DirtyFile

log = logging.getLogger(__name__)

JOURNAL_SYNC_PERIOD = 0.02  # journal commits reach the disk (fdatasync) within about this


class Journal:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._unsynced = trio.Event()

    @staticmethod
    def entry(f: DirtyFile, *, inline: bool | None = None) -> JournalEntry:
        """f's journal entry (``inline``: as it will be once a switch of storage commits)."""
        return JournalEntry(
            path=f.path, key=f.key, base_etag=f.base_etag, mode=f.attrs.mode,
            uid=f.attrs.uid, gid=f.attrs.gid, mtime=f.attrs.mtime,
            mtime_ns=f.attrs.mtime_ns, ctime_ns=f.attrs.ctime_ns,
            upload_id=f.stream.upload_id if f.stream else None, deleted=f.deleted,
            inline=f.inline if inline is None else inline)

    def write(self, f: DirtyFile) -> None:
        """Commit f's entry now; its flush to disk follows shortly."""
        self._unsynced.set()
        self.index.put_journal(f.fid, self.entry(f), sync=False)

    def committed(self) -> None:
        """Something else was committed to the journal environment: flush it shortly."""
        self._unsynced.set()

    def put_mkdir(self, oid: int, op: MkdirOp) -> None:
        self.index.put_op(oid, op, sync=False)
        self._unsynced.set()

    async def run(self) -> None:
        """Flush commits to disk, at most once per JOURNAL_SYNC_PERIOD."""
        while True:
            await self._unsynced.wait()
            self._unsynced = trio.Event()
            try:
                await trio.to_thread.run_sync(self.index.sync_journal)
            except OSError as exc:
                log.error("could not flush the journal to disk: %s", exc.strerror)
                await trio.sleep(1)
            # A `cp -r` commits twice per file, and a flush per commit was 5% of the loop's
            # CPU.
            await trio.sleep(JOURNAL_SYNC_PERIOD)
