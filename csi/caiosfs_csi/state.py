"""Per-target records of what this plugin published, kept in a state directory.

The FUSE daemons outlive the plugin process, so the plugin must be able to answer "did I mount
this target, and with which arguments?" after a restart. Each published target has one JSON
record; its credentials file (if the volume has secrets) sits beside it.

Layout under the state dir (default `/run/caiosfs-csi`, a tmpfs on the host: secrets never touch
a disk, and stale records vanish on reboot together with the mounts they described):

    targets/<key>.json   record of one target (see `Publication`)
    creds/<key>.ini      AWS shared-credentials file handed to `caiosfs mount`, mode 0600

`<key>` is a hash of the target path, so any path length or character set maps to a fixed,
safe file name. Writes go to a temporary file, are fsynced, then renamed into place, so a
crash never leaves a half-written record or credentials file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


def target_key(target_path: str) -> str:
    """Stable file-name-safe key for a target path."""
    return hashlib.sha256(os.path.normpath(target_path).encode()).hexdigest()[:32]


@dataclass
class Publication:
    """One NodePublishVolume that this plugin carried out.

    fingerprint: hash of every request argument except secrets (spec: "P" in the idempotency
        table); equal fingerprints mean a repeated publish is a no-op.
    source, options: the exact `caiosfs mount` source and -o list (without credentials_file).
    cache_dir: the cache directory handed to caiosfs ("" = caiosfs's default).
    creds_file: path of the credentials file, or "" when the volume has no secrets.
    shared: for a target bind-mounted from a shared mount of its dataset, that mount's path
        (which has a record of its own); "" for a target with a daemon of its own.
    """

    target_path: str
    volume_id: str
    fingerprint: str
    source: str
    options: list[str] = field(default_factory=list)
    cache_dir: str = ""
    creds_file: str = ""
    created_dir: bool = False
    shared: str = ""
    pod_namespace: str = ""  # kubelet's pod info (podInfoOnMount), for metrics labels
    pod_name: str = ""


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)  # before any byte is written: secrets are never world-readable
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class StateStore:
    """Records of published targets under one directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.targets = self.root / "targets"
        self.creds = self.root / "creds"
        for d in (self.root, self.targets, self.creds):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # the credentials directory must not be listable by others

    def _record_path(self, target_path: str) -> Path:
        return self.targets / f"{target_key(target_path)}.json"

    def creds_path(self, target_path: str) -> Path:
        """Where the credentials file for `target_path` lives."""
        return self.creds / f"{target_key(target_path)}.ini"

    def load(self, target_path: str) -> Publication | None:
        """The record for `target_path`, or None (also for an unreadable record)."""
        try:
            data = json.loads(self._record_path(target_path).read_text())
            return Publication(**data)
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def save(self, pub: Publication) -> None:
        """Write (or replace) the record of `pub.target_path`."""
        data = json.dumps(asdict(pub), indent=1, sort_keys=True).encode()
        _atomic_write(self._record_path(pub.target_path), data, 0o600)

    def delete(self, target_path: str) -> None:
        """Forget `target_path`: its record and its credentials file."""
        for p in (self._record_path(target_path), self.creds_path(target_path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def all(self) -> list[Publication]:
        """Every record in the store."""
        out = []
        for p in sorted(self.targets.glob("*.json")):
            try:
                out.append(Publication(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def node_secret(self) -> bytes:
        """A random key of this node's state dir (created once, 0600): shared mounts are named
        by an HMAC of their credentials under it, never by anything that reveals them."""
        path = self.root / "node.key"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            _atomic_write(path, os.urandom(32), 0o600)
            return path.read_bytes()

    def write_creds(self, target_path: str, text: str) -> Path:
        """Atomically write the credentials file for `target_path` with mode 0600.

        Replacing (not rewriting) the file gives it a new inode and mtime, which is what a
        daemon watching for rotated credentials notices.
        """
        path = self.creds_path(target_path)
        _atomic_write(path, text.encode(), 0o600)
        return path

    def read_creds(self, target_path: str) -> str | None:
        """Current credentials text for `target_path`, or None."""
        try:
            return self.creds_path(target_path).read_text()
        except FileNotFoundError:
            return None
