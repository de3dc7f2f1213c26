# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""Lookups of names a directory does not have, one after another (git's loose-object and
ref probes: `git log -p` asks for `.git/objects/XX` of every object it reads from a pack):
after a few probes the directory is listed once, and with lookup_misses=listing (the devbox
profile) that listing answers the names it lacks for ``negative_ttl``, as the negative cache
would; a name created elsewhere shows once that time has passed. With the default (probe), a
name another client just created shows at once."""

from __future__ import annotations

import errno

import pytest
import trio
from coretree import Cores
from test_core import make  # noqa: F401  (the fixture: a started core on the memory store)

from caiosfs.errors import FsError
from caiosfs.inodes import ROOT_INO
from caiosfs.store.memory import MemoryStore


def requests(store: MemoryStore) -> int:
    return store.calls["head"] + store.calls["list"]


async def missing(core: object, parent: int, name: str) -> None:
    with pytest.raises(FsError) as e:
        await core.lookup(parent, name)  # type: ignore[attr-defined]
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("list_ttl", ["60", "0.1"])
async def test_misses_in_one_directory_cost_one_listing(make: Cores, list_ttl: str) -> None:
    store = MemoryStore("bkt")
    for i in range(5):
        store.put_bytes(f"objects/pack/p{i}", b"x")
    core = await make(store, list_ttl=list_ttl, negative_ttl="30", lookup_misses="listing")
    objects = (await core.lookup(ROOT_INO, "objects")).ino
    before = requests(store)
    for i in range(40):
        await missing(core, objects, f"{i:02x}")
    # Three probes (a HEAD and a one-key LIST each), then one listing for all the rest;
    # before, every one of the 40 names cost a probe (80 requests).
    assert requests(store) - before <= 3 * 2 + 1
    assert (await core.lookup(objects, "pack")).is_dir  # what the listing has, it answers


async def test_a_name_made_elsewhere_shows_after_negative_ttl(make: Cores) -> None:
    store = MemoryStore("bkt")
    store.put_bytes("d/a", b"a")
    core = await make(store, list_ttl="60", negative_ttl="0.3", lookup_misses="listing")
    d = (await core.lookup(ROOT_INO, "d")).ino
    for i in range(6):  # the listing for lookups is made
        await missing(core, d, f"m{i}")
    store.put_bytes("d/late", b"late")  # another client
    await missing(core, d, "late")  # within negative_ttl of the listing: a miss, as cached
    await trio.sleep(0.4)
    n = await core.lookup(d, "late")  # the listing is older than negative_ttl: asked again
    assert n.attrs.size == 4
    before = requests(store)
    for i in range(6, 30):
        await missing(core, d, f"m{i}")
    assert requests(store) - before <= 1  # that new listing answers them


async def test_by_default_a_name_made_elsewhere_shows_at_once(make: Cores) -> None:
    """lookup_misses=probe (every profile but devbox): a checkpoint reader on another node
    opens a file the writer just made, after this mount's own misses listed the directory."""
    store = MemoryStore("bkt")
    store.put_bytes("d/a", b"a")
    core = await make(store, profile="checkpoint", list_ttl="60", negative_ttl="30")
    assert core.cfg.lookup_misses == "probe"
    d = (await core.lookup(ROOT_INO, "d")).ino
    for i in range(6):
        await missing(core, d, f"m{i}")
    assert core.ns.listings["d"].for_lookups  # the misses listed the directory
    store.put_bytes("d/late", b"late")
    assert (await core.lookup(d, "late")).attrs.size == 4


async def test_a_listed_name_is_not_a_miss_when_list_ttl_is_shorter(make: Cores) -> None:
    """negative_ttl longer than list_ttl: a name the expired listing holds is asked again,
    never answered as a miss (the directory vanished, test_write_ops caught it)."""
    store = MemoryStore("bkt")
    store.put_bytes("d/a", b"a")
    core = await make(store, list_ttl="0.2", negative_ttl="5", lookup_misses="listing")
    d = (await core.lookup(ROOT_INO, "d")).ino
    for i in range(6):
        await missing(core, d, f"m{i}")
    await trio.sleep(0.3)
    assert (await core.lookup(d, "a")).attrs.size == 1
    await missing(core, d, "m0")
