"""Bulk-copy workloads (issue 18): ``caiosfs cp`` against ``rclone copy --transfers 16`` and
raw boto3, both directions, on the data the other workloads already seeded.

- ``cp_down``: S3 -> a local directory: the 1,000-file tree (files/s), the checkpoint's
  8 x 128 MiB shards (MB/s), the 1 GiB object (MB/s).
- ``cp_up``: the same three, from local files to a fresh prefix.
- ``cp_shards``: 4 ``caiosfs cp --shard I/4`` processes at once into one directory (the tree
  and the checkpoint): every object exactly once, byte-identical.

Wall time of the whole command for caiosfs and rclone (start-up and listing included, as
a user pays them); boto3 is timed inside its worker (no interpreter start-up): 16 threads
of ranged GETs of 16 MiB into files (``b3_download``), one PUT per file of the tree
(``b3_put_tree``, 16 threads), managed multipart uploads of 64 MiB parts of generated data
(``b3_ckpt``: all shards at once, 2 parts each; ``b3_put``: 8 parts in flight). Downloads
start with the page cache dropped; upload sources stay in it. Downloads are checked by hash
against the source; uploads by size and, in quick runs (else a sample), by hash of what the
store holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import xxhash

from bench import data, procs
from bench.procs import BenchError
from bench.scale import MiB
from bench.store import BUCKET, PREFIX
from bench.systems import FsSystem, base_env
from bench.workloads import MB, CpuMeter, Ctx, Outcome, Sample, Workload, _out_dir, _work

RCLONE_FLAGS = ("--transfers", "16")


def _file_hash(p: Path) -> str:
    h = xxhash.xxh3_64()
    with open(p, "rb") as f:
        for _ in range(1 << 22):
            b = f.read(8 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@lru_cache(maxsize=4)
def _tree_hashes(root: str) -> dict[str, str]:
    r = Path(root)
    return {str(p.relative_to(r)): _file_hash(p) for p in r.rglob("*") if p.is_file()}


def _sets(ctx: Ctx) -> dict[str, tuple[str, dict[str, int], dict[str, str], str]]:
    """name -> (prefix relative to the bench prefix, {rel: size}, {rel: xxh3}, unit)."""
    ds = ctx.ds
    ckpt = {n: s for n, s in ds.ckpt_shards.items()}
    ckpt_h = {f"shard-{i:03d}.distcp": data.digest(f"ckpt{i}", s)
              for i, s in enumerate(ckpt.values())}
    seq_dir, seq_name = ds.seq_key.rsplit("/", 1)
    return {
        "tree": (ds.tree_dir, dict(ds.tree_files), _tree_hashes(ds.local_tree), "files/s"),
        "ckpt": (ds.ckpt_dir, ckpt, ckpt_h, "MB/s"),
        "big": (seq_dir, {seq_name: ds.seq_size}, {seq_name: ds.seq_digest}, "MB/s"),
    }


def _local_sources(ctx: Ctx) -> dict[str, Path]:
    """Local copies of the three sets (generated once per run) for the upload direction."""
    root = ctx.workdir / "cp-src"
    out = {"tree": Path(ctx.ds.local_tree)}
    for name, (_, sizes, _, _) in _sets(ctx).items():
        if name == "tree":
            continue
        d = root / name
        out[name] = d
        for i, (rel, size) in enumerate(sorted(sizes.items())):
            p = d / rel
            if p.exists() and p.stat().st_size == size:
                continue
            d.mkdir(parents=True, exist_ok=True)
            seed = f"ckpt{i}" if name == "ckpt" else "seq"
            with open(p, "wb") as f:
                f.writelines(data.chunk(seed, off // MiB, min(MiB, size - off)) for off in range(0, size, MiB))
    return out


def _sample(name: str, unit: str, sizes: dict[str, int], secs: float) -> Sample:
    n = len(sizes) if unit == "files/s" else sum(sizes.values()) / MB
    return Sample(name, unit, n / secs if secs > 0 else float("inf"), secs)


def _check_local(d: Path, hashes: dict[str, str], what: str) -> None:
    got = {str(p.relative_to(d)): p for p in d.rglob("*") if p.is_file()}
    missing = set(hashes) - set(got)
    if missing:
        raise BenchError(f"{what}: {len(missing)} files missing, e.g. {min(missing)}")
    for rel, want in hashes.items():
        if _file_hash(got[rel]) != want:
            raise BenchError(f"WRONG DATA: {what}/{rel} differs from the source")


def _check_store(ctx: Ctx, d: str, sizes: dict[str, int], hashes: dict[str, str]) -> None:
    have = ctx.store.list_sizes(d + "/")
    have = {k[len(d) + 1:]: v for k, v in have.items()}
    if {k: have.get(k) for k in sizes} != sizes:
        raise BenchError(f"{d}: the store does not hold every object with its size")
    names = sorted(hashes) if ctx.verify_all else sorted(hashes)[:: max(1, len(hashes) // 20)]
    for rel in names:
        if ctx.store.object_digest(f"{d}/{rel}") != hashes[rel]:
            raise BenchError(f"WRONG DATA in the store for {d}/{rel}")


def _rclone_env(s: FsSystem) -> dict[str, str]:
    env = base_env()
    env.pop("AWS_CA_BUNDLE", None)  # Debian's rclone refuses it; nothing here uses TLS
    r = "RCLONE_CONFIG_BENCHS3_"
    env.update({r + "TYPE": "s3", r + "PROVIDER": "Other", r + "ENDPOINT": s.env.endpoint,
                r + "ACCESS_KEY_ID": s.env.access_key, r + "SECRET_ACCESS_KEY": s.env.secret_key,
                r + "REGION": "us-east-1", r + "FORCE_PATH_STYLE": "true"})
    return env


def _copy_cmd(s: FsSystem, src: str, dst: str) -> tuple[list[str], dict[str, str]]:
    """The command copying src to dst (each a local path or a key under the bench prefix,
    written s3:REL)."""
    if s.name.startswith("caiosfs"):  # (caiosfs-base too: another build, --caiosfs-base)
        def side(x: str) -> str:
            return f"s3://{BUCKET}/{PREFIX}/{x[3:]}" if x.startswith("s3:") else x
        return ([str(s.binary), "cp", side(src), side(dst), "-q", "-o",  # type: ignore[attr-defined]
                 f"endpoint={s.env.endpoint},path_style"], s.child_env())  # type: ignore[attr-defined]

    def rside(x: str) -> str:
        return f"benchs3:{BUCKET}/{PREFIX}/{x[3:]}" if x.startswith("s3:") else x
    return (["rclone", "--config", "/dev/null", "copy", *RCLONE_FLAGS, "--s3-no-check-bucket",
             rside(src), rside(dst)], _rclone_env(s))


def _cpu_of(cpu: dict[str, float], name: str, part: dict[str, float]) -> None:
    """One data set's CPU figures, under its name (bench.report.cpu_parts)."""
    cpu.update({f"{name}:{k}": v for k, v in part.items()})


