"""The measured operations, each run as ``python -m bench.worker OP '{json args}'``.

Running them in a child process keeps the benchmark itself out of the way (its own memory, its
GIL, its RSS sampler) and lets the parent kill an operation stuck on a hung mount. Each op
prints one JSON line. Times are ``time.monotonic()`` values: CLOCK_MONOTONIC is system-wide, so
the parent can compare them with its own clock (e.g. "durable at" minus "writing started").
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from bench import data

MiB = 1 << 20


# ---- through a mount (plain POSIX calls) ------------------------------------------------------


def op_seqread(path: str, bufsize: int = MiB) -> dict[str, Any]:
    """Read a file front to back with ``readv`` into one buffer (no per-read allocation),
    hashing as we go (xxh3 runs at >10 GB/s here, far above any mount)."""
    view = memoryview(bytearray(bufsize))
    h = xxhash.xxh3_64()
    n = 0
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(1 << 40):
            k = os.readv(fd, [view])
            if k <= 0:
                break
            h.update(view[:k])
            n += k
    finally:
        os.close(fd)
    return {"bytes": n, "seconds": time.monotonic() - t0, "digest": h.hexdigest()}


def _offsets(size: int, bs: int, count: int, seed: int) -> list[int]:
    """The same random 4 KiB-aligned offsets for every system (same seed)."""
    rng = random.Random(seed)
    top = max(0, size - bs) // 4096
    return [rng.randint(0, top) * 4096 for _ in range(count)]


def op_randread(
    path: str, bs: int, count: int, seed: int, time_limit: float, size: int
) -> dict[str, Any]:
    """``count`` preads of ``bs`` bytes at random offsets, one at a time (like a data loader
    fetching samples), stopping early after ``time_limit`` seconds so a slow system still
    finishes; the rate is ops done over time spent."""
    offsets = _offsets(size, bs, count, seed)
    fd = os.open(path, os.O_RDONLY)
    done = 0
    nbytes = 0
    h = xxhash.xxh3_64()
    t0 = time.monotonic()
    try:
        for off in offsets:
            b = os.pread(fd, bs, off)
            if len(b) != min(bs, size - off):
                raise RuntimeError(f"short read at {off}: {len(b)} bytes")
            h.update(b)
            nbytes += len(b)
            done += 1
            if time.monotonic() - t0 > time_limit:
                break
    finally:
        os.close(fd)
    return {"ops": done, "bytes": nbytes, "seconds": time.monotonic() - t0, "digest": h.hexdigest()}


def _write_file(
    path: str, seed: str, size: int, fsync: bool, chunk: int = MiB
) -> tuple[str, float]:
    """Write ``size`` bytes of stream ``seed`` in ``chunk``-sized writes; return digest and the
    time after close (and fsync, if asked)."""
    h = xxhash.xxh3_64()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, size, chunk):
            b = data.chunk(seed, i // MiB, min(chunk, size - i))
            h.update(b)
            view = memoryview(b)
            while view:
                k = os.write(fd, view)
                view = view[k:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest(), time.monotonic()


def op_write(path: str, size: int, seed: str) -> dict[str, Any]:
    """Sequential write of a new file in 1 MiB writes, then close (no fsync: "time to close")."""
    t0 = time.monotonic()
    digest, t_close = _write_file(path, seed, size, fsync=False)
    return {"t_start": t0, "t_close": t_close, "digest": digest}


def op_checkpoint(directory: str, writers: int, shard_bytes: int) -> dict[str, Any]:
    """The PyTorch DCP pattern: N writers each write a shard and fsync it in parallel, then
    ``.metadata.tmp`` is written, fsynced and renamed over ``.metadata`` (the commit)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    digests: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        name = f"shard-{i:03d}.distcp"
        d, _ = _write_file(os.path.join(directory, name), f"wckpt{i}", shard_bytes, fsync=True)
        with lock:
            digests[name] = d

    with ThreadPoolExecutor(writers) as ex:
        for _ in ex.map(one, range(writers)):
            pass
    t_shards = time.monotonic()
    meta = json.dumps({"shards": sorted(digests)}).encode()
    tmp = os.path.join(directory, ".metadata.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, meta)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, ".metadata"))
    return {
        "t_start": t0,
        "t_shards": t_shards,
        "t_commit": time.monotonic(),
        "digests": digests,
        "meta_size": len(meta),
    }


def op_readtree(root: str) -> dict[str, Any]:
    """find + read every file (a restore), one file at a time like ``tar c`` would; the xxh3
    of every file, keyed by its path below ``root``."""
    t0 = time.monotonic()
    files = 0
    nbytes = 0
    digests: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            h = xxhash.xxh3_64()
            with open(p, "rb", buffering=0) as f:
                for _ in range(1 << 30):
                    b = f.read(MiB)
                    if not b:
                        break
                    h.update(b)
                    nbytes += len(b)
            digests[os.path.relpath(p, root)] = h.hexdigest()
            files += 1
    return {
        "files": files,
        "bytes": nbytes,
        "seconds": time.monotonic() - t0,
        "digests": digests,
    }


def op_readfiles(paths: list[str], threads: int) -> dict[str, Any]:
    """Read several files in parallel, one thread each (a checkpoint restore)."""
    t0 = time.monotonic()

    def one(p: str) -> tuple[str, int]:
        h = xxhash.xxh3_64()
        n = 0
        with open(p, "rb", buffering=0) as f:
            for _ in range(1 << 40):
                b = f.read(4 * MiB)
                if not b:
                    break
                h.update(b)
                n += len(b)
        return h.hexdigest(), n

    with ThreadPoolExecutor(threads) as ex:
        res = list(ex.map(one, paths))
    return {
        "bytes": sum(n for _, n in res),
        "seconds": time.monotonic() - t0,
        "digests": [d for d, _ in res],
    }


# ---- raw boto3 (the physical limit) ---------------------------------------------------------


def _client(pool: int = 64) -> Any:
    from bench.store import make_client

    return make_client(
        os.environ["BENCH_ENDPOINT"],
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        pool=pool,
    )


def _cpu() -> float:
    """CPU seconds (user + system) this worker process has used so far, all threads."""
    t = os.times()
    return t.user + t.system


def _get_ranges(
    c: Any, bucket: str, jobs: list[tuple[str, int, int]], conc: int
) -> dict[str, dict[str, str]]:
    """GET every (key, offset, length) range, ``conc`` in flight, into memory; return
    {key: {offset: xxh3 of the range}} so the caller can check every byte against the source
    (xxh3 costs ~0.1 s of CPU per GiB, small next to the request's own)."""

    def one(job: tuple[str, int, int]) -> tuple[str, int, str]:
        key, off, n = job
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"]
        h = xxhash.xxh3_64()
        got = 0
        for _ in range(1 << 30):
            b = body.read(MiB)
            if not b:
                break
            h.update(b)
            got += len(b)
        if got != n:
            raise RuntimeError(f"short ranged GET of {key} at {off}: {got} of {n} bytes")
        return key, off, h.hexdigest()

    out: dict[str, dict[str, str]] = {}
    with ThreadPoolExecutor(conc) as ex:
        for key, off, d in ex.map(one, jobs):
            out.setdefault(key, {})[str(off)] = d
    return out


def op_b3_get(bucket: str, keys: dict[str, int], chunk: int, conc: int) -> dict[str, Any]:
    """Parallel ranged GETs of ``chunk`` bytes of whole objects into memory, ``conc`` in flight
    over all of them (the network limit); every range hashed."""
    c = _client(conc + 8)
    jobs = [
        (key, off, min(chunk, size - off))
        for key, size in keys.items()
        for off in range(0, size, chunk)
    ]
    cpu0 = _cpu()
    t0 = time.monotonic()
    ranges = _get_ranges(c, bucket, jobs, conc)
    return {
        "bytes": sum(n for _, _, n in jobs),
        "seconds": time.monotonic() - t0,
        "cpu_s": _cpu() - cpu0,
        "ranges": ranges,
    }


def op_b3_download(
    bucket: str, keys: dict[str, int], dest: str, chunk: int, conc: int
) -> dict[str, Any]:
    """Parallel ranged GETs of many objects into local files (what a cache warm must do).

    All objects' ranges go into one pool, so small objects do not serialize the transfer."""
    c = _client(conc + 8)
    Path(dest).mkdir(parents=True, exist_ok=True)
    cpu0 = _cpu()
    t0 = time.monotonic()
    fds = {}
    jobs = []
    for key, size in keys.items():
        p = Path(dest) / key.replace("/", "_")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        fds[key] = fd
        jobs.extend((key, off, min(off + chunk, size) - 1) for off in range(0, size, chunk))

    def one(job: tuple[str, int, int]) -> int:
        key, off, end = job
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"]
        pos = off
        for _ in range(1 << 30):
            b = body.read(MiB)
            if not b:
                break
            os.pwrite(fds[key], b, pos)
            pos += len(b)
        return pos - off

    try:
        with ThreadPoolExecutor(conc) as ex:
            n = sum(ex.map(one, jobs))
        for fd in fds.values():
            os.fsync(fd)  # a warm cache is on disk, not in the page cache
        seconds = time.monotonic() - t0
        cpu = _cpu() - cpu0
        digests = {}
        for key, fd in fds.items():  # untimed: what landed on disk, for the caller to check
            h = xxhash.xxh3_64()
            for off in range(0, keys[key], 8 * MiB):
                h.update(os.pread(fd, 8 * MiB, off))
            digests[key] = h.hexdigest()
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"bytes": n, "seconds": seconds, "digests": digests, "cpu_s": cpu}


