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
    # CPU seconds of the timed part: "bytes" moved, "daemon_s" (the mount's process tree,
    # all threads), "loop_s" (its event-loop thread), "client_s" (a raw boto3 worker),
    # "proxy_s" (the WAN proxy).
    cpu: dict[str, float] | None = None


@dataclass
class Ctx:
    """Everything a workload needs."""

    scale: Scale
    ds: Dataset
    store: Store
    workdir: Path
    worker_env: dict[str, str]  # for boto3 workers: endpoint (maybe the WAN proxy), keys
    net: str = "loopback"  # "loopback" or "wan" (every system behind bench/wanproxy.py)
    proxy_pid: int | None = None  # the WAN proxy, for its CPU figures
    server_pid: int | None = None  # the S3 server the run started, for its CPU figures
    rep: int = 0
    verify_all: bool = False  # check every written byte (quick runs) or a sample (full runs)
    b3_conc: int = 8  # ranged GETs in flight for raw boto3 reads
    b3_up_conc: int = 16  # parts / objects in flight for raw boto3 checkpoint uploads
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
    nets: tuple[str, ...] = ("loopback", "wan")  # where it runs (see main.py --net)
    quick_wan: bool = False  # part of the small WAN case of --quick
    # Parts of the seeded data set it reads (store.PARTS); None: all of them.
    needs: tuple[str, ...] | None = None

    def applies(self, system: str) -> bool:
        if system == "boto3":
            return self.boto3 is not None
        # The base build runs what caiosfs runs, except workloads that name their systems
        # (cp/warm drive the caiosfs CLI by name).
        fam = "caiosfs" if system == "caiosfs-base" and self.only_fs is None else system
        return self.fs is not None and (self.only_fs is None or fam in self.only_fs)


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


def _finish(
    samples: list[Sample],
    m: Mount,
    extra: list[str] | None = None,
    cpu: dict[str, float] | None = None,
) -> Outcome:
    return Outcome(samples, m.peak_rss_mib, list(m.notes) + (extra or []), m.counters, cpu)


class CpuMeter:
    """CPU seconds spent between ``start`` and ``stop`` by the mount's daemon (its process
    tree, every thread; and its event-loop thread apart), by the WAN proxy and by the S3
    server."""

    def __init__(self, ctx: Ctx, m: Mount | None) -> None:
        self.ctx = ctx
        self.m = m
        self.d0, self.l0 = m.cpu() if m is not None else (0.0, None)
        self.p0 = procs.tree_cpu(ctx.proxy_pid) if ctx.proxy_pid else 0.0
        self.s0 = procs.tree_cpu(ctx.server_pid) if ctx.server_pid else 0.0

    def stop(self, nbytes: int, client_s: float | None = None) -> dict[str, float]:
        out: dict[str, float] = {"bytes": nbytes}
        if self.ctx.server_pid:
            out["server_s"] = round(procs.tree_cpu(self.ctx.server_pid) - self.s0, 3)
        if self.m is not None and self.m.pids:
            d, loop = self.m.cpu()
            out["daemon_s"] = round(d - self.d0, 3)
            if loop is not None and self.l0 is not None:
                out["loop_s"] = round(loop - self.l0, 3)
        if client_s is not None:
            out["client_s"] = round(client_s, 3)
        if self.ctx.proxy_pid:
            out["proxy_s"] = round(procs.tree_cpu(self.ctx.proxy_pid) - self.p0, 3)
        return out


def _b3_cpu(ctx: Ctx, meter: CpuMeter, r: dict[str, Any], nbytes: int) -> dict[str, float]:
    return meter.stop(nbytes, r.get("cpu_s"))


# Tells this run's output apart from an earlier run's against the same server: deleting the
# objects of a prefix may leave its folder listed (SeaweedFS does, for a while), and a `cp -r`
# into a name that exists copies into a subdirectory of it instead.
_RUN_TAG = time.strftime("%H%M%S", time.gmtime())


def _out_dir(ctx: Ctx, system: str, what: str) -> str:
    """A fresh key prefix per (run, network, system, repetition, workload): nothing is
    overwritten (rclone leaves a few objects of a removed tree behind for good)."""
    net = "" if ctx.net == "loopback" else f"-{ctx.net}"
    return f"out/{system}-r{ctx.rep}-{what}{net}-{_RUN_TAG}"


