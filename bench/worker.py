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
    t0 = time.monotonic()
    try:
        for off in offsets:
            b = os.pread(fd, bs, off)
            if len(b) != min(bs, size - off):
                raise RuntimeError(f"short read at {off}: {len(b)} bytes")
            nbytes += len(b)
            done += 1
            if time.monotonic() - t0 > time_limit:
                break
    finally:
        os.close(fd)
    return {"ops": done, "bytes": nbytes, "seconds": time.monotonic() - t0}


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
    """find + read every file (a restore), one file at a time like ``tar c`` would."""
    t0 = time.monotonic()
    files = 0
    nbytes = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                for _ in range(1 << 30):
                    b = f.read(MiB)
                    if not b:
                        break
                    nbytes += len(b)
            files += 1
    return {"files": files, "bytes": nbytes, "seconds": time.monotonic() - t0}


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


def _ranged_get(
    c: Any, bucket: str, key: str, size: int, chunk: int, conc: int, sink: Callable[..., None]
) -> int:
    """Fetch an object as parallel ranged GETs of ``chunk`` bytes; sink(offset, bytes)."""

    def one(off: int) -> int:
        end = min(off + chunk, size) - 1
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"]
        pos = off
        for _ in range(1 << 30):
            b = body.read(MiB)
            if not b:
                break
            sink(pos, b)
            pos += len(b)
        if pos != end + 1:
            raise RuntimeError(f"short ranged GET of {key} at {off}: {pos - off} bytes")
        return pos - off

    with ThreadPoolExecutor(conc) as ex:
        return sum(ex.map(one, range(0, size, chunk)))


def op_b3_get(bucket: str, keys: dict[str, int], chunk: int, conc: int) -> dict[str, Any]:
    """Parallel ranged GETs of whole objects into memory, bytes discarded (network limit)."""
    c = _client(conc + 8)
    t0 = time.monotonic()
    n = 0
    for key, size in keys.items():
        n += _ranged_get(c, bucket, key, size, chunk, conc, lambda off, b: None)
    return {"bytes": n, "seconds": time.monotonic() - t0}


def op_b3_download(
    bucket: str, keys: dict[str, int], dest: str, chunk: int, conc: int
) -> dict[str, Any]:
    """Parallel ranged GETs of many objects into local files (what a cache warm must do).

    All objects' ranges go into one pool, so small objects do not serialize the transfer."""
    c = _client(conc + 8)
    Path(dest).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fds = {}
    jobs = []
    for key, size in keys.items():
        p = Path(dest) / key.replace("/", "_")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"bytes": n, "seconds": time.monotonic() - t0}


def op_b3_randget(
    bucket: str, key: str, size: int, bs: int, count: int, seed: int, time_limit: float
) -> dict[str, Any]:
    """One ranged GET per random read, one at a time: the same offsets as op_randread."""
    c = _client()
    offsets = _offsets(size, bs, count, seed)
    done = 0
    t0 = time.monotonic()
    for off in offsets:
        end = min(off + bs, size) - 1
        c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"].read()
        done += 1
        if time.monotonic() - t0 > time_limit:
            break
    return {"ops": done, "bytes": done * bs, "seconds": time.monotonic() - t0}


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
    t0 = time.monotonic()
    digest = _b3_upload(c, bucket, key, seed, size, part, conc)
    return {"t_start": t0, "t_close": time.monotonic(), "digest": digest}


def op_b3_ckpt(
    bucket: str, prefix: str, writers: int, shard_bytes: int, part: int, conc_per_writer: int
) -> dict[str, Any]:
    """The checkpoint pattern as raw uploads: one multipart upload per shard, all in parallel,
    then the small metadata object."""
    c = _client(writers * conc_per_writer + 8)
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
    }


def op_b3_put_tree(bucket: str, prefix: str, root: str, threads: int) -> dict[str, Any]:
    """One PUT per file of a local tree, ``threads`` at a time."""
    c = _client(threads + 8)
    files = [p for p in sorted(Path(root).rglob("*")) if p.is_file()]
    t0 = time.monotonic()

    def one(p: Path) -> None:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(root)}", Body=p.read_bytes())

    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(one, files):
            pass
    t1 = time.monotonic()
    return {"t_start": t0, "t_close": t1, "files": len(files)}


def op_b3_get_tree(bucket: str, prefix: str, threads: int) -> dict[str, Any]:
    """List a prefix and GET every object, ``threads`` at a time (a raw restore)."""
    c = _client(threads + 8)
    t0 = time.monotonic()
    keys = [k for k, _ in _list(c, bucket, prefix)]

    def one(k: str) -> int:
        return len(c.get_object(Bucket=bucket, Key=k)["Body"].read())

    with ThreadPoolExecutor(threads) as ex:
        n = sum(ex.map(one, keys))
    return {"files": len(keys), "bytes": n, "seconds": time.monotonic() - t0}


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
