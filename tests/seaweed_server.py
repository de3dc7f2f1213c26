"""A SeaweedFS S3 server in the foreground, for poking at caiosfs by hand.

    .venv/bin/python tests/seaweed_server.py --data-dir /tmp/sw --bucket b

prints the endpoint and the credentials as ``export`` lines and runs until Ctrl-C. The
server itself is caiosfs.seaweed (the demo's); this command is for development only, so it
lives beside the tests rather than in the package.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import sys
import tempfile
import threading

from caiosfs.demo import seed_demo
from caiosfs.seaweed import SeaweedServer

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    """Run a SeaweedFS S3 server in the foreground until Ctrl-C."""
    ap = argparse.ArgumentParser(
        prog="tests/seaweed_server.py",
        description="Run a local SeaweedFS S3 server on 127.0.0.1 for caiosfs development.",
    )
    ap.add_argument("--data-dir", help="where weed keeps its data (default: a temp dir, removed)")
    ap.add_argument("--access-key", default="caiosfs", help="S3 access key (default: caiosfs)")
    ap.add_argument("--secret-key", help="S3 secret key (default: random)")
    ap.add_argument("--no-auth", action="store_true", help="accept anonymous requests")
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket")
    ap.add_argument(
        "--seed-demo", metavar="BUCKET", help="create BUCKET and upload the demo tree into it"
    )
    ap.add_argument("--big-size-mb", type=int, default=300, help="size of the demo's big file")
    args = ap.parse_args(argv)

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="caiosfs-seaweed-")
        data_dir = tmp
    if args.no_auth:
        ak = sk = None
    else:
        ak, sk = args.access_key, args.secret_key or secrets.token_urlsafe(24)
    server = SeaweedServer(data_dir, ak, sk)
    stop = threading.Event()
    try:
        server.start()  # Ctrl-C here raises KeyboardInterrupt; the finally clause cleans up
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"SeaweedFS S3 ready in {server.startup_seconds:.1f} s (log: {server.log_path})")
        print(f"endpoint: {server.endpoint}")
        for k, v in server.env().items():
            print(f"export {k}={v}")
        for b in args.bucket:
            server.create_bucket(b)
            print(f"bucket s3://{b} ready")
        if args.seed_demo:
            server.create_bucket(args.seed_demo)
            keys = seed_demo(server.client(), args.seed_demo, args.big_size_mb * MiB)
            print(f"seeded s3://{args.seed_demo}: {len(keys)} objects")
        print("Ctrl-C stops the server.", flush=True)
        while not stop.is_set() and server.running:
            stop.wait(0.5)
        if not server.running and not stop.is_set():
            print(f"weed exited unexpectedly; see {server.log_path}", file=sys.stderr)
            return 1
        return 0
    finally:
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
