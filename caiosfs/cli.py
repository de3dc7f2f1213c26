"""The ``caiosfs`` command: mount, umount, status, flush, warm, cp, ls, fsck, demo,
install-helper."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import options_help
from .errors import CaiosfsError, UserError

MAIN_HELP = """\
caiosfs mounts a prefix of CoreWeave AI Object Storage (CAIOS) or any S3-compatible store
as a local directory. Reads stream through parallel range requests into a local NVMe block
cache (checksummed, LRU-evicted, kept across remounts); writes land in that cache and are
uploaded in the background, crash-safe; fsync means durable in the object store.
"""

MAIN_EPILOG = """\
examples:
  caiosfs mount s3://datasets/imagenet /mnt/imagenet -o profile=dataset,cache_dir=/nvme/c
  caiosfs mount s3://work/$USER ~/work -o profile=devbox,credentials_file=~/.aws/credentials
  caiosfs status --json
  caiosfs flush /mnt/ckpt && caiosfs umount /mnt/ckpt
  caiosfs warm s3://datasets/imagenet --cache-dir /nvme/c --shard 3/8
  caiosfs cp s3://datasets/imagenet /mnt/data/imagenet -o endpoint=lota --shard 3/8

Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the AWS shared credentials
file, or -o credentials_file=PATH; never from the command line. Run 'caiosfs COMMAND --help'
for each command's options. Exit status: 0 success, 1 failure, 2 bad usage.
"""

MOUNT_EPILOG = f"""\
mount options (-o name[=value],...):
{options_help()}

profiles set several options at once (explicit options win):
  dataset     immutable data: entry/list TTL infinite, negative TTL 60s
  devbox      workdirs: TTLs 5s, negative TTL 1s, upload 1s after close, metadata=head
  checkpoint  large writes: entry TTL 300s, list TTL 60s, upload 0.5s after close

examples:
  caiosfs mount s3://bucket/prefix /mnt/data
  caiosfs mount s3://bucket /mnt/b -o endpoint=http://127.0.0.1:8333,path_style,ro
  caiosfs mount s3://ckpt/run7 /mnt/ckpt -o profile=checkpoint,cache_dir=/nvme/caiosfs
  mount -t caiosfs s3://bucket/prefix /mnt/data -o cache_dir=/nvme/caiosfs  (after
      'caiosfs install-helper')

