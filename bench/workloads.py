"""The workloads. Each has a function for a mounted filesystem and, where it makes sense, one
for raw boto3 (the physical limit of this server and network).

A function does one measurement and returns an `Outcome`; it raises `BenchError` when the
system failed (wrong data counts as failure). Rates are always "higher is better" (MB/s,
ops/s, files/s, entries/s) so ratios read the same way everywhere; the seconds they come from
are kept alongside.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import xxhash

from bench import data, procs
from bench.procs import BenchError
from bench.scale import MiB, Scale
from bench.store import BUCKET, PREFIX, Dataset, Store
from bench.systems import Caiosfs, FsSystem, Mount, read_ahead_of

MB = 1_000_000


@dataclass
class Sample:
    metric: str  # e.g. "read", "close", "durable"
    unit: str  # "MB/s", "ops/s", "files/s", "entries/s"
    rate: float
    seconds: float


@dataclass
class Outcome:
    samples: list[Sample]
    rss_mib: float | None = None
    notes: list[str] = field(default_factory=list)
    counters: dict[str, Any] | None = None  # the daemon's statistics (caiosfs status)


@dataclass
class Ctx:
    """Everything a workload needs."""

    scale: Scale
    ds: Dataset
    store: Store
    workdir: Path
    worker_env: dict[str, str]  # for boto3 workers: endpoint (maybe the WAN proxy), keys
    rep: int = 0
    verify_all: bool = False  # check every written byte (quick runs) or a sample (full runs)
    b3_conc: int = 8
    b3_chunk: int = 16 * MiB
    b3_part: int = 64 * MiB
    log: Callable[[str], None] = print


@dataclass
class Workload:
    name: str
    title: str
    fs: Callable[[Ctx, FsSystem], Outcome] | None
    boto3: Callable[[Ctx], Outcome] | None
    only_fs: tuple[str, ...] | None = None  # fs systems it applies to (None: all)

    def applies(self, system: str) -> bool:
        if system == "boto3":
            return self.boto3 is not None
        return self.fs is not None and (self.only_fs is None or system in self.only_fs)


def _rate(nbytes: float, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def _per_s(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _work(ctx: Ctx, op: str, args: dict[str, Any], m: Mount | None = None) -> dict[str, Any]:
    """Run a worker op; on timeout abort the mount's FUSE connection so the worker can die."""
    on_timeout = m.abort if m is not None else None
    return procs.run_worker(
        op, args, ctx.scale.op_timeout, env=ctx.worker_env, on_timeout=on_timeout
    )


def _finish(samples: list[Sample], m: Mount, extra: list[str] | None = None) -> Outcome:
    return Outcome(samples, m.peak_rss_mib, list(m.notes) + (extra or []), m.counters)


# Tells this run's output apart from an earlier run's against the same server: deleting the
# objects of a prefix may leave its folder listed (SeaweedFS does, for a while), and a `cp -r`
# into a name that exists copies into a subdirectory of it instead.
_RUN_TAG = time.strftime("%H%M%S", time.gmtime())


def _out_dir(ctx: Ctx, system: str, what: str) -> str:
    """A fresh key prefix per (run, system, repetition, workload): nothing is overwritten."""
    return f"out/{system}-r{ctx.rep}-{what}-{_RUN_TAG}"


def _b3_key(rel: str) -> str:
    return f"{PREFIX}/{rel}"


@lru_cache(maxsize=64)
def _digest(seed: str, size: int) -> str:
    return data.digest(seed, size)


# ---- sequential reads -----------------------------------------------------------------------


def _check_seq(ctx: Ctx, r: dict[str, Any]) -> None:
    if r["bytes"] != ctx.ds.seq_size:
        raise BenchError(f"read {r['bytes']} bytes, object has {ctx.ds.seq_size}")
    if r["digest"] != ctx.ds.seq_digest:
        raise BenchError("WRONG DATA: xxh3 of the bytes read differs from the object's")


