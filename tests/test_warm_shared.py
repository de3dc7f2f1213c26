"""`caiosfs warm` by several processes into one cache directory, with --files-from, and
through a running mount: every object fetched once, counted in the metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import data, xxh
from faultproxy import FaultProxy

MiB = 1 << 20
CAIOSFS = [sys.executable, "-m", "caiosfs.cli"]


def test_four_warm_processes_fill_one_cache_dir(s3: Any, bucket: str, tmp_path: Path,
                                                seaweed: Any, s3_env: dict[str, str],
                                                mounter: Any) -> None:
    bodies = {f"ds/d{i % 3}/p{i:02d}.bin": data(MiB + i * 4099, f"w{i}") for i in range(16)}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    cache = tmp_path / "shared-cache"
    env = {**os.environ, **s3_env}
    with FaultProxy(seaweed.endpoint, lifetime=200, stall=0.3) as proxy:
        # Every object GET held 0.3 s: the first process still runs when the others start.
        proxy.configure(rate=1.0, kinds=("stall",), match=lambda r: r.is_object_get)
        opts = f"endpoint={proxy.endpoint},path_style,parallel=2"
        procs = [subprocess.Popen(CAIOSFS + ["warm", f"s3://{bucket}/ds", "--cache-dir",
                                             str(cache), "-o", opts, "--shard", f"{i}/4"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(4)]
        outs = [p.communicate(timeout=180)[1] for p in procs]
        gets = proxy.stats()["forwarded"]
    assert all(p.returncode == 0 for p in procs), outs
    handed = [e for e in outs if "by the process that owns the cache directory" in e]
    assert handed, outs  # at least one process worked through the owner's socket
    assert sum(o.count("warm done") for o in outs) == 4
    # One GET per object (each fits one request) plus listings/heads: nothing twice.
    assert gets <= len(bodies) + 4 * 3, gets
    # A second round of the same through --files-from: nothing left to download.
    lst = tmp_path / "list"
    lst.write_text("".join(k.split("/", 1)[1] + "\n" for k in bodies))
    r = subprocess.run(CAIOSFS + ["warm", f"s3://{bucket}/ds", "--cache-dir", str(cache),
                                  "-o", f"endpoint={seaweed.endpoint},path_style",
                                  "--files-from", str(lst)], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0 and "0.0 MiB downloaded" in r.stderr, r.stderr
    m = mounter(bucket, "ds", cache_dir=cache, options="profile=dataset")
    for k, b in bodies.items():
        assert xxh((m.path / k.split("/", 1)[1]).read_bytes()) == xxh(b)
    assert m.status()["s3_get_requests"] == 0


def test_warm_through_a_mount_takes_only_its_shard(s3: Any, bucket: str, tmp_path: Path,
                                                  seaweed: Any, s3_env: dict[str, str],
                                                  mounter: Any) -> None:
    bodies = {f"m/f{i}.bin": data(MiB // 2 + i, f"m{i}") for i in range(10)}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = mounter(bucket, "m")
    lst = tmp_path / "three"
    lst.write_text("f1.bin\nf4.bin\nf7.bin\n")
    r = subprocess.run(CAIOSFS + ["warm", f"s3://{bucket}/m", "--cache-dir", str(m.cache_dir),
                                  "-o", f"endpoint={seaweed.endpoint},path_style",
                                  "--files-from", str(lst)], env={**os.environ, **s3_env},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    st = m.status()
    want = sum(len(bodies[f"m/f{i}.bin"]) for i in (1, 4, 7))
    assert st["warm_bytes"] == want and st["cache_bytes"] == want
    assert st["s3_get_requests"] >= 1
