"""scripts/gpu_check.sh: the CPU smoke run end to end (set-up included), and the driver's
failure handling (a failed, a crashed and a timed-out stage are recorded, the rest still run,
exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multitoken.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_VENV=str(tmp_path / "venv"))
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out),
                          "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in result["stages"]]
    assert names == [s.name for s in gpu_check.STAGES]
    assert all(s["status"] == "passed" for s in result["stages"]), result["stages"]
    assert result["ok"] and result["mode"] == "cpu-smoke" and result["setup_s"] is not None
    table = (out / "results.md").read_text()
    assert "PASSED" in table and all(f"| {n} | passed |" in table for n in names)
    assert (out / "log.txt").stat().st_size > 0
    by = {s["name"]: s for s in result["stages"]}
    assert by["pytest"]["passed"] >= 1
    assert by["distributed"]["ddp"]["ok"] and by["distributed"]["fsdp"]["ok"]
    assert set(by["decode_cost"]["forward_cost"]) == {"1", "8"}
    assert by["train_memory"]["sequential"]["peak_mib"] is not None
    assert by["train_speed"]["ratio"] > 0
    assert by["demo"]["batch1"] and by["demo"]["batch8"]
    assert seconds < 120, seconds  # < 60 s on a quiet 2-core machine


def _ok(ctx, timeout):
    return {"ok": True, "figure": 1.0}


def _fails(ctx, timeout):
    return {"ok": False, "error": "a check failed"}


def _crashes(ctx, timeout):
    raise RuntimeError("boom")


def _hangs(ctx, timeout):
    ctx.call([sys.executable, "-c", "import time; time.sleep(30)"], timeout)
    return {"ok": True}


def test_failed_stages_are_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [
        gpu_check.Stage("first", 10, _ok), gpu_check.Stage("fails", 10, _fails),
        gpu_check.Stage("crashes", 10, _crashes), gpu_check.Stage("hangs", 1, _hangs),
        gpu_check.Stage("last", 10, _ok)])
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke"]) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    status = {s["name"]: s["status"] for s in result["stages"]}
    assert status == {"first": "passed", "fails": "failed", "crashes": "failed",
                      "hangs": "timeout", "last": "passed"}
    assert not result["ok"]
    assert "RuntimeError: boom" in (tmp_path / "results.md").read_text()


def test_a_critical_failure_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [
        gpu_check.Stage("env", 10, _fails, critical=True), gpu_check.Stage("next", 10, _ok)])
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke"]) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in result["stages"]] == ["failed", "skipped"]


def test_budget_cuts_the_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", [gpu_check.Stage("hangs", 60, _hangs),
                                              gpu_check.Stage("next", 10, _ok)])
    t0 = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke", "--budget-s", "7"]) == 1
    assert time.monotonic() - t0 < 20
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in result["stages"]] == ["timeout", "skipped"]
