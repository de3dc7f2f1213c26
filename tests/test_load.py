"""Load (issue 7): many processes reading and writing the same and different files at once.

- ``test_python_workload``: 10 processes for at most 40 s (or 400 operations each) on one
  mount: three read the same two large seeded objects (whole files and random ranges), two
  read objects of their own, three write files in their own directories (write, fsync some,
  append, rename, delete, read back), two publish and read files in one shared directory
  (write a temporary name, fsync some, rename it into place, delete; read each other's).
  Every read is checked against the source bytes; after ``caiosfs flush`` every file in
  the store (boto3) is byte-for-byte what the processes last wrote, and a fresh mount with
  an empty cache shows the same tree. The daemon's RSS is sampled throughout; its peak
  (VmHWM) must stay under RSS_LIMIT_MIB with the default read budget
  ``memory_limit=256M``. A process that does not finish in time fails the test (deadlock).
- ``test_dbench``: dbench (its NetBench client.txt load) with 4 clients for 20 s.
- ``test_stress_ng``: 18 stress-ng file-system stressors at once for 25 s, with --verify.
- Regression tests of two bugs the load found (both fixed): a shrinking ``ftruncate`` of an
  open, unlinked file failed with ENOENT (stress-ng's sync-file stressor), and writing to an
  open, unlinked file started a multipart upload that was never aborted (stress-ng's hdd,
  seek and iomix stressors do this).

Figures (processes, operations, bytes, errors, daemon peak RSS, dbench throughput,
stress-ng bogo-ops, durations) are printed, and merged into tests/figures/load.json for the
README when the test passed and CAIOSFS_RECORD_FIGURES=1 (then run
tests/figures/render_readme.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import data, xxh
from mounting import get, keys, record_figures

MiB = 1 << 20
# The read budget (-o memory_limit, caiosfs/config.py) is 256 MiB by default; the daemon's
# whole RSS (interpreter, boto3, LMDB map, page-sized buffers, the budget) must stay under
# the 300 MiB target.
MEMORY_LIMIT = "256M"
RSS_LIMIT_MIB = 300
WORKLOAD_SECONDS = 40
MAX_OPS = 400
GRACE_SECONDS = 90  # for the last operation of each process to end (an fsync under load)
DBENCH_LOADFILE = "/usr/share/dbench/client.txt"  # Debian's dbench package puts it here


def record(name: str, figures: dict[str, Any]) -> None:
    record_figures("load.json", name, figures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fuse_errors(port: int) -> dict[str, int]:
    """``{"op/ERRNO": count}`` from the mount's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for m in re.finditer(r'^caiosfs_fuse_errors_total\{errno="(\w+)",op="(\w+)"\} (\S+)$',
                         text, re.MULTILINE):
        out[f"{m[2]}/{m[1]}"] = int(float(m[3]))
    for m in re.finditer(r'^caiosfs_fuse_errors_total\{op="(\w+)",errno="(\w+)"\} (\S+)$',
                         text, re.MULTILINE):
        out[f"{m[1]}/{m[2]}"] = int(float(m[3]))
    return out


# Errnos a FUSE filesystem answers in normal operation: a lookup of a name that does not
# exist yet (every create does one), rmdir of a non-empty directory (dbench's cleanup), a
# name that exists (mkdir -p), and the operations caiosfs documents as unsupported
# (xattrs, fallocate, hard links, mknod: docs/SEMANTICS.md), and a name longer than 255
# bytes (stress-ng's dentry/dir stressors look such names up on purpose; the kernel leaves
# NAME_MAX to the filesystem). Anything else (EIO, ESTALE,
# ENOSPC, EBADF, ...) is an error of the filesystem under load.
EXPECTED_ERRNOS = {"ENOENT", "ENOTEMPTY", "EEXIST", "EOPNOTSUPP", "ENOTSUP", "ENODATA",
                   "ENOSYS", "ENAMETOOLONG"}


