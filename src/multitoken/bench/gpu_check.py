"""scripts/gpu_check.sh's driver: every CUDA check in one time-boxed run (docs/gpu.md).

    python -m multitoken.bench.gpu_check --out DIR [--cpu-smoke] [--budget-s 480] [--only a,b]

Each stage is a subprocess with its own time limit (and never more than what is left of the
budget); a stage that fails, hangs or crashes is recorded and the next one runs. At the end:
DIR/results.json (everything), DIR/results.md (a short table), DIR/log.txt (every stage's
output), and exit status 1 if any stage failed. `--cpu-smoke` runs the same stages on the CPU at
tiny sizes (under a minute), so the plumbing is tested without a GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitoken.bench.common import last_json_line
from multitoken.bench.gpu_probe import run_group

REPO = Path(__file__).resolve().parents[3]

# The realistic shape (issue 20): ~0.94B parameters, V = 32000, 8192 tokens per step.
BIG = {"vocab": 32000, "dim": 2048, "layers": 16, "n_heads": 16}
TINY = {"vocab": 512, "dim": 64, "layers": 5, "n_heads": 4}


@dataclass
class Stage:
    name: str
    limit_s: float  # its own time limit; the budget left may cut it further
    run: Callable[[Ctx, float], dict[str, Any]]
    critical: bool = False  # when it fails, the later stages are skipped


@dataclass
class Ctx:
    out: Path
    work: Path
    smoke: bool
    log: Any
    device: str = "cuda"
    env: dict[str, str] = field(default_factory=dict)

    def call(self, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
             name: str = "") -> subprocess.CompletedProcess[str]:
        """Run cmd (a list; python = this interpreter), log its output, raise on a time-out."""
        full = [sys.executable, *cmd] if cmd[0] in ("-m", "-c") else cmd
        self.log.write(f"\n$ {' '.join(full)}\n")
        self.log.flush()
        try:
            res = run_group(full, timeout, cwd=REPO, env={**self.env, **(env or {})})
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr) + f"\n[timed out after {timeout:.0f} s]\n")
            raise
        self.log.write(res.stdout + res.stderr + f"\n[exit {res.returncode}]\n")
        self.log.flush()
        return res

    def json_of(self, cmd: list[str], timeout: float, **kw: Any) -> dict[str, Any]:
        res = self.call(cmd, timeout, **kw)
        try:
            out = last_json_line(res.stdout)
        except ValueError:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StageError(f"exit {res.returncode}: {tail}") from None
        if res.returncode != 0:
            out.setdefault("ok", False)
            out.setdefault("error", f"exit {res.returncode}: "
                           f"{(res.stderr.strip().splitlines() or [''])[-1][:300]}")
        return out


class StageError(Exception):
    pass


def _text(x: str | bytes | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# ---------------------------------------------------------------------------------------------
# Stages.


def stage_env(ctx: Ctx, timeout: float) -> dict[str, Any]:
    out = ctx.json_of(["-m", "multitoken.bench.gpu_probe", "env"], timeout)
    if not ctx.smoke and not out.get("cuda_available"):
        out.update(ok=False, error="torch sees no CUDA device")
    return out


def stage_pytest(ctx: Ctx, timeout: float) -> dict[str, Any]:
    xml = ctx.work / "pytest.xml"
    cmd = ["-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-p", "no:cacheprovider",
           "-q", "-rs", f"--junitxml={xml}"]
    if ctx.smoke:  # the CPU cases run in the normal suite; here only the plumbing
        cmd += ["-k", "kv_cache_greedy and transformer"]
    res = ctx.call(cmd, timeout, env={"MULTITOKEN_TEST_DEVICES": ctx.device})
    out: dict[str, Any] = {"exit": res.returncode}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        assert suite is not None
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out.update(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                   failed_tests=[c.get("name") for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None],
                   skipped_tests=sorted({(c.find("skipped").get("message") or "")[:120]  # type: ignore[union-attr]
                                         for c in suite.iter("testcase")
                                         if c.find("skipped") is not None}))
    out["ok"] = res.returncode == 0 and out.get("passed", 0) > 0
    return out


def stage_dist(ctx: Ctx, timeout: float) -> dict[str, Any]:
    return ctx.json_of(["-m", "multitoken.bench.gpu_probe", "dist", "--work",
                        str(ctx.work / "dist"), "--device", ctx.device,
                        "--steps", "4" if ctx.smoke else "6", "--timeout", str(timeout)], timeout)


def stage_decode_cost(ctx: Ctx, timeout: float) -> dict[str, Any]:
    s = TINY if ctx.smoke else BIG
    cmd = ["-m", "multitoken.bench.gpu_probe", "decode-cost", "--device", ctx.device,
           "--vocab", str(s["vocab"]), "--dim", str(s["dim"]), "--layers", str(s["layers"]),
           "--n-heads", str(s["n_heads"]), "--n-future", "4"]
    cmd += (["--context", "32", "--reps", "2", "--max-m", "4", "--dtype", "float32",
             "--compile-backend", "eager"] if ctx.smoke else
            ["--context", "512", "--reps", "20", "--dtype", "bfloat16"])
    return ctx.json_of(cmd, timeout)


def _shape_args(ctx: Ctx) -> list[str]:
    s = TINY if ctx.smoke else BIG
    return ["--vocab", str(s["vocab"]), "--dim", str(s["dim"]), "--layers", str(s["layers"]),
            "--n-heads", str(s["n_heads"]), "--device", ctx.device]


def stage_train_memory(ctx: Ctx, timeout: float) -> dict[str, Any]:
    """The benchmark's own measuring workers (one fresh process each): n=1 (ntp) and n=4
    sequential, plus chunked where this torch has F.linear_cross_entropy; bf16 autocast."""
    import torch.nn.functional as F

    s = TINY if ctx.smoke else BIG
    tokens, seq = ("256", "64") if ctx.smoke else ("8192", "4096")
    variants = ["ntp", "sequential"] + (["chunked"] if hasattr(F, "linear_cross_entropy") else [])
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"tokens": int(tokens), "seq_len": int(seq), **s, "dtype": "bfloat16"}
    for v in variants:
        r = ctx.json_of(["-m", "multitoken.bench.train_memory", "--worker", v, *_shape_args(ctx),
                         "--tokens", tokens, "--seq-len", seq, "--n-future", "4",
                         "--threads", "1" if ctx.smoke else "8", "--dtype", "bfloat16"],
                        deadline - time.monotonic())
        out[v] = {k: r.get(k) for k in ("peak_mib", "step_s", "n_future", "trunk_layers",
                                        "grads_finite", "held_after_forward_mib")}
        if not r.get("grads_finite", False):
            out["ok"] = False
    ntp = out["ntp"]["peak_mib"]
    for v in variants[1:]:
        out[v]["x_ntp"] = out[v]["peak_mib"] / ntp if ntp else None
    out.setdefault("ok", True)
    return out


def stage_train_speed(ctx: Ctx, timeout: float) -> dict[str, Any]:
    shape = (["--seq-len", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
              "--threads", "1"] if ctx.smoke else
             ["--seq-len", "4096", "--batch", "2", "--steps", "8", "--warmup", "2"])
    out = ctx.json_of(["-m", "multitoken", "bench", "train-speed", *_shape_args(ctx),
                       "--n-future", "4", "--dtype", "bfloat16", *shape], timeout)
    if "ratio" in out:
        out["time_over_flop_ratio"] = out["ratio"] / out["flop_ratio"]
    out.setdefault("ok", True)
    return out


def stage_demo(ctx: Ctx, timeout: float) -> dict[str, Any]:
    """The demo recipe trained on the device, then `bench decode` in bf16 at batch 1 and 8,
    greedy and T=0.8 / top-p 0.95."""
    deadline = time.monotonic() + timeout
    run = ctx.work / "demo"
    if ctx.smoke:
        from multitoken.bench.gpu_probe import _corpus

        corpus = _corpus(ctx.work / "demo-corpus")
        extra = [f"--data.paths=[{str(corpus)!r}]", "--train.steps=3", "--model.dim=32",
                 "--model.max_seq_len=64", "--train.seq_len=64", "--train.eval_every=3",
                 "--train.ckpt_every=3", "--train.eval_batches=1", "--train.compile=false",
                 "--train.threads=1"]
    else:
        extra = ["--train.dtype=bfloat16"]
    t0 = time.monotonic()
    res = ctx.call(["-m", "multitoken", "train", "--config", "configs/demo.yaml", "--out",
                    str(run), "--no-progress", "--no-sample", f"--train.device={ctx.device}",
                    f"--data.cache_dir={ctx.work / 'cache'}", *extra], deadline - time.monotonic())
    if res.returncode != 0:
        raise StageError(f"demo training failed: {(res.stderr.strip().splitlines() or [''])[-1]}")
    out: dict[str, Any] = {"train_s": round(time.monotonic() - t0, 1)}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    val = [m for m in metrics if m["kind"] == "val"]
    if val:
        out["val_head_acc"] = [round(a, 3) for a in val[-1]["head_acc"]]
    ok = True
    for b in (1, 8):
        size = (["--prompts", "2", "--prompt-len", "16", "--new-tokens", "16", "--reps", "2",
                 "--threads", "1"] if ctx.smoke else
                ["--prompts", "4" if b == 1 else "16", "--prompt-len", "64", "--new-tokens",
                 "128", "--reps", "10"])
        r = ctx.json_of(["-m", "multitoken", "bench", "decode", "--checkpoint", str(run),
                         "--device", ctx.device, "--dtype", "float32" if ctx.smoke else "bfloat16",
                         "--batch-size", str(b), "--sampling", "greedy,0.8:0.95", *size],
                        deadline - time.monotonic())
        # bf16: greedy output token for token may differ at near-ties (tests/test_cuda.py checks
        # exactness up to ties), so "exact" is reported here, not required
        ok &= bool(r.get("runs")) and r.get("ok", True)
        out[f"batch{b}_exact"] = r.get("exact")
        out[f"batch{b}"] = {run_["label"]: {m: {"tokens_per_forward": round(v["tokens_per_forward"], 2),
                                               "speedup": round(v["speedup"], 2),
                                               "exact": v["exact"]}
                                           for m, v in run_["modes"].items() if m != "plain"}
                            for run_ in r.get("runs", [])}
        out[f"batch{b}"]["forward_cost"] = r.get("forward_cost")
    # launch-bound at this size: eager vs CUDA graph vs compiled decode step of the trained model
    steps = ctx.json_of(["-m", "multitoken.bench.gpu_probe", "decode-cost", "--checkpoint",
                         str(run), "--device", ctx.device, "--batches", "1,8",
                         "--compile-batches", "1,8", "--context", "64", "--max-m", "4",
                         "--reps", "2" if ctx.smoke else "20",
                         "--dtype", "float32" if ctx.smoke else "bfloat16",
                         "--compile-backend", "eager" if ctx.smoke else "inductor"],
                        deadline - time.monotonic())
    out["decode_steps"] = steps.get("steps")
    ok &= bool(steps.get("ok"))
    out["ok"] = ok
    return out


# In order of what matters most (the budget cuts the tail): the claim is the decode
# forward cost and the trained model's speedup on the GPU.
STAGES = [
    Stage("env", 90, stage_env, critical=True),
    Stage("pytest", 150, stage_pytest),
    Stage("decode_cost", 120, stage_decode_cost),
    Stage("demo", 180, stage_demo),
    Stage("distributed", 90, stage_dist),
    Stage("train_memory", 90, stage_train_memory),
    Stage("train_speed", 75, stage_train_speed),
]


# ---------------------------------------------------------------------------------------------
# Report.


def summary(name: str, r: dict[str, Any]) -> str:
    """The few figures of a stage for the markdown table."""
    def f(x: Any, nd: int = 2) -> str:
        return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    if "error" in r and r.get("status") != "passed":
        return str(r["error"])[:160].replace("|", "/").replace("\n", " ")
    if name == "env":
        return (f"{r.get('device')}, torch {r.get('torch')} (CUDA {r.get('torch_cuda')}), "
                f"chunked loss {'yes' if r.get('chunked_loss') else 'no'}, "
                f"bf16 matmul {r.get('bf16_matmul_tflops', '-')} TFLOP/s")
    if name == "pytest":
        return (f"{r.get('passed', 0)} passed, {r.get('failures', 0) + r.get('errors', 0)} "
                f"failed, {r.get('skipped', 0)} skipped")
    if name == "distributed":
        parts = [f"{k}: loss diff {v['max_loss_diff']:.1e}"
                 + (f", weights {v['max_weight_diff']:.1e}" if "max_weight_diff" in v else "")
                 for k, v in r.items() if isinstance(v, dict) and "max_loss_diff" in v]
        return f"{r.get('backend')} ws 1; " + "; ".join(parts)
    if name == "decode_cost":
        fc = r.get("forward_cost", {})
        cost = "; ".join(f"b{b}: " + " ".join(f"{m}:{c:.2f}" for m, c in v["ratio"].items())
                         for b, v in fc.items())
        steps = "; ".join(_steps(s) for s in r.get("steps", []))
        return f"T(m)/T(1) {cost}; {steps}"
    if name == "train_memory":
        return "; ".join(f"{v} {f(r[v].get('peak_mib'), 0)} MiB"
                         + (f" ({f(r[v].get('x_ntp'))}x ntp)" if r[v].get("x_ntp") else "")
                         + f", {f(r[v].get('step_s'), 3)} s"
                         for v in ("ntp", "sequential", "chunked") if isinstance(r.get(v), dict))
    if name == "train_speed":
        return (f"n=1 {f(r.get('ntp_step_s'), 3)} s, n=4 {f(r.get('mtp_step_s'), 3)} s: ratio "
                f"{f(r.get('ratio'), 3)} vs FLOP ratio {f(r.get('flop_ratio'), 3)}")
    if name == "demo":
        cells = []
        for b in ("batch1", "batch8"):
            for label, modes in (r.get(b) or {}).items():
                if label == "forward_cost" or not modes:
                    continue
                best = max(modes.items(), key=lambda kv: kv[1]["speedup"])
                cells.append(f"{b} {label}: {best[0]} {best[1]['tokens_per_forward']} tok/fwd "
                             f"{best[1]['speedup']}x")
        cells += [_steps(s) for s in r.get("decode_steps") or []]
        return "; ".join(cells)
    return ""


def _steps(s: dict[str, Any]) -> str:
    """One decode step's three timings, e.g. "b1 step ms eager 1.20 / graph 0.40 / compiled -"."""
    def ms(k: str) -> str:
        return f"{s[k]:.2f}" if isinstance(s.get(k), float) else "-"

    return (f"b{s['batch']} step ms eager {ms('eager_ms')} / graph {ms('graph_ms')} / "
            f"compiled {ms('compiled_ms')}")


