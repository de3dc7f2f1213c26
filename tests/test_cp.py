"""`caiosfs cp` and `caiosfs ls` against a real SeaweedFS: trees byte-identical both ways,
shards, a killed copy resumed, faults, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import data, xxh
from faultproxy import FaultProxy

from caiosfs.cli import main

MiB = 1 << 20
CAIOSFS = [sys.executable, "-m", "caiosfs.cli"]


def seed_tree(s3: Any, bucket: str, prefix: str, n: int = 30, big: int = 0) -> dict[str, bytes]:
    """Objects under prefix: n small files in nested directories (a few with s3fs
    attributes), a zero-byte one, an s3fs symlink, and optionally one of ``big`` bytes."""
    files: dict[str, bytes] = {}
    for i in range(n):
        rel = f"d{i % 4}/sub{i % 3}/f{i:03d}.bin"
        files[rel] = data(100 + i * 997, f"s{i}")
    files["empty"] = b""
    if big:
        files["big/blob.bin"] = data(big, "big")
    for rel, body in files.items():
        meta = {"mode": str(0o100600), "mtime": "1600000000"} if rel.endswith("7.bin") else {}
        s3.put_object(Bucket=bucket, Key=prefix + rel, Body=body, Metadata=meta)
    s3.put_object(Bucket=bucket, Key=prefix + "link", Body=b"d0/sub0/f000.bin",
                  Metadata={"mode": str(stat.S_IFLNK | 0o777)})
    return files


def local_tree(root: Path) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = Path(d) / name
            if not p.is_symlink():
                out[str(p.relative_to(root))] = xxh(p.read_bytes())
    return out


def store_tree(s3: Any, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            out[o["Key"][len(prefix):]] = xxh(body)
    return out


def cp(*args: str) -> tuple[int, dict[str, Any], str]:
    """caiosfs cp in this process: (exit status, the --json summary, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["cp", *args, "--json"])
    summary = json.loads(out.getvalue().strip().splitlines()[-1]) if out.getvalue() else {}
    return rc, summary, err.getvalue()


@pytest.fixture
def opts(seaweed: Any, creds_file: Path) -> str:
    return f"endpoint={seaweed.endpoint},path_style,credentials_file={creds_file}"


def test_roundtrip_byte_identical_with_attributes(s3: Any, bucket: str, tmp_path: Path,
                                                  opts: str) -> None:
    files = seed_tree(s3, bucket, "src/", big=9 * MiB + 123)
    dest = tmp_path / "dl"
    # 1 MiB ranges: the 9 MiB object comes as 10 parallel ranged GETs.
    rc, s, err = cp(f"s3://{bucket}/src", str(dest), "-o", opts + ",max_request=1M",
                    "--verify")
    assert rc == 0, err
    assert s["copied"] == len(files) + 1 and s["failed"] == 0
    assert local_tree(dest) == {k: xxh(v) for k, v in files.items()}
    st = (dest / "d3/sub1/f007.bin").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime == 1600000000
    assert os.readlink(dest / "link") == "d0/sub0/f000.bin"
    assert not [p for p in dest.rglob(".caiosfs-*")]
    # Again: everything is there already.
    rc, s, err = cp(f"s3://{bucket}/src", str(dest), "-o", opts)
    assert (rc, s["copied"], s["skipped"]) == (0, 0, len(files) + 1), err

    # Back up, to another prefix: 5 MiB parts make the big file a 2-part multipart upload.
    os.utime(dest / "d0/sub0/f000.bin", (1500000000, 1500000000))
    rc, s, err = cp(str(dest), f"s3://{bucket}/up", "-o", opts + ",part_size=5M", "--verify")
    assert rc == 0, err
    assert s["copied"] == len(files) + 1
    want = {k: xxh(v) for k, v in files.items()}
    want["link"] = xxh(b"d0/sub0/f000.bin")
    assert store_tree(s3, bucket, "up/") == want
    assert s3.head_object(Bucket=bucket, Key="up/big/blob.bin")["ETag"].endswith('-2"')
    meta = s3.head_object(Bucket=bucket, Key="up/d0/sub0/f000.bin")["Metadata"]
    assert meta["mtime"] == "1500000000" and int(meta["mode"]) == stat.S_IFREG | 0o644
    assert int(s3.head_object(Bucket=bucket, Key="up/d3/sub1/f007.bin")["Metadata"]["mode"]) \
        == stat.S_IFREG | 0o600
    assert stat.S_ISLNK(int(s3.head_object(Bucket=bucket, Key="up/link")["Metadata"]["mode"]))
    rc, s, err = cp(str(dest), f"s3://{bucket}/up", "-o", opts)
    assert (rc, s["copied"], s["skipped"]) == (0, 0, len(files) + 1), err
    # And down again from what was uploaded: the same bytes, the same attributes.
    # (--verify: the multipart ETag is checked with a guessed part size, 5 MiB here)
    rc, s, err = cp(f"s3://{bucket}/up", str(tmp_path / "dl2"), "-o", opts, "--verify")
    assert rc == 0, err
    assert local_tree(tmp_path / "dl2") == local_tree(dest)
    assert (tmp_path / "dl2/d0/sub0/f000.bin").stat().st_mtime == 1500000000


