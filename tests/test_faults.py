"""Object-store faults between caiosfs and SeaweedFS (issue 7), through tests/faultproxy.py.

- Reads under injected faults retry and return the right bytes, or fail with EIO within
  read_timeout (plus a small margin) — never hang, never return wrong data.
- Writes under faults are never lost: they stay dirty while the store fails and are uploaded
  once it heals — checked byte-for-byte against the store with s3.get_object.
- The store unreachable for ~30 s while writing: writers see back-pressure at most.

Figures (requests faulted, operations that succeeded, bytes lost) are printed and merged
into tests/figures/faults.json for the README.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import data, xxh
from faultproxy import KINDS, FaultProxy

MiB = 1 << 20
FIGURES = Path(__file__).parent / "figures" / "faults.json"


def record(name: str, figures: dict[str, Any]) -> None:
    """Print one test's figures and merge them into tests/figures/faults.json."""
    print(f"\nFIGURES {name}: {json.dumps(figures, sort_keys=True)}")
    FIGURES.parent.mkdir(exist_ok=True)
    try:
        allf = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        allf = {}
    allf[name] = {**figures, "measured": time.strftime("%Y-%m-%d"),
                  "machine": f"{os.cpu_count()} cores, SeaweedFS on loopback"}
    FIGURES.write_text(json.dumps(allf, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def proxy(seaweed: Any) -> Any:
    p = FaultProxy(seaweed.endpoint, lifetime=400, seed=7)
    p.start()
    yield p
    p.stop()


def via(proxy: FaultProxy, extra: str = "") -> str:
    return f"endpoint={proxy.endpoint}" + ("," + extra if extra else "")


def store_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_reads_retry_through_faults(s3: Any, bucket: str, mounter: Any, proxy: FaultProxy
                                    ) -> None:
    files = {f"r/f{i:02d}": data(random.Random(i).randrange(1, 5 * MiB), f"rf{i}")
             for i in range(12)}
    files["r/big"] = data(40 * MiB + 123, "rbig")
    for k, b in files.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = mounter(bucket, options=via(proxy, "read_timeout=60,max_request=4M"))
    proxy.configure(rate=0.25, kinds=KINDS, stall=2)
    t0 = time.monotonic()
    ok = 0
    names = sorted(os.listdir(m.path / "r"))
    assert names == sorted(k[2:] for k in files)
    ok += 1
    for k, b in files.items():
        assert xxh((m.path / k).read_bytes()) == xxh(b), k
        ok += 1
    rng = random.Random(3)
    big = files["r/big"]
    fd = os.open(m.path / "r/big", os.O_RDONLY)
    try:
        for _ in range(40):
            off, n = rng.randrange(len(big)), rng.choice([1, 4096, 300_000, 2 * MiB])
            assert os.pread(fd, n, off) == big[off:off + n]
            ok += 1
    finally:
        os.close(fd)
    elapsed = time.monotonic() - t0
    st = proxy.stats()
    proxy.heal()
    status = m.status()
    assert st["faulted"] >= 10, st  # the faults really happened
    assert status["checksum_failures"] == 0
    record("reads_under_faults", {
        "fault_rate": 0.25, "requests": st["requests"], "requests_faulted": st["faulted"],
        "faults_by_kind": st["faults"], "read_ops_ok": ok, "read_ops_failed": 0,
        "bytes_read": sum(map(len, files.values())), "wrong_bytes": 0,
        "seconds": round(elapsed, 1)})


def timed_read(path: Path) -> tuple[bytes | OSError, float]:
    t0 = time.monotonic()
    try:
        out: bytes | OSError = path.read_bytes()
    except OSError as exc:
        out = exc
    return out, time.monotonic() - t0


@pytest.mark.parametrize("outage", ["blackhole", "reset", "503", "stall_body"])
def test_reads_fail_with_eio_within_read_timeout(s3: Any, bucket: str, mounter: Any,
                                                 proxy: FaultProxy, outage: str) -> None:
    """A read that cannot succeed fails with EIO within read_timeout (+ margin), then works
    again as soon as the store is back."""
    read_timeout = 4.0
    margin = 3.0
    body = data(3 * MiB + 5, "eio")
    s3.put_object(Bucket=bucket, Key="e/f", Body=body)
    m = mounter(bucket, options=via(proxy, f"read_timeout={read_timeout}"))
    assert os.stat(m.path / "e/f").st_size == len(body)  # looked up while healthy
    if outage in ("blackhole", "reset"):
        proxy.down(outage)
        proxy.stall = 120
    elif outage == "503":
        proxy.configure(rate=1.0, kinds=("503",))
    else:
        proxy.configure(rate=1.0, kinds=("stall_body",), stall=120)
    got, took = timed_read(m.path / "e/f")
    st = proxy.stats()
    proxy.heal()
    assert isinstance(got, OSError), "read succeeded although every request failed"
    assert got.errno == errno.EIO, f"{outage}: {got!r} after {took:.1f}s"
    assert took <= read_timeout + margin, f"{outage}: read failed after {took:.1f}s"
    # A lookup of a name never seen needs the store: bounded the same way.
    if outage != "503":
        proxy.down(outage) if outage in ("blackhole", "reset") else proxy.configure(
            rate=1.0, kinds=("stall_body",), stall=120)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            os.stat(m.path / "e/never-seen")
        took_stat = time.monotonic() - t0
        proxy.heal()
        assert took_stat <= read_timeout + margin, f"stat took {took_stat:.1f}s"
    # Chunks whose fetch just gave up fail at once for FAILURE_MEMORY (0.5 s): that is what
    # keeps the kernel's immediate retry of a failed readahead from doubling the wait.
    time.sleep(1)
    got2, took2 = timed_read(m.path / "e/f")
    assert isinstance(got2, bytes) and xxh(got2) == xxh(body)
    record(f"read_eio_{outage}", {"read_timeout": read_timeout, "eio_after_s": round(took, 2),
                                  "requests_faulted": st["faulted"] + st["refused_while_down"],
                                  "read_after_heal_ok": True})


def conflict_keys(s3: Any, bucket: str) -> list[str]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return [k for k in keys if ".conflict-" in k]


def test_writes_survive_faults(s3: Any, bucket: str, mounter: Any, proxy: FaultProxy) -> None:
    """Every kind of fault on every request while writing small, multipart, overwritten and
    fsynced files: nothing is lost, and once healed the store holds exactly our bytes."""
    # Existing objects that get overwritten (conditional PUT with If-Match).
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"w/old{i}", Body=b"old" * 1000)
    m = mounter(bucket, options=via(proxy, "part_size=5M,upload_delay=0.2,read_timeout=30"))
    os.listdir(m.path / "w")
    proxy.configure(rate=0.3, kinds=KINDS, stall=2)
    rng = random.Random(11)
    want: dict[str, bytes] = {}
    t0 = time.monotonic()
    ops = 0
    for i in range(40):
        want[f"w/s{i:02d}"] = data(rng.randrange(0, MiB), f"ws{i}")
    for i in range(2):
        want[f"w/big{i}"] = data(12 * MiB + rng.randrange(MiB), f"wb{i}")  # 3 parts
    for i in range(3):
        want[f"w/old{i}"] = data(rng.randrange(1, 300_000), f"wo{i}")
    fsynced = set()
    for n, (k, b) in enumerate(want.items()):
        with open(m.path / k, "wb") as fh:
            fh.write(b)
            if n % 4 == 0:  # fsync=store: returns once durable in the store, faults or not
                fh.flush()
                os.fsync(fh.fileno())
                fsynced.add(k)
        ops += 1
    # fsynced files are in the store already, faults notwithstanding
    for k in fsynced:
        assert xxh(store_bytes(s3, bucket, k)) == xxh(want[k]), k
    m.flush(timeout=240)
    flushed_s = time.monotonic() - t0
    st = proxy.stats()
    proxy.heal()
    lost = 0
    for k, b in want.items():
        got = store_bytes(s3, bucket, k)
        if got != b:
            lost += len(b)
        assert xxh(got) == xxh(b), k
        assert xxh((m.path / k).read_bytes()) == xxh(b), k
    status = m.status()
    assert status["dirty_files"] == 0
    conflicts = conflict_keys(s3, bucket)
    record("writes_under_faults", {
        "fault_rate": 0.3, "requests": st["requests"], "requests_faulted": st["faulted"],
        "faults_by_kind": st["faults"], "files_written": ops, "files_fsynced": len(fsynced),
        "bytes_written": sum(map(len, want.values())), "bytes_lost": lost,
        "spurious_conflict_copies": len(conflicts), "seconds_to_durable": round(flushed_s, 1)})
    assert st["faulted"] >= 20, st
    assert lost == 0
    assert conflicts == [], f"faults made caiosfs think the objects changed: {conflicts}"


def test_writes_wait_while_store_fails_and_upload_after_heal(
        s3: Any, bucket: str, mounter: Any, proxy: FaultProxy) -> None:
    """With every request failing, written files stay dirty (nothing reaches the store,
    nothing is dropped); after healing, a flush uploads every byte."""
    m = mounter(bucket, options=via(proxy, "part_size=5M,upload_delay=0.1"))
    (m.path / "d").mkdir()
    # Only faults that keep the request from the store (see the lost-response test).
    proxy.configure(rate=1.0, kinds=("500", "503"))
    want = {f"d/f{i}": data(i * 700_001 + 1, f"d{i}") for i in range(6)}
    want["d/multi"] = data(11 * MiB + 3, "dmulti")
    for k, b in want.items():
        (m.path / k).write_bytes(b)
    time.sleep(4)  # several upload rounds fail meanwhile
    status = m.status()
    assert status["dirty_files"] == len(want), status
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert not any(k in keys for k in want), "an upload got through a store failing 100%"
    for k, b in want.items():  # served locally meanwhile
        assert xxh((m.path / k).read_bytes()) == xxh(b)
    st = proxy.stats()
    proxy.heal()
    m.flush(timeout=120)
    for k, b in want.items():
        assert xxh(store_bytes(s3, bucket, k)) == xxh(b), k
    assert conflict_keys(s3, bucket) == []
    record("writes_while_store_failing", {
        "requests_faulted": st["faulted"], "files_written": len(want), "bytes_lost": 0,
        "uploads_failed_attempts": status["uploads_failed"], "dirty_files_during": len(want)})


@pytest.mark.parametrize("kind", ["reset", "truncate"])
@pytest.mark.parametrize("what", ["new", "overwrite", "multipart"])
def test_lost_response_is_not_a_conflict(s3: Any, bucket: str, mounter: Any,
                                         proxy: FaultProxy, kind: str, what: str) -> None:
    """The store applies a conditional write but the response is lost (connection reset,
    truncated, or too late): the retry must not mistake our own write for someone else's
    change (a spurious .conflict- copy, and the file shown as 'the store's version')."""
    if what == "overwrite":
        s3.put_object(Bucket=bucket, Key="l/f", Body=b"before")
    m = mounter(bucket, options=via(proxy, "part_size=5M,upload_delay=0.1"))
    os.listdir(m.path / "l") if what == "overwrite" else (m.path / "l").mkdir()
    body = data(11 * MiB + 1 if what == "multipart" else 200_000, "lost")

    def final_write(r: Any) -> bool:  # the request that makes the object visible
        if what == "multipart":
            return r.method == "POST" and "uploadId=" in r.query
        return r.method == "PUT" and r.path.endswith("/l/f")
    proxy.configure(rate=1.0, kinds=(kind,), match=final_write, limit=1)
    with open(m.path / "l/f", "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())  # returns once durable, after the retry
    st = proxy.stats()
    proxy.heal()
    assert st["faulted"] == 1, st
    assert xxh(store_bytes(s3, bucket, "l/f")) == xxh(body)
    assert xxh((m.path / "l/f").read_bytes()) == xxh(body)
    assert conflict_keys(s3, bucket) == []
    assert m.status()["conflicts"] == 0
