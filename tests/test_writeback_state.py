"""A dirty file's state machine (caiosfs/writeback/files.py): the legal transitions, the
illegal ones refused, and the states real write-back operations leave a file in. No FUSE:
the in-memory store."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from conftest import data, xxh
from test_units import _wb, _write_closed

from caiosfs.attrs import Attrs
from caiosfs.store.memory import MemoryStore
from caiosfs.writeback import DirtyFile, IllegalTransition, Phase, Storage

MiB = 1 << 20

# The life drawn in files.py's docstring, restated here: a change there shows up as a diff.
LEGAL = {
    (Phase.IDLE, Phase.UPLOADING), (Phase.IDLE, Phase.DELETED), (Phase.IDLE, Phase.RELEASED),
    (Phase.UPLOADING, Phase.IDLE), (Phase.UPLOADING, Phase.RETIRING),
    (Phase.RETIRING, Phase.RETIRING), (Phase.RETIRING, Phase.DELETED),
    (Phase.DELETED, Phase.DELETED), (Phase.DELETED, Phase.FORGOTTEN),
    (Phase.FORGOTTEN, Phase.FORGOTTEN),
    (Storage.INLINE, Storage.FILE), (Storage.INLINE, Storage.CLOSED),
    (Storage.FILE, Storage.CLOSED), (Storage.CLOSED, Storage.CLOSED),
}


def _file(phase: Phase = Phase.IDLE, storage: Storage = Storage.FILE) -> DirtyFile:
    f = DirtyFile(1, "a", "k/a", None, Attrs(0o100644, 0, 0, 0.0), Path("/nonexistent"), -1)
    f.phase, f.storage = phase, storage  # (set directly: the state under test)
    return f


@pytest.mark.parametrize("kind", [Phase, Storage])
def test_every_transition_is_legal_or_refused(kind: type[Phase | Storage]) -> None:
    for a in kind:
        for b in kind:
            f = _file(**{"phase" if kind is Phase else "storage": a})  # type: ignore[arg-type]
            if (a, b) in LEGAL:
                f.go(b)
                assert (f.phase if kind is Phase else f.storage) is b
            else:
                with pytest.raises(IllegalTransition):
                    f.go(b)
                assert (f.phase if kind is Phase else f.storage) is a  # unchanged


def test_views_of_the_state() -> None:
    f = _file()
    assert not f.uploading and not f.deleted
    f.go(Phase.UPLOADING)
    assert f.uploading and not f.deleted
    f.retire()  # unlinked during its upload
    assert f.phase is Phase.RETIRING and f.uploading and f.deleted
    seen = f.changed
    f.end_upload()
    assert f.phase is Phase.DELETED and not f.uploading and f.deleted and seen.is_set()
    with pytest.raises(IllegalTransition):
        f.deleted = False  # a deleted file never comes back
    with pytest.raises(IllegalTransition):
        f.go(Phase.UPLOADING)  # nor is it uploaded again
    g = _file(storage=Storage.INLINE)
    assert g.inline
    g.go(Storage.FILE)
    assert not g.inline
    with pytest.raises(IllegalTransition):
        g.go(Storage.INLINE)
    released = _file()
    released.go(Phase.RELEASED)
    with pytest.raises(IllegalTransition):
        released.retire()


def test_initial_storage_follows_the_constructor() -> None:
    attrs = Attrs(0o100644, 0, 0, 0.0)
    assert DirtyFile(1, "a", "k", None, attrs, Path("/x"), -1, inline=True).storage \
        is Storage.INLINE
    assert DirtyFile(1, "a", "k", None, attrs, Path("/x"), 5).storage is Storage.FILE
    assert DirtyFile(1, "a", "k", None, attrs, Path("/x"), -1).storage is Storage.CLOSED


async def test_states_through_upload_unlink_and_release(tmp_path: Path) -> None:
    store = MemoryStore("b")
    wb = _wb(tmp_path / "w", store)
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        up = await _write_closed(wb, "up.txt", b"uploaded")
        assert up.storage is Storage.INLINE and up.phase in (Phase.IDLE, Phase.UPLOADING)
        await wb.flush_all()
        assert (up.phase, up.storage) == (Phase.RELEASED, Storage.CLOSED)
        assert "up.txt" not in wb.files

        gone = await wb.create("gone.txt", Attrs(0o100644, 0, 0, 1.0))
        wb.opened(gone, True)
        await wb.write(gone, 0, b"unlinked while open")
        await wb.unlink("gone.txt")
        assert gone.phase is Phase.DELETED and gone.storage is Storage.INLINE  # still readable
        assert wb.read(gone, 100, 0) == b"unlinked while open"
        wb.released(gone, True)
        assert (gone.phase, gone.storage) == (Phase.FORGOTTEN, Storage.CLOSED)
        n.cancel_scope.cancel()
    assert store.objects["pre/up.txt"].data == b"uploaded"
    assert "pre/gone.txt" not in store.objects
    wb.index.close()


async def test_large_conflict_copy_goes_multipart(tmp_path: Path) -> None:
    """A conflict copy of a file past the part size goes through the same multipart path as
    any upload: the sibling holds our bytes, the key keeps theirs, no upload is left open."""
    store = MemoryStore("b")
    base = store.put_bytes("pre/big.bin", b"original")
    wb = _wb(tmp_path / "w", store)
    ours = data(12 * MiB + 3, seed="ours")
    multipart_keys = []
    real = store.create_multipart

    def spy(key: str, metadata: dict[str, str]) -> str:
        multipart_keys.append(key)
        return real(key, metadata)
    store.create_multipart = spy  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        await n.start(wb.run)
        f = await wb.create("big.bin", Attrs(0o100644, 0, 0, 1.0), base_etag=base)
        wb.opened(f, True)
        for off in range(0, len(ours), MiB):
            await wb.write(f, off, ours[off:off + MiB])
        store.put_bytes("pre/big.bin", b"theirs")  # someone else writes meanwhile
        wb.released(f, True)
        with trio.fail_after(60):
            await wb.flush_all()
        n.cancel_scope.cancel()
    assert store.objects["pre/big.bin"].data == b"theirs"
    sides = [k for k in store.objects if k.startswith("pre/big.bin.conflict-")]
    assert len(sides) == 1 and xxh(store.objects[sides[0]].data) == xxh(ours)
    assert sides[0] in multipart_keys  # (12 MiB: three parts of 5 MiB)
    assert not store.uploads
    assert wb.metrics.value("caiosfs_conflicts_total") == 1
    wb.index.close()
