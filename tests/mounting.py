"""Mounting caiosfs for real in tests: the CLI in a subprocess, as a user would run it.

``mounter`` (a fixture in conftest) returns a factory; every mount it makes is unmounted
(or, if that fails, lazily detached and its daemon killed) when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from caiosfs import mountinfo

CAIOSFS = [sys.executable, "-m", "caiosfs.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(CAIOSFS + list(args), env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"caiosfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def mountinfo_has(path: str) -> bool:
    return mountinfo.find(path) is not None


class Mount:
    def __init__(self, path: Path, cache_dir: Path, source: str, options: str,
                 env: dict[str, str]) -> None:
        self.path, self.cache_dir, self.source, self.options, self.env = (
            path, cache_dir, source, options, env)

    def mount(self) -> None:
        run_cli("mount", self.source, str(self.path), "-o", self.options, env=self.env,
                check=True)
        assert mountinfo_has(str(self.path))

    @property
    def pid(self) -> int:
        info = json.loads(run_cli("status", str(self.path), "--json", check=True).stdout)
        return int(info["pid"])

    def status(self) -> dict[str, Any]:
        return json.loads(run_cli("status", str(self.path), "--json", check=True).stdout)

    def flush(self, timeout: float = 120) -> None:
        run_cli("flush", str(self.path), "-q", timeout=timeout, check=True)

    def umount(self, timeout: float = 120) -> None:
        run_cli("umount", str(self.path), "-q", timeout=timeout, check=True)
        assert not mountinfo_has(str(self.path))

    def log_problems(self, limit: int = 20) -> list[str]:
        """The daemon's WARNING/ERROR log lines (and traceback lines), for assertion messages."""
        try:
            text = (self.cache_dir / "caiosfs.log").read_text(errors="replace")
        except OSError as exc:
            return [f"(no log: {exc})"]
        out = [ln for ln in text.splitlines()
               if " WARNING " in ln or " ERROR " in ln or ln.startswith(("Traceback", "  ", "E"))]
        return out[-limit:]

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), and detach the dead mount."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True,
                       check=False)

    def cleanup(self) -> None:
        if not mountinfo_has(str(self.path)):
            return
        r = run_cli("umount", str(self.path), "-q", "--timeout", "60", timeout=90)
        if r.returncode != 0 and mountinfo_has(str(self.path)):
            try:
                self.kill()
            except Exception:  # noqa: BLE001 - whatever went wrong, unmount it lazily
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)],
                               capture_output=True, check=False)


class Mounter:
    def __init__(self, seaweed: Any, env: dict[str, str], tmp: Path) -> None:
        self.seaweed, self.env, self.tmp = seaweed, env, tmp
        self.mounts: list[Mount] = []
        self.n = 0

    def __call__(self, bucket: str, prefix: str = "", options: str = "",
                 cache_dir: Path | None = None, mount: bool = True) -> Mount:
        self.n += 1
        mp = self.tmp / f"mnt{self.n}"
        mp.mkdir(exist_ok=True)
        cache = cache_dir or self.tmp / f"cache{self.n}"
        opts = f"endpoint={self.seaweed.endpoint},path_style,cache_dir={cache}"
        if options:
            opts += "," + options
        src = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        m = Mount(mp, cache, src, opts, self.env)
        self.mounts.append(m)
        if mount:
            m.mount()
        return m

    def cleanup(self) -> None:
        for m in self.mounts:
            m.cleanup()


# Store helpers shared by the write-path tests.
def get(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(s3: Any, bucket: str, prefix: str = "", records: bool = False) -> set[str]:
    """The keys under ``prefix``; directory attribute records (``.caiosfs-attrs``, written
    by devbox mounts: not files) only with ``records``."""
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out |= {o["Key"] for o in page.get("Contents", [])
                if records or o["Key"].rpartition("/")[2] != ".caiosfs-attrs"}
    return out


FIGURES_DIR = Path(__file__).parent / "figures"
# Figures are printed by every run; they are written to tests/figures/*.json (from which
# tests/figures/render_readme.py makes the README's tables) only with CAIOSFS_RECORD_FIGURES=1, and
# only for a test that passed: a plain run leaves the tree as it was.
RECORD_ENV = "CAIOSFS_RECORD_FIGURES"
_pending: list[tuple[str, str, dict[str, Any]]] = []


def record_figures(file: str, name: str, figures: dict[str, Any]) -> None:
    """Print one test's figures; keep them for tests/figures/<file> until the test is over
    (see :func:`commit_figures`)."""
    print(f"\nFIGURES {name}: {json.dumps(figures, sort_keys=True)}")
    _pending.append((file, name, figures))


def commit_figures(passed: bool) -> None:
    """Called by conftest when a test's call phase ends: merge its figures into
    tests/figures/*.json if it passed and recording is on; drop them otherwise."""
    pending = list(_pending)
    _pending.clear()
    if not passed or os.environ.get(RECORD_ENV) != "1":
        return
    for file, name, figures in pending:
        path = FIGURES_DIR / file
        path.parent.mkdir(exist_ok=True)
        try:
            allf = json.loads(path.read_text())
        except (OSError, ValueError):
            allf = {}
        allf[name] = {**figures, "measured": time.strftime("%Y-%m-%d"),
                      "machine": f"{os.cpu_count()} cores, SeaweedFS on loopback"}
        path.write_text(json.dumps(allf, indent=2, sort_keys=True) + "\n")
