"""Run untrusted Python programs (model-written code) in a throw-away sandbox.

    run_program(source, Limits(timeout_s=10)) -> RunResult
    run_programs([source, ...], limits, workers=2) -> [RunResult, ...]

Each program runs in its own process tree, started by a trusted launcher
(`multitoken/sandbox_child.py`, which documents the process layout), on this same interpreter
(`python -I -B`, isolated mode: no PYTHON* variables, no user site-packages, no script
directory on sys.path), in a fresh empty working directory that is deleted afterwards, with an
environment of a few fixed variables. A program has *completed* only if it exits with status 0
after printing a random per-run token that `run_program` appends to its source; exiting early
(`sys.exit(0)`, `os._exit(0)`), a crash or a signal is not completion. A program that knows
the token (it is in its own source) can forge it: the token catches accidents, not adversaries.

What is enforced, by mode (`isolation()` picks the strongest that works here, once per process):

"root" (running as root with namespace support) - enforced by the kernel:
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written (RLIMIT_FSIZE,
  including the captured stdout/stderr), open files (RLIMIT_NOFILE), no core files;
- wall-clock timeout, then every process of the sample is killed: the program runs under an
  init process that is PID 1 of a new PID namespace, and when init dies the kernel kills all
  that is left, including processes that called setsid(); the launcher also reaps every
  orphan (child subreaper);
- process count (RLIMIT_NPROC): the program runs as an unprivileged uid (RLIMIT_NPROC does not
  apply to root), one per concurrently running sample, so a fork bomb exhausts only its own
  quota; the uid owns no files outside the work directory;
- no network: a new network namespace with no interface up (not even loopback reaches the
  host's), and a new IPC namespace;
- nothing written outside the work directory: the program sees a chroot made of a read-only
  tmpfs, read-only bind mounts of the system directories (/usr, /etc, /lib...), the interpreter
  and its environment, four device nodes (null, zero, random, urandom), and the work directory
  (read-write) at /sandbox; no /proc, /sys, /tmp or home directories. PR_SET_NO_NEW_PRIVS is
  set. Reading is allowed wherever the bind mounts and the uid's permissions allow it.
"userns" (not root, unprivileged user namespaces available): the same, inside a user namespace
  that maps only the caller's uid. The program keeps the caller's uid (with no capabilities),
  and RLIMIT_NPROC counts processes per user namespace, so the quota is still per sample.
"none" (no namespaces): only the rlimits, the timeout and the killing/reaping of the process
  tree are enforced by the kernel (RLIMIT_NPROC only when not root). Network access and writes
  outside the work directory are blocked by Python-level guards installed before the program
  runs (sandbox_child.NO_NAMESPACE_GUARDS); a program can undo them (ctypes, `_io`, `_socket`).
  Treat this mode as a harness for trusted code.

Not covered in any mode: CPU or memory used by the kernel on the program's behalf, timing side
channels, kernel exploits. Run code you do not trust on a machine you can afford to lose.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import ConfigError

MODES = ("root", "userns", "none")
CHILD = Path(__file__).with_name("sandbox_child.py")
MARKER = "MULTITOKEN_SANDBOX_ID"  # in every sandboxed process's environment
PROGRAM = "program.py"
TAIL_BYTES = 4096
MAX_WORKERS = 32

# Read-only inside the chroot (those that exist); symlinks such as /lib -> usr/lib are copied.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
                "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


@dataclass(frozen=True)
class Limits:
    """Per-program limits. cpu_s defaults to the timeout rounded up, plus one second."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 16
    open_files: int = 128

    def validate(self) -> None:
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"timeout must be in (0, 3600] seconds, got {self.timeout_s}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ConfigError(f"cpu_s must be >= 1, got {self.cpu_s}")
        if self.memory_bytes < 64 << 20:
            raise ConfigError(f"memory limit must be >= 64 MiB, got {self.memory_bytes} bytes")
        if self.file_bytes < 1 << 16:
            raise ConfigError(f"file size limit must be >= 64 KiB, got {self.file_bytes} bytes")
        if self.processes < 1 or self.open_files < 16:
            raise ConfigError("processes must be >= 1 and open_files >= 16")

    def as_child_dict(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1
        return {"cpu_s": cpu, "memory_bytes": self.memory_bytes, "file_bytes": self.file_bytes,
                "processes": self.processes, "open_files": self.open_files}


@dataclass
class RunResult:
    """status: "completed" (exit 0 after the token), "early-exit" (exit 0 without it),
    "error" (non-zero exit: an exception, a failed assert), "signal" (killed by a signal:
    segfault, CPU limit...), "timeout", or "sandbox-error" (the sandbox itself failed)."""

    status: str
    exit_code: int | None
    signal: int | None
    stdout: str  # the last TAIL_BYTES of each stream
    stderr: str
    mode: str
    sandbox_id: str
    uid: int | None
    detail: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def summary(self) -> str:
        """One short line: the status and, for errors, the last line of stderr."""
        if self.status == "signal" and self.signal is not None:
            try:
                return f"signal {signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        if self.status in ("error", "sandbox-error"):
            last = (self.detail or self.stderr).strip().splitlines()
            return f"{self.status}: {last[-1][:200]}" if last else self.status
        return self.status


# ---------------------------------------------------------------------------------------------
# Unprivileged uids for mode "root": one per concurrently running program.


class _UidPool:
    """Blocks of 64 uids from the upper half of the uid range this process can map, chosen by
    pid so that concurrent evaluators rarely share one, skipping blocks with a passwd entry."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._free: deque[int] | None = None

    @staticmethod
    def _base() -> int:
        lo, count = 0, 1 << 16
        try:
            ranges = [tuple(map(int, line.split()))
                      for line in Path("/proc/self/uid_map").read_text().splitlines()]
            lo, _, count = max(ranges, key=lambda r: r[2])
        except (OSError, ValueError):
            pass
        blocks = max(1, (count // 2) // 64 - 1)
        for i in range(16):
            base = lo + count // 2 + ((os.getpid() + i) % blocks) * 64
            if not any(_has_passwd(u) for u in range(base, base + 64)):
                return base
        return base

    def acquire(self) -> int:
        """A uid no other program of this process is using (waits while all are taken)."""
        with self._cond:
            if self._free is None:
                base = self._base()
                self._free = deque(range(base, base + MAX_WORKERS))
            self._cond.wait_for(lambda: bool(self._free))
            return self._free.popleft()

    def release(self, uid: int) -> None:
        with self._cond:
            assert self._free is not None
            self._free.append(uid)
            self._cond.notify()


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


_UIDS = _UidPool()


# ---------------------------------------------------------------------------------------------
# Running one program.


def _bind_paths() -> list[str]:
    paths = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        paths.append(os.path.realpath(p))
    # Directories first in path order, so an enclosing bind is made before what it contains.
    return sorted(dict.fromkeys(paths))


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _make_deletable(path: str) -> None:
    """Give the owner rwx on every directory below path (a program may chmod its own)."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, stat.S_IRWXU)


def _remove_tree(path: str) -> None:
    try:
        os.chmod(path, stat.S_IRWXU)
    except OSError:
        return
    _make_deletable(path)
    shutil.rmtree(path, ignore_errors=True)


def leftover_processes(sandbox_id: str) -> list[int]:
    """Pids of live processes whose environment carries this sandbox id (for the backstop kill
    and for tests). Processes this user may not inspect are not seen."""
    needle = f"{MARKER}={sandbox_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(name))
    return found


def _kill_leftovers(sandbox_id: str) -> None:
    for _ in range(1000):
        pids = leftover_processes(sandbox_id)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def run_program(source: str, limits: Limits | None = None, mode: str | None = None) -> RunResult:
    """Run `source` as a Python program in the sandbox; see the module docstring."""
    limits = limits or Limits()
    limits.validate()
    mode = mode or isolation()
    if mode not in MODES:
        raise ConfigError(f"unknown sandbox mode {mode!r}; choose one of {', '.join(MODES)}")
    token = secrets.token_hex(16)
    sandbox_id = secrets.token_hex(8)
    trailer = f"\n\nimport os as _sandbox_os\n_sandbox_os.write(1, b'\\n{token}\\n')\n"
    uid = _UIDS.acquire() if mode == "root" else None
    tmp = tempfile.mkdtemp(prefix="multitoken-sandbox-")
    try:
        work, root = os.path.join(tmp, "work"), os.path.join(tmp, "root")
        os.mkdir(work, 0o700)
        os.mkdir(root, 0o700)
        Path(work, PROGRAM).write_text(source + trailer, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, PROGRAM), uid, uid)
        report = os.path.join(tmp, "report.json")
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        cfg = {"mode": mode, "python": sys.executable, "program": PROGRAM, "workdir": work,
               "root": root, "binds": _bind_paths(), "uid": uid, "parent_pid": os.getpid(),
               "timeout_s": limits.timeout_s, "limits": limits.as_child_dict(), "report": report,
               "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                       "PYTHONIOENCODING": "utf-8", MARKER: sandbox_id}}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(CHILD), json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=tmp,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            try:
                # The launcher enforces the timeout itself; this is the backstop.
                proc.wait(timeout=limits.timeout_s + 60.0)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _kill_leftovers(sandbox_id)
        stdout, stderr = _tail(out_path), _tail(err_path)
        try:
            rep = json.loads(Path(report).read_text())
        except (OSError, ValueError):
            rep = {"setup_error": f"the launcher exited with {proc.returncode} without a report: "
                                  f"{stderr.strip()[-300:]}"}
        return _classify(rep, stdout, stderr, token, mode, sandbox_id, uid)
    finally:
        _remove_tree(tmp)
        if uid is not None:
            _UIDS.release(uid)


def _classify(rep: dict, stdout: str, stderr: str, token: str, mode: str, sandbox_id: str,
              uid: int | None) -> RunResult:
    code, sig = rep.get("exit_code"), rep.get("signal")
    detail = ""
    if rep.get("setup_error"):
        status, detail = "sandbox-error", str(rep["setup_error"])
    elif rep.get("timed_out"):
        status = "timeout"
    elif sig is not None:
        status = "signal"
    elif code == 0:
        status = "completed" if token in stdout.splitlines() else "early-exit"
    else:
        status = "error"
        if code is None:
            detail = "the program's supervisor was killed before it reported an outcome"
    if token in stdout:
        stdout = stdout.replace(f"\n{token}\n", "").replace(token, "")
    return RunResult(status, code, sig, stdout, stderr, mode, sandbox_id, uid, detail)


def run_programs(sources: Sequence[str], limits: Limits | None = None, workers: int = 2,
                 mode: str | None = None,
                 on_done: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """Run many programs, `workers` at a time; results in input order. on_done(i, result) is
    called (from a worker thread) as each finishes."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
    limits = limits or Limits()
    limits.validate()
    mode = mode or isolation()

    def one(i: int) -> RunResult:
        res = run_program(sources[i], limits, mode)
        if on_done is not None:
            on_done(i, res)
        return res

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, range(len(sources))))


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """The strongest mode that runs a trivial program here: "root", "userns" or "none"."""
    first = "root" if os.geteuid() == 0 else "userns"
    probe = Limits(timeout_s=30.0)
    for mode in (first, "none"):
        if run_program("pass", probe, mode).completed:
            return mode
    return "none"


def describe(mode: str) -> str:
    """One line: what the mode enforces (details in this module's docstring)."""
    return {
        "root": "kernel-enforced: PID/network/mount/IPC namespaces, read-only chroot, "
                "unprivileged uid, rlimits (CPU, memory, file size, processes), timeout",
        "userns": "kernel-enforced: user/PID/network/mount/IPC namespaces, read-only chroot, "
                  "rlimits (CPU, memory, file size, processes), timeout",
        "none": "WEAK: rlimits and timeout only; network and outside writes blocked by "
                "Python-level guards a program can undo",
    }[mode]
