"""Security (issue 7): credentials never leak; the cache and control files are private;
FUSE options are safe by default; metrics listen on loopback unless told otherwise.

The secret key of the test identity is a random token: finding it anywhere but where the
user put it (environment, credentials file) is a leak.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import data, xxh
from mounting import run_cli

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def all_cmdlines() -> dict[int, bytes]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = (p / "cmdline").read_bytes()
            except OSError:
                pass
    return out


def mount_options(mountpoint: Path) -> set[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if f[1] == str(mountpoint):
            return set(f[3].split(","))
    raise AssertionError(f"{mountpoint} not in /proc/mounts")


def listening(port: int) -> list[str]:
    """Local addresses (hex ip) of TCP sockets listening on port, from /proc/net/tcp{,6}."""
    out = []
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            ip, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":  # LISTEN
                out.append(ip)
    return out


def secrets_of(seaweed: Any) -> list[bytes]:
    s = seaweed.secret_key
    assert s and len(s) >= 16
    return [s.encode()]


def assert_no_secret(blob: bytes | str, where: str, secrets: list[bytes]) -> None:
    b = blob.encode() if isinstance(blob, str) else blob
    for s in secrets:
        assert s not in b, f"the secret key appears in {where}"


def test_credentials_never_leak(s3: Any, bucket: str, mounter: Any, seaweed: Any,
                                creds_file: Path, tmp_path: Path,
                                request: pytest.FixtureRequest) -> None:
    secrets = secrets_of(seaweed)
    port = free_port()
    # Allow core dumps in what we start (as a shell with `ulimit -c unlimited` would): the
    # daemon must switch them off itself.
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    request.addfinalizer(lambda: resource.setrlimit(resource.RLIMIT_CORE, (soft, hard)))
    s3.put_object(Bucket=bucket, Key="d/f", Body=data(3 * MiB, "sec"))
    # One mount with credentials from the environment, one from a credentials file;
    # debug logging on, metrics on.
    m1 = mounter(bucket, options=f"debug,metrics=127.0.0.1:{port}")
    env_nocreds = {k: v for k, v in m1.env.items() if not k.startswith("AWS_SECRET")
                   and k != "AWS_ACCESS_KEY_ID"}
    m2 = mounter(bucket, options=f"debug,credentials_file={creds_file}", mount=False)
    m2.env = env_nocreds
    m2.mount()
    for m in (m1, m2):  # some traffic, including failures that get logged
        assert xxh((m.path / "d/f").read_bytes()) == xxh(data(3 * MiB, "sec"))
        (m.path / "d/new").write_bytes(b"x")
        assert not (m.path / "nope").exists()
        m.flush()
    # argv of every process (what ps shows)
    for pid, cmd in all_cmdlines().items():
        assert_no_secret(cmd, f"the command line of pid {pid}", secrets)
    # metrics
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b"caiosfs_s3_requests" in scrape
    assert_no_secret(scrape, "the metrics", secrets)
    # status output (JSON and text)
    for m in (m1, m2):
        assert_no_secret(run_cli("status", str(m.path), "--json", env=m.env).stdout,
                         "caiosfs status --json", secrets)
    assert_no_secret(run_cli("status", env=m1.env).stdout, "caiosfs status", secrets)
    # failing mounts: wrong key, bad credentials file, secret given as an option
    bad_env = {**m1.env, "AWS_SECRET_ACCESS_KEY": "wrong" + seaweed.secret_key[5:]}
    bad_file = tmp_path / "bad-creds"
    bad_file.write_text(f"[default]\naws_secret_access_key = {seaweed.secret_key}\n"
                        "this is not INI\n")
    bad_file.chmod(0o600)
    attempts = [
        (bad_env, ""),
        (env_nocreds, f"credentials_file={bad_file}"),
        (env_nocreds, f"aws_secret_access_key={seaweed.secret_key}"),
        (env_nocreds, f"secret_key={seaweed.secret_key}"),
        (m1.env, "endpoint=http://127.0.0.1:1"),
    ]
    for env, opt in attempts:
        m = mounter(bucket, options=opt, mount=False)
        r = run_cli("mount", m.source, str(m.path), "-o", m.options, env=env, timeout=90)
        assert r.returncode != 0, f"mount with {opt or 'a wrong key'} succeeded"
        assert r.stderr.strip(), "a failing mount must say why"
        for s in secrets + [bad_env["AWS_SECRET_ACCESS_KEY"].encode()]:
            assert s not in r.stderr.encode(), f"mount -o {opt[:20]}...: secret in stderr"
        assert "Traceback" not in r.stderr
        log = m.cache_dir / "caiosfs.log"
        if log.exists():
            assert_no_secret(log.read_bytes(), f"the log of a failed mount ({opt[:20]})",
                             secrets)
    # logs (with debug on), after all that
    for m in (m1, m2):
        for log in m.cache_dir.glob("caiosfs.log*"):
            assert_no_secret(log.read_bytes(), str(log), secrets)
    # core dumps: the daemon that holds the keys never writes one
    for m in (m1, m2):
        limits = Path(f"/proc/{m.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4] == "0", f"core dumps allowed: {core}"


def test_cache_dir_and_files_are_private(s3: Any, bucket: str, mounter: Any,
                                         tmp_path: Path) -> None:
    s3.put_object(Bucket=bucket, Key="r", Body=data(5 * MiB, "priv"))
    old = os.umask(0o022)  # the usual umask: caiosfs must not rely on it
    try:
        m = mounter(bucket, options="upload_delay=30")  # keep a dirty file around
        (m.path / "r").read_bytes()
        (m.path / "w").write_bytes(data(MiB, "w"))
        (m.path / "dir").mkdir()
        found = {"dirs": 0, "files": 0}
        assert stat.S_IMODE(m.cache_dir.stat().st_mode) == 0o700
        for d, dirs, files in os.walk(m.cache_dir):
            for name in dirs:
                mode = stat.S_IMODE((Path(d) / name).stat().st_mode)
                assert mode & 0o077 == 0, f"{Path(d) / name} is {oct(mode)}"
                found["dirs"] += 1
            for name in files:
                mode = stat.S_IMODE((Path(d) / name).stat().st_mode)
                assert mode & 0o077 == 0, f"{Path(d) / name} is {oct(mode)}"
                assert mode == 0o600, f"{Path(d) / name} is {oct(mode)}"
                found["files"] += 1
        assert found["files"] >= 4, found  # lock, log, index files, blocks, dirty data
        # the control socket and the registry of mounts
        info = next(i for i in __import__("caiosfs.control").control.registered()
                    if i["mountpoint"] == str(m.path))
        sock = Path(info["socket"])
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(sock.parent.stat().st_mode) & 0o077 == 0
        m.flush()
    finally:
        os.umask(old)


def test_fuse_options_safe_by_default(bucket: str, mounter: Any) -> None:
    m = mounter(bucket)
    opts = mount_options(m.path)
    assert "allow_other" not in opts, opts
    assert "default_permissions" in opts, opts
    assert "nosuid" in opts and "nodev" in opts, opts
    m2 = mounter(bucket, options="allow_other")
    opts2 = mount_options(m2.path)
    assert "allow_other" in opts2 and "default_permissions" in opts2, opts2


def test_metrics_listen_on_loopback_by_default(bucket: str, mounter: Any) -> None:
    port = free_port()
    m = mounter(bucket, options=f"metrics={port}")  # no host given
    addrs = listening(port)
    assert addrs, "metrics not listening"
    assert all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b"caiosfs_" in body
    assert m.status()["pid"]
