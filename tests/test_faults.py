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
