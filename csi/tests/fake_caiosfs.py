#!/usr/bin/env python3
"""A stand-in for the `caiosfs` command, for unit tests of the CSI plugin and mount helper.

It mounts nothing. It records every call (argv, a few environment variables, and the
credentials file's content and mode) as one JSON line in $FAKE_CAIOSFS_DIR/calls.jsonl, and
keeps a fake mount table ($FAKE_MOUNTINFO, in /proc/self/mountinfo format) that the plugin
reads instead of the real one.

Knobs (environment): FAKE_CAIOSFS_FAIL_MOUNT / FAKE_CAIOSFS_FAIL_UMOUNT (an error line to
print, exit 1), FAKE_CAIOSFS_MOUNT_DELAY (seconds to sleep before "mounting").
Commands: mount SOURCE TARGET [-o OPTS] | umount TARGET [--timeout S] | lazy-umount TARGET
"""

import fcntl
import json
import os
import sys
import time


def escape(path: str) -> str:
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def edit_table(fn) -> None:
    path = os.environ["FAKE_MOUNTINFO"]
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        lines = fn(f.read().splitlines())
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in lines))


def record(entry: dict) -> None:
    with open(os.path.join(os.environ["FAKE_CAIOSFS_DIR"], "calls.jsonl"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry) + "\n")


def options(argv: list) -> dict:
    out = {}
    if "-o" in argv:
        for part in argv[argv.index("-o") + 1].split(","):
            k, _, v = part.partition("=")
            out[k] = v
    return out


def main() -> int:
    argv = sys.argv[1:]
    entry = {"argv": argv, "env": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    opts = options(argv)
    creds = opts.get("credentials_file")
    if creds:
        st = os.stat(creds)
        entry["creds_mode"] = st.st_mode & 0o777
        with open(creds) as f:
            entry["creds"] = f.read()
    record(entry)
    cmd = argv[0] if argv else ""
    if cmd == "mount":
        if os.environ.get("FAKE_CAIOSFS_FAIL_MOUNT"):
            print("caiosfs: starting", flush=True)
            print(os.environ["FAKE_CAIOSFS_FAIL_MOUNT"], file=sys.stderr)
            return 1
        time.sleep(float(os.environ.get("FAKE_CAIOSFS_MOUNT_DELAY", "0")))
        source, target = argv[1], argv[2]
        line = f"900 1 0:99 / {escape(target)} rw,nosuid,nodev - fuse.caiosfs {source} rw"
        edit_table(lambda lines: [*lines, line])
        return 0
    if cmd in ("umount", "lazy-umount"):
        if cmd == "umount" and os.environ.get("FAKE_CAIOSFS_FAIL_UMOUNT"):
            print(os.environ["FAKE_CAIOSFS_FAIL_UMOUNT"], file=sys.stderr)
            return 1
        target = escape(argv[1])
        found = []

        def drop(lines):
            keep = [ln for ln in lines if ln.split()[4] != target]
            found.append(len(keep) != len(lines))
            return keep

        edit_table(drop)
        if not found[0]:
            print(f"caiosfs: {argv[1]} is not mounted", file=sys.stderr)
            return 1
        return 0
    print(f"fake caiosfs: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
