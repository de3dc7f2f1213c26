# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""Races between the write-back's uploads and the operations that move or remove names, on
the core without FUSE: nothing PUT under a directory's old name may land after a rename
moved it (it would come back, empty, on the next mount), and an unlink that waited for an
upload deletes the version that upload stored."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time

import pytest
import trio
from coretree import Cores
from test_core import ME, make, node_of, settle, write_file  # noqa: F401  (make: fixture)

from caiosfs.attrs import RECORD
from caiosfs.core import AttrChange, Core
from caiosfs.dirattrs import DEBOUNCE
from caiosfs.errors import FsError
from caiosfs.inodes import ROOT_INO
from caiosfs.store import Body
from caiosfs.store.memory import MemoryStore


class Gated(MemoryStore):
    """The upload of the key ``gated`` (a small file of another owner than the mount's:
    one part, see Uploader._tagged_put) does not complete until ``gate`` is set."""

    def __init__(self, bucket: str, gated: str) -> None:
        super().__init__(bucket)
        self.gated = gated
        self.gate = threading.Event()

    def complete_multipart(self, key: str, upload_id: str, etags: list[str],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        if key == self.gated:
            self.gate.wait(10)  # (in a worker thread)
        return super().complete_multipart(key, upload_id, etags, if_match, if_none_match)


class SlowEnd(Gated):
    """The last step of a rename of ``d`` (the DELETE of its folder key ``d/`` after every
    object moved: the second DELETE of that key, the first one moved the marker) takes
    1.5 x DEBOUNCE, so that the directory's attribute record, noted by the gated upload,
    falls due after the move listed ``d/`` empty."""

    folder_deletes = 0

    def delete(self, key: str) -> None:
        if key == "d/":
            self.folder_deletes += 1
            if self.folder_deletes == 2:
                time.sleep(1.5 * DEBOUNCE)
        super().delete(key)


async def uploading(core: Core, path: str) -> None:
    """Until the upload of the local file at ``path`` runs (it starts at once)."""
    f = core.wb.files[path]
    with trio.fail_after(5):
        while not f.uploading:
            await trio.sleep(0.005)


async def test_an_upload_landing_during_a_directory_rename_leaves_no_record_behind(
        make: Cores) -> None:
    """Found by the model test through a mount (devbox: records on): an upload that the
    rename waited for landed under the old name and noted the old directory's record; the
    record was written after the move had listed the old name empty (and before the rename
    dropped what was noted there), and the renamed directory came back (holding only its
    record) after a remount."""
    store = SlowEnd("bkt", "d/f")
    core = await make(store, "c1", dirattrs="1")
    d = await core.mkdir(ROOT_INO, "d", 0o755, ME)
    await write_file(core, "a", b"stored before", d.ino)
    await settle(core)
    await core.flush_records()
    assert f"d/{RECORD}" in store.objects
    await write_file(core, "f", b"uploading during the rename", d.ino)  # (uploads at once)
    await uploading(core, "d/f")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.rename, ROOT_INO, "d", ROOT_INO, "e")
        await trio.sleep(0.1)  # (the rename waits for the upload; then it lands)
        store.gate.set()
    await settle(core)
    await core.flush_records()
    await trio.sleep(DEBOUNCE + 0.2)  # (anything still due under d would be written now)
    assert sorted(k for k in store.objects if k.startswith("d/")) == []
    assert {"e/a", "e/f"} <= set(store.objects)
    await make.crash(core)
    fresh = await make(store, "c2", dirattrs="1")
    fh = fresh.opendir(ROOT_INO)
    assert sorted(name for name, _ in await fresh.readdir(fh, 0)) == ["e"]
    assert await node_of(fresh, "e/f")



async def test_an_unlink_that_waited_for_an_upload_deletes_what_it_stored(
        make: Cores) -> None:
    """Found by the model test on the core: a stored file written again and unlinked while
    its upload ran; the unlink waited for it, then queued the DELETE of (and hid) the version
    before it, so the new version stayed listed: rmdir of its directory failed (ENOTEMPTY)
    and a read of the name met NoSuchKey once the batched DELETE had gone."""
    store = Gated("bkt", "b/y")
    core = await make(store, "c1")  # (devbox: unlink=batch)
    b = await core.mkdir(ROOT_INO, "b", 0o755, ME)
    store.gate.set()
    await write_file(core, "y", b"first", b.ino)
    await settle(core)
    store.gate.clear()
    fh = await core.open(await node_of(core, "b/y"), os.O_WRONLY | os.O_TRUNC)
    await core.files.write(fh, 0, b"second version")
    await core.files.release(fh)
    await uploading(core, "b/y")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.unlink, b.ino, "y")
        await trio.sleep(0.1)  # (the unlink waits for the upload; then it lands)
        store.gate.set()
    await core.rmdir(ROOT_INO, "b")
    await settle(core)
    assert not [k for k in store.objects if k.startswith("b/")]
    fh = core.opendir(ROOT_INO)
    assert [name for name, _ in await core.readdir(fh, 0)] == []