def cp_down_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    samples, cpu = [], {}
    for name, (prefix, sizes, hashes, unit) in _sets(ctx).items():
        dest = s.root / f"cp-down-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        procs.drop_caches()
        argv, env = _copy_cmd(s, f"s3:{prefix}", str(dest))
        try:
            meter = CpuMeter(ctx, None)
            res = procs.run_bounded(argv, ctx.scale.op_timeout, env=env)
            _cpu_of(cpu, name, meter.stop(sum(sizes.values()), res.cpu_s))
            _check_local(dest, hashes, f"{s.name} {name}")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        samples.append(_sample(name, unit, sizes, res.seconds))
    return Outcome(samples, cpu=cpu)


def cp_down_b3(ctx: Ctx) -> Outcome:
    samples, cpu = [], {}
    for name, (prefix, sizes, _, unit) in _sets(ctx).items():
        dest = ctx.workdir / f"b3-cp-down-{name}"
        procs.drop_caches()
        try:
            meter = CpuMeter(ctx, None)
            r = _work(ctx, "b3_download", {
                "bucket": BUCKET, "keys": {f"{PREFIX}/{prefix}/{k}": v for k, v in sizes.items()},
                "dest": str(dest), "chunk": ctx.b3_chunk, "conc": 16})
            # (the worker's untimed read-back of its files costs the store nothing)
            _cpu_of(cpu, name, meter.stop(sum(sizes.values()), r.get("cpu_s")))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        samples.append(_sample(name, unit, sizes, r["seconds"]))
    return Outcome(samples, cpu=cpu)


