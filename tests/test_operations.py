"""Operations (issue 6): Prometheus metrics, `caiosfs status`, `caiosfs warm`."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

from conftest import data, xxh
from mounting import run_cli

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


def test_metrics_move_by_the_right_amounts(s3: Any, bucket: str, mounter: Any) -> None:
    body = data(10 * MiB + 5, "metrics")
    s3.put_object(Bucket=bucket, Key="m/f.bin", Body=body)
    port = free_port()
    m = mounter(bucket, "m", options=f"metrics=127.0.0.1:{port},upload_delay=0.2")
    before = scrape(port)
    assert xxh((m.path / "f.bin").read_bytes()) == xxh(body)
    after = scrape(port)
    fetched = total(after, "caiosfs_s3_bytes_in_total") - total(before, "caiosfs_s3_bytes_in_total")
    assert fetched == len(body)  # every byte fetched exactly once
    assert total(after, "caiosfs_cache_miss_bytes_total") == len(body)
    assert total(after, "caiosfs_cache_bytes") == len(body)
    assert after['caiosfs_s3_requests_total{op="get",status="ok"}'] >= 1
    assert total(after, 'caiosfs_fuse_ops_total{op="read"}') >= 1
    # a second read is served by the kernel page cache or the block cache, no new GETs
    (m.path / "f.bin").read_bytes()
    again = scrape(port)
    assert total(again, "caiosfs_s3_bytes_in_total") == total(after, "caiosfs_s3_bytes_in_total")
    # writes: bytes out, uploads completed, dirty back to zero
    (m.path / "w.bin").write_bytes(data(3 * MiB, "w"))
    m.flush()
    w = scrape(port)
    assert total(w, "caiosfs_s3_bytes_out_total") >= 3 * MiB
    assert total(w, "caiosfs_uploads_completed_total") >= 1
    assert total(w, "caiosfs_dirty_bytes") == 0
    # close sends FLUSH once; the ENOSYS reply stops the kernel sending it (a round trip
    # fewer per file), and the bytes of files closed after that still arrive
    for i in range(5):
        (m.path / f"c{i}").write_bytes(data(100_000 + i, f"c{i}"))
    m.flush()
    c = scrape(port)
    assert c['caiosfs_fuse_ops_total{op="flush"}'] == 1
    for i in range(5):
        got = s3.get_object(Bucket=bucket, Key=f"m/c{i}")["Body"].read()
        assert xxh(got) == xxh(data(100_000 + i, f"c{i}"))
    # errors are counted by errno
    try:
        os.stat(m.path / "missing")
    except FileNotFoundError:
        pass
    e = scrape(port)
    assert e.get('caiosfs_fuse_errors_total{errno="ENOENT",op="lookup"}', 0) >= 1


def test_status_shows_the_mount(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="s.txt", Body=b"status")
    m = mounter(bucket, options="upload_delay=3600")
    assert (m.path / "s.txt").read_bytes() == b"status"
    (m.path / "dirty.bin").write_bytes(b"x" * 12345)
    st = m.status()
    assert st["source"] == f"s3://{bucket}/" and st["pid"] > 0
    assert st["dirty_bytes"] == 12345 and st["dirty_files"] == 1
    assert st["hit_ratio"] is not None
    human = run_cli("status", str(m.path), check=True).stdout
    assert "dirty" in human and "12.1 KiB" in human
    everything = json.loads(run_cli("status", "--json", check=True).stdout)
    assert any(s["mountpoint"] == str(m.path) for s in everything)
    m.flush()
    assert m.status()["dirty_bytes"] == 0
    r = run_cli("status", "/nonexistent-mount")
    assert r.returncode != 0 and r.stderr.count("\n") == 1


def test_warm_sharded_resumable_then_mount_reads_nothing(s3: Any, bucket: str, mounter: Any,
                                                         seaweed: Any, tmp_path: Path,
                                                         s3_env: dict[str, str]) -> None:
    bodies = {f"ds/part-{i:02d}.bin": data((i + 1) * MiB + i, f"w{i}") for i in range(12)}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    env = {**os.environ, **s3_env}
    cache = tmp_path / "wcache"
    opts = f"endpoint={seaweed.endpoint},path_style"
    # two "nodes" (shards) into one cache dir, one after the other
    for shard in ("0/2", "1/2"):
        r = run_cli("warm", f"s3://{bucket}/ds", "--cache-dir", str(cache), "-o", opts,
                    "--shard", shard, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "warm done" in r.stderr
    # again: everything is cached, nothing is downloaded
    r = run_cli("warm", f"s3://{bucket}/ds", "--cache-dir", str(cache), "-o", opts, env=env)
    assert r.returncode == 0 and "0.0 MiB downloaded" in r.stderr
    m = mounter(bucket, "ds", cache_dir=cache, options="profile=dataset")
    for k, b in bodies.items():
        assert xxh((m.path / k.split("/", 1)[1]).read_bytes()) == xxh(b)
    assert m.status()["s3_get_requests"] == 0
    bad = run_cli("warm", f"s3://{bucket}/ds", "--cache-dir", str(tmp_path / "x"), "-o", opts,
                  "--shard", "3/2", env=env)
    assert bad.returncode == 2 and "shard" in bad.stderr


def test_warm_blocking_mount_is_ready_with_data(s3: Any, bucket: str, mounter: Any) -> None:
    body = data(24 * MiB, "blocking")
    s3.put_object(Bucket=bucket, Key="wb/big.bin", Body=body)
    m = mounter(bucket, "wb", options="warm=blocking")
    st = m.status()
    assert st["cache_bytes"] == len(body)  # all local before the mount returned
    gets = st["s3_get_requests"]
    assert xxh((m.path / "big.bin").read_bytes()) == xxh(body)
    assert m.status()["s3_get_requests"] == gets


def test_grafana_dashboard_uses_only_real_metrics() -> None:
    import re

    from caiosfs.metrics import Metrics
    dash = json.loads((Path(__file__).parent.parent / "docs/grafana-dashboard.json").read_text())
    families = [mf.name for mf in Metrics().registry.collect()]
    known = {f + suffix for f in families for suffix in ("", "_total", "_bucket")}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"caiosfs_[a-z0-9_]+", e)}
    assert len(used) > 15 and used <= known, used - known
