"""pytest wiring for csi/tests: the fixtures live in csi_testlib (importable by tests)."""

import importlib.util

import pytest

if importlib.util.find_spec("grpc") is None:
    # Without the `csi` extra only the mount-helper tests can run.
    collect_ignore_glob = ["test_csi_*.py"]
else:
    from csi_testlib import fake_caiosfs, plugin  # noqa: F401  (fixtures)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_caiosfs: needs the real caiosfs, FUSE and SeaweedFS")
