# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""A file unlinked and created again under the same name before its batched DELETE was sent
(unlink=batch, the devbox profile; `git checkout` does this for every file it changes): the
new file replaces the stored version (an upload conditional on it) instead of waiting a
round trip for the DELETE, and a crash in between loses neither the unlink nor the file."""

from __future__ import annotations

from conftest import xxh
from coretree import Cores
from test_core import ME, make, node_of, read_all, settle, stored, write_file  # noqa: F401

from caiosfs.records import DeleteOp
from caiosfs.store.memory import MemoryStore


async def test_recreate_replaces_without_waiting_for_the_delete(make: Cores) -> None:
    store = MemoryStore("bkt")
    for i in range(20):
        store.put_bytes(f"src/m{i}.py", b"old %d" % i)
    core = await make(store, unlink="batch")
    d = await node_of(core, "src")
    for i in range(20):
        await core.unlink(d, f"m{i}.py")
        await write_file(core, f"m{i}.py", b"new %d" % i, parent=d)
    assert store.calls["delete_many"] == 0 and store.calls["delete"] == 0
    await settle(core)
    assert stored(store) == {f"src/m{i}.py": xxh(b"new %d" % i) for i in range(20)}
    assert store.calls["delete_many"] == 0  # nothing was deleted: every version replaced
    assert not [k for k in store.objects if ".conflict" in k]
    assert core.index.all_ops() == {}
    assert await read_all(core, "src/m3.py") == b"new 3"


async def test_unlink_alone_still_deletes(make: Cores) -> None:
    store = MemoryStore("bkt")
    store.put_bytes("src/a", b"a")
    store.put_bytes("src/b", b"b")
    core = await make(store, unlink="batch")
    d = await node_of(core, "src")
    await core.unlink(d, "a")
    await write_file(core, "c", b"c", parent=d)  # another name: the DELETE of a still goes
    await settle(core)
    assert stored(store) == {"src/b": xxh(b"b"), "src/c": xxh(b"c")}


async def test_a_crash_between_journal_and_dropped_delete_keeps_the_new_file(
        make: Cores) -> None:
    """The state a crash can leave: the DELETE's ops entry and the new file's journal
    entry over the same version. The next start uploads the file over that version and
    drops the DELETE (it would otherwise delete that version first, leaving the name absent
    from the store until the file is uploaded again as a new object)."""
    store = MemoryStore("bkt")
    store.put_bytes("src/f", b"old")
    etag = store.objects["src/f"].etag
    crashed = await make(store, "crashed", unlink="batch")
    d = await node_of(crashed, "src")
    fh, _ = await crashed.create(d, "f", 0o644, ME)
    assert await crashed.files.write(fh, 0, b"NEW") == 3
    assert crashed.wb.files["src/f"].base_etag == etag  # journaled over the stored version
    crashed.index.put_op(crashed.index.next_id(), DeleteOp("src/f", etag))
    await make.crash(crashed)

    core = await make(store, "crashed", unlink="batch")
    await settle(core)
    assert stored(store) == {"src/f": xxh(b"NEW")}
    assert store.calls["delete"] == 0
    assert core.index.all_ops() == {}
