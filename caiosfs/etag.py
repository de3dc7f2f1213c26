"""Does a local file match an S3 ETag? (``caiosfs cp --verify``)

A single-part object's ETag is the MD5 of its body. A multipart object's is the MD5 of its
parts' MD5s, then ``-N``: it can be checked only if the part size is known, so the usual
ones are tried (ours, then the sizes common tools use) in one pass over the file.
"""

from __future__ import annotations

import hashlib
import math
import os

from .store import file_md5

MiB = 1 << 20
COMMON_PARTS = (5 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 50 * MiB, 64 * MiB, 100 * MiB,
                128 * MiB, 256 * MiB, 512 * MiB, 1024 * MiB)


def etag_matches(path: str, size: int, etag: str, part_size: int) -> bool | None:
    """True: the file's content gives this ETag. False: it does not. None: cannot tell
    (not an MD5 ETag, e.g. SSE-KMS, or a multipart object of an unusual part size)."""
    e = etag.strip('"').lower()
    md5, _, nparts = e.partition("-")
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        return None
    if not nparts:
        return file_md5(path, size).hex() == md5
    try:
        n = int(nparts)
    except ValueError:
        return None
    guesses = {part_size, *COMMON_PARTS, math.ceil(size / max(n, 1) / MiB) * MiB}
    cands = sorted(p for p in guesses if p > 0 and math.ceil(size / p) == n)
    if not cands:
        return None
    return True if md5 in _md5_parts(path, size, cands) else None


def _md5_parts(path: str, size: int, part_sizes: list[int]) -> list[str]:
    """For each part size, the ETag digest of the file cut in such parts (one read)."""
    whole = [hashlib.md5() for _ in part_sizes]
    cur = [hashlib.md5() for _ in part_sizes]
    fill = [0] * len(part_sizes)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            buf = os.pread(fd, min(8 * MiB, size - off), off)
            if not buf:
                raise OSError(f"file shorter than expected ({off} of {size} bytes)")
            for i, ps in enumerate(part_sizes):
                view = memoryview(buf)
                while view:
                    take = min(len(view), ps - fill[i])
                    cur[i].update(view[:take])
                    fill[i] += take
                    view = view[take:]
                    if fill[i] == ps:
                        whole[i].update(cur[i].digest())
                        cur[i], fill[i] = hashlib.md5(), 0
            off += len(buf)
    finally:
        os.close(fd)
    out = []
    for i in range(len(part_sizes)):
        if fill[i]:
            whole[i].update(cur[i].digest())
        out.append(whole[i].hexdigest())
    return out