def cp_up_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    samples, cpu = [], {}
    src = _local_sources(ctx)
    for name, (_, sizes, hashes, unit) in _sets(ctx).items():
        d = _out_dir(ctx, s.name, f"cp-{name}")
        # (no drop_caches: the sources stay in the page cache, as boto3's are in memory)
        argv, env = _copy_cmd(s, str(src[name]), f"s3:{d}")
        try:
            meter = CpuMeter(ctx, None)
            res = procs.run_bounded(argv, ctx.scale.op_timeout, env=env)
            _cpu_of(cpu, name, meter.stop(sum(sizes.values()), res.cpu_s))
            _check_store(ctx, d, sizes, hashes)
        finally:
            ctx.store.delete_prefix(d + "/")
        samples.append(_sample(name, unit, sizes, res.seconds))
    return Outcome(samples, cpu=cpu)


def cp_up_b3(ctx: Ctx) -> Outcome:
    samples, cpu = [], {}
    src = _local_sources(ctx)
    for name, (_, sizes, _, unit) in _sets(ctx).items():
        d = _out_dir(ctx, "boto3", f"cp-{name}")
        meter = CpuMeter(ctx, None)
        try:
            if name == "tree":
                r = _work(ctx, "b3_put_tree", {"bucket": BUCKET, "prefix": f"{PREFIX}/{d}",
                                               "root": str(src[name]), "threads": 16})
                secs = r["t_close"] - r["t_start"]
            elif name == "ckpt":  # all shards at once, two parts in flight each
                r = _work(ctx, "b3_ckpt", {
                    "bucket": BUCKET, "prefix": f"{PREFIX}/{d}", "writers": len(sizes),
                    "shard_bytes": max(sizes.values()), "part": ctx.b3_part,
                    "conc_per_writer": 2})
                secs = r["t_shards"] - r["t_start"]
            else:
                (rel, size), = sizes.items()
                r = _work(ctx, "b3_put", {
                    "bucket": BUCKET, "key": f"{PREFIX}/{d}/{rel}", "size": size,
                    "seed": "seq", "part": ctx.b3_part, "conc": ctx.b3_conc})
                secs = r["t_close"] - r["t_start"]
            _cpu_of(cpu, name, meter.stop(sum(sizes.values()), r.get("cpu_s")))
        finally:
            ctx.store.delete_prefix(d + "/")
        samples.append(_sample(name, unit, sizes, secs))
    return Outcome(samples, cpu=cpu)


def cp_shards_fs(ctx: Ctx, s: FsSystem) -> Outcome:
    """4 ``caiosfs cp --shard I/4`` at once into one directory, for the tree and the
    checkpoint; every object exactly once (the copied counts add up), byte-identical."""
    samples = []
    for name, (prefix, sizes, hashes, unit) in _sets(ctx).items():
        if name == "big":
            continue
        dest = s.root / f"cp-shards-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        procs.drop_caches()
        argv, env = _copy_cmd(s, f"s3:{prefix}", str(dest))
        argv = [a for a in argv if a != "-q"] + ["--json"]
        t0 = time.monotonic()
        ps = [subprocess.Popen(argv + ["--shard", f"{i}/4"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(4)]
        try:
            outs = [p.communicate(timeout=ctx.scale.op_timeout) for p in ps]
        except subprocess.TimeoutExpired:
            for p in ps:
                p.kill()
            raise BenchError("4 shards did not finish in time") from None
        secs = time.monotonic() - t0
        try:
            if any(p.returncode for p in ps):
                raise BenchError("a shard failed: " + " | ".join(e.strip()[-300:] for _, e in outs))
            copied = sum(json.loads(o.strip().splitlines()[-1])["copied"] for o, _ in outs)
            n = len(list(dest.rglob("*"))) - sum(1 for p in dest.rglob("*") if p.is_dir())
            if copied != n:
                raise BenchError(f"{copied} objects copied by the 4 shards, {n} files made")
            _check_local(dest, hashes, f"4 shards {name}")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        samples.append(_sample(name, unit, sizes, secs))
    return Outcome(samples)


TRANSFER_WORKLOADS = [
    Workload("cp_down", "bulk copy S3 -> directory (caiosfs cp, rclone copy --transfers 16)",
             cp_down_fs, cp_down_b3, only_fs=("caiosfs", "caiosfs-base", "rclone")),
    Workload("cp_up", "bulk copy directory -> S3 (caiosfs cp, rclone copy --transfers 16)",
             cp_up_fs, cp_up_b3, only_fs=("caiosfs", "caiosfs-base", "rclone")),
    Workload("cp_shards", "4 caiosfs cp --shard I/4 at once into one directory",
             cp_shards_fs, None, only_fs=("caiosfs",)),
]


# The name bench/workloads.py's registry looks for.
WORKLOADS = TRANSFER_WORKLOADS
