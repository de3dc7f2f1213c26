# ruff: noqa: F811  (test functions take the fixture `make` imported from test_core)
"""Tree listings (list_ahead, caiosfs/treelist.py): a directory's first cold listing lists
the whole tree below it, and the directories below are answered from those pages: a walk
(git status after a remount) costs a few LISTs instead of one per directory, and shows
exactly what a LIST of each directory would have shown, this mount's own changes included."""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
import trio
from coretree import Cores
from test_core import (
    ME,
    make,  # noqa: F401  (the fixture: a started core on the memory store)
    node_of,
    settle,
    write_file,
)

from caiosfs.attrs import RECORD
from caiosfs.config import build_config
from caiosfs.core import Core
from caiosfs.errors import FsError, UserError
from caiosfs.inodes import ROOT_INO
from caiosfs.store.memory import MemoryStore
from caiosfs.treelist import REMOTE_LIST_S

REMOTE = REMOTE_LIST_S + 0.005  # seconds a LIST takes on a store across a network


def seed(store: MemoryStore, top: str, dirs: int, files: int) -> dict[str, int]:
    """``top``/dNN/fM and ``top``/dNN/sub/x, each file of its own size; path -> size."""
    out = {}
    for d in range(dirs):
        for f in range(files):
            path = f"{top}/d{d:02d}/f{f}"
            out[path] = d * 100 + f + 1
        out[f"{top}/d{d:02d}/sub/x"] = d + 7
    for path, size in out.items():
        store.put_bytes(path, b"y" * size)
    return out


def counting(store: MemoryStore, delay: float = REMOTE) -> list[tuple[str, str | None]]:
    """The prefix and delimiter of every LIST the store answers from now on (but a probe's
    LIST of one key: it asks whether a name is a directory); each takes ``delay`` seconds
    (by default a remote store's: trees are listed only for one)."""
    seen: list[tuple[str, str | None]] = []
    inner = store.list

    def list_(prefix: str, delimiter: str | None = "/", token: str | None = None,
              max_keys: int = 1000) -> Any:
        if max_keys > 1:
            seen.append((prefix, delimiter))
        time.sleep(delay)
        return inner(prefix, delimiter, token, max_keys)
    store.list = list_  # type: ignore[method-assign]
    return seen


async def names(core: Core, path: str) -> list[str]:
    fh = core.opendir(await node_of(core, path) if path else ROOT_INO)
    try:
        return [n for n, _ in await core.readdir(fh, 0)]
    finally:
        core.releasedir(fh)


async def walk(core: Core, top: str) -> dict[str, int]:
    """What git status does after a remount: a lookup of every file, in sorted path order;
    path -> the size the mount shows."""
    out = {}
    for d in sorted(await names(core, top)):
        dpath = f"{top}/{d}"
        for name in sorted(await names(core, dpath)):
            n = await core.lookup(await node_of(core, dpath), name)
            if n.is_dir:
                for sub in await names(core, f"{dpath}/{name}"):
                    out[f"{dpath}/{name}/{sub}"] = core.attrs_of(
                        await core.lookup(n.ino, sub)).size
            else:
                out[f"{dpath}/{name}"] = core.attrs_of(n).size
    return out


@pytest.mark.parametrize("ahead", ["10", "0"])
async def test_a_walk_costs_a_few_lists_not_one_per_directory(make: Cores, ahead: str) -> None:
    store = MemoryStore("bkt")
    want = seed(store, "repo", dirs=20, files=10)
    core = await make(store, list_ahead=ahead, metadata="list", list_ttl="60")
    lists = counting(store)
    assert await walk(core, "repo") == want  # every file, of its size
    if ahead == "0":
        assert len([p for p, d in lists if d]) >= 41  # repo, 20 directories and their 20 subdirectories
    else:
        # The first directories listed are listed as before (the first LIST tells how far
        # the store is; the walk's lookups of "repo" from the root, one after another,
        # have the root listed), each starting a tree listing of what is below it in the
        # background (one page: 260 keys); the other directories below repo are not
        # listed on their own.
        assert len([p for p, d in lists if d]) <= 4, lists
        assert len(lists) <= 7, lists


async def test_a_tree_of_one_large_directory_stops_after_one_page(make: Cores) -> None:
    store = MemoryStore("bkt")
    for i in range(2500):
        store.put_bytes(f"big/{i:05d}", b"b")
    want = seed(store, "repo", dirs=3, files=2)
    core = await make(store, list_ahead="10", metadata="list", list_ttl="60")
    lists = counting(store)
    assert sorted(await names(core, "")) == ["big", "repo"]
    assert len(await names(core, "big")) == 2500
    assert await walk(core, "repo") == want
    # big's tree listing met 1,000 keys of one directory: no second page of it (nor of
    # the root's, had it one).
    flat = [p for p, d in lists if d is None]
    assert flat.count("big/") == 1 and flat.count("") <= 1, lists


