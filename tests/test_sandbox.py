"""The sandbox against hostile programs: each fails (or is contained) alone and leaves nothing
behind. Network and outside-write tests also run in mode "none" (the Python-level guards)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from multitoken.errors import ConfigError
from multitoken.sandbox import (
    Limits,
    RunResult,
    isolation,
    leftover_processes,
    run_program,
    run_programs,
)

MODE = isolation()
MODES = sorted({MODE, "none"})
STRONG = MODE != "none"


def run(source: str, mode: str | None = None, **limits: float) -> RunResult:
    kw = {"timeout_s": 3.0, **limits}
    return run_program(textwrap.dedent(source), Limits(**kw), mode)  # type: ignore[arg-type]


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def assert_nothing_left(res: RunResult) -> None:
    assert leftover_processes(res.sandbox_id) == []
    if res.uid is not None:
        assert processes_of_uid(res.uid) == []


def test_namespaces_are_used_where_they_work():
    # A silent fall back to mode "none" would weaken every guarantee below.
    assert MODE in ("root", "userns", "none")
    root = os.geteuid() == 0
    cmd = ["unshare", "-n", "-m", "-p", "-f", "true"] if root else \
        ["unshare", "-r", "-n", "-m", "-p", "-f", "true"]
    if shutil.which("unshare") and subprocess.run(cmd, capture_output=True).returncode == 0:
        assert isolation() == ("root" if root else "userns")


def test_completed_program_output_without_token():
    res = run("print('hello')")
    assert res.status == "completed" and res.completed
    assert res.stdout.strip() == "hello"
    assert_nothing_left(res)


@pytest.mark.parametrize("source", ["import sys; sys.exit(0)", "import os; os._exit(0)",
                                    "raise SystemExit", "quit()"])
def test_exit_zero_before_the_end_is_not_completion(source):
    res = run(source + "\nprint('never')")
    assert res.exit_code == 0 and res.status == "early-exit" and not res.completed


def test_exception_is_an_error():
    res = run("assert 1 == 2, 'wrong answer'")
    assert res.status == "error" and res.exit_code == 1
    assert "wrong answer" in res.summary()


def test_infinite_loop_times_out():
    res = run("while True:\n    pass", timeout_s=1.0)
    assert res.status == "timeout" and not res.completed
    assert_nothing_left(res)


def test_sleeping_program_times_out_on_wall_clock():
    res = run("import time\ntime.sleep(1000)", timeout_s=1.0)
    assert res.status == "timeout"
    assert_nothing_left(res)


@pytest.mark.skipif(MODE == "none" and os.geteuid() == 0,
                    reason="no namespaces and running as root: RLIMIT_NPROC is not enforced")
def test_fork_bomb_fails_alone_and_leaves_no_process():
    res = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout_s=2.0)
    assert res.status == "timeout" and not res.completed
    assert_nothing_left(res)
    assert run("print('still fine')").completed


def test_detached_children_are_killed_when_the_program_ends():
    res = run("""
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(1000)
                os._exit(0)
        print('parent done')
    """)
    assert res.completed
    assert_nothing_left(res)


@pytest.mark.parametrize("source", ["x = bytearray(8 << 30)",
                                    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"])
def test_memory_blowup_fails(source):
    res = run(source, memory_bytes=256 << 20)
    assert not res.completed and res.status in ("error", "signal")
    assert res.status == "signal" or "MemoryError" in res.stderr


def test_big_file_fails():
    res = run("""
        with open('big.bin', 'wb') as f:
            for _ in range(64):
                f.write(b'x' * (1 << 20))
    """, file_bytes=1 << 20)
    assert not res.completed
    assert "File too large" in res.stderr or res.status == "signal"


def test_output_flood_is_capped():
    res = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", file_bytes=1 << 20)
    assert not res.completed and len(res.stdout) <= 4096


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_the_work_directory_do_not_happen(mode, tmp_path):
    targets = [tmp_path / "escaped.txt", Path(tempfile.gettempdir()) / f"escaped-{uuid.uuid4()}"]
    res = run(f"""
        import os
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, 'w') as f:
                    f.write('pwned')
                print('wrote', path)
            except OSError as e:
                print('blocked', type(e).__name__)
        with open('inside.txt', 'w') as f:  # the work directory itself is writable
            f.write('ok')
        print(sorted(os.listdir('.')))
    """, mode=mode)
    assert res.completed, res.stderr
    assert "wrote" not in res.stdout and res.stdout.count("blocked") == 2
    assert "['inside.txt', 'program.py']" in res.stdout  # an empty work directory at the start
    assert not any(t.exists() for t in targets)


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        res = run(f"""
            import socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')
                print('connected')
            except OSError as e:
                print('blocked', type(e).__name__)
        """, mode=mode)
        assert res.completed, res.stderr
        assert "blocked" in res.stdout and "connected" not in res.stdout
        with pytest.raises(BlockingIOError):
            server.accept()


def test_killing_the_parent_fails_only_this_sample():
    res = run("""
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(0, signal.SIGKILL)
        print('survived')
    """)
    assert not res.completed
    assert_nothing_left(res)
    assert run("print('next one runs')").completed


@pytest.mark.skipif(not STRONG, reason="without a PID namespace the program can see this process")
def test_program_cannot_signal_the_evaluator():
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        res = run(f"""
            import os, signal
            try:
                os.kill({os.getpid()}, signal.SIGUSR1)
                print('sent')
            except OSError as e:
                print('refused', type(e).__name__)
        """)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert res.completed and "refused" in res.stdout
    assert got == []


def test_segfault_fails():
    res = run("import ctypes\nctypes.string_at(0)")
    assert res.status == "signal" and res.signal == signal.SIGSEGV
    assert res.summary() == "signal SIGSEGV"
    assert_nothing_left(res)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("MULTITOKEN_TEST_SECRET", "hunter2")
    res = run("import os\nprint(sorted(os.environ))")
    assert res.completed and "MULTITOKEN_TEST_SECRET" not in res.stdout


def test_work_directory_is_deleted(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = run("open('scratch.txt', 'w').write('x')\nimport os\nos.mkdir('d')\nos.chmod('d', 0)")
    assert res.completed
    assert list(tmp_path.iterdir()) == []


def test_many_programs_keep_their_order_and_fail_alone():
    sources = ["print(1)", "while True:\n    pass", "import ctypes\nctypes.string_at(0)",
               "print(4)"]
    res = run_programs(sources, Limits(timeout_s=1.0), workers=2)
    assert [r.status for r in res] == ["completed", "timeout", "signal", "completed"]
    assert [r.stdout.strip() for r in (res[0], res[3])] == ["1", "4"]


@pytest.mark.parametrize("bad", [dict(timeout_s=0), dict(timeout_s=-1), dict(memory_bytes=1),
                                 dict(file_bytes=10), dict(processes=0)])
def test_bad_limits_are_config_errors(bad):
    with pytest.raises(ConfigError):
        run_program("pass", Limits(**bad))


def test_bad_workers_and_mode_are_config_errors():
    with pytest.raises(ConfigError, match="workers"):
        run_programs(["pass"], workers=0)
    with pytest.raises(ConfigError, match="mode"):
        run_program("pass", mode="docker")
