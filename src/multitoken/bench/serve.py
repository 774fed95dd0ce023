"""`multitoken bench serve`: a bounded load generator on loopback against `multitoken serve`,
speculation on (`--speculate`, default auto) and off, side by side in one run.

For each mode a server process is started on a free port (same checkpoint, same options but
--speculate), the same list of requests is sent to it, and the server is stopped with SIGTERM
(its drain is part of the run). Requests: prompts are token-id slices of the checkpoint's
validation split (held out; else the Python standard library's source, tokenized), lengths
drawn uniformly from --prompt-len MIN,MAX; max_tokens from --max-tokens MIN,MAX; a share
--sampled of them sampled (--temperature, --top-p, each with its own seed), the rest greedy.
Arrivals: closed loop (--clients workers, each sending its next request when the last one is
answered) or Poisson (--rate requests/s, at most --clients in flight). All requests stream.

Per mode: tokens/s (completion tokens of all requests / wall time from first send to last
answer), requests/s, TTFT (send -> first text) and inter-token latency (per request: (last
text - first text) / (completion tokens - 1)) at p50 / p99 over requests, failed requests,
and the server's speculative tokens per forward (from its /metrics). Greedy outputs of the two
modes are compared text for text (`greedy_equal`): equal unless batch composition changed
floating-point rounding (docs/serving.md).

Last line: one JSON object
  {"checkpoint", "clients", "requests", "arrival", "rate", "prompt_len": [min, max],
   "max_tokens": [min, max], "sampled_share", "sampling": {"temperature", "top_p"},
   "runs": [{"speculate", "speculation" (what the server ran), "requests", "failed",
             "completion_tokens", "wall_s", "tokens_per_s", "requests_per_s",
             "ttft_s": {"p50", "p99"}, "itl_s": {"p50", "p99"}, "tokens_per_forward",
             "prefill_ms_mean", "decode_step_ms_mean": the scheduler's mean prefill work per
             iteration that had some, and mean decode step (server /metrics), "errors"}],
   "speedup": tokens/s on over off, "greedy_equal": share of greedy requests with equal text}
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from multitoken import cliargs
from multitoken.bench.common import format_table, print_json
from multitoken.checkpoint import CONFIG, TOKENIZER, find_checkpoint, model_config_from, read_config
from multitoken.errors import ConfigError, MultitokenError
from multitoken.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None


@dataclass
class Result:
    ok: bool = False
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    itl: float | None = None
    error: str = ""
    times: list[float] = field(default_factory=list)


def _range(text: str) -> tuple[int, int]:
    """argparse type: N or MIN,MAX (integers >= 1)."""
    vals = cliargs.positive_int_list(text)
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) != 2 or vals[0] > vals[1]:
        import argparse

        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with MIN <= MAX, got {text!r}")
    return vals[0], vals[1]


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint (or run) directory")
    p.add_argument("--clients", type=cliargs.positive_int, default=4,
                   help="concurrent clients (closed loop), or the cap on requests in flight "
                   "(Poisson) (default 4)")
    p.add_argument("--requests", type=cliargs.positive_int, default=32,
                   help="requests per mode (default 32)")
    p.add_argument("--arrival", choices=("closed", "poisson"), default="closed",
                   help="closed loop (default) or Poisson arrivals at --rate")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson: requests per second")
    p.add_argument("--prompt-len", type=_range, default=(32, 256),
                   help="prompt tokens, N or MIN,MAX drawn uniformly (default 32,256)")
    p.add_argument("--max-tokens", type=_range, default=(64, 256),
                   help="max_tokens per request, N or MIN,MAX (default 64,256)")
    p.add_argument("--sampled", type=float, default=0.5,
                   help="share of sampled requests, the rest greedy (default 0.5)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampled requests' (0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="sampled requests' (0.95)")
    p.add_argument("--speculate", default="auto",
                   help="the speculative mode compared with off (default auto)")
    p.add_argument("--max-batch", type=cliargs.positive_int, default=16,
                   help="the servers' --max-batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take before it counts as failed (default 600)")
    p.add_argument("--out-png", default=None, help="plot path (default: none)")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    return p


# ---------------------------------------------------------------------------------------------
# The request mix.


def _corpus(checkpoint: str, tokenizer: Tokenizer) -> np.ndarray:
    """Held-out tokens of the checkpoint's run; else the standard library's source."""
    try:
        from multitoken.decoding.calibrate import validation_tokens

        tokens = np.asarray(validation_tokens(checkpoint, tokenizer))
        if len(tokens) > 1024:
            return tokens
    except (MultitokenError, OSError, KeyError, TypeError, ValueError):
        pass
    src = Path(os.__file__).parent
    text = "".join((src / f).read_text(errors="replace") for f in ("os.py", "json/decoder.py",
                                                                    "textwrap.py"))
    return np.asarray(tokenizer.encode(text))


def make_requests(args: Any, tokens: np.ndarray, context: int) -> list[Req]:
    rng = random.Random(args.seed)
    reqs = []
    for i in range(args.requests):
        n = min(rng.randint(*args.prompt_len), context // 2, len(tokens) - 1)
        start = rng.randrange(0, len(tokens) - n)
        m = min(rng.randint(*args.max_tokens), context - n)
        sampled = rng.random() < args.sampled
        reqs.append(Req([int(t) for t in tokens[start:start + n]], m,
                        args.temperature if sampled else 0.0,
                        args.top_p if sampled else None, args.seed + i if sampled else None))
    return reqs


# ---------------------------------------------------------------------------------------------
# One mode: a server process and the load.


def start_server(args: Any, speculate: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "multitoken", "serve", "--checkpoint", args.checkpoint,
           "--port", "0", "--speculate", speculate, "--max-batch", str(args.max_batch),
           "--max-queue", str(args.requests * 16 + 64), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--model-name", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"http://[^\s]+:(\d+)/v1", line)
    if not found:
        err = proc.communicate(timeout=30)[1]
        raise MultitokenError(f"the server did not start: {(err or line).strip()[-500:]}")
    url = f"http://127.0.0.1:{found.group(1)}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise MultitokenError("the server did not answer /health within 60 s")


async def one_request(client: httpx.AsyncClient, url: str, r: Req, timeout: float) -> Result:
    body: dict[str, Any] = {"model": "bench", "prompt": r.prompt, "max_tokens": r.max_tokens,
                            "temperature": r.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if r.top_p is not None:
        body["top_p"] = r.top_p
    if r.seed is not None:
        body["seed"] = r.seed
    res = Result()
    t0 = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body,
                                 timeout=timeout) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    return res
                if obj.get("usage"):
                    res.tokens = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    if c.get("text"):
                        res.times.append(time.perf_counter() - t0)
                        res.text += c["text"]
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.ok = done
    if res.times:
        res.ttft = res.times[0]
        if res.tokens > 1:
            res.itl = (res.times[-1] - res.times[0]) / (res.tokens - 1)
    return res


async def run_load(url: str, reqs: list[Req], args: Any) -> tuple[list[Result], float]:
    results: list[Result] = [Result() for _ in reqs]
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        if args.arrival == "closed":
            queue = list(range(len(reqs)))[::-1]

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    results[i] = await one_request(client, url, reqs[i], args.timeout)

            await asyncio.gather(*(worker() for _ in range(args.clients)))
        else:
            sem = asyncio.Semaphore(args.clients)
            rng = random.Random(args.seed + 1)

            async def send(i: int) -> None:
                async with sem:
                    results[i] = await one_request(client, url, reqs[i], args.timeout)

            tasks = []
            for i in range(len(reqs)):
                tasks.append(asyncio.create_task(send(i)))
                await asyncio.sleep(rng.expovariate(args.rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return results, wall


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _mean_ms(text: str, kind: str) -> float | None:
    n = _metric(text, f'multitoken_step_seconds_count{{kind="{kind}"}}')
    total = _metric(text, f'multitoken_step_seconds_sum{{kind="{kind}"}}')
    return total / n * 1e3 if n else None


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run_mode(args: Any, speculate: str, reqs: list[Req]) -> tuple[dict[str, Any], list[Result]]:
    proc, url = start_server(args, speculate)
    try:
        desc = httpx.get(url + "/v1/models").json()["data"][0].get("speculation", speculate)
        results, wall = asyncio.run(run_load(url, reqs, args))
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [r.itl for r in ok if r.itl is not None]
    rows = _metric(metrics, "multitoken_decode_row_steps_total")
    run = {"speculate": speculate, "speculation": desc, "requests": len(reqs),
           "failed": len(reqs) - len(ok), "completion_tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall if wall > 0 else 0.0,
           "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
           "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
           "itl_s": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
           "tokens_per_forward": (_metric(metrics, "multitoken_decode_tokens_total") / rows
                                  if rows else None),
           # scheduler work per iteration: how long a prefill holds the running rows up
           "prefill_ms_mean": _mean_ms(metrics, "prefill"),
           "decode_step_ms_mean": _mean_ms(metrics, "decode"),
           "errors": sorted({r.error for r in results if not r.ok})[:5]}
    return run, results


# ---------------------------------------------------------------------------------------------


def _plot(path: Path, runs: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["speculate"] for r in runs]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.4))
    ax[0].bar(labels, [r["tokens_per_s"] for r in runs], color=["C0", "C1"][: len(runs)])
    ax[0].set_title("throughput (tokens/s)")
    for k, (key, name) in enumerate((("ttft_s", "TTFT (ms)"), ("itl_s", "inter-token (ms)"))):
        a = ax[k + 1]
        for j, q in enumerate(("p50", "p99")):
            vals = [(r[key][q] or 0.0) * 1e3 for r in runs]
            a.bar([x + 0.4 * j for x in range(len(runs))], vals, width=0.4, label=q)
        a.set_xticks([x + 0.2 for x in range(len(runs))], labels)
        a.set_title(name)
        a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.sampled <= 1.0:
        raise ConfigError(f"--sampled must be in [0, 1], got {args.sampled}")
    if args.arrival == "poisson" and not args.rate > 0:
        raise ConfigError(f"--rate must be > 0, got {args.rate}")
    if args.speculate == "off":
        raise ConfigError("--speculate off: the off run is always made; give the mode to "
                          "compare with it (auto, chain-K or tree)")
    ckpt = find_checkpoint(args.checkpoint)
    cfg = model_config_from(read_config(ckpt), ckpt / CONFIG)
    tokenizer = load_tokenizer(ckpt / TOKENIZER)
    reqs = make_requests(args, _corpus(args.checkpoint, tokenizer), cfg.max_seq_len)
    print(f"{len(reqs)} requests per mode, {args.clients} clients, {args.arrival} arrivals"
          + (f" at {args.rate:g}/s" if args.arrival == "poisson" else "")
          + f"; prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, max_tokens "
          f"{args.max_tokens[0]}-{args.max_tokens[1]}; {args.sampled:.0%} sampled "
          f"(T={args.temperature:g}, top-p={args.top_p:g}), the rest greedy", flush=True)
    runs, outputs = [], []
    for mode in (args.speculate, "off"):
        run, results = run_mode(args, mode, reqs)
        runs.append(run)
        outputs.append(results)
        print(f"  {mode}: done ({run['speculation']}), {run['failed']} failed", flush=True)
    greedy = [i for i, r in enumerate(reqs) if r.temperature == 0.0
              and outputs[0][i].ok and outputs[1][i].ok]
    equal = (sum(outputs[0][i].text == outputs[1][i].text for i in greedy) / len(greedy)
             if greedy else None)
    on, off = runs
    speedup = on["tokens_per_s"] / off["tokens_per_s"] if off["tokens_per_s"] else None

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1e3

    print()
    print(format_table(
        ["mode", "speculation", "failed", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
         "ITL p50 ms", "ITL p99 ms", "tok/fwd", "prefill ms", "step ms"],
        [[r["speculate"], r["speculation"], r["failed"], r["tokens_per_s"],
          r["requests_per_s"], ms(r["ttft_s"]["p50"]), ms(r["ttft_s"]["p99"]),
          ms(r["itl_s"]["p50"]), ms(r["itl_s"]["p99"]), r["tokens_per_forward"],
          r["prefill_ms_mean"], r["decode_step_ms_mean"]] for r in runs]))
    print(f"speedup (tokens/s, {args.speculate} over off): "
          + ("-" if speedup is None else f"{speedup:.2f}x")
          + "; greedy requests with equal text in both modes: "
          + ("-" if equal is None else f"{equal:.0%} of {len(greedy)}"))
    for r in runs:
        if r["errors"]:
            print(f"errors ({r['speculate']}): {'; '.join(r['errors'])}")
    if args.out_png:
        _plot(Path(args.out_png), runs, f"{ckpt.name}: {args.clients} clients, "
              f"{args.requests} requests, {args.sampled:.0%} sampled")
        print(f"wrote {args.out_png}")
    sys.stdout.flush()
    print_json({"checkpoint": str(args.checkpoint), "clients": args.clients,
                "requests": args.requests, "arrival": args.arrival,
                "rate": args.rate if args.arrival == "poisson" else None,
                "prompt_len": list(args.prompt_len), "max_tokens": list(args.max_tokens),
                "sampled_share": args.sampled,
                "sampling": {"temperature": args.temperature, "top_p": args.top_p},
                "runs": runs, "speedup": speedup, "greedy_equal": equal})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
