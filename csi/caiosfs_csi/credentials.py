"""Turn a publish request's `secrets` into an AWS shared-credentials file.

Secrets come from the PV's nodePublishSecretRef (or the inline volume's nodePublishSecretRef).
The file is handed to caiosfs with `-o credentials_file=`, so keys never appear on a command
line (visible in /proc/*/cmdline to every user of the node) or in the environment of a
long-lived daemon.
"""

from __future__ import annotations

from collections.abc import Mapping

from caiosfs_csi.options import OptionError

# Accepted spellings, compared case-insensitively with '_' and '-' removed.
_ACCESS_KEY = {"accesskeyid", "awsaccesskeyid", "accesskey"}
_SECRET_KEY = {"secretaccesskey", "awssecretaccesskey", "secretkey"}
_SESSION_TOKEN = {"sessiontoken", "awssessiontoken"}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def credentials_ini(secrets: Mapping[str, str]) -> str | None:
    """Render `secrets` as an INI `[default]` section, or None if there are no secrets.

    Raises OptionError (INVALID_ARGUMENT) when only half a key pair is present, or when a
    value contains a line break (it would forge extra INI lines).
    """
    if not secrets:
        return None
    access = secret = token = None
    for key, value in secrets.items():
        nk = _norm(key)
        if nk in _ACCESS_KEY:
            access = value.strip()
        elif nk in _SECRET_KEY:
            secret = value.strip()
        elif nk in _SESSION_TOKEN:
            token = value.strip()
    if access is None and secret is None:
        # Name the keys we saw, never their values.
        raise OptionError(
            "secrets have no access key: expected accessKeyId and secretAccessKey "
            f"(got keys: {', '.join(sorted(secrets)) or 'none'})"
        )
    if not access or not secret:
        raise OptionError("secrets must hold both accessKeyId and secretAccessKey")
    for value in (access, secret, token or ""):
        if "\n" in value or "\r" in value:
            raise OptionError("a secret value contains a line break")
    lines = ["[default]", f"aws_access_key_id = {access}", f"aws_secret_access_key = {secret}"]
    if token:
        lines.append(f"aws_session_token = {token}")
    return "\n".join(lines) + "\n"
