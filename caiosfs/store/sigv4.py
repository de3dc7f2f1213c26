"""AWS Signature Version 4 for S3, and the keys it signs with.

botocore's ``S3SigV4Auth`` builds an ``AWSRequest``, header maps and the signing key on
every call: ~0.2-0.4 ms of CPU, a tenth of a 100 KB file's whole cost in the mount, and most
of a small GET's in ``caiosfs cp``. :class:`SigV4` computes the same canonical request and
signature (tests compare it with botocore's for names and queries that need encoding) and
keeps the day's signing key. Every header sent is signed; the path as sent (S3 does not
normalise it); the payload's SHA-256, or ``UNSIGNED-PAYLOAD``.

The keys come from a callable (:data:`Keys`), so a rotated credentials file or botocore's
refreshing chain (profiles, SSO, instance metadata) is read at each request.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from ..errors import StoreError, UserError

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"

# (access key, secret key, session token or None)
Keys = tuple[str, str, "str | None"]


def read_credentials_file(path: str, section: str) -> Keys:
    """(access key, secret key, session token) from an AWS shared-credentials INI file."""
    parser = configparser.ConfigParser()
    try:
        with open(path) as fh:
            parser.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise UserError(f"cannot read credentials_file {path}: {exc.__class__.__name__}") from None
    if section not in parser:
        raise UserError(f"credentials_file {path} has no [{section}] section")
    sec = parser[section]
    key, secret = sec.get("aws_access_key_id"), sec.get("aws_secret_access_key")
    if not key or not secret:
        raise UserError(f"credentials_file {path} [{section}] lacks aws_access_key_id or "
                        "aws_secret_access_key")
    return key.strip(), secret.strip(), (sec.get("aws_session_token") or None)


class FileKeys:
    """Keys from a credentials file, re-read whenever it changes (a rotated Kubernetes
    secret), as S3Store's own file provider does."""

    def __init__(self, path: str, section: str) -> None:
        self._path, self._section = path, section
        self._lock = threading.Lock()
        self._keys = read_credentials_file(path, section)
        self._sig = self._signature()

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def __call__(self) -> Keys:
        sig = self._signature()
        if sig is not None and sig != self._sig:
            with self._lock:
                try:
                    self._keys = read_credentials_file(self._path, self._section)
                    self._sig = sig
                except UserError:
                    pass  # half-written during rotation: keep the old keys, retry next request
        return self._keys


def keys_from(credentials_file: str | None, aws_profile: str | None) -> Callable[[], Keys | None]:
    """Where the keys come from, for the mount (S3Store: its boto3 client and the lean path
    alike) and for cp: the credentials file (section ``aws_profile``, ``$AWS_PROFILE`` or
    default), else the environment's keys (unless a profile is named), else botocore's
    whole chain (profiles, SSO, instance metadata...), imported only then."""
    if credentials_file:
        section = aws_profile or os.environ.get("AWS_PROFILE") or "default"
        return FileKeys(credentials_file, section)
    env = os.environ
    if not aws_profile and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None)
        return lambda: keys
    import botocore.exceptions
    import botocore.session
    try:
        creds = botocore.session.Session(profile=aws_profile).get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise UserError(f"AWS profile {aws_profile!r} not found") from None

    def chain() -> Keys | None:
        if creds is None:
            return None
        f = creds.get_frozen_credentials()  # (refreshed when it expires)
        return f.access_key, f.secret_key, f.token
    return chain


class SigV4:
    """AWS Signature Version 4 for S3 (what botocore's S3SigV4Auth computes): every header
    sent is signed, the path as sent (S3 does not normalise it), the payload's SHA-256 or
    UNSIGNED-PAYLOAD."""

    def __init__(self, region: str, keys: Callable[[], Keys | None]) -> None:
        self.region, self.keys = region, keys
        self._day_key: tuple[str, str, bytes] = ("", "", b"")  # (day, secret, signing key)

    def _signing_key(self, day: str, secret: str) -> bytes:
        d, s, k = self._day_key
        if d != day or s != secret:
            k = hmac.new(("AWS4" + secret).encode(), day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._day_key = (day, secret, k)
        return k

    def sign(self, method: str, path: str, query: str, headers: dict[str, str],
             payload: str, now: float | None = None) -> None:
        """Add x-amz-date, x-amz-content-sha256 (and the session token) and Authorization
        to ``headers`` (lower-case names); ``query`` is already canonical (sorted, encoded)."""
        keys = self.keys()
        if keys is None:
            raise StoreError("NoCredentials", "no credentials found (set AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY or credentials_file=)")
        access, secret, token = keys
        amz = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        headers["x-amz-date"] = amz
        headers["x-amz-content-sha256"] = payload
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        canonical = "\n".join((
            method, path, query,
            "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names),
            ";".join(names), payload))
        scope = f"{amz[:8]}/{self.region}/s3/aws4_request"
        to_sign = (f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n"
                   + hashlib.sha256(canonical.encode()).hexdigest())
        sig = hmac.new(self._signing_key(amz[:8], secret), to_sign.encode(),
                       hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={sig}")


def host_header(scheme: str, netloc: str) -> str:
    """The Host header http clients send (and botocore signs): the port only when it is
    not the scheme's default."""
    for default in ((":80",) if scheme == "http" else (":443",) if scheme == "https" else ()):
        if netloc.endswith(default):
            return netloc[:-len(default)]
    return netloc


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                    for k, v in sorted(params.items()))
