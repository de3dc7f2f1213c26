"""Shared test fixtures: one SeaweedFS S3 server per session, clients, buckets, credentials.

Fixtures
    seaweed      session: a running `caiosfs.seaweed.SeaweedServer` on 127.0.0.1, S3 auth on
                 (access key ``caiosfs-test``, random secret), stopped at session end.
    s3           session: a boto3 S3 client for it (path-style, us-east-1).
    bucket       function: a fresh, uniquely named, empty bucket; deleted (with its objects)
                 after the test.
    s3_env       function: env vars for subprocesses (credentials and region, no endpoint).
    creds_file   function: a 0600 AWS shared-credentials file with a ``[default]`` section.

Helpers (plain functions):
    data(size, seed)  deterministic pseudo-random bytes
    xxh(b)            xxh3_64 hex digest, the checksum caiosfs uses
Import them with ``from conftest import data, xxh`` (tests/ has no __init__.py), or, robust
even when another conftest.py is on sys.path, as ``random_bytes`` / ``xxh3_hex`` from
``caiosfs.demo`` (the same functions: the demo seeds its bucket with them).

Mount fixtures live in a separate file; keep this one to the object store.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from caiosfs.demo import random_bytes, xxh3_hex
from caiosfs.seaweed import REGION, SeaweedServer

ACCESS_KEY = "caiosfs-test"

# boto3 in this process (and in subprocesses that inherit the environment) must never fall
# back to the EC2 instance metadata service: that would be traffic off 127.0.0.0/8.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def data(size: int, seed: int | str = 0) -> bytes:
    """Deterministic pseudo-random bytes; a different seed gives unrelated content."""
    return random_bytes(size, seed)


def xxh(b: bytes | bytearray | memoryview) -> str:
    """xxh3_64 hex digest."""
    return xxh3_hex(b)


def bucket_name(hint: str = "t") -> str:
    """A unique valid S3 bucket name (3-63 chars of [a-z0-9-]) that mentions ``hint``."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-") or "t"
    return f"{slug}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS server for the whole session (startup takes ~4 s, sometimes ~9 s)."""
    server = SeaweedServer(
        tmp_path_factory.mktemp("seaweed"),
        access_key=ACCESS_KEY,
        secret_key=secrets.token_hex(20),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(seaweed: SeaweedServer) -> Any:
    """A boto3 S3 client for the session server. Shared: do not close or reconfigure it."""
    return seaweed.client()


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh empty bucket named after the test; removed afterwards with everything in it."""
    name = bucket_name(request.node.name.removeprefix("test_"))
    s3.create_bucket(Bucket=name)
    yield name
    # Each bucket is a SeaweedFS collection with its own volumes: drop it so a long session
    # does not pile them up. The server deletes non-empty buckets (allowDeleteBucketNotEmpty).
    try:
        s3.delete_bucket(Bucket=name)
    except (BotoCoreError, ClientError) as e:
        # Best effort: a failed cleanup must not turn a pass into an error.
        print(f"could not delete bucket {name}: {e}")


@pytest.fixture
def s3_env(seaweed: SeaweedServer) -> dict[str, str]:
    """Environment for a subprocess to authenticate as the test identity.

    Use as ``env={**os.environ, **s3_env}``. The endpoint is deliberately not included: pass it
    explicitly (``seaweed.endpoint``) so tests also check that it is honoured.
    """
    assert seaweed.access_key is not None and seaweed.secret_key is not None
    return {
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def creds_file(seaweed: SeaweedServer, tmp_path: Path) -> Path:
    """An AWS shared-credentials INI file (mode 0600) with the test identity as [default]."""
    path = tmp_path / "aws-credentials"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            "[default]\n"
            f"aws_access_key_id = {seaweed.access_key}\n"
            f"aws_secret_access_key = {seaweed.secret_key}\n"
        )
    return path


@pytest.fixture
def mounter(seaweed: SeaweedServer, s3_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Factory that mounts caiosfs for real (CLI subprocess); everything is unmounted after."""
    from mounting import Mounter
    env = {**os.environ, **s3_env}
    m = Mounter(seaweed, env, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """A test's figures (mounting.record_figures) are recorded only once it has passed."""
    from mounting import commit_figures
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call":
        commit_figures(rep.passed)