def seq_read_cold_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    with s.mounted(cold=True, profile="dataset") as m:
        ra = read_ahead_of(m.mountpoint)
        r = _work(ctx, "seqread", {"path": str(m.path(ctx.ds.seq_key))}, m)
        _check_seq(ctx, r)
    notes = [f"read_ahead_kb={ra}"] if s.name == "caiosfs" else []
    return _finish(
        [Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m, notes
    )


def seq_read_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    r = _work(
        ctx,
        "b3_get",
        {
            "bucket": BUCKET,
            "keys": {_b3_key(ctx.ds.seq_key): ctx.ds.seq_size},
            "chunk": ctx.b3_chunk,
            "conc": ctx.b3_conc,
        },
    )
    return Outcome([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])])


def seq_read_warm_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """Read once to fill the system's local cache, drop the page cache, read again (timed)."""
    with s.mounted(cold=True, profile="dataset") as m:
        path = str(m.path(ctx.ds.seq_key))
        _check_seq(ctx, _work(ctx, "seqread", {"path": path}, m))
        # Let write-behind of the cache files settle so the timed pass reads a quiet disk.
        time.sleep(1.0)
        procs.drop_caches()
        r = _work(ctx, "seqread", {"path": path}, m)
        _check_seq(ctx, r)
    return _finish([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m)


# ---- random reads ---------------------------------------------------------------------------


def _rand_fs(ctx: Ctx, s: FsSystem, bs: int, ops: int) -> Outcome:
    with s.mounted(cold=True, profile="dataset") as m:
        r = _work(
            ctx,
            "randread",
            {
                "path": str(m.path(ctx.ds.seq_key)),
                "bs": bs,
                "count": ops,
                "seed": 7,
                "time_limit": ctx.scale.rand_seconds,
                "size": ctx.ds.seq_size,
            },
            m,
        )
    return _finish([Sample("ops", "ops/s", _per_s(r["ops"], r["seconds"]), r["seconds"])], m)


def _rand_b3(ctx: Ctx, bs: int, ops: int) -> Outcome:
    r = _work(
        ctx,
        "b3_randget",
        {
            "bucket": BUCKET,
            "key": _b3_key(ctx.ds.seq_key),
            "size": ctx.ds.seq_size,
            "bs": bs,
            "count": ops,
            "seed": 7,
            "time_limit": ctx.scale.rand_seconds,
        },
    )
    return Outcome([Sample("ops", "ops/s", _per_s(r["ops"], r["seconds"]), r["seconds"])])


def rand_1m_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    return _rand_fs(ctx, s, MiB, ctx.scale.rand_1m_ops)


def rand_1m_b3(ctx: Ctx) -> Outcome:
    return _rand_b3(ctx, MiB, ctx.scale.rand_1m_ops)


def rand_4k_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    return _rand_fs(ctx, s, 4096, ctx.scale.rand_4k_ops)


def rand_4k_b3(ctx: Ctx) -> Outcome:
    return _rand_b3(ctx, 4096, ctx.scale.rand_4k_ops)


# ---- sequential write -----------------------------------------------------------------------

WRITE_SEED = "wseq"


def seq_write_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    d = _out_dir(ctx, s.name, "seq")
    key = f"{d}/file.bin"
    size = ctx.scale.write_bytes
    try:
        with s.mounted(cold=True) as m:
            m.path(d).mkdir(parents=True, exist_ok=True)
            r = _work(ctx, "write", {"path": str(m.path(key)), "size": size, "seed": WRITE_SEED}, m)
            t_dur = s.wait_durable(m, ctx.store, d + "/", {key: size}, ctx.scale.durable_timeout)
        if ctx.store.object_digest(key) != r["digest"]:
            raise BenchError(
                "WRONG DATA in the store: xxh3 of the object differs from what was written"
            )
    finally:
        ctx.store.delete_prefix(d + "/")
    close_s = r["t_close"] - r["t_start"]
    dur_s = t_dur - r["t_start"]
    return _finish(
        [
            Sample("close", "MB/s", _rate(size, close_s), close_s),
            Sample("durable", "MB/s", _rate(size, dur_s), dur_s),
        ],
        m,
    )


def seq_write_b3(ctx: Ctx) -> Outcome:
    d = _out_dir(ctx, "boto3", "seq")
    size = ctx.scale.write_bytes
    try:
        r = _work(
            ctx,
            "b3_put",
            {
                "bucket": BUCKET,
                "key": _b3_key(f"{d}/file.bin"),
                "size": size,
                "seed": WRITE_SEED,
                "part": ctx.b3_part,
                "conc": ctx.b3_conc,
            },
        )
    finally:
        ctx.store.delete_prefix(d + "/")
    s = r["t_close"] - r["t_start"]
    # A raw upload is durable when it returns: close and durable are the same moment.
    return Outcome(
        [Sample("close", "MB/s", _rate(size, s), s), Sample("durable", "MB/s", _rate(size, s), s)]
    )


# ---- the 1,000-file tree ---------------------------------------------------------------------


def _verify_tree(ctx: Ctx, d: str) -> None:
    """Compare the bytes of some copied files in the store with the local source."""
    names = sorted(ctx.ds.tree_files)
    pick = names if ctx.verify_all else random.Random(ctx.rep).sample(names, min(10, len(names)))
    src = Path(ctx.ds.local_tree)
    for rel in pick:
        want = xxhash.xxh3_64((src / rel).read_bytes()).hexdigest()
        if ctx.store.object_digest(f"{d}/{rel}") != want:
            raise BenchError(f"WRONG DATA in the store for {d}/{rel}")


def tree_copy_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    d = _out_dir(ctx, s.name, "tree")
    expected = {f"{d}/{rel}": size for rel, size in ctx.ds.tree_files.items()}
    try:
        with s.mounted(cold=True, profile="devbox") as m:
            m.path("out").mkdir(exist_ok=True)
            t0 = time.monotonic()
            res = procs.run_bounded(
                ["cp", "-r", ctx.ds.local_tree, str(m.path(d))],
                ctx.scale.op_timeout,
                on_timeout=m.abort,
            )
            t_close = t0 + res.seconds
            t_dur = s.wait_durable(m, ctx.store, d + "/", expected, ctx.scale.durable_timeout)
        _verify_tree(ctx, d)
    finally:
        ctx.store.delete_prefix(d + "/")
    n = len(expected)
    return _finish(
        [
            Sample("close", "files/s", _per_s(n, t_close - t0), t_close - t0),
            Sample("durable", "files/s", _per_s(n, t_dur - t0), t_dur - t0),
        ],
        m,
    )


def tree_copy_b3(ctx: Ctx) -> Outcome:
    d = _out_dir(ctx, "boto3", "tree")
    try:
        r = _work(
            ctx,
            "b3_put_tree",
            {
                "bucket": BUCKET,
                "prefix": _b3_key(d),
                "root": ctx.ds.local_tree,
                "threads": 16,
            },
        )
    finally:
        ctx.store.delete_prefix(d + "/")
    s = r["t_close"] - r["t_start"]
    n = r["files"]
    return Outcome(
        [Sample("close", "files/s", _per_s(n, s), s), Sample("durable", "files/s", _per_s(n, s), s)]
    )


def tree_restore_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    with s.mounted(cold=True, profile="devbox") as m:
        r = _work(ctx, "readtree", {"root": str(m.path(ctx.ds.tree_dir))}, m)
    if r["files"] != len(ctx.ds.tree_files) or r["bytes"] != ctx.ds.tree_bytes:
        raise BenchError(
            f"restore saw {r['files']} files / {r['bytes']} bytes, want "
            f"{len(ctx.ds.tree_files)} / {ctx.ds.tree_bytes}"
        )
    return _finish([Sample("read", "files/s", _per_s(r["files"], r["seconds"]), r["seconds"])], m)


def tree_restore_b3(ctx: Ctx) -> Outcome:
    r = _work(
        ctx,
        "b3_get_tree",
        {
            "bucket": BUCKET,
            "prefix": _b3_key(ctx.ds.tree_dir) + "/",
            "threads": 16,
        },
    )
    return Outcome([Sample("read", "files/s", _per_s(r["files"], r["seconds"]), r["seconds"])])


# ---- ls -l of 10,000 objects ------------------------------------------------------------------


def _ls(ctx: Ctx, m: Mount) -> tuple[int, float]:
    res = procs.run_bounded(
        ["ls", "-l", str(m.path(ctx.ds.stat_dir))],
        ctx.scale.op_timeout,
        on_timeout=m.abort,
    )
    entries = sum(1 for line in res.stdout.splitlines() if not line.startswith("total"))
    if entries != ctx.ds.stat_count:
        raise BenchError(f"ls -l listed {entries} entries, the store has {ctx.ds.stat_count}")
    return entries, res.seconds


def stat_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """``ls -l`` (readdir + one stat per entry) on a fresh mount, then again at once.

    caiosfs runs with its default profile: stat from the listing, as rclone's
    --use-server-modtime does (devbox's metadata=head adds a HEAD per new object)."""
    with s.mounted(cold=True) as m:
        n, cold = _ls(ctx, m)
        _, warm = _ls(ctx, m)
    return _finish(
        [
            Sample("cold", "entries/s", _per_s(n, cold), cold),
            Sample("warm", "entries/s", _per_s(n, warm), warm),
        ],
        m,
    )


def stat_b3(ctx: Ctx) -> Outcome:
    r = _work(ctx, "b3_list", {"bucket": BUCKET, "prefix": _b3_key(ctx.ds.stat_dir) + "/"})
    if r["entries"] != ctx.ds.stat_count:
        raise BenchError(f"listing has {r['entries']} entries, want {ctx.ds.stat_count}")
    return Outcome([Sample("cold", "entries/s", _per_s(r["entries"], r["seconds"]), r["seconds"])])


# ---- checkpoint -----------------------------------------------------------------------------


def _ckpt_expected(ctx: Ctx, d: str, meta_size: int) -> dict[str, int]:
    exp = {
        f"{d}/shard-{i:03d}.distcp": ctx.scale.ckpt_shard_bytes
        for i in range(ctx.scale.ckpt_writers)
    }
    exp[f"{d}/.metadata"] = meta_size
    return exp


def _ckpt_verify(ctx: Ctx, d: str, digests: dict[str, str]) -> None:
    names = sorted(digests) if ctx.verify_all else sorted(digests)[:1]
    for name in names:
        if ctx.store.object_digest(f"{d}/{name}") != digests[name]:
            raise BenchError(f"WRONG DATA in the store for {d}/{name}")
    leftovers = [k for k in ctx.store.list_sizes(d + "/") if k.endswith(".metadata.tmp")]
    if leftovers:
        raise BenchError(f"{leftovers[0]} still in the store after the rename was durable")


def _ckpt_samples(ctx: Ctx, t0: float, t_commit: float, t_dur: float) -> list[Sample]:
    total = ctx.scale.ckpt_writers * ctx.scale.ckpt_shard_bytes
    return [
        Sample("commit", "MB/s", _rate(total, t_commit - t0), t_commit - t0),
        Sample("durable", "MB/s", _rate(total, t_dur - t0), t_dur - t0),
    ]


def ckpt_write_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    top = _out_dir(ctx, s.name, "ckpt")
    d = f"{top}/step-2"
    try:
        with s.mounted(cold=True, profile="checkpoint") as m:
            m.path(top).mkdir(parents=True, exist_ok=True)
            r = _work(
                ctx,
                "checkpoint",
                {
                    "directory": str(m.path(d)),
                    "writers": ctx.scale.ckpt_writers,
                    "shard_bytes": ctx.scale.ckpt_shard_bytes,
                },
                m,
            )
            expected = _ckpt_expected(ctx, d, r["meta_size"])
            t_dur = s.wait_durable(m, ctx.store, d + "/", expected, ctx.scale.durable_timeout)
        _ckpt_verify(ctx, d, r["digests"])
    finally:
        ctx.store.delete_prefix(top + "/")
    return _finish(_ckpt_samples(ctx, r["t_start"], r["t_commit"], t_dur), m)


def ckpt_write_b3(ctx: Ctx) -> Outcome:
    d = _out_dir(ctx, "boto3", "ckpt") + "/step-2"
    try:
        r = _work(
            ctx,
            "b3_ckpt",
            {
                "bucket": BUCKET,
                "prefix": _b3_key(d),
                "writers": ctx.scale.ckpt_writers,
                "shard_bytes": ctx.scale.ckpt_shard_bytes,
                "part": ctx.b3_part,
                # Two parts in flight per shard: 16 streams for 8 writers, like 16-way multipart.
                "conc_per_writer": 2,
            },
        )
    finally:
        ctx.store.delete_prefix(_out_dir(ctx, "boto3", "ckpt") + "/")
    return Outcome(_ckpt_samples(ctx, r["t_start"], r["t_commit"], r["t_commit"]))


def ckpt_restore_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """Every rank reads its shard back in parallel, on a fresh mount with an empty cache."""
    names = sorted(ctx.ds.ckpt_shards)
    with s.mounted(cold=True, profile="checkpoint") as m:
        r = _work(
            ctx,
            "readfiles",
            {
                "paths": [str(m.path(f"{ctx.ds.ckpt_dir}/{n}")) for n in names],
                "threads": len(names),
            },
            m,
        )
    want = [_digest(f"ckpt{i}", ctx.ds.ckpt_shards[n]) for i, n in enumerate(names)]
    if r["digests"] != want:
        raise BenchError("WRONG DATA: a restored shard's xxh3 differs from the object's")
    return _finish([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m)


def ckpt_restore_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    keys = {_b3_key(f"{ctx.ds.ckpt_dir}/{n}"): sz for n, sz in ctx.ds.ckpt_shards.items()}
    # Into memory, like the ranks of a restore that load their shard straight into tensors.
    r = _work(
        ctx,
        "b3_get",
        {
            "bucket": BUCKET,
            "keys": keys,
            "chunk": ctx.b3_chunk,
            "conc": ctx.b3_conc,
        },
    )
    return Outcome([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])])