async def test_a_file_unlinked_while_open_does_not_move_with_its_directory(
        make: Cores) -> None:
    """A stored file unlinked while open for reading keeps its object until the last close
    (its DELETE deferred, the name hidden); a rename of its directory meanwhile copied that
    object with the others, and the file came back under the new name."""
    store = MemoryStore("bkt")
    store.put_bytes("d/gone", b"unlinked while open")
    store.put_bytes("d/kept", b"kept")
    core = await make(store, "c1")
    fh = await core.open(await node_of(core, "d/gone"), os.O_RDONLY)
    await core.unlink(await node_of(core, "d"), "gone")
    await core.rename(ROOT_INO, "d", ROOT_INO, "e")
    await core.files.release(fh)
    await settle(core)
    assert sorted(store.objects) == ["e/kept"]


class KeepsETags(Gated):
    """ETags are the content's MD5, so a copy keeps the object's ETag, as S3's and
    SeaweedFS's do for an object uploaded in one PUT, and for a one-part multipart copy of
    one (a chmod of a stored file is a copy onto itself); PUTs of ``gated`` wait for
    ``gate``."""

    def _store(self, key: str, data: bytes, metadata: dict[str, str]) -> str:
        super()._store(key, data, metadata)
        self.objects[key].etag = '"' + hashlib.md5(data).hexdigest() + '"'
        return self.objects[key].etag

    def put_file(self, key: str, path: Body, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        if key == self.gated:
            self.gate.wait(10)  # (in a worker thread)
        return super().put_file(key, path, size, metadata, if_match, if_none_match)


async def stored_file(make: Cores, store: Gated, dir_name: str) -> tuple[Core, int]:
    """A core writing records, and the inode of ``<dir_name>/y`` (mode 0640) in the store."""
    store.gate.set()
    core = await make(store, "c1", dirattrs="1", uid=str(ME.uid), gid=str(ME.gid))
    d = await core.mkdir(ROOT_INO, dir_name, 0o755, ME)
    fh, n = await core.create(d.ino, "y", 0o640, ME)
    await core.files.write(fh, 0, b"stored")
    await core.files.release(fh)
    await settle(core)
    return core, n.ino


async def test_a_failed_rmdir_keeps_what_its_record_was_to_be_told(make: Cores) -> None:
    """Found by the model test through a mount (main, CAIOSFS_MODEL_EXAMPLES=30, 5th run):
    a chmod of a stored file (a copy that keeps its ETag) while its directory's record was
    being written; an rmdir of that directory (ENOTEMPTY) dropped the chmod's note, the
    record kept the old mode under the same ETag, written after the copy: the next mount
    showed the old mode."""
    store = KeepsETags("bkt", f"b/{RECORD}")
    core, y = await stored_file(make, store, "b")
    store.gate.clear()
    with trio.fail_after(5):
        while "b" not in core.dirattrs.writing:  # (due DEBOUNCE after the upload)
            await trio.sleep(0.01)
    await core.setattr(y, AttrChange(mode=0o600))
    store.gate.set()
    with trio.fail_after(5):
        while "b" in core.dirattrs.writing:
            await trio.sleep(0.01)
    with pytest.raises(FsError) as exc:
        await core.rmdir(ROOT_INO, "b")
    assert exc.value.errno == errno.ENOTEMPTY
    await core.flush_records()
    await make.crash(core)
    fresh = await make(store, "c2", dirattrs="1", uid=str(ME.uid), gid=str(ME.gid))
    fh = fresh.opendir(ROOT_INO)
    await fresh.readdir(fh, 0)
    fh = fresh.opendir(await node_of(fresh, "b"))
    await fresh.readdir(fh, 0)
    assert stat.S_IMODE(fresh.attrs_of(fresh.getattr(await node_of(fresh, "b/y"))).mode) \
        == 0o600


class RecordsCopiedLast(KeepsETags):
    """A directory's record is copied after its files (a move copies a page's objects in
    parallel): its Last-Modified is not older than theirs."""

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None, size: int) -> str:
        if src.endswith(RECORD):
            time.sleep(0.2)  # (in a worker thread)
        return super().copy(src, dst, metadata, size)


async def test_a_directory_rename_moves_its_record_with_what_was_pending(
        make: Cores) -> None:
    """A chmod of a stored file (a copy that keeps its ETag) noted for its directory's
    record, then a rename of the directory before the record was written: the note was
    dropped, the record moved with the old mode, and being copied with the file it looked
    as recent as the file's copy: the next mount showed the old mode."""
    store = RecordsCopiedLast("bkt", "")
    core, y = await stored_file(make, store, "d")
    await core.flush_records()
    await core.setattr(y, AttrChange(mode=0o600))
    assert "d" in core.dirattrs.pending  # (written DEBOUNCE later)
    await core.rename(ROOT_INO, "d", ROOT_INO, "e")
    await settle(core)
    await core.flush_records()
    await make.crash(core)
    fresh = await make(store, "c2", dirattrs="1", uid=str(ME.uid), gid=str(ME.gid))
    fh = fresh.opendir(await node_of(fresh, "e"))
    await fresh.readdir(fh, 0)
    assert stat.S_IMODE(fresh.attrs_of(fresh.getattr(await node_of(fresh, "e/y"))).mode) \
        == 0o600
