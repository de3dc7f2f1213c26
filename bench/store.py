"""The object store side of the benchmark: the server, the seeded data set, durability checks.

The server is SeaweedFS started by ``caiosfs.seaweed.SeaweedServer`` (loopback only, own temp
dir, free ports). ``--endpoint`` points the benchmark at a server that is already running
instead (it must be on 127.0.0.0/8: benchmark traffic never leaves the machine).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from bench import data
from bench.procs import BenchError
from bench.scale import MiB, Scale

BUCKET = "caiosfs-bench"
# Every system mounts s3://BUCKET/PREFIX, the way a user mounts s3://bucket/$USER.
PREFIX = "root"
# Outside the mounted prefix: what was seeded, so a rerun against --endpoint can skip it.
MANIFEST_KEY = "bench-manifest.json"
# Bump when the layout or content of the seeded data changes.
SEED_VERSION = 4
# The parts of the data set, each seeded only when a chosen workload reads it.
PARTS = ("seq", "tree", "stat", "ckpt", "loader", "warm")


def make_client(endpoint: str, access_key: str, secret_key: str, pool: int = 32) -> Any:
    """A path-style boto3 S3 client with bounded retries and timeouts."""
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name="us-east-1"
    )
    return session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=120,
            max_pool_connections=pool,
        ),
    )


def check_loopback(url: str) -> None:
    """Refuse any endpoint that is not on 127.0.0.0/8 (or localhost)."""
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise SystemExit(f"bench: endpoint {url} is not on loopback; refusing to benchmark it")


@dataclass
class Dataset:
    """Keys (relative to the mounted prefix), sizes and xxh3 digests of the seeded data."""

    seq_key: str = "seq/object.bin"
    seq_size: int = 0
    seq_digest: str = ""
    tree_dir: str = "tree"  # restore source: the same tree the copy workload copies
    tree_files: dict[str, int] = field(default_factory=dict)  # rel path -> size
    stat_dir: str = "stat"
    stat_count: int = 0
    ckpt_dir: str = "ckpt/step-1"
    ckpt_shards: dict[str, int] = field(default_factory=dict)  # name -> size
    ckpt_root: str = "ckpt"  # step-1 complete; step-2 begun but never committed
    warm_dir: str = "warm"
    warm_objects: dict[str, int] = field(default_factory=dict)  # name -> size
    loader_dir: str = "loader"  # many ~100 KB objects: loader_name(i), loader_size(i)
    loader_count: int = 0
    local_tree: str = ""  # where the local copy of the tree lives (source of the copy workload)

    @staticmethod
    def loader_name(i: int) -> str:
        return f"s{i:06d}.jpg"

    @staticmethod
    def loader_size(i: int) -> int:
        """80-120 KB, spread deterministically: "files of about 100 KB"."""
        return 80_000 + (i * 7919) % 40_001

    @property
    def warm_bytes(self) -> int:
        return sum(self.warm_objects.values())

    @property
    def tree_bytes(self) -> int:
        return sum(self.tree_files.values())


class Store:
    """The S3 server (ours or given) plus helpers every workload uses."""

    def __init__(
        self,
        workdir: Path,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.server: Any = None
        self.endpoint = endpoint or ""
        self.access_key = access_key or "caiosfs-bench"
        self.secret_key = secret_key or ("s" + os.urandom(12).hex())
        self._external = endpoint is not None
        self._client: Any = None

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._external:
            check_loopback(self.endpoint)
        else:
            try:
                from caiosfs.seaweed import SeaweedServer
            except ImportError as e:
                raise SystemExit(
                    f"bench: caiosfs.seaweed is not importable ({e}); run .ci/setup, or pass "
                    "--endpoint/--access-key/--secret-key for a server on 127.0.0.1"
                ) from None
            self.server = SeaweedServer(self.workdir / "seaweed", self.access_key, self.secret_key)
            self.server.start()
            self.endpoint = self.server.endpoint
            check_loopback(self.endpoint)
        self._client = make_client(self.endpoint, self.access_key, self.secret_key)
        try:
            self._client.create_bucket(Bucket=BUCKET)
        except ClientError as e:
            if e.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def client(self) -> Any:
        return self._client

    def credentials_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    # ---- listing and durability -----------------------------------------------------------

    def list_sizes(self, rel_prefix: str) -> dict[str, int]:
        """{key relative to the mounted prefix: size} of every object below rel_prefix."""
        full = f"{PREFIX}/{rel_prefix}"
        out: dict[str, int] = {}
        token = None
        for _ in range(100_000):  # bounded: 100k pages is far beyond any data set here
            kw: dict[str, Any] = {"Bucket": BUCKET, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            page = self._client.list_objects_v2(**kw)
            for o in page.get("Contents", []):
                out[o["Key"][len(PREFIX) + 1 :]] = o["Size"]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return out

    def wait_durable(
        self,
        rel_prefix: str,
        expected: dict[str, int],
        timeout: float,
        interval: float = 0.1,
        gone: Callable[[str], bool] | None = None,
    ) -> float:
        """Poll the store until every expected key exists with its size (and, with ``gone``,
        no key below the prefix matches it any more: temporary names of a commit); return the
        monotonic time at which that was first seen. Raise BenchError after ``timeout`` s.

        Polling lists the prefix (one request per 1,000 keys) rather than HEADing each key, so
        the poll itself stays light next to the uploads it is waiting for.
        """
        deadline = time.monotonic() + timeout
        missing: list[str] = []
        while True:
            now = time.monotonic()
            have = self.list_sizes(rel_prefix)
            missing = [k for k, s in expected.items() if have.get(k) != s]
            left = [k for k in have if gone(k)] if gone is not None else []
            if not missing and not left:
                return now
            if now >= deadline and not missing:
                raise BenchError(
                    f"all {len(expected)} objects durable, but after {timeout:.0f} s the store "
                    f"still holds {len(left)} temporary object(s), e.g. {left[0]}"
                )
            if now >= deadline:
                raise BenchError(
                    f"not durable after {timeout:.0f} s: {len(missing)} of {len(expected)} "
                    f"objects missing or short, e.g. {missing[0]} "
                    f"(store has {have.get(missing[0])} bytes, want {expected[missing[0]]})"
                )
            time.sleep(interval)

    def delete_prefix(self, rel_prefix: str) -> None:
        """Delete every object under the prefix (and markers), so repeated writes do not pile
        up in the server's volumes."""
        keys = [f"{PREFIX}/{k}" for k in self.list_sizes(rel_prefix)]
        for i in range(0, len(keys), 1000):
            self._client.delete_objects(
                Bucket=BUCKET,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )

    def object_digest(self, rel_key: str) -> str:
        """xxh3 of an object's bytes as stored (to verify what a system wrote)."""
        import xxhash

        body = self._client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel_key}")["Body"]
        h = xxhash.xxh3_64()
        for _ in range(1 << 22):
            b = body.read(8 * MiB)
            if not b:
                break
            h.update(b)
        return h.hexdigest()

    # ---- seeding ----------------------------------------------------------------------------

    def _put_stream(self, rel_key: str, seed: str, size: int) -> str:
        stream = data.Stream(seed, size)
        self._client.upload_fileobj(
            io.BufferedReader(stream, buffer_size=MiB),
            BUCKET,
            f"{PREFIX}/{rel_key}",
            Config=TransferConfig(
                multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8
            ),
        )
        if stream.pos != size:
            raise BenchError(f"seeding {rel_key}: uploaded {stream.pos} of {size} bytes")
        return stream.hasher.hexdigest()

    def _put_many(self, items: Iterable[tuple[str, bytes]], threads: int = 16) -> None:
        def put(item: tuple[str, bytes]) -> None:
            self._client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{item[0]}", Body=item[1])

        with ThreadPoolExecutor(threads) as ex:
            for _ in ex.map(put, items):
                pass

    def _load_manifest(self) -> dict[str, Any]:
        try:
            body = self._client.get_object(Bucket=BUCKET, Key=MANIFEST_KEY)["Body"].read()
            return json.loads(body)
        except (ClientError, ValueError):
            return {}

    def seed(self, scale: Scale, log: Any, parts: Iterable[str] = PARTS) -> Dataset:
        """Create the objects of the data set ``parts`` the chosen workloads read (skipping
        what an earlier run against the same --endpoint already made) and the local tree the
        copy workload copies. A part not asked for is left out: ``--only`` runs seed only
        what they read."""
        ds = Dataset()
        ds.local_tree = str(make_local_tree(self.workdir / "tree-src", scale))
        tree_root = Path(ds.local_tree)
        manifest = self._load_manifest()
        want = {"version": SEED_VERSION, "scale": scale.to_json()}
        have: list[str] = []
        if manifest.get("want") == want:
            ds = Dataset(**{**manifest["dataset"], "local_tree": ds.local_tree})
            # Trust the manifest only for the parts whose objects are all really there.
            have = [p for p in manifest.get("parts", []) if self._part_present(ds, p)]
        # The tree's names and sizes come from the local copy: tree_copy needs them even
        # when the store's copy is not seeded.
        ds.tree_files = {
            str(p.relative_to(tree_root)): p.stat().st_size
            for p in sorted(tree_root.rglob("*"))
            if p.is_file()
        }
        todo = [p for p in PARTS if p in set(parts) and p not in have]
        if not todo:
            log(f"seed: reusing data seeded earlier ({', '.join(have) or 'none needed'})")
            return ds
        if have:
            log(f"seed: reusing {', '.join(have)} seeded earlier")
        t0 = time.monotonic()
        self._client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/", Body=b"")
        for part in todo:
            t1 = time.monotonic()
            what = getattr(self, f"_seed_{part}")(ds, scale)
            log(f"seed: {what} in {time.monotonic() - t1:.0f} s")
        fields = {k: v for k, v in ds.__dict__.items() if k != "local_tree"}
        self._client.put_object(
            Bucket=BUCKET,
            Key=MANIFEST_KEY,
            Body=json.dumps({"want": want, "dataset": fields, "parts": have + todo}).encode(),
        )
        log(f"seed: done in {time.monotonic() - t0:.0f} s")
        return ds

    def _seed_seq(self, ds: Dataset, scale: Scale) -> str:
        ds.seq_size = scale.seq_bytes
        ds.seq_digest = self._put_stream(ds.seq_key, "seq", scale.seq_bytes)
        return f"{ds.seq_key} {scale.seq_bytes / MiB:.0f} MiB"

    def _seed_tree(self, ds: Dataset, scale: Scale) -> str:
        root = Path(ds.local_tree)
        self._put_many((f"{ds.tree_dir}/{rel}", (root / rel).read_bytes()) for rel in ds.tree_files)
        return f"{ds.tree_dir}/ {len(ds.tree_files)} files, {ds.tree_bytes / 1e6:.1f} MB"

    def _seed_stat(self, ds: Dataset, scale: Scale) -> str:
        ds.stat_count = scale.stat_objects
        self._put_many(
            (f"{ds.stat_dir}/f{i:05d}.dat", data.make_bytes(f"stat{i}", 100))
            for i in range(scale.stat_objects)
        )
        return f"{ds.stat_dir}/ {scale.stat_objects} objects"

    def _seed_ckpt(self, ds: Dataset, scale: Scale) -> str:
        ds.ckpt_shards = {}
        for i in range(scale.ckpt_writers):
            name = f"shard-{i:03d}.distcp"
            self._put_stream(f"{ds.ckpt_dir}/{name}", f"ckpt{i}", scale.ckpt_shard_bytes)
            ds.ckpt_shards[name] = scale.ckpt_shard_bytes
        meta = json.dumps({"shards": sorted(ds.ckpt_shards)}).encode()
        self._client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{ds.ckpt_dir}/.metadata", Body=meta)
        # A newer step that never committed (no .metadata): a restore must not pick it.
        self._client.put_object(
            Bucket=BUCKET,
            Key=f"{PREFIX}/{ds.ckpt_root}/step-2/shard-000.distcp",
            Body=data.make_bytes("ckpt-uncommitted", 4096),
        )
        return f"{ds.ckpt_dir}/ {scale.ckpt_writers} shards (and an uncommitted step-2/)"

    def _seed_loader(self, ds: Dataset, scale: Scale) -> str:
        t1 = time.monotonic()
        ds.loader_count = scale.loader_objects
        self._put_many(
            (
                f"{ds.loader_dir}/{ds.loader_name(i)}",
                data.make_bytes(f"ld{i}", ds.loader_size(i)),
            )
            for i in range(scale.loader_objects)
        )
        rate = scale.loader_objects / max(time.monotonic() - t1, 1e-9)
        return f"{ds.loader_dir}/ {scale.loader_objects} objects of ~100 KB ({rate:.0f} PUTs/s)"

    def _seed_warm(self, ds: Dataset, scale: Scale) -> str:
        ds.warm_objects = {}
        for i in range(scale.warm_objects):
            name = f"part-{i:03d}.bin"
            self._put_stream(f"{ds.warm_dir}/{name}", f"warm{i}", scale.warm_object_bytes)
            ds.warm_objects[name] = scale.warm_object_bytes
        return f"{ds.warm_dir}/ {ds.warm_bytes / MiB:.0f} MiB in {scale.warm_objects} objects"

    def _part_present(self, ds: Dataset, part: str) -> bool:
        """Whether the objects of one seeded part are all in the store with their sizes."""
        if part == "stat":
            return ds.stat_count > 0 and len(self.list_sizes(ds.stat_dir + "/")) == ds.stat_count
        if part == "loader":
            n = ds.loader_count
            return n > 0 and len(self.list_sizes(ds.loader_dir + "/")) == n
        expected, prefix = {
            "seq": ({ds.seq_key: ds.seq_size}, "seq/"),
            "tree": (
                {f"{ds.tree_dir}/{k}": v for k, v in ds.tree_files.items()},
                ds.tree_dir + "/",
            ),
            "ckpt": (
                {f"{ds.ckpt_dir}/{k}": v for k, v in ds.ckpt_shards.items()},
                ds.ckpt_dir + "/",
            ),
            "warm": (
                {f"{ds.warm_dir}/{k}": v for k, v in ds.warm_objects.items()},
                ds.warm_dir + "/",
            ),
        }.get(part, ({}, ""))
        if not expected or not prefix:
            return False
        have = self.list_sizes(prefix)
        return all(have.get(k) == s for k, s in expected.items())