def test_shards_and_split_lists_cover_every_object_once(s3: Any, bucket: str, tmp_path: Path,
                                                       opts: str) -> None:
    files = seed_tree(s3, bucket, "p/", n=40)
    everything = {k: xxh(v) for k, v in files.items()}
    for n in (2, 3, 5):
        seen: dict[str, str] = {}
        for i in range(n):
            d = tmp_path / f"n{n}-{i}"
            rc, s, err = cp(f"s3://{bucket}/p", str(d), "-o", opts, "--shard", f"{i}/{n}")
            assert rc == 0, err
            got = local_tree(d)
            assert not set(got) & set(seen), f"shard {i}/{n} overlaps"
            seen.update(got)
        assert seen == everything
    # List once, split in 3 lists, each copied by --files-from into one shared directory.
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert main(["ls", f"s3://{bucket}/p", "-o", opts, "--split", "3",
                     "--output", str(tmp_path / "lists")]) == 0
    lists = [(tmp_path / f"lists/shard-{i}.list").read_text().splitlines() for i in range(3)]
    names = [line.split("\t")[0] for lst in lists for line in lst]
    assert sorted(names) == sorted([*files, "link"])
    shared = tmp_path / "shared"
    for i in range(3):
        rc, s, err = cp(f"s3://{bucket}/p", str(shared), "-o", opts, "--files-from",
                        str(tmp_path / f"lists/shard-{i}.list"))
        assert rc == 0 and s["copied"] == len(lists[i]) and s["skipped"] == 0, err
    assert local_tree(shared) == everything
    # A bare path list (no metadata: a HEAD each), for the upload direction too.
    plain = tmp_path / "plain.list"
    plain.write_text("d0/sub0/f000.bin\n# a comment\nempty\nmissing/file\n")
    rc, s, err = cp(f"s3://{bucket}/p", str(tmp_path / "few"), "-o", opts,
                    "--files-from", str(plain))
    assert rc == 1 and s["copied"] == 2 and s["failures"] == [
        {"path": "missing/file", "error": "not found"}], err
    rc, s, err = cp(str(shared), f"s3://{bucket}/few", "-o", opts, "--files-from", str(plain))
    assert rc == 1 and s["copied"] == 2 and s["failed"] == 1, err
    assert store_tree(s3, bucket, "few/") == {k: everything[k] for k in ("d0/sub0/f000.bin",
                                                                         "empty")}


