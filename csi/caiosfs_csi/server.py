"""gRPC adapters (Identity and Node services) and the unix-socket server.

The servicers are thin: they log the request with secrets stripped, call NodeService, and turn
a CsiError into the gRPC status the spec asks for. Anything unexpected is logged with its
traceback and answered INTERNAL, so one bad request never takes the server down.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf import wrappers_pb2

from caiosfs_csi import DEFAULT_DRIVER_NAME, __version__
from caiosfs_csi.mounter import Mounter
from caiosfs_csi.node import CsiError, NodeConfig, NodeService
from caiosfs_csi.redact import redact
from caiosfs_csi.stubs import load

csi_pb2, csi_pb2_grpc = load()
log = logging.getLogger(__name__)


def _rpc(quiet: bool = False) -> Callable:
    """Wrap a servicer method: log (redacted), time, and map errors to gRPC statuses.

    `quiet` RPCs (Probe, capabilities) log at DEBUG: the liveness probe calls them every few
    seconds and would drown everything else.
    """

    def deco(fn: Callable) -> Callable:
        name = fn.__name__

        @functools.wraps(fn)
        def wrapper(self, request, context):
            level = logging.DEBUG if quiet else logging.INFO
            log.log(level, "%s request: %s", name, redact(request))
            t0 = time.monotonic()
            try:
                response = fn(self, request, context)
            except CsiError as e:
                log.warning("%s failed after %.2fs: %s: %s", name, time.monotonic() - t0,
                            e.code.name, e.message)
                context.abort(e.code, e.message)
            except Exception:
                log.exception("%s crashed after %.2fs", name, time.monotonic() - t0)
                context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error, see plugin log")
            log.log(level, "%s ok in %.2fs", name, time.monotonic() - t0)
            return response

        return wrapper

    return deco


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """CSI Identity service."""

    def __init__(self, driver_name: str, mounter: Mounter) -> None:
        self.driver_name = driver_name
        self.mounter = mounter

    @_rpc(quiet=True)
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    @_rpc(quiet=True)
    def GetPluginCapabilities(self, request, context):
        # A node-only plugin: no CONTROLLER_SERVICE, no topology constraints (an object store
        # is reachable from every node).
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])

    @_rpc(quiet=True)
    def Probe(self, request, context):
        # Ready as soon as caiosfs can be run. Nothing transient (the object store, one bad
        # mount) may fail this: a failed liveness probe restarts the plugin container.
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.mounter.executable_ok()))


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """CSI Node service (publish/unpublish only; no staging)."""

    def __init__(self, service: NodeService) -> None:
        self.service = service

    @_rpc(quiet=True)
    def NodeGetCapabilities(self, request, context):
        rpc = csi_pb2.NodeServiceCapability.RPC
        # VOLUME_MOUNT_GROUP: kubelet hands us the pod's fsGroup instead of chown-ing every
        # object in the bucket recursively.
        caps = [rpc.VOLUME_MOUNT_GROUP]
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=rpc(type=t)) for t in caps]
        )

    @_rpc()
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self.service.config.node_id)

    @_rpc()
    def NodePublishVolume(self, request, context):
        self.service.publish(request)
        return csi_pb2.NodePublishVolumeResponse()

    @_rpc()
    def NodeUnpublishVolume(self, request, context):
        self.service.unpublish(request)
        return csi_pb2.NodeUnpublishVolumeResponse()


def socket_path(endpoint: str) -> str:
    """Path of the unix socket named by a CSI endpoint (`unix:///csi/csi.sock`)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"CSI endpoint {endpoint!r} is not a unix socket (unix:///path)")
    if not path.startswith("/"):
        raise ValueError(f"CSI endpoint {endpoint!r} must name an absolute path")
    return path


@dataclass
class PluginConfig:
    """Everything needed to start the plugin."""

    endpoint: str
    node_id: str
    state_dir: str
    driver_name: str = DEFAULT_DRIVER_NAME
    cache_root: str = ""
    max_workers: int = 16
    shared_dir: str = ""
    default_cache_size: str = ""
    cache_budget: str = ""


def build_server(config: PluginConfig, mounter: Mounter) -> tuple[grpc.Server, NodeService]:
    """Create (not start) the gRPC server bound to the endpoint's unix socket."""
    path = socket_path(config.endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a previous run; binding would fail otherwise
    except FileNotFoundError:
        pass
    service = NodeService(
        NodeConfig(node_id=config.node_id, state_dir=config.state_dir,
                   cache_root=config.cache_root, shared_dir=config.shared_dir,
                   default_cache_size=config.default_cache_size,
                   cache_budget=config.cache_budget),
        mounter,
    )
    # Publish can block for minutes (warm=blocking) and holds a worker meanwhile; the pool is
    # sized so that a few slow mounts never starve Probe.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                    thread_name_prefix="csi"))
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityServicer(config.driver_name, mounter), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(service), server)
    server.add_insecure_port(f"unix://{path}")
    return server, service
