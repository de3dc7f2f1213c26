"""Write-back: dirty files on local disk, journaled in LMDB, uploaded in the background.

A file with local changes is a :class:`DirtyFile`: its whole content lives in
``<cache_dir>/dirty/<id>`` (or, while small, in the journal itself) and a journal entry in
LMDB names the object it belongs to. ``write()`` returns once the data is in the kernel's
hands (a killed daemon loses nothing); ``fsync=local`` adds an ``fsync``.

Uploads start ``upload_delay`` seconds after the last writer closes. Large files are sent
as multipart uploads whose full parts are sent *while* the file is still being written
sequentially; a later write to a part already sent marks it for re-upload. Writes are
conditional: if someone else changed the object meanwhile, our data goes to a
``.conflict-`` sibling and both versions survive. Uploads retry forever; dirty data is
never dropped.

One job per module; dependencies point one way (down this list):

- :mod:`.lifecycle` — :class:`WriteBack`, the facade: create, open, write, truncate, rename,
  unlink, release, fsync, flush; it owns a file's life and hands out the jobs below.
- :mod:`.replay` — crash recovery: the journal becomes local files again; leftovers go.
- :mod:`.markers` — directory markers (mkdir, rmdir, settle, attributes before the PUT).
- :mod:`.uploader` — PUT, multipart, streamed parts, part copies, conflict copies.
- :mod:`.scheduler` — the due heap, waiting for a pause in writing, back-off,
  back-pressure, the dirty totals and gauges.
- :mod:`.local` — local content: data files and their pool, inline small files.
- :mod:`.journal` — journal entries (:mod:`caiosfs.records`) and their flush to disk.
- :mod:`.files` — :class:`DirtyFile` with its state machine, and the table of them.
"""

from .files import DirtyFile, FileTable, IllegalTransition, Phase, Storage, Stream
from .journal import JOURNAL_SYNC_PERIOD
from .lifecycle import FLUSH_ROUND, WriteBack
from .local import IDLE_MAX, INLINE_MAX, SPARES, IdleWorker
from .markers import Marker
from .scheduler import GAUGE_PERIOD, MAX_DEFER, QUIET
from .uploader import MAX_PARTS, MIN_PART, STREAM_BACKLOG_PARTS, part_size_for

__all__ = [
    "FLUSH_ROUND", "GAUGE_PERIOD", "IDLE_MAX", "INLINE_MAX", "JOURNAL_SYNC_PERIOD", "MAX_DEFER",
    "MAX_PARTS", "MIN_PART", "QUIET", "SPARES", "STREAM_BACKLOG_PARTS", "DirtyFile",
    "FileTable", "IdleWorker", "IllegalTransition", "Marker", "Phase", "Storage", "Stream",
    "WriteBack", "part_size_for",
]