The command returns once the mount is live (exit 0) or has failed (exit 1, one line on
stderr). The daemon logs to <cache_dir>/caiosfs.log.
"""


def _mount(a: argparse.Namespace) -> int:
    from .config import build_config
    from .mount import mount
    cfg = build_config(a.source, ",".join(a.o or []))
    return mount(cfg, a.mountpoint, a.foreground, target=a.target)


def _umount(a: argparse.Namespace) -> int:
    from .umount import unmount
    unmount(a.mountpoint, a.timeout, flush=not a.no_flush,
            progress=None if a.quiet else lambda m: print(f"caiosfs: {m}", file=sys.stderr))
    return 0


def _status(a: argparse.Namespace) -> int:
    from . import control
    mounts = control.registered()
    if a.mountpoint:
        mp = os.path.abspath(a.mountpoint)
        mounts = [m for m in mounts if m.get("mountpoint") == mp]
        if not mounts:
            raise UserError(f"{a.mountpoint} is not a running caiosfs mount")
    out = []
    for m in mounts:
        try:
            for msg in control.request(m["mountpoint"], {"cmd": "status"}, timeout=10):
                if "result" in msg:
                    out.append(msg["result"])
        except (OSError, ConnectionError) as exc:
            out.append({**m, "error": str(exc)})
    if a.json:
        print(json.dumps(out if not a.mountpoint else out[0], indent=2))
        return 0
    if not out:
        print("no caiosfs mounts")
    for s in out:
        hr = s.get("hit_ratio")
        print(f"{s.get('mountpoint')}  {s.get('source')}  pid {s.get('pid')}")
        if "error" in s:
            print(f"  error: {s['error']}")
            continue
        print(f"  cache     {_h(s['cache_bytes'])} of {_h(s['cache_limit_bytes'])} in "
              f"{s['cache_dir']}, hit ratio {'-' if hr is None else f'{hr:.1%}'}")
        print(f"  dirty     {_h(s['dirty_bytes'])} in {s['dirty_files']} file(s), oldest "
              f"{s['oldest_dirty_seconds']}s; uploads queued {s['uploads_queued']}, in flight "
              f"{s['uploads_in_flight']}, done {s['uploads_completed']}, failed "
              f"{s['uploads_failed']}")
        print(f"  store     {s['s3_requests']} requests ({s['s3_not_found']} not found), "
              f"{s['s3_errors']} errors, {_h(s['bytes_in'])} in, {_h(s['bytes_out'])} out; "
              f"conflicts {s['conflicts']}")
        print(f"  errors    {s['fuse_errors']} FUSE errors, {s['checksum_failures']} checksum "
              f"failures, {s['skipped_keys']} keys skipped")
    return 0


def _h(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _flush(a: argparse.Namespace) -> int:
    from . import control

    def show(p: dict[str, Any]) -> None:
        print(f"caiosfs: uploading {p['files']} file(s), {_h(p['bytes'])} left",
              file=sys.stderr)
    try:
        control.flush(a.mountpoint, a.timeout, None if a.quiet else show)
    except TimeoutError:
        raise CaiosfsError(f"{a.mountpoint}: not everything was durable within "
                           f"{a.timeout:.0f}s") from None
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    return 0


def _warm(a: argparse.Namespace) -> int:
    from .warm import warm_command
    return warm_command(a)


def _cp(a: argparse.Namespace) -> int:
    from .cp import cp_command
    return cp_command(a)


def _ls(a: argparse.Namespace) -> int:
    from .listing import ls_command
    return ls_command(a)


def _fsck(a: argparse.Namespace) -> int:
    from .cache import fsck, lock_cache_dir
    from .index import INDEX_ENV, open_index
    d = Path(a.cache_dir)
    if not (d / INDEX_ENV).exists():
        raise UserError(f"{a.cache_dir} is not a caiosfs cache directory")
    fd = lock_cache_dir(d)
    try:
        index = open_index(d)
        try:
            stats = fsck(index, d, repair=a.repair)
        finally:
            index.close()
    finally:
        os.close(fd)
    print(json.dumps(stats) if a.json else "\n".join(f"{k:22} {v}" for k, v in stats.items()))
    bad = stats["chunks_bad"] or stats["orphan_files"] or stats["journal_missing_data"]
    return 1 if bad and not a.repair else 0


def _install_helper(a: argparse.Namespace) -> int:
    """Install mount.caiosfs (mount -t caiosfs, fstab) and umount.fuse.caiosfs (umount
    drains first), with this caiosfs's absolute path written into them."""
    helpers = Path(__file__).resolve().parent.parent / "mount-helpers"
    exe = str(Path(shutil.which("caiosfs") or sys.argv[0]).absolute())
    for name, dest in (("mount.caiosfs", a.dest), ("umount.caiosfs", a.umount_dest)):
        src = helpers / name
        if not src.exists():
            raise UserError(f"mount helper not found at {src} (install-helper needs the "
                            "source checkout)")
        text = src.read_text().replace('INSTALLED_CAIOSFS_BIN=""',
                                       f'INSTALLED_CAIOSFS_BIN="{exe}"', 1)
        tmp = Path(dest + ".tmp")
        try:
            tmp.write_text(text)
            os.chmod(tmp, 0o755)
            tmp.replace(dest)
        except OSError as exc:
            raise UserError(f"cannot install {dest}: {exc.strerror}") from None
        print(f"installed {dest}")
    print("mount -t caiosfs, fstab entries and umount (which uploads first) now work")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from .demo import demo
    return demo(a)


CP_DESCRIPTION = """\
Copy every object under s3://BUCKET[/PREFIX] into a local directory (which may be a
distributed filesystem), or every file under a local directory to s3://BUCKET[/PREFIX].
Small objects go many at once ('parallel' requests in flight), large ones as parallel
ranged GETs of 'max_request' bytes, or multipart uploads of 'part_size' parts.

It resumes: what is already complete at the destination is skipped (a local file with the
object's size and ETag, remembered in the user.caiosfs.etag xattr, or size and mtime where
the filesystem has no xattrs; an object with the file's size and a Last-Modified not older
than the file). A file being downloaded is written under a temporary name
(.caiosfs-HASH-PID.tmp), fsynced and renamed: a partial file never has the final name, and
the next run removes what a killed one left. Mode and mtime travel as the s3fs attributes
x-amz-meta-mode and x-amz-meta-mtime (uid and gid are written, not applied); local symlinks
become s3fs symlink objects and back.

Shards: --shard I/N takes the paths (relative to the prefix) whose xxh64 is I modulo N,
so N tasks copy one tree together, each object exactly once, without listing more than
once each. 'caiosfs ls --split N' lists once and writes N lists of about equal bytes for
--files-from: then no task lists at all. Tasks may share one destination directory.
"""

