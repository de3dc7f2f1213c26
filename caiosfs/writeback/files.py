"""A dirty file: its identity, content bookkeeping and explicit state, and the table of them.

A file's life is two small state machines, both checked in :meth:`DirtyFile.go`:

``Phase`` (what may happen to it)::

    IDLE ──begin upload──▶ UPLOADING ──upload ends──▶ IDLE
      │                        │
      │ retire                 │ retire (unlink/replace during its upload)
      ▼                        ▼
    DELETED ◀──upload ends── RETIRING
      │
      │ last handle closed
      ▼
    FORGOTTEN          IDLE ──uploaded, closed──▶ RELEASED

``Storage`` (where its content is): ``INLINE`` (the journal's ``inline`` value) ──outgrown──▶
``FILE`` (``dirty/<id>``, ``fd`` open); either ──dropped──▶ ``CLOSED`` (``fd`` is -1).

Retiring, forgetting and closing are idempotent (a second unlink racing the first finds the
file where the first left it), so those self-transitions are legal; everything else not drawn
above raises :class:`IllegalTransition`.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..attrs import Attrs

CHUNK = 1 << 20  # granularity of the 'changed since the store version' map


class Phase(enum.Enum):
    IDLE = "idle"  # in the table, no upload running (dirty or clean: see DirtyFile.clean)
    UPLOADING = "uploading"  # an upload task reads it
    RETIRING = "retiring"  # unlinked or replaced while its upload runs
    DELETED = "deleted"  # unlinked or replaced: never uploaded again; lives for open handles
    FORGOTTEN = "forgotten"  # deleted and its local copy dropped
    RELEASED = "released"  # uploaded and closed: its local copy dropped


class Storage(enum.Enum):
    INLINE = "inline"
    FILE = "file"
    CLOSED = "closed"


State = Phase | Storage

_LEGAL: dict[State, frozenset[State]] = {
    Phase.IDLE: frozenset({Phase.UPLOADING, Phase.DELETED, Phase.RELEASED}),
    Phase.UPLOADING: frozenset({Phase.IDLE, Phase.RETIRING}),
    Phase.RETIRING: frozenset({Phase.RETIRING, Phase.DELETED}),
    Phase.DELETED: frozenset({Phase.DELETED, Phase.FORGOTTEN}),
    Phase.FORGOTTEN: frozenset({Phase.FORGOTTEN}),
    Phase.RELEASED: frozenset(),
    Storage.INLINE: frozenset({Storage.FILE, Storage.CLOSED}),
    Storage.FILE: frozenset({Storage.CLOSED}),
    Storage.CLOSED: frozenset({Storage.CLOSED}),
}


class IllegalTransition(RuntimeError):
    """A dirty file was asked to change state in a way its life does not allow (a bug)."""


@dataclass
class Stream:
    """A multipart upload in progress to ``key``; parts may be sent before the file is
    closed (then it is the file's ``stream``)."""

    upload_id: str  # "" while it is being created
    part_size: int
    key: str
    etags: dict[int, tuple[str, int]] = field(default_factory=dict)  # part no -> (etag, len)
    sending: set[int] = field(default_factory=set)
    part_gen: dict[int, int] = field(default_factory=dict)  # bumps on each write to a part
    # The object's metadata given at its creation (the completion cannot change it): a
    # chmod/chown since then means a new multipart upload.
    meta: dict[str, str] = field(default_factory=dict)


class DirtyFile:
    """A file with local content: where it lives, what the store holds of it, and its state
    (``phase``, ``storage``; see the module docstring)."""

    def __init__(self, fid: int, path: str, key: str, base_etag: str | None, attrs: Attrs,
                 data_path: Path, fd: int, *, inline: bool = False) -> None:
        self.fid = fid
        self.path = path  # relative to the mount root
        self.key = key  # full object key
        self.base_etag = base_etag  # the store version our content started from (None: new)
        self.attrs = attrs
        self.data_path = data_path
        self.fd = fd  # its data file while storage is FILE, else -1
        self.phase = Phase.IDLE
        self.storage = (Storage.INLINE if inline
                        else Storage.FILE if fd >= 0 else Storage.CLOSED)
        self.gen = 1  # bumps on every change; an upload makes `uploaded_gen` catch up
        self.uploaded_gen = 0
        self.writers = 0
        self.handles = 0
        # > 0: no upload starts (a truncate waits for uploads to stop reading the data file;
        # a directory rename moves it)
        self.holding = 0
        # 1 MiB chunks changed since the local copy last equalled the store object at key/
        # base_etag of base_size bytes; None: unknown (new file, renamed, replayed). Parts
        # untouched by it are copied server-side (UploadPartCopy) instead of sent again.
        self.touched: set[int] | None = None
        self.base_size = 0
        self.stream: Stream | None = None
        self.stream_off = False  # starting a streaming upload failed: upload at close
        self.last_write_end = 0
        self.write_opened = 0.0  # monotonic time its first writer opened it
        # Closed as part of a batch of its directory (see scheduler.DirBatches): its parts
        # do not start at close. A file alone at its last close (``alone``, at
        # ``closed_at``) is held as one for a moment (Uploader.stream_rest_soon).
        self.batched = False
        self.alone = False
        self.closed_at = 0.0
        self.dirty_since = time.time()
        # Set (and replaced) when an upload of this file ends: wait_durable waits on it.
        self.changed = trio.Event()
        # Set (and replaced) whenever an upload of this file moves on: a part sent, its
        # streaming upload created, the upload ended. Waiters take the current event before
        # checking what they wait for and never replace it themselves: no wake-up is lost.
        self.progress = trio.Event()

    def __repr__(self) -> str:
        return (f"DirtyFile({self.fid}, {self.path!r}, {self.phase.name}, "
                f"{self.storage.name}, gen {self.gen}/{self.uploaded_gen})")

    def go(self, to: State) -> None:
        """The one place a file changes phase or storage."""
        now: State = self.phase if isinstance(to, Phase) else self.storage
        if to not in _LEGAL[now]:
            raise IllegalTransition(f"dirty file {self.fid} ({self.path}): {now.name} -> "
                                    f"{to.name}")
        if isinstance(to, Phase):
            self.phase = to
        else:
            self.storage = to

    def retire(self) -> None:
        """Unlinked or replaced: an upload in flight finishes, none starts again."""
        self.go(Phase.RETIRING if self.phase in (Phase.UPLOADING, Phase.RETIRING)
                else Phase.DELETED)

    def end_upload(self) -> None:
        self.go(Phase.DELETED if self.phase is Phase.RETIRING else Phase.IDLE)
        for ev in (self.changed, self.progress):
            ev.set()
        self.changed, self.progress = trio.Event(), trio.Event()

    def moved_on(self) -> None:
        """Something an upload of this file does moved on (see ``progress``)."""
        ev, self.progress = self.progress, trio.Event()
        ev.set()

    @property
    def inline(self) -> bool:
        return self.storage is Storage.INLINE

    @property
    def uploading(self) -> bool:
        return self.phase in (Phase.UPLOADING, Phase.RETIRING)

    @property
    def deleted(self) -> bool:
        return self.phase in (Phase.RETIRING, Phase.DELETED, Phase.FORGOTTEN)

    @deleted.setter
    def deleted(self, value: bool) -> None:
        if value:
            self.retire()
        elif self.deleted:
            raise IllegalTransition(f"dirty file {self.fid}: a deleted file stays deleted")

    @property
    def clean(self) -> bool:
        return self.uploaded_gen >= self.gen

    @property
    def size(self) -> int:
        return self.attrs.size

    def touch(self, start: int, end: int) -> None:
        """Bookkeeping of a change of bytes start..end (a write, or a truncate)."""
        if self.clean:
            self.dirty_since = time.time()
        self.gen += 1
        self.attrs.mtime = time.time()
        if self.touched is not None:
            self.touched.update(range(start // CHUNK, (max(end, start + 1) - 1) // CHUNK + 1))
        if self.stream is not None:
            ps = self.stream.part_size
            for p in range(start // ps + 1, (max(end, start + 1) - 1) // ps + 2):
                self.stream.part_gen[p] = self.stream.part_gen.get(p, 0) + 1
                self.stream.etags.pop(p, None)


class FileTable(MutableMapping[str, "DirtyFile"]):
    """The local files by path, with the indexes that keep every lookup cheap when
    thousands of files are dirty at once (a `cp -r`, a `git checkout`): by id, by parent
    directory, and how many files each directory holds anywhere below it."""

    def __init__(self) -> None:
        self._by_path: dict[str, DirtyFile] = {}
        self._by_fid: dict[int, DirtyFile] = {}
        self._kids: dict[str, dict[str, DirtyFile]] = {}
        self._below: Counter[str] = Counter()

    @staticmethod
    def _ancestors(path: str) -> Iterator[str]:
        i = path.find("/")
        while i >= 0:
            yield path[:i]
            i = path.find("/", i + 1)

    def __getitem__(self, path: str) -> DirtyFile:
        return self._by_path[path]

    def __setitem__(self, path: str, f: DirtyFile) -> None:
        if path in self._by_path:
            del self[path]
        self._by_path[path] = f
        self._by_fid[f.fid] = f
        parent, _, name = path.rpartition("/")
        self._kids.setdefault(parent, {})[name] = f
        self._below.update(self._ancestors(path))

    def __delitem__(self, path: str) -> None:
        f = self._by_path.pop(path)
        if self._by_fid.get(f.fid) is f:
            del self._by_fid[f.fid]
        parent, _, name = path.rpartition("/")
        kids = self._kids[parent]
        del kids[name]
        if not kids:
            del self._kids[parent]
        for d in self._ancestors(path):
            self._below[d] -= 1
            if not self._below[d]:
                del self._below[d]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)

    def by_fid(self, fid: int) -> DirtyFile | None:
        return self._by_fid.get(fid)

    def children(self, dir_path: str) -> dict[str, DirtyFile]:
        return {n: f for n, f in self._kids.get(dir_path, {}).items() if not f.deleted}

    def under(self, dir_path: str) -> list[DirtyFile]:
        if not self._below.get(dir_path):
            return []
        pre = dir_path + "/"
        return [f for p, f in self._by_path.items() if p.startswith(pre) and not f.deleted]
