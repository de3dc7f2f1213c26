"""Mount configuration: the source URL, ``-o`` options, profiles and their defaults.

Everything the user can set is declared once in :data:`OPTIONS` (name, type, default, help);
``caiosfs mount --help`` is generated from the same table, so the docs cannot drift.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ENDPOINT_ALIASES = {
    "caios": "https://cwobject.com",
    "lota": "http://cwlota.com",
}

MiB = 1 << 20
GiB = 1 << 30
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M', '10G', '1.5GiB', '4096' -> bytes (binary multiples)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 20G)")
    num, unit = float(m.group(1)), m.group(2).lower()
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}[unit]
    return int(num * mult)


def parse_bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("", "1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_mode(text: str) -> int:
    v = int(str(text), 8)
    if not 0 <= v <= 0o7777:
        raise ValueError(f"not a permission mode: {text!r}")
    return v


def parse_seconds(text: str) -> float:
    t = str(text).lower()
    if t in ("inf", "infinite", "forever", "-1"):
        return float("inf")
    v = float(t.rstrip("s"))
    if v < 0:
        raise ValueError(f"negative time: {text!r}")
    return v


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = ""


# The -o options. Order here is the order in --help.
OPTIONS: list[Option] = [
    Option("endpoint", str, None, "S3 endpoint URL, or an alias: caios = https://cwobject.com, "
           "lota = http://cwlota.com (node-local cache on CoreWeave). Default: $AWS_ENDPOINT_URL, "
           "else caios.", "URL"),
    Option("region", str, None, "Signing region. Default: $AWS_REGION / $AWS_DEFAULT_REGION, "
           "else us-east-1.", "NAME"),
    Option("path_style", parse_bool, False, "Path-style addressing (http://host/bucket/key). "
           "Default is virtual-hosted style, which CAIOS requires; local servers need path_style."),
    Option("credentials_file", str, None, "AWS shared-credentials file (INI) to read keys from; "
           "re-read when it changes (rotated Kubernetes secrets). Default: the standard AWS chain "
           "(environment, ~/.aws/credentials).", "PATH"),
    Option("aws_profile", str, None, "Section of the credentials file to use (default: "
           "$AWS_PROFILE, else 'default').", "NAME"),
    Option("profile", str, "default", "Preset of TTLs and behaviour: dataset (immutable data: "
           "infinite TTLs, metadata=list: after a listing, symlinks and modes show as the "
           "mount's defaults until looked up by name), devbox (small files, short TTLs, "
           "metadata=head, unlink=batch, lookup_misses=listing, dirattrs=1, "
           "list_ahead=10), checkpoint (large sequential writes, long TTLs). Explicit options override the preset.", "NAME"),
    Option("cache_dir", str, None, "Local block cache and write journal (put it on NVMe). "
           "Default: /var/cache/caiosfs as root, else ~/.cache/caiosfs.", "DIR"),
    Option("cache_size", parse_size, 20 * GiB, "Upper bound of clean cached data; least recently "
           "used blocks are evicted.", "SIZE"),
    Option("dirty_limit", parse_size, 4 * GiB, "Dirty (not yet uploaded) bytes above which "
           "writers wait for uploads (back-pressure).", "SIZE"),
    Option("memory_limit", parse_size, 256 * MiB, "Budget for in-flight and buffered read data, "
           "shared by all open files.", "SIZE"),
    Option("block_size", parse_size, 8 * MiB, "Cache block size (a multiple of 1M).", "SIZE"),
    Option("max_request", parse_size, 16 * MiB, "Largest ranged GET issued while streaming.",
           "SIZE"),
    Option("readahead_max", parse_size, GiB, "Cap of the per-file readahead window. Within "
           "it, a streaming file's window is its share of the GETs the mount keeps in flight "
           "(see parallel_max) times max_request.", "SIZE"),
    Option("dirahead", parse_bool, True, "Fetch the next small files of a directory ahead of "
           "a reader going through them in listing order (restore, tar c, cp -r), or the rest "
           "of a small directory most of whose files were read (imports of a package): "
           "several GETs in flight instead of one round trip per file. dirahead=0 turns it "
           "off."),
    Option("dirattrs", parse_bool, False, "Write, per directory, one small object "
           "'.caiosfs-attrs' holding the x-amz-meta-* (mode, owner, times) of the files this "
           "mount uploaded there, keyed by name and checked by ETag, size and Last-Modified, "
           "so that a listing with an empty cache (a remount, another node) takes those "
           "attributes from one GET instead of a HEAD per file (git status of a checkout). "
           "Written ~1 s after the last upload into a directory and by flush and unmount; "
           "never for a directory of more than 10,000 names. With it, the first lookup in a "
           "directory lists it (LIST and record in one round trip) instead of probing "
           "names one by one. An optimisation only: a "
           "missing, stale or foreign record costs HEADs, never a wrong attribute. The name "
           "is always hidden (and cannot be created), and records found in the store are "
           "used whatever this option says, except with metadata=list. Default 0; the "
           "devbox profile turns it on."),
    Option("list_ahead", int, 0, "Pages of 1,000 keys a directory's first listing with an "
           "empty cache may take of the whole tree below it (one ListObjectsV2 without a "
           "delimiter, in the background): the directories below it that those pages cover "
           "are then listed without a request of their own (and their attribute records, see "
           "dirattrs, are fetched together), so a walk through a tree after a remount (git "
           "status, find, an import of a package) waits for a few pages instead of a round "
           "trip per directory. A directory the pages do not reach is listed as usual. "
           "0 (the default) turns it off; the devbox profile lists 10 pages ahead. Costs "
           "up to that many pages of requests for a directory with a large tree below it "
           "that is only looked at, never walked. Only for a store across a network (its "
           "directory LISTs take 15 ms or more): nearer, a page costs the server what the "
           "directories' own LISTs do.", "N"),
    Option("part_size", parse_size, 64 * MiB, "Multipart upload part size (grows for huge files "
           "to stay under 10,000 parts).", "SIZE"),
    Option("read_ahead_kb", int, 1024, "Kernel readahead of the mount, set through "
           "/sys/class/bdi at mount time.", "KB"),
    Option("parallel", int, 16, "Concurrent S3 requests: metadata and uploads use it as is; "
           "ranged GETs start from it.", "N"),
    Option("parallel_max", int, 64, "Most ranged GETs in flight. While streaming readers "
           "wait for data, the mount raises its GETs in flight from parallel toward this as "
           "long as the measured aggregate rate grows (a remote store: latency, a rate per "
           "connection), and steps back when it does not; memory_limit bounds it too. "
           "parallel_max=parallel pins it.", "N"),
    Option("ro", parse_bool, False, "Mount read-only: every write operation fails with EROFS."),
    Option("rw", parse_bool, False, "Mount read-write (the default; accepted for fstab)."),
    Option("uid", int, None, "Owner of objects without x-amz-meta-uid (default: the mounting "
           "user).", "N"),
    Option("gid", int, None, "Group of objects without x-amz-meta-gid (default: the mounting "
           "user's group).", "N"),
    Option("file_mode", parse_mode, 0o644, "Permissions of files without x-amz-meta-mode.",
           "OCTAL"),
    Option("dir_mode", parse_mode, 0o755, "Permissions of directories.", "OCTAL"),
    Option("allow_other", parse_bool, False, "Let other users see the mount (FUSE allow_other; "
           "permissions are still checked by the kernel: default_permissions is always on)."),
    Option("entry_ttl", parse_seconds, 60.0, "Seconds a name lookup and its attributes are "
           "trusted (also the close-to-open revalidation interval).", "SECONDS"),
    Option("list_ttl", parse_seconds, 60.0, "Seconds a directory listing is trusted.",
           "SECONDS"),
    Option("negative_ttl", parse_seconds, 5.0, "Seconds a 'no such file' answer is trusted.",
           "SECONDS"),
    Option("metadata", str, "tagged", "Where stat results come from. 'tagged' (default): "
           "the listing (size, ETag, Last-Modified) plus x-amz-meta-* already known "
           "(remembered by ETag), and one HEAD, in parallel after a listing, of each object "
           "whose ETag says it may carry attributes a listing would hide: what this mount "
           "writes with a non-default type, mode or owner (symlinks, executables) is uploaded "
           "so (a one-part multipart upload, ETag '...-N'), so it reads back the same after "
           "a remount whatever is accessed first. 'head': HEAD every listed object once "
           "(modes and symlinks written by other clients show too; the devbox profile's "
           "choice). 'list': no HEAD after a listing: objects listed before they are looked "
           "up show the mount's defaults (the dataset profile's choice).", "tagged|head|list"),
    Option("unlink", str, "wait", "What unlink waits for: 'wait' (the object's DELETE is done "
           "when it returns) or 'batch' (the name goes at once; DELETEs are journaled and sent "
           "batched as DeleteObjects: rm -rf makes a request per directory instead of per "
           "file; rmdir, flush and unmount wait for them; the devbox profile's choice).", "wait|batch"),
    Option("lookup_misses", str, "probe", "How a name is answered that a listing made for "
           "lookups (after a few probes of one directory) does not have: 'probe' (default: "
           "asked of the store, so a file another client just created shows at once, as "
           "without the listing) or 'listing' (a miss for negative_ttl after the listing, as if "
           "each such name had been probed then: git's runs of lookups of names that do not "
           "exist cost no round trip each; the devbox profile's choice).", "probe|listing"),
    Option("fsync", str, "store", "What fsync waits for: 'store' (durable in the object store) "
           "or 'local' (durable on the local cache disk, uploaded soon after).", "store|local"),
    Option("upload_delay", parse_seconds, 1.0, "Seconds after the last close before a file is "
           "uploaded (coalesces rewrites; a large file written with others of its directory "
           "waits until the directory was quiet that long).", "SECONDS"),
    Option("read_timeout", parse_seconds, 60.0, "Total seconds a read keeps retrying the store "
           "before failing with EIO.", "SECONDS"),
    Option("metrics", str, None, "Serve Prometheus metrics at http://HOST:PORT/metrics "
           "(loopback unless a host is given; e.g. metrics=127.0.0.1:9100 or metrics=9100).",
           "[HOST:]PORT"),
    Option("warm", str, None, "Pre-fill the cache with the whole prefix: 'background' starts "
           "after mounting; 'blocking' makes the mount ready only once everything is local.",
           "background|blocking"),
    Option("debug", parse_bool, False, "Log every request (to the log file)."),
    Option("log_file", str, None, "Log file (default: <cache_dir>/caiosfs.log).", "PATH"),
]
OPTION_BY_NAME = {o.name: o for o in OPTIONS}

PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "dataset": {"entry_ttl": float("inf"), "list_ttl": float("inf"), "negative_ttl": 60.0,
                "metadata": "list"},
    "devbox": {"entry_ttl": 5.0, "list_ttl": 5.0, "negative_ttl": 1.0, "upload_delay": 1.0,
               "metadata": "head", "unlink": "batch", "lookup_misses": "listing",
               "dirattrs": True, "list_ahead": 10},
    "checkpoint": {"entry_ttl": 300.0, "list_ttl": 60.0, "negative_ttl": 1.0,
                   "upload_delay": 0.5},
}

CHOICES = {"profile": tuple(PROFILES), "metadata": ("tagged", "head", "list"),
           "fsync": ("store", "local"), "unlink": ("wait", "batch"), "lookup_misses": ("probe", "listing"),
           "warm": ("background", "blocking")}


@dataclass(frozen=True)
class Source:
    bucket: str
    prefix: str  # '' or ending in '/'

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")


def parse_source(text: str) -> Source:
    """``s3://BUCKET[/PREFIX]`` -> Source. Raises UserError with a one-line reason."""
    if not text.startswith("s3://"):
        raise UserError(f"invalid source {text!r}: expected s3://BUCKET[/PREFIX]")
    rest = text[5:]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise UserError(f"invalid bucket name {bucket!r} in {text!r}")
    prefix = prefix.strip("/")
    if "//" in prefix or any(p in (".", "..") for p in prefix.split("/") if prefix):
        raise UserError(f"invalid prefix {prefix!r} in {text!r}")
    return Source(bucket, prefix + "/" if prefix else "")


