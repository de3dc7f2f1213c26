"""Command line of the caiosfs CSI node plugin.

    python -m caiosfs_csi [--endpoint unix:///csi/csi.sock] [--node-id NODE] [--supervise] ...

Every flag also reads an environment variable (shown in --help), which is how the DaemonSet
configures it. Stopping the plugin never unmounts anything: the FUSE daemons keep serving the
pods, and the next plugin instance picks them up from the state directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from caiosfs_csi import DEFAULT_DRIVER_NAME, __version__

log = logging.getLogger("caiosfs_csi")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (flags default to environment variables)."""
    p = argparse.ArgumentParser(prog="caiosfs-csi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default=_env("CSI_ENDPOINT", "unix:///csi/csi.sock"),
                   help="CSI socket, unix:///path (env CSI_ENDPOINT)")
    p.add_argument("--node-id", default=_env("CSI_NODE_ID", _env("KUBE_NODE_NAME",
                                                                   socket.gethostname())),
                   help="node id reported by NodeGetInfo (env CSI_NODE_ID, KUBE_NODE_NAME)")
    p.add_argument("--driver-name", default=_env("CSI_DRIVER_NAME", DEFAULT_DRIVER_NAME),
                   help="CSI driver name (env CSI_DRIVER_NAME)")
    p.add_argument("--state-dir", default=_env("CAIOSFS_CSI_STATE_DIR", "/run/caiosfs-csi"),
                   help="where published targets and their credentials are recorded; keep it "
                        "on a host tmpfs (env CAIOSFS_CSI_STATE_DIR)")
    p.add_argument("--cache-root", default=_env("CAIOSFS_CSI_CACHE_ROOT"),
                   help="parent of per-volume cache dirs, e.g. an NVMe hostPath "
                        "(env CAIOSFS_CSI_CACHE_ROOT; empty: caiosfs default)")
    p.add_argument("--default-cache-size", default=_env("CAIOSFS_CSI_DEFAULT_CACHE_SIZE"),
                   metavar="SIZE",
                   help="cache_size of volumes that set no cacheSize (env "
                        "CAIOSFS_CSI_DEFAULT_CACHE_SIZE; empty: caiosfs's default, 20G)")
    p.add_argument("--cache-budget", default=_env("CAIOSFS_CSI_CACHE_BUDGET"), metavar="SIZE",
                   help="cap the cache root across datasets: live mounts' cache sizes plus idle "
                        "caches; idle datasets' caches are evicted, least recently used first "
                        "(env CAIOSFS_CSI_CACHE_BUDGET; empty: no cap)")
    p.add_argument("--caiosfs-bin", default=_env("CAIOSFS_BIN") or None,
                   help="caiosfs executable (env CAIOSFS_BIN; default: search)")
    p.add_argument("--mount-timeout", type=float,
                   default=float(_env("CAIOSFS_CSI_MOUNT_TIMEOUT", "300")),
                   help="seconds `caiosfs mount` may take (warm=blocking gets at least "
                        "--warm-timeout)")
    p.add_argument("--warm-timeout", type=float,
                   default=float(_env("CAIOSFS_CSI_WARM_TIMEOUT", "3600")))
    p.add_argument("--umount-timeout", type=float,
                   default=float(_env("CAIOSFS_CSI_UMOUNT_TIMEOUT", "90")),
                   help="drain time handed to `caiosfs umount --timeout`")
    p.add_argument("--mounter-socket", default=_env("CAIOSFS_MOUNTER_SOCKET"),
                   help="socket of caiosfs-mounter (python -m caiosfs_csi.mounterd): the "
                        "plugin mounts and hands /dev/fuse to it, so the FUSE daemons live "
                        "outside this container (env CAIOSFS_MOUNTER_SOCKET; empty: run the "
                        "daemons from here)")
    p.add_argument("--shared-dir", default=_env("CAIOSFS_CSI_SHARED_DIR"),
                   help="where read-only datasets get one shared mount each, bind-mounted into "
                        "every target (one daemon, one cache per dataset); in Kubernetes a "
                        "path under the Bidirectional kubelet dir (env CAIOSFS_CSI_SHARED_DIR; "
                        "default with --mounter-socket: STATE_DIR/shared; 'none': no sharing)")
    p.add_argument("--metrics-address", default=_env("CAIOSFS_CSI_METRICS_ADDRESS"),
                   metavar="HOST:PORT",
                   help="serve the node's Prometheus metrics (every volume's daemon, labelled "
                        "with volume id and pod) at http://HOST:PORT/metrics "
                        "(env CAIOSFS_CSI_METRICS_ADDRESS; empty: off)")
    p.add_argument("--log-level", default=_env("CAIOSFS_CSI_LOG_LEVEL", "INFO"))
    p.add_argument("--supervise", action="store_true",
                   default=_env("CAIOSFS_CSI_SUPERVISE") in ("1", "true", "yes"),
                   help="run the server as a child and restart it if it dies, so that a crash "
                        "of the server does not end the container (and with it the mounts)")
    p.add_argument("--version", action="version", version=f"caiosfs-csi {__version__}")
    return p.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    """Run the gRPC server until SIGTERM/SIGINT."""
    from caiosfs_csi.fdmount import FdMounter
    from caiosfs_csi.mounter import Mounter
    from caiosfs_csi.options import OptionError, check_option
    from caiosfs_csi.server import PluginConfig, build_server

    for flag, value in (("--default-cache-size", args.default_cache_size),
                        ("--cache-budget", args.cache_budget)):
        try:
            if value:
                check_option("cache_size", value)
        except OptionError as e:
            print(f"caiosfs-csi: {flag}: {e}", file=sys.stderr)
            return 2

    timeouts = {"mount_timeout": args.mount_timeout, "blocking_warm_timeout": args.warm_timeout,
                "umount_timeout": args.umount_timeout}
    if args.mounter_socket:
        mounter: Mounter = FdMounter(args.caiosfs_bin, mounter_socket=args.mounter_socket,
                                     **timeouts)
    else:
        mounter = Mounter(args.caiosfs_bin, **timeouts)
    shared_dir = args.shared_dir
    if shared_dir == "none":
        shared_dir = ""
    elif not shared_dir and args.mounter_socket:
        shared_dir = os.path.join(args.state_dir, "shared")
    config = PluginConfig(endpoint=args.endpoint, node_id=args.node_id,
                          state_dir=args.state_dir, driver_name=args.driver_name,
                          cache_root=args.cache_root, shared_dir=shared_dir,
                          default_cache_size=args.default_cache_size,
                          cache_budget=args.cache_budget)
    server, service = build_server(config, mounter)
    service.reconcile()
    if args.metrics_address:
        from caiosfs_csi import nodemetrics
        try:
            nodemetrics.serve(args.metrics_address, service, mounter)
        except (OSError, ValueError) as e:
            log.error("metrics endpoint %s not started: %s", args.metrics_address, e)
    # The handler only appends to a list: one that takes a lock (Event.set) can deadlock
    # against the main thread holding that lock when the signal is handled, and the plugin
    # then never stops (kubelet waits out the grace period and kills it).
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    server.start()
    # Journals of volumes that died while no plugin ran: upload them now, in the background
    # (kubelet's calls for those targets get ABORTED meanwhile).
    threading.Thread(target=service.drain_orphans, name="orphans", daemon=True).start()
    log.info("caiosfs-csi %s serving %s as %s on node %s (%s)", __version__,
             args.endpoint, args.driver_name, args.node_id,
             f"daemons in caiosfs-mounter at {args.mounter_socket}" if args.mounter_socket
             else f"caiosfs: {mounter.caiosfs_bin}")
    while not stopping:
        time.sleep(0.2)
    log.info("stopping; FUSE mounts are left running")
    server.stop(grace=10).wait()
    return 0


