"""The typed on-disk records: encoding, compatibility with what format 1 wrote, the format
version check, and index.py's layout documentation against the record types."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import fields
from pathlib import Path

import pytest

from caiosfs import index as index_mod
from caiosfs.errors import UserError
from caiosfs.index import Index
from caiosfs.records import (
    FORMAT,
    OP_KINDS,
    DeleteOp,
    JournalEntry,
    MkdirOp,
    RenameDirOp,
    decode_op,
    encode_op,
)


def _section(name: str) -> str:
    """What index.py's module docstring says about one sub-database."""
    doc = index_mod.__doc__ or ""
    m = re.search(rf"^``{name}``\s.*?(?=^``\w+``\s)", doc, re.MULTILINE | re.DOTALL)
    assert m, f"index.py documents no {name} sub-database"
    return m.group(0)


def test_layout_doc_lists_the_journal_fields() -> None:
    documented = re.findall(r'"(\w+)"', re.search(r"\{([^}]*)\}", _section("journal"))[1])
    assert documented == [f.name for f in fields(JournalEntry)]


def test_layout_doc_lists_every_op_and_its_fields() -> None:
    documented = {kind: re.findall(r'"(\w+)"', rest) for kind, rest in
                  re.findall(r'\{"op": "(\w+)"((?:, "\w+")*)\}', _section("ops"))}
    assert documented == {tag: [f.name for f in fields(cls)] for tag, cls in OP_KINDS.items()}


def test_journal_entry_round_trip_keeps_format_1_json() -> None:
    e = JournalEntry("d/f", "pre/d/f", "etag1", 0o100644, 1, 2, 3.5, 10, 20, "up", False,
                     True)
    raw = e.encode()
    # Exactly the names, and the order, that format 1 always wrote.
    assert list(json.loads(raw)) == ["path", "key", "base_etag", "mode", "uid", "gid",
                                     "mtime", "mtime_ns", "ctime_ns", "upload_id", "deleted",
                                     "inline"]
    assert JournalEntry.decode(raw) == e


def test_old_journal_entry_without_later_fields_decodes() -> None:
    raw = json.dumps({"key": "pre/x", "base_etag": None, "mode": 0o100600, "uid": 0,
                      "gid": 0, "mtime": 1.0, "upload_id": None, "deleted": False}).encode()
    e = JournalEntry.decode(raw)
    assert (e.path, e.mtime_ns, e.ctime_ns, e.inline) == (None, None, None, False)


@pytest.mark.parametrize("op, want", [
    (RenameDirOp("a/", "b/"), {"op": "rename_dir", "src": "a/", "dst": "b/"}),
    (MkdirOp("a/d/", {"mode": "16877"}, 2.5),
     {"op": "mkdir", "key": "a/d/", "meta": {"mode": "16877"}, "mtime": 2.5}),
    (DeleteOp("a/x", "e1"), {"op": "delete", "key": "a/x", "etag": "e1"}),
])
def test_ops_encode_as_format_1_and_round_trip(op: object, want: dict) -> None:
    raw = encode_op(op)  # type: ignore[arg-type]
    assert json.loads(raw) == want
    assert decode_op(raw) == op


def test_unknown_op_kind_is_left_alone() -> None:
    assert decode_op(b'{"op": "from_the_future", "x": 1}') is None
    assert decode_op(b'{"op": "mkdir", "key": "k/", "meta": {}}') == MkdirOp("k/", {}, None)


def test_index_records_go_through_the_types(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.lmdb")
    try:
        e = JournalEntry("f", "p/f", None, 0o100644, 0, 0, 1.0)
        ix.put_journal(7, e)
        ix.put_op(8, DeleteOp("p/g", "e"))
        assert ix.all_journal() == {7: e}
        assert ix.all_ops() == {8: DeleteOp("p/g", "e")}
    finally:
        ix.close()


def _format_of(tmp_path: Path) -> bytes | None:
    ix = Index(tmp_path / "index.lmdb")
    try:
        with ix.jenv.begin(db=ix.state) as txn:
            return txn.get(b"format")
    finally:
        ix.close()


def test_cache_dir_without_a_format_is_format_1_and_gets_it_written(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.lmdb")
    with ix.jenv.begin(db=ix.state, write=True) as txn:  # as written before versions existed
        txn.delete(b"format")
    ix.put_journal(3, JournalEntry("f", "p/f", None, 0o100644, 0, 0, 1.0))
    ix.close()
    assert _format_of(tmp_path) == struct.pack(">I", FORMAT)
    ix = Index(tmp_path / "index.lmdb")
    try:
        assert list(ix.all_journal()) == [3]  # its records read back
    finally:
        ix.close()


def test_cache_dir_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.lmdb")
    with ix.jenv.begin(db=ix.state, write=True) as txn:
        txn.put(b"format", struct.pack(">I", FORMAT + 1))
    ix.close()
    with pytest.raises(UserError) as exc:
        Index(tmp_path / "index.lmdb")
    msg = str(exc.value)
    assert "\n" not in msg and f"format {FORMAT + 1}" in msg and str(tmp_path) in msg
    # The refusal changed nothing: it is refused again.
    with pytest.raises(UserError):
        Index(tmp_path / "index.lmdb")