def op_b3_randget(
    bucket: str, key: str, size: int, bs: int, count: int, seed: int, time_limit: float
) -> dict[str, Any]:
    """One ranged GET per random read, one at a time: the same offsets as op_randread."""
    c = _client()
    offsets = _offsets(size, bs, count, seed)
    done = 0
    nbytes = 0
    h = xxhash.xxh3_64()
    t0 = time.monotonic()
    for off in offsets:
        end = min(off + bs, size) - 1
        b = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"].read()
        if len(b) != end + 1 - off:
            raise RuntimeError(f"short ranged GET at {off}: {len(b)} bytes")
        h.update(b)
        nbytes += len(b)
        done += 1
        if time.monotonic() - t0 > time_limit:
            break
    return {
        "ops": done,
        "bytes": nbytes,
        "seconds": time.monotonic() - t0,
        "digest": h.hexdigest(),
    }


def _b3_upload(c: Any, bucket: str, key: str, seed: str, size: int, part: int, conc: int) -> str:
    import io

    from boto3.s3.transfer import TransferConfig

    stream = data.Stream(seed, size)
    c.upload_fileobj(
        io.BufferedReader(stream, buffer_size=MiB),
        bucket,
        key,
        Config=TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc
        ),
    )
    return stream.hasher.hexdigest()


