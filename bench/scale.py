"""Every size and count the benchmark uses, in one place, scaled by ``--quick``/``--size-scale``.

The full sizes are the ones the issues name (1 GiB objects, 1,000-file tree of ~17 MB,
10,000 objects to stat, 8 x 128 MiB checkpoint, 4 GiB warm prefix). ``--quick`` shrinks
them so the whole run takes a few minutes on a 2-core machine: it checks that every system
runs and produces numbers, not how fast it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Scale:
    """Sizes (bytes), counts and time limits (seconds) of one run."""

    seq_bytes: int = GiB  # the object read sequentially / randomly / by fio
    write_bytes: int = GiB  # the file written sequentially
    rand_1m_ops: int = 256  # random 1 MiB preads per measurement
    rand_4k_ops: int = 2000  # random 4 KiB preads per measurement
    rand_seconds: float = 30.0  # ...or stop after this long, whichever comes first
    tree_files: int = 1000
    tree_bytes: int = 17_000_000
    stat_objects: int = 10_000
    ckpt_writers: int = 8
    ckpt_shard_bytes: int = 128 * MiB
    fio_rand_seconds: int = 15
    warm_objects: int = 8
    warm_object_bytes: int = 512 * MiB  # 8 x 512 MiB = the 4 GiB prefix of issue 6
    loader_objects: int = 10_000  # the data loader's prefix of ~100 KB objects
    loader_reads: int = 2_000  # random files read per measurement (16 threads)
    loader_seconds: float = 60.0  # ...or stop starting new files after this long
    reps: int = 3
    op_timeout: float = 900.0  # one measured operation (a 1 GiB upload at ~10 MB/s still fits)
    durable_timeout: float = 900.0  # waiting for data to show up in the store

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_scale(quick: bool, size_scale: float | None, reps: int | None) -> Scale:
    """The full scale, or the quick one, with byte sizes (and counts, gently) multiplied."""
    if quick:
        base = Scale(
            seq_bytes=32 * MiB,
            write_bytes=32 * MiB,
            rand_1m_ops=32,
            rand_4k_ops=200,
            rand_seconds=10.0,
            tree_files=100,
            tree_bytes=1_700_000,
            stat_objects=500,
            ckpt_writers=4,
            ckpt_shard_bytes=8 * MiB,
            fio_rand_seconds=3,
            warm_objects=4,
            warm_object_bytes=8 * MiB,
            loader_objects=500,
            loader_reads=200,
            loader_seconds=20.0,
            reps=1,
            op_timeout=180.0,
            durable_timeout=180.0,
        )
    else:
        base = Scale()
    if size_scale is not None and size_scale != 1.0:
        f = size_scale

        def b(n: int) -> int:
            # Keep sizes MiB-aligned (the workloads read and write in 1 MiB steps) and > 0.
            return max(MiB, int(n * f) // MiB * MiB)

        def c(n: int, floor: int) -> int:
            return max(floor, int(n * f))

        base = Scale(
            seq_bytes=b(base.seq_bytes),
            write_bytes=b(base.write_bytes),
            rand_1m_ops=c(base.rand_1m_ops, 16),
            rand_4k_ops=c(base.rand_4k_ops, 100),
            rand_seconds=base.rand_seconds,
            tree_files=c(base.tree_files, 20),
            tree_bytes=max(100_000, int(base.tree_bytes * f)),
            stat_objects=c(base.stat_objects, 100),
            ckpt_writers=base.ckpt_writers,
            ckpt_shard_bytes=b(base.ckpt_shard_bytes),
            fio_rand_seconds=base.fio_rand_seconds,
            warm_objects=base.warm_objects,
            warm_object_bytes=b(base.warm_object_bytes),
            loader_objects=c(base.loader_objects, 100),
            loader_reads=c(base.loader_reads, 50),
            loader_seconds=base.loader_seconds,
            reps=base.reps,
            op_timeout=base.op_timeout,
            durable_timeout=base.durable_timeout,
        )
    if reps is not None:
        base = Scale(**{**asdict(base), "reps": reps})
    return base
