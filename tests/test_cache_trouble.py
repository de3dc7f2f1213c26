"""Cache device trouble (issue 7): deleted or corrupted cache files under a live mount, a
read-only cache_dir, a full cache disk.

What must hold: reads return the right bytes or EIO — never other bytes; a cache_dir that
cannot be written is refused at mount with one clear line; a full cache disk gives writers
ENOSPC (or makes them wait), keeps reads correct, and never kills the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import data, xxh
from mounting import mountinfo_has, run_cli

MiB = 1 << 20


def drop_page_cache(path: Path) -> None:
    """Forget the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def block_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blocks").glob("*/*") if p.is_file())


def read_fresh(path: Path) -> bytes:
    drop_page_cache(path)
    return path.read_bytes()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Factory: a fresh tmpfs of the given size (unmounted after the test)."""
    made: list[Path] = []

    def make(size: str, name: str = "tmpfs") -> Path:
        d = tmp_path / f"{name}{len(made)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(d)], check=True)
        made.append(d)
        return d
    yield make
    for d in reversed(made):
        for log in d.glob("*/caiosfs.log"):  # keep the daemon's log for a post-mortem
            (tmp_path / f"{d.name}-caiosfs.log").write_bytes(log.read_bytes())
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


def test_deleted_cache_files_are_fetched_again(s3: Any, bucket: str, mounter: Any) -> None:
    objs = {"big": data(40 * MiB + 17, "del-big"), "small": data(300_000, "del-small"),
            "mid": data(9 * MiB + 1, "del-mid")}
    for k, b in objs.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = mounter(bucket)
    for k, b in objs.items():
        assert xxh((m.path / k).read_bytes()) == xxh(b)
    gets = m.status()["s3_get_requests"]
    assert block_files(m.cache_dir)
    subprocess.run(["rm", "-rf", str(m.cache_dir / "blocks")], check=True)
    for k, b in objs.items():
        assert xxh(read_fresh(m.path / k)) == xxh(b), k
    st = m.status()
    assert st["s3_get_requests"] > gets, "nothing was fetched again: data came from nowhere?"
    assert block_files(m.cache_dir), "the cache did not fill up again"
    # and it is used again: a second pass makes no GETs
    gets = st["s3_get_requests"]
    for k, b in objs.items():
        assert xxh(read_fresh(m.path / k)) == xxh(b), k
    assert m.status()["s3_get_requests"] <= gets + 5  # (the in-memory verified chunks)


def test_cache_dir_deleted_while_files_wait_for_upload(s3: Any, bucket: str, mounter: Any,
                                                       tmp_path: Path) -> None:
    """rm -rf of the whole cache_dir while written files still wait for their upload: the
    daemon logs it, every byte written before reaches the store (uploads read the files'
    open descriptors; the journal is still open), a later small file does too, a later big
    one fails with EIO, reads stay right, and umount finishes."""
    log = tmp_path / "gone-caiosfs.log"
    s3.put_object(Bucket=bucket, Key="g/seeded", Body=data(2 * MiB, "gone-seeded"))
    m = mounter(bucket, "g", options=f"upload_delay=3600,part_size=5M,log_file={log}")
    files = {"small": data(5_000, "gone-s"), "mid": data(3 * MiB + 3, "gone-m"),
             "multi": data(12 * MiB + 9, "gone-big")}  # 5 MiB parts: a multipart upload
    for k, b in files.items():
        (m.path / k).write_bytes(b)
    subprocess.run(["rm", "-rf", str(m.cache_dir)], check=True)
    deadline = time.monotonic() + 10
    while "was deleted under the live mount" not in log.read_text():
        assert time.monotonic() < deadline, "the daemon did not notice"
        time.sleep(0.2)
    files["later-small"] = data(7_000, "gone-later")
    (m.path / "later-small").write_bytes(files["later-small"])
    with pytest.raises(OSError) as err:
        (m.path / "later-big").write_bytes(data(2 * MiB, "gone-no-room"))
    assert err.value.errno == errno.EIO, err.value
    assert xxh((m.path / "seeded").read_bytes()) == xxh(data(2 * MiB, "gone-seeded"))
    m.flush(timeout=60)
    for k, b in files.items():
        assert xxh(s3.get_object(Bucket=bucket, Key=f"g/{k}")["Body"].read()) == xxh(b), k
    m.umount(timeout=60)


def corrupt(path: Path, rng: random.Random, how: str) -> None:
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, rng.randrange(size) if size else 0)
    elif how == "zero":
        with open(path, "r+b") as fh:
            fh.seek(rng.randrange(max(1, size)))
            fh.write(b"\0" * 4096)
    elif how == "flip":
        with open(path, "r+b") as fh:
            off = rng.randrange(max(1, size))
            fh.seek(off)
            b = fh.read(1)
            fh.seek(off)
            fh.write(bytes([(b[0] if b else 0) ^ 0x40]))
    elif how == "replace":  # a whole other (valid-looking) block file
        path.write_bytes(rng.randbytes(size))
    elif how == "delete":
        path.unlink()