def _b3_key(rel: str) -> str:
    return f"{PREFIX}/{rel}"


@lru_cache(maxsize=64)
def _digest(seed: str, size: int) -> str:
    return data.digest(seed, size)


@lru_cache(maxsize=4096)
def _range_digest(seed: str, off: int, n: int) -> str:
    return data.range_digest(seed, off, n)


def _check_ranges(
    ranges: dict[str, dict[str, str]], objects: dict[str, tuple[str, int]], chunk: int
) -> None:
    """Raw boto3 reads: every range of every object was read, and its xxh3 is the source's.
    ``objects``: {key as the worker names it: (seed, size)}."""
    for key, (seed, size) in objects.items():
        got = ranges.get(key, {})
        want_offs = set(range(0, size, chunk))
        if {int(o) for o in got} != want_offs:
            raise BenchError(f"{key}: {len(got)} of {len(want_offs)} ranges read")
        for off, d in got.items():
            o = int(off)
            if d != _range_digest(seed, o, min(chunk, size - o)):
                raise BenchError(f"WRONG DATA: {key} bytes {o}+{chunk}: xxh3 differs")


# ---- sequential reads -----------------------------------------------------------------------


def _check_seq(ctx: Ctx, r: dict[str, Any]) -> None:
    if r["bytes"] != ctx.ds.seq_size:
        raise BenchError(f"read {r['bytes']} bytes, object has {ctx.ds.seq_size}")
    if r["digest"] != ctx.ds.seq_digest:
        raise BenchError("WRONG DATA: xxh3 of the bytes read differs from the object's")