class RssSampler:
    """Samples VmRSS of a pid every 0.2 s in a thread; ``peak_mib`` is the kernel's VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        f = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        self.samples.append(int(f["VmRSS"].split()[0]))
        self.hwm_kib = max(self.hwm_kib, int(f["VmHWM"].split()[0]))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._read()

    def __enter__(self) -> Self:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._read()

    @property
    def peak_mib(self) -> float:
        return round(max(self.hwm_kib, *self.samples, 0) / 1024, 1)

    @property
    def median_mib(self) -> float:
        s = sorted(self.samples)
        return round(s[len(s) // 2] / 1024, 1) if s else 0.0


def alive_and_answering(m: Any) -> None:
    """The mount lists, writes, reads back and answers `caiosfs status`."""
    assert os.listdir(m.path) is not None
    body = data(100_000, "alive")
    (m.path / "alive.bin").write_bytes(body)
    assert (m.path / "alive.bin").read_bytes() == body
    st = m.status()
    assert st["checksum_failures"] == 0 and st["conflicts"] == 0, st


# ---------------------------------------------------------------------------------------
# 1. the Python workload
# ---------------------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import errno, hashlib, json, os, random, sys, time
    import xxhash
    MiB = 1 << 20
    HDR = 40  # shared-dir files: "<seed:24><size:16>" then data(size - HDR, seed)

    def chunk(seed, i, n):  # the bytes of conftest.data / caiosfs.demo.random_bytes
        return hashlib.shake_128(f"caiosfs:{seed}:{i}".encode()).digest(n)

    def data(size, seed):
        return b"".join(chunk(seed, i // MiB, min(MiB, size - i)) for i in range(0, size, MiB))

    def data_range(seed, size, off, n):
        end = min(size, off + n)
        if end <= off:
            return b""
        first, last = off // MiB, (end - 1) // MiB
        buf = b"".join(chunk(seed, i, min(MiB, size - i * MiB)) for i in range(first, last + 1))
        return buf[off - first * MiB:end - first * MiB]

    def segs_hash(segs):
        h = xxhash.xxh3_64()
        for seed, size in segs:
            for i in range(0, size, MiB):
                h.update(chunk(seed, i // MiB, min(MiB, size - i)))
        return [h.hexdigest(), sum(s for _, s in segs)]

    cfg = json.loads(sys.argv[1])
    root, role, idx = cfg["root"], cfg["role"], cfg["idx"]
    rng = random.Random(cfg["seed"])
    st = {"role": role, "idx": idx, "ops": 0, "bytes_read": 0, "bytes_written": 0,
          "errors": [], "bad": [], "files": {}, "dirs": [], "counts": {}}

    def P(rel):
        return os.path.join(root, rel)

    def count(k):
        st["counts"][k] = st["counts"].get(k, 0) + 1

    def read_all(rel):
        h, n = xxhash.xxh3_64(), 0
        with open(P(rel), "rb", buffering=0) as fh:
            while True:
                b = fh.read(MiB)
                if not b:
                    break
                h.update(b)
                n += len(b)
        st["bytes_read"] += n
        return [h.hexdigest(), n]

    def write_segs(fh, seed, size):
        for i in range(0, size, MiB):
            b = chunk(seed, i // MiB, min(MiB, size - i))
            fh.write(b)
            st["bytes_written"] += len(b)

    def sync(fh):
        fh.flush()
        os.fsync(fh.fileno())
        count("fsync")

    # -- readers of seeded objects: objs = {key: [size, xxh]}, the seed of each is its key
    def read_seeded(objs):
        rel = rng.choice(sorted(objs))
        size, want = objs[rel]
        if rng.random() < 0.4:
            got = read_all(rel)
            count("read_whole")
            if got != [want, size]:
                st["bad"].append(["whole", rel, got, [want, size]])
            return
        with open(P(rel), "rb", buffering=0) as fh:
            for _ in range(16):
                off = rng.randrange(size)
                n = rng.choice([4096, 65536, MiB, 3 * MiB])
                b = os.pread(fh.fileno(), n, off)
                st["bytes_read"] += len(b)
                if b != data_range(rel, size, off, n):
                    st["bad"].append(["range", rel, off, n, len(b)])
        count("read_ranges")

    # -- writers in their own directory: ref = {rel: [[seed, size], ...]} (appends add one)
    ref = {}
    n_op = 0

    def own_writer():
        d = f"w/{idx}"
        names = [f"{d}/f{k}" for k in range(8)] + [f"{d}/sub/g{k}" for k in range(4)]
        have = sorted(ref)
        op = rng.random()
        seed = f"w{idx}-{n_op}"
        if op < 0.35 or not have:
            rel = rng.choice(names)
            size = rng.choice([0, 1, 777, 65539, 300_001, 2 * MiB + 5])
            if rng.random() < 0.07:
                size = 12 * MiB + 7  # two 5 MiB parts: streamed as a multipart upload
            with open(P(rel), "wb", buffering=0) as fh:
                write_segs(fh, seed, size)
                if rng.random() < 0.4:
                    sync(fh)
            ref[rel] = [[seed, size]]
            count("write")
        elif op < 0.50:
            rel = rng.choice(have)
            size = rng.choice([1, 4096, 100_003, MiB + 1])
            with open(P(rel), "ab", buffering=0) as fh:
                write_segs(fh, seed, size)
                if rng.random() < 0.3:
                    sync(fh)
            ref[rel].append([seed, size])
            count("append")
        elif op < 0.65:
            src, dst = rng.choice(have), rng.choice(names)
            if src == dst:
                return
            os.rename(P(src), P(dst))
            ref[dst] = ref.pop(src)
            count("rename")
        elif op < 0.75:
            rel = rng.choice(have)
            os.unlink(P(rel))
            del ref[rel]
            count("delete")
        else:
            rel = rng.choice(have)
            got = read_all(rel)
            count("read_own")
            if got != segs_hash(ref[rel]):
                st["bad"].append(["own", rel, got, segs_hash(ref[rel])])

    # -- writers/readers of one shared directory: self-describing files
    def check_shared(rel, body):
        if len(body) < HDR:
            return False
        seed, size = body[:24].decode().strip(), int(body[24:HDR])
        return len(body) == size and body[HDR:] == data(size - HDR, seed)

    def shared():
        op = rng.random()
        mine = sorted(ref)
        if op < 0.40 or not mine:
            k = rng.randrange(6)
            seed = f"s{idx}-{n_op}"
            size = rng.choice([100, 5000, 200_003, MiB + MiB // 2, 3 * MiB + 1])
            body = f"{seed:<24}{size:>16}".encode() + data(size - HDR, seed)
            tmp, rel = f"shared/.tmp-s{idx}-{n_op}", f"shared/s{idx}-{k}"
            with open(P(tmp), "wb", buffering=0) as fh:
                for i in range(0, size, MiB):
                    fh.write(body[i:i + MiB])
                if rng.random() < 0.3:
                    sync(fh)
            st["bytes_written"] += size
            os.rename(P(tmp), P(rel))
            ref[rel] = [xxhash.xxh3_64(body).hexdigest(), size]
            count("publish")
        elif op < 0.50:
            rel = rng.choice(mine)
            os.unlink(P(rel))
            del ref[rel]
            count("delete")
        else:
            names = [n for n in os.listdir(P("shared")) if not n.startswith(".tmp")]
            count("list")
            if not names:
                return
            rel = "shared/" + rng.choice(names)
            try:
                with open(P(rel), "rb") as fh:
                    body = fh.read()
            except FileNotFoundError:  # its owner deleted it after our listing: fine
                count("vanished")
                return
            st["bytes_read"] += len(body)
            count("read_shared")
            if not check_shared(rel, body):
                st["bad"].append(["shared", rel, len(body)])
            elif rel in ref and ref[rel] != [xxhash.xxh3_64(body).hexdigest(), len(body)]:
                st["bad"].append(["shared-own", rel, len(body)])

    if role == "writer":
        os.makedirs(P(f"w/{idx}/sub"), exist_ok=True)
        st["dirs"] = ["w", f"w/{idx}", f"w/{idx}/sub"]
    elif role == "shared":
        os.makedirs(P("shared"), exist_ok=True)
        st["dirs"] = ["shared"]
    step = {"shared_reader": lambda: read_seeded(cfg["objects"]),
            "own_reader": lambda: read_seeded(cfg["objects"]),
            "writer": own_writer, "shared": shared}[role]
    while st["ops"] < cfg["max_ops"] and time.time() < cfg["deadline"]:
        n_op += 1
        try:
            step()
        except Exception as exc:  # every error is reported, none stops the others
            st["errors"].append([role, n_op, type(exc).__name__,
                                 errno.errorcode.get(getattr(exc, "errno", None) or 0, ""),
                                 str(exc)])
        st["ops"] += 1
    if role == "writer":
        st["files"] = {rel: segs_hash(s) for rel, s in ref.items()}
    elif role == "shared":
        st["files"] = dict(ref)
    with open(cfg["out"], "w") as out:
        json.dump(st, out)
''')


def walk(root: Path) -> tuple[dict[str, tuple[str, int]], set[str]]:
    """Every file (xxh, size) and directory below ``root``, as relative paths."""
    files: dict[str, tuple[str, int]] = {}
    dirs: set[str] = set()
    for d, dnames, fnames in os.walk(root):
        for n in dnames:
            dirs.add(str((Path(d) / n).relative_to(root)))
        for n in fnames:
            p = Path(d) / n
            b = p.read_bytes()
            files[str(p.relative_to(root))] = (xxh(b), len(b))
    return files, dirs


def test_python_workload(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    # Seeded objects, verified against the source: the same two large ones for three
    # processes, three different ones for each of two others.
    shared_objs = {"ro/big0": 48 * MiB + 11, "ro/big1": 32 * MiB + 5}
    own_objs = [{f"ro/own{r}-{k}": 6 * MiB + 1000 * k + r for k in range(3)} for r in range(2)]
    seeded: dict[str, list[Any]] = {}
    for k, size in {**shared_objs, **own_objs[0], **own_objs[1]}.items():
        body = data(size, k)
        s3.put_object(Bucket=bucket, Key=k, Body=body)
        assert xxh(get(s3, bucket, k)) == xxh(body)
        seeded[k] = [size, xxh(body)]
    worker = tmp_path / "load_worker.py"
    worker.write_text(WORKER)
    # the workers' generator is conftest.data
    assert subprocess.run([sys.executable, "-c", WORKER.split("cfg = json")[0] +
                           "sys.stdout.buffer.write(data(2 * MiB + 3, 'x'))"],
                          capture_output=True, check=True).stdout == data(2 * MiB + 3, "x")

    port = free_port()
    opts = f"memory_limit={MEMORY_LIMIT},part_size=5M,upload_delay=0.2"
    m = mounter(bucket, options=f"{opts},metrics=127.0.0.1:{port}")
    pid = m.pid
    roles = (["shared_reader"] * 3 + ["own_reader"] * 2 + ["writer"] * 3 + ["shared"] * 2)
    t0 = time.monotonic()
    deadline = time.time() + WORKLOAD_SECONDS
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    with RssSampler(pid) as rss:
        for i, role in enumerate(roles):
            objs = ({k: seeded[k] for k in shared_objs} if role == "shared_reader" else
                    {k: seeded[k] for k in own_objs[i - 3]} if role == "own_reader" else {})
            out, err = tmp_path / f"out{i}.json", tmp_path / f"err{i}.txt"
            cfg = {"root": str(m.path), "role": role, "idx": i, "seed": 1000 + i,
                   "deadline": deadline, "max_ops": MAX_OPS, "objects": objs, "out": str(out)}
            with open(err, "wb") as errf:
                procs.append((subprocess.Popen([sys.executable, str(worker), json.dumps(cfg)],
                                               stdout=subprocess.DEVNULL, stderr=errf), out, err))
        hung = []
        for i, (p, _, _) in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline + GRACE_SECONDS - time.time()))
            except subprocess.TimeoutExpired:
                hung.append(f"{roles[i]} #{i}")
        if hung:
            for p, _, _ in procs:
                p.kill()
            pytest.fail(f"deadlock or hang: {hung} still running {GRACE_SECONDS} s after the "
                        f"{WORKLOAD_SECONDS} s deadline; daemon status: {m.status()}")
        workload_s = time.monotonic() - t0
        results = []
        for i, (p, out, err) in enumerate(procs):
            assert p.returncode == 0, f"{roles[i]} #{i} exited {p.returncode}: " \
                                      f"{err.read_text()[-2000:]}"
            results.append(json.loads(out.read_text()))
        status = m.status()
        errs = fuse_errors(port)
        tf = time.monotonic()
        m.flush(timeout=180)
        flush_s = time.monotonic() - tf

    errors = [e for r in results for e in r["errors"]]
    bad = [b for r in results for b in r["bad"]]
    assert not errors, f"processes saw errors: {errors[:20]}"
    assert not bad, f"wrong bytes read: {bad[:20]}"
    assert status["conflicts"] == 0 and status["checksum_failures"] == 0, status
    assert status["uploads_failed"] == 0, (status, m.log_problems())
    unexpected = {k: v for k, v in errs.items() if k.split("/")[1] not in EXPECTED_ERRNOS}
    assert not unexpected, f"the daemon answered errors: {unexpected}; log: {m.log_problems()}"

    # after flush, the store holds exactly what the processes last wrote
    expected = {rel: tuple(v) for r in results for rel, v in r["files"].items()}
    stored = {k for k in keys(s3, bucket) if not k.endswith("/") and not k.startswith("ro/")}
    assert stored == set(expected), \
        f"store vs expected: extra {sorted(stored - set(expected))[:10]}, " \
        f"missing {sorted(set(expected) - stored)[:10]}"
    for k in sorted(stored):
        b = get(s3, bucket, k)
        assert (xxh(b), len(b)) == expected[k], f"{k}: other bytes in the store"
    # the mount shows the same, and so does a fresh mount with an empty cache
    files, dirs = walk(m.path)
    want_files = {**expected, **{k: (h, s) for k, (s, h) in seeded.items()}}
    assert files == want_files, f"mount differs: {sorted(set(files) ^ set(want_files))[:10]}"
    want_dirs = {d for r in results for d in r["dirs"]} | {"ro"}
    assert dirs == want_dirs, f"directories: {sorted(dirs ^ want_dirs)}"
    fresh = mounter(bucket, options=opts)
    f_files, f_dirs = walk(fresh.path)
    assert f_files == files, f"fresh mount differs: {sorted(set(f_files) ^ set(files))[:10]}"
    assert f_dirs == dirs, f"fresh mount directories: {sorted(f_dirs ^ dirs)}"
    fresh.umount()

    assert rss.peak_mib < RSS_LIMIT_MIB, f"daemon peak RSS {rss.peak_mib} MiB"
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    record("python_workload", {
        "processes": len(roles),
        "roles": {r: roles.count(r) for r in sorted(set(roles))},
        "operations": sum(r["ops"] for r in results),
        "operation_counts": counts,
        "bytes_read": sum(r["bytes_read"] for r in results),
        "bytes_written": sum(r["bytes_written"] for r in results),
        "errors": len(errors),
        "wrong_reads": len(bad),
        "files_verified_in_store": len(stored),
        "files_verified_fresh_mount": len(f_files),
        "daemon_peak_rss_mib": rss.peak_mib,
        "daemon_median_rss_mib": rss.median_mib,
        "rss_limit_mib": RSS_LIMIT_MIB,
        "memory_limit": MEMORY_LIMIT,
        "fuse_errors_by_op": errs,
        "s3_requests": status["s3_requests"],
        "workload_seconds": round(workload_s, 1),
        "flush_seconds": round(flush_s, 1),
    })


# ---------------------------------------------------------------------------------------
# 2. dbench and stress-ng
# ---------------------------------------------------------------------------------------

def test_dbench(s3: Any, bucket: str, mounter: Any) -> None:
    assert Path(DBENCH_LOADFILE).exists(), "dbench is installed by .ci/setup"
    port = free_port()
    m = mounter(bucket, options=f"memory_limit={MEMORY_LIMIT},upload_delay=0.2,"
                f"metrics=127.0.0.1:{port}")
    (m.path / "dbench").mkdir()
    seconds, clients = 20, 4
    t0 = time.monotonic()
    with RssSampler(m.pid) as rss:
        r = subprocess.run(["dbench", "-t", str(seconds), "-D", str(m.path / "dbench"),
                            "-c", DBENCH_LOADFILE, str(clients)],
                           capture_output=True, text=True, timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    # dbench prints "failed to create barrier semaphore" when semget() is refused (seen
    # once here, intermittently; SysV IPC, not the filesystem): the clients then start
    # without the barrier. Any other error or failure line is the filesystem's.
    problems = [line for line in out.splitlines()
                if re.search(r"error|fail|warn|unexpected", line, re.IGNORECASE)
                and "barrier semaphore" not in line]
    assert not problems, problems[:20]
    tp = re.search(r"Throughput ([\d.]+) MB/sec\s+(\d+) clients.*max_latency=([\d.]+) ms", out)
    assert tp, out[-2000:]
    ops = sum(int(x) for x in re.findall(r"^ (?:NTCreateX|Close|Rename|Unlink|Deltree|Mkdir|"
                                          r"Qpathinfo|Qfileinfo|Qfsinfo|Sfileinfo|Find|WriteX|"
                                          r"ReadX|LockX|UnlockX|Flush)\s+(\d+)", out, re.MULTILINE))
    errs = fuse_errors(port)
    unexpected = {k: v for k, v in errs.items() if k.split("/")[1] not in EXPECTED_ERRNOS}
    assert not unexpected, f"the daemon answered errors: {unexpected}; log: {m.log_problems()}"
    alive_and_answering(m)
    m.flush(timeout=180)
    m.umount(timeout=180)
    assert get(s3, bucket, "alive.bin") == data(100_000, "alive")
    assert rss.peak_mib < RSS_LIMIT_MIB, f"daemon peak RSS {rss.peak_mib} MiB"
    record("dbench", {
        "command": f"dbench -t {seconds} -D MOUNT/dbench -c {DBENCH_LOADFILE} {clients}",
        "clients": clients,
        "throughput_mb_s": float(tp[1]),
        "max_latency_ms": float(tp[3]),
        "operations": ops,
        "errors": 0,
        "daemon_peak_rss_mib": rss.peak_mib,
        "fuse_errors_by_op": errs,
        "seconds": round(elapsed, 1),
    })


# stress-ng 0.15 stressors that exercise a FUSE-on-S3 file system, one instance each (two
# for hdd), with their file sizes bounded so one 25 s run stays cheap on two cores.
# Left out, on purpose:
#   --link        hard links are EOPNOTSUPP by design (docs/SEMANTICS.md): the stressor fails.
#   --fallocate   fallocate is EOPNOTSUPP by design: the stressor does 0 bogo-ops.
#   --flock, --lockf  locks are the kernel's, local to the mount: they never reach caiosfs
#                 and only spin the CPU that the shared machine needs.
STRESSORS = ["--hdd", "2", "--hdd-bytes", "64M", "--seek", "1", "--seek-size", "64M",
             "--dir", "1", "--rename", "1", "--dentry", "1",
             "--readahead", "1", "--readahead-bytes", "64M", "--symlink", "1",
             "--open", "1", "--getdent", "1", "--fstat", "1", "--utime", "1",
             "--chmod", "1", "--copy-file", "1", "--copy-file-bytes", "128M",
             "--iomix", "1", "--iomix-bytes", "64M", "--mmap", "1", "--mmap-bytes", "32M",
             "--dirdeep", "1", "--dirmany", "1", "--sync-file", "1", "--sync-file-bytes", "32M"]


def test_stress_ng(s3: Any, bucket: str, mounter: Any) -> None:
    port = free_port()
    m = mounter(bucket, "sng", options=f"memory_limit={MEMORY_LIMIT},upload_delay=0.2,"
                f"metrics=127.0.0.1:{port}")
    seconds = 25
    cmd = ["stress-ng", "--temp-path", str(m.path), "--timeout", f"{seconds}s", "--verify",
           "--metrics-brief", *STRESSORS]
    t0 = time.monotonic()
    with RssSampler(m.pid) as rss:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 150,
                           check=False)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    problems = [line for line in out.splitlines()
                if re.match(r"stress-ng: (fail|error|warn)", line)]
    assert not problems, problems
    assert "successful run completed" in out, out[-2000:]
    bogo = {m_[1]: int(m_[2]) for m_ in re.finditer(
        r"^stress-ng: metrc: \[\d+\] ([\w-]+)\s+(\d+)\s+[\d.]+", out, re.MULTILINE)}
    names = [a[2:] for a in STRESSORS if a.startswith("--") and not re.search(
        r"-(bytes|size)$", a)]
    assert set(bogo) == set(names), (bogo, out[-2000:])
    # iomix's workers do the I/O but stress-ng 0.15 counts no bogo-ops for it
    assert all(v > 0 for k, v in bogo.items() if k != "iomix"), bogo
    errs = fuse_errors(port)
    unexpected = {k: v for k, v in errs.items() if k.split("/")[1] not in EXPECTED_ERRNOS}
    assert not unexpected, f"the daemon answered errors: {unexpected}; log: {m.log_problems()}"
    # stress-ng removed everything it made
    assert os.listdir(m.path) == [], os.listdir(m.path)
    alive_and_answering(m)
    m.flush(timeout=180)
    m.umount(timeout=180)
    assert keys(s3, bucket, "sng/") == {"sng/alive.bin"}
    assert get(s3, bucket, "sng/alive.bin") == data(100_000, "alive")
    # stress-ng deletes its files while writing them: no multipart upload may be left over
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert rss.peak_mib < RSS_LIMIT_MIB, f"daemon peak RSS {rss.peak_mib} MiB"
    record("stress_ng", {
        "command": "stress-ng --temp-path MOUNT --timeout 25s --verify --metrics-brief "
                   + " ".join(STRESSORS),
        "stressors": len(names),
        "bogo_ops": bogo,
        "bogo_ops_total": sum(bogo.values()),
        "errors": 0,
        "daemon_peak_rss_mib": rss.peak_mib,
        "fuse_errors_by_op": errs,
        "seconds": round(elapsed, 1),
    })


# ---------------------------------------------------------------------------------------
# 3. bugs the load found (regression tests)
# ---------------------------------------------------------------------------------------

def test_ftruncate_of_open_unlinked_file(bucket: str, mounter: Any) -> None:
    m = mounter(bucket)
    fd = os.open(m.path / "scratch", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"a" * 65536)
        os.fsync(fd)  # the daemon's copy now has the 64 KiB (not just the page cache)
        os.unlink(m.path / "scratch")
        os.ftruncate(fd, 0)  # was ENOENT
        assert os.fstat(fd).st_size == 0
        os.pwrite(fd, b"b", 0)
        assert os.pread(fd, 10, 0) == b"b"
    finally:
        os.close(fd)


def test_unlinked_file_leaves_no_multipart_upload(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(bucket, options="part_size=5M")
    with open(m.path / "scratch", "wb", buffering=0) as fh:
        os.unlink(m.path / "scratch")
        # 15 MiB written sequentially: three 5 MiB parts
        fh.writelines(b"c" * MiB for _ in range(15))
        os.fsync(fh.fileno())
    m.flush()
    m.umount()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert keys(s3, bucket) == set()
