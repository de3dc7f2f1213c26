"""Durability of the write path (issue 3): killed daemons, checkpoint patterns, back-pressure,
conflicts. Real FUSE mounts against SeaweedFS; the store is checked with boto3.

The promise under test: once a file is closed (or fsynced) through the mount, a SIGKILL of
the daemon loses nothing - remounting the same cache_dir replays the journal and uploads it.
(Bytes written but neither closed nor fsynced may still sit in the kernel's FUSE page cache,
which dies with the connection, as on any FUSE filesystem with the writeback cache.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import data, xxh
from mounting import get, keys

from caiosfs.writeback import IDLE_MAX, SPARES

MiB = 1 << 20




def uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def write_file(path: Path, body: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as fh:
        fh.writelines(body[off:off + 4 * MiB] for off in range(0, len(body), 4 * MiB))
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def assert_store(s3: Any, bucket: str, want: dict[str, bytes]) -> None:
    for k, body in want.items():
        assert xxh(get(s3, bucket, k)) == xxh(body), k


def kill(m: Any, pid: int) -> None:
    """SIGKILL the daemon now (``m.kill()`` first asks the daemon for its pid, which takes
    a CLI round trip), then detach the dead mount."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", 10, "the daemon to die")
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True, check=False)


def wait_for(cond: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# kill -9 at several points of write-back ---------------------------------------------------

def test_kill_before_upload(s3: Any, bucket: str, mounter: Any) -> None:
    """Closed and fsynced (fsync=local) files survive a SIGKILL before any upload started."""
    m = mounter(bucket, "ckpt", "profile=checkpoint,upload_delay=3600,fsync=local,part_size=5M")
    want = {f"ckpt/f{i}": data(s, f"kb{i}") for i, s in enumerate([0, 1, 4096, 3 * MiB + 1,
                                                                    12 * MiB + 5])}
    for i, (k, body) in enumerate(want.items()):
        write_file(m.path / k.removeprefix("ckpt/"), body, fsync=i % 2 == 0)
    os.mkdir(m.path / "sub")
    write_file(m.path / "sub/nested", b"nested")
    want["ckpt/sub/nested"] = b"nested"
    # an existing object modified in place
    s3.put_object(Bucket=bucket, Key="ckpt/old", Body=b"0123456789")
    with open(m.path / "old", "r+b") as fh:  # not in the listing yet: lookup probes it
        fh.seek(5)
        fh.write(b"xy")
    want["ckpt/old"] = b"01234xy789"
    assert keys(s3, bucket) == {"ckpt/old"}  # nothing uploaded yet (the marker of sub/ neither)
    assert m.status()["dirty_files"] == len(want)
    m.kill()
    m.mount()
    m.flush()
    assert keys(s3, bucket) == set(want) | {"ckpt/sub/"}
    assert_store(s3, bucket, want)
    assert m.status()["dirty_bytes"] == 0
    # Nothing left behind locally but empty files kept for new files (no data).
    left = list((m.cache_dir / "dirty").iterdir())
    assert len(left) <= SPARES + IDLE_MAX and all(p.stat().st_size == 0 for p in left), left


def test_kill_during_multipart_upload(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(bucket, options="profile=checkpoint,upload_delay=0,fsync=local,part_size=5M")
    pid = m.pid
    big = data(160 * MiB + 3, "mp")
    small = data(100_000, "small")
    write_file(m.path / "small", small, fsync=True)
    write_file(m.path / "big", big, fsync=True)  # parts stream while it is written
    assert uploads(s3, bucket), "no multipart upload in flight"
    kill(m, pid)
    assert "big" not in keys(s3, bucket), "the upload completed before the kill; test is void"
    m.mount()
    m.flush()
    assert_store(s3, bucket, {"big": big, "small": small})
    wait_for(lambda: not uploads(s3, bucket), 10, "stale multipart uploads to be aborted")
    assert xxh((m.path / "big").read_bytes()) == xxh(big)


def test_kill_after_fsync(s3: Any, bucket: str, mounter: Any) -> None:
    """fsync=store: what fsync returned for is in the store before the kill."""
    m = mounter(bucket, options="profile=checkpoint,upload_delay=3600,part_size=5M")
    a, b = data(11 * MiB, "a"), data(2 * MiB + 7, "b")
    write_file(m.path / "a", a, fsync=True)
    write_file(m.path / "b", b, fsync=True)
    (m.path / "unsynced").write_bytes(b"closed, not fsynced")
    assert_store(s3, bucket, {"a": a, "b": b})  # durable before any kill
    m.kill()
    assert_store(s3, bucket, {"a": a, "b": b})
    m.mount()
    m.flush()
    assert_store(s3, bucket, {"a": a, "b": b, "unsynced": b"closed, not fsynced"})
    assert keys(s3, bucket) == {"a", "b", "unsynced"}


def test_kill_during_directory_rename_resumes(s3: Any, bucket: str, mounter: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor
    names = [f"run/step.tmp/d{i % 4}/f{i:03d}" for i in range(400)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), names))
    m = mounter(bucket, options="profile=checkpoint,upload_delay=3600,fsync=local")
    write_file(m.path / "run/step.tmp/local.bin", b"local, never uploaded", fsync=True)
    pid = m.pid  # now: m.kill() would first spend a CLI round trip asking for it
    err: list[BaseException] = []

    def rename() -> None:
        try:
            os.rename(m.path / "run/step.tmp", m.path / "run/step")
        except OSError as e:
            err.append(e)
    t = threading.Thread(target=rename)
    t.start()
    wait_for(lambda: any(k.startswith("run/step/") for k in keys(s3, bucket, "run/step/")),
             what="the rename to start moving objects")
    kill(m, pid)
    t.join(30)
    moved = keys(s3, bucket, "run/step/")
    assert len(moved) < len(names), "the rename finished before the kill; test is void"
    m.mount()
    m.flush()
    want = {"run/step/" + k[len("run/step.tmp/"):] for k in names} | {"run/step/local.bin"}
    wait_for(lambda: keys(s3, bucket, "run/") == want, 30, "the resumed rename")
    assert get(s3, bucket, "run/step/local.bin") == b"local, never uploaded"
    assert get(s3, bucket, "run/step/d1/f001") == b"run/step.tmp/d1/f001"


# checkpoint patterns ---------------------------------------------------------------------------

SHARD_WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[3])
from conftest import data
path, seed = sys.argv[1], sys.argv[2]
body = data(64 << 20, seed)
with open(path, "wb") as fh:
    for off in range(0, len(body), 8 << 20):
        fh.write(body[off:off + (8 << 20)])
    fh.flush()
    os.fsync(fh.fileno())