def test_corrupted_cache_files_never_return_wrong_bytes(s3: Any, bucket: str,
                                                        mounter: Any) -> None:
    # 4 x 12-20 MiB: more than the daemon keeps in memory as verified chunks (32 MiB), so
    # the first files are read from the (corrupted) disk again.
    objs = {f"c{i}": data(random.Random(i).randrange(12 * MiB, 20 * MiB), f"corrupt{i}")
            for i in range(4)}
    objs["tiny"] = b"0123456789"
    for k, b in objs.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = mounter(bucket, options="block_size=4M")
    for k, b in objs.items():
        assert xxh((m.path / k).read_bytes()) == xxh(b)
    rng = random.Random(5)
    files = block_files(m.cache_dir)
    assert len(files) >= 6
    for i, p in enumerate(files):
        corrupt(p, rng, ("flip", "zero", "truncate", "replace", "flip")[i % 5])
    wrong = 0
    for k, b in objs.items():
        got = read_fresh(m.path / k)
        wrong += got != b
        assert xxh(got) == xxh(b), k
        fd = os.open(m.path / k, os.O_RDONLY)
        try:
            for _ in range(20):  # random preads: each goes through the chunk checks
                off = rng.randrange(len(b))
                assert os.pread(fd, 5000, off) == b[off:off + 5000], (k, off)
        finally:
            os.close(fd)
    st = m.status()
    assert st["checksum_failures"] > 0, "corruption went unnoticed"
    print(f"\nFIGURES corrupted_cache: {len(files)} block files corrupted, "
          f"{st['checksum_failures']} checksum failures caught, 0 wrong bytes returned")


def test_cache_vandalised_while_reading(s3: Any, bucket: str, mounter: Any) -> None:
    """A thread keeps corrupting and deleting block files while readers read: every read
    returns the right bytes or fails with EIO."""
    objs = {f"v{i}": data(6 * MiB + i, f"vandal{i}") for i in range(4)}
    for k, b in objs.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = mounter(bucket, options="block_size=2M,memory_limit=64M")
    stop = threading.Event()
    damage = {"n": 0}

    def vandal() -> None:
        rng = random.Random(9)
        while not stop.is_set():
            for p in block_files(m.cache_dir):
                try:
                    corrupt(p, rng, rng.choice(("flip", "zero", "truncate", "replace",
                                                "delete")))
                    damage["n"] += 1
                except (FileNotFoundError, ValueError, IndexError):
                    pass
            time.sleep(0.05)
    th = threading.Thread(target=vandal, daemon=True)
    th.start()
    results = {"ok": 0, "eio": 0}
    deadline = time.monotonic() + 12
    rng = random.Random(1)
    try:
        while time.monotonic() < deadline:
            k = rng.choice(sorted(objs))
            b = objs[k]
            try:
                drop_page_cache(m.path / k)
                fd = os.open(m.path / k, os.O_RDONLY)
                try:
                    off = rng.randrange(len(b))
                    n = rng.choice([1, 4096, MiB, 3 * MiB])
                    got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                results["eio"] += 1
                continue
            assert got == b[off:off + n], f"wrong bytes from {k} at {off}"
            results["ok"] += 1
    finally:
        stop.set()
        th.join(10)
    assert results["ok"] > 50, results
    assert damage["n"] > 0, "the vandal damaged nothing: the test proved nothing"
    # Reads met the damage: a damaged or vanished chunk counts as a checksum failure
    # (refetched), not a read served from memory around it.
    met = m.status()["checksum_failures"]
    assert met > 0, f"{damage['n']} damaged files, but no read met the damage: {results}"
    for k, b in objs.items():  # and all is well once the vandal stops
        assert xxh(read_fresh(m.path / k)) == xxh(b)
    print(f"\nFIGURES vandalised_cache: {damage['n']} block files damaged, "
          f"{results['ok']} reads right, {results['eio']} EIO, 0 wrong; "
          f"{met} checksum failures")