def write_report(out: Path, result: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# gpu_check: {'PASSED' if result['ok'] else 'FAILED'}", "",
             f"{result['mode']}, {result.get('device', '?')}, torch {result.get('torch', '?')}, "
             f"set-up {result.get('setup_s', '-')} s, total {result['total_s']:.0f} s", "",
             "| stage | status | s | figures |", "|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | "
                     f"{summary(s['name'], s)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multitoken.bench.gpu_check")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, log.txt")
    p.add_argument("--cpu-smoke", action="store_true", help="the same stages, tiny, on the CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="whole run's limit (default 480 s; 120 s with --cpu-smoke)")
    p.add_argument("--only", default=None, help="comma-separated stages to run")
    p.add_argument("--setup-s", type=float, default=None, help="set-up time, for the report")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    budget = args.budget_s or (120.0 if args.cpu_smoke else 480.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    stages = [s for s in STAGES if args.only is None or s.name in args.only.split(",")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    result: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                              "setup_s": args.setup_s, "budget_s": budget, "stages": []}
    with open(out / "log.txt", "w") as log:
        ctx = Ctx(out, work, args.cpu_smoke, log, "cpu" if args.cpu_smoke else "cuda", env)
        abort = ""
        for st in stages:
            left = budget - (time.monotonic() - t_start)
            rec: dict[str, Any] = {"name": st.name}
            t0 = time.monotonic()
            if abort or left < 5:
                rec.update(status="skipped", ok=False, error=abort or "out of time budget")
            else:
                limit = min(st.limit_s, left)
                print(f"[gpu_check] {st.name} (limit {limit:.0f} s) ...", file=sys.stderr,
                      flush=True)
                try:
                    rec.update(st.run(ctx, limit))
                    rec["status"] = "passed" if rec.get("ok") else "failed"
                except subprocess.TimeoutExpired:
                    rec.update(status="timeout", ok=False, error=f"over {limit:.0f} s")
                except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
                    rec.update(status="failed", ok=False, error=f"{type(e).__name__}: {e}"[:500])
                if st.critical and not rec.get("ok"):
                    abort = f"skipped: stage {st.name} failed"
            rec["seconds"] = time.monotonic() - t0
            result["stages"].append(rec)
            if st.name == "env":
                result.update(device=rec.get("device"), torch=rec.get("torch"))
            print(f"[gpu_check] {st.name}: {rec['status']} ({rec['seconds']:.0f} s) "
                  f"{summary(st.name, rec)}", file=sys.stderr, flush=True)
    result["total_s"] = time.monotonic() - t_start + (args.setup_s or 0.0)
    result["ok"] = all(s.get("ok") for s in result["stages"])
    write_report(out, result)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "results.md").read_text())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
