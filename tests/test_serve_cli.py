"""`multitoken serve` as a process (SIGTERM drains, then exit 0), its `error:` lines, and a
`bench serve` smoke run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from helpers_serve import tiny_checkpoint
from multitoken import cliargs
from multitoken.bench import serve as bench_serve
from multitoken.cli import main
from multitoken.commands import serve as serve_cmd


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_cli") / "ck", max_seq_len=512)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigterm_finishes_requests_in_flight_then_exits_0(ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "multitoken", "serve", "--checkpoint",
                             str(ckpt), "--port", "0", "--drain-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/v1", line).group(1))
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):  # the socket listens once uvicorn's loop runs
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        body = {"prompt": "abc", "max_tokens": 500, "stream": True, "temperature": 0}
        lines: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            it = r.iter_lines()
            lines.append(next(it))
            proc.send_signal(signal.SIGTERM)  # while the request is streaming
            lines += [ln for ln in it if ln]
        data = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        assert lines[-1] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "server stopped" in out and "Traceback" not in err
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, words", [
    (["--speculate", "chain-9"], "this model has 2 draft heads"),
    (["--speculate", "sometimes"], "expected auto, off, tree or chain-K"),
    (["--max-batch", "0"], "expected an integer >= 1"),
    (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
])
def test_serve_errors_are_one_line(ckpt, capsys, args, words):
    assert main(["serve", "--checkpoint", str(ckpt), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_bench_serve_smoke(ckpt, tmp_path):
    png = tmp_path / "serve.png"
    res = subprocess.run([sys.executable, "-m", "multitoken", "bench", "serve", "--checkpoint",
                          str(ckpt), "--clients", "2", "--requests", "4", "--prompt-len",
                          "8,24", "--max-tokens", "8,16", "--out-png", str(png)],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    modes = {r["speculate"]: r for r in last["runs"]}
    assert set(modes) == {"auto", "off"}
    for r in modes.values():
        assert r["requests"] == 4 and r["failed"] == 0 and r["tokens_per_s"] > 0
        assert r["ttft_s"]["p50"] > 0
    assert png.is_file()


@pytest.mark.parametrize("parser", [serve_cmd.build_parser, bench_serve.build_parser])
def test_every_option_has_help(parser):
    p = parser()
    assert isinstance(p, cliargs.ArgumentParser)
    assert all(a.help for a in p._actions)


@pytest.mark.parametrize("args, words", [
    (["--sampled", "2"], "--sampled must be in [0, 1]"),
    (["--prompt-len", "9,3"], "MIN <= MAX"),
    (["--speculate", "off"], "the off run is always made"),
    (["--arrival", "poisson", "--rate", "0"], "--rate must be > 0"),
])
def test_bench_serve_errors_are_one_line(ckpt, capsys, args, words):
    assert main(["bench", "serve", "--checkpoint", str(ckpt), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
