"""The sandbox's launcher process; `multitoken.sandbox` runs it, nothing imports it.

    python -I -S -B sandbox_child.py CONFIG_JSON

Standard library only: importing the multitoken package would import torch into every launch.
The config (see `multitoken.sandbox._launch`) names the mode, the program, the limits and the
paths. Three processes take part:

    launcher (this file, trusted, stays outside the namespaces' processes)
      └─ init (trusted: builds the namespaces' view, drops privileges, applies the limits)
           └─ program (`python -I -B program.py`, untrusted)

- The launcher becomes a child subreaper, so every orphaned descendant is re-parented to it, and
  dies with the thread that started it (PR_SET_PDEATHSIG). It enforces the wall-clock timeout,
  then kills and reaps every descendant that is left before it writes its report and exits.
- Mode "root": the launcher unshares mount, network, IPC and PID namespaces. init is PID 1 of the
  new PID namespace, so when it exits the kernel kills every process left in it. init mounts a
  fresh tmpfs as the new root, bind-mounts the system directories and the interpreter read-only
  and the work directory read-write at /sandbox, chroots there, and switches to an unprivileged
  uid (so RLIMIT_NPROC applies) before it forks the program.
- Mode "userns" (not root): the same inside a new user namespace that maps only the caller's
  uid; the program runs with that uid and no capabilities.
- Mode "none": no namespaces; limits, process group and the reaping above only, and the program
  runs behind `NO_NAMESPACE_GUARDS` (best effort, see below).

Outcome lines travel from init to the launcher over a pipe: "started", then "exit N" or
"signal N", or "setup-error ..." when building the sandbox failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

# statvfs f_flag bits -> the mount flags a bind remount must keep (inside a user namespace the
# kernel refuses to drop flags inherited from a more privileged mount namespace).
_KEEP_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
               (os.ST_RELATIME, MS_RELATIME))

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

SANDBOX_DIR = "/sandbox"  # where the work directory appears inside the new root

# Mode "none" only. These are Python-level patches the program can undo (reload a module, use
# `_io`, `_socket` or ctypes); they stop accidents, not an adversary.
NO_NAMESPACE_GUARDS = r'''
import builtins, io, os, runpy, socket, _socket, sys
_root = os.path.realpath(os.getcwd())
def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.fsdecode(path))
    return p == _root or p.startswith(_root + os.sep)
def _refuse(what):
    raise PermissionError(f"sandbox: {what} is not allowed")
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _refuse("network access")
socket.socket = _socket.socket = _NoSocket
socket.socketpair = socket.create_connection = socket.create_server = (
    lambda *a, **k: _refuse("network access"))
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _refuse(f"writing {file!r} (outside the sandbox directory)")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE and (dir_fd is not None or not _inside(path)):
        _refuse(f"writing {path!r} (outside the sandbox directory)")
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = _guarded_os_open
def _guard_paths(name):
    real = getattr(os, name)
    def guarded(*paths, **kwargs):
        for p in paths[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                _refuse(f"{name} of {p!r} (outside the sandbox directory)")
        return real(*paths, **kwargs)
    setattr(os, name, guarded)
for _name in ("remove", "unlink", "rmdir", "mkdir", "rename", "replace", "symlink", "link",
              "chmod", "truncate"):
    _guard_paths(_name)
del _name
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(src: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_enc(src), _enc(target), _enc(fstype), flags, _enc(data)),
           f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


# ---------------------------------------------------------------------------------------------
# init: builds the sandbox and runs the program.


def _kept_flags(path: str) -> int:
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEEP_FLAGS if f & st)


def _bind(src: str, target: str, flags: int) -> None:
    mount(src, target, None, MS_BIND)
    mount(None, target, None, MS_REMOUNT | MS_BIND | flags | _kept_flags(target))


def build_root(root: str, binds: list[str], workdir: str) -> None:
    """Make `root` a tmpfs holding read-only binds of `binds` (at their own paths) and the work
    directory at SANDBOX_DIR; chroot into it. Mount events stay in this mount namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    done: list[str] = []
    for path in binds:
        if any(path == d or path.startswith(d.rstrip("/") + "/") for d in done):
            continue  # already visible through an enclosing bind
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _bind(path, target, MS_RDONLY | MS_NOSUID | MS_NODEV)
            done.append(path)
        elif os.path.exists(path):  # a device node such as /dev/null: no MS_NODEV
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w"):
                pass
            _bind(path, target, MS_RDONLY | MS_NOSUID)
    target = root + SANDBOX_DIR
    os.makedirs(target)
    _bind(workdir, target, MS_NOSUID | MS_NODEV)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir(SANDBOX_DIR)


