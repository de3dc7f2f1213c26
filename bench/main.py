"""``bench/run``: caiosfs vs rclone vs s3fs vs raw boto3 on a loopback SeaweedFS.

The run: start the server, seed the data, then for every repetition, every workload, every
system (in an order that rotates, so drift over the run hits all systems alike) do one
measurement; a failure is recorded for that (workload, system) and the run goes on. At the end
write JSON + Markdown + PNG to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.procs import BenchError
from bench.scale import MiB, make_scale
from bench.store import BUCKET, PARTS, PREFIX, Store
from bench.systems import Caiosfs, Env, FsSystem, Rclone, S3fs, base_env
from bench.workloads import WORKLOADS, Ctx, Workload

ALL_SYSTEMS = ("caiosfs", "rclone", "s3fs", "boto3")
BASE = "caiosfs-base"  # with --caiosfs-base
NETS = ("loopback", "wan")
DEFAULT_WAN = "20ms,50MB/s"  # issue 15: a remote store's first-byte delay, one stream's rate
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark caiosfs against rclone mount, s3fs and raw boto3 on a SeaweedFS "
        "S3 server on 127.0.0.1. Results go to bench/results/.",
        epilog="workloads: " + ", ".join(names),
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small data, one repetition: a few minutes; checks every system runs",
    )
    ap.add_argument(
        "--size-scale",
        type=float,
        default=None,
        help="multiply every data size (and most counts) by this factor",
    )
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument(
        "--loader-objects",
        type=int,
        default=None,
        help="objects in the data loader's prefix (default 10,000; quick 500); issue 15 "
        "names 100,000, which costs ~9 min of seeding here (see bench/README.md)",
    )
    ap.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated workloads to leave out")
    ap.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help="comma-separated systems (default: %(default)s)",
    )
    ap.add_argument(
        "--wan",
        default="",
        help="the simulated remote store: FIRST_BYTE_DELAY,BANDWIDTH_PER_CONNECTION "
        f"(default {DEFAULT_WAN}): a loopback proxy in front of the server, for all systems. "
        "Given alone, the run is behind the proxy only (--net wan)",
    )
    ap.add_argument(
        "--net",
        default="",
        help="comma-separated networks to run every workload on: loopback (the server "
        "straight), wan (behind the --wan proxy). Default: both; --quick runs its WAN "
        "case on a few workloads only",
    )
    ap.add_argument("--endpoint", help="use this S3 server on 127.0.0.1 instead of starting one")
    ap.add_argument("--access-key", help="with --endpoint")
    ap.add_argument("--secret-key", help="with --endpoint")
    ap.add_argument(
        "--caiosfs",
        default=str(procs.REPO / ".venv" / "bin" / "caiosfs"),
        help="the caiosfs executable (default: %(default)s)",
    )
    ap.add_argument(
        "--caiosfs-base",
        default=None,
        metavar="EXECUTABLE",
        help="also measure this other caiosfs build as system 'caiosfs-base' (e.g. the "
        "venv of a worktree at an older commit: /path/.venv/bin/caiosfs), side by side in "
        "the same run, with the ratio caiosfs/caiosfs-base in the tables",
    )
    ap.add_argument(
        "--caiosfs-opts",
        default="",
        help="extra -o options for caiosfs mounts, e.g. metadata=list (default: none)",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="where mounts, caches and the server's data go (default: a new temp "
        "dir under /var/tmp, removed at the end)",
    )
    ap.add_argument("--keep-workdir", action="store_true", help="do not delete the workdir")
    ap.add_argument(
        "--out",
        default=str(procs.REPO / "bench" / "results"),
        help="output directory (default: %(default)s)",
    )
    ap.add_argument(
        "--boto3-concurrency",
        type=int,
        default=None,
        help="raw boto3: ranged GETs in flight (default 8 on loopback, 16 behind the WAN "
        "proxy, as issue 15's targets name)",
    )
    ap.add_argument(
        "--boto3-chunk-mib",
        type=int,
        default=16,
        help="raw boto3: ranged GET size in MiB (default %(default)s)",
    )
    ap.add_argument(
        "--boto3-part-mib",
        type=int,
        default=64,
        help="raw boto3: multipart part size in MiB (default %(default)s)",
    )
    ap.add_argument(
        "--peer-read-ahead-kb",
        type=int,
        default=1024,
        help="kernel read_ahead_kb set on the rclone and s3fs mounts (caiosfs sets "
        "its own); 0 leaves the kernel default (default %(default)s)",
    )
    ap.add_argument(
        "--cache-size-gib",
        type=int,
        default=20,
        help="local cache limit given to every system (default %(default)s)",
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if caiosfs or raw boto3 failed any measurement, or any system "
        "returned wrong data (a peer that fails otherwise is only reported)",
    )
    args = ap.parse_args(argv)
    for opt in ("only", "skip"):
        bad = [n for n in _split(getattr(args, opt)) if n not in names]
        if bad:
            ap.error(f"--{opt}: unknown workload(s) {', '.join(bad)}; known: {', '.join(names)}")
    bad = [s for s in _split(args.systems) if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"--systems: unknown {', '.join(bad)}")
    if args.endpoint and not (args.access_key and args.secret_key):
        ap.error("--endpoint needs --access-key and --secret-key")
    if not args.net:
        args.net = "wan" if args.wan else ",".join(NETS)
    bad = [n for n in _split(args.net) if n not in NETS]
    if bad or not _split(args.net):
        ap.error(f"--net: unknown {', '.join(bad) or 'nothing'}; known: {', '.join(NETS)}")
    try:
        from bench.wanproxy import parse_spec

        parse_spec(args.wan or DEFAULT_WAN)
    except ValueError as e:
        ap.error(f"--wan: {e}")
    return args


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def command_line(argv: list[str]) -> str:
    """The command as typed, for the report, with the value of --secret-key hidden."""
    out = ["bench/run"]
    hide = False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == "--secret-key":
            out.append(a)
            hide = True
        elif a.startswith("--secret-key="):
            out.append("--secret-key=***")
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


def _git_rev() -> str:
    """The repository's revision, marked when tracked files differ from it."""
    rev = _version(["git", "-C", str(procs.REPO), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(procs.REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    return rev + (" (+uncommitted changes)" if dirty else "")


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return (
        f"{os.cpu_count()} cores ({model}), {mem_kib / (1 << 20):.0f} GiB RAM, "
        f"Linux {platform.release()}"
    )


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def start_wan_proxy(spec: str, target: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start bench.wanproxy in front of the server; return the process and its URL."""
    from urllib.parse import urlparse

    u = urlparse(target)
    port_file = workdir / "wanproxy.port"
    with open(workdir / "wanproxy.log", "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.wanproxy",
                "--target",
                f"{u.hostname}:{u.port}",
                "--spec",
                spec,
                "--port-file",
                str(port_file),
            ],
            cwd=procs.REPO,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if not procs.wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 15):
        proc.kill()
        raise SystemExit("bench: the WAN proxy did not start; see " + str(workdir / "wanproxy.log"))
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def run(args: argparse.Namespace) -> int:
    scale = make_scale(args.quick, args.size_scale, args.reps)
    if args.loader_objects:
        scale = dataclasses.replace(scale, loader_objects=args.loader_objects)
    only = _split(args.only)
    skip = set(_split(args.skip))
    workloads: list[Workload] = [
        w for w in WORKLOADS if (not only or w.name in only) and w.name not in skip
    ]
    nets = [n for n in NETS if n in _split(args.net)]
    spec = args.wan or DEFAULT_WAN
    # The rows of the report: (key, workload, net). --quick keeps its WAN case next to the
    # loopback set small: the workloads marked quick_wan (unless --only names others).
    small_wan = args.quick and "loopback" in nets and not only
    rows: list[tuple[str, Workload, str]] = []
    for net in nets:
        for w in workloads:
            if net not in w.nets:
                continue
            if net == "wan" and small_wan and not w.quick_wan:
                continue
            rows.append((w.name if net == "loopback" else f"{w.name}@wan", w, net))
    wanted = _split(args.systems)
    if args.caiosfs_base:
        wanted.insert(wanted.index("caiosfs") + 1 if "caiosfs" in wanted else 0, BASE)
    if os.geteuid() != 0:
        log("warning: not root: page cache cannot be dropped, FUSE mounts may fail")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="caiosfs-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}; scale {scale}; nets {', '.join(nets)}")

    store = Store(workdir, args.endpoint, args.access_key, args.secret_key)
    wan_proc = None
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    res = report.Results(rows, wanted)
    meta: dict[str, Any] = {
        "date": date,
        "machine": machine(),
        "command": command_line(sys.argv[1:]),
        "git": _git_rev(),
        "scale": scale.to_json(),
        "nets": nets,
        "wan": spec if "wan" in nets else "",
        "drop_caches": procs.can_drop_caches(),
        "durable": "polled: the store is listed every 0.1 s until every object is there with "
        "its full size (for every system and raw boto3 alike; no system's own flush); the "
        "content is then compared by xxh3 (all of it in --quick, the first file otherwise)",
    }
    all_systems: list[FsSystem] = []
    try:
        store.start()
        log(f"store: {store.endpoint}")
        parts: set[str] = set()
        for _key, w, _net in rows:
            parts.update(PARTS if w.needs is None else w.needs)
        ds = store.seed(scale, log, parts)
        endpoints = {"loopback": store.endpoint}
        if "wan" in nets:
            wan_proc, endpoints["wan"] = start_wan_proxy(spec, store.endpoint, workdir)
            log(f"WAN proxy {spec} at {endpoints['wan']}")
        meta["store"] = (
            f"SeaweedFS ({_version([str(Path(sys.executable).parent / 'weed'), 'version'])})"
            if store.server is not None
            else f"external {store.endpoint}"
        )
        per_net: dict[str, tuple[Ctx, dict[str, FsSystem | None]]] = {}
        for net in nets:
            env = Env(
                endpoints[net],
                store.access_key,
                store.secret_key,
                workdir,
                args.peer_read_ahead_kb,
                args.cache_size_gib,
            )
            systems: list[FsSystem] = []
            for name in wanted:
                if name == "caiosfs":
                    systems.append(Caiosfs(env, Path(args.caiosfs), args.caiosfs_opts))
                elif name == BASE:
                    systems.append(
                        Caiosfs(env, Path(args.caiosfs_base), args.caiosfs_opts, name=BASE)
                    )
                elif name == "rclone":
                    systems.append(Rclone(env))
                elif name == "s3fs":
                    systems.append(S3fs(env))
            all_systems += systems
            worker_env = base_env()
            worker_env.update(store.credentials_env())
            worker_env["BENCH_ENDPOINT"] = endpoints[net]
            conc = args.boto3_concurrency or (16 if net == "wan" else 8)
            ctx = Ctx(
                scale=scale,
                ds=ds,
                store=store,
                workdir=workdir,
                worker_env=worker_env,
                net=net,
                proxy_pid=wan_proc.pid if net == "wan" and wan_proc is not None else None,
                server_pid=(store.server.proc.pid
                            if store.server is not None and store.server.proc is not None
                            else None),
                verify_all=args.quick,
                b3_conc=conc,
                b3_up_conc=16,
                b3_chunk=args.boto3_chunk_mib * MiB,
                b3_part=args.boto3_part_mib * MiB,
                log=log,
            )
            by_name: dict[str, FsSystem | None] = {s.name: s for s in systems}
            if "boto3" in wanted:
                by_name["boto3"] = None
            per_net[net] = (ctx, by_name)
            if "boto3" in wanted:
                meta.setdefault("configs", {})[f"boto3 ({net})"] = (
                    f"{conc} ranged GETs of {args.boto3_chunk_mib} MiB in flight; uploads: "
                    f"multipart parts of {args.boto3_part_mib} MiB, 16 in flight"
                )
        first = all_systems[: len([n for n in wanted if n != "boto3"])]
        meta["versions"] = {s.name: s.version() for s in first if not s.unavailable()}
        meta["versions"]["fio"] = _version(["fio", "--version"])
        meta["versions"]["python"] = platform.python_version()
        meta.setdefault("configs", {}).update({s.name: s.describe() for s in first})
        meta["configs"]["source"] = f"s3://{BUCKET}/{PREFIX}"
        if wan_proc is not None:
            meta["configs"]["wan"] = (
                f"bench/wanproxy.py {spec}: first byte of each response held until "
                f"{spec.split(',')[0]} after the request's last byte; each connection paced to "
                f"{spec.split(',')[1]} each way"
            )

        unavailable = {s.name: s.unavailable() for s in first}
        for name, why in unavailable.items():
            if why:
                log(f"{name}: unavailable: {why}")
        order = [n for n in (*ALL_SYSTEMS, BASE) if n in wanted]
        for rep in range(scale.reps):
            for wi, (key, w, net) in enumerate(rows):
                ctx, by_name = per_net[net]
                ctx.rep = rep
                applicable = [n for n in order if w.applies(n)]
                if not applicable:
                    continue
                k = (rep + wi) % len(applicable)
                for name in applicable[k:] + applicable[:k]:
                    why = unavailable.get(name)
                    if why:
                        if rep == 0:
                            res.fail(key, name, f"unavailable: {why}")
                        continue
                    measure(ctx, res, key, w, name, by_name[name])
            log(f"repetition {rep + 1}/{scale.reps} done")
    except KeyboardInterrupt:
        log("interrupted: writing what we have")
        meta["interrupted"] = True
    finally:
        for s in all_systems:
            procs.force_unmount(s.mnt)
        if wan_proc is not None:
            wan_proc.terminate()
            try:
                wan_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                wan_proc.kill()
        store.stop()

    out = Path(args.out)
    names = [f"run-{stamp}" + ("-quick" if args.quick else "")]
    names.append("quick" if args.quick else "latest")
    if any(
        (
            args.only,
            args.skip,
            args.size_scale,
            args.wan,
            args.net != ",".join(NETS),
            args.endpoint,
            args.reps,
            args.loader_objects,
            args.caiosfs_opts,
            args.caiosfs_base,
            args.systems != ",".join(ALL_SYSTEMS),
        )
    ):
        # A partial or unusual run must not overwrite the published full results.
        names = names[:1]
    meta["elapsed_s"] = round(time.monotonic() - T0, 1)
    if LOADAVG:
        srt = sorted(LOADAVG)
        meta["loadavg_1min"] = {"min": srt[0], "median": srt[len(srt) // 2], "max": srt[-1]}
    written = report.write_all(res, meta, out, names)
    print(report.markdown(res, meta))
    log("wrote " + ", ".join(str(p) for p in written))
    if not args.keep_workdir and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)

    status = 0
    silent = res.systems_without_numbers()
    if silent:
        log(f"FAIL: no numbers at all from: {', '.join(silent)}")
        status = 1
    missing = res.missing()
    if missing:
        log("no numbers for: " + ", ".join(f"{s}/{w}" for w, s in missing))
    if args.strict:
        # Ours must not fail at all, and nobody may return wrong data; a peer that fails a
        # workload (rclone's rm -rf leaving objects behind, s3fs's EIO under the WAN proxy)
        # is reported under "Failures" and is not our build's fault.
        ours = [(w, s, e) for w, s, e in res.failures() if s in STRICT_SYSTEMS]
        wrong = [(w, s, e) for w, s, e in res.failures() if "WRONG DATA" in e]
        for w, s, e in dict.fromkeys(ours + wrong):
            log(f"FAIL (--strict): {s}/{w}: {e}")
        if ours or wrong or any(s in STRICT_SYSTEMS for _, s in missing):
            status = 1
    if meta.get("interrupted"):
        status = 130
    return status


LOADAVG: list[float] = []
STRICT_SYSTEMS = ("caiosfs", "boto3")  # whose every failure --strict turns into exit 1


def measure(
    ctx: Ctx, res: report.Results, key: str, w: Workload, name: str, s: FsSystem | None
) -> None:
    """One measurement of one system; any failure is recorded, never raised."""
    # Other work on the machine skews every figure; the report says how busy it was.
    LOADAVG.append(os.getloadavg()[0])
    drops0 = procs.page_cache_drops()
    t = time.monotonic()
    try:
        out = w.boto3(ctx) if s is None else w.fs(ctx, s)  # type: ignore[misc]
    except BenchError as e:
        res.fail(key, name, str(e))
        log(f"r{ctx.rep} {key:14s} {name:8s} FAILED ({time.monotonic() - t:.0f} s): {e}")
        return
    except Exception as e:  # noqa: BLE001 - a bug in one adapter must not end the run
        res.fail(key, name, f"{type(e).__name__}: {e}")
        log(f"r{ctx.rep} {key:14s} {name:8s} ERROR: {traceback.format_exc()}")
        return
    drops1 = procs.page_cache_drops()
    if drops0 is not None and drops1 is not None:
        foreign = (drops1[0] - drops0[0]) - (drops1[1] - drops0[1])
        if foreign > 0:
            # (With the dentries gone, a mount answers every name again: a warm step
            # turns cold, and behind the WAN proxy each lookup costs round trips.)
            out.notes.append(f"r{ctx.rep}: page cache and dentries dropped {foreign} time(s) "
                             "by other processes during this measurement")
    res.add(key, name, out)
    figures = ", ".join(
        f"{x.metric} {x.rate:,.1f} {x.unit} ({x.seconds:.2f} s)" for x in out.samples
    )
    rss = f", rss {out.rss_mib:.0f} MiB" if out.rss_mib is not None else ""
    cpu = ""
    for label, part in report.cpu_parts(out.cpu or {}).items():
        if part.get("bytes"):
            gib = part["bytes"] / (1 << 30)
            cpu += f", cpu/GiB{' ' + label if label else ''} " + " ".join(
                f"{k[:-2]} {v / gib:.2f}s" for k, v in part.items() if k.endswith("_s")
            )
    log(f"r{ctx.rep} {key:14s} {name:8s} {figures}{rss}{cpu}")
    for n in out.notes:
        log(f"    note: {n}")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: unmount the peers, keep what was measured


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