# ---- fio ------------------------------------------------------------------------------------


def _fio(ctx: Ctx, m: Mount, args: list[str]) -> dict[str, Any]:
    res = procs.run_bounded(
        [
            "fio",
            "--output-format=json",
            "--readonly",
            "--ioengine=psync",
            f"--filename={m.path(ctx.ds.seq_key)}",
            f"--size={ctx.ds.seq_size}",
            *args,
        ],
        ctx.scale.op_timeout,
        on_timeout=m.abort,
    )
    try:
        out = json.loads(res.stdout[res.stdout.index("{") :])
        job = out["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio output not understood: {res.stdout[:300]} {res.stderr[:300]}")
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {res.stderr[:300]}")
    return job["read"]


def fio_seq_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    with s.mounted(cold=True, profile="dataset") as m:
        rd = _fio(ctx, m, ["--name=seqread", "--rw=read", "--bs=1M", "--numjobs=1"])
    secs = rd["runtime"] / 1000
    return _finish([Sample("read", "MB/s", rd["bw_bytes"] / MB, secs)], m)


def fio_rand_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """4 jobs of 4 KiB random reads with O_DIRECT: every read reaches the daemon. (Buffered,
    the small file of a quick run sits in the page cache after a second and fio reports
    memory speed, whatever the filesystem does.)"""
    with s.mounted(cold=True, profile="dataset") as m:
        rd = _fio(
            ctx,
            m,
            [
                "--name=randread",
                "--rw=randread",
                "--bs=4k",
                "--numjobs=4",
                "--group_reporting",
                "--time_based",
                f"--runtime={ctx.scale.fio_rand_seconds}",
                "--norandommap",
                "--direct=1",
            ],
        )
    secs = rd["runtime"] / 1000
    return _finish([Sample("iops", "ops/s", rd["iops"], secs)], m)