def op_b3_put(bucket: str, key: str, size: int, seed: str, part: int, conc: int) -> dict[str, Any]:
    """A managed multipart upload of ``size`` bytes (``part`` bytes per part, ``conc`` parts
    in flight), generated on the fly, as a writer process would produce them."""
    c = _client(conc + 8)
    cpu0 = _cpu()
    t0 = time.monotonic()
    digest = _b3_upload(c, bucket, key, seed, size, part, conc)
    return {
        "t_start": t0,
        "t_close": time.monotonic(),
        "digest": digest,
        "cpu_s": _cpu() - cpu0,
    }


def op_b3_ckpt(
    bucket: str, prefix: str, writers: int, shard_bytes: int, part: int, conc_per_writer: int
) -> dict[str, Any]:
    """The checkpoint pattern as raw uploads: one multipart upload per shard, all in parallel,
    then the small metadata object."""
    c = _client(writers * conc_per_writer + 8)
    cpu0 = _cpu()
    t0 = time.monotonic()

    def one(i: int) -> tuple[str, str]:
        name = f"shard-{i:03d}.distcp"
        d = _b3_upload(
            c, bucket, f"{prefix}/{name}", f"wckpt{i}", shard_bytes, part, conc_per_writer
        )
        return name, d

    with ThreadPoolExecutor(writers) as ex:
        digests = dict(ex.map(one, range(writers)))
    meta = json.dumps({"shards": sorted(digests)}).encode()
    c.put_object(Bucket=bucket, Key=f"{prefix}/.metadata", Body=meta)
    t1 = time.monotonic()
    return {
        "t_start": t0,
        "t_shards": t1,
        "t_commit": t1,
        "digests": digests,
        "meta_size": len(meta),
        "cpu_s": _cpu() - cpu0,
    }


