"""Developer-tree measurements (issue #17).

``python -m bench.devtree probe [--dirs 10 --files 100] [--binaries new=...,old=...]``
    round trips of name lookups on a cold mount: ``lstat`` of every file by name (what git
    status does first), ``cp -r`` over the existing tree, and ``rm -rf`` of it until gone
    from the store, with request counts by type.

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


# ---- bench/run workloads (registered in bench/workloads.py) ---------------------------------
#
# Every step runs on each FUSE system and, in the boto3 column, on a local directory of the
# bench's workdir (the floor: local ext4 or whatever /var/tmp is): a dev box has no "raw
# boto3" way to run git. Rates are files of the tree per second (higher is better).


LOCAL_NOTE = "boto3 column: the same steps on a local directory of the bench workdir"


def _sh(argv: list[str], cwd: Path | None, timeout: float, m: Any = None,
        env: dict[str, str] | None = None) -> float:
    from bench import procs
    res = procs.run_bounded(argv, timeout, cwd=cwd, env=env, stdout_to_devnull=True,
                            on_timeout=m.abort if m is not None else None)
    return res.seconds


GIT = ["git", "-c", "safe.directory=*", "-c", "user.name=bench",
       "-c", "user.email=bench@example.invalid", "-c", "gc.auto=0"]


def _origin(ctx: Any) -> tuple[Path, int]:
    """A local repository with history (made once per run): ``tree_files`` source files in
    10 directories, a commit per 5 files changed, and a branch ``other`` that differs in a
    tenth of them. Returns it and its number of files."""
    import random
    root = ctx.workdir / "devtree-origin"
    nfiles = max(50, ctx.scale.tree_files)
    if (root / ".git" / "refs" / "heads" / "other").exists():
        return root, nfiles
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(17)
    env = {**os.environ, "GIT_COMMITTER_DATE": "1700000000 +0000",
           "GIT_AUTHOR_DATE": "1700000000 +0000"}

    def g(*a: str) -> None:
        subprocess.run([*GIT, *a], cwd=root, env=env, check=True, capture_output=True)

    def text(n: int) -> str:
        return "".join(f"value_{rnd.randrange(10**6)} = {rnd.randrange(10**9)}\n"
                       for _ in range(n))
    g("init", "-q", "-b", "main")
    files = [f"pkg{i % 10}/mod{i}.py" for i in range(nfiles)]
    for f in files:
        (root / f).parent.mkdir(exist_ok=True)
        (root / f).write_text(text(rnd.randrange(5, 60)))
    g("add", "-A")
    g("commit", "-q", "-m", "initial")
    for c in range(max(20, nfiles // 5)):
        for f in rnd.sample(files, 3):
            with open(root / f, "a") as fh:
                fh.write(text(2))
        g("commit", "-q", "-am", f"change {c}")
    g("checkout", "-q", "-b", "other")
    for f in rnd.sample(files, nfiles // 10):
        (root / f).write_text(text(10))
    g("commit", "-q", "-am", "other")
    g("checkout", "-q", "main")
    return root, nfiles


def _settle_index(ctx: Any, clone: Path, m: Any) -> None:
    """Leave the clone's index with no entry racily clean (untimed, before the cold steps).

    git trusts an index entry whose stat data matches the file, unless the file's mtime is
    not older than the index's (same second): then ``git status`` reads the file to compare
    contents. A clone writes its files and then its index within about a second, so a part
    of the tree, from nothing to all of it as the clone falls against a second boundary, is
    racily clean: cold ``git status`` read those files from the store, and ``tar c`` then
    read only the others (the rest were in the page cache). That split, random per
    repetition, decided both steps' times: issue #19's "tar c 0.21x" of the new build
    (in run-20261207-001322, one build's tar c took 0.21 s after a git status that had
    sent 508 GETs, 4.06 s after one that had sent 152). A refresh once the clock has
    passed the next second rewrites the index with every entry older than it, as any
    clone looks a second later: git status then reads no file and tar c reads every file
    from the store, on every system and repetition."""
    time.sleep(1.05 - time.time() % 1)
    _sh([*GIT, "update-index", "-q", "--refresh"], clone, ctx.scale.op_timeout, m)


def _wait_same(ctx: Any, rel_key: str, local: Path, timeout: float) -> None:
    """Until the store holds ``local``'s bytes under ``rel_key``."""
    import xxhash
    from botocore.exceptions import ClientError

    from bench.procs import BenchError
    want = xxhash.xxh3_64(local.read_bytes()).hexdigest()
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = ctx.store.object_digest(rel_key)
        except ClientError:  # (not there: a rename is a copy and a delete)
            got = None
        if got == want:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{rel_key}: not the local bytes in the store {timeout:.0f} s on")
        time.sleep(0.1)