def seq_read_cold_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    with s.mounted(cold=True, profile="dataset") as m:
        ra = read_ahead_of(m.mountpoint)
        meter = CpuMeter(ctx, m)
        r = _work(ctx, "seqread", {"path": str(m.path(ctx.ds.seq_key))}, m)
        cpu = meter.stop(r["bytes"])
        _check_seq(ctx, r)
    notes = [f"read_ahead_kb={ra}"] if isinstance(s, Caiosfs) else []
    return _finish(
        [Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m, notes, cpu
    )


def _b3_get_seq(ctx: Ctx, conc: int, chunk: int, env: dict[str, str] | None = None) -> Outcome:
    procs.drop_caches()
    key = _b3_key(ctx.ds.seq_key)
    meter = CpuMeter(ctx, None)
    r = procs.run_worker(
        "b3_get",
        {"bucket": BUCKET, "keys": {key: ctx.ds.seq_size}, "chunk": chunk, "conc": conc},
        ctx.scale.op_timeout,
        env=env or ctx.worker_env,
    )
    cpu = _b3_cpu(ctx, meter, r, r["bytes"])
    _check_ranges(r["ranges"], {key: ("seq", ctx.ds.seq_size)}, chunk)
    return Outcome([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], cpu=cpu)


def seq_read_b3(ctx: Ctx) -> Outcome:
    return _b3_get_seq(ctx, ctx.b3_conc, ctx.b3_chunk)


def wan_ceiling_b3(ctx: Ctx) -> Outcome:
    """What the WAN proxy itself can carry on this machine: raw boto3 ranged GETs of the
    sequential object with twice the usual number in flight (so the per-connection cap is
    not the limit), through the proxy; and the same straight to the server, for scale."""
    conc = 2 * ctx.b3_conc
    # Enough ranges to keep them all busy even on the small object of --quick.
    chunk = max(MiB, min(ctx.b3_chunk, ctx.ds.seq_size // conc // MiB * MiB))
    via = _b3_get_seq(ctx, conc, chunk)
    direct_env = dict(ctx.worker_env, BENCH_ENDPOINT=ctx.store.endpoint)
    direct = _b3_get_seq(ctx, conc, chunk, direct_env)
    v, d = via.samples[0], direct.samples[0]
    return Outcome(
        [
            Sample("via proxy", "MB/s", v.rate, v.seconds),
            Sample("direct", "MB/s", d.rate, d.seconds),
        ],
        cpu=via.cpu,
        notes=[f"{conc} ranged GETs of {chunk // MiB} MiB in flight"],
    )


def seq_read_warm_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """Read once to fill the system's local cache, drop the page cache, read again (timed)."""
    with s.mounted(cold=True, profile="dataset") as m:
        path = str(m.path(ctx.ds.seq_key))
        _check_seq(ctx, _work(ctx, "seqread", {"path": path}, m))
        # Let write-behind of the cache files settle so the timed pass reads a quiet disk.
        time.sleep(1.0)
        procs.drop_caches()
        meter = CpuMeter(ctx, m)
        r = _work(ctx, "seqread", {"path": path}, m)
        cpu = meter.stop(r["bytes"])
        _check_seq(ctx, r)
    return _finish(
        [Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m, cpu=cpu
    )


# ---- random reads ---------------------------------------------------------------------------


def _check_rand(ctx: Ctx, r: dict[str, Any], bs: int, ops: int) -> None:
    """The bytes of the reads done, in order, hash to what the source holds there."""
    from bench.worker import _offsets

    size = ctx.ds.seq_size
    h = xxhash.xxh3_64()
    for off in _offsets(size, bs, ops, 7)[: r["ops"]]:
        h.update(data.range_bytes("seq", off, min(bs, size - off)))
    if r["digest"] != h.hexdigest():
        raise BenchError("WRONG DATA: xxh3 of the random reads differs from the object's bytes")


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
    _check_rand(ctx, r, bs, ops)
    return _finish([Sample("ops", "ops/s", _per_s(r["ops"], r["seconds"]), r["seconds"])], m)


def _rand_b3(ctx: Ctx, bs: int, ops: int) -> Outcome:
    procs.drop_caches()  # as for the mounts (nothing of the object is in it, but alike)
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
    _check_rand(ctx, r, bs, ops)
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
            meter = CpuMeter(ctx, m)
            r = _work(ctx, "write", {"path": str(m.path(key)), "size": size, "seed": WRITE_SEED}, m)
            t_dur = s.wait_durable(m, ctx.store, d + "/", {key: size}, ctx.scale.durable_timeout)
            cpu = meter.stop(size)
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
        cpu=cpu,
    )


def seq_write_b3(ctx: Ctx) -> Outcome:
    d = _out_dir(ctx, "boto3", "seq")
    size = ctx.scale.write_bytes
    try:
        meter = CpuMeter(ctx, None)
        r = _work(
            ctx,
            "b3_put",
            {
                "bucket": BUCKET,
                "key": _b3_key(f"{d}/file.bin"),
                "size": size,
                "seed": WRITE_SEED,
                "part": ctx.b3_part,
                "conc": ctx.b3_up_conc,
            },
        )
        # Judged like the mounts: by polling the store (a raw upload is there on return).
        t_dur = ctx.store.wait_durable(d + "/", {f"{d}/file.bin": size}, ctx.scale.durable_timeout)
        cpu = _b3_cpu(ctx, meter, r, size)
        if ctx.store.object_digest(f"{d}/file.bin") != r["digest"]:
            raise BenchError("WRONG DATA in the store after the raw upload")
    finally:
        ctx.store.delete_prefix(d + "/")
    s = r["t_close"] - r["t_start"]
    dur_s = t_dur - r["t_start"]
    return Outcome(
        [
            Sample("close", "MB/s", _rate(size, s), s),
            Sample("durable", "MB/s", _rate(size, dur_s), dur_s),
        ],
        cpu=cpu,
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
        expected = {f"{d}/{rel}": size for rel, size in ctx.ds.tree_files.items()}
        t_dur = ctx.store.wait_durable(d + "/", expected, ctx.scale.durable_timeout)
        _verify_tree(ctx, d)
    finally:
        ctx.store.delete_prefix(d + "/")
    s = r["t_close"] - r["t_start"]
    dur_s = t_dur - r["t_start"]
    n = r["files"]
    return Outcome(
        [
            Sample("close", "files/s", _per_s(n, s), s),
            Sample("durable", "files/s", _per_s(n, dur_s), dur_s),
        ]
    )


@lru_cache(maxsize=4)
def _tree_digests(root: str) -> dict[str, str]:
    src = Path(root)
    return {
        str(p.relative_to(src)): xxhash.xxh3_64(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }


def _check_tree(ctx: Ctx, r: dict[str, Any]) -> None:
    """Every file of the source tree was restored, and each one's xxh3 is the source's."""
    want = _tree_digests(ctx.ds.local_tree)
    got = r["digests"]
    if set(got) != set(want):
        extra, missing = set(got) - set(want), set(want) - set(got)
        raise BenchError(
            f"restore saw {len(got)} files, the tree has {len(want)} "
            f"(missing e.g. {sorted(missing)[:1]}, unexpected e.g. {sorted(extra)[:1]})"
        )
    bad = [k for k in want if got[k] != want[k]]
    if bad:
        raise BenchError(f"WRONG DATA: {len(bad)} restored files differ, e.g. {bad[0]}")


def tree_restore_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    with s.mounted(cold=True, profile="devbox") as m:
        meter = CpuMeter(ctx, m)
        r = _work(ctx, "readtree", {"root": str(m.path(ctx.ds.tree_dir))}, m)
        cpu = meter.stop(ctx.ds.tree_bytes)
    _check_tree(ctx, r)
    return _finish([Sample("read", "files/s", _per_s(r["files"], r["seconds"]), r["seconds"])], m,
                   cpu=cpu)


def tree_restore_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    meter = CpuMeter(ctx, None)
    r = _work(
        ctx,
        "b3_get_tree",
        {
            "bucket": BUCKET,
            "prefix": _b3_key(ctx.ds.tree_dir) + "/",
            "threads": 16,
        },
    )
    cpu = _b3_cpu(ctx, meter, r, ctx.ds.tree_bytes)
    _check_tree(ctx, r)
    return Outcome([Sample("read", "files/s", _per_s(r["files"], r["seconds"]), r["seconds"])],
                   cpu=cpu)


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
    procs.drop_caches()
    r = _work(ctx, "b3_list", {"bucket": BUCKET, "prefix": _b3_key(ctx.ds.stat_dir) + "/"})
    if r["entries"] != ctx.ds.stat_count:
        raise BenchError(f"listing has {r['entries']} entries, want {ctx.ds.stat_count}")
    return Outcome([Sample("cold", "entries/s", _per_s(r["entries"], r["seconds"]), r["seconds"])])


# ---- checkpoints (issue 15): torch DCP, torch.save, Hugging Face Trainer, restore -----------


def _ckpt_shards(ctx: Ctx, meta_size: int) -> dict[str, int]:
    """{name: size} of a DCP step: the shards and .metadata."""
    exp = {
        f"shard-{i:03d}.distcp": ctx.scale.ckpt_shard_bytes for i in range(ctx.scale.ckpt_writers)
    }
    exp[".metadata"] = meta_size
    return exp


def _verify_written(ctx: Ctx, d: str, digests: dict[str, str]) -> None:
    """Compare what was written (all of it in --quick, the first file otherwise) with the
    store."""
    names = sorted(digests) if ctx.verify_all else sorted(digests)[:1]
    for name in names:
        if ctx.store.object_digest(f"{d}/{name}") != digests[name]:
            raise BenchError(f"WRONG DATA in the store for {d}/{name}")


def _ckpt_samples(total: int, t0: float, t_commit: float, t_dur: float) -> list[Sample]:
    return [
        Sample("commit", "MB/s", _rate(total, t_commit - t0), t_commit - t0),
        Sample("durable", "MB/s", _rate(total, t_dur - t0), t_dur - t0),
    ]


def _fs_checkpoint(
    ctx: Ctx,
    s: FsSystem,
    what: str,
    op: str,
    args: Callable[[Mount, str], dict[str, Any]],
    final: str,
    expected: Callable[[dict[str, Any]], dict[str, int]],
    leftover: Callable[[str], bool],
) -> Outcome:
    """One checkpoint save through a mount: worker ``op`` writes it, then the store is polled
    until every object of ``expected`` (keys below ``final``) is there and no key that
    ``leftover`` matches (a temporary name) is; content compared."""
    top = _out_dir(ctx, s.name, what)
    try:
        with s.mounted(cold=True, profile="checkpoint") as m:
            m.path(top).mkdir(parents=True, exist_ok=True)
            meter = CpuMeter(ctx, m)
            r = _work(ctx, op, args(m, top), m)
            exp = {f"{top}/{final}/{k}": v for k, v in expected(r).items()}
            # Durable = the commit is complete in the store: every final object there with
            # its size, and no temporary name (.tmp, tmp-checkpoint-N/) left.
            t_dur = s.wait_durable(
                m, ctx.store, f"{top}/", exp, ctx.scale.durable_timeout, gone=leftover
            )
            total = sum(exp.values())
            cpu = meter.stop(total)
        _verify_written(ctx, f"{top}/{final}", r["digests"])
    finally:
        ctx.store.delete_prefix(top + "/")
    return _finish(_ckpt_samples(total, r["t_start"], r["t_commit"], t_dur), m, cpu=cpu)


def _b3_upload(ctx: Ctx, what: str, final: str, op: str, args: dict[str, Any],
               expected: Callable[[dict[str, Any]], dict[str, int]]) -> Outcome:
    """Raw boto3 writing a checkpoint step under ``final`` with the worker's ``op``;
    durable judged by polling the store for ``expected(result)`` (name -> size), as for
    the mounts."""
    top = _out_dir(ctx, "boto3", what)
    d = f"{top}/{final}"
    try:
        meter = CpuMeter(ctx, None)
        r = _work(ctx, op, {"bucket": BUCKET, "prefix": _b3_key(d), **args})
        exp = {f"{d}/{k}": v for k, v in expected(r).items()}
        t_dur = ctx.store.wait_durable(d + "/", exp, ctx.scale.durable_timeout)
        total = sum(exp.values())
        cpu = _b3_cpu(ctx, meter, r, total)
        _verify_written(ctx, d, r["digests"])
    finally:
        ctx.store.delete_prefix(top + "/")
    return Outcome(_ckpt_samples(total, r["t_start"], r["t_commit"], t_dur), cpu=cpu)


def _b3_checkpoint(ctx: Ctx, what: str, final: str, files: list[tuple[str, str, int]]) -> Outcome:
    """Raw boto3 uploading the same files straight to their final names, ``b3_up_conc``
    parts in flight."""
    return _b3_upload(ctx, what, final, "b3_put_files",
                      {"files": [list(f) for f in files], "part": ctx.b3_part,
                       "conc": ctx.b3_up_conc},
                      lambda r: {name: size for name, _, size in files})


def ckpt_write_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """torch.distributed.checkpoint: N ranks write .distcp shards + fsync, then the
    coordinator writes .metadata.tmp, fsyncs and renames it to .metadata."""
    return _fs_checkpoint(
        ctx,
        s,
        "ckpt",
        "checkpoint",
        lambda m, top: {
            "directory": str(m.path(f"{top}/step-2")),
            "writers": ctx.scale.ckpt_writers,
            "shard_bytes": ctx.scale.ckpt_shard_bytes,
        },
        "step-2",
        lambda r: _ckpt_shards(ctx, r["meta_size"]),
        lambda k: k.endswith(".metadata.tmp"),
    )


def ckpt_write_b3(ctx: Ctx) -> Outcome:
    """The same files in raw boto3: every shard a multipart upload, all at once
    (``b3_up_conc`` parts in flight in all), then .metadata once they are all in."""
    return _b3_upload(ctx, "ckpt", "step-2", "b3_ckpt",
                      {"writers": ctx.scale.ckpt_writers,
                       "shard_bytes": ctx.scale.ckpt_shard_bytes, "part": ctx.b3_part,
                       "conc_per_writer": max(1, ctx.b3_up_conc // ctx.scale.ckpt_writers)},
                      lambda r: _ckpt_shards(ctx, r["meta_size"]))


def ckpt_save_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """torch.save done safely: each rank writes rank-I.pt.tmp, fsyncs, os.replace()s."""
    n, size = ctx.scale.ckpt_writers, ctx.scale.ckpt_shard_bytes
    return _fs_checkpoint(
        ctx,
        s,
        "save",
        "torch_save",
        lambda m, top: {"directory": str(m.path(f"{top}/step-3")), "writers": n, "size": size},
        "step-3",
        lambda r: {f"rank-{i:03d}.pt": size for i in range(n)},
        lambda k: k.endswith(".pt.tmp"),
    )


def ckpt_save_b3(ctx: Ctx) -> Outcome:
    n, size = ctx.scale.ckpt_writers, ctx.scale.ckpt_shard_bytes
    return _b3_checkpoint(
        ctx, "save", "step-3", [(f"rank-{i:03d}.pt", f"wsave{i}", size) for i in range(n)]
    )


def ckpt_hf_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """Hugging Face Trainer: files into tmp-checkpoint-3/, then the directory renamed to
    checkpoint-3/ (durable: everything under checkpoint-3/, nothing left under the tmp name)."""
    from bench.worker import hf_files

    files = hf_files(ctx.scale.ckpt_writers, ctx.scale.ckpt_shard_bytes)
    return _fs_checkpoint(
        ctx,
        s,
        "hf",
        "hf_checkpoint",
        lambda m, top: {
            "top": str(m.path(top)),
            "step": 3,
            "writers": ctx.scale.ckpt_writers,
            "shard_bytes": ctx.scale.ckpt_shard_bytes,
        },
        "checkpoint-3",
        lambda r: {name: size for name, _, size in files},
        lambda k: "/tmp-checkpoint-3/" in k,
    )


def ckpt_hf_b3(ctx: Ctx) -> Outcome:
    from bench.worker import hf_files

    files = hf_files(ctx.scale.ckpt_writers, ctx.scale.ckpt_shard_bytes)
    return _b3_checkpoint(ctx, "hf", "checkpoint-3", files)


def _restore_objects(ctx: Ctx) -> dict[str, tuple[str, int]]:
    names = sorted(ctx.ds.ckpt_shards)
    return {n: (f"ckpt{i}", ctx.ds.ckpt_shards[n]) for i, n in enumerate(names)}


def ckpt_restore_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """Restore of the newest complete step on a fresh mount with an empty cache: list the
    steps, pick the newest with .metadata (a newer uncommitted one is seeded too), read its
    shards with one reader each (8 in a full run)."""
    want_step = ctx.ds.ckpt_dir.rsplit("/", 1)[1]
    with s.mounted(cold=True, profile="checkpoint") as m:
        meter = CpuMeter(ctx, m)
        r = _work(
            ctx,
            "restore_newest",
            {"root": str(m.path(ctx.ds.ckpt_root)), "threads": len(ctx.ds.ckpt_shards)},
            m,
        )
        cpu = meter.stop(r["bytes"])
    if r["step"] != want_step:
        raise BenchError(f"restored {r['step']}, the newest complete step is {want_step}")
    objs = _restore_objects(ctx)
    want = [_digest(*objs[n]) for n in r["shards"]]
    if sorted(r["shards"]) != sorted(objs) or r["digests"] != want:
        raise BenchError("WRONG DATA: a restored shard's xxh3 differs from the object's")
    return _finish(
        [Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], m, cpu=cpu
    )


def ckpt_restore_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    meter = CpuMeter(ctx, None)
    # Into memory, like the ranks of a restore that load their shard straight into tensors.
    r = _work(
        ctx,
        "b3_restore_newest",
        {
            "bucket": BUCKET,
            "prefix": _b3_key(ctx.ds.ckpt_root),
            "chunk": ctx.b3_chunk,
            "conc": ctx.b3_conc,
        },
    )
    cpu = _b3_cpu(ctx, meter, r, r["bytes"])
    if r["step"] != ctx.ds.ckpt_dir.rsplit("/", 1)[1]:
        raise BenchError(f"restored {r['step']}, not the newest complete step")
    _check_ranges(r["ranges"], _restore_objects(ctx), ctx.b3_chunk)
    return Outcome([Sample("read", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])], cpu=cpu)


# ---- a data loader over many small files (issue 15) --------------------------------------------


def _loader_names(ctx: Ctx) -> list[str]:
    """The same random files for every system in a repetition (a new draw per repetition)."""
    n = min(ctx.scale.loader_reads, ctx.ds.loader_count)
    pick = random.Random(1000 + ctx.rep).sample(range(ctx.ds.loader_count), n)
    return [ctx.ds.loader_name(i) for i in pick]


@lru_cache(maxsize=1 << 17)
def _loader_digest(i: int, size: int) -> str:
    return data.digest(f"ld{i}", size)


def _check_loader(ctx: Ctx, r: dict[str, Any]) -> None:
    if r["listed"] != ctx.ds.loader_count:
        raise BenchError(f"the listing shows {r['listed']} files, want {ctx.ds.loader_count}")
    if r["files"] < min(50, ctx.scale.loader_reads):
        raise BenchError(f"only {r['files']} files read before the time limit")
    for name, d in r["digests"].items():
        i = int(name[1:7])
        if d != _loader_digest(i, ctx.ds.loader_size(i)):
            raise BenchError(f"WRONG DATA: {name}'s xxh3 differs from the object's")


def _loader_samples(r: dict[str, Any]) -> list[Sample]:
    return [
        Sample("files", "files/s", _per_s(r["files"], r["seconds"]), r["seconds"]),
        Sample("list", "entries/s", _per_s(r["listed"], r["list_seconds"]), r["list_seconds"]),
    ]


def loader_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """16 threads open and read random ~100 KB files after one listing, cold mount."""
    names = _loader_names(ctx)
    with s.mounted(cold=True, profile="dataset") as m:
        meter = CpuMeter(ctx, m)
        r = _work(
            ctx,
            "loader",
            {
                "root": str(m.path(ctx.ds.loader_dir)),
                "names": names,
                "threads": 16,
                "time_limit": ctx.scale.loader_seconds,
            },
            m,
        )
        cpu = meter.stop(sum(ctx.ds.loader_size(int(n[1:7])) for n in r["digests"]))
    _check_loader(ctx, r)
    return _finish(_loader_samples(r), m, cpu=cpu)


def loader_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    meter = CpuMeter(ctx, None)
    r = _work(
        ctx,
        "b3_loader",
        {
            "bucket": BUCKET,
            "prefix": _b3_key(ctx.ds.loader_dir),
            "names": _loader_names(ctx),
            "threads": 16,
            "time_limit": ctx.scale.loader_seconds,
        },
    )
    cpu = _b3_cpu(ctx, meter, r, sum(ctx.ds.loader_size(int(n[1:7])) for n in r["digests"]))
    _check_loader(ctx, r)
    return Outcome(_loader_samples(r), cpu=cpu)


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


def _warm_objects(ctx: Ctx) -> dict[str, tuple[str, int]]:
    names = sorted(ctx.ds.warm_objects)
    return {n: (f"warm{i}", ctx.ds.warm_objects[n]) for i, n in enumerate(names)}


def warm_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """``caiosfs warm`` of the warm/ prefix into an empty cache dir (timed). Then, untimed, a
    mount on that cache dir reads every object: each must match the source by xxh3, and the
    mount must fetch (almost) nothing from the store, or the warm did not do its job."""
    assert isinstance(s, Caiosfs)
    cache = s.root / "warm-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    procs.drop_caches()
    try:
        secs = s.warm(ctx.ds.warm_dir, cache, ctx.scale.op_timeout)
        objs = _warm_objects(ctx)
        with s.mounted(cold=True, profile="dataset", cache_dir=cache) as m:
            r = _work(
                ctx,
                "readfiles",
                {"paths": [str(m.path(f"{ctx.ds.warm_dir}/{n}")) for n in objs], "threads": 4},
                m,
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    want = [_digest(*objs[n]) for n in objs]
    if r["digests"] != want:
        raise BenchError("WRONG DATA: an object read from the warmed cache differs from the source")
    fetched = (m.counters or {}).get("bytes_in")
    if fetched is None:
        raise BenchError(
            "caiosfs status gave no bytes_in: cannot tell whether warm filled the cache"
        )
    if fetched > 0.05 * ctx.ds.warm_bytes:
        raise BenchError(
            f"warm left the cache short: reading the warmed prefix fetched {fetched / MiB:.0f} "
            f"MiB of {ctx.ds.warm_bytes / MiB:.0f} MiB from the store"
        )
    return Outcome(
        [Sample("warm", "MB/s", _rate(ctx.ds.warm_bytes, secs), secs)],
        None,
        [f"read back from the warmed cache: {fetched / MiB:.1f} MiB fetched from the store"],
    )


def warm_b3(ctx: Ctx) -> Outcome:
    procs.drop_caches()
    objs = _warm_objects(ctx)
    keys = {_b3_key(f"{ctx.ds.warm_dir}/{n}"): ctx.ds.warm_objects[n] for n in objs}
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
    for n, (seed, size) in objs.items():
        if r["digests"].get(_b3_key(f"{ctx.ds.warm_dir}/{n}")) != _digest(seed, size):
            raise BenchError(f"WRONG DATA: downloaded {n} differs from the source")
    return Outcome([Sample("warm", "MB/s", _rate(r["bytes"], r["seconds"]), r["seconds"])])


WORKLOADS: list[Workload] = [
    Workload(
        "seq_read_cold",
        "sequential read, cold (empty caches)",
        seq_read_cold_fs,
        seq_read_b3,
        quick_wan=True,
        needs=("seq",),
    ),
    Workload(
        "seq_read_warm",
        "sequential read, warm (local cache full, page cache dropped)",
        seq_read_warm_fs,
        None,
        needs=("seq",),
    ),
    Workload(
        "rand_read_1m",
        "random 1 MiB reads, cold",
        rand_1m_fs,
        rand_1m_b3,
        needs=("seq",),
    ),
    Workload("rand_read_4k", "random 4 KiB reads, cold", rand_4k_fs, rand_4k_b3, needs=("seq",)),
    Workload(
        "seq_write",
        "sequential write + close, and until durable",
        seq_write_fs,
        seq_write_b3,
        needs=(),
    ),
    Workload(
        "tree_copy",
        "copy of a source tree (cp -r), close and durable",
        tree_copy_fs,
        tree_copy_b3,
        needs=(),
    ),
    Workload(
        "tree_restore",
        "restore of that tree on a fresh mount (find + read all)",
        tree_restore_fs,
        tree_restore_b3,
        needs=("tree",),
    ),
    Workload(
        "stat",
        "ls -l of a directory of many objects, cold and warm",
        stat_fs,
        stat_b3,
        needs=("stat",),
    ),
    Workload(
        "ckpt_write",
        "checkpoint: N writers x shard + fsync, then rename commit",
        ckpt_write_fs,
        ckpt_write_b3,
        needs=(),
    ),
    Workload(
        "ckpt_save",
        "checkpoint, torch.save pattern: N ranks write rank-I.pt.tmp + fsync + os.replace",
        ckpt_save_fs,
        ckpt_save_b3,
        needs=(),
    ),
    Workload(
        "ckpt_hf",
        "checkpoint, Hugging Face Trainer: files into tmp-checkpoint-N/, rename to checkpoint-N/",
        ckpt_hf_fs,
        ckpt_hf_b3,
        needs=(),
    ),
    Workload(
        "ckpt_restore",
        "checkpoint restore: find the newest complete step, its N shards read in parallel, cold",
        ckpt_restore_fs,
        ckpt_restore_b3,
        quick_wan=True,
        needs=("ckpt",),
    ),
    Workload(
        "loader",
        "data loader: 16 threads read random ~100 KB files after one listing, cold",
        loader_fs,
        loader_b3,
        quick_wan=True,
        needs=("loader",),
    ),
    Workload("fio_seq", "fio sequential read 1 MiB, cold", fio_seq_fs, None, needs=("seq",)),
    Workload("fio_rand", "fio random read 4 KiB x 4 jobs, cold", fio_rand_fs, None, needs=("seq",)),
    Workload(
        "warm",
        "pre-warm a prefix into the local cache (caiosfs warm)",
        warm_fs,
        warm_b3,
        only_fs=("caiosfs",),
        needs=("warm",),
    ),
    Workload(
        "wan_ceiling",
        "the WAN proxy's own ceiling: raw boto3 ranged GETs, twice the usual number in flight, "
        "through the proxy and straight to the server",
        None,
        wan_ceiling_b3,
        nets=("wan",),
        quick_wan=True,
        needs=("seq",),
    ),
]


# Workloads defined in other modules of bench/: each such module has a list WORKLOADS of
# Workload, appended here in this order (a module that does not exist yet is skipped). To
# add one, add a line below: nothing else needs to change.
EXTRA_MODULES = (
    "bench.transfer",  # caiosfs cp and friends
    "bench.devtree",  # git / pip in a mounted work tree
)


def _load_extra() -> None:
    import importlib

    for name in EXTRA_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        WORKLOADS.extend(mod.WORKLOADS)


_load_extra()
