"""The node plugin's logic: NodePublishVolume / NodeUnpublishVolume, without gRPC.

Rules from the CSI spec (v1.10.0, "NodePublishVolume"), and how they are met:

* Idempotent publish: a target already mounted by us with the same arguments (all request
  fields except secrets, compared by fingerprint) returns OK; a repeated call with new secrets
  only replaces the credentials file, which is how rotated secrets reach a live mount when the
  CSIDriver sets `requiresRepublish: true`.
* Same target, different arguments: ALREADY_EXISTS. Anything not made by caiosfs mounted at
  the target: ALREADY_EXISTS too; the plugin never mounts over it.
* Missing or malformed fields: INVALID_ARGUMENT, before anything is touched.
* A second call for a target while one is in flight: ABORTED (the CO retries with back-off).
* Unpublish drains dirty data (`caiosfs umount`), removes the target and forgets it; a target
  that is not mounted or does not exist is OK. A dead FUSE mount (daemon gone, ENOTCONN) is
  detached lazily: its un-uploaded writes are still journaled in its cache directory and are
  replayed by the next mount of the same volume on this node.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from caiosfs_csi import budget
from caiosfs_csi.cachedir import dataset_cache_dir
from caiosfs_csi.credentials import credentials_ini
from caiosfs_csi.mounter import Mounter, MountError, MountState, MountTimeout
from caiosfs_csi.options import MountSpec, OptionError, build_mount_spec
from caiosfs_csi.state import Publication, StateStore, target_key
from caiosfs_csi.stubs import load

csi_pb2, _ = load()
log = logging.getLogger(__name__)

_AccessMode = csi_pb2.VolumeCapability.AccessMode
READER_ONLY_MODES = {_AccessMode.SINGLE_NODE_READER_ONLY, _AccessMode.MULTI_NODE_READER_ONLY}
ACCEPTED_FS_TYPES = {"", "caiosfs", "fuse.caiosfs", "fuse"}
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"  # podInfoOnMount
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
SHARED_PREFIX = "shared:"  # volume id recorded for a shared mount (its users have their own)


class CsiError(Exception):
    """An RPC failure with the gRPC status code the spec asks for."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(msg: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, msg)


class InFlight:
    """Names of targets with an operation in progress; a second caller is told ABORTED."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[str] = set()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold `key` for the duration of the block, or raise CsiError(ABORTED)."""
        with self._lock:
            if key in self._busy:
                raise CsiError(
                    grpc.StatusCode.ABORTED, f"an operation on {key} is already in progress"
                )
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)


@dataclass
class NodeConfig:
    """Settings of one node plugin instance."""

    node_id: str
    state_dir: str
    cache_root: str = ""  # where per-volume cache dirs go (an NVMe hostPath); "" = caiosfs default
    default_allow_other: bool = True
    # Where shared mounts of read-only datasets live (bind-mounted into each target); "" = no
    # sharing, one daemon per target. Must be on a mount that propagates to the host.
    shared_dir: str = ""
    # cache_size of volumes that set none (e.g. a node's NVMe size / expected datasets);
    # "" = caiosfs's own default (20G).
    default_cache_size: str = ""
    # Node-wide cap on the cache root across datasets (budget.py); "" = none.
    cache_budget: str = ""


