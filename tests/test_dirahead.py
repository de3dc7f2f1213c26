"""Directory readahead (caiosfs/dirahead.py) driven through the core on the in-memory store,
which counts requests: a reader going through a directory's small files in listing order
finds its GETs issued ahead of it, several in flight; a random reader pays no GET it did not
ask for; what is read is the stored content either way."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import test_core
import test_treelist
import trio
from conftest import data, xxh
from coretree import Cores
from test_core import node_of

from caiosfs.core import Core
from caiosfs.dirahead import FIRST_WINDOW, TINY_MAX
from caiosfs.inodes import ROOT_INO
from caiosfs.store.memory import MemoryStore

N = 50
make = test_core.make  # the fixture: started cores on the in-memory store


class CountingStore(MemoryStore):
    """Counts the GETs running at once (each one takes ``delay`` seconds)."""

    def __init__(self, bucket: str, delay: float = 0.0) -> None:
        super().__init__(bucket)
        self.delay = delay
        self.now = 0
        self.most = 0
        self._n_lock = threading.Lock()

    def get_range(self, *args: Any, **kw: Any) -> None:
        with self._n_lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.delay)
            super().get_range(*args, **kw)
        finally:
            with self._n_lock:
                self.now -= 1


def fill(store: MemoryStore, n: int = N) -> dict[str, str]:
    """A directory "d" of ``n`` small files of various sizes (and a subdirectory); name ->
    xxh of its body."""
    want = {}
    for i in range(n):
        body = data(1000 + 7919 * i % 60_000, f"f{i}")
        store.put_bytes(f"d/f{i:03d}", body)
        want[f"f{i:03d}"] = xxh(body)
    store.put_bytes("d/sub/x", b"below")
    return want


async def listed(core: Core) -> tuple[int, list[str]]:
    """readdir of d, as os.walk and tar do first: its inode and its files' names."""
    d = await core.lookup(ROOT_INO, "d")
    fh = core.opendir(d.ino)
    names = [name for name, n in await core.readdir(fh, 0) if not n.is_dir]
    core.releasedir(fh)
    return d.ino, names


async def read(core: Core, dino: int, name: str) -> str:
    fh = await core.open((await core.lookup(dino, name)).ino, os.O_RDONLY)
    try:
        out = b""
        while chunk := await core.files.read(fh, len(out), 128 << 10):
            out += chunk
        return xxh(out)
    finally:
        await core.files.release(fh)


async def quiet(core: Core) -> None:
    """Every fetch (ahead or not) has ended."""
    while core.fetcher.running or (core.files.ahead and core.files.ahead.in_flight):
        await trio.sleep(0.01)


async def test_an_in_order_reader_finds_its_files_fetched_ahead(make: Cores) -> None:
    store = CountingStore("bkt", delay=0.02)
    want = fill(store)
    core = await make(store)
    dino, names = await listed(core)
    assert names == sorted(want)
    got = {}
    for k, name in enumerate(names):
        got[name] = await read(core, dino, name)
        if k == 3:
            await quiet(core)
            # The reader asked for 4 files; the next ones were fetched without it.
            assert store.calls["get"] >= 4 + FIRST_WINDOW
    await quiet(core)
    assert got == want
    assert store.calls["get"] == N  # each file fetched once, none twice
    assert store.most > 1  # several GETs in flight for one reader
    ahead = core.files.ahead
    assert ahead is not None and ahead.issued >= N - 10
    assert core.metrics.value("caiosfs_dirahead_files_total") == ahead.issued