def op_b3_put_tree(bucket: str, prefix: str, root: str, threads: int) -> dict[str, Any]:
    """One PUT per file of a local tree, ``threads`` at a time."""
    c = _client(threads + 8)
    files = [p for p in sorted(Path(root).rglob("*")) if p.is_file()]
    cpu0 = _cpu()
    t0 = time.monotonic()

    def one(p: Path) -> None:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(root)}", Body=p.read_bytes())

    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(one, files):
            pass
    t1 = time.monotonic()
    return {"t_start": t0, "t_close": t1, "files": len(files), "cpu_s": _cpu() - cpu0}


def op_b3_get_tree(bucket: str, prefix: str, threads: int) -> dict[str, Any]:
    """List a prefix and GET every object, ``threads`` at a time (a raw restore)."""
    c = _client(threads + 8)
    cpu0 = _cpu()
    t0 = time.monotonic()
    keys = [k for k, _ in _list(c, bucket, prefix)]

    def one(k: str) -> tuple[str, int, str]:
        b = c.get_object(Bucket=bucket, Key=k)["Body"].read()
        return k[len(prefix) :], len(b), xxhash.xxh3_64(b).hexdigest()

    with ThreadPoolExecutor(threads) as ex:
        got = list(ex.map(one, keys))
    return {
        "files": len(keys),
        "bytes": sum(n for _, n, _ in got),
        "seconds": time.monotonic() - t0,
        "cpu_s": _cpu() - cpu0,
        "digests": {rel: d for rel, _, d in got},
    }


