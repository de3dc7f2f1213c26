"""The SeaweedFS harness itself: loopback only, auth enforced, the S3 features caiosfs relies on."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from caiosfs.demo import random_bytes as data
from caiosfs.demo import seed_demo
from caiosfs.demo import xxh3_hex as xxh
from caiosfs.seaweed import (
    REGION,
    SeaweedServer,
    find_weed,
    make_client,
)

MiB = 1 << 20


# ---- helpers -------------------------------------------------------------------------------------


def _group_pids(pgid: int) -> list[int]:
    """All live processes in a process group (field 5 of /proc/PID/stat)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _addr(hex_addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode an address from /proc/net/{tcp,udp}[6]: host-order 32-bit words, hex port."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _sockets_of(pgid: int) -> list[dict[str, Any]]:
    """Every TCP/UDP socket held by the process group, decoded from /proc/net."""
    inodes = _socket_inodes(_group_pids(pgid))
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                local, lport = _addr(f[1])
                remote, rport = _addr(f[2])
                out.append(
                    {
                        "proto": proto,
                        "local": local,
                        "lport": lport,
                        "remote": remote,
                        "rport": rport,
                        "listen": proto.startswith("tcp") and f[3] == "0A",
                    }
                )
    return out


def _error_code(fn: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as ei:
        fn(**kwargs)
    return str(ei.value.response["Error"]["Code"])


# ---- the server ----------------------------------------------------------------------------------


def test_find_weed() -> None:
    weed = find_weed()
    assert os.access(weed, os.X_OK)
    out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30, check=False)
    assert "4." in out.stdout


def test_listens_on_loopback_only(seaweed: SeaweedServer) -> None:
    assert seaweed.proc is not None
    socks = _sockets_of(seaweed.proc.pid)
    listeners = [s for s in socks if s["listen"]]
    assert listeners, "found no listening sockets of the weed process group"
    bad = [s for s in listeners if not _is_loopback(s["local"])]
    assert not bad, f"listening off loopback: {bad}"
    # Exactly the ports we handed out: no default-on extra listener (iceberg, lance, ...).
    assert {s["lport"] for s in listeners} == set(seaweed.ports.values())
    assert all(s["proto"] == "tcp" for s in listeners)
    # Nothing bound or connected anywhere else either (telemetry is switched off).
    for s in socks:
        assert _is_loopback(s["local"]) or s["local"].is_unspecified, s
        assert _is_loopback(s["remote"]) or s["remote"].is_unspecified, s


def test_wrong_credentials_are_refused(seaweed: SeaweedServer, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="secret.txt", Body=b"for the right identity only")
    assert seaweed.access_key is not None
    bad_secret = make_client(seaweed.endpoint, seaweed.access_key, "not-the-secret", max_attempts=1)
    bad_key = make_client(seaweed.endpoint, "nobody", seaweed.secret_key or "", max_attempts=1)
    anonymous = boto3.session.Session().client(
        "s3",
        endpoint_url=seaweed.endpoint,
        region_name=REGION,
        config=Config(
            signature_version=botocore.UNSIGNED,
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
        ),
    )
    for client, expected in (
        (bad_secret, {"SignatureDoesNotMatch"}),
        (bad_key, {"InvalidAccessKeyId"}),
        (anonymous, {"AccessDenied"}),
    ):
        assert _error_code(client.get_object, Bucket=bucket, Key="secret.txt") in expected
        assert _error_code(client.list_objects_v2, Bucket=bucket) in expected
        code = _error_code(client.put_object, Bucket=bucket, Key="intruder", Body=b"x")
        assert code in expected
    assert "Contents" in s3.list_objects_v2(Bucket=bucket)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["secret.txt"]


def test_two_servers_side_by_side(seaweed: SeaweedServer, s3: Any, tmp_path: Path) -> None:
    """A second server (anonymous mode) gets its own ports and data; stop() leaves nothing."""
    second = SeaweedServer(tmp_path / "second")
    with second:
        assert second.proc is not None
        pgid = second.proc.pid
        assert not set(second.ports.values()) & set(seaweed.ports.values())
        assert len(set(second.ports.values())) == 8
        name = second.create_bucket("only-on-second")
        second.client().put_object(Bucket=name, Key="k", Body=b"v")
        # Again, as `tests/seaweed_server.py --bucket` on a reused --data-dir does: a no-op.
        assert second.create_bucket("only-on-second") == name
        assert second.client().get_object(Bucket=name, Key="k")["Body"].read() == b"v"
        assert name not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        grpc_sockets = [
            Path(f"/tmp/seaweedfs-{kind}-grpc-{second.ports[kind + '_grpc']}.sock")
            for kind in ("master", "volume", "filer", "s3")
        ]
    assert not second.running
    assert _group_pids(pgid) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not [p for p in grpc_sockets if p.exists()]
    # The session server did not notice.
    s3.list_buckets()


# ---- S3 features caiosfs relies on ---------------------------------------------------------------


def test_upload_part_copy_and_list_multipart_uploads(s3: Any, bucket: str) -> None:
    src = data(12 * MiB, "src")
    s3.put_object(Bucket=bucket, Key="src", Body=src)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="dst")["UploadId"]
    copy = {"Bucket": bucket, "Key": "src"}
    p1 = s3.upload_part_copy(
        Bucket=bucket, Key="dst", UploadId=upload, PartNumber=1,
        CopySource=copy, CopySourceRange=f"bytes=0-{5 * MiB - 1}",
    )  # fmt: skip
    middle = data(5 * MiB, "middle")
    p2 = s3.upload_part(Bucket=bucket, Key="dst", UploadId=upload, PartNumber=2, Body=middle)
    p3 = s3.upload_part_copy(
        Bucket=bucket, Key="dst", UploadId=upload, PartNumber=3,
        CopySource=copy, CopySourceRange=f"bytes={10 * MiB}-{12 * MiB - 1}",
    )  # fmt: skip

    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("dst", upload)]

    s3.complete_multipart_upload(
        Bucket=bucket, Key="dst", UploadId=upload,
        MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]},
            {"PartNumber": 2, "ETag": p2["ETag"]},
            {"PartNumber": 3, "ETag": p3["CopyPartResult"]["ETag"]},
        ]},
    )  # fmt: skip
    got = s3.get_object(Bucket=bucket, Key="dst")["Body"].read()
    assert xxh(got) == xxh(src[: 5 * MiB] + middle + src[10 * MiB :])
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # An aborted upload disappears from the listing too.
    other = s3.create_multipart_upload(Bucket=bucket, Key="other")["UploadId"]
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [other]
    s3.abort_multipart_upload(Bucket=bucket, Key="other", UploadId=other)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_copy_object_replaces_metadata_in_place(s3: Any, bucket: str) -> None:
    """What chmod/touch through an s3fs-style mount does: copy onto itself with new metadata."""
    s3.put_object(Bucket=bucket, Key="f", Body=b"hello", Metadata={"mode": "33188", "mtime": "1"})
    s3.copy_object(
        Bucket=bucket, Key="f", CopySource={"Bucket": bucket, "Key": "f"},
        MetadataDirective="REPLACE", Metadata={"mode": "33261", "mtime": "2"},
    )  # fmt: skip
    head = s3.head_object(Bucket=bucket, Key="f")
    assert head["Metadata"] == {"mode": "33261", "mtime": "2"}
    assert s3.get_object(Bucket=bucket, Key="f")["Body"].read() == b"hello"


