#!/usr/bin/env python3
"""A fake `caiosfs` that makes a real (empty, tiny) FUSE mount of type fuse.caiosfs.

Used to test mount(8)/umount(8) with the helpers end to end without an object store:
`mount SOURCE DIR [-o OPTS]` records its argv in $FAKE_CAIOSFS_DIR/calls.jsonl, starts a
pyfuse3 daemon in its own session serving one file, `hello`, and exits 0 once DIR is a mount
point (the real caiosfs's contract). `umount DIR [--timeout S]` records its argv and unmounts
with fusermount3.
"""

import errno
import json
import os
import stat
import subprocess
import sys
import time

HELLO = b"hello from fake caiosfs\n"


def record(argv: list) -> None:
    with open(os.path.join(os.environ["FAKE_CAIOSFS_DIR"], "calls.jsonl"), "a") as f:
        f.write(json.dumps({"argv": argv}) + "\n")


def serve(source: str, target: str, ro: bool) -> None:
    import pyfuse3
    import trio

    class Hello(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
            elif inode == 2:
                a.st_mode, a.st_size = stat.S_IFREG | 0o644, len(HELLO)
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return a

        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name == b"hello":
                return await self.getattr(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"hello", await self.getattr(2), 1)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, off, size):
            return HELLO[off : off + size]

    options = set(pyfuse3.default_options) | {f"fsname={source}", "subtype=caiosfs"}
    if ro:
        options.add("ro")
    pyfuse3.init(Hello(), target, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        serve(argv[1], argv[2], argv[3] == "ro")
        return 0
    record(argv)
    if argv[:1] == ["mount"]:
        source, target = argv[1], argv[2]
        time.sleep(float(os.environ.get("FAKE_CAIOSFS_MOUNT_DELAY", "0")))
        opts = argv[argv.index("-o") + 1].split(",") if "-o" in argv else []
        proc = subprocess.Popen(
            [sys.executable, __file__, "serve", source, target, "ro" if "ro" in opts else "rw"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with open(os.path.join(os.environ["FAKE_CAIOSFS_DIR"], "daemons"), "a") as f:
            f.write(f"{proc.pid}\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.ismount(target):
                return 0
            if proc.poll() is not None:
                print(f"caiosfs: daemon exited with {proc.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print("caiosfs: mount did not come up", file=sys.stderr)
        return 1
    if argv[:1] == ["umount"]:
        return subprocess.call(["fusermount3", "-u", argv[1]])
    print(f"fake caiosfs: unknown command {argv[:1]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
