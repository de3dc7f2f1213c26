# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""Lookups of listed names whose metadata is not known yet (metadata=tagged after a cold
mount): the HEADs for it go in parallel windows ahead of the names asked for, never twice for
one object, and every answer carries the object's own x-amz-meta-* (mode, exact mtime).
And rmdir after batched unlinks (unlink=batch, the devbox profile): its emptiness check runs
while the DELETEs are in flight."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

import pytest
import trio
from coretree import Cores
from test_core import make  # noqa: F401  (the fixture: a started core on the memory store)

from caiosfs.core import Caller
from caiosfs.errors import FsError, StoreError
from caiosfs.inodes import ROOT_INO
from caiosfs.store import ObjectInfo
from caiosfs.store.client import GaveUp
from caiosfs.store.memory import MemoryStore

N = 60
READ_TIMEOUT = 1.0


class SlowHeads(MemoryStore):
    """A memory store whose HEADs take a while and count how many were in flight at once."""

    def __init__(self) -> None:
        super().__init__("bkt")
        self._mu = threading.Lock()
        self.now = self.most = 0
        self.headed: list[str] = []

    def head(self, key: str) -> ObjectInfo:
        with self._mu:
            self.now += 1
            self.most = max(self.most, self.now)
            self.headed.append(key)
        try:
            time.sleep(0.01)
            return super().head(key)
        finally:
            with self._mu:
                self.now -= 1


def seed(store: MemoryStore) -> None:
    for i in range(N):
        mode = 0o100755 if i % 7 == 0 else 0o100644
        store.put_bytes(f"d/f{i:03d}", b"x" * i,
                        {"mode": str(mode), "mtime": f"1700000000.{i:09d}"})


async def test_lookups_in_order_head_ahead_in_parallel(make: Cores) -> None:
    store = SlowHeads()
    seed(store)
    core = await make(store, metadata="tagged")
    d = await core.lookup(ROOT_INO, "d")
    nodes = [await core.lookup(d.ino, f"f{i:03d}") for i in range(N)]
    for i, n in enumerate(nodes):
        assert n.attrs.size == i
        assert n.attrs.mtime_ns == 1_700_000_000 * 10**9 + i
        assert stat.S_IMODE(n.attrs.mode) == (0o755 if i % 7 == 0 else 0o644)
    heads = [k for k in store.headed if k.startswith("d/f")]
    assert len(heads) == len(set(heads)) == N  # each object once
    assert store.most > 1  # in parallel, where each lookup paid a HEAD of its own
    assert store.calls["get"] == 0


async def test_lookups_in_any_order_and_at_once_stay_right(make: Cores) -> None:
    """Names asked for backwards and concurrently (a window in flight when another lookup
    wants one of its names): every answer right, no object HEADed twice."""
    store = SlowHeads()
    seed(store)
    core = await make(store, metadata="tagged")
    d = await core.lookup(ROOT_INO, "d")
    await core.ns.list_dir("d")  # (a readdir; without it, each name is probed)
    store.headed.clear()
    got: dict[int, int] = {}

    async def one(i: int) -> None:
        got[i] = (await core.lookup(d.ino, f"f{i:03d}")).attrs.mtime_ns

    async with trio.open_nursery() as n:
        for i in reversed(range(N)):
            n.start_soon(one, i)
            if i % 3 == 0:
                await trio.sleep(0.005)
    assert got == {i: 1_700_000_000 * 10**9 + i for i in range(N)}
    heads = [k for k in store.headed if k.startswith("d/f")]
    assert len(heads) == len(set(heads))


async def test_a_changed_object_in_a_window_is_headed_again(make: Cores) -> None:
    """An object replaced after the listing: the window's HEAD sees another ETag, and the
    lookup of it answers with the new version."""
    store = SlowHeads()
    seed(store)
    core = await make(store, metadata="tagged")
    d = await core.lookup(ROOT_INO, "d")
    for i in range(4):
        await core.lookup(d.ino, f"f{i:03d}")
    store.put_bytes("d/f030", b"new", {"mode": str(0o100600), "mtime": "1800000000"})
    for i in range(4, N):
        n = await core.lookup(d.ino, f"f{i:03d}")
        if i == 30:
            assert n.attrs.size == 3
            assert stat.S_IMODE(n.attrs.mode) == 0o600
            assert n.attrs.mtime_ns == 1_800_000_000 * 10**9