class NodeService:
    """NodePublishVolume / NodeUnpublishVolume over a Mounter and a StateStore."""

    def __init__(self, config: NodeConfig, mounter: Mounter) -> None:
        self.config = config
        self.mounter = mounter
        self.store = StateStore(config.state_dir)
        self.inflight = InFlight()
        # Serialises cache-directory allocation, so two concurrent publishes of one volume to
        # two targets never pick the same directory.
        self._alloc_lock = threading.Lock()
        # One lock per shared mount: its first publish mounts it, its last unpublish ends it.
        self._share_locks: dict[str, threading.Lock] = {}
        self._share_guard = threading.Lock()
        self._node_key = self.store.node_secret() if config.shared_dir else b""
        # Counters for the node's metrics endpoint.
        self.metrics: collections.Counter[str] = collections.Counter()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _check_target(target: str) -> str:
        if not target:
            raise _invalid("target_path is required")
        if not os.path.isabs(target):
            raise _invalid("target_path must be an absolute path")
        return os.path.normpath(target)

    def _mount_spec(self, req) -> tuple[MountSpec, int]:
        if not req.HasField("volume_capability"):
            raise _invalid("volume_capability is required")
        cap = req.volume_capability
        if cap.HasField("block"):
            raise _invalid("block access is not supported: caiosfs volumes are filesystems")
        if not cap.HasField("mount"):
            raise _invalid("volume_capability.access_type must be mount")
        mode = cap.access_mode.mode
        if mode == _AccessMode.UNKNOWN:
            raise _invalid("volume_capability.access_mode is required")
        if cap.mount.fs_type not in ACCEPTED_FS_TYPES:
            raise _invalid(f"fs_type {cap.mount.fs_type!r} is not caiosfs")
        try:
            spec = build_mount_spec(
                req.volume_context,
                cap.mount.mount_flags,
                readonly=req.readonly or mode in READER_ONLY_MODES,
                volume_mount_group=cap.mount.volume_mount_group,
                default_allow_other=self.config.default_allow_other,
            )
        except OptionError as e:
            raise _invalid(str(e)) from None
        return spec, mode

    @staticmethod
    def _fingerprint(volume_id: str, spec: MountSpec, mode: int) -> str:
        # Everything in the request except secrets decides the mount, and all of it is
        # reflected in (volume_id, source, options, access mode).
        doc = {"volume_id": volume_id, "source": spec.source, "options": spec.option_list(),
               "access_mode": int(mode)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _allocate_cache_dir(self, target: str, spec: MountSpec) -> str:
        """Pick the cache directory for a new mount of `spec` at `target`.

        The directory is named after the data (endpoint, bucket, prefix), not the volume id:
        a pod that restarts, or an ephemeral volume with a fresh id each time, finds the blocks
        it fetched before. A directory already used by another target on this node gets a
        numbered sibling instead, because two daemons must not share one cache.
        """
        if not self.config.cache_root:
            return ""
        base = dataset_cache_dir(self.config.cache_root, spec.bucket, spec.prefix,
                                 str(spec.options.get("endpoint") or ""))
        in_use = {p.cache_dir for p in self.store.all() if p.target_path != target}
        candidate, n = base, 0
        while candidate in in_use:
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    # -- RPCs -------------------------------------------------------------------------------

    def publish(self, req) -> None:
        """NodePublishVolume. Raises CsiError with the spec's status code on failure."""
        if not req.volume_id:
            raise _invalid("volume_id is required")
        target = self._check_target(req.target_path)
        spec, mode = self._mount_spec(req)
        try:
            creds = credentials_ini(req.secrets)
        except OptionError as e:
            raise _invalid(str(e)) from None
        fingerprint = self._fingerprint(req.volume_id, spec, mode)

        with self.inflight.hold(target):
            if self.mounter.busy(target):
                # A publish that a previous plugin instance started (it was killed meanwhile)
                # is still bringing its daemon up; stat-ing the target would wait for it.
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"a mount of {target} is still starting; retry")
            state = self.mounter.state(target)
            record = self.store.load(target)
            if state is MountState.MOUNTED:
                if record is not None and record.fingerprint == fingerprint:
                    owner = record.shared or target  # whose daemon reads the credentials
                    if creds is not None and self.store.read_creds(owner) != creds:
                        self.store.write_creds(owner, creds)
                        log.info("credentials for %s replaced (rotated secret)", owner)
                    return
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{target} is already published with different arguments"
                    if record is not None
                    else f"{target} is already mounted, not by this plugin",
                )
            if state is MountState.FOREIGN:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} has a non-caiosfs filesystem mounted on it")
            if state is MountState.DEAD:
                log.warning("%s is a dead FUSE mount (daemon gone); detaching it", target)
                self._force_unmount(target)
            ctx = req.volume_context
            pod = (ctx.get(POD_NAMESPACE_KEY, ""), ctx.get(POD_NAME_KEY, ""))
            if self.config.shared_dir and spec.readonly:
                self._publish_shared(req.volume_id, target, spec, fingerprint, creds, record,
                                     pod)
            else:
                self._mount_new(req.volume_id, target, spec, fingerprint, creds, record, pod)

    def _mount_new(self, volume_id: str, target: str, spec: MountSpec, fingerprint: str,
                   creds: str | None, old: Publication | None,
                   pod: tuple[str, str] = ("", "")) -> None:
        created_dir = False
        if not os.path.isdir(target):
            if os.path.lexists(target):
                raise _invalid(f"{target} exists and is not a directory")
            os.makedirs(target, exist_ok=True)
            created_dir = True
        elif old is not None:
            created_dir = old.created_dir
        with self._alloc_lock:
            cache_dir = self._allocate_cache_dir(target, spec)
            record = Publication(
                target_path=target, volume_id=volume_id, fingerprint=fingerprint,
                source=spec.source, options=spec.option_list(), cache_dir=cache_dir,
                creds_file="", created_dir=created_dir, pod_namespace=pod[0], pod_name=pod[1],
            )
            # Saved before mounting: a plugin that crashes mid-mount and restarts still knows
            # the target is its own.
            self.store.save(record)
        options = spec.option_list()
        if self.config.default_cache_size and "cache_size" not in spec.options:
            options.append(f"cache_size={self.config.default_cache_size}")
        if cache_dir:
            self._fit_budget()
            os.makedirs(cache_dir, exist_ok=True)
            budget.mark_busy(cache_dir)
            options.append(f"cache_dir={cache_dir}")
        if creds is not None:
            record.creds_file = str(self.store.write_creds(target, creds))
            self.store.save(record)
            options.append(f"credentials_file={record.creds_file}")
        try:
            self.mounter.mount(spec.source, target, options, strip_credential_env=creds is not None,
                               volume_id=volume_id,
                               labels={"pod_namespace": pod[0], "pod_name": pod[1]})
        except MountError as e:
            self.store.delete(target)
            if created_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e, MountTimeout)
                    else grpc.StatusCode.INTERNAL)
            raise CsiError(code, f"caiosfs mount {spec.source} failed: {e}") from None
        log.info("published %s at %s (volume %s, cache %s)", spec.source, target, volume_id,
                 cache_dir or "default")

    # -- node-wide cache budget ----------------------------------------------------------------

    def _cache_size_of(self, pub: Publication) -> int:
        for o in pub.options:
            if o.startswith("cache_size="):
                return budget.parse_size(o.split("=", 1)[1])
        if self.config.default_cache_size:
            return budget.parse_size(self.config.default_cache_size)
        return budget.CAIOSFS_DEFAULT_CACHE_SIZE

    def _fit_budget(self) -> None:
        """Make room under the cache budget for the mounts recorded now (the new one
        included): evict idle datasets' caches, least recently used first."""
        if not self.config.cache_budget or not self.config.cache_root:
            return
        owners = [p for p in self.store.all() if p.cache_dir and not p.shared]
        with self._alloc_lock:
            evicted = budget.enforce(self.config.cache_root,
                                     budget.parse_size(self.config.cache_budget),
                                     [(p.cache_dir, self._cache_size_of(p)) for p in owners])
        self.metrics["cache_evictions"] += len(evicted)

    # -- shared mounts (one daemon and one cache per read-only dataset) ------------------------

    def _shared_path(self, spec: MountSpec, creds: str | None) -> str:
        """Where the shared mount of this dataset lives. Same source, options and credentials
        give the same path; the name is an HMAC under a node key, so neither the mount table
        nor the path says anything about the credentials."""
        doc = json.dumps([spec.source, spec.option_list(), creds or ""]).encode()
        key = hmac.new(self._node_key, doc, hashlib.sha256).hexdigest()[:32]
        return os.path.join(self.config.shared_dir, key, "mnt")

    @contextlib.contextmanager
    def _share_lock(self, path: str) -> Iterator[None]:
        with self._share_guard:
            lock = self._share_locks.setdefault(path, threading.Lock())
        with lock:
            yield

    def _users_of(self, shared: str) -> list[Publication]:
        return [p for p in self.store.all() if p.shared == shared]

    def _publish_shared(self, volume_id: str, target: str, spec: MountSpec, fingerprint: str,
                        creds: str | None, old: Publication | None,
                        pod: tuple[str, str] = ("", "")) -> None:
        """Bind-mount the dataset's shared mount at `target`, mounting it first if needed."""
        shared = self._shared_path(spec, creds)
        with self._share_lock(shared):
            if self.mounter.busy(shared):
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"the shared mount of {spec.source} is still starting; retry")
            os.makedirs(os.path.dirname(shared), mode=0o700, exist_ok=True)
            state = self.mounter.state(shared)
            if state is MountState.DEAD:
                log.warning("shared mount %s is dead (daemon gone); detaching it", shared)
                self._force_unmount(shared)
                state = MountState.NOT_MOUNTED
            if state is MountState.FOREIGN:
                raise CsiError(grpc.StatusCode.INTERNAL, f"{shared} has a foreign mount on it")
            created_dir = old.created_dir if old is not None else False
            if not os.path.isdir(target):
                if os.path.lexists(target):
                    raise _invalid(f"{target} exists and is not a directory")
                os.makedirs(target, exist_ok=True)
                created_dir = True
            record = Publication(target_path=target, volume_id=volume_id,
                                 fingerprint=fingerprint, source=spec.source,
                                 options=spec.option_list(), created_dir=created_dir,
                                 shared=shared, pod_namespace=pod[0], pod_name=pod[1])
            self.store.save(record)  # before mounting: a crash leaves the target known
            if state is MountState.NOT_MOUNTED:
                try:
                    self._mount_new(SHARED_PREFIX + os.path.basename(os.path.dirname(shared))[:12],
                                    shared, spec, "shared", creds, None)
                except CsiError:
                    self.store.delete(target)
                    if created_dir:
                        with contextlib.suppress(OSError):
                            os.rmdir(target)
                    raise
            try:
                self.mounter.bind(shared, target)
            except MountError as e:
                self.store.delete(target)
                self._end_shared_if_unused(shared)
                if created_dir:
                    with contextlib.suppress(OSError):
                        os.rmdir(target)
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"cannot bind {spec.source} at {target}: {e}") from None
            owner = self.store.load(shared)
            record.cache_dir = owner.cache_dir if owner is not None else ""
            self.store.save(record)
        log.info("published %s at %s (volume %s) from the shared mount %s (%d user(s))",
                 spec.source, target, volume_id, shared, len(self._users_of(shared)))

    def _end_shared_if_unused(self, shared: str) -> None:
        """Drain and unmount a shared mount that no target uses any more."""
        if self._users_of(shared):
            return
        state = self.mounter.state(shared)
        if state is MountState.MOUNTED:
            try:
                self.mounter.unmount(shared)
            except MountError as e:
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"caiosfs umount {shared} failed: {e}") from None
            owner = self.store.load(shared)
            if owner is not None:
                budget.mark_idle(owner.cache_dir)
        elif state is MountState.DEAD:
            self._force_unmount(shared)
        self.store.delete(shared)
        for d in (shared, os.path.dirname(shared)):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        log.info("shared mount %s ended (no target uses it)", shared)

    def _unpublish_shared(self, target: str, record: Publication) -> None:
        with self._share_lock(record.shared):
            state = self.mounter.state(target)
            if state is MountState.DEAD:
                self._force_unmount(target)
            elif state is not MountState.NOT_MOUNTED:
                try:
                    self.mounter.unbind(target)
                except MountError as e:
                    raise CsiError(grpc.StatusCode.INTERNAL,
                                   f"cannot unmount {target}: {e}") from None
            self._remove_target(target)
            self.store.delete(target)
            self._end_shared_if_unused(record.shared)

    def _force_unmount(self, target: str) -> None:
        try:
            self.mounter.force_unmount(target)
        except MountError as e:
            raise CsiError(grpc.StatusCode.INTERNAL, f"{target}: {e}") from None

    def unpublish(self, req) -> None:
        """NodeUnpublishVolume. Raises CsiError with the spec's status code on failure."""
        if not req.volume_id:
            raise _invalid("volume_id is required")
        target = self._check_target(req.target_path)
        with self.inflight.hold(target):
            record = self.store.load(target)
            owner = record.shared if record is not None and record.shared else target
            if self.mounter.busy(owner):
                # A publish that a killed plugin started is still bringing the daemon up; a
                # stat of the mount would wait for it. kubelet retries.
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"the mount of {target} is still starting; retry")
            if record is not None and record.shared:
                self._unpublish_shared(target, record)
                log.info("unpublished %s (volume %s)", target, req.volume_id)
                return
            state = self.mounter.state(target)
            if state is MountState.DEAD:
                log.warning("%s is a dead FUSE mount (daemon gone); detaching it", target)
                self._force_unmount(target)
                # What the dead daemon had not uploaded is in its journal: upload it now,
                # not whenever this data is next mounted on this node.
                if record is not None and not self._drain_orphan(record):
                    raise CsiError(grpc.StatusCode.INTERNAL,
                                   f"the dead mount at {target} left writes that could not "
                                   "be uploaded yet; they are kept, retry")
            elif state is MountState.MOUNTED:
                try:
                    self.mounter.unmount(target)
                    if record is not None:
                        budget.mark_idle(record.cache_dir)
                except MountError as e:
                    # The daemon may have died during the drain: then detach; otherwise keep the
                    # mount (and its unsaved data) and let the CO retry.
                    if self.mounter.state(target) is MountState.DEAD:
                        self._force_unmount(target)
                    elif self.mounter.state(target) is not MountState.NOT_MOUNTED:
                        raise CsiError(
                            grpc.StatusCode.INTERNAL,
                            f"caiosfs umount {target} failed, data not yet durable is kept "
                            f"and the unmount will be retried: {e}",
                        ) from None
            elif state is MountState.FOREIGN:
                # Not ours to drain; a plain unmount is all the CO can expect from us.
                log.warning("%s has a non-caiosfs mount; unmounting it plainly", target)
                self._force_unmount(target)
            self._remove_target(target)
            self.store.delete(target)
            log.info("unpublished %s (volume %s)", target, req.volume_id)

    # -- orphaned writes ----------------------------------------------------------------------

    def _drain_orphan(self, pub: Publication) -> bool:
        """Upload what a dead daemon left in its journal: mount its cache dir with its own
        source, options and credentials at a private mountpoint (the mount replays the
        journal), then unmount (which drains). True when done or nothing could be pending."""
        if pub.shared or "ro" in pub.options:
            return True  # read-only: nothing was written
        tmp = os.path.join(self.config.state_dir, "orphans", target_key(pub.target_path))
        os.makedirs(tmp, exist_ok=True)
        options = list(pub.options)
        if pub.cache_dir:
            options.append(f"cache_dir={pub.cache_dir}")
        if pub.creds_file and os.path.exists(pub.creds_file):
            options.append(f"credentials_file={pub.creds_file}")
        t0 = time.monotonic()
        try:
            state = self.mounter.state(tmp)
            if state is MountState.DEAD:
                self.mounter.force_unmount(tmp)
            if state is not MountState.MOUNTED:
                self.mounter.mount(pub.source, tmp, options,
                                   strip_credential_env=bool(pub.creds_file),
                                   volume_id=f"{pub.volume_id}:orphan")
            self.mounter.unmount(tmp)
        except (MountError, OSError) as e:
            self.metrics["orphan_drains_failed"] += 1
            log.error("orphaned writes of volume %s (%s, cache %s) not uploaded yet: %s",
                      pub.volume_id, pub.source, pub.cache_dir or "default", e)
            return False
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(tmp)
        self.metrics["orphan_drains"] += 1
        budget.mark_idle(pub.cache_dir)
        log.info("orphaned writes of volume %s (%s, cache %s): journal replayed and uploaded "
                 "in %.1fs", pub.volume_id, pub.source, pub.cache_dir or "default",
                 time.monotonic() - t0)
        return True

    def drain_orphans(self) -> int:
        """At start: every recorded read-write target whose mount is gone or dead (its daemon
        died while no plugin ran, and the pod may be gone too) gets its journal uploaded and
        its record dropped. Returns how many were drained."""
        done = 0
        for pub in self.store.all():
            if pub.shared or pub.volume_id.startswith(SHARED_PREFIX) or "ro" in pub.options:
                continue
            try:
                # Live targets (the usual case) are checked without holding them: kubelet's
                # republish of a live volume must not get ABORTED because of this pass.
                if self.mounter.busy(pub.target_path) or self.mounter.state(
                        pub.target_path) in (MountState.MOUNTED, MountState.FOREIGN):
                    continue
                with self.inflight.hold(pub.target_path):
                    if self.store.load(pub.target_path) is None:
                        continue  # unpublished meanwhile
                    state = self.mounter.state(pub.target_path)
                    if state in (MountState.MOUNTED, MountState.FOREIGN):
                        continue
                    if state is MountState.DEAD:
                        self._force_unmount(pub.target_path)
                    log.info("target %s of volume %s is gone: draining its journal",
                             pub.target_path, pub.volume_id)
                    if self._drain_orphan(pub):
                        self.store.delete(pub.target_path)
                        done += 1
            except (CsiError, OSError) as e:
                log.warning("orphan check of %s: %s", pub.target_path, e)
        return done

    @staticmethod
    def _remove_target(target: str) -> None:
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                os.rmdir(target)
            else:
                os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CsiError(grpc.StatusCode.INTERNAL,
                           f"cannot remove {target} after unmounting: {e.strerror}") from None

    def reconcile(self) -> dict[str, int]:
        """At start-up, adopt what a previous run of the plugin left behind: every recorded
        target that is still a live mount is this plugin's to republish and unpublish.
        Returns how many targets are in each state (shared mounts counted apart)."""
        t0 = time.monotonic()
        counts: dict[str, int] = {}
        for pub in self.store.all():
            try:
                state = self.mounter.state(pub.target_path)
            except OSError as e:
                log.warning("cannot inspect %s: %s", pub.target_path, e)
                continue
            kind = "shared " if pub.volume_id.startswith(SHARED_PREFIX) else ""
            counts[kind + state.value] = counts.get(kind + state.value, 0) + 1
            log.info("known target %s (%s, volume %s): %s", pub.target_path, pub.source,
                     pub.volume_id, state.value)
        log.info("adopted %d live volume(s) in %.3fs (%s)",
                 counts.get(MountState.MOUNTED.value, 0), time.monotonic() - t0,
                 ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none known")
        return counts
