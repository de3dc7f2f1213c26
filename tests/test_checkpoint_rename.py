"""Checkpoints committed by a directory rename (issue 15): the Hugging Face Trainer writes
into ``tmp-checkpoint-N/`` and renames it to ``checkpoint-N/``. Files still local move with
the directory and are uploaded once, under the new name; a file far into its upload
finishes it and is copied server-side; an uploaded one is copied. Real FUSE mounts against
SeaweedFS, the store checked with boto3; and the rules that decide when a directory's
files wait (``DirBatches``), without FUSE."""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import data, xxh
from mounting import get, keys
from test_write_durability import kill, uploads, wait_for, write_file

from caiosfs.writeback.scheduler import DirBatches

MiB = 1 << 20


# when a directory's files wait (no FUSE) ----------------------------------------------------

def test_a_file_written_alone_is_no_batch_one_of_several_is() -> None:
    b = DirBatches(upload_delay=0.2)
    b.opened("d/alone")
    t = time.monotonic()
    assert not b.closed("d/alone", t)  # dd of one file: its parts go at close
    assert b.busy("d/x", time.monotonic())  # ... but the directory is busy for upload_delay
    time.sleep(0.25)
    assert not b.busy("d/x", time.monotonic())
    b.opened("d/shard0")
    b.opened("d/shard1")
    t0 = time.monotonic()
    assert b.closed("d/shard0", t0)  # shard1 is still being written
    assert b.busy("d/shard0", time.monotonic())
    assert b.closed("d/shard1", t0)  # shard0 was closed while shard1 was open
    assert not b.busy("e/other", time.monotonic())  # other directories are not concerned
    time.sleep(0.25)
    b.opened("d/next")  # written alone, well after the others
    assert not b.closed("d/next", time.monotonic())


def test_the_next_file_of_a_directory_joins_the_one_closed_before() -> None:
    b = DirBatches(upload_delay=0.0)
    b.opened("d/shard0")
    assert not b.closed("d/shard0", time.monotonic())  # alone so far ...
    t = time.monotonic()
    assert not b.joined("d/shard0", t)
    b.opened("d/shard1")  # ... until the next shard is created
    assert b.joined("d/shard0", t)
    b.closed("d/shard1", t)
    assert b.joined("d/shard0", t) and not b.joined("e/x", t)


def test_a_writer_renamed_away_takes_its_count_along() -> None:
    b = DirBatches(upload_delay=0.0)
    b.opened("tmp/a")
    assert b.busy("tmp/b", time.monotonic())
    b.moved("tmp/a", "final/a", 1)
    assert not b.busy("tmp/b", time.monotonic())
    assert b.busy("final/b", time.monotonic())
    b.closed("final/a", time.monotonic())
    assert not b.busy("final/b", time.monotonic())


# the Hugging Face pattern through a mount ----------------------------------------------------

def _hf_files(n: int, size: int) -> dict[str, bytes]:
    files = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": data(size + i, f"hf{i}")
             for i in range(n)}
    files["optimizer.pt"] = data(size, "hfopt")
    files.update({"scheduler.pt": data(1064, "sched"), "trainer_state.json": b'{"step": 3}',
                  "config.json": data(700, "cfg")})
    return files


def _requests(m: Any, pattern: str) -> list[str]:
    """Lines of the daemon's debug log of store requests matching ``pattern``."""
    text = (m.cache_dir / "caiosfs.log").read_text(errors="replace")
    return [ln for ln in text.splitlines() if "caiosfs.store.client" in ln
            and re.search(pattern, ln)]


def test_hf_rename_uploads_the_shards_once_under_the_final_name(
        s3: Any, bucket: str, mounter: Any) -> None:
    """Shards, optimizer and small files written into tmp-checkpoint-3/ by 4 threads (no
    fsync), then the directory renamed: no byte of a shard goes to the old name (before,
    each shard's parts started at its close and the rename threw them away or copied the
    objects), the rename returns without waiting for uploads, and everything lands under
    checkpoint-3/ only; a cold mount reads back every byte."""
    m = mounter(bucket, "run", "profile=checkpoint,part_size=5M,debug=1")
    files = _hf_files(4, 12 * MiB)
    tmp = m.path / "tmp-checkpoint-3"
    os.mkdir(tmp)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: write_file(tmp / n, files[n]), files))
    t0 = time.monotonic()
    os.rename(tmp, m.path / "checkpoint-3")
    renamed_in = time.monotonic() - t0
    assert sorted(os.listdir(m.path / "checkpoint-3")) == sorted(files)
    m.flush()
    want = {f"run/checkpoint-3/{n}": body for n, body in files.items()}
    got = keys(s3, bucket)
    assert {k for k in got if not k.endswith("/")} == set(want)
    assert "run/checkpoint-3/" in got and not [k for k in got if "tmp-checkpoint" in k]
    for k, body in want.items():
        assert xxh(get(s3, bucket, k)) == xxh(body), k
    big = r"tmp-checkpoint-3/(model-|optimizer)"
    sent_old = _requests(m, rf"(upload_part|put|copy) \S*{big}")
    assert not sent_old, f"bytes of large files went to the old name: {sent_old[:3]}"
    parts = _requests(m, r"upload_part \S*checkpoint-3/(model-|optimizer)\S* \S+ part \d+: ok")
    assert len(parts) == 5 * 3, parts  # 5 files of 12 MiB: 3 parts of 5 MiB each, once
    print(f"rename of the directory returned in {renamed_in:.3f} s")
    assert not uploads(s3, bucket)
    cold = mounter(bucket, "run", "profile=checkpoint")
    for n, body in files.items():
        assert xxh((cold.path / "checkpoint-3" / n).read_bytes()) == xxh(body), n


