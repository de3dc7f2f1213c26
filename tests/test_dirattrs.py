# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""Directory attribute records (dirattrs.py), on the core without FUSE: what one mount
uploads into a directory, a cold mount (empty index) lists with no HEAD at all and shows
exactly; a record that does not hold an object's version, or is not a record, costs HEADs
and never a wrong attribute; the reserved name is invisible and cannot be made; rmdir and
unlinks leave nothing behind; dirattrs=0 writes nothing (and still reads)."""

from __future__ import annotations

import errno
import json
import stat

import trio
from coretree import Cores
from test_core import ME, errno_of, make, settle, write_file  # noqa: F401  (make: fixture)

from caiosfs.attrs import RECORD
from caiosfs.core import AttrChange, Core
from caiosfs.dirattrs import DEBOUNCE, Record, covered, encode, parse
from caiosfs.inodes import ROOT_INO
from caiosfs.store.memory import MemoryStore

EXACT_MTIME = 1_700_000_123_456_789_012


async def write_tree(core: Core) -> dict[str, tuple[int, int, int, int]]:
    """Files of several kinds in the root and in ``d``; what the writer shows for each."""
    d = await core.mkdir(ROOT_INO, "d", 0o755, ME)
    await write_file(core, "top", b"top")
    names = []
    for i, mode in enumerate((0o644, 0o755, 0o600, 0o640)):
        fh, n = await core.create(d.ino, f"f{i}", mode, ME)
        await core.files.write(fh, 0, b"x" * (i + 1))
        await core.files.release(fh)
        names.append(n)
    await core.setattr(names[2].ino, AttrChange(mtime_ns=EXACT_MTIME))
    await core.symlink(d.ino, "ln", b"f0", ME)
    await settle(core)
    await core.flush_records()
    out = {}
    for path in ("top", "d/f0", "d/f1", "d/f2", "d/f3", "d/ln"):
        a = core.attrs_of(await lookup(core, path))
        out[path] = (a.mode, a.uid, a.gid, a.mtime_ns)
    return out


async def lookup(core: Core, path: str):  # type: ignore[no-untyped-def]
    ino = ROOT_INO
    for name in path.split("/"):
        n = await core.lookup(ino, name)
        ino = n.ino
    return n


async def shown(core: Core) -> dict[str, tuple[int, int, int, int]]:
    """readdir of the root and of d (as `ls -l`/git status walk), then a lookup of each."""
    out = {}
    for dir_path in ("", "d"):
        ino = ROOT_INO if not dir_path else (await lookup(core, dir_path)).ino
        fh = core.opendir(ino)
        names = [name for name, _ in await core.readdir(fh, 0)]
        core.releasedir(fh)
        assert RECORD not in names
        for name in names:
            n = await core.lookup(ino, name)
            if not n.is_dir:
                a = core.attrs_of(n)
                path = f"{dir_path}/{name}" if dir_path else name
                out[path] = (a.mode, a.uid, a.gid, a.mtime_ns)
    return out


async def test_a_cold_listing_takes_attributes_from_the_record_without_heads(
        make: Cores) -> None:
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    assert {RECORD, f"d/{RECORD}"} <= set(store.objects)
    assert stat.S_ISLNK(written["d/ln"][0]) and written["d/f2"][3] == EXACT_MTIME
    await make.crash(c1)
    before = dict(store.calls)
    c2 = await make(store, "c2", dirattrs="1")  # an empty cache: a remount elsewhere
    assert await shown(c2) == written
    assert store.calls["head"] == before.get("head", 0)  # not one HEAD
    assert store.calls["get"] == before.get("get", 0)  # no content read
    assert store.calls["get_small"] - before.get("get_small", 0) == 2  # a record per dir


async def test_what_a_record_gave_is_remembered_in_the_cache_across_a_remount(
        make: Cores) -> None:
    """A listing remembers the attributes its record gave (one index transaction for the
    directory's files) and a later listing on the same cache finds them there: with the
    records gone from the store, a remount still shows everything exactly, with no HEAD."""
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    await make.crash(c1)
    c2 = await make(store, "c2", dirattrs="1")
    assert await shown(c2) == written
    await make.crash(c2)
    for key in (RECORD, f"d/{RECORD}"):
        del store.objects[key]
    before = dict(store.calls)
    c2 = await make(store, "c2", dirattrs="1")  # the same cache directory
    assert await shown(c2) == written
    assert store.calls["head"] == before.get("head", 0)


async def test_what_the_record_does_not_hold_is_headed_and_shown_right(make: Cores) -> None:
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    await make.crash(c1)
    # Another client overwrites f1 (a new ETag), and changes f3's metadata in place after
    # the record was written (the ETag kept, Last-Modified later: a metadata-only copy).
    store.put_bytes("d/f1", b"other", {"mode": str(0o100604), "mtime": "1600000000"})
    f3 = store.objects["d/f3"]
    f3.metadata = {"mode": str(0o100700), "mtime": "1600000001"}
    f3.mtime = store.objects[f"d/{RECORD}"].mtime + 2
    heads: list[str] = []
    real_head = store.head
    store.head = lambda key: (heads.append(key), real_head(key))[1]  # type: ignore[method-assign]
    c2 = await make(store, "c2", dirattrs="1")
    got = await shown(c2)
    assert sorted(heads) == ["d/f1", "d/f3"]
    assert got["d/f1"][0] == 0o100604 and got["d/f1"][3] == 1_600_000_000 * 10**9
    assert got["d/f3"][0] == 0o100700 and got["d/f3"][3] == 1_600_000_001 * 10**9
    for path in ("top", "d/f0", "d/f2", "d/ln"):
        assert got[path] == written[path]


async def test_a_corrupt_or_foreign_record_is_ignored(make: Cores) -> None:
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    await make.crash(c1)
    store.put_bytes(f"d/{RECORD}", b'{"v":1,"files":{"f0":["x"')
    store.put_bytes(RECORD, json.dumps({"v": 99, "files": {}}).encode())
    before = store.calls["head"]
    c2 = await make(store, "c2", dirattrs="1")
    assert await shown(c2) == written
    assert store.calls["head"] - before == len(written)  # each file HEADed, as without it


async def test_the_reserved_name_is_invisible_and_cannot_be_made(make: Cores) -> None:
    store = MemoryStore("bkt")
    store.put_bytes(f"d/{RECORD}", b"not a record")
    store.put_bytes("d/f", b"f")
    core = await make(store, "c1", dirattrs="1")
    d = await lookup(core, "d")
    assert await errno_of(core.lookup(d.ino, RECORD)) == errno.ENOENT
    assert await errno_of(core.create(d.ino, RECORD, 0o644, ME)) == errno.EPERM
    assert await errno_of(core.mkdir(ROOT_INO, RECORD, 0o755, ME)) == errno.EPERM
    assert await errno_of(core.symlink(d.ino, RECORD, b"f", ME)) == errno.EPERM
    assert await errno_of(core.rename(d.ino, "f", d.ino, RECORD)) == errno.EPERM
    fh = core.opendir(d.ino)
    assert [name for name, _ in await core.readdir(fh, 0)] == ["f"]
    assert store.objects[f"d/{RECORD}"].data == b"not a record"


async def test_rmdir_and_unlinks_leave_nothing_under_the_directory(make: Cores) -> None:
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    await write_tree(c1)
    await make.crash(c1)
    # A cold mount: another tool deleted the files, so d holds its marker and its record.
    for k in [k for k in store.objects if k.startswith("d/") and k != "d/" and RECORD not in k]:
        del store.objects[k]
    c2 = await make(store, "c2", dirattrs="1")
    await c2.rmdir(ROOT_INO, "d")
    assert not [k for k in store.objects if k.startswith("d/")]
    # rm -rf on the mount that wrote the record: unlinks (their record update pending),
    # then rmdir at once; nothing comes back later.
    e = await c2.mkdir(ROOT_INO, "e", 0o755, ME)
    for i in range(3):
        await write_file(c2, f"g{i}", b"g", parent=e.ino)
    await settle(c2)
    await c2.flush_records()
    assert f"e/{RECORD}" in store.objects
    for i in range(3):
        await c2.unlink(e.ino, f"g{i}")
    await c2.rmdir(ROOT_INO, "e")
    await settle(c2)
    await trio.sleep(DEBOUNCE + 0.3)
    await c2.flush_records()
    assert not [k for k in store.objects if k.startswith("e/")]


async def test_without_dirattrs_no_record_is_written_but_one_is_read(make: Cores) -> None:
    store = MemoryStore("bkt")
    c0 = await make(store, "c0", dirattrs="0")
    await write_file(c0, "plain", b"p")
    await settle(c0)
    await c0.flush_records()
    await trio.sleep(DEBOUNCE + 0.3)
    assert not [k for k in store.objects if RECORD in k]
    await make.crash(c0)
    store.objects.clear()
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    await make.crash(c1)
    before = store.calls["head"]
    c2 = await make(store, "c2", dirattrs="0")  # (metadata=head: the devbox profile)
    assert await shown(c2) == written
    assert store.calls["head"] == before


def test_records_parse_and_validate() -> None:
    files = {"a": ('"e1"', 3, {"mode": "33188"}), "é": ('"e2-1"', 0, {})}
    assert parse(encode(files)) == files
    for bad in (b"", b"[]", b'{"v":2,"files":{}}', b'{"v":1,"files":{"a":["e",1]}}',
                b'{"v":1,"files":{"a":["e","1",{}]}}', b"\xff"):
        assert parse(bad) is None
    rec = Record(files, '"r"', 1000.5)
    assert covered(rec, "a", '"e1"', 3, 1000.9) == {"mode": "33188"}  # same second
    assert covered(rec, "a", '"e1"', 3, 1001.0) is None  # modified after the record
    assert covered(rec, "a", '"e1"', 4, 999.0) is None  # another size
    assert covered(rec, "a", '"ex"', 3, 999.0) is None  # another version
    assert covered(rec, "b", '"e1"', 3, 999.0) is None


async def test_one_lookup_in_a_foreign_directory_heads_one_object(make: Cores) -> None:
    """dirattrs=1 lists a directory at its first lookup: what no record covers is HEADed
    by the lookups (in windows), not all at once; a readdir then reads the rest."""
    store = MemoryStore("bkt")
    for i in range(50):
        store.put_bytes(f"d/f{i:02d}", b"x", {"mode": str(0o100600), "mtime": "1600000000"})
    core = await make(store, "c1", dirattrs="1")
    d = await lookup(core, "d")
    before = store.calls["head"]
    n = await core.lookup(d.ino, "f10")
    assert core.attrs_of(n).mode == 0o100600
    assert store.calls["head"] - before == 1
    assert await errno_of(core.lookup(d.ino, "missing")) == errno.ENOENT
    probed = store.calls["head"] - before - 1  # (a miss as lookup_misses= says)
    got = await shown(core)
    assert all(a[0] == 0o100600 for p, a in got.items() if p.startswith("d/"))
    assert store.calls["head"] - before - probed == 50


async def test_a_directory_rename_moves_its_record_and_stays_right(make: Cores) -> None:
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    written = await write_tree(c1)
    await c1.rename(ROOT_INO, "d", ROOT_INO, "e")
    await settle(c1)
    await c1.flush_records()
    assert not [k for k in store.objects if k.startswith("d/")]
    assert f"e/{RECORD}" in store.objects
    await make.crash(c1)
    c2 = await make(store, "c2", dirattrs="1")
    e = await lookup(c2, "e")
    for path in ("d/f0", "d/f1", "d/f2", "d/f3", "d/ln"):
        n = await c2.lookup(e.ino, path[2:])
        a = c2.attrs_of(n)
        assert (a.mode, a.uid, a.gid, a.mtime_ns) == written[path]