def set_limits(limits: dict[str, int]) -> None:
    cpu = limits["cpu_s"]
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),
                            (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
                            (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
                            (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
                            (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
                            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))


def _say(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def init_main(cfg: dict, status_w: int, alive_r: int) -> None:
    """Runs in the launcher's child; never returns."""
    try:
        mode = cfg["mode"]
        os.setpgid(0, 0)
        if mode in ("root", "userns"):
            build_root(cfg["root"], cfg["binds"], cfg["workdir"])
            workdir = SANDBOX_DIR
        else:
            os.chdir(cfg["workdir"])
            workdir = cfg["workdir"]
        if mode == "root":
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        os.umask(0o077)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_DUMPABLE, 0)  # the program (same uid) cannot ptrace init
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)  # the launcher died before PDEATHSIG was armed
        set_limits(cfg["limits"])
        env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
        argv = [cfg["python"], "-I", "-B"]
        argv += ["-c", NO_NAMESPACE_GUARDS] if mode == "none" else []
        argv.append(cfg["program"])
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, then exit
        _say(status_w, f"setup-error {type(e).__name__}: {e}")
        os._exit(127)
    try:
        pid = os.fork()
    except OSError as e:
        _say(status_w, f"setup-error fork: {e}")
        os._exit(127)
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        except BaseException as e:  # noqa: BLE001
            _say(status_w, f"setup-error exec {argv[0]}: {e}")
        os._exit(127)
    _say(status_w, "started")
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if got == pid:
            break
    if os.WIFSIGNALED(status):
        _say(status_w, f"signal {os.WTERMSIG(status)}")
    else:
        _say(status_w, f"exit {os.waitstatus_to_exitcode(status)}")
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# launcher


def enter_namespaces(mode: str) -> None:
    if mode == "root":
        unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID)
    elif mode == "userns":
        uid, gid = os.getuid(), os.getgid()
        unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/self/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(name))
    return out


def kill_and_reap_all() -> None:
    """SIGKILL every child (orphaned descendants are re-parented here) until none is left."""
    while True:
        for pid in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    report: dict = {"setup_error": None, "exit_code": None, "signal": None, "timed_out": False}
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:
        return
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        enter_namespaces(cfg["mode"])
        status_r, status_w = os.pipe()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except OSError as e:
        report["setup_error"] = f"{type(e).__name__}: {e}"
        pid = -1
    if pid == 0:
        os.close(status_r)
        os.close(alive_w)
        init_main(cfg, status_w, alive_r)
    if pid > 0:
        os.close(status_w)
        os.close(alive_r)
        lines: list[str] = []
        # Setup is trusted code; the program's clock starts when init says "started".
        done = _read_lines(status_r, time.monotonic() + 60.0, lines, until="started")
        if not done and lines[-1:] == ["started"]:
            done = _read_lines(status_r, time.monotonic() + cfg["timeout_s"], lines)
            report["timed_out"] = not done
        if not done:
            os.kill(pid, signal.SIGKILL)
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "setup-error":
                report["setup_error"] = value
            elif key == "exit" and not report["timed_out"]:
                report["exit_code"] = int(value)
            elif key == "signal" and not report["timed_out"]:
                report["signal"] = int(value)
    kill_and_reap_all()
    with open(cfg["report"], "w") as f:
        json.dump(report, f)


def _read_lines(fd: int, deadline: float, lines: list[str], until: str | None = None) -> bool:
    """Read init's lines into `lines` until the line `until` (False: keep going), EOF (True)
    or the deadline (False)."""
    while True:
        got = _read_line(fd, deadline)
        if got is None:
            return True
        if got == "":
            return False
        lines.append(got)
        if until is not None and got == until:
            return False


_pending = bytearray()


def _read_line(fd: int, deadline: float) -> str | None:
    """One line from fd; None at EOF; "" when the deadline passed first."""
    while b"\n" not in _pending:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        _pending.extend(chunk)
    line, _, rest = bytes(_pending).partition(b"\n")
    _pending[:] = rest
    return line.decode(errors="replace") or "?"


if __name__ == "__main__":
    main()