def test_hf_rename_of_shards_saved_one_after_the_other(
        s3: Any, bucket: str, mounter: Any) -> None:
    """A Trainer in one process saves its shards one after the other, then the optimizer
    and small files, then renames the directory: each shard looked alone at its close, but
    the next one came within ALONE_GRACE, so none started its parts under the old name."""
    m = mounter(bucket, "run", "profile=checkpoint,part_size=5M,debug=1")
    files = _hf_files(3, 12 * MiB)
    tmp = m.path / "tmp-checkpoint-7"
    os.mkdir(tmp)
    for n, body in files.items():
        write_file(tmp / n, body)
    os.rename(tmp, m.path / "checkpoint-7")
    m.flush()
    want = {f"run/checkpoint-7/{n}": body for n, body in files.items()}
    assert {k for k in keys(s3, bucket) if not k.endswith("/")} == set(want)
    for k, body in want.items():
        assert xxh(get(s3, bucket, k)) == xxh(body), k
    sent_old = _requests(m, r"(upload_part|put|copy) \S*tmp-checkpoint-7/(model-|optimizer)")
    assert not sent_old, f"bytes of large files went to the old name: {sent_old[:3]}"


# a directory renamed with files local, mid-upload and uploaded ------------------------------

def _three_states(s3: Any, bucket: str, m: Any) -> tuple[Path, dict[str, bytes]]:
    """old/ with: up (uploaded: fsynced), mid (a streaming multipart upload: its complete
    parts sent at close, the last part and the completion waiting for upload_delay), a
    subdirectory made here whose marker is not in the store yet, and local files (closed,
    waiting for upload_delay)."""
    old = m.path / "old"
    os.mkdir(old)
    body = {"up": data(7 * MiB + 1, "up"), "mid": data(23 * MiB + 5, "mid"),
            "sub/local": data(300_000, "local"), "big-local": data(11 * MiB, "bl")}
    write_file(old / "mid", body["mid"])  # the directory's first file: written alone
    wait_for(lambda: any(u["Key"] == "old/mid" for u in uploads(s3, bucket)), 10,
             "mid's streaming multipart upload")
    wait_for(lambda: len(s3.list_parts(Bucket=bucket, Key="old/mid", UploadId=next(
        u["UploadId"] for u in uploads(s3, bucket) if u["Key"] == "old/mid")).get(
        "Parts", [])) == 4, 20, "mid's 4 complete parts to be sent")
    write_file(old / "up", body["up"], fsync=True)
    assert get(s3, bucket, "old/up") == body["up"]
    os.mkdir(old / "sub")
    write_file(old / "sub/local", body["sub/local"])
    write_file(old / "big-local", body["big-local"])
    # mid is incomplete, the rest local (the markers of old/ and old/sub/ too)
    assert keys(s3, bucket) == {"old/up"}
    return old, body


def _check_moved(s3: Any, bucket: str, body: dict[str, bytes]) -> None:
    got = keys(s3, bucket)
    assert got == {"new/"} | {"new/sub/"} | {f"new/{n}" for n in body}, got
    for n, b in body.items():
        assert xxh(get(s3, bucket, f"new/{n}")) == xxh(b), n
    wait_for(lambda: not uploads(s3, bucket), 10, "no multipart upload left")


def test_directory_rename_with_files_local_mid_upload_and_uploaded(
        s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(bucket, options="upload_delay=3600,part_size=5M,debug=1")
    old, body = _three_states(s3, bucket, m)
    os.rename(old, m.path / "new")
    # mid finished its upload under the old name and was copied before rename returned;
    # the files still local upload at once under the new name (not upload_delay later).
    assert xxh(get(s3, bucket, "new/mid")) == xxh(body["mid"])
    assert not [k for k in keys(s3, bucket) if k.startswith("old/")]
    wait_for(lambda: {"new/sub/local", "new/big-local"} <= keys(s3, bucket), 20,
             "the moved local files to upload without a flush")
    m.flush()
    _check_moved(s3, bucket, body)
    assert not _requests(m, r"(upload_part|put) old/(sub/local|big-local)")
    cold = mounter(bucket, options="upload_delay=3600")
    for n, b in body.items():
        assert xxh((cold.path / "new" / n).read_bytes()) == xxh(b), n


def test_directory_rename_killed_before_flush_is_finished_by_the_next_mount(
        s3: Any, bucket: str, mounter: Any) -> None:
    """The same, SIGKILL right after the rename: the remount finishes the job (the moved
    marker of sub/ is PUT under the new name only, the local files upload under the new
    names, nothing stays under the old one)."""
    m = mounter(bucket, options="upload_delay=3600,part_size=5M")
    old, body = _three_states(s3, bucket, m)
    pid = m.pid
    os.rename(old, m.path / "new")
    kill(m, pid)
    m.mount()
    m.flush()
    _check_moved(s3, bucket, body)
    for n, b in body.items():
        assert xxh((m.path / "new" / n).read_bytes()) == xxh(b), n