# ---- pre-warming a prefix (issue 6) -----------------------------------------------------------


def warm_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """``caiosfs warm`` of the warm/ prefix into an empty cache dir."""
    assert isinstance(s, Caiosfs)
    cache = s.root / "warm-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    procs.drop_caches()
    try:
        secs = s.warm(ctx.ds.warm_dir, cache, ctx.scale.op_timeout)
        on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    notes = []
    if on_disk < 0.95 * ctx.ds.warm_bytes:
        notes.append(
            f"cache dir holds {on_disk / MiB:.0f} MiB after warm of "
            f"{ctx.ds.warm_bytes / MiB:.0f} MiB"
        )
    return Outcome([Sample("warm", "MB/s", _rate(ctx.ds.warm_bytes, secs), secs)], None, notes)


def warm_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    keys = {_b3_key(f"{ctx.ds.warm_dir}/{n}"): sz for n, sz in ctx.ds.warm_objects.items()}
    dest = ctx.workdir / "b3-warm"
    try:
        r = _work(
            ctx,
            "b3_download",
            {
                "bucket": BUCKET,
                "keys": keys,
                "dest": str(dest),
                "chunk": ctx.b3_chunk,
                "conc": ctx.b3_conc,
            },
        )
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return Outcome([Sample("warm", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])])


