"""Developer trees on a mount (issue #17): what survives a cold remount.

A cold remount is an unmount, then a mount with an *empty* cache directory: another node
after a pod moved. What this mount wrote must read back the same (types, modes, times,
inode numbers), whatever is accessed first, and git must not re-read files it committed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "GIT_OPTIONAL_LOCKS": "0"}


def git(cwd: Path, *args: str) -> str:
    r = subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, capture_output=True,
                       text=True, env={**os.environ, **GIT_ENV}, timeout=120, check=False)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


def cold_remount(mounter: Any, m: Any, bucket: str, options: str = "") -> Any:
    """Flush and unmount ``m``; mount the same bucket again with a fresh cache directory."""
    m.flush()
    m.umount()
    return mounter(bucket, options=options)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry below root: type, permission bits, and content hash or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode),
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("profile", ["default", "devbox"])
@pytest.mark.parametrize("first", ["listing", "lookup"])
def test_symlink_and_mode_survive_cold_remount(s3: Any, bucket: str, mounter: Any,
                                               first: str, profile: str) -> None:
    """Default and devbox profiles: a symlink and a 0755 script come back as written after a
    cold remount, whether the directory is listed first or the names are looked up first."""
    m = mounter(bucket, options=f"profile={profile}")
    d = m.path / "bin"
    d.mkdir()
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(d / "run.sh", 0o755)
    (d / "data.txt").write_text("plain\n")
    os.symlink("run.sh", d / "run")
    os.symlink("../nowhere/at/all", d / "dangling")
    m2 = cold_remount(mounter, m, bucket, f"profile={profile}")
    d2 = m2.path / "bin"
    if first == "listing":
        names = sorted(os.listdir(d2))
        assert names == ["dangling", "data.txt", "run", "run.sh"]
    st = os.lstat(d2 / "run")
    assert stat.S_ISLNK(st.st_mode), oct(st.st_mode)
    assert os.readlink(d2 / "run") == "run.sh"
    assert os.readlink(d2 / "dangling") == "../nowhere/at/all"
    assert stat.S_IMODE(os.stat(d2 / "run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(d2 / "data.txt").st_mode) == 0o644
    assert (d2 / "run").read_text() == "#!/bin/sh\necho hi\n"  # through the link


def test_lookups_in_order_read_exact_times_once_per_file(s3: Any, bucket: str,
                                                          mounter: Any) -> None:
    """Default profile after a cold remount: lstat of every file of a directory in order
    (git status) shows the times this mount wrote, to the nanosecond, with one HEAD per
    file at most (sent in parallel windows ahead of the names asked for) and no GET."""
    m = mounter(bucket)
    d = m.path / "src"
    d.mkdir()
    want = {}
    for i in range(60):
        p = d / f"m{i:02d}.py"
        p.write_text(f"x = {i}\n")
        ns = 1_700_000_000_123_456_789 + i * 1_000_000_007
        os.utime(p, ns=(ns, ns))
        want[p.name] = ns
    m2 = cold_remount(mounter, m, bucket)
    before = m2.status()
    got = {name: os.lstat(m2.path / "src" / name).st_mtime_ns for name in sorted(want)}
    after = m2.status()
    assert got == want
    assert after["s3_get_requests"] == before["s3_get_requests"]
    assert after["s3_requests"] - before["s3_requests"] <= 60 + 12


def test_dataset_profile_trades_metadata_after_listing(s3: Any, bucket: str,
                                                       mounter: Any) -> None:
    """The dataset profile (metadata=list) is the one that does not HEAD after a listing:
    a symlink listed first shows as a regular file there, as its help says."""
    m = mounter(bucket)
    os.symlink("target", m.path / "ln")
    m2 = cold_remount(mounter, m, bucket, "profile=dataset")
    assert os.listdir(m2.path) == ["ln"]
    assert stat.S_ISREG(os.lstat(m2.path / "ln").st_mode)


def test_times_and_inodes_stable_across_cold_remount(s3: Any, bucket: str,
                                                     mounter: Any) -> None:
    m = mounter(bucket)
    p = m.path / "f.txt"
    p.write_bytes(b"x" * 1000)
    os.utime(p, ns=(1_700_000_000_123_456_789, 1_700_000_000_987_654_321))
    q = m.path / "sub" / "g.txt"
    q.parent.mkdir()
    q.write_bytes(b"y")
    m.flush()
    before = {n: os.lstat(x) for n, x in (("f", p), ("g", q), ("sub", q.parent))}
    m2 = cold_remount(mounter, m, bucket)
    after = {"f": os.lstat(m2.path / "f.txt"), "g": os.lstat(m2.path / "sub" / "g.txt"),
             "sub": os.lstat(m2.path / "sub")}
    for n, b in before.items():
        assert after[n].st_ino == b.st_ino, n
    for n in ("f", "g"):
        assert after[n].st_mtime_ns == before[n].st_mtime_ns, n
        assert after[n].st_ctime_ns == before[n].st_ctime_ns, n
    assert after["f"].st_mtime_ns == 1_700_000_000_987_654_321


def test_git_status_after_cold_remount_reads_no_file_content(s3: Any, bucket: str,
                                                             mounter: Any) -> None:
    """A repository committed on the mount, flushed, remounted with an empty cache:
    `git status` is clean and downloads none of the files' content (only .git's)."""
    m = mounter(bucket)
    repo = m.path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    content = 0
    for i in range(60):
        sub = repo / f"pkg{i % 6}"
        sub.mkdir(exist_ok=True)
        body = os.urandom(16 << 10)  # incompressible: .git is small next to the tree
        (sub / f"mod{i}.py").write_bytes(body)
        content += len(body)
    (repo / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "tool.sh", 0o755)
    os.symlink("pkg0/mod0.py", repo / "link")
    # Files modified in the same second as the index that recorded them are "racily clean"
    # to git (it compares seconds here): it re-reads them on any filesystem, until an index
    # written later records them again. Not what this test is about.
    time.sleep(1.1)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    assert git(repo, "status", "--porcelain") == ""
    m2 = cold_remount(mounter, m, bucket)
    before = m2.status()["bytes_in"]
    out = git(m2.path / "repo", "status", "--porcelain")
    got = m2.status()["bytes_in"] - before
    assert out == "", out
    git_dir = sum(f.stat().st_size for f in (m2.path / "repo" / ".git").rglob("*")
                  if f.is_file() and "objects" not in f.parts)
    # The index, HEAD, refs and config are read; the 960 KiB of files (and their blobs)
    # are not.
    assert got <= git_dir, (got, git_dir, content)


def test_git_status_cold_on_devbox_reads_directory_records_not_heads(
        s3: Any, bucket: str, mounter: Any) -> None:
    """devbox (dirattrs=1): a repository committed on the mount, flushed, unmounted,
    remounted with an empty cache: `git status` is clean, HEADs no object (only names git
    asks for that are not there are probed) and reads no file of the working tree (each directory's attribute record, fetched along with its
    listing, holds the exact modes and times; git reads only its own index, refs and the
    commit); `rm -rf` of the tree then leaves no object under it."""
    from mounting import keys
    m = mounter(bucket, options="profile=devbox")
    repo = m.path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for i in range(40):
        sub = repo / f"pkg{i % 4}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"x = {i}\n" * 50)
    (repo / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "tool.sh", 0o755)
    os.symlink("pkg0/mod0.py", repo / "link")
    time.sleep(1.1)  # (not racily clean: see the test above)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    m2 = cold_remount(mounter, m, bucket, "profile=devbox,debug=1")
    stored = keys(s3, bucket, "repo/", records=True)
    assert {"repo/.caiosfs-attrs", "repo/pkg0/.caiosfs-attrs"} <= stored
    before = m2.status()
    out = git(m2.path / "repo", "status", "--porcelain")
    after = m2.status()
    assert out == "", out
    # (debug=1 logs every request: which keys were read)
    log = (m2.cache_dir / "caiosfs.log").read_text().splitlines()
    heads = [ln for ln in log if "client: head " in ln]
    gets = [ln.split("client: get ")[1].split(" ")[0] for ln in log if "client: get " in ln]
    # No object is HEADed: what git asks for and is not there (.git/MERGE_HEAD, ...) is
    # probed as ever (a name created elsewhere shows when asked for), no more.
    assert after["s3_head_requests"] - before["s3_head_requests"] == len(heads)
    found = [ln for ln in heads if not ln.endswith(": 404")]
    assert not found, found
    assert len(heads) <= 40, heads
    assert after["s3_get_requests"] - before["s3_get_requests"] == len(gets)
    assert all(k.startswith("repo/.git/") for k in gets), gets  # git's own files only
    assert ".caiosfs-attrs" not in os.listdir(m2.path / "repo")
    assert stat.S_IMODE(os.stat(m2.path / "repo" / "tool.sh").st_mode) == 0o755
    r = subprocess.run(["rm", "-rf", str(m2.path / "repo")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, (r.stderr, sorted(keys(s3, bucket, "repo/", records=True)))
    m2.flush()
    time.sleep(1.5)  # (a record written late would land by now)
    assert keys(s3, bucket, "repo/", records=True) == set()


def test_fifo_socket_and_device_nodes(s3: Any, bucket: str, mounter: Any) -> None:
    """mkfifo, mknod and a bound unix socket work while the mount lives, are stored as s3fs
    stores them (an empty object whose x-amz-meta-mode has the type) and come back with
    their type after a cold remount, listed first."""
    import socket
    import threading
    m = mounter(bucket)
    fifo = m.path / "pipe"
    os.mkfifo(fifo, 0o600)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fifo.write_bytes(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]
    os.mknod(m.path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sock_path = m.path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(str(sock_path))
    conn, _ = srv.accept()
    cli.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s in (conn, cli, srv):
        s.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    m.flush()
    meta = s3.head_object(Bucket=bucket, Key="pipe")["Metadata"]
    assert stat.S_ISFIFO(int(meta["mode"])) and stat.S_IMODE(int(meta["mode"])) == 0o600
    m2 = cold_remount(mounter, m, bucket)
    assert sorted(os.listdir(m2.path)) == ["agent.sock", "null", "pipe"]
    assert stat.S_ISFIFO(os.lstat(m2.path / "pipe").st_mode)
    assert stat.S_ISSOCK(os.lstat(m2.path / "agent.sock").st_mode)
    st = os.lstat(m2.path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.unlink(m2.path / "pipe")
    assert not (m2.path / "pipe").exists()


def _make_wheel(out: Path, name: str, version: str, modules: dict[str, str],
                script: str | None = None) -> Path:
    """A pure-Python wheel written by hand (a zip with the dist-info files pip reads): no
    network, no build backend."""
    import base64
    import zipfile
    dist = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {f"{name}/{m}": src.encode() for m, src in modules.items()}
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\n"
                                 f"Version: {version}\n").encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    if script:
        files[f"{dist}/entry_points.txt"] = f"[console_scripts]\n{script}\n".encode()
    record = []
    for path, body in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(body)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, body in files.items():
            z.writestr(path, body)
    return whl


def _pip_and_git(root: Path, wheels: Path, origin: Path) -> None:
    """The workload: pip install of the wheels into root/site, a clone of origin into
    root/clone with a checkout of another branch."""
    import sys
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-compile",
                        "--disable-pip-version-check", "--find-links", str(wheels),
                        "--target", str(root / "site"), "devpkg", "devtool"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    git(root, "clone", "-q", "--no-local", str(origin), "clone")
    git(root / "clone", "checkout", "-q", "feature")


def test_pip_git_import_on_mount_match_local(s3: Any, bucket: str, mounter: Any,
                                             tmp_path: Path) -> None:
    """pip install (wheels built here), git clone + checkout and import on the mount give
    the same tree as on a local directory, also after a cold remount; the clone is clean
    and intact there, and the package imports and its script runs."""
    import sys
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    mods = {"__init__.py": "from .core import answer\n",
            "core.py": "def answer():\n    return 42\n",
            "data.txt": "payload\n" * 100}
    mods.update({f"m{i}.py": f"X = {i}\n" * 50 for i in range(40)})
    _make_wheel(wheels, "devpkg", "1.0", mods)
    _make_wheel(wheels, "devtool", "0.3", {"__init__.py": "",
                                           "cli.py": "def main():\n    print('tool ok')\n"},
                script="devtool = devtool.cli:main")
    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    for c in range(5):
        (origin / f"f{c}.txt").write_bytes(os.urandom(3000))
        (origin / "log.txt").write_text(f"commit {c}\n" * (c + 1))
        git(origin, "add", "-A")
        git(origin, "commit", "-q", "-m", f"c{c}")
    git(origin, "checkout", "-q", "-b", "feature")
    (origin / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(origin / "run.sh", 0o755)
    os.symlink("f0.txt", origin / "alias")
    (origin / "f1.txt").unlink()
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "feature")
    git(origin, "checkout", "-q", "main")

    local = tmp_path / "local"
    local.mkdir()
    _pip_and_git(local, wheels, origin)
    m = mounter(bucket)
    _pip_and_git(m.path, wheels, origin)

    def trees(root: Path) -> dict[str, tuple]:
        state = tree_state(root / "site")
        state.update({"clone/" + k: v for k, v in tree_state(root / "clone").items()
                      if not k.startswith(".git")})
        return state
    want = trees(local)
    assert trees(m.path) == want
    m2 = cold_remount(mounter, m, bucket)
    assert trees(m2.path) == want
    clone = m2.path / "clone"
    assert git(clone, "status", "--porcelain") == ""
    git(clone, "fsck", "--strict", "--no-progress")
    assert git(clone, "log", "--format=%s") == git(local / "clone", "log", "--format=%s")
    env = {**os.environ, "PYTHONPATH": str(m2.path / "site")}
    out = subprocess.run([sys.executable, "-B", "-c",
                          "import devpkg, devpkg.m39; print(devpkg.answer(), devpkg.m39.X)"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split() == ["42", "39"]
    tool = m2.path / "site" / "bin" / "devtool"
    assert os.access(tool, os.X_OK)
    out = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.strip() == "tool ok"


def test_lookups_in_one_directory_list_it_once(s3: Any, bucket: str, mounter: Any) -> None:
    """Looking up many names of one directory (git status, cp -r over a tree) lists the
    directory once after a few probes instead of probing every name with a HEAD and a
    LIST; the answers stay right (modes, new names)."""
    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"d/f{i:02d}", Body=b"x" * i)
    m = mounter(bucket)
    before = m.status()["s3_requests"]
    sizes = [os.lstat(m.path / "d" / f"f{i:02d}").st_size for i in range(40)]
    assert sizes == list(range(40))
    assert not (m.path / "d" / "nothere").exists()
    used = m.status()["s3_requests"] - before
    # 2 per name before (HEAD + one-key LIST): 82. Now: 3 probes, one LIST, a HEAD per
    # remaining file for its metadata, none for the missing name.
    assert used <= 40 + 10, used
    (m.path / "d" / "new").write_text("n")
    assert (m.path / "d" / "new").read_text() == "n"


def test_rm_rf_batches_deletes_and_names_reused_at_once(s3: Any, bucket: str,
                                                        mounter: Any) -> None:
    """unlink=batch: rm -rf sends a directory's DELETEs as one DeleteObjects (not a round trip per file),
    everything is gone from the store when rmdir returns, and a name reused right after its
    unlink gets the new content, never a late delete."""
    from mounting import keys
    for d in range(3):
        for i in range(30):
            s3.put_object(Bucket=bucket, Key=f"t/d{d}/f{i}", Body=b"old")
    s3.put_object(Bucket=bucket, Key="keep", Body=b"old")
    m = mounter(bucket, options="unlink=batch")
    assert len(os.listdir(m.path / "t" / "d0")) == 30
    before = m.status()["s3_requests"]
    subprocess.run(["rm", "-rf", str(m.path / "t")], check=True, timeout=120)
    used = m.status()["s3_requests"] - before
    assert keys(s3, bucket) == {"keep"}  # nothing left once rm -rf returned
    assert used < 90, used  # a DELETE per file alone would be 90
    os.unlink(m.path / "keep")
    (m.path / "keep").write_bytes(b"new")  # reused at once: the old DELETE goes first
    (m.path / "t").mkdir()
    (m.path / "t" / "d0").mkdir()
    (m.path / "t" / "d0" / "f0").write_bytes(b"new")
    m.flush()
    assert s3.get_object(Bucket=bucket, Key="keep")["Body"].read() == b"new"
    assert s3.get_object(Bucket=bucket, Key="t/d0/f0")["Body"].read() == b"new"
    assert sorted(os.listdir(m.path / "t")) == ["d0"]