def _gets(s: Any, m: Any, what: str = "s3_get_requests") -> int | None:
    """GETs (or ``what``: all requests) the mount's daemon has sent so far, if it says
    (caiosfs status)."""
    v = (s.counters(m) or {}).get(what)
    return int(v) if isinstance(v, (int, float)) else None


def _git_steps(ctx: Any, clone: Path, m: Any, timing: dict[str, float],
               status: bool = True) -> None:
    t = ctx.scale.op_timeout
    if status:
        timing["status"] = _sh([*GIT, "status", "--porcelain"], clone, t, m)
    timing["log_p"] = _sh([*GIT, "log", "-p", "-20"], clone, t, m)
    timing["checkout"] = _sh([*GIT, "checkout", "-q", "other"], clone, t, m)
    timing["diff"] = _sh([*GIT, "diff", "main"], clone, t, m)
    # (GNU tar reads nothing when it writes to /dev/null itself.)
    timing["tar"] = _sh(["sh", "-c", "tar cf - . | cat >/dev/null"], clone, t, m)


def _samples(timing: dict[str, float], n: int) -> list[Any]:
    from bench.workloads import Sample, _per_s
    return [Sample(k, "files/s", _per_s(n, v), v) for k, v in timing.items()]


def _walk_sizes(root: Path, rel: str) -> dict[str, int]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[f"{rel}/{p.relative_to(root)}"] = p.stat().st_size
    return out


# How long the objects left after ``rm -rf`` may stay without one of them going before the
# measurement fails. rclone keeps a few for good (a file uploaded after its delete, by its
# write-back); waiting for them the whole minute cost every run of dev_git a minute.
GONE_STALL = 10.0


def _wait_gone(ctx: Any, rel: str, timeout: float) -> float:
    """When nothing is left under ``rel`` in the store; fails after ``timeout``, or when the
    objects left stop going for GONE_STALL seconds."""
    from bench.procs import BenchError
    deadline = time.monotonic() + timeout
    fewest, since = None, time.monotonic()
    while left := ctx.store.list_sizes(rel + "/"):
        now = time.monotonic()
        if fewest is None or len(left) < fewest:
            fewest, since = len(left), now
        if now > deadline or now - since > GONE_STALL:
            raise BenchError(f"{rel}: {len(left)} objects still in the store after rm -rf, "
                             f"none gone in the last {now - since:.0f} s, e.g. {min(left)}")
        time.sleep(0.1)
    return time.monotonic()


def dev_git_fs(ctx: Any, s: Any) -> Any:
    """git clone into the mount (its index then settled, untimed: :func:`_settle_index`);
    after a remount with empty caches: git status, log -p -20, checkout of another branch,
    diff, tar c of the tree, rm -rf until gone from the store."""
    from bench.workloads import _finish, _out_dir
    origin, n = _origin(ctx)
    d = _out_dir(ctx, s.name, "git")
    timing: dict[str, float] = {}
    try:
        with s.mounted(cold=True, profile="devbox") as m:
            m.path(d).parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            _sh([*GIT, "clone", "-q", "--no-local", str(origin), str(m.path(d))], None,
                ctx.scale.op_timeout, m)
            expected = _walk_sizes(m.path(d), d)
            timing["clone"] = s.wait_durable(m, ctx.store, d + "/", expected,
                                             ctx.scale.durable_timeout) - t0
            _settle_index(ctx, m.path(d), m)
            _wait_same(ctx, d + "/.git/index", m.path(d) / ".git" / "index",
                       ctx.scale.durable_timeout)
        with s.mounted(cold=True, profile="devbox") as m:
            # GETs of git status against the later steps' (tar's, nearly all): git status
            # reads only the files its index calls racily clean (written in the second the
            # index was, so it depends on where the clone fell against a second boundary),
            # and tar reads the rest from the store; that split, not the mount, can decide
            # both steps' times. (Counted around git status only: `caiosfs status` takes
            # ~0.3-1.5 s, and the steps after checkout run while its uploads are due.)
            g0, r0 = _gets(s, m), _gets(s, m, "s3_requests")
            timing["status"] = _sh([*GIT, "status", "--porcelain"], m.path(d),
                                   ctx.scale.op_timeout, m)
            g1, r1 = _gets(s, m), _gets(s, m, "s3_requests")
            _git_steps(ctx, m.path(d), m, timing, status=False)
            t0 = time.monotonic()
            _sh(["rm", "-rf", str(m.path(d))], None, ctx.scale.op_timeout, m)
            # (rclone leaves a few objects for good: do not wait the whole durable_timeout)
            timing["rm"] = _wait_gone(ctx, d, min(60.0, ctx.scale.durable_timeout)) - t0
            g2 = _gets(s, m)
            if g0 is not None and g1 is not None and g2 is not None:
                m.notes.append(f"GETs: git status {g1 - g0}, the later steps (log -p, "
                               f"checkout, diff, tar c, rm) {g2 - g1}")
            if r0 is not None and r1 is not None:
                m.notes.append(f"requests (all kinds): git status {r1 - r0}")
    finally:
        ctx.store.delete_prefix(d + "/")
    return _finish(_samples(timing, n), m)


