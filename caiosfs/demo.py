"""``caiosfs demo``: the whole thing on one machine, with nothing to configure.

Starts SeaweedFS on 127.0.0.1, seeds a bucket (small files and one big file), mounts it
with caiosfs, and prints what to try. ``--check`` reads everything back, compares hashes,
writes a file and checks it reached the store, then tears everything down.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import xxhash

from .errors import UserError

BUCKET = "caiosfs-demo"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caiosfs.cli", *args], env=env, text=True,
                          capture_output=True, check=False)


def demo(a: argparse.Namespace) -> int:
    from .seaweed import SeaweedError, SeaweedServer, seed_demo
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
