"""setuptools hook: generate the CSI gRPC stubs into the wheel (metadata is in pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    """build_py that also writes csi_pb2.py and csi_pb2_grpc.py into the build tree."""

    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(HERE))
        from caiosfs_csi.stubs import generate

        for path in generate(Path(self.build_lib)):
            print(f"generated {path}")


setup(cmdclass={"build_py": BuildPyWithStubs})