async def test_a_lookup_asks_a_store_that_does_not_answer_once(make: Cores) -> None:
    """A listed file's HEAD that fails (the store refuses or gives up after read_timeout)
    is not sent a second time by the same lookup: it answers with what the listing says
    (a read right after an outage's lookup waited read_timeout twice, once per HEAD)."""
    store = SlowHeads()
    seed(store)
    core = await make(store, metadata="tagged", read_timeout=str(READ_TIMEOUT))
    d = await core.lookup(ROOT_INO, "d")
    fh = core.opendir(d.ino)
    assert len(await core.readdir(fh, 0)) == N
    core.releasedir(fh)
    store.headed.clear()
    store.inject("head", StoreError("AccessDenied", "refused", 403), times=100)
    n = await core.lookup(d.ino, "f007")
    assert n.attrs.size == 7  # the listing's answer
    assert store.headed == ["d/f007"]
    store.inject("head", StoreError("InternalError", "down", 500, retryable=True),
                 times=10_000)
    t0 = trio.current_time()
    n = await core.lookup(d.ino, "f008")
    assert n.attrs.size == 8
    assert trio.current_time() - t0 < 2 * READ_TIMEOUT  # once, not twice


class SlowHeadStore(MemoryStore):
    slow = False

    def head(self, key: str) -> ObjectInfo:
        if self.slow:
            time.sleep(2 * READ_TIMEOUT)  # (a store that does not answer)
        return super().head(key)


async def test_a_read_right_after_a_probe_gave_up_fails_at_once(make: Cores) -> None:
    """A probe (HEAD + one-key LIST) whose LIST gives up cancels its HEAD: the read of the
    name that follows must not wait read_timeout a second time (test_faults saw 5.9 s
    against read_timeout 3 s when the directory's listing had expired on a loaded machine)."""
    store = SlowHeadStore("bkt")
    store.put_bytes("d/f", b"x" * 10)
    core = await make(store, metadata="list", read_timeout=str(READ_TIMEOUT), list_ttl="0.1",
                      entry_ttl="0.1")
    d = await core.lookup(ROOT_INO, "d")
    assert [n for n, _ in await core.readdir(core.opendir(d.ino), 0)] == ["f"]
    await trio.sleep(0.2)  # the listing expired: the next lookup probes
    down = StoreError("InternalError", "down", 500, retryable=True)
    store.inject("list", down, times=10_000)
    store.inject("get", down, times=10_000)
    store.slow = True
    n = await core.lookup(d.ino, "f")  # answered from the old listing, after read_timeout
    t0 = trio.current_time()
    fh = await core.open(n.ino, os.O_RDONLY)
    with pytest.raises(GaveUp):  # (EIO, in fs.py's handler)
        await core.files.read(fh, 0, 10)
    assert trio.current_time() - t0 < READ_TIMEOUT / 2


class ListBeforeDelete(MemoryStore):
    """LISTs answer with what the store held when they were sent, after the DeleteObjects
    sent meanwhile has finished: the race rmdir's emptiness check must not lose."""

    def list(self, prefix, delimiter="/", token=None, max_keys=1000):  # type: ignore[no-untyped-def]
        page = super().list(prefix, delimiter, token, max_keys)
        time.sleep(0.1)
        return page


@pytest.mark.parametrize("slow", ["list", "delete"])
async def test_rmdir_after_batched_unlinks_while_they_are_in_flight(make: Cores,
                                                                     slow: str) -> None:
    """rm -r with unlink=batch: rmdir checks emptiness while the directory's DELETEs are
    still in flight; it neither fails with ENOTEMPTY nor leaves names of deleted files in
    a listing, and the directory is gone from the store when it returns."""
    store: MemoryStore
    if slow == "list":
        store = ListBeforeDelete("bkt")
    else:
        store = MemoryStore("bkt")
        real = store.delete_many

        def delete_many(keys: list[str]) -> list[str]:
            time.sleep(0.1)
            return real(keys)
        store.delete_many = delete_many  # type: ignore[method-assign]
    for i in range(5):
        store.put_bytes(f"t/d/{i}", b"x")
    store.put_bytes("t/d/", b"")
    store.put_bytes("t/keep", b"k")
    core = await make(store, unlink="batch")
    t = await core.lookup(ROOT_INO, "t")
    d = await core.lookup(t.ino, "d")
    for i in range(5):
        await core.unlink(d.ino, str(i))
    await core.rmdir(t.ino, "d")
    assert set(store.objects) == {"t/keep"}
    assert sorted(name for name, _ in await core.ns.readdir(t)) == ["keep"]
    await core.mkdir(t.ino, "e", 0o755, Caller(0, 0, 0o022))
    store.put_bytes("t/e/x", b"x")  # another client's file: not empty
    with pytest.raises(FsError) as exc:
        await core.rmdir(t.ino, "e")
    assert exc.value.errno == errno.ENOTEMPTY