def dev_git_local(ctx: Any) -> Any:
    """The same steps on a local directory (page cache dropped before the cold steps)."""
    import shutil

    from bench import procs
    from bench.workloads import Outcome
    origin, n = _origin(ctx)
    d = ctx.workdir / "devtree-local-git"
    shutil.rmtree(d, ignore_errors=True)
    timing: dict[str, float] = {}
    timing["clone"] = _sh([*GIT, "clone", "-q", "--no-local", str(origin), str(d)], None,
                          ctx.scale.op_timeout)
    _settle_index(ctx, d, None)
    procs.drop_caches()
    _git_steps(ctx, d, None, timing)
    timing["rm"] = _sh(["rm", "-rf", str(d)], None, ctx.scale.op_timeout)
    return Outcome(_samples(timing, n), None, [LOCAL_NOTE])


def _wheels(ctx: Any) -> tuple[Path, list[str], int]:
    """Five pure-Python wheels written by hand (no network, no build backend), with
    ``tree_files`` modules in all; made once per run."""
    import base64
    import hashlib
    import zipfile
    out = ctx.workdir / "devtree-wheels"
    names = [f"devpkg{i}" for i in range(5)]
    per = max(10, ctx.scale.tree_files // 5)
    if out.exists():
        return out, names, per * 5
    out.mkdir(parents=True)
    for name in names:
        dist = f"{name}-1.0.dist-info"
        files = {f"{name}/m{i}.py": (f"def f{i}(x):\n    return x + {i}\n" * 20).encode()
                 for i in range(per)}
        files[f"{name}/__init__.py"] = "".join(
            f"from . import m{i}\n" for i in range(per)).encode()
        files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
        files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: bench\n"
                                  b"Root-Is-Purelib: true\nTag: py3-none-any\n")
        rec = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
               for p, b in files.items()] + [f"{dist}/RECORD,,"]
        files[f"{dist}/RECORD"] = ("\n".join(rec) + "\n").encode()
        with zipfile.ZipFile(out / f"{name}-1.0-py3-none-any.whl", "w") as z:
            for p, b in files.items():
                z.writestr(p, b)
    return out, names, per * 5


def _pip(ctx: Any, wheels: Path, names: list[str], site: Path, m: Any) -> float:
    return _sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-compile",
                "--disable-pip-version-check", "--find-links", str(wheels), "--target",
                str(site), *names], None, ctx.scale.op_timeout, m)


def _import(ctx: Any, site: Path, names: list[str], m: Any) -> float:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return _sh([sys.executable, "-B", "-c", "import " + ", ".join(names)], None,
               ctx.scale.op_timeout, m, env=env)


def dev_pip_fs(ctx: Any, s: Any) -> Any:
    """pip install of five wheels (from a local directory) into the mount, until durable;
    after a remount with empty caches, python -c 'import ...' of all of them."""
    from bench.workloads import _finish, _out_dir
    wheels, names, n = _wheels(ctx)
    d = _out_dir(ctx, s.name, "pip")
    timing: dict[str, float] = {}
    try:
        with s.mounted(cold=True, profile="devbox") as m:
            t0 = time.monotonic()
            _pip(ctx, wheels, names, m.path(d), m)
            expected = _walk_sizes(m.path(d), d)
            timing["install"] = s.wait_durable(m, ctx.store, d + "/", expected,
                                               ctx.scale.durable_timeout) - t0
        with s.mounted(cold=True, profile="devbox") as m:
            timing["import"] = _import(ctx, m.path(d), names, m)
    finally:
        ctx.store.delete_prefix(d + "/")
    return _finish(_samples(timing, n), m)


def dev_pip_local(ctx: Any) -> Any:
    import shutil

    from bench import procs
    from bench.workloads import Outcome
    wheels, names, n = _wheels(ctx)
    site = ctx.workdir / "devtree-local-site"
    shutil.rmtree(site, ignore_errors=True)
    timing = {"install": _pip(ctx, wheels, names, site, None)}
    procs.drop_caches()
    timing["import"] = _import(ctx, site, names, None)
    shutil.rmtree(site, ignore_errors=True)
    return Outcome(_samples(timing, n), None, [LOCAL_NOTE])