def make_local_tree(root: Path, scale: Scale) -> Path:
    """A deterministic source-like tree: ``scale.tree_files`` files in nested packages, sizes
    drawn log-normally (many small files, a few big ones, like a Python package) and scaled to
    ``scale.tree_bytes`` in total. Returns the tree's top directory."""
    top = root / "tree"
    stamp = root / f".done-v{SEED_VERSION}-{scale.tree_files}-{scale.tree_bytes}"
    if stamp.exists():
        return top
    rng = random.Random(1000)
    n = scale.tree_files
    raw = [rng.lognormvariate(0, 1.3) for _ in range(n)]
    k = scale.tree_bytes / sum(raw)
    sizes = [max(1, int(r * k)) for r in raw]
    # About 16 files per directory, up to three levels deep.
    ndirs = max(1, n // 16)
    dirs = []
    for d in range(ndirs):
        depth = 1 + d % 3
        parts = [f"pkg{d % 7}"] + [f"sub{(d // 7 + j) % 5}_{d}" for j in range(depth - 1)]
        dirs.append("/".join(parts))
    if top.exists():
        import shutil

        shutil.rmtree(top)
    for i, size in enumerate(sizes):
        rel = Path(dirs[i % ndirs]) / f"module_{i:04d}.py"
        (top / rel.parent).mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data.make_bytes(f"tree{i}", size))
    for old in root.glob(".done-*"):
        old.unlink()
    stamp.touch()
    return top