"""


def test_pytorch_dcp_checkpoint(s3: Any, bucket: str, mounter: Any) -> None:
    """4 ranks each write + fsync a 64 MiB shard in parallel, then rank 0 writes
    .metadata.tmp, fsyncs it and renames it over .metadata; then a kill changes nothing."""
    m = mounter(bucket, "ckpt", "profile=checkpoint")
    step = m.path / "step-100"
    os.mkdir(step)
    (step / ".metadata").write_bytes(b"previous metadata")  # a stale one is replaced
    tests_dir = str(Path(__file__).parent)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_WRITER, str(step / f"__{r}_0.distcp"),
                               f"rank{r}", tests_dir]) for r in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    shards_durable = time.monotonic() - t0
    meta = data(12345, "metadata")
    with open(step / ".metadata.tmp", "wb") as fh:
        fh.write(meta)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(step / ".metadata.tmp", step / ".metadata")
    print(f"4 x 64 MiB shards durable in {shards_durable:.1f}s")
    want = {f"ckpt/step-100/__{r}_0.distcp": data(64 * MiB, f"rank{r}") for r in range(4)}
    # fsync=store: the shards are durable as soon as the writers exit
    assert_store(s3, bucket, want)
    want["ckpt/step-100/.metadata"] = meta
    assert (step / ".metadata").read_bytes() == meta
    assert sorted(os.listdir(step)) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    m.kill()  # the rename's upload may not have run yet: the journal has it
    m.mount()
    m.flush()
    assert keys(s3, bucket) == set(want) | {"ckpt/step-100/"}
    assert_store(s3, bucket, want)


def test_orbax_checkpoint_directory_rename(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(bucket, "ckpt", "profile=checkpoint,part_size=5M")
    tmp = m.path / "step.orbax-checkpoint-tmp-123"
    os.makedirs(tmp / "state" / "array")
    want: dict[str, bytes] = {}
    for i in range(6):
        body = data((i + 1) * 3 * MiB + i, f"orbax{i}")
        write_file(tmp / "state" / "array" / f"{i}.zarr", body)
        want[f"ckpt/step/state/array/{i}.zarr"] = body
    (tmp / "_CHECKPOINT_METADATA").write_bytes(b'{"step": 123}')
    want["ckpt/step/_CHECKPOINT_METADATA"] = b'{"step": 123}'
    os.rename(tmp, m.path / "step")  # the commit: most files still uploading or dirty
    assert not tmp.exists()
    assert (m.path / "step/_CHECKPOINT_METADATA").read_bytes() == b'{"step": 123}'
    m.flush()
    got = keys(s3, bucket)
    assert {k for k in got if not k.endswith("/")} == set(want)
    assert not [k for k in got if "tmp-123" in k]
    assert_store(s3, bucket, want)
    m2 = mounter(bucket, "ckpt", "profile=checkpoint")  # an empty cache sees the same
    for k, body in want.items():
        assert xxh((m2.path / k.removeprefix("ckpt/")).read_bytes()) == xxh(body), k


# back-pressure ---------------------------------------------------------------------------------

def test_back_pressure_small_dirty_limit(s3: Any, bucket: str, mounter: Any) -> None:
    limit = 16 * MiB
    m = mounter(bucket, options="profile=checkpoint,dirty_limit=16M,part_size=5M,"
                                "upload_delay=0.2,fsync=local")
    files = {f"f{i}": data(24 * MiB + i, f"bp{i}") for i in range(5)}
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], m.status()["dirty_bytes"])
    t = threading.Thread(target=sample)
    t.start()
    try:
        for name, body in files.items():
            write_file(m.path / name, body)
        # without back-pressure ~120 MiB would be dirty now (the disk is faster than uploads)
        after = m.status()["dirty_bytes"]
    finally:
        stop.set()
        t.join()
    assert after <= limit + 25 * MiB, after
    # Writers waited for uploads: never more than the limit plus the file being written.
    print(f"peak dirty bytes {peak[0] / MiB:.1f} MiB (limit 16 MiB)")
    assert peak[0] <= limit + 25 * MiB, peak[0]
    m.flush()
    assert_store(s3, bucket, files)


# conflicts ---------------------------------------------------------------------------------------

def test_external_overwrite_while_dirty_keeps_both(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="d/shared.txt", Body=b"original\n")
    s3.put_object(Bucket=bucket, Key="d/big.bin", Body=data(12 * MiB, "big0"))
    m = mounter(bucket, options="profile=devbox,upload_delay=3600,part_size=5M,list_ttl=1,"
                                "entry_ttl=1")
    with open(m.path / "d/shared.txt", "ab") as fh:
        fh.write(b"ours\n")
    ours_big = data(12 * MiB, "big0")[:MiB] + b"OURS" + data(12 * MiB, "big0")[MiB + 4:]
    with open(m.path / "d/big.bin", "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"OURS")
    (m.path / "d/new.txt").write_bytes(b"our new file")
    # meanwhile, someone else writes the same keys
    s3.put_object(Bucket=bucket, Key="d/shared.txt", Body=b"theirs\n")
    s3.put_object(Bucket=bucket, Key="d/big.bin", Body=b"their big")
    s3.put_object(Bucket=bucket, Key="d/new.txt", Body=b"their new file")
    m.flush()
    got = keys(s3, bucket)
    # the store's versions stay at the keys ...
    assert get(s3, bucket, "d/shared.txt") == b"theirs\n"
    assert get(s3, bucket, "d/big.bin") == b"their big"
    assert get(s3, bucket, "d/new.txt") == b"their new file"
    # ... ours are kept next to them as <key>.conflict-<UTC time>-<id>
    sides = {k.split(".conflict-")[0]: k for k in got if ".conflict-" in k}
    assert set(sides) == {"d/shared.txt", "d/big.bin", "d/new.txt"}, got
    assert get(s3, bucket, sides["d/shared.txt"]) == b"original\nours\n"
    assert xxh(get(s3, bucket, sides["d/big.bin"])) == xxh(ours_big)
    assert get(s3, bucket, sides["d/new.txt"]) == b"our new file"
    assert len(got) == 6
    assert m.status()["conflicts"] == 3
    # the mount shows both versions (after the listing TTL)
    time.sleep(1.5)
    names = sorted(os.listdir(m.path / "d"))
    assert len(names) == 6 and "shared.txt" in names
    assert (m.path / "d/shared.txt").read_bytes() == b"theirs\n"
    assert (m.path / sides["d/shared.txt"]).read_bytes() == b"original\nours\n"


def test_writes_after_a_conflict_follow_the_sibling(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="f", Body=b"v1")
    m = mounter(bucket, options="profile=devbox,upload_delay=3600")
    fh = open(m.path / "f", "r+b")  # noqa: SIM115 - kept open across the conflict
    fh.write(b"OURS")
    fh.flush()
    s3.put_object(Bucket=bucket, Key="f", Body=b"theirs")
    os.fsync(fh.fileno())  # the upload meets the conflict
    fh.write(b" and more")  # still our file: must not be dropped
    fh.close()
    m.flush()
    side = [k for k in keys(s3, bucket) if k.startswith("f.conflict-")]
    assert len(side) == 1, keys(s3, bucket)
    assert get(s3, bucket, "f") == b"theirs"
    assert get(s3, bucket, side[0]) == b"OURS and more"
    assert m.status()["conflicts"] == 1


def test_external_delete_while_dirty_uploads_ours(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="f", Body=b"v1")
    m = mounter(bucket, options="profile=devbox,upload_delay=3600")
    with open(m.path / "f", "ab") as fh:
        fh.write(b"+ours")
    s3.delete_object(Bucket=bucket, Key="f")
    m.flush()
    assert keys(s3, bucket) == {"f"}
    assert get(s3, bucket, "f") == b"v1+ours"


def test_every_unmount_path_drains(s3: Any, bucket: str, mounter: Any) -> None:
    """caiosfs umount, fusermount3 -u and SIGTERM all upload every dirty byte first."""
    for how in ("umount", "fusermount", "sigterm"):
        m = mounter(bucket, how, "profile=checkpoint,upload_delay=3600,part_size=5M")
        pid = m.pid
        body = data(11 * MiB + 1, how)
        write_file(m.path / "f", body)
        (m.path / "small").write_bytes(how.encode())
        assert keys(s3, bucket, how + "/") == set()  # nothing uploaded yet
        if how == "umount":
            m.umount()
        elif how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        else:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 60,
                 f"the daemon to exit ({how})")
        assert xxh(get(s3, bucket, f"{how}/f")) == xxh(body), how
        assert get(s3, bucket, f"{how}/small") == how.encode()
        assert not uploads(s3, bucket)