def workloads() -> list[Any]:
    from bench.workloads import Workload
    return [
        Workload("dev_git", "dev tree: git clone, then cold git status / log -p / checkout / "
                 "diff / tar c / rm -rf (boto3 column: local dir)", dev_git_fs, dev_git_local),
        Workload("dev_pip", "dev tree: pip install of 5 wheels, cold import (boto3 column: "
                 "local dir)", dev_pip_fs, dev_pip_local),
    ]


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


def _requests_by_op(port: int) -> dict[str, int]:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, int] = {}
    for ln in text.decode().splitlines():
        if ln.startswith("caiosfs_s3_requests_total{"):
            labels, _, value = ln.rpartition(" ")
            op = labels.split('op="', 1)[1].split('"', 1)[0]
            out[op] = out.get(op, 0) + int(float(value))
    return out


def probe(args: argparse.Namespace) -> int:
    """Round trips of name lookups: stat every file of a tree by name on a cold mount (what
    git status does first), and cp -r over the existing tree."""
    sys.path.insert(0, str(REPO))
    import socket

    from caiosfs.seaweed import SeaweedServer
    work = Path(tempfile.mkdtemp(prefix="devtree-probe-", dir="/var/tmp"))
    server = SeaweedServer(work / "weed", access_key="bench", secret_key=secrets.token_hex(16))
    server.start()
    try:
        s3 = server.client()
        bucket = server.create_bucket("probe")
        names = [f"tree/d{d:02d}/f{i:03d}.py" for d in range(args.dirs)
                 for i in range(args.files)]

        def seed() -> None:
            with concurrent.futures.ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda k: s3.put_object(Bucket=bucket, Key=k,
                                                    Body=b"x = 1\n" * 20), names))
        src = work / "src"
        for k in names:
            (src / k).parent.mkdir(parents=True, exist_ok=True)
            (src / k).write_bytes(b"y = 2\n" * 20)
        env = {**os.environ, **server.env()}
        env.pop("AWS_ENDPOINT_URL", None)
        for label, binary in (b.split("=", 1) for b in args.binaries.split(",")):
            seed()
            for what in ("stat", "cp", "rm"):
                mnt, cache = work / f"mnt-{label}-{what}", work / f"cache-{label}-{what}"
                mnt.mkdir()
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                opts = (f"endpoint={server.endpoint},path_style,cache_dir={cache},"
                        f"metrics=127.0.0.1:{port}")
                if args.caiosfs_opts and label != "old":
                    opts += "," + args.caiosfs_opts
                subprocess.run([binary, "mount", f"s3://{bucket}", str(mnt), "-o", opts],
                               env=env, check=True)
                try:
                    before = _requests_by_op(port)
                    t0 = time.monotonic()
                    if what == "stat":
                        for k in names:
                            os.lstat(mnt / k)
                    elif what == "rm":
                        subprocess.run(["rm", "-rf", str(mnt / "tree")], check=True)
                        subprocess.run([binary, "flush", str(mnt), "-q"], env=env, check=True)
                        left = [o["Key"] for o in s3.list_objects_v2(
                            Bucket=bucket, Prefix="tree/").get("Contents", [])
                            if not o["Key"].endswith("/")]
                        if left:
                            raise RuntimeError(f"rm -rf left {len(left)} objects")
                    else:
                        subprocess.run(["cp", "-r", f"{src}/tree/.", str(mnt / "tree")],
                                       check=True)
                        subprocess.run([binary, "flush", str(mnt), "-q"], env=env, check=True)
                    dt = time.monotonic() - t0
                    after = _requests_by_op(port)
                finally:
                    subprocess.run([binary, "umount", str(mnt), "-q"], env=env, check=False)
                delta = {op: after.get(op, 0) - before.get(op, 0) for op in after}
                delta = {op: n for op, n in sorted(delta.items()) if n}
                print(f"{label:8s} {what:5s} {len(names)} files: {dt:6.2f} s  {delta}",
                      flush=True)
        return 0
    finally:
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
    p = sub.add_parser("probe", help="round trips of lookups: stat by name, cp -r over a tree")
    p.add_argument("--dirs", type=int, default=10)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--binaries", default=f"new={CAIOSFS}",
                   help="LABEL=CAIOSFS_EXECUTABLE,... to compare builds")
    p.add_argument("--caiosfs-opts", default="", help="extra -o options (not for 'old')")
    args = ap.parse_args(argv)
    return lsl(args) if args.cmd == "lsl" else probe(args)


if __name__ == "__main__":
    sys.exit(main())


# The name bench/workloads.py's registry looks for (imported after Workload exists).
WORKLOADS = workloads()
