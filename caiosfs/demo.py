"""``caiosfs demo``: the whole thing on one machine, with nothing to configure.

Starts SeaweedFS on 127.0.0.1, seeds a bucket (small files and one big file), mounts it
with caiosfs, and prints what to try. ``--check`` reads everything back, compares hashes,
writes a file and checks it reached the store, then tears everything down.

The bucket's content is deterministic (:func:`random_bytes`): the tests use the same
generator, so any object's bytes can be made again to compare with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import xxhash
from boto3.s3.transfer import TransferConfig

from .errors import UserError
from .seaweed import S3Client, SeaweedError, SeaweedServer

BUCKET = "caiosfs-demo"
MiB = 1 << 20


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caiosfs.cli", *args], env=env, text=True,
                          capture_output=True, check=False)


def demo(a: argparse.Namespace) -> int:
    base = Path(a.dir).absolute()
    mnt, cache = base / "mnt", base / "cache"
    if mnt.exists() and os.path.ismount(mnt):
        raise UserError(f"{mnt} is already mounted (another demo running?); "
                        f"'caiosfs umount {mnt}' first")
    mnt.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(16)
    creds = base / "credentials"
    creds.touch(mode=0o600)
    creds.write_text(f"[default]\naws_access_key_id = caiosfs-demo\n"
                     f"aws_secret_access_key = {secret}\n")

    def say(m: str) -> None:
        print(f"caiosfs demo: {m}", file=sys.stderr, flush=True)
    say(f"starting SeaweedFS on 127.0.0.1 (data in {base / 'seaweed'})")
    try:
        server = SeaweedServer(base / "seaweed", access_key="caiosfs-demo",
                               secret_key=secret).start()
    except SeaweedError as exc:
        raise UserError(f"could not start SeaweedFS: {exc}") from None
    try:
        client = server.client()
        server.create_bucket(BUCKET)
        say(f"seeding s3://{BUCKET} (one {a.big_mb} MB file and a few small ones)")
        hashes = seed_demo(client, BUCKET, big_size=a.big_mb << 20)
        opts = (f"endpoint={server.endpoint},path_style,credentials_file={creds},"
                f"cache_dir={cache}")
        r = _cli("mount", f"s3://{BUCKET}", str(mnt), "-o", opts)
        if r.returncode != 0:
            raise UserError(r.stderr.strip().removeprefix("caiosfs: "))
        say(f"mounted s3://{BUCKET} on {mnt}")
        if a.check:
            return _check(mnt, hashes, client, say)
        print(f"""
caiosfs demo is running: s3://{BUCKET} on {server.endpoint} is mounted on {mnt}

Try, in another shell:
  ls -lR {mnt}
  time cat {mnt}/models/llama-tiny/weights.bin > /dev/null     # cold: from the store
  time cat {mnt}/models/llama-tiny/weights.bin > /dev/null     # warm: page cache
  echo hello > {mnt}/hello.txt && {sys.argv[0]} flush {mnt}
  {sys.argv[0]} status {mnt}
Credentials for other S3 tools are in {creds} (endpoint {server.endpoint}, path style).