def test_conditional_put(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="c", Body=b"1", IfNoneMatch="*")
    assert _error_code(s3.put_object, Bucket=bucket, Key="c", Body=b"2", IfNoneMatch="*") == (
        "PreconditionFailed"
    )
    etag = s3.head_object(Bucket=bucket, Key="c")["ETag"]
    s3.put_object(Bucket=bucket, Key="c", Body=b"3", IfMatch=etag)
    # The ETag we read is stale now: a second writer with it must lose.
    assert _error_code(s3.put_object, Bucket=bucket, Key="c", Body=b"4", IfMatch=etag) == (
        "PreconditionFailed"
    )
    assert s3.get_object(Bucket=bucket, Key="c")["Body"].read() == b"3"

    # Multipart completion honours If-None-Match too.
    upload = s3.create_multipart_upload(Bucket=bucket, Key="c")["UploadId"]
    part = s3.upload_part(Bucket=bucket, Key="c", UploadId=upload, PartNumber=1, Body=b"zz")
    code = _error_code(
        s3.complete_multipart_upload, Bucket=bucket, Key="c", UploadId=upload, IfNoneMatch="*",
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    assert code == "PreconditionFailed"
    s3.abort_multipart_upload(Bucket=bucket, Key="c", UploadId=upload)
    assert s3.get_object(Bucket=bucket, Key="c")["Body"].read() == b"3"


# ---- demo content and fixtures -------------------------------------------------------------------


def test_seed_demo(s3: Any, bucket: str) -> None:
    hashes = seed_demo(s3, bucket, big_size=40 * MiB + 123)
    listed = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert set(listed) == set(hashes)
    assert {"README.txt", "models/llama-tiny/weights.bin"} <= set(hashes)
    assert any(k.startswith("data/") for k in hashes)
    big = listed["models/llama-tiny/weights.bin"]
    assert big["Size"] == 40 * MiB + 123
    assert big["ETag"].strip('"').endswith("-3")  # went up as a 3-part multipart upload
    for key, digest in hashes.items():
        assert xxh(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) == digest, key
    assert hashes["models/llama-tiny/weights.bin"] == xxh(data(40 * MiB + 123, "weights"))


def test_data_is_deterministic() -> None:
    assert data(3 * MiB + 5, 7) == data(3 * MiB + 5, 7)
    assert data(1000, 7) == data(2 * MiB, 7)[:1000]
    assert data(1000, 7) != data(1000, 8)
    a = data(2 * MiB, 1)
    assert a[:MiB] != a[MiB:]  # each MiB differs: a read from the wrong offset shows


def test_subprocess_credentials(
    seaweed: SeaweedServer, bucket: str, s3_env: dict[str, str], creds_file: Path, tmp_path: Path
) -> None:
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    script = (
        "import sys, boto3\n"
        "from botocore.config import Config\n"
        "c = boto3.client('s3', endpoint_url=sys.argv[1],"
        " config=Config(s3={'addressing_style': 'path'}))\n"
        "print(c.get_bucket_location(Bucket=sys.argv[2]) and 'ok')\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    via_env = {**clean, **s3_env}
    via_file = {
        **clean,
        "AWS_SHARED_CREDENTIALS_FILE": str(creds_file),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for env in (via_env, via_file):
        out = subprocess.run(
            [sys.executable, "-c", script, seaweed.endpoint, bucket],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"
