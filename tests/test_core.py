"""The filesystem core driven directly, without FUSE, on the in-memory store: what each
operation leaves in the store and shows to the next mount, including the crash resume of a
directory rename and the deferred delete of a file unlinked while open."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import data, xxh
from coretree import Cores

from caiosfs.core import AttrChange, Caller, Core
from caiosfs.errors import FsError, StoreError
from caiosfs.inodes import ROOT_INO
from caiosfs.records import DeleteOp, RenameDirOp
from caiosfs.store import ListPage
from caiosfs.store.memory import MemoryStore

ME = Caller(1000, 1000, 0o022)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Cores]:
    async with trio.open_nursery() as nursery:
        cores = Cores(tmp_path, nursery)
        yield cores
        await cores.stop_all()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore("bkt")


async def settle(core: Core) -> None:
    """Everything this core owes the store is there."""
    await core.wb.flush_all()
    await core.settle_deletes()


async def node_of(core: Core, path: str) -> int:
    ino = ROOT_INO
    for name in path.split("/"):
        ino = (await core.lookup(ino, name)).ino
    return ino


async def write_file(core: Core, path: str, body: bytes, parent: int = ROOT_INO) -> int:
    fh, n = await core.create(parent, path, 0o644, ME)
    assert await core.files.write(fh, 0, body) == len(body)
    await core.files.release(fh)
    return n.ino


async def read_all(core: Core, path: str) -> bytes:
    fh = await core.open(await node_of(core, path), os.O_RDONLY)
    try:
        out = b""
        while True:
            chunk = await core.files.read(fh, len(out), 1 << 20)
            if not chunk:
                return out
            out += chunk
    finally:
        await core.files.release(fh)


async def with_stored(store: MemoryStore, make: Cores, body: bytes) -> tuple[Core, int]:
    """A core whose store holds ``body`` as "f", and the inode of f."""
    store.put_bytes("f", body)
    core = await make(store)
    return core, await node_of(core, "f")


async def errno_of(fn: Awaitable[object]) -> int:
    try:
        await fn
    except FsError as exc:
        return exc.errno
    return 0


def stored(store: MemoryStore) -> dict[str, str]:
    """key -> xxh of the body, what the store holds."""
    return {k: xxh(o.data) for k, o in store.objects.items()}


# files ---------------------------------------------------------------------------------
async def test_create_write_read_reaches_the_store_and_a_fresh_cache(
        store: MemoryStore, make: Cores) -> None:
    body = data(3 * (1 << 20) + 17, "body")
    core = await make(store)
    ino = await write_file(core, "f", body)
    assert xxh(await read_all(core, "f")) == xxh(body)  # (the local file, not uploaded yet)
    assert core.attrs_of(core.getattr(ino)).size == len(body)
    await settle(core)
    assert stored(store) == {"f": xxh(body)}
    assert int(store.objects["f"].metadata["mode"]) == stat.S_IFREG | 0o644 & ~0o022
    fresh = await make(store, "c2")
    assert xxh(await read_all(fresh, "f")) == xxh(body)


async def test_write_through_a_read_only_handle_is_refused(store: MemoryStore,
                                                          make: Cores) -> None:
    store.put_bytes("f", b"stored")
    core = await make(store)
    fh = await core.open(await node_of(core, "f"), os.O_RDONLY)
    assert await errno_of(core.files.write(fh, 0, b"x")) == errno.EBADF
    assert await errno_of(core.create(ROOT_INO, "d" * 2000, 0o644, ME)) == errno.ENAMETOOLONG


async def test_read_only_mount_refuses_changes(store: MemoryStore, make: Cores) -> None:
    store.put_bytes("f", b"stored")
    core = await make(store, ro="")
    ino = await node_of(core, "f")
    assert await errno_of(core.create(ROOT_INO, "g", 0o644, ME)) == errno.EROFS
    assert await errno_of(core.open(ino, os.O_WRONLY)) == errno.EROFS
    assert await errno_of(core.unlink(ROOT_INO, "f")) == errno.EROFS
    assert await errno_of(core.rename(ROOT_INO, "f", ROOT_INO, "g")) == errno.EROFS
    assert await read_all(core, "f") == b"stored"


async def test_unlink_while_open_for_reading_deletes_at_the_last_close(
        store: MemoryStore, make: Cores) -> None:
    body = data(200_000, "open")
    core, ino = await with_stored(store, make, body)
    fh = await core.open(ino, os.O_RDONLY)
    await core.unlink(ROOT_INO, "f")
    assert await errno_of(core.lookup(ROOT_INO, "f")) == errno.ENOENT
    assert "f" in store.objects, "deleted while a handle still reads it"
    assert [type(op) for op in core.index.all_ops().values()] == [DeleteOp]
    assert xxh(await core.files.read(fh, 0, len(body) + 1)) == xxh(body)
    await core.files.release(fh)
    assert "f" not in store.objects
    assert core.index.all_ops() == {}


async def test_unlink_of_a_file_being_written_keeps_the_handle_working(
        store: MemoryStore, make: Cores) -> None:
    core = await make(store)
    fh, n = await core.create(ROOT_INO, "f", 0o644, ME)
    await core.files.write(fh, 0, b"hello ")
    await core.unlink(ROOT_INO, "f")
    await core.files.write(fh, 6, b"world")
    assert await core.files.read(fh, 0, 100) == b"hello world"
    # setattr through the handle of an unlinked file changes only that file
    await core.setattr(n.ino, AttrChange(size=5), fh)
    assert await core.files.read(fh, 0, 100) == b"hello"
    await core.files.release(fh)
    await settle(core)
    assert store.objects == {}


async def test_batched_unlinks_leave_the_store_before_rmdir_returns(
        store: MemoryStore, make: Cores) -> None:
    for i in range(5):
        store.put_bytes(f"d/{i}", data(10, i))
    core = await make(store, unlink="batch")
    d = await node_of(core, "d")
    for i in range(5):
        await core.unlink(d, str(i))
    assert await errno_of(core.lookup(d, "0")) == errno.ENOENT  # hidden while queued
    await core.rmdir(ROOT_INO, "d")
    assert store.objects == {} and core.index.all_ops() == {}
    # one DeleteObjects for the files; the one DELETE is rmdir's, of the directory marker
    assert store.calls["delete_many"] == 1 and store.calls["delete"] == 1


# attributes ----------------------------------------------------------------------------
async def test_setattr_of_a_stored_file_copies_metadata_and_truncates(
        store: MemoryStore, make: Cores) -> None:
    body = data(50_000, "attrs")
    core, ino = await with_stored(store, make, body)
    n = await core.setattr(ino, AttrChange(mode=0o600, uid=7))
    assert stat.S_IMODE(core.attrs_of(n).mode) == 0o600
    meta = store.objects["f"].metadata
    assert (int(meta["mode"]), meta["uid"]) == (stat.S_IFREG | 0o600, "7")
    assert xxh(store.objects["f"].data) == xxh(body), "a chmod must not change the content"
    await core.setattr(ino, AttrChange(size=1000))
    await settle(core)
    assert xxh(store.objects["f"].data) == xxh(body[:1000])
    assert int(store.objects["f"].metadata["mode"]) == stat.S_IFREG | 0o600
    fresh = await make(store, "c2")
    a = fresh.attrs_of(fresh.getattr(await node_of(fresh, "f")))
    assert (stat.S_IMODE(a.mode), a.uid, a.size) == (0o600, 7, 1000)


async def test_setattr_of_a_directory_rewrites_its_marker(store: MemoryStore,
                                                          make: Cores) -> None:
    core = await make(store)
    d = await core.mkdir(ROOT_INO, "d", 0o755, ME)
    await settle(core)
    assert store.objects["d/"].data == b""
    await core.setattr(d.ino, AttrChange(mode=0o700))
    assert int(store.objects["d/"].metadata["mode"]) == stat.S_IFDIR | 0o700


# directories, symlinks, special files ---------------------------------------------------
async def test_mkdir_rmdir_and_their_errors(store: MemoryStore, make: Cores) -> None:
    core = await make(store)
    d = await core.mkdir(ROOT_INO, "d", 0o777, ME)
    assert d.is_dir and stat.S_IMODE(core.attrs_of(d).mode) == 0o755
    assert await errno_of(core.mkdir(ROOT_INO, "d", 0o755, ME)) == errno.EEXIST
    await write_file(core, "x", b"file", parent=d.ino)
    assert await errno_of(core.rmdir(ROOT_INO, "d")) == errno.ENOTEMPTY
    assert await errno_of(core.rmdir(d.ino, "x")) == errno.ENOTDIR
    assert await errno_of(core.unlink(ROOT_INO, "d")) == errno.EISDIR
    await settle(core)
    assert set(store.objects) == {"d/", "d/x"}
    await core.unlink(d.ino, "x")
    await core.rmdir(ROOT_INO, "d")
    assert store.objects == {}
    fh = core.opendir(ROOT_INO)
    assert await core.readdir(fh, 0) == []
    core.releasedir(fh)



async def test_a_directory_s_mtime_and_ctime_change_with_its_entries(
        store: MemoryStore, make: Cores) -> None:
    """importlib caches a directory's listing keyed on its mtime: a module written after a
    first import was not found (bench/posix.py import_new_module)."""
    store.put_bytes("d/s", b"stored")
    core = await make(store)
    d = await core.lookup(ROOT_INO, "d")  # (no marker: a prefix)
    e = await core.mkdir(ROOT_INO, "e", 0o755, ME)
    old = 1_000_000_000_000_000_000

    async def changes(*dirs: Any) -> AsyncIterator[None]:
        for n in dirs:  # (a utime: the times in the store, and no local change on top)
            await core.setattr(n.ino, AttrChange(mtime_ns=old, ctime_ns=old))
            assert core.attrs_of(n).mtime_ns == old
        t0 = time.time_ns()
        yield
        for n in dirs:
            a = core.attrs_of(n)
            assert a.mtime_ns >= t0 and a.ctime_ns == a.mtime_ns, n.path

    async def each(fn: Awaitable[object], *dirs: Any) -> None:
        async for _ in changes(*dirs):
            await fn

    async def create(name: str) -> None:
        await core.files.release((await core.create(d.ino, name, 0o644, ME))[0])

    await each(create("f"), d)
    await each(core.mkdir(d.ino, "sub", 0o755, ME), d)
    await each(core.symlink(d.ino, "l", b"f", ME), d)
    await each(core.mknod(d.ino, "p", stat.S_IFIFO | 0o644, 0, ME), d)
    await each(core.unlink(d.ino, "s"), d)
    await each(core.rmdir(d.ino, "sub"), d)
    await each(core.rename(d.ino, "f", e.ino, "g"), d, e)
    await each(core.rename(e.ino, "g", e.ino, "h"), e)
    # A listing of the parent rebuilds the attributes from the store: the local times stay.
    async for _ in changes(d):
        await create("f2")
        await core.ns.list_dir("", force=True)
        await core.lookup(ROOT_INO, "d")
    # ... and do not reach the store (a marker PUT or copy per create): the markers keep
    # the times of the last utime.
    await settle(core)
    assert {store.objects[k].metadata["mtime"] for k in ("d/", "e/")} == {
        str(old // 1_000_000_000)}
    # A create over an existing file is no new entry.
    await core.setattr(d.ino, AttrChange(mtime_ns=old, ctime_ns=old))
    await create("f2")
    assert core.attrs_of(d).mtime_ns == old


async def test_a_file_unlinked_or_replaced_while_open_has_no_links(
        store: MemoryStore, make: Cores) -> None:
    """SQLite checks fstat's st_nlink to warn of a deleted database (bench/posix.py
    unlink_open_nlink)."""
    core = await make(store)
    assert core.nlink(core.getattr(ROOT_INO)) == 2
    fh, n = await core.create(ROOT_INO, "f", 0o644, ME)
    assert core.nlink(n) == 1
    await core.unlink(ROOT_INO, "f")
    assert core.nlink(n) == 0
    await core.files.release(fh)
    fh, n = await core.create(ROOT_INO, "victim", 0o644, ME)
    await write_file(core, "g", b"g")
    await core.rename(ROOT_INO, "g", ROOT_INO, "victim")
    assert core.nlink(n) == 0
    assert core.nlink(await core.lookup(ROOT_INO, "victim")) == 1
    await core.files.release(fh)
    d = await core.mkdir(ROOT_INO, "d", 0o755, ME)
    await core.rmdir(ROOT_INO, "d")
    assert core.nlink(d) == 0

async def test_readdir_lists_local_and_stored_entries(store: MemoryStore,
                                                      make: Cores) -> None:
    store.put_bytes("s", b"stored")
    # (upload_delay: the marker of d stays local; one that lands during the LIST: below)
    core = await make(store, upload_delay="60")
    await write_file(core, "l", b"local")
    await core.mkdir(ROOT_INO, "d", 0o755, ME)
    fh = core.opendir(ROOT_INO)
    names = [name for name, _ in await core.readdir(fh, 0)]
    assert sorted(names) == ["d", "l", "s"]
    assert [name for name, _ in await core.readdir(fh, 1)] == names[1:]


class SlowLists(MemoryStore):
    def list(self, *args: Any, **kw: Any) -> ListPage:
        page = super().list(*args, **kw)
        time.sleep(0.3)  # (in a worker thread: a marker's PUT lands meanwhile)
        return page


async def test_a_directory_whose_marker_lands_during_a_listing_is_listed(
        make: Cores) -> None:
    """Found by the model test on the core: the LIST missed the marker that landed while
    it ran, and the marker had left the write-back's table by its end; the directory was
    missing from the cached listing (readdir, and so the tree) for list_ttl."""
    store = SlowLists("bkt")
    core = await make(store)
    await core.mkdir(ROOT_INO, "d", 0o755, ME)
    fh = core.opendir(ROOT_INO)
    assert [name for name, _ in await core.readdir(fh, 0)] == ["d"]
    assert "d/" in store.objects and not core.wb.markers, "the marker was to land meanwhile"


async def test_symlink_and_mknod_are_stored_as_s3fs_does(store: MemoryStore,
                                                         make: Cores) -> None:
    core = await make(store)
    n = await core.symlink(ROOT_INO, "l", b"../some/target", ME)
    assert stat.S_ISLNK(core.attrs_of(n).mode)
    assert await core.readlink(n.ino) == b"../some/target"
    fifo = await core.mknod(ROOT_INO, "p", stat.S_IFIFO | 0o644, 0, ME)
    assert await errno_of(core.readlink(fifo.ino)) == errno.EINVAL
    assert await errno_of(core.mknod(ROOT_INO, "q", stat.S_IFDIR | 0o755, 0, ME)) \
        == errno.EINVAL
    await settle(core)
    assert store.objects["l"].data == b"../some/target"
    assert int(store.objects["l"].metadata["mode"]) == stat.S_IFLNK | 0o777
    assert int(store.objects["p"].metadata["mode"]) == stat.S_IFIFO | 0o644
    fresh = await make(store, "c2")
    assert await fresh.readlink(await node_of(fresh, "l")) == b"../some/target"


# renames -------------------------------------------------------------------------------
async def test_rename_of_a_stored_and_of_a_local_file(store: MemoryStore,
                                                      make: Cores) -> None:
    stored_body, local_body = data(70_000, "s"), data(5000, "l")
    store.put_bytes("s", stored_body)
    store.put_bytes("victim", b"replaced")
    core = await make(store)
    await write_file(core, "l", local_body)
    await node_of(core, "s")
    await core.rename(ROOT_INO, "s", ROOT_INO, "victim")
    await core.rename(ROOT_INO, "l", ROOT_INO, "l2")
    assert await errno_of(core.lookup(ROOT_INO, "s")) == errno.ENOENT
    assert xxh(await read_all(core, "victim")) == xxh(stored_body)
    assert await errno_of(core.rename(ROOT_INO, "l2", ROOT_INO, "victim", 1)) == errno.EEXIST
    assert await errno_of(core.rename(ROOT_INO, "l2", ROOT_INO, "x", 2)) == errno.EINVAL
    await settle(core)
    assert stored(store) == {"victim": xxh(stored_body), "l2": xxh(local_body)}


async def test_rename_of_a_directory_moves_stored_and_local_children(
        store: MemoryStore, make: Cores) -> None:
    bodies = {f"d/{n}": data(1000 + i, n) for i, n in enumerate(["a", "b", "sub/c"])}
    for k, b in bodies.items():
        store.put_bytes(k, b)
    store.put_bytes("d/", b"")
    core = await make(store)
    d = await node_of(core, "d")
    await write_file(core, "new", b"written here", parent=d)
    sub = await core.mkdir(d, "empty", 0o755, ME)  # (its marker may not be sent yet)
    assert await errno_of(core.rename(ROOT_INO, "d", sub.ino, "x")) == errno.EINVAL
    await core.rename(ROOT_INO, "d", ROOT_INO, "e")
    await settle(core)
    want = {"e" + k[1:]: xxh(b) for k, b in bodies.items()}
    want.update({"e/": xxh(b""), "e/new": xxh(b"written here"), "e/empty/": xxh(b"")})
    assert stored(store) == want
    assert core.index.all_ops() == {}
    assert xxh(await read_all(core, "e/sub/c")) == xxh(bodies["d/sub/c"])
    assert await errno_of(core.lookup(ROOT_INO, "d")) == errno.ENOENT


async def test_rename_of_a_directory_over_an_empty_one_shows_what_moved(
        store: MemoryStore, make: Cores) -> None:
    """Found by the model test on the core: mkdir cached an empty listing of the target,
    which went on answering lookups below it after the rename replaced it."""
    store.put_bytes("a/x", b"moved")
    core = await make(store)
    await core.mkdir(ROOT_INO, "b", 0o755, ME)
    await core.rename(ROOT_INO, "a", ROOT_INO, "b")
    assert await read_all(core, "b/x") == b"moved"
    await settle(core)
    assert stored(store) == {"b/x": xxh(b"moved")}


class SlowDeletes(MemoryStore):
    def delete(self, key: str) -> None:
        time.sleep(0.3)  # (in a worker thread: uploads land meanwhile)
        super().delete(key)


async def test_a_file_uploaded_under_its_new_name_during_its_rename_stays_readable(
        make: Cores) -> None:
    """Found by the model test on the core: the upload of a renamed local file landed
    under the new name while rename deleted the old object, before the inode moved there;
    the inode kept the old ETag and the next truncate (a copy of that version) met ESTALE."""
    store = SlowDeletes("bkt")
    core = await make(store)
    await write_file(core, "f", b"first version")
    await settle(core)
    ino = await node_of(core, "f")
    fh = await core.open(ino, os.O_WRONLY)
    await core.files.write(fh, 0, b"FIRST")
    await core.files.release(fh)
    await core.rename(ROOT_INO, "f", ROOT_INO, "g")
    assert "g" not in core.wb.files, "the upload was to land during the rename"
    await core.setattr(ino, AttrChange(size=9))
    assert await read_all(core, "g") == b"FIRST ver"
    await settle(core)
    assert stored(store) == {"g": xxh(b"FIRST ver")}


async def test_an_interrupted_directory_rename_is_finished_by_the_next_start(
        store: MemoryStore, make: Cores) -> None:
    """A crash after half of the children moved: the ops entry written before the move
    makes the next start finish it, and a child that was written locally under the old name
    (still in the journal) lands under the new one with its new content."""
    bodies = {n: data(3000 + i, n) for i, n in enumerate(["a", "b", "c", "deep/d"])}
    for n, b in bodies.items():
        store.put_bytes(f"d/{n}", b)
    crashed = await make(store, "crashed")
    await settle(crashed)
    fh = await crashed.open(await node_of(crashed, "d/c"), os.O_RDWR)
    await crashed.files.write(fh, 0, b"NEW")  # journaled, not uploaded (the handle is open)
    oid = crashed.index.next_id()
    crashed.index.put_op(oid, RenameDirOp("d/", "e/"))
    # The crash came after "a" was copied and deleted and "b" was copied only.
    store.objects["e/a"] = store.objects.pop("d/a")
    store.put_bytes("e/b", bodies["b"])
    await make.crash(crashed)

    core = await make(store, "crashed")
    await settle(core)
    want = {f"e/{n}": xxh(b) for n, b in bodies.items()}
    want["e/c"] = xxh(b"NEW" + bodies["c"][3:])
    assert stored(store) == want
    assert core.index.all_ops() == {}
    assert xxh(await read_all(core, "e/c")) == want["e/c"]


async def test_setattr_after_a_rename_finds_the_moved_object(store: MemoryStore,
                                                             make: Cores) -> None:
    store.put_bytes("d/f", b"content")
    core = await make(store)
    await core.rename(ROOT_INO, "d", ROOT_INO, "e")
    ino = await node_of(core, "e/f")
    await core.setattr(ino, AttrChange(mode=0o640))
    assert int(store.objects["e/f"].metadata["mode"]) == stat.S_IFREG | 0o640
    assert store.objects["e/f"].data == b"content"


async def test_a_directory_keeps_its_known_attributes_after_its_ttl(
        store: MemoryStore, make: Cores) -> None:
    """A listing or probe shows a directory as a bare prefix (no metadata; SeaweedFS even
    drops a marker's): once the entry's TTL ran out, what this mount set (chmod) must not
    fall back to the mount's defaults (it did through revalidate: mode 0755 again)."""
    core = await make(store, entry_ttl="0", list_ttl="0")
    d = await core.mkdir(ROOT_INO, "d", 0o755, ME)
    await core.setattr(d.ino, AttrChange(mode=0o710))
    await settle(core)
    again = await core.lookup(ROOT_INO, "d")
    assert stat.S_IMODE(core.attrs_of(again).mode) == 0o710
    await core.ns.revalidate(again)
    assert stat.S_IMODE(core.attrs_of(core.getattr(again.ino)).mode) == 0o710


def _store_down(store: MemoryStore) -> None:
    """Every request fails as a reset connection does (retryable), until heal()."""
    for op in ("head", "list", "get", "put", "create_multipart", "upload_part",
               "complete_multipart", "copy", "delete", "delete_many"):
        store.inject(op, StoreError("ConnectionError", "reset", None, retryable=True),
                     times=1_000_000)


@pytest.mark.parametrize("marker_landed", [True, False])
@pytest.mark.parametrize("list_ttl", ["60", "0.05"])
async def test_new_files_in_a_new_directory_during_an_outage(
        make: Cores, store: MemoryStore, list_ttl: str, marker_landed: bool) -> None:
    """mkdir, then the store goes down: creating files in the new directory works (from
    its listing, fresh or not; the probes give up within read_timeout), nothing is
    lost, and everything is in the store once it is back (test_faults'
    test_store_down_while_writing, without FUSE)."""
    core = await make(store, list_ttl=list_ttl, read_timeout="0.5", negative_ttl="0.05")
    o = (await core.mkdir(ROOT_INO, "o", 0o755, ME)).ino
    if marker_landed:
        await settle(core)
    _store_down(store)
    await trio.sleep(0.1)  # past list_ttl=0.05: the listing made by mkdir is stale
    bodies = {f"f{i}": data(1000 + i, f"o{i}") for i in range(5)}
    for name, body in bodies.items():
        with pytest.raises(FsError) as exc:
            await core.lookup(o, name)
        assert exc.value.errno == errno.ENOENT  # not EIO: the listing answers
        await write_file(core, name, body, parent=o)
    store._faults.clear()
    await settle(core)
    for name, body in bodies.items():
        assert xxh(store.objects[f"o/{name}"].data) == xxh(body)
    assert "o/" in store.objects  # the directory's marker too