def _list(c: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    token = None
    for _ in range(100_000):
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = c.list_objects_v2(**kw)
        out.extend((o["Key"], o["Size"]) for o in page.get("Contents", []))
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    return out


def op_b3_list(bucket: str, prefix: str) -> dict[str, Any]:
    """ListObjectsV2 of a prefix: what any stat-from-listing design must at least pay."""
    c = _client()
    t0 = time.monotonic()
    n = len(_list(c, bucket, prefix))
    return {"entries": n, "seconds": time.monotonic() - t0}


# ---- what trainers and data loaders do (issue 15) --------------------------------------------


def op_torch_save(directory: str, writers: int, size: int) -> dict[str, Any]:
    """``torch.save`` made safe, as trainers do it: every rank writes ``rank-I.pt.tmp``,
    fsyncs it and ``os.replace``s it over ``rank-I.pt``, all ranks at once."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(i: int) -> None:
        name = f"rank-{i:03d}.pt"
        tmp = os.path.join(directory, name + ".tmp")
        d, _ = _write_file(tmp, f"wsave{i}", size, fsync=True)
        os.replace(tmp, os.path.join(directory, name))
        with lock:
            digests[name] = d

    with ThreadPoolExecutor(writers) as ex:
        for _ in ex.map(one, range(writers)):
            pass
    return {"t_start": t0, "t_commit": time.monotonic(), "digests": digests}


def hf_files(writers: int, shard_bytes: int) -> list[tuple[str, str, int]]:
    """(name, seed, size) of a Hugging Face Trainer checkpoint: model shards, the optimizer
    state (as big as one shard here), and the small files next to them."""
    files = [
        (f"model-{i + 1:05d}-of-{writers:05d}.safetensors", f"whf{i}", shard_bytes)
        for i in range(writers)
    ]
    files.append(("optimizer.pt", "whfopt", shard_bytes))
    files += [
        ("scheduler.pt", "whfsched", 1_064),
        ("rng_state.pth", "whfrng", 14_244),
        ("trainer_state.json", "whfstate", 4_096),
        ("training_args.bin", "whfargs", 5_304),
        ("config.json", "whfcfg", 700),
    ]
    return files


def op_hf_checkpoint(top: str, step: int, writers: int, shard_bytes: int) -> dict[str, Any]:
    """The Hugging Face Trainer pattern: every file of step N goes into ``tmp-checkpoint-N/``
    (the shards by ``writers`` threads at once, no fsync, as the Trainer does), then the
    directory is renamed to ``checkpoint-N/`` (the commit)."""
    tmp = os.path.join(top, f"tmp-checkpoint-{step}")
    Path(tmp).mkdir(parents=True, exist_ok=True)
    files = hf_files(writers, shard_bytes)
    digests: dict[str, str] = {}
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(f: tuple[str, str, int]) -> None:
        d, _ = _write_file(os.path.join(tmp, f[0]), f[1], f[2], fsync=False)
        with lock:
            digests[f[0]] = d

    with ThreadPoolExecutor(writers) as ex:
        for _ in ex.map(one, files):
            pass
    t_files = time.monotonic()
    os.rename(tmp, os.path.join(top, f"checkpoint-{step}"))
    return {"t_start": t0, "t_files": t_files, "t_commit": time.monotonic(), "digests": digests}


def op_restore_newest(root: str, threads: int) -> dict[str, Any]:
    """Restore the newest complete DCP step below ``root``: list the steps, take the highest
    one that has ``.metadata`` (the commit marker), read the shard names from it and read all
    shards with ``threads`` readers at once; every shard hashed."""
    t0 = time.monotonic()
    steps = []
    for name in os.listdir(root):
        complete = os.path.exists(os.path.join(root, name, ".metadata"))
        if name.startswith("step-") and name[5:].isdigit() and complete:
            steps.append((int(name[5:]), name))
    if not steps:
        raise RuntimeError(f"no complete step below {root}")
    step = max(steps)[1]
    with open(os.path.join(root, step, ".metadata"), "rb") as f:
        shards = json.loads(f.read())["shards"]
    res = op_readfiles([os.path.join(root, step, s) for s in shards], threads)
    return {**res, "seconds": time.monotonic() - t0, "step": step, "shards": shards}


def op_b3_restore_newest(bucket: str, prefix: str, chunk: int, conc: int) -> dict[str, Any]:
    """The same restore in raw boto3: list the steps, GET the newest complete step's
    ``.metadata``, then ranged GETs of all its shards, ``conc`` in flight, into memory."""
    c = _client(conc + 8)
    cpu0 = _cpu()
    t0 = time.monotonic()
    objs = dict(_list(c, bucket, prefix + "/"))
    steps = []
    for key in objs:
        rel = key[len(prefix) + 1 :]
        name, _, rest = rel.partition("/")
        if rest == ".metadata" and name.startswith("step-") and name[5:].isdigit():
            steps.append((int(name[5:]), name))
    if not steps:
        raise RuntimeError(f"no complete step below {prefix}")
    step = max(steps)[1]
    base = f"{prefix}/{step}/"
    shards = json.loads(c.get_object(Bucket=bucket, Key=base + ".metadata")["Body"].read())[
        "shards"
    ]
    jobs = [
        (base + s, off, min(chunk, objs[base + s] - off))
        for s in shards
        for off in range(0, objs[base + s], chunk)
    ]
    ranges = _get_ranges(c, bucket, jobs, conc)
    return {
        "bytes": sum(n for _, _, n in jobs),
        "seconds": time.monotonic() - t0,
        "cpu_s": _cpu() - cpu0,
        "step": step,
        "ranges": {k[len(base) :]: v for k, v in ranges.items()},
    }


def op_b3_put_files(
    bucket: str, prefix: str, files: list[list[Any]], part: int, conc: int
) -> dict[str, Any]:
    """Upload (name, seed, size) files under ``prefix``: all files at once, ``conc`` parts in
    flight in all (a managed multipart upload per big file, one PUT per small one)."""
    from boto3.s3.transfer import TransferConfig

    c = _client(conc + len(files) + 8)
    per_file = max(1, conc // max(1, sum(1 for f in files if f[2] >= part)))
    cfg = TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=per_file
    )
    import io

    cpu0 = _cpu()
    t0 = time.monotonic()

    def one(f: list[Any]) -> tuple[str, str]:
        name, seed, size = f
        stream = data.Stream(seed, size)
        c.upload_fileobj(
            io.BufferedReader(stream, buffer_size=MiB), bucket, f"{prefix}/{name}", Config=cfg
        )
        return name, stream.hasher.hexdigest()

    with ThreadPoolExecutor(len(files)) as ex:
        digests = dict(ex.map(one, files))
    t1 = time.monotonic()
    return {"t_start": t0, "t_commit": t1, "digests": digests, "cpu_s": _cpu() - cpu0}


def op_loader(root: str, names: list[str], threads: int, time_limit: float) -> dict[str, Any]:
    """A data loader: list the directory once (timed apart), then ``threads`` workers open
    and read the given files (random names from the listing), each file whole; xxh3 of each.
    Stops starting new files after ``time_limit`` seconds."""
    t0 = time.monotonic()
    listed = len(os.listdir(root))
    t1 = time.monotonic()

    def one(name: str) -> tuple[str, str] | None:
        if time.monotonic() - t1 > time_limit:
            return None
        h = xxhash.xxh3_64()
        with open(os.path.join(root, name), "rb", buffering=0) as f:
            for _ in range(1 << 20):
                b = f.read(MiB)
                if not b:
                    break
                h.update(b)
        return name, h.hexdigest()

    with ThreadPoolExecutor(threads) as ex:
        got = [x for x in ex.map(one, names) if x is not None]
    return {
        "listed": listed,
        "list_seconds": t1 - t0,
        "files": len(got),
        "seconds": time.monotonic() - t1,
        "digests": dict(got),
    }


def op_b3_loader(
    bucket: str, prefix: str, names: list[str], threads: int, time_limit: float
) -> dict[str, Any]:
    """The same with raw boto3: list the prefix (timed apart), then one GET per file,
    ``threads`` in flight."""
    c = _client(threads + 8)
    t0 = time.monotonic()
    listed = len(_list(c, bucket, prefix + "/"))
    t1 = time.monotonic()
    cpu0 = _cpu()

    def one(name: str) -> tuple[str, str] | None:
        if time.monotonic() - t1 > time_limit:
            return None
        b = c.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        return name, xxhash.xxh3_64(b).hexdigest()

    with ThreadPoolExecutor(threads) as ex:
        got = [x for x in ex.map(one, names) if x is not None]
    return {
        "listed": listed,
        "list_seconds": t1 - t0,
        "files": len(got),
        "seconds": time.monotonic() - t1,
        "cpu_s": _cpu() - cpu0,
        "digests": dict(got),
    }


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in OPS:
        print(f"usage: python -m bench.worker {{{','.join(sorted(OPS))}}} JSON", file=sys.stderr)
        return 2
    try:
        out = OPS[argv[1]](**json.loads(argv[2]))
    except Exception as e:  # noqa: BLE001 - reported to the parent as the measurement's error
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