CP_EPILOG = """\
examples:
  caiosfs cp s3://datasets/imagenet /mnt/data/imagenet -o endpoint=lota
  caiosfs cp /mnt/data/results s3://results/run7 -o endpoint=caios --verify
  caiosfs cp s3://datasets/imagenet /mnt/data/imagenet --shard $SLURM_PROCID/$SLURM_NTASKS
  caiosfs ls s3://datasets/imagenet --split 64 --output $WORK/shards
  caiosfs cp s3://datasets/imagenet /mnt/data/imagenet --files-from $WORK/shards/shard-7.list

options (-o name=value,...): the mount options that apply to a copy: endpoint (or the
aliases caios, lota), region, path_style, credentials_file, aws_profile, parallel
(requests in flight), max_request (ranged GET size), part_size (multipart part size and the
size above which uploads are multipart), read_timeout (seconds one request may keep
retrying before its object fails), file_mode (mode of downloaded files without
x-amz-meta-mode). See 'caiosfs mount --help'.

Progress (bytes, objects, rate, ETA) is shown on a terminal; otherwise one summary line.
Exit status: 0 when everything was copied or already there; 1 when some objects failed
(each is listed on stderr with its reason; rerun to retry them); 2 for bad usage or a
destination, bucket or credentials that cannot be used (one line).
"""


