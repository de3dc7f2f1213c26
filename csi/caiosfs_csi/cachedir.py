"""Where the plugin caches a dataset on a node, as a command for warm Jobs.

    python -m caiosfs_csi.cachedir --cache-root /var/lib/caiosfs/cache --bucket B \\
        [--prefix P] [--endpoint E]

prints the cache directory that a pod volume of s3://B/P (volume attributes `bucket`,
`prefix`, `endpoint`, given exactly as in the volume) gets on a node whose plugin runs with
that cache root. `caiosfs warm ... --cache-dir "$(...)"` then fills exactly the cache that
the node's later pod volumes of that dataset read (docs/csi.md, "Warm meets pod volumes").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

from caiosfs_csi.options import OptionError, build_mount_spec


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:60] or "volume"


def dataset_cache_dir(cache_root: str, bucket: str, prefix: str, endpoint: str) -> str:
    """The cache directory named after the data (endpoint as given, bucket, clean prefix).

    A second live mount of the same data on the node gets `-1`, `-2`, ... instead (two daemons
    never share a cache); read-only volumes of one dataset share one mount, so they all read
    this one.
    """
    ident = json.dumps([endpoint, bucket, prefix])
    return os.path.join(
        cache_root, f"{_safe_name(bucket)}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caiosfs-csi-cache-dir", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-root", required=True, help="the plugin's CAIOSFS_CSI_CACHE_ROOT")
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--endpoint", default="", help="the volume's endpoint attribute, verbatim")
    a = p.parse_args(argv)
    attrs = {"bucket": a.bucket, "prefix": a.prefix}
    if a.endpoint:
        attrs["endpoint"] = a.endpoint
    try:
        spec = build_mount_spec(attrs)  # the same validation and prefix cleaning as publish
    except OptionError as e:
        print(f"caiosfs-csi-cache-dir: {e}", file=sys.stderr)
        return 2
    print(dataset_cache_dir(a.cache_root, spec.bucket, spec.prefix,
                            str(spec.options.get("endpoint") or "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
