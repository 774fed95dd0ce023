"""The in-process parts of scripts/gpu_check.sh, one subcommand each, last line one JSON object.

    python -m multitoken.bench.gpu_probe env
    python -m multitoken.bench.gpu_probe dist --work DIR --device cuda [--steps 6]
    python -m multitoken.bench.gpu_probe decode-cost --device cuda --dim 2048 ...

`env`: what the machine and torch are. `dist`: the same tiny training run single-process, under
torchrun with DDP and with FSDP2 (world size 1: nccl on CUDA, gloo on the CPU), compared step by
step and weight by weight; and bf16 single vs bf16 FSDP2 (MixedPrecisionPolicy) within bf16
tolerance. `decode-cost`: T(m)/T(1) of the speculative forward (all heads) for m = 1..8 on random
weights, and one plain decode step eager against a CUDA-graph replay and torch.compile
(mode="reduce-overhead") of the same step (gpt-fast style: a static full-length cache, the mask
doing the rest), each checked against eager's logits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from multitoken.bench.common import median, print_json

# ---------------------------------------------------------------------------------------------
# env


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "chunked_loss": hasattr(F, "linear_cross_entropy"),
        "multitoken": str(Path(__file__).resolve().parents[1])}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(p.major_minor)
                    if hasattr(p, "major_minor") else [p.major, p.minor],
                    memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()
        info["bf16_matmul_tflops"] = round(20 * 2 * 4096**3 / (time.perf_counter() - t0) / 1e12, 1)
    else:
        info["device"] = "cpu"
    return info


# ---------------------------------------------------------------------------------------------
# dist: torchrun world size 1 against one process


def _corpus(root: Path) -> Path:
    import random

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    words = ["def", "return", "self", "value", "import", "class", "for", "while", "print"]
    for i in range(8):
        lines = [f"def {rng.choice(words)}{j % 7}(x):\n    return x + {rng.randint(0, 9)}\n"
                 for j in range(60)]
        (root / f"f{i}.py").write_text("".join(lines))
    return root


def run_group(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run(cmd, capture_output, text) in a process group of its own; on a time-out
    the whole group is killed (torchrun's workers too, which would keep the GPU busy) and
    TimeoutExpired is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from e
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], nproc: int | None, timeout: float) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    pre = [sys.executable, "-m", "multitoken"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "multitoken"]
    res = run_group(pre + args, timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({res.returncode}): "
                           f"{res.stderr.strip()[-1500:]}")


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def compare_runs(a: Path, b: Path, tol: float, weights: bool = True) -> dict[str, Any]:
    """Largest loss difference over the logged steps (relative to max(1, |loss|)) and, with
    `weights`, the largest absolute difference of the final weights."""
    from safetensors.torch import load_file

    ma = [r for r in _metrics(a) if r["kind"] == "train"]
    mb = [r for r in _metrics(b) if r["kind"] == "train"]
    if [r["step"] for r in ma] != [r["step"] for r in mb] or not ma:
        return {"ok": False, "error": "different logged steps"}
    loss = max(abs(x - y) / max(1.0, abs(x)) for ra, rb in zip(ma, mb)
               for x, y in zip([ra["loss"], *ra["head_loss"]], [rb["loss"], *rb["head_loss"]]))
    out: dict[str, Any] = {"steps": len(ma), "max_loss_diff": loss, "tol": tol}
    ok = loss < tol
    if weights:
        wa = load_file(str(a / "checkpoint" / "model.safetensors"))
        wb = load_file(str(b / "checkpoint" / "model.safetensors"))
        if sorted(wa) != sorted(wb):
            return {**out, "ok": False, "error": "different weight names"}
        w = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
        out["max_weight_diff"] = w
        ok &= w < tol
    return {**out, "ok": ok}


def run_dist(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    corpus = _corpus(work / "corpus")
    common = [f"--data.paths=[{str(corpus)!r}]", f"--data.cache_dir={work / 'cache'}",
              "--data.val_fraction=0.2", "--model.dim=64", "--model.n_layers=4",
              "--model.n_heads=4", "--model.n_kv_heads=2", "--model.n_future=2",
              "--model.max_seq_len=64", f"--train.steps={args.steps}", "--train.batch_size=8",
              "--train.seq_len=64", f"--train.eval_every={args.steps}", "--train.eval_batches=2",
              f"--train.ckpt_every={args.steps}", "--train.log_every=1",
              f"--train.device={args.device}", "--optim.warmup_steps=2",
              "--parallel.timeout_s=60"]
    cuda = args.device.startswith("cuda")
    tol = 1e-4 if cuda else 1e-5  # CUDA's attention backward may accumulate atomically
    result: dict[str, Any] = {"backend": "nccl" if cuda else "gloo", "world_size": 1}
    runs = [("single", None, []), ("ddp", 1, ["--parallel.strategy=ddp"]),
            ("fsdp", 1, ["--parallel.strategy=fsdp"])]
    if cuda:  # bf16: autocast in one process, FSDP2's MixedPrecisionPolicy under torchrun
        runs += [("single_bf16", None, ["--train.dtype=bfloat16"]),
                 ("fsdp_bf16", 1, ["--train.dtype=bfloat16", "--parallel.strategy=fsdp"])]
    seconds = {}
    for name, nproc, extra in runs:
        t0 = time.perf_counter()
        _launch(["train", "--out", str(work / name), "--no-progress", "--no-sample", *common,
                 *extra], nproc, args.timeout)
        seconds[name] = round(time.perf_counter() - t0, 1)
    result["seconds"] = seconds
    result["ddp"] = compare_runs(work / "single", work / "ddp", tol)
    result["fsdp"] = compare_runs(work / "single", work / "fsdp", tol)
    if cuda:  # different roundings of the same bf16 step: the losses only, loosely
        result["fsdp_bf16"] = compare_runs(work / "single_bf16", work / "fsdp_bf16", 5e-2,
                                           weights=False)
    result["ok"] = all(v["ok"] for k, v in result.items() if isinstance(v, dict) and "ok" in v)
    return result


# ---------------------------------------------------------------------------------------------
# decode-cost: T(m)/T(1), and eager vs CUDA graph vs torch.compile for one decode step


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from multitoken.config import ModelConfig
    from multitoken.model import MultiTokenModel

    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                      n_heads=args.n_heads, n_future=args.n_future,
                      max_seq_len=args.context + 64)
    torch.manual_seed(0)
    with torch.device(device):
        model = MultiTokenModel(cfg)
    return model.to(dtype).eval()


def _time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return median(ts)


def decode_step_variants(model: Any, batch: int, context: int, reps: int,
                         compile_backend: str | None) -> dict[str, Any]:
    """One plain decode step (head 1, one token per sequence) three ways over a static cache of
    context + 32 slots: eager, a captured CUDA graph replayed, torch.compile. Each variant's
    logits are compared with eager's (relative L2 error). compile_backend None: no compile."""
    from multitoken.decoding.engine import Engine, prefill
    from multitoken.decoding.generate import decode_one

    device = model.tok_embeddings.weight.device
    eng = Engine(model, 1)
    S = context + 32
    cache = model.new_cache(batch, S)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, context), generator=g).to(device)
    tok = torch.randint(0, model.cfg.vocab_size, (batch,), generator=g).to(device)
    pos = torch.full((batch,), context, device=device)
    out: dict[str, Any] = {"batch": batch, "context": context}
    with torch.inference_mode():
        prefill(eng, cache, prompt)

        def step() -> torch.Tensor:  # kv_len = S: static shapes, the mask hides unwritten slots
            return decode_one(eng, cache, tok, pos, S)

        ref = step().clone()
        out["eager_ms"] = _time(step, device, reps) * 1e3
        if device.type == "cuda":
            try:
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = step()
                graph.replay()
                torch.cuda.synchronize(device)
                out["graph_err"] = _rel(static, ref)
                out["graph_ms"] = _time(graph.replay, device, reps) * 1e3
            except Exception as e:  # noqa: BLE001 - reported, the other variants still run
                out["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        if compile_backend is not None:
            out.update(_compiled_step(step, ref, device, reps, compile_backend))
    times = {k[:-3]: v for k, v in out.items() if k.endswith("_ms")}
    out["fastest"] = min(times, key=times.__getitem__)
    return out


def _compiled_step(step: Callable[[], torch.Tensor], ref: torch.Tensor, device: torch.device,
                   reps: int, backend: str) -> dict[str, Any]:
    """torch.compile(mode="reduce-overhead") of the step (CUDA graphs through inductor), its
    compile time, error against eager, time, and whether inductor skipped the CUDA graph."""
    out: dict[str, Any] = {}
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    try:
        from torch._dynamo.utils import counters

        compiled = torch.compile(step, backend=backend, mode=mode)
        t0 = time.perf_counter()
        res = compiled()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["compiled_err"] = _rel(res, ref)
        out["compiled_ms"] = _time(compiled, device, reps) * 1e3
        out["compiled_mode"] = mode or backend
        out["cudagraph_skips"] = {k: v for k, v in counters["inductor"].items()
                                  if "cudagraph" in k and v} if "inductor" in counters else {}
    except Exception as e:  # noqa: BLE001 - reported; eager and the graph still count
        out["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def run_decode_cost(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.decoding.calibrate import time_forwards

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        from multitoken.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
        model.eval()
    else:
        model = _model(args, device, dtype)
    cfg = model.cfg
    args.context = min(args.context, cfg.max_seq_len - 32)
    n = model.n_future
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {"dtype": args.dtype, "params": params, "vocab": cfg.vocab_size,
                              "dim": cfg.dim, "layers": cfg.n_layers, "n_future": n,
                              "checkpoint": args.checkpoint, "context": args.context,
                              "forward_cost": {}, "steps": []}
    for b in args.batches:
        shapes = [(1, 1)] + [(m, n) for m in range(1, args.max_m + 1)]
        t = time_forwards(model, shapes, batch_size=b, context=args.context, reps=args.reps)
        t1 = t[(1, n)]
        result["forward_cost"][str(b)] = {
            "T1_ms": t1 * 1e3, "plain_T1_ms": t[(1, 1)] * 1e3,
            "ratio": {str(m): t[(m, n)] / t1 for m in range(1, args.max_m + 1)}}
        backend = args.compile_backend if b in args.compile_batches else None
        result["steps"].append(decode_step_variants(model, b, args.context, args.reps, backend))
    bad = [s for s in result["steps"] for k in ("graph_err", "compiled_err")
           if s.get(k, 0.0) > 5e-2]
    result["ok"] = not bad
    return result


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multitoken.bench.gpu_probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    d = sub.add_parser("dist")
    d.add_argument("--work", required=True)
    d.add_argument("--device", default="cuda")
    d.add_argument("--steps", type=int, default=6)
    d.add_argument("--timeout", type=float, default=120.0)
    c = sub.add_parser("decode-cost")
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    c.add_argument("--vocab", type=int, default=32000)
    c.add_argument("--dim", type=int, default=2048)
    c.add_argument("--layers", type=int, default=16)
    c.add_argument("--n-heads", type=int, default=16)
    c.add_argument("--n-future", type=int, default=4)
    c.add_argument("--context", type=int, default=512)
    c.add_argument("--max-m", type=int, default=8)
    c.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    c.add_argument("--reps", type=int, default=20)
    c.add_argument("--compile-backend", default="inductor")
    c.add_argument("--compile-batches", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[1], help="batch sizes whose decode step is also compiled")
    c.add_argument("--checkpoint", default=None, help="a trained model instead of random "
                   "weights of the shape given")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "env":
        res = env_info()
        res["ok"] = True
    elif args.cmd == "dist":
        res = run_dist(args)
    else:
        res = run_decode_cost(args)
    print_json(res)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