def _run_and_kill(args: list[str], env: dict[str, str], ready: Any) -> None:
    p = subprocess.Popen(CAIOSFS + args, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert p.poll() is None, f"finished before it could be killed: {p.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=30)


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_killed_copy_resumes_nothing_partial_nothing_twice(
        s3: Any, bucket: str, tmp_path: Path, opts: str, s3_env: dict[str, str],
        seaweed: Any, direction: str) -> None:
    """SIGKILL in the middle; the rerun copies exactly what was missing."""
    proxy = FaultProxy(seaweed.endpoint, lifetime=120, stall=0.05).start()
    try:
        # Every transfer held a little: the copy takes long enough to be killed mid-way.
        proxy.configure(rate=1.0, kinds=("stall",),
                        match=lambda r: r.method in ("GET", "PUT") and "/" in r.path[1:])
        o = opts.replace(seaweed.endpoint, proxy.endpoint) + ",parallel=4,part_size=5M"
        src = tmp_path / "src"
        files = {f"d{i % 5}/f{i:03d}": data(20_000 + i, f"k{i}") for i in range(150)}
        files["big"] = data(12 * MiB, "kbig")
        if direction == "download":
            for rel, body in files.items():
                s3.put_object(Bucket=bucket, Key="t/" + rel, Body=body)
            dest = tmp_path / "dest"
            args = ["cp", f"s3://{bucket}/t", str(dest), "-o", o]

            def done() -> set[str]:
                return {str((Path(d) / n).relative_to(dest)) for d, _, ns in os.walk(dest)
                        for n in ns if not n.startswith(".caiosfs-")}
        else:
            for rel, body in files.items():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                (src / rel).write_bytes(body)
            args = ["cp", str(src), f"s3://{bucket}/t", "-o", o]

            def done() -> set[str]:
                r = s3.list_objects_v2(Bucket=bucket, Prefix="t/")
                return {c["Key"][2:] for c in r.get("Contents", [])}
        _run_and_kill(args, {**os.environ, **s3_env}, lambda: len(done()) >= 40)
        proxy.heal()
        time.sleep(1)  # a PUT the proxy forwarded before the kill still lands in the store
        before = done()
        if direction == "upload":  # as if killed in the middle of a multipart upload
            missing = min(set(files) - before)
            s3.create_multipart_upload(Bucket=bucket, Key="t/" + missing)
            s3.create_multipart_upload(Bucket=bucket, Key="other/x")  # not ours: stays
        assert 40 <= len(before) < len(files)
        if direction == "download":  # what has its final name is whole
            got = local_tree(dest)
            assert all(got[k] == xxh(files[k]) for k in before)
        rc, s, err = cp(*args[1:])
        assert rc == 0, err
        assert (s["copied"], s["skipped"]) == (len(files) - len(before), len(before))
        if direction == "download":
            assert local_tree(dest) == {k: xxh(v) for k, v in files.items()}
            assert not list(dest.rglob(".caiosfs-*")), "a temporary file was left"
        else:
            assert store_tree(s3, bucket, "t/") == {k: xxh(v) for k, v in files.items()}
            left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            assert [u["Key"] for u in left] == ["other/x"] and s["aborted_uploads"] >= 1
    finally:
        proxy.stop()


def test_faults_give_retries_or_a_failure_list_never_a_wrong_byte(
        s3: Any, bucket: str, tmp_path: Path, opts: str, seaweed: Any) -> None:
    files = seed_tree(s3, bucket, "f/", n=40, big=6 * MiB)
    with FaultProxy(seaweed.endpoint, lifetime=200, seed=3, stall=2) as proxy:
        proxy.configure(rate=0.3, kinds=("500", "503", "reset", "stall", "truncate",
                                         "long_length", "short_length", "stall_body"),
                        match=lambda r: r.method in ("GET", "PUT", "HEAD", "POST"))
        o = (opts.replace(seaweed.endpoint, proxy.endpoint)
             + ",max_request=1M,part_size=5M,read_timeout=8")
        dest = tmp_path / "d"
        rc, s, err = cp(f"s3://{bucket}/f", str(dest), "-o", o)
        got = local_tree(dest)
        assert all(got[k] == xxh(files[k]) for k in got)  # never a wrong byte
        assert s and rc == (1 if s["failed"] else 0), err
        assert len(got) + s["failed"] == len(files), err  # the rest is in the failure list
        assert all(f"failed: {f['path']}" in err for f in s["failures"])
        rc, s, err = cp(str(dest), f"s3://{bucket}/back", "-o", o)
        assert s and rc == (1 if s["failed"] else 0), err
        assert proxy.stats()["faulted"] > 10
    back = store_tree(s3, bucket, "back/")
    want = {k: xxh(v) for k, v in files.items()} | {"link": xxh(b"d0/sub0/f000.bin")}
    assert all(back[k] == want[k] for k in back)
    nlocal = len(got) + (dest / "link").is_symlink()
    assert len(back) + s["failed"] == nlocal, err


def test_bad_input_one_line_nonzero(s3: Any, bucket: str, tmp_path: Path, opts: str,
                                    s3_env: dict[str, str]) -> None:
    s3.put_object(Bucket=bucket, Key="x/a", Body=b"a")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    env = {**os.environ, **s3_env}
    cases = {
        "bucket": ([f"s3://no-such-bucket-{bucket[-8:]}/x", str(tmp_path / "o"), "-o", opts],
                   "does not exist"),
        "unwritable": ([f"s3://{bucket}/x", str(blocker / "sub"), "-o", opts],
                       "not writable"),
        "credentials": ([f"s3://{bucket}/x", str(tmp_path / "o2"), "-o",
                         opts.split(",credentials_file")[0]], "denied"),
        "source": ([str(tmp_path / "nope"), f"s3://{bucket}/x", "-o", opts],
                   "not a directory"),
        "two local": ([str(tmp_path), str(tmp_path / "o3")], "one of each"),
        "shard": ([f"s3://{bucket}/x", str(tmp_path / "o4"), "--shard", "4/4"], "--shard"),
        "unreachable": ([f"s3://{bucket}/x", str(tmp_path / "o5"), "-o",
                         "endpoint=http://127.0.0.1:1,path_style,read_timeout=2"],
                        "cannot reach"),
    }
    for name, (args, words) in cases.items():
        e = dict(env)
        if name == "credentials":
            e["AWS_SECRET_ACCESS_KEY"] = "wrong"
        r = subprocess.run(CAIOSFS + ["cp", *args], env=e, capture_output=True, text=True,
                           timeout=60, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], (name, r.stderr)
        assert "Traceback" not in r.stderr


def test_etag_check(tmp_path: Path) -> None:
    import hashlib

    from caiosfs.etag import etag_matches
    body = data(11 * MiB + 5, "e")
    p = tmp_path / "f"
    p.write_bytes(body)
    md5 = hashlib.md5(body).hexdigest()
    parts = b"".join(hashlib.md5(body[o:o + 8 * MiB]).digest() for o in range(0, len(body),
                                                                              8 * MiB))
    multi = f'"{hashlib.md5(parts).hexdigest()}-2"'
    assert etag_matches(str(p), len(body), f'"{md5}"', 64 * MiB) is True
    assert etag_matches(str(p), len(body), multi, 64 * MiB) is True
    p.write_bytes(body[:-1] + b"x")  # one byte differs
    assert etag_matches(str(p), len(body), f'"{md5}"', 64 * MiB) is False
    assert etag_matches(str(p), len(body), multi, 64 * MiB) is None  # (no part size fits)
    assert etag_matches(str(p), len(body), '"not-an-md5"', 64 * MiB) is None


def test_four_shards_at_once_into_one_directory(s3: Any, bucket: str, tmp_path: Path,
                                                opts: str, s3_env: dict[str, str]) -> None:
    files = seed_tree(s3, bucket, "q/", n=60, big=3 * MiB)
    dest = tmp_path / "one"
    procs = [subprocess.Popen(CAIOSFS + ["cp", f"s3://{bucket}/q", str(dest), "-o",
                                         opts + ",max_request=1M", "--shard", f"{i}/4",
                                         "--json"],
                              env={**os.environ, **s3_env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    copied = [json.loads(o.strip().splitlines()[-1])["copied"] for o, _ in outs]
    assert sum(copied) == len(files) + 1 and all(copied)  # every object once, each did some
    assert local_tree(dest) == {k: xxh(v) for k, v in files.items()}
    assert not list(dest.rglob(".caiosfs-*"))


def test_stale_listing_fails_that_object_only_nothing_left(s3: Any, bucket: str,
                                                          tmp_path: Path, opts: str) -> None:
    """A fault in the middle of the thread path: objects changed since they were listed
    (a small one, fetched whole, and a large one, as 1 MiB ranges in flight at once) fail
    with the reason; no temp file, no final name; the others are byte-identical."""
    files = {f"ok/{i}": data(30_000 + i, f"ok{i}") for i in range(20)}
    files["big"] = data(5 * MiB + 7, "big0")
    files["small"] = data(1000, "small0")
    for rel, body in files.items():
        s3.put_object(Bucket=bucket, Key="st/" + rel, Body=body)
    listing = tmp_path / "list"
    rc = main(["ls", f"s3://{bucket}/st", "--split", "1", "--output", str(listing), "-o", opts])
    assert rc == 0
    # Both change after the listing: their ETags in the list are now stale.
    s3.put_object(Bucket=bucket, Key="st/big", Body=data(5 * MiB + 7, "big1"))
    s3.put_object(Bucket=bucket, Key="st/small", Body=data(1000, "small1"))
    dest = tmp_path / "d"
    rc, s, err = cp(f"s3://{bucket}/st", str(dest), "-o", opts + ",max_request=1M",
                    "--files-from", str(listing / "shard-0.list"))
    assert rc == 1 and s["copied"] == 20, err
    assert sorted(f["path"] for f in s["failures"]) == ["big", "small"]
    assert all("changed in the store" in f["error"] for f in s["failures"])
    assert local_tree(dest) == {k: xxh(v) for k, v in files.items() if k.startswith("ok/")}
    assert not list(dest.rglob(".caiosfs-*")), "a temporary file was left"


def test_destination_synced_once_after_every_name(s3: Any, bucket: str, tmp_path: Path,
                                                  opts: str, monkeypatch: Any) -> None:
    """No fsync per file: one syncfs of the destination, once every file has its name
    (docs/cp.md, "Durability")."""
    from caiosfs import transfer
    files = seed_tree(s3, bucket, "sy/", n=12, big=3 * MiB)
    dest = tmp_path / "d"
    seen: list[dict[str, str]] = []

    def syncfs(fd: int) -> None:
        assert os.path.samefile(f"/proc/self/fd/{fd}", dest)
        seen.append(local_tree(dest))
    monkeypatch.setattr(transfer, "syncfs", syncfs)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync per file"))
    rc, _, err = cp(f"s3://{bucket}/sy", str(dest), "-o", opts + ",max_request=1M")
    assert rc == 0, err
    assert seen == [{k: xxh(v) for k, v in files.items()}]


def test_syncfs_failure_is_reported(s3: Any, bucket: str, tmp_path: Path, opts: str,
                                    monkeypatch: Any) -> None:
    import errno

    from caiosfs import transfer
    s3.put_object(Bucket=bucket, Key="se/a", Body=b"a")

    def syncfs(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(transfer, "syncfs", syncfs)
    rc, s, err = cp(f"s3://{bucket}/se", str(tmp_path / "d"), "-o", opts)
    assert rc == 1 and s["failed"] == 1 and "writing the copied files back" in err, err


def test_retrying_backs_off_then_gives_up() -> None:
    from caiosfs.copypool import GaveUp, retrying
    from caiosfs.errors import StoreError
    calls: list[float] = []

    def flaky(n: int) -> str:
        calls.append(time.monotonic())
        if len(calls) < n:
            raise StoreError("SlowDown", "try later", 503, retryable=True)
        return "done"
    seen: list[str] = []
    assert retrying("get", 30, flaky, 3, on_retry=lambda e: seen.append(e.code)) == "done"
    assert len(calls) == 3 and seen == ["SlowDown", "SlowDown"]
    calls.clear()
    with pytest.raises(StoreError) as ei:  # not retryable: at once
        retrying("get", 30, lambda: (calls.append(0.0),
                                     (_ for _ in ()).throw(StoreError("NoSuchKey"))))
    assert ei.value.code == "NoSuchKey" and len(calls) == 1
    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(GaveUp) as gu:
        retrying("get", 0.5, flaky, 10**9)
    assert 0.4 < time.monotonic() - t0 < 2 and len(calls) >= 2
    assert gu.value.code == "SlowDown" and "gave up" in str(gu.value)


def test_pool_runs_every_task_each_kind_on_its_threads() -> None:
    import threading

    from caiosfs.copypool import Pool
    ran: dict[str, list[str]] = {"large": [], "small": []}
    lock = threading.Lock()

    def task(kind: str) -> None:
        time.sleep(0.002)
        with lock:
            ran[kind].append(threading.current_thread().name)
    Pool(2, 3, small_takes_large=False).run([lambda: task("large")] * 4,
                                            [lambda: task("small")] * 300)
    assert len(ran["large"]) == 4 and len(ran["small"]) == 300
    assert set(ran["large"]) == {"cp-large"}  # small-object threads never take large work
    assert set(ran["small"]) == {"cp-large", "cp-small"}  # (idle large ones help)
    with pytest.raises(ZeroDivisionError):  # a bug in a task is raised, after the rest
        Pool(1, 1).run([lambda: 1 / 0], [lambda: task("small")] * 5)
    assert len(ran["small"]) == 305


def test_cp_signer_signs_as_botocore() -> None:
    """cp's own SigV4 (store/lean.py) gives botocore's signature for the same request:
    keys and query values with characters to encode, every kind of header cp sends."""
    import calendar
    import hashlib
    from urllib.parse import quote

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    from caiosfs.store.copystore import ca_file
    from caiosfs.store.sigv4 import SigV4, canonical_query
    for token in (None, "tok/en+="):
        for method, key, params, headers, body in [
            ("GET", "d/a b+c%ü~.bin", None, {"range": "bytes=0-9", "if-match": '"e1"'}, None),
            ("GET", "", {"list-type": "2", "prefix": "p q/+ü", "max-keys": "1000",
                         "encoding-type": "url", "continuation-token": "a+b/c=="}, {}, None),
            ("PUT", "x/y", None, {"content-md5": "abc==", "x-amz-meta-mode": "33188",
                                  "content-length": "5"}, b"hello"),
            ("DELETE", "x/y", {"uploadId": "u+1/2"}, {}, None),
            ("GET", "", {"uploads": "", "prefix": "t/"}, {}, None),
        ]:
            path = "/bkt/" + quote(key, safe="/~")
            query = canonical_query(params) if params else ""
            url = "http://127.0.0.1:9000" + path + ("?" + query if query else "")
            req = AWSRequest(method, url, data=body, headers=dict(headers))
            req.context["client_config"] = Config(s3={"payload_signing_enabled": True})
            S3SigV4Auth(Credentials("AK", "SECRET", token), "s3", "us-east-1").add_auth(req)
            amz = req.headers["X-Amz-Date"]
            now = calendar.timegm(time.strptime(amz, "%Y%m%dT%H%M%SZ"))
            mine = {"host": "127.0.0.1:9000", **headers}
            payload = hashlib.sha256(body or b"").hexdigest()
            SigV4("us-east-1", lambda t=token: ("AK", "SECRET", t)).sign(
                method, path, query, mine, payload, now)
            assert mine["authorization"] == req.headers["Authorization"], (method, key, params)
    assert os.path.isfile(ca_file())  # (https: the CA bundle botocore would use)


def test_cp_imports_no_boto3_and_keeps_odd_names(s3: Any, bucket: str,
                                                          tmp_path: Path, opts: str) -> None:
    """cp signs its own requests, both ways: neither boto3, botocore, urllib3 nor the
    mount's trio/pyfuse3/lmdb/prometheus are imported; names that need encoding (a
    space, '+', '%', non-ASCII) come through the listing and the GETs intact."""
    names = {"a b/c+d.txt": b"1", "p%20q/\u00fc\u00df.bin": b"22", "plain": b"333",
             "x/y z+/~w": b"4444"}
    for rel, body in names.items():
        s3.put_object(Bucket=bucket, Key="odd/" + rel, Body=body)
    code = ("import sys, json; from caiosfs.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'boto3', "
            "'botocore', 's3transfer', 'urllib3', 'trio', 'pyfuse3', 'lmdb', "
            "'prometheus_client'})), file=sys.stderr); sys.exit(rc)")
    dest = tmp_path / "d"
    r = subprocess.run([sys.executable, "-c", code, "cp", f"s3://{bucket}/odd", str(dest),
                        "-o", opts, "-q"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*")
            if p.is_file()} == names
    # Uploads too, multipart included (a 6 MiB file in 5 MiB parts), and back to the store.
    (dest / "big").write_bytes(data(6 * MiB, "oddbig"))
    r = subprocess.run([sys.executable, "-c", code, "cp", str(dest), f"s3://{bucket}/odd2",
                        "-o", opts + ",part_size=5M", "-q", "--verify"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
    assert store_tree(s3, bucket, "odd2/") == {k: xxh(v) for k, v in names.items()} | {
        "big": xxh(data(6 * MiB, "oddbig"))}
    assert s3.head_object(Bucket=bucket, Key="odd2/big")["ETag"].endswith('-2"')


def test_listing_pages_overlap_downloads_every_object_once(
        s3: Any, bucket: str, tmp_path: Path, opts: str, monkeypatch: Any) -> None:
    """A listing of several pages: the first GETs start before the last page is listed,
    and still every object is copied exactly once (and --shard I/N covers each once); a
    page that cannot be listed ends the copy with the error, after what was queued is
    copied whole (no temp file left)."""
    from caiosfs.errors import StoreError
    from caiosfs.store import copystore
    files = {f"g{i % 3}/o{i:02d}": data(3000 + 17 * i, f"pg{i}") for i in range(45)}
    for rel, body in files.items():
        s3.put_object(Bucket=bucket, Key="pg/" + rel, Body=body)
    events: list[tuple[str, float]] = []
    orig_list, orig_get = copystore.CopyStore.list, copystore.CopyStore.get_range
    fail_after: list[int] = []

    def paged(self: Any, prefix: str, delimiter: str | None = "/", token: str | None = None,
              max_keys: int = 1000) -> Any:
        n = sum(1 for e, _ in events if e == "page")
        if fail_after and n >= fail_after[0]:
            raise StoreError("AccessDenied", "no more pages", 403)
        if token:
            time.sleep(0.15)  # (a slow listing: the copy must not wait for it)
        page = orig_list(self, prefix, delimiter, token, min(max_keys, 10))
        events.append(("page", time.monotonic()))
        return page

    def get(self: Any, *args: Any) -> Any:
        events.append(("get", time.monotonic()))
        return orig_get(self, *args)
    monkeypatch.setattr(copystore.CopyStore, "list", paged)
    monkeypatch.setattr(copystore.CopyStore, "get_range", get)
    dest = tmp_path / "all"
    rc, s, err = cp(f"s3://{bucket}/pg", str(dest), "-o", opts)
    assert rc == 0 and (s["copied"], s["skipped"]) == (45, 0), err
    assert local_tree(dest) == {k: xxh(v) for k, v in files.items()}
    pages = [t for e, t in events if e == "page"]
    gets = [t for e, t in events if e == "get"]
    assert len(pages) == 5 and len(gets) == 45
    assert min(gets) < max(pages), "the first GET waited for the whole listing"
    seen: dict[str, str] = {}
    for i in range(3):
        events.clear()
        rc, s, err = cp(f"s3://{bucket}/pg", str(tmp_path / f"s{i}"), "-o", opts,
                        "--shard", f"{i}/3")
        got = local_tree(tmp_path / f"s{i}")
        assert rc == 0 and s["copied"] == len(got) and not set(got) & set(seen), err
        seen.update(got)
    assert seen == {k: xxh(v) for k, v in files.items()}
    events.clear()
    fail_after.append(2)  # the third page is refused
    part = tmp_path / "part"
    rc, s, err = cp(f"s3://{bucket}/pg", str(part), "-o", opts + ",read_timeout=2")
    assert rc != 0 and "listing failed" in err, err
    got = local_tree(part)
    assert len(got) == 20 and all(got[k] == xxh(files[k]) for k in got)
    assert not list(part.rglob(".caiosfs-*"))


def test_small_files_get_their_mode_whatever_the_umask(s3: Any, bucket: str, tmp_path: Path,
                                                       opts: str) -> None:
    """Small objects are written into a temp file created with their mode: a umask that
    takes bits away still leaves the object's mode (then set with fchmod)."""
    s3.put_object(Bucket=bucket, Key="um/a", Body=b"a" * 10)  # file_mode: 0644
    s3.put_object(Bucket=bucket, Key="um/b", Body=b"b" * 10,
                  Metadata={"mode": str(0o100750), "mtime": "1600000001"})
    s3.put_object(Bucket=bucket, Key="um/c", Body=b"")
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            dest = tmp_path / f"u{umask:o}"
            rc, s, err = cp(f"s3://{bucket}/um", str(dest), "-o", opts, "--verify")
        finally:
            os.umask(old)
        assert rc == 0 and s["copied"] == 3, err
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()}
        assert modes == {"a": 0o644, "b": 0o750, "c": 0o644}, umask
        assert (dest / "b").stat().st_mtime == 1600000001
        assert os.getxattr(dest / "a", "user.caiosfs.etag").decode().strip('"') == \
            s3.head_object(Bucket=bucket, Key="um/a")["ETag"].strip('"')
