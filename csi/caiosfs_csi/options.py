"""Turn a NodePublishVolume request's volume_context and mount flags into `caiosfs mount` options.

Pure functions, no I/O: everything here is unit-tested without a server.

Validation is strict on purpose. An unknown volume attribute is almost always a typo that
would otherwise silently mount with defaults; a value containing a comma would inject a second
`-o` option (e.g. `endpoint=http://x,credentials_file=/etc/...`), so it is refused outright.
Options that name host paths or ports (`credentials_file`, `cache_dir`, `metrics`) are chosen
by the plugin, never by a pod author, because the FUSE daemon runs as root on the node.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Every -o option `caiosfs mount` understands (`caiosfs mount --help`, caiosfs/config.py).
CAIOSFS_OPTIONS = frozenset(
    {
        "endpoint", "region", "path_style", "credentials_file", "aws_profile", "profile",
        "cache_dir", "cache_size", "dirty_limit", "memory_limit", "block_size", "max_request",
        "readahead_max", "part_size", "read_ahead_kb", "parallel", "parallel_max", "dirahead", "dirattrs", "list_ahead", "unlink", "lookup_misses", "ro", "rw", "uid", "gid",
        "file_mode", "dir_mode", "allow_other", "entry_ttl", "list_ttl", "negative_ttl",
        "metadata", "fsync", "upload_delay", "read_timeout", "metrics", "warm", "debug",
        "log_file",
    }
)

# Options the plugin sets itself; a pod author may not (see module docstring).
PLUGIN_OWNED_OPTIONS = frozenset(
    {"credentials_file", "aws_profile", "cache_dir", "log_file", "metrics"}
)

# mount(8)/kubelet generic options that mean nothing to caiosfs. FUSE mounts are always
# nosuid,nodev, and atime is not tracked in the object store, so these are dropped, not mapped.
GENERIC_OPTIONS = frozenset(
    {
        "defaults", "_netdev", "nofail", "noauto", "auto", "user", "users", "nouser", "owner",
        "group", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime",
        "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime",
        "lazytime", "nolazytime", "async", "sync", "dirsync", "bind", "rbind", "mand", "nomand",
        "iversion", "noiversion", "silent", "loud",
    }
)
GENERIC_PREFIXES = ("x-", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=")

PROFILES = ("default", "dataset", "devbox", "checkpoint")
METADATA_MODES = ("tagged", "head", "list")
WARM_MODES = ("background", "blocking")
FSYNC_MODES = ("store", "local")

_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?B?|[kmgtpe]i?b?|B|b)?$")
_UINT = re.compile(r"^[0-9]{1,10}$")
_MODE = re.compile(r"^0?[0-7]{3,4}$")
_SECONDS = re.compile(r"^([0-9]+(\.[0-9]+)?|inf|infinity|forever)$")
_HOSTPORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}$")
_ENDPOINT = re.compile(r"^(caios|lota|https?://[^\s,]+)$")
_REGION = re.compile(r"^[A-Za-z0-9\-_]{1,64}$")
_FORBIDDEN_CHARS = re.compile(r"[,\s\x00]")

POD_INFO_PREFIX = "csi.storage.k8s.io/"

# Value checkers per option: (regex or tuple of allowed values, human description).
_VALUE_RULES: dict[str, tuple[re.Pattern[str] | tuple[str, ...], str]] = {
    "endpoint": (_ENDPOINT, "an http(s) URL, 'caios' or 'lota'"),
    "region": (_REGION, "a region name"),
    "cache_size": (_SIZE, "a size such as 20G"),
    "dirty_limit": (_SIZE, "a size such as 4G"),
    "memory_limit": (_SIZE, "a size such as 256M"),
    "block_size": (_SIZE, "a size such as 8M"),
    "max_request": (_SIZE, "a size such as 16M"),
    "readahead_max": (_SIZE, "a size such as 128M"),
    "part_size": (_SIZE, "a size such as 64M"),
    "parallel": (_UINT, "a number of requests"),
    "parallel_max": (_UINT, "a number of requests"),
    "unlink": (("wait", "batch"), "one of wait, batch"),
    "lookup_misses": (("probe", "listing"), "one of probe, listing"),
    "dirahead": (("0", "1", "true", "false", "yes", "no", "on", "off"), "0 or 1"),
    "dirattrs": (("0", "1", "true", "false", "yes", "no", "on", "off"), "0 or 1"),
    "list_ahead": (_UINT, "a number of pages"),
    "metadata": (METADATA_MODES, "one of " + ", ".join(METADATA_MODES)),
    "upload_delay": (_SECONDS, "seconds"),
    "read_timeout": (_SECONDS, "seconds"),
    "uid": (_UINT, "a numeric uid"),
    "gid": (_UINT, "a numeric gid"),
    "file_mode": (_MODE, "an octal mode such as 0644"),
    "dir_mode": (_MODE, "an octal mode such as 0755"),
    "profile": (PROFILES, "one of " + ", ".join(PROFILES)),
    "warm": (WARM_MODES, "one of " + ", ".join(WARM_MODES)),
    "fsync": (FSYNC_MODES, "one of " + ", ".join(FSYNC_MODES)),
    "entry_ttl": (_SECONDS, "seconds"),
    "list_ttl": (_SECONDS, "seconds"),
    "negative_ttl": (_SECONDS, "seconds"),
    "read_ahead_kb": (_UINT, "a number of KiB"),
    "metrics": (_HOSTPORT, "HOST:PORT"),
}
_FLAG_OPTIONS = frozenset({"ro", "rw", "path_style", "allow_other", "debug"})


class OptionError(ValueError):
    """A volume attribute or mount flag is missing, unknown or malformed (INVALID_ARGUMENT)."""


def _norm_key(key: str) -> str:
    # `cacheSize`, `cache_size`, `cache-size` and `CacheSize` all name one attribute.
    return re.sub(r"[_\-]", "", key).lower()


# volume_context attribute (normalised) -> caiosfs option, for plain valued options.
_ATTR_TO_OPTION = {
    "endpoint": "endpoint",
    "region": "region",
    "cachesize": "cache_size",
    "profile": "profile",
    "warm": "warm",
    "fsync": "fsync",
    "dirtylimit": "dirty_limit",
    "memorylimit": "memory_limit",
    "blocksize": "block_size",
    "maxrequest": "max_request",
    "readaheadmax": "readahead_max",
    "partsize": "part_size",
    "parallel": "parallel",
    "parallelmax": "parallel_max",
    "dirahead": "dirahead",
    "dirattrs": "dirattrs",
    "listahead": "list_ahead",
    "unlink": "unlink",
    "lookupmisses": "lookup_misses",
    "metadata": "metadata",
    "uploaddelay": "upload_delay",
    "readtimeout": "read_timeout",
    "uid": "uid",
    "gid": "gid",
    "filemode": "file_mode",
    "dirmode": "dir_mode",
    "entryttl": "entry_ttl",
    "listttl": "list_ttl",
    "negativettl": "negative_ttl",
    "readaheadkb": "read_ahead_kb",
}
KNOWN_ATTRIBUTES = sorted(
    ["bucket", "prefix", "endpoint", "region", "pathStyle", "profile", "cacheSize", "readOnly",
     "warm", "fsync", "dirtyLimit", "memoryLimit", "blockSize", "maxRequest", "readaheadMax",
     "partSize", "parallel", "parallelMax", "dirAhead", "dirAttrs", "listAhead", "unlink", "lookupMisses", "metadata", "uploadDelay", "readTimeout", "uid", "gid", "fileMode",
     "dirMode", "entryTTL", "listTTL", "negativeTTL", "readAheadKb", "allowOther", "debug",
     "mountOptions"]
)


def parse_bool(value: str, name: str) -> bool:
    """Parse a Kubernetes-style boolean attribute ("true"/"false", "yes"/"no", "1"/"0")."""
    v = value.strip().lower()
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off", ""):
        return False
    raise OptionError(f"volume attribute {name}={value!r} is not a boolean")


def check_option(name: str, value: str | None) -> None:
    """Raise OptionError unless `name[=value]` is a well-formed caiosfs option."""
    if name not in CAIOSFS_OPTIONS:
        raise OptionError(f"unknown caiosfs mount option {name!r}")
    if name in _FLAG_OPTIONS:
        if value is not None:
            raise OptionError(f"mount option {name!r} takes no value")
        return
    if value is None or value == "":
        raise OptionError(f"mount option {name!r} needs a value")
    if _FORBIDDEN_CHARS.search(value):
        raise OptionError(f"mount option {name!r} has a comma, blank or NUL in its value")
    rule = _VALUE_RULES.get(name)
    if rule is None:
        return
    allowed, what = rule
    ok = value in allowed if isinstance(allowed, tuple) else bool(allowed.match(value))
    if not ok:
        raise OptionError(f"mount option {name}={value!r} must be {what}")


def split_flags(flags: Iterable[str]) -> list[tuple[str, str | None]]:
    """Split mount flags (each possibly "a,b=c") into (name, value) pairs, keeping order."""
    out: list[tuple[str, str | None]] = []
    for flag in flags:
        for part in flag.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            out.append((name.strip(), value.strip() if sep else None))
    return out


def is_generic(name: str, value: str | None) -> bool:
    """True for mount(8)/kubelet generic options that caiosfs does not take."""
    text = name if value is None else f"{name}="
    return name in GENERIC_OPTIONS or text.startswith(GENERIC_PREFIXES) or name.startswith("x-")


@dataclass
class MountSpec:
    """What to mount and how: the part of a publish request that defines the mount."""

    bucket: str
    prefix: str
    options: dict[str, str | None] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The `s3://BUCKET[/PREFIX]` source argument for `caiosfs mount`."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    def option_list(self) -> list[str]:
        """Options as `name` / `name=value` strings, sorted so equal specs compare equal."""
        return [k if v is None else f"{k}={v}" for k, v in sorted(self.options.items())]


def _clean_prefix(prefix: str) -> str:
    prefix = prefix.strip().strip("/")
    # Blanks are legal in keys and the source travels as its own argv word; control characters
    # would corrupt /proc/self/mountinfo parsing and logs.
    if any(ch in prefix for ch in "\n\r\t\x00,"):
        raise OptionError("prefix must not contain commas, control characters or NUL")
    segments = prefix.split("/") if prefix else []
    if any(s in ("", ".", "..") for s in segments):
        raise OptionError(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return prefix


def build_mount_spec(
    volume_context: Mapping[str, str],
    mount_flags: Iterable[str] = (),
    *,
    readonly: bool = False,
    volume_mount_group: str = "",
    default_allow_other: bool = True,
) -> MountSpec:
    """Build the caiosfs mount for one publish request, or raise OptionError.

    `readonly` is the request's readonly flag OR a reader-only access mode; a read-only
    request always wins over `readOnly: "false"` in the attributes. `volume_mount_group`
    (the pod's fsGroup, passed because the plugin advertises VOLUME_MOUNT_GROUP) becomes
    `gid=` with group-writable default modes, as gcsfuse's driver does, so a non-root pod
    can write.
    """
    bucket = ""
    prefix = ""
    options: dict[str, str | None] = {}
    ro = readonly
    allow_other = default_allow_other
    extra_flags: list[str] = []

    for key, raw in volume_context.items():
        if key.startswith(POD_INFO_PREFIX):
            continue  # pod name/namespace/uid, ephemeral marker, SA tokens: not mount options
        nk = _norm_key(key)
        value = raw.strip()
        if nk in ("bucket", "bucketname"):
            bucket = value
        elif nk == "prefix":
            prefix = value
        elif nk == "mountoptions":
            extra_flags.append(value)
        elif nk == "readonly":
            ro = ro or parse_bool(value, key)
        elif nk == "pathstyle":
            if parse_bool(value, key):
                options["path_style"] = None
        elif nk == "allowother":
            allow_other = parse_bool(value, key)
        elif nk == "debug":
            if parse_bool(value, key):
                options["debug"] = None
        elif nk in _ATTR_TO_OPTION:
            if value:
                options[_ATTR_TO_OPTION[nk]] = value
        else:
            raise OptionError(
                f"unknown volume attribute {key!r}; known: {', '.join(KNOWN_ATTRIBUTES)}"
            )

    if not bucket:
        raise OptionError("volume attribute 'bucket' is required")
    if not _BUCKET.match(bucket):
        raise OptionError(f"bucket name {bucket!r} is not a valid bucket name")
    prefix = _clean_prefix(prefix)

    for name, value in split_flags([*extra_flags, *mount_flags]):
        if is_generic(name, value):
            continue
        if name == "ro":
            ro = True
            continue
        if name == "rw":
            continue  # the default; a read-only request or attribute still wins
        if name in PLUGIN_OWNED_OPTIONS:
            raise OptionError(f"mount option {name!r} is set by the CSI plugin, not the volume")
        if name == "allow_other":
            allow_other = True
            continue
        check_option(name, value)
        options[name] = value

    if volume_mount_group:
        if not _UINT.match(volume_mount_group):
            raise OptionError(f"volume_mount_group {volume_mount_group!r} is not a numeric gid")
        options.setdefault("gid", volume_mount_group)
        options.setdefault("file_mode", "0664")
        options.setdefault("dir_mode", "0775")

    for name, value in options.items():
        check_option(name, value)
    if ro:
        options["ro"] = None
    if allow_other:
        # Pod processes run under arbitrary uids while the daemon runs as root: without
        # allow_other only root in the pod could read the volume.
        options["allow_other"] = None
    return MountSpec(bucket=bucket, prefix=prefix, options=options)