def supervise(argv: list[str]) -> int:
    """Restart the server child whenever it exits, reaping every orphan meanwhile.

    As PID 1 of the plugin container this process also adopts the daemonized caiosfs
    processes and must reap them when they exit, or they would linger as zombies.
    """
    child_argv = [sys.executable, "-m", "caiosfs_csi", *[a for a in argv if a != "--supervise"]]
    env = dict(os.environ, CAIOSFS_CSI_SUPERVISE="")
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 0.5
    while True:
        started = time.monotonic()
        child = subprocess.Popen(child_argv, env=env)
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                pid, status = child.pid, 0
            except InterruptedError:
                continue
            if pid == child.pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
        if stopping:
            return 0
        # Back off on a crash loop, reset after a healthy run.
        if time.monotonic() - started > 60:
            backoff = 0.5
        log.error("server exited with %s; restarting in %.1fs", child.returncode, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m caiosfs_csi` and the `caiosfs-csi` script."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.supervise:
        return supervise(raw)
    code = serve(args)
    # Leave at once: the interpreter's exit would join gRPC's executor threads, and one still
    # in a call (a mount waiting out --mount-timeout) would hold a stopping plugin past
    # kubelet's grace period (a stop once took > 30 s under load). The server takes no more
    # calls and everything the plugin keeps is on disk; its daemons live in their own sessions.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
