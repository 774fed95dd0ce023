"""`bench serve`'s soak parts: clients that hang up mid-stream, the token-integrity check, the
server's memory over time (tiny model, seconds of load; nothing here depends on timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from helpers_serve import tiny_checkpoint
from multitoken.bench.serve_load import RequestMix, Result, integrity, read_rss_mb, rss_summary
from multitoken.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_bench") / "ck", max_seq_len=512)


def _bench(ckpt, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "multitoken", "bench", "serve", "--checkpoint",
                          str(ckpt), "--prompt-len", "8,24", *args], capture_output=True,
                         text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _clean(run: dict) -> None:
    """No failure, no token lost or sent twice, no row left behind."""
    assert run["failed"] == 0, run["errors"]
    assert run["integrity"] == {"checked": run["completed"], "lost_tokens": 0,
                                "duplicated_tokens": 0, "text_mismatch": 0}
    assert run["rows_leaked"] == 0
    assert run["completed"] + run["disconnected"] == run["requests"]
    # a hang-up the server noticed is a cancelled sequence; one it finished first is not
    assert run["server_cancelled"] <= run["disconnected"]


def test_every_client_hangs_up(ckpt):
    """--disconnect-share 1: each request hangs up after 1..max_tokens-1 tokens (unless the
    model ends it first): counted as disconnects, not failures, and the rows come back."""
    out = _bench(ckpt, "--clients", "3", "--requests", "6", "--max-tokens", "24,40",
                 "--disconnect-share", "1", "--skip-off")
    (run,) = out["runs"]
    _clean(run)
    assert run["disconnected"] >= 1 and out["speedup"] is None
    assert out["disconnect_share"] == 1.0


def test_soak_for_a_duration(ckpt, tmp_path):
    png = tmp_path / "soak.png"
    out = _bench(ckpt, "--clients", "2", "--duration", "2", "--max-tokens", "8,24",
                 "--disconnect-share", "0.3", "--rss-interval", "0.2", "--skip-off",
                 "--out-png", str(png))
    (run,) = out["runs"]
    _clean(run)
    assert out["duration_s"] == 2.0 and out["requests"] is None
    assert run["requests"] >= 2 and run["wall_s"] >= 2.0
    rss = run["rss_mb"]
    assert len(rss["samples"]) >= 2 and rss["peak"] >= rss["end"] > 0
    assert rss["verdict"] in ("bounded", "growing", "n/a")
    assert png.is_file()


def test_integrity_counts():
    ok = Result(ok=True, text="ab", tokens=3, ids=[97, 98, 257])  # 257: eos, no text
    lost = Result(ok=True, text="a", tokens=2, ids=[97])
    dup = Result(ok=True, text="aab", tokens=2, ids=[97, 97, 98])
    gone = Result(disconnected=True, text="a", tokens=0, ids=[97])  # not checked
    dec = lambda ids: bytes(ids).decode()  # noqa: E731
    assert integrity([ok, gone], dec, 257) == {"checked": 1, "lost_tokens": 0,
                                                "duplicated_tokens": 0, "text_mismatch": 0}
    got = integrity([ok, lost, dup, gone], dec, 257)
    assert got == {"checked": 3, "lost_tokens": 1, "duplicated_tokens": 1, "text_mismatch": 0}
    assert integrity([Result(ok=True, text="b", tokens=1, ids=[97])], dec, 257)[
        "text_mismatch"] == 1


def test_rss_verdict():
    flat = [(float(t), 100.0 + (t < 2) * -20 + (t % 3)) for t in range(20)]
    assert rss_summary(flat, 0.1)["verdict"] == "bounded"
    leak = [(float(t), 100.0 + 5 * t) for t in range(20)]
    s = rss_summary(leak, 0.1)
    assert s["verdict"] == "growing" and s["growth_mb_per_min"] == pytest.approx(300.0)
    assert (s["start"], s["warm"], s["peak"], s["end"]) == (100.0, 115.0, 195.0, 195.0)
    assert rss_summary(leak[:3], 0.1)["verdict"] == "n/a"
    assert rss_summary([], 0.1)["start"] is None
    assert read_rss_mb(os.getpid()) > 0


def test_request_mix_is_stable():
    """The disconnect share draws from its own stream: the prompts stay the same; the first N
    requests are the same however many a run sends."""
    args = dict(seed=3, prompt_len=(4, 9), max_tokens=(2, 30), sampled=0.5, temperature=0.8,
                top_p=0.9)
    tokens = np.arange(1000) % 250
    a = RequestMix(SimpleNamespace(**args, disconnect_share=0.0), tokens, 128)
    b = RequestMix(SimpleNamespace(**args, disconnect_share=1.0), tokens, 128)
    assert [b[i].prompt for i in range(20)] == [a[i].prompt for i in range(20)]
    assert all(a[i].disconnect_after is None for i in range(20))
    assert all(1 <= b[i].disconnect_after < b[i].max_tokens for i in range(20))
    c = RequestMix(SimpleNamespace(**args, disconnect_share=0.0), tokens, 128)
    assert c[5] == a[5]


@pytest.mark.parametrize("args, words", [
    (["--disconnect-share", "1.5"], "--disconnect-share must be in [0, 1]"),
    (["--duration", "-1"], "--duration must be >= 0"),
    (["--rss-interval", "0"], "--rss-interval must be > 0"),
])
def test_soak_option_errors(ckpt, capsys, args, words):
    assert main(["bench", "serve", "--checkpoint", str(ckpt), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
