"""Generate and load the gRPC stubs for the vendored CSI spec.

The stubs are build products, not source: they are generated from `csi/proto/csi.proto` with
grpcio-tools, whose version must match the grpcio runtime (the generated code refuses to load
against an older grpcio). They are written next to this module as `csi_pb2.py` and
`csi_pb2_grpc.py` and are git-ignored.

Generation happens at image/wheel build time (`csi/build_stubs.py`, or the `build_py` hook
in `csi/setup.py`), and on first import in a source checkout so that tests and developers
need no extra step. A stamp line at the top of `csi_pb2.py` records the proto's hash and the
grpcio-tools version; a mismatch triggers regeneration.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

SPEC_VERSION = "v1.10.0"
PACKAGE = "caiosfs_csi"
_PKG_DIR = Path(__file__).resolve().parent
_STAMP_PREFIX = "# caiosfs-csi stubs: "


def proto_path() -> Path:
    """Return the vendored csi.proto (beside the package in a checkout, inside it in a wheel)."""
    for candidate in (_PKG_DIR / "proto" / "csi.proto", _PKG_DIR.parent / "proto" / "csi.proto"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("csi.proto not found next to the caiosfs_csi package")


def _stamp(proto: Path) -> str:
    import grpc_tools

    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:16]
    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    return f"{_STAMP_PREFIX}csi {SPEC_VERSION} sha256:{digest} grpcio-tools {version}"


def generate(out_root: Path | None = None) -> list[Path]:
    """Generate csi_pb2.py and csi_pb2_grpc.py into `out_root/caiosfs_csi/`.

    `out_root` defaults to the directory holding this package. Files are written to a temporary
    directory first and renamed into place, so a concurrent importer never sees half a file.
    """
    import grpc_tools
    from grpc_tools import protoc

    proto = proto_path()
    out_root = Path(out_root) if out_root is not None else _PKG_DIR.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    pkg_out = out_root / PACKAGE
    pkg_out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=pkg_out, prefix=".stubs-") as tmp:
        # Mapping the proto into the virtual path "caiosfs_csi/" makes protoc emit
        # `from caiosfs_csi import csi_pb2`, so the stubs import as a package, not top-level.
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={PACKAGE}={proto.parent}",
                f"--proto_path={well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"{PACKAGE}/{proto.name}",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc} for {proto}")
        made = Path(tmp) / PACKAGE
        pb2 = made / "csi_pb2.py"
        pb2.write_text(_stamp(proto) + "\n" + pb2.read_text())
        written = []
        for name in ("csi_pb2_grpc.py", "csi_pb2.py"):  # pb2 last: its stamp marks completion
            dest = pkg_out / name
            os.replace(made / name, dest)
            written.append(dest)
    shutil.rmtree(pkg_out / "__pycache__", ignore_errors=True)
    return written


def _up_to_date() -> bool:
    pb2 = _PKG_DIR / "csi_pb2.py"
    if not (pb2.is_file() and (_PKG_DIR / "csi_pb2_grpc.py").is_file()):
        return False
    try:
        proto = proto_path()
    except FileNotFoundError:
        return True  # installed wheel without the proto: trust what was built
    with pb2.open() as f:
        first = f.readline().rstrip("\n")
    try:
        return first == _stamp(proto)
    except ImportError:
        return first.startswith(_STAMP_PREFIX)  # runtime image without grpcio-tools


def load() -> tuple[ModuleType, ModuleType]:
    """Return (csi_pb2, csi_pb2_grpc), generating them first if missing or stale."""
    if not _up_to_date():
        if not os.access(_PKG_DIR, os.W_OK):
            raise RuntimeError(
                f"CSI stubs in {_PKG_DIR} are missing or stale and the directory is read-only; "
                "run `python csi/build_stubs.py` at build time"
            )
        generate()
        for name in (f"{PACKAGE}.csi_pb2", f"{PACKAGE}.csi_pb2_grpc"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
    pb2 = importlib.import_module(f"{PACKAGE}.csi_pb2")
    pb2_grpc = importlib.import_module(f"{PACKAGE}.csi_pb2_grpc")
    return pb2, pb2_grpc