async def test_a_random_reader_pays_no_get_it_did_not_ask_for(make: Cores) -> None:
    store = CountingStore("bkt")
    want = fill(store)
    core = await make(store)
    dino, names = await listed(core)
    # Fewer than a third of the directory (a third of a small directory read is taken for
    # an import reading most of a package: the rest is then fetched).
    pick = random.Random(7).sample(names, N // 3 - 1)
    for name in pick:
        assert await read(core, dino, name) == want[name]
    await quiet(core)
    assert store.calls["get"] == len(pick)
    assert core.files.ahead is not None and core.files.ahead.issued == 0


async def test_a_data_loader_of_16_tasks_over_a_large_directory_fetches_nothing_extra(
        make: Cores) -> None:
    store = CountingStore("bkt")
    want = fill(store, 400)
    core = await make(store)
    dino, names = await listed(core)
    pick = random.Random(3).sample(names, 200)

    async def worker(part: list[str]) -> None:
        for name in part:
            assert await read(core, dino, name) == want[name]
    async with trio.open_nursery() as n:
        for t in range(16):
            n.start_soon(worker, pick[t::16])
    await quiet(core)
    assert store.calls["get"] == len(pick)
    assert core.files.ahead is not None and core.files.ahead.issued == 0


async def test_most_of_a_small_directory_read_out_of_order_fetches_the_rest(
        make: Cores) -> None:
    """An import reads a package's modules in import order (m0, m1, m2 ... against listing
    order m0, m1, m10, m100 ...): once a third were read, the rest is fetched."""
    store = CountingStore("bkt")
    want = fill(store, 30)
    core = await make(store)
    dino, names = await listed(core)
    order = sorted(names, key=lambda s: (int(s[1:]) % 7, s))  # no run of neighbours
    for name in order:
        assert await read(core, dino, name) == want[name]
    await quiet(core)
    assert store.calls["get"] == 30
    assert core.files.ahead is not None and core.files.ahead.issued >= 15


async def test_a_tiny_directory_is_fetched_at_its_first_open(make: Cores) -> None:
    """git's `.git/` (HEAD, config, index, packed-refs ...) or a pack and its index: the
    first file opened brings the others along, one round of GETs instead of one each in a
    row; a directory over TINY_MAX files does not (the first open fetches nothing ahead)."""
    for n, ahead in ((TINY_MAX, TINY_MAX - 1), (TINY_MAX + 1, 0)):
        store = CountingStore("bkt")
        want = fill(store, n)
        core = await make(store, name=f"c{n}")
        dino, names = await listed(core)
        first = names[len(names) // 2]  # (not the first file: no run in listing order)
        assert await read(core, dino, first) == want[first]
        await quiet(core)
        assert core.files.ahead is not None and core.files.ahead.issued == ahead
        assert store.calls["get"] == 1 + ahead
        for name in names:  # what was fetched ahead is what the store holds
            assert await read(core, dino, name) == want[name]
        assert store.calls["get"] == n


GIT = {  # a clone's .git/ (path -> size); the hooks directory is not tiny
    "HEAD": 21, "config": 255, "index": 80_000, "packed-refs": 179,
    "refs/heads/main": 41, "refs/remotes/origin/HEAD": 30, "info/exclude": 240,
    "objects/pack/p.idx": 76_000, "objects/pack/p.pack": 505_000,
    **{f"hooks/h{i}.sample": 2_000 + i for i in range(TINY_MAX + 2)},
}


@pytest.mark.parametrize("trees", [True, False])
async def test_a_tiny_directory_brings_its_tiny_subdirectories(
        make: Cores, trees: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a remote store a directory's first listing lists the tree below it
    (treelist.py): git's first open of .git/HEAD then also fetches refs/heads/main,
    info/exclude and the pack with its index, which git would read one round trip after
    another; not the hooks (more than TINY_MAX files). Without a tree listing nothing below
    is known, and nothing is listed to find out: .git's own files only."""
    store = CountingStore("bkt")
    want = {}
    for path, size in GIT.items():
        body = data(size, path)
        store.put_bytes(f"repo/.git/{path}", body)
        want[path] = xxh(body)
    store.put_bytes("repo/src/a.py", b"print(1)\n")
    test_treelist.counting(store, delay=test_treelist.REMOTE if trees else 0.0)
    if not trees:
        # A near store: its LISTs (in-memory, through a thread) were once measured at
        # >= REMOTE_LIST_S in a loaded parallel CI run, which took it for a remote one.
        monkeypatch.setattr("caiosfs.treelist.REMOTE_LIST_S", 5.0)
    core = await make(store, profile="devbox", list_ttl="60")
    assert await test_treelist.names(core, "") == ["repo"]  # (how far the store is)
    assert sorted(await test_treelist.names(core, "repo")) == [".git", "src"]
    gino = await node_of(core, "repo/.git")
    for t in core.ns.view.trees.trees:  # (the tree listing of repo/, in the background)
        while not t.stopped:
            await trio.sleep(0.01)
    assert bool(core.ns.view.trees.trees) == trees
    # (git misses several names in .git/ before HEAD: the devbox profile lists it then)
    assert sorted(await test_treelist.names(core, "repo/.git")) == [
        "HEAD", "config", "hooks", "index", "info", "objects", "packed-refs", "refs"]
    assert await read(core, gino, "HEAD") == want["HEAD"]
    await quiet(core)
    own = [p for p in GIT if "/" not in p]
    below = ["refs/heads/main", "refs/remotes/origin/HEAD", "info/exclude",
             "objects/pack/p.idx", "objects/pack/p.pack"]
    assert store.calls["get"] == len(own) + (len(below) if trees else 0)
    for path in below + ["hooks/h0.sample"]:  # what was fetched is what the store holds
        d, _, name = path.rpartition("/")
        assert await read(core, await node_of(core, f"repo/.git/{d}"), name) == want[path]
    assert store.calls["get"] == len(own) + len(below) + 1


async def test_dirahead_off_and_dirty_files(make: Cores) -> None:
    store = CountingStore("bkt")
    want = fill(store)
    core = await make(store, dirahead="0")
    assert core.files.ahead is None
    dino, names = await listed(core)
    for name in names[:10]:
        assert await read(core, dino, name) == want[name]
    await quiet(core)
    assert store.calls["get"] == 10

    # On: a file made dirty (written here, not uploaded yet) is never fetched ahead.
    core2 = await make(store, "c2", dirahead="1", upload_delay="60")
    dino, names = await listed(core2)
    fh = await core2.open((await core2.lookup(dino, names[5])).ino, os.O_WRONLY)
    await core2.files.write(fh, 0, b"changed")
    await core2.files.release(fh)
    before = store.calls["get"]  # (the dirty copy fetched f005 once)
    for name in names:
        got = await read(core2, dino, name)
        assert got == want[name] or name == names[5]
    await quiet(core2)
    assert store.calls["get"] - before == N - 1  # f005 read from its local file only
    assert core2.files.ahead is not None and core2.files.ahead.issued >= N - 10


# a real mount ----------------------------------------------------------------------------
def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): xxh(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_tree_restored_from_a_cold_mount_is_byte_identical(s3: Any, bucket: str,
                                                            mounter: Any,
                                                            tmp_path: Path) -> None:
    """A tree written through a mount, read back after a cold remount (empty cache) by
    os.walk and by ``tar c``: the same bytes, each file fetched once, most of them ahead."""
    import shutil
    import subprocess
    src = tmp_path / "src"
    rnd = random.Random(17)
    for i in range(120):
        p = src / f"pkg{i % 4}" / f"sub{i % 3}" / f"m{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data(rnd.randrange(1, 40_000), f"t{i}"))
    (src / "big.bin").write_bytes(data(9 << 20, "big"))  # (the readahead window's job)
    want = _digests(src)
    m = mounter(bucket)
    shutil.copytree(src, m.path / "tree")
    m.flush()
    m.umount()

    m2 = mounter(bucket)
    got: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(m2.path / "tree"):
        for name in names:
            p = Path(dirpath) / name
            got[str(p.relative_to(m2.path / "tree"))] = xxh(p.read_bytes())
    assert got == want
    st = m2.status()
    assert st["dirahead_files"] >= 60, st
    # Every small file once, the big one in its few ranged GETs: nothing fetched twice.
    assert st["s3_get_requests"] <= 120 + 4, st
    assert st["bytes_in"] <= sum((src / k).stat().st_size for k in want) + (1 << 20), st
    m2.umount()

    m3 = mounter(bucket)  # tar c of a cold mount
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(f"tar cf - -C {m3.path} tree | tar xf - -C {out}", shell=True,
                       capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert _digests(out / "tree") == want
    assert m3.status()["dirahead_files"] >= 60