@pytest.mark.parametrize("how", ["tmpfs-ro-new-dir", "tmpfs-ro-existing-cache", "bind-ro"])
def test_read_only_cache_dir_is_one_clear_line(s3: Any, bucket: str, mounter: Any,
                                               tmpfs: Any, tmp_path: Path, how: str) -> None:
    if how == "bind-ro":
        base = tmp_path / "ro-bind"
        base.mkdir()
        subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(base)], check=True)
            _check_ro_mount(mounter, bucket, base / "cache")
        finally:
            subprocess.run(["umount", "-l", str(base)], check=False)
        return
    fs = tmpfs("16m")
    cache = fs / "cache"
    if how == "tmpfs-ro-existing-cache":  # a cache that worked before, now read-only
        m = mounter(bucket, cache_dir=cache)
        (m.path / "x").write_bytes(b"x")
        m.umount()
    # (Once in a loaded parallel run, the remount found the file system still busy just
    # after `caiosfs umount` had seen the daemon exit: retried for up to 5 s, bounded.)
    for _ in range(50):
        r = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True,
                           text=True, check=False)
        if r.returncode == 0 or "busy" not in r.stderr:
            break
        time.sleep(0.1)
    assert r.returncode == 0, r.stderr
    _check_ro_mount(mounter, bucket, cache)


def _check_ro_mount(mounter: Any, bucket: str, cache: Path) -> None:
    m = mounter(bucket, cache_dir=cache, mount=False)
    r = run_cli("mount", m.source, str(m.path), "-o", m.options, env=m.env, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "cache_dir" in lines[0] and "read-only" in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr
    assert not mountinfo_has(str(m.path))


def fill_up(filler: Path) -> None:
    """Append to ``filler`` until its file system has not one byte left."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for piece in (MiB, 4096, 1):
            try:
                while os.write(fd, b"\1" * piece):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_cache_disk_full(s3: Any, bucket: str, mounter: Any, tmpfs: Any) -> None:
    """cache_dir on a 64 MiB tmpfs: a write that cannot fit fails with ENOSPC (not EIO, not
    a hang), reads stay correct — even of objects that can no longer be cached — and the
    mount lives on: once space is free again, writes work and reach the store."""
    cache = tmpfs("64m") / "cache"
    seeded = {f"s{i}": data(8 * MiB + i, f"full{i}") for i in range(3)}
    seeded["later"] = data(12 * MiB + 5, "full-later")  # first read once the disk is full
    for k, b in seeded.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    # (the daemon's log goes beside the full disk, not on it)
    m = mounter(bucket, cache_dir=cache, options="upload_delay=0.2,read_timeout=20,"
                f"log_file={cache.parent.parent / 'full-disk-caiosfs.log'}")
    for i in range(3):
        assert xxh((m.path / f"s{i}").read_bytes()) == xxh(seeded[f"s{i}"])
    # A write far bigger than the disk.
    big = data(100 * MiB, "too-big")
    t0 = time.monotonic()
    err: OSError | None = None
    try:
        with open(m.path / "too-big", "wb") as fh:
            fh.writelines(big[off:off + MiB] for off in range(0, len(big), MiB))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        err = exc
    took = time.monotonic() - t0
    assert err is not None, "100 MiB fitted on a 64 MiB disk?"
    assert err.errno == errno.ENOSPC, f"{err!r} after {took:.1f}s"
    assert took < 60
    # The mount is alive: status answers, reads are right.
    st = m.status()
    assert st["pid"]
    for i in range(3):
        assert xxh(read_fresh(m.path / f"s{i}")) == xxh(seeded[f"s{i}"])
    # Now something else fills the disk to the last byte: reads of objects that cannot be
    # cached must still be right, writes fail with ENOSPC, nothing hangs.
    filler = cache.parent / "filler"
    fill_up(filler)
    free = shutil.disk_usage(cache).free
    assert free < 64 * 1024, f"the disk is not full ({free} bytes free)"
    assert xxh(read_fresh(m.path / "later")) == xxh(seeded["later"])
    for i in range(3):
        assert xxh(read_fresh(m.path / f"s{i}")) == xxh(seeded[f"s{i}"])
    # (Those reads, and the readahead they started, evicted clean blocks to make room for
    # what they fetched; once that has settled the filler takes that room too, so the
    # write below truly has none.)
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        time.sleep(0.1)
        free = shutil.disk_usage(cache).free
        if free != last:
            last, stable_since = free, time.monotonic()
    fill_up(filler)
    t0 = time.monotonic()
    with pytest.raises(OSError) as full_err, open(m.path / "no-room", "wb") as fh:
        fh.write(data(3 * MiB, "no-room"))
        fh.flush()
        os.fsync(fh.fileno())
    assert full_err.value.errno == errno.ENOSPC, full_err.value
    assert time.monotonic() - t0 < 60
    assert m.status()["pid"]
    filler.unlink()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(m.path / "no-room")
    # Space is free again: the failed file goes, and writing works again.
    os.unlink(m.path / "too-big")
    small = data(2 * MiB, "after")
    (m.path / "after").write_bytes(small)
    m.flush(timeout=60)
    assert xxh(s3.get_object(Bucket=bucket, Key="after")["Body"].read()) == xxh(small)
    assert xxh((m.path / "after").read_bytes()) == xxh(small)
