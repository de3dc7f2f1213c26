"""Developer-tree measurements (issue #17).

``python -m bench.devtree lsl [--objects 10000] [--tagged 0.1] [--wan 20ms,50MB/s]``
    what reading metadata after a listing costs: a cold ``ls -l`` of a directory of
    ``--objects`` objects, of which a fraction carries the tag (a one-part multipart upload
    with a 0755 mode, as caiosfs writes a script), on fresh caiosfs mounts with
    ``metadata=list`` (no HEAD), ``tagged`` (the default: HEAD of tagged objects only) and
    ``head`` (HEAD of every object), interleaved, medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CAIOSFS = str(REPO / ".venv" / "bin" / "caiosfs")


def _seed_dir(s3: Any, bucket: str, prefix: str, n: int, tagged: float) -> int:
    """n small objects under prefix; every round(1/tagged)-th one tagged. Returns how many
    are tagged."""
    step = round(1 / tagged) if tagged > 0 else 0

    def one(i: int) -> bool:
        key = f"{prefix}f{i:06d}"
        body = b"#!/bin/sh\n" + str(i).encode()
        if step and i % step == 0:
            meta = {"mode": str(0o100755), "uid": "0", "gid": "0", "mtime": "1700000000"}
            up = s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta)
            etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                  PartNumber=1, Body=body)["ETag"]
            s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": [
                                             {"PartNumber": 1, "ETag": etag}]})
            return True
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        return False
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        return sum(ex.map(one, range(n)))


def _start_wan(endpoint: str, spec: str, work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "wan.port"
    target = endpoint.split("//", 1)[1]
    p = subprocess.Popen([sys.executable, "-m", "bench.wanproxy", "--target", target,
                          "--spec", spec, "--port-file", str(port_file)], cwd=REPO)
    for _ in range(100):
        if port_file.exists() and port_file.read_text().strip():
            return p, f"http://127.0.0.1:{port_file.read_text().strip()}"
        time.sleep(0.1)
    p.kill()
    raise RuntimeError("the WAN proxy did not start")


def lsl(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from caiosfs.seaweed import SeaweedServer
    work = Path(tempfile.mkdtemp(prefix="devtree-lsl-", dir="/var/tmp"))
    server = SeaweedServer(work / "weed", access_key="bench", secret_key=secrets.token_hex(16))
    server.start()
    wan = None
    try:
        s3 = server.client()
        bucket = server.create_bucket("lsl")
        t0 = time.monotonic()
        ntag = _seed_dir(s3, bucket, "d/", args.objects, args.tagged)
        print(f"seeded {args.objects} objects ({ntag} tagged) in {time.monotonic() - t0:.1f}s",
              flush=True)
        endpoint = server.endpoint
        if args.wan:
            wan, endpoint = _start_wan(server.endpoint, args.wan, work)
        env = {**os.environ, **server.env()}
        env.pop("AWS_ENDPOINT_URL", None)
        times: dict[str, list[float]] = {m: [] for m in args.modes.split(",")}
        heads: dict[str, list[int]] = {m: [] for m in times}
        for rep in range(args.reps):
            for mode in list(times):
                mnt, cache = work / f"mnt-{mode}-{rep}", work / f"cache-{mode}-{rep}"
                mnt.mkdir()
                opts = f"endpoint={endpoint},path_style,cache_dir={cache},metadata={mode}"
                subprocess.run([CAIOSFS, "mount", f"s3://{bucket}", str(mnt), "-o", opts],
                               env=env, check=True)
                try:
                    t0 = time.monotonic()
                    out = subprocess.run(["ls", "-l", str(mnt / "d")], capture_output=True,
                                         text=True, check=True).stdout
                    dt = time.monotonic() - t0
                    n = sum(1 for ln in out.splitlines() if ln.startswith(("-", "l")))
                    x = sum(1 for ln in out.splitlines() if ln.startswith("-rwxr-xr-x"))
                    st = subprocess.run([CAIOSFS, "status", str(mnt), "--json"], env=env,
                                        capture_output=True, text=True, check=True).stdout
                    import json
                    counts = json.loads(st)
                finally:
                    subprocess.run([CAIOSFS, "umount", str(mnt), "-q"], env=env, check=False)
                if n != args.objects:
                    raise RuntimeError(f"ls -l listed {n} of {args.objects}")
                times[mode].append(dt)
                heads[mode].append(counts["s3_requests"])
                print(f"rep {rep} metadata={mode}: {dt:.2f}s, {x} shown 0755, "
                      f"{counts['s3_requests']} requests", flush=True)
        print(f"\ncold ls -l of {args.objects} objects ({ntag} tagged)"
              f"{' behind ' + args.wan if args.wan else ' on loopback'}, "
              f"median of {args.reps}:")
        for mode, ts in times.items():
            print(f"  metadata={mode:6s} {statistics.median(ts):6.2f} s  "
                  f"({args.objects / statistics.median(ts):,.0f} entries/s, "
                  f"{statistics.median(heads[mode]):.0f} requests)")
        return 0
    finally:
        if wan is not None:
            wan.terminate()
            wan.wait(10)
        server.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.devtree")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("lsl", help="cost of metadata after a listing (cold ls -l)")
    p.add_argument("--objects", type=int, default=10_000)
    p.add_argument("--tagged", type=float, default=0.1, help="fraction of tagged objects")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="list,tagged,head")
    p.add_argument("--wan", default="", help="e.g. 20ms,50MB/s")
    args = ap.parse_args(argv)
    return lsl(args)


if __name__ == "__main__":
    sys.exit(main())