Press Ctrl-C to unmount (after uploading what you wrote) and stop the server.
""", flush=True)
        stop = False

        def handler(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        while not stop and os.path.ismount(mnt):
            time.sleep(0.5)
        return 0
    finally:
        if os.path.ismount(mnt):
            say("unmounting (uploads first)")
            r = _cli("umount", str(mnt))
            if r.returncode != 0:
                say(r.stderr.strip())
        say("stopping SeaweedFS")
        server.stop()


def _check(mnt: Path, hashes: dict[str, str], client: object, say: object) -> int:
    bad = []
    for key, digest in sorted(hashes.items()):
        h = xxhash.xxh3_64()
        with open(mnt / key, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            bad.append(key)
    (mnt / "written-by-demo.txt").write_text("hello from caiosfs\n")
    r = _cli("flush", str(mnt), "-q")
    body = client.get_object(Bucket=BUCKET, Key="written-by-demo.txt")["Body"].read()  # type: ignore[attr-defined]
    ok = not bad and r.returncode == 0 and body == b"hello from caiosfs\n"
    print(f"caiosfs demo: read {len(hashes)} files back through the mount: "
          f"{len(hashes) - len(bad)} match the store; a written file reached the store: "
          f"{body == b'hello from caiosfs' + bytes([10])}", flush=True)
    return 0 if ok else 1


def random_bytes(size: int, seed: int | str = 0) -> bytes:
    """Deterministic pseudo-random bytes: SHAKE-128 of (seed, MiB index), ~300 MB/s.

    Each MiB is generated independently, so two offsets never hold the same bytes by accident
    (a read from the wrong offset is caught) and a slice can be regenerated alone.
    """
    out = bytearray()
    for i in range(0, size, MiB):
        out += _chunk(seed, i // MiB, min(MiB, size - i))
    return bytes(out)


def _chunk(seed: int | str, index: int, n: int) -> bytes:
    return hashlib.shake_128(f"caiosfs:{seed}:{index}".encode()).digest(n)


class _Body:
    """``random_bytes(size, seed)`` as a file object for boto3's managed upload.

    Made 1 MiB at a time as boto3 reads it (a 300 MB body never sits in memory whole) and
    hashed on the way; it has no ``seek``, so boto3 reads it once, in order.
    """

    def __init__(self, size: int, seed: int | str) -> None:
        self.size = size
        self.sent = 0
        self.hasher = xxhash.xxh3_64()
        self._pieces = (_chunk(seed, i, min(MiB, size - i * MiB)) for i in range(-(-size // MiB)))
        self._left = b""

    def read(self, n: int = -1) -> bytes:
        want = self.size - self.sent if n is None or n < 0 else n
        got: list[bytes] = []
        while want > 0:
            if not self._left:
                self._left = next(self._pieces, b"")
                if not self._left:
                    break
            got.append(self._left[:want])
            want -= len(got[-1])
            self._left = self._left[len(got[-1]):]
        out = b"".join(got)
        self.hasher.update(out)
        self.sent += len(out)
        return out


def xxh3_hex(data: bytes | bytearray | memoryview) -> str:
    """xxh3_64 hex digest, the checksum caiosfs uses (the demo's and the tests')."""
    return xxhash.xxh3_64(data).hexdigest()


def seed_demo(
    client: S3Client, bucket: str, big_size: int = 300 * MiB, prefix: str = ""
) -> dict[str, str]:
    """Upload a small demo tree plus one big file; return {key: xxh3_64 hexdigest}.

    The big file (``models/llama-tiny/weights.bin``) goes through boto3's managed multipart
    transfer, made as it is read (:class:`_Body`).
    """
    small: dict[str, bytes] = {
        "README.txt": (
            b"caiosfs demo bucket\n\n"
            b"data/    a toy dataset: shards and a label file\n"
            b"models/  a toy model: config and one big weights file\n"
        ),
        "data/labels.csv": b"id,label\n" + b"".join(b"%d,%d\n" % (i, i % 10) for i in range(1000)),
        "data/train/shard-00000.bin": random_bytes(256 * 1024, "shard-0"),
        "data/train/shard-00001.bin": random_bytes(300 * 1024 + 7, "shard-1"),
        "data/val/shard-00000.bin": random_bytes(64 * 1024, "val-0"),
        "models/llama-tiny/config.json": json.dumps(
            {"hidden_size": 64, "layers": 2, "vocab": 32000}, indent=2
        ).encode(),
    }
    out: dict[str, str] = {}
    for key, body in small.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)
        out[prefix + key] = xxh3_hex(body)
    big_key = prefix + "models/llama-tiny/weights.bin"
    big = _Body(big_size, "weights")
    client.upload_fileobj(
        big,
        bucket,
        big_key,
        Config=TransferConfig(
            multipart_threshold=16 * MiB,
            multipart_chunksize=16 * MiB,
            max_concurrency=4,
        ),
    )
    if big.sent != big_size:
        raise SeaweedError(f"uploaded {big.sent} of {big_size} bytes for {big_key}")
    out[big_key] = big.hasher.hexdigest()
    return out