async def test_directories_past_the_page_budget_are_listed_as_before(make: Cores) -> None:
    store = MemoryStore("bkt")
    want = seed(store, "repo", dirs=30, files=40)  # 1,230 keys: two pages
    core = await make(store, list_ahead="1", metadata="list", list_ttl="60")
    lists = counting(store)
    assert await walk(core, "repo") == want
    delims = [d for _, d in lists]
    assert delims.count(None) >= 1 and delims.count("/") >= 2  # the rest listed as before


async def test_changes_made_here_after_the_pages_show_in_what_they_list(make: Cores) -> None:
    store = MemoryStore("bkt")
    seed(store, "repo", dirs=4, files=3)
    lists = counting(store)
    core = await make(store, list_ahead="10", list_ttl="60", negative_ttl="0")
    assert sorted(await names(core, "repo")) == ["d00", "d01", "d02", "d03"]  # pages came
    # Changes before those directories are listed: what their listings show includes them.
    d1 = await node_of(core, "repo/d01")  # (a lookup: repo's listing, not d01's)
    await write_file(core, "new", b"new!", parent=d1)
    await core.unlink(await node_of(core, "repo/d02"), "f1")
    await core.rename(await node_of(core, "repo"), "d03", await node_of(core, "repo"), "e03")
    await settle(core)
    assert ("repo/d01/", "/") not in lists  # taken from the tree's page
    assert sorted(await names(core, "repo/d01")) == ["f0", "f1", "f2", "new", "sub"]
    assert sorted(await names(core, "repo/d02")) == ["f0", "f2", "sub"]
    assert sorted(await names(core, "repo/e03")) == ["f0", "f1", "f2", "sub"]
    with pytest.raises(FsError) as e:
        await node_of(core, "repo/d03")
    assert e.value.errno == errno.ENOENT
    assert sorted(k for k in store.objects if k.startswith("repo/e03/")) == [
        "repo/e03/f0", "repo/e03/f1", "repo/e03/f2", "repo/e03/sub/x"]


async def test_a_listing_from_the_pages_ages_like_a_list(make: Cores) -> None:
    """Another client's file made after the pages shows once list_ttl has passed since
    they were requested, as it would after a LIST made then."""
    store = MemoryStore("bkt")
    seed(store, "repo", dirs=2, files=1)
    counting(store)
    core = await make(store, list_ahead="10", list_ttl="0.3", negative_ttl="0")
    await names(core, "repo")
    store.put_bytes("repo/d01/late", b"late")
    await trio.sleep(0.4)
    assert "late" in await names(core, "repo/d01")


def test_list_ahead_is_a_count_of_pages_on_in_the_devbox_profile() -> None:
    with pytest.raises(UserError, match="list_ahead"):
        build_config("s3://bkt", {"list_ahead": "-1"})
    assert build_config("s3://bkt", {"profile": "devbox"}).list_ahead == 10
    assert build_config("s3://bkt", {}).list_ahead == 0


async def test_records_of_a_deep_tree_are_read_once_each_and_no_file_is_headed(
        make: Cores) -> None:
    """dirattrs=1: a walk down a path (a repository four directories deep, as the
    benchmark's) after a cold remount: every directory's attribute record is GET once,
    however many of the trees started on the way name it, and no file is HEADed."""
    store = MemoryStore("bkt")
    c1 = await make(store, "c1", dirattrs="1")
    parent = ROOT_INO
    for name in ("out", "wan", "caiosfs", "git"):
        parent = (await c1.mkdir(parent, name, 0o755, ME)).ino
    for d in range(6):
        sub = (await c1.mkdir(parent, f"d{d}", 0o755, ME)).ino
        for f in range(5):
            await write_file(c1, f"f{f}", b"z" * (d + f + 1), parent=sub)
    await settle(c1)
    await c1.flush_records()
    records = {k for k in store.objects if k.endswith(RECORD)}
    assert len(records) == 6  # one per directory that holds files
    await make.crash(c1)
    heads = store.calls["head"]
    asked: list[str] = []
    inner = store.get_small

    def get_small(key: str, limit: int) -> Any:
        asked.append(key)
        return inner(key, limit)
    store.get_small = get_small  # type: ignore[method-assign]
    counting(store)  # a round trip per LIST: the walk outruns the pages
    c2 = await make(store, "c2", dirattrs="1")
    got = await walk(c2, "out/wan/caiosfs/git")
    assert got == {f"out/wan/caiosfs/git/d{d}/f{f}": d + f + 1
                   for d in range(6) for f in range(5)}
    assert store.calls["head"] == heads
    assert sorted(k for k in asked if k in records) == sorted(records)  # each once


async def test_a_store_on_this_machine_gets_no_tree_listings(make: Cores) -> None:
    """Where a directory's LIST costs no round trip, a page of 1,000 keys costs the server
    about what the directories' own LISTs do: trees are not listed."""
    store = MemoryStore("bkt")
    want = seed(store, "repo", dirs=5, files=3)
    lists = counting(store, delay=0.0)
    core = await make(store, list_ahead="10", metadata="list", list_ttl="60")
    assert await walk(core, "repo") == want
    assert lists and all(d == "/" for _, d in lists), lists