def add_transfer_commands(sub: Any, fmt: Any) -> None:
    t = sub.add_parser("cp", help="copy a prefix to a directory or a directory to a prefix",
                       description=CP_DESCRIPTION, epilog=CP_EPILOG, formatter_class=fmt)
    t.add_argument("src", metavar="SRC", help="s3://BUCKET[/PREFIX] or a local directory")
    t.add_argument("dst", metavar="DST", help="a local directory or s3://BUCKET[/PREFIX]")
    t.add_argument("-o", action="append", metavar="OPTIONS", help="comma-separated options "
                   "(see below); may be repeated")
    t.add_argument("--shard", default="0/1", metavar="I/N", help="copy only shard I of N "
                   "(0-based, by a hash of the relative path) [default: 0/1]")
    t.add_argument("--files-from", metavar="LIST", help="copy only the paths in LIST (one "
                   "per line, relative to SRC; lines from 'caiosfs ls --long' or --split "
                   "carry size and ETag and save a HEAD each)")
    t.add_argument("--verify", action="store_true", help="check each copied file: against "
                   "the ETag when it is an MD5 (single or multipart), else by reading back "
                   "what was written; a mismatch fails the object")
    t.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary "
                   "line (failures are still listed)")
    t.set_defaults(fn=_cp)

    ls = sub.add_parser("ls", help="list a prefix once (and split it into N lists)",
                        description="List every object under s3://BUCKET[/PREFIX] (or every "
                        "file under a local directory), one path per line relative to it. "
                        "--split N writes N lists of about equal bytes for 'caiosfs cp "
                        "--files-from' (and 'caiosfs warm --files-from').",
                        formatter_class=fmt, epilog="examples:\n  caiosfs ls s3://data/train "
                        "-o endpoint=caios | wc -l\n  caiosfs ls s3://data/train --split 64 "
                        "--output shards/   # shards/shard-0.list ... shard-63.list\n")
    ls.add_argument("source", metavar="SOURCE", help="s3://BUCKET[/PREFIX] or a directory")
    ls.add_argument("-o", action="append", metavar="OPTIONS", help="as for cp")
    ls.add_argument("--long", action="store_true", help="path, size, ETag and mtime, "
                    "tab-separated")
    ls.add_argument("--shard", default="0/1", metavar="I/N", help="only shard I of N, as "
                    "cp --shard [default: 0/1]")
    ls.add_argument("--split", type=int, metavar="N", help="write N lists (long format) "
                    "into --output instead of printing")
    ls.add_argument("--output", metavar="DIR", help="where --split writes shard-I.list")
    ls.set_defaults(fn=_ls)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="caiosfs", description=MAIN_HELP, epilog=MAIN_EPILOG,
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"caiosfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] on a directory",
                       description="Mount s3://BUCKET[/PREFIX] on MOUNTPOINT.",
                       epilog=MOUNT_EPILOG, formatter_class=fmt)
    m.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("-o", action="append", metavar="OPTIONS",
                   help="comma-separated mount options (see below); may be repeated")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr too")
    m.add_argument("--target", metavar="PATH",
                   help="MOUNTPOINT is /dev/fd/N, a /dev/fuse descriptor already mounted at "
                   "PATH by a privileged process (the CSI plugin); serve it under that name")
    m.set_defaults(fn=_mount)

    u = sub.add_parser("umount", aliases=["unmount"], help="upload dirty data, then unmount",
                       description="Upload every dirty byte (with progress), unmount, and "
                       "wait for the daemon to exit. If the upload does not finish within "
                       "--timeout, the mount stays (nothing is lost) and the exit status is 1.",
                       formatter_class=fmt)
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=3600, help="seconds [default: 3600]")
    u.add_argument("--no-flush", action="store_true", help="unmount without waiting first "
                   "(the daemon still drains before it exits)")
    u.add_argument("-q", "--quiet", action="store_true")
    u.set_defaults(fn=_umount)

    s = sub.add_parser("status", help="show what mounts are doing",
                       description="Show cache use, dirty data, uploads, errors and hit ratio "
                       "of every caiosfs mount (or one). Works without the metrics port.",
                       formatter_class=fmt)
    s.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=_status)

    f = sub.add_parser("flush", help="wait until everything written is in the store",
                       description="Start uploading every dirty file now and return once all "
                       "of it is durable in the object store.", formatter_class=fmt)
    f.add_argument("mountpoint", metavar="MOUNTPOINT")
    f.add_argument("--timeout", type=float, default=None, help="give up after SECONDS "
                   "(exit 1; nothing is lost)")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(fn=_flush)

    w = sub.add_parser("warm", help="pre-fill a cache directory with a prefix",
                       description="Download s3://BUCKET/PREFIX into the block cache of "
                       "--cache-dir with parallel ranged GETs, skipping what is cached and "
                       "valid (so it resumes). If a mount owns the cache directory, the mount "
                       "does the work; if another warm does, it takes this one's objects too, "
                       "so several warm processes (shards) fill one cache directory.",
                       formatter_class=fmt,
                       epilog="examples:\n  caiosfs warm s3://data/train --cache-dir /nvme/c "
                       "-o endpoint=caios\n  caiosfs warm s3://data/train --cache-dir /nvme/c "
                       "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\n")
    w.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    w.add_argument("--cache-dir", required=True, metavar="DIR")
    w.add_argument("-o", action="append", metavar="OPTIONS", help="the same options as mount "
                   "(endpoint, path_style, credentials_file, cache_size, parallel, ...)")
    w.add_argument("--shard", default="0/1", metavar="I/N", help="take shard I of N "
                   "(0-based; deterministic by key) [default: 0/1]")
    w.add_argument("--files-from", metavar="LIST", help="warm only the paths in LIST "
                   "(relative to the prefix; 'caiosfs ls --split' writes such lists)")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    w.set_defaults(fn=_warm)

    add_transfer_commands(sub, fmt)

    c = sub.add_parser("fsck", help="check (and repair) a cache directory",
                       description="Verify every cached chunk against its xxh3 checksum and "
                       "the index against the block files. With --repair, drop bad entries "
                       "and orphan files. The cache directory must not be mounted.",
                       formatter_class=fmt)
    c.add_argument("--cache-dir", required=True, metavar="DIR")
    c.add_argument("--repair", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_fsck)

    d = sub.add_parser("demo", help="start a local S3 server, seed it, and mount it",
                       description="Start SeaweedFS on 127.0.0.1, seed a demo bucket (a few "
                       "small files and one of a few hundred MB) and mount it, then wait "
                       "(Ctrl-C unmounts and stops the server).", formatter_class=fmt)
    d.add_argument("--dir", default="/tmp/caiosfs-demo", help="work directory "
                   "[default: /tmp/caiosfs-demo]")
    d.add_argument("--big-mb", type=int, default=300, help="size of the big file [300]")
    d.add_argument("--check", action="store_true", help="read everything back, compare "
                   "hashes, unmount and exit (no waiting)")
    d.set_defaults(fn=_demo)

    h = sub.add_parser("install-helper", help="install mount.caiosfs for mount(8) and fstab",
                       formatter_class=fmt)
    h.add_argument("--dest", default="/sbin/mount.caiosfs", help="[default: %(default)s]")
    h.add_argument("--umount-dest", default="/sbin/umount.fuse.caiosfs",
                   help="[default: %(default)s]")
    h.set_defaults(fn=_install_helper)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(a.fn(a) or 0)
    except UserError as exc:
        print(f"caiosfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except CaiosfsError as exc:
        print(f"caiosfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback; details in the log
        print(f"caiosfs: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


def run() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    run()