def split_options(text: str) -> dict[str, str]:
    """'a,b=1,c=x' -> {'a': '', 'b': '1', 'c': 'x'}; later wins."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        out[name.strip()] = value if sep else ""
    return out


@dataclass
class MountConfig:
    source: Source
    endpoint: str
    region: str
    path_style: bool
    credentials_file: str | None
    aws_profile: str | None
    profile: str
    cache_dir: Path
    cache_size: int
    dirty_limit: int
    memory_limit: int
    block_size: int
    max_request: int
    readahead_max: int
    part_size: int
    read_ahead_kb: int
    parallel: int
    parallel_max: int
    ro: bool
    uid: int
    gid: int
    file_mode: int
    dir_mode: int
    allow_other: bool
    entry_ttl: float
    list_ttl: float
    negative_ttl: float
    metadata: str
    fsync: str
    upload_delay: float
    read_timeout: float
    metrics: str | None
    warm: str | None
    debug: bool
    log_file: str | None
    rw: bool = False
    unlink: str = "wait"
    lookup_misses: str = "probe"
    dirahead: bool = True
    dirattrs: bool = False
    list_ahead: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_size(self) -> int:
        """Unit of fetching and checksumming inside a block."""
        return MiB


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/caiosfs")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caiosfs"


def resolve_endpoint(value: str | None) -> str:
    value = value or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    value = value or "caios"
    value = ENDPOINT_ALIASES.get(value, value)
    if not re.match(r"^https?://[^/\s]+", value):
        raise UserError(f"invalid endpoint {value!r}: expected http(s)://HOST[:PORT] or an alias "
                        f"({', '.join(ENDPOINT_ALIASES)})")
    return value.rstrip("/")


def build_config(source: str, options: str | dict[str, str] = "") -> MountConfig:
    """Validate everything the user gave; every problem is one UserError line."""
    src = parse_source(source)
    raw = split_options(options) if isinstance(options, str) else dict(options)
    unknown = [k for k in raw if k not in OPTION_BY_NAME]
    if unknown:
        raise UserError(f"unknown mount option {unknown[0]!r} (see caiosfs mount --help)")
    for secret in ("aws_secret_access_key", "secret_key", "secret"):
        if secret in raw:
            raise UserError("secrets are not accepted as options; use credentials_file= or "
                            "the AWS environment variables")
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    profile = raw.get("profile", "default")
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r} (choose {', '.join(PROFILES)})")
    values.update(PROFILES[profile])
    for name, text in raw.items():
        opt = OPTION_BY_NAME[name]
        if text == "" and opt.parse is not parse_bool:
            raise UserError(f"mount option {name!r} needs a value ({name}={opt.metavar or 'X'})")
        try:
            values[name] = opt.parse(text)
        except ValueError as exc:
            raise UserError(f"bad value for mount option {name}: {exc}") from None
        if name in CHOICES and values[name] not in CHOICES[name]:
            raise UserError(f"bad value for mount option {name}: {text!r} "
                            f"(choose {', '.join(CHOICES[name])})")
    if values["ro"] and values["rw"]:
        raise UserError("mount options ro and rw contradict each other")
    values["endpoint"] = resolve_endpoint(values["endpoint"])
    values["region"] = (values["region"] or os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    values["cache_dir"] = Path(values["cache_dir"] or default_cache_dir()).absolute()
    values["uid"] = os.getuid() if values["uid"] is None else values["uid"]
    values["gid"] = os.getgid() if values["gid"] is None else values["gid"]
    if values["block_size"] < MiB or values["block_size"] % MiB:
        raise UserError("block_size must be a multiple of 1M")
    if values["max_request"] < MiB:
        raise UserError("max_request must be at least 1M")
    if values["part_size"] < 5 * MiB:
        raise UserError("part_size must be at least 5M (the S3 minimum)")
    if values["parallel"] < 1:
        raise UserError("parallel must be at least 1")
    if values["list_ahead"] < 0:
        raise UserError("list_ahead must be 0 (off) or a number of pages")
    # parallel=N alone (N above the default ceiling) means at least N GETs too.
    values["parallel_max"] = max(values["parallel_max"], values["parallel"])
    if values["memory_limit"] < 4 * values["max_request"]:
        raise UserError("memory_limit must be at least 4 × max_request")
    if values["credentials_file"]:
        values["credentials_file"] = str(Path(values["credentials_file"]).absolute())
    return MountConfig(source=src, **values)


def options_help() -> str:
    lines = []
    for o in OPTIONS:
        left = f"{o.name}={o.metavar}" if o.metavar else o.name
        default = o.default
        if isinstance(default, int) and not isinstance(default, bool) and default >= MiB:
            default = f"{default // MiB}M" if default < GiB else f"{default // GiB}G"
        elif o.parse is parse_mode:
            default = oct(default)[2:].rjust(4, "0")
        dflt = "" if default in (None, False) else f" [default: {default}]"
        body = textwrap.fill(o.help + dflt, width=88, initial_indent=" " * 6,
                             subsequent_indent=" " * 6)
        lines.append(f"  {left}\n{body}")
    return "\n".join(lines)