WORKLOADS: list[Workload] = [
    Workload(
        "seq_read_cold", "sequential read, cold (empty caches)", seq_read_cold_fs, seq_read_b3
    ),
    Workload(
        "seq_read_warm",
        "sequential read, warm (local cache full, page cache dropped)",
        seq_read_warm_fs,
        None,
    ),
    Workload("rand_read_1m", "random 1 MiB reads, cold", rand_1m_fs, rand_1m_b3),
    Workload("rand_read_4k", "random 4 KiB reads, cold", rand_4k_fs, rand_4k_b3),
    Workload(
        "seq_write", "sequential write + close, and until durable", seq_write_fs, seq_write_b3
    ),
    Workload(
        "tree_copy", "copy of a source tree (cp -r), close and durable", tree_copy_fs, tree_copy_b3
    ),
    Workload(
        "tree_restore",
        "restore of that tree on a fresh mount (find + read all)",
        tree_restore_fs,
        tree_restore_b3,
    ),
    Workload("stat", "ls -l of a directory of many objects, cold and warm", stat_fs, stat_b3),
    Workload(
        "ckpt_write",
        "checkpoint: N writers x shard + fsync, then rename commit",
        ckpt_write_fs,
        ckpt_write_b3,
    ),
    Workload(
        "ckpt_restore",
        "checkpoint restore: N shards read in parallel, cold",
        ckpt_restore_fs,
        ckpt_restore_b3,
    ),
    Workload("fio_seq", "fio sequential read 1 MiB, cold", fio_seq_fs, None),
    Workload("fio_rand", "fio random read 4 KiB x 4 jobs, cold", fio_rand_fs, None),
    Workload(
        "warm",
        "pre-warm a prefix into the local cache (caiosfs warm)",
        warm_fs,
        warm_b3,
        only_fs=("caiosfs",),
    ),
]

# Bulk-copy workloads (caiosfs cp), kept in their own module.
from bench.transfer import TRANSFER_WORKLOADS

WORKLOADS += TRANSFER_WORKLOADS
