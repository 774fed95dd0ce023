"""`multitoken bench serve`: a bounded load generator on loopback against `multitoken serve`,
speculation on (`--speculate`, default auto) and off, side by side in one run.

For each mode a server process is started on a free port (same checkpoint, same options but
--speculate), the same requests are sent to it, and the server is stopped with SIGTERM (its
drain is part of the run). Requests: prompts are token-id slices of the checkpoint's
validation split (held out; else the Python standard library's source, tokenized), lengths
drawn uniformly from --prompt-len MIN,MAX; max_tokens from --max-tokens MIN,MAX; a share
--sampled of them sampled (--temperature, --top-p, each with its own seed), the rest greedy.
Arrivals: closed loop (--clients workers, each sending its next request when the last one is
answered) or Poisson (--rate requests/s, at most --clients in flight). All requests stream.
--requests N sends N per mode; --duration S instead keeps sending new ones for S seconds (a
soak; --skip-off: the speculative mode only). --disconnect-share F: that share of the clients
hang up at random mid-stream (counted apart, not failures). The client side, the token-integrity
check and the memory verdict are described in `bench/serve_load.py`.

Per mode: tokens/s (completion tokens of completed requests / wall time from first send to last
answer), requests/s, TTFT (send -> first text) and inter-token latency (per request: (last
text - first text) / (completion tokens - 1)) at p50 / p99 over requests, failed requests,
disconnects, lost / duplicated tokens, the server's resident memory (start, after warm-up,
peak, end, verdict; sampled every --rss-interval s), rows still held after the load, and the
server's speculative tokens per forward (from its /metrics). Greedy outputs of the two modes
are compared text for text (`greedy_equal`): equal unless batch composition changed
floating-point rounding (docs/serving.md).

Last line: one JSON object
  {"checkpoint", "clients", "requests" (per mode; with --duration: null), "duration_s",
   "arrival", "rate", "prompt_len": [min, max], "max_tokens": [min, max], "sampled_share",
   "disconnect_share", "sampling": {"temperature", "top_p"},
   "runs": [{"speculate", "speculation" (what the server ran), "requests" (sent),
             "completed", "disconnected", "failed", "completion_tokens", "wall_s",
             "tokens_per_s", "requests_per_s", "ttft_s": {"p50", "p99"},
             "itl_s": {"p50", "p99"}, "tokens_per_forward", "prefill_ms_mean",
             "decode_step_ms_mean": the scheduler's mean prefill work per iteration that had
             some, and mean decode step (server /metrics),
             "integrity": {"checked", "lost_tokens", "duplicated_tokens", "text_mismatch"},
             "server_cancelled": sequences the server finished as cancelled,
             "rows_leaked": rows running or waiting 5 s after the load ended,
             "rss_mb": {"start", "warm", "peak", "end", "growth_mb_per_min", "tolerance",
                        "verdict": bounded | growing | n/a, "samples": [[s, MiB], ...]},
             "errors"}],
   "speedup": tokens/s on over off (null with --skip-off),
   "greedy_equal": share of greedy requests with equal text}
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from multitoken import cliargs
from multitoken.bench.common import format_table, print_json
from multitoken.bench.serve_load import (
    WARMUP_SHARE,
    RequestMix,
    Result,
    RssSampler,
    integrity,
    rss_summary,
    run_load,
)
from multitoken.checkpoint import CONFIG, TOKENIZER, find_checkpoint, model_config_from, read_config
from multitoken.errors import ConfigError, MultitokenError
from multitoken.tokenizer import Tokenizer, load_tokenizer


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
    p.add_argument("--duration", type=float, default=0.0,
                   help="seconds of load per mode: new requests keep coming for that long "
                   "(a soak; --requests is then ignored; default 0: send --requests)")
    p.add_argument("--skip-off", action="store_true",
                   help="run the speculative mode only (a soak of the default server)")
    p.add_argument("--disconnect-share", type=float, default=0.0,
                   help="share of requests whose client hangs up at random mid-stream "
                   "(counted apart, not as failures; default 0)")
    p.add_argument("--rss-interval", type=float, default=2.0,
                   help="seconds between samples of the server's resident memory (default 2)")
    p.add_argument("--rss-tolerance", type=float, default=0.10,
                   help="'bounded' when the last RSS sample is at most the level after "
                   "warm-up times 1 + this (default 0.10)")
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


# ---------------------------------------------------------------------------------------------
# One mode: a server process and the load.


def start_server(args: Any, speculate: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "multitoken", "serve", "--checkpoint", args.checkpoint,
           "--port", "0", "--speculate", speculate, "--max-batch", str(args.max_batch),
           "--max-queue", str(max(args.requests, args.clients) * 16 + 64), "--threads", str(args.threads),
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


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _mean_ms(text: str, kind: str) -> float | None:
    n = _metric(text, f'multitoken_step_seconds_count{{kind="{kind}"}}')
    total = _metric(text, f'multitoken_step_seconds_sum{{kind="{kind}"}}')
    return total / n * 1e3 if n else None


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _leaked_rows(url: str, wait: float = 5.0) -> int:
    """Rows running or waiting once the load is over (every client has finished or hung up):
    0 unless a sequence outlived its client. Polled for `wait` seconds, since a hang-up is
    noticed within a step or a disconnect poll."""
    deadline = time.monotonic() + wait
    while True:
        stats = httpx.get(url + "/health", timeout=10).json()
        busy = int(stats.get("running", 0)) + int(stats.get("waiting", 0))
        if busy == 0 or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def run_mode(args: Any, speculate: str, mix: RequestMix,
             tokenizer: Tokenizer) -> tuple[dict[str, Any], list[Result]]:
    proc, url = start_server(args, speculate)
    try:
        desc = httpx.get(url + "/v1/models").json()["data"][0].get("speculation", speculate)
        with RssSampler(proc.pid, args.rss_interval) as rss:
            results, wall = asyncio.run(run_load(url, mix, args))
            leaked = _leaked_rows(url)
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    ok = [r for r in results if r.ok]
    dropped = [r for r in results if r.disconnected]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [r.itl for r in ok if r.itl is not None]
    rows = _metric(metrics, "multitoken_decode_row_steps_total")
    run = {"speculate": speculate, "speculation": desc, "requests": len(results),
           "completed": len(ok), "disconnected": len(dropped),
           "failed": len(results) - len(ok) - len(dropped), "completion_tokens": tokens,
           "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
           "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
           "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
           "itl_s": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
           "tokens_per_forward": (_metric(metrics, "multitoken_decode_tokens_total") / rows
                                  if rows else None),
           # scheduler work per iteration: how long a prefill holds the running rows up
           "prefill_ms_mean": _mean_ms(metrics, "prefill"),
           "decode_step_ms_mean": _mean_ms(metrics, "decode"),
           "integrity": integrity(results, tokenizer.decode, tokenizer.eos_id),
           "server_cancelled": int(_metric(
               metrics, 'multitoken_sequences_finished_total{reason="cancelled"}')),
           "rows_leaked": leaked,
           "rss_mb": rss_summary(rss.samples, args.rss_tolerance),
           "errors": sorted({r.error for r in results if r.error and not r.ok})[:5]}
    return run, results


# ---------------------------------------------------------------------------------------------


def _plot(path: Path, runs: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["speculate"] for r in runs]
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.4))
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
    a = ax[3]
    for j, r in enumerate(runs):
        rss = r["rss_mb"]
        pts = rss["samples"]
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{j}",
                   label=f"{r['speculate']}: {rss['verdict']}")
        if rss["warm"] is not None:  # the bound the verdict allows
            a.axhline(rss["warm"] * (1 + rss["tolerance"]), color=f"C{j}", ls=":", lw=0.8)
    a.set_title("server RSS (MiB)")
    a.set_xlabel("s")
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check(args: Any) -> None:
    if not 0.0 <= args.sampled <= 1.0:
        raise ConfigError(f"--sampled must be in [0, 1], got {args.sampled}")
    if not 0.0 <= args.disconnect_share <= 1.0:
        raise ConfigError(f"--disconnect-share must be in [0, 1], got {args.disconnect_share}")
    if args.arrival == "poisson" and not args.rate > 0:
        raise ConfigError(f"--rate must be > 0, got {args.rate}")
    if not args.duration >= 0:
        raise ConfigError(f"--duration must be >= 0, got {args.duration}")
    if not args.rss_interval > 0 or not args.rss_tolerance >= 0:
        raise ConfigError("--rss-interval must be > 0 and --rss-tolerance >= 0")
    if args.speculate == "off":
        raise ConfigError("--speculate off: the off run is always made; give the mode to "
                          "compare with it (auto, chain-K or tree)")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    ckpt = find_checkpoint(args.checkpoint)
    cfg = model_config_from(read_config(ckpt), ckpt / CONFIG)
    tokenizer = load_tokenizer(ckpt / TOKENIZER)
    mix = RequestMix(args, _corpus(args.checkpoint, tokenizer), cfg.max_seq_len)
    load = (f"for {args.duration:g} s per mode" if args.duration > 0
            else f"{args.requests} requests per mode")
    print(f"{load}, {args.clients} clients, {args.arrival} arrivals"
          + (f" at {args.rate:g}/s" if args.arrival == "poisson" else "")
          + f"; prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, max_tokens "
          f"{args.max_tokens[0]}-{args.max_tokens[1]}; {args.sampled:.0%} sampled "
          f"(T={args.temperature:g}, top-p={args.top_p:g}), the rest greedy; "
          f"{args.disconnect_share:.0%} of clients hang up mid-stream", flush=True)
    runs, outputs = [], []
    for mode in (args.speculate,) if args.skip_off else (args.speculate, "off"):
        run, results = run_mode(args, mode, mix, tokenizer)
        runs.append(run)
        outputs.append(results)
        print(f"  {mode}: done ({run['speculation']}), {run['requests']} requests, "
              f"{run['failed']} failed, {run['disconnected']} disconnected", flush=True)
    equal = greedy = None
    if len(runs) == 2:
        n = min(len(o) for o in outputs)
        greedy = [i for i in range(n) if mix[i].temperature == 0.0
                  and outputs[0][i].ok and outputs[1][i].ok]
        equal = (sum(outputs[0][i].text == outputs[1][i].text for i in greedy) / len(greedy)
                 if greedy else None)
    speedup = None
    if len(runs) == 2 and runs[1]["tokens_per_s"]:
        speedup = runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"]

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
    print()
    print(format_table(
        ["mode", "requests", "completed", "disconnected", "failed", "cancelled (server)",
         "rows leaked", "lost tok", "dup tok", "text mismatch", "RSS start MiB",
         "RSS warm MiB", "RSS peak MiB", "RSS end MiB", "memory"],
        [[r["speculate"], r["requests"], r["completed"], r["disconnected"], r["failed"],
          r["server_cancelled"], r["rows_leaked"], r["integrity"]["lost_tokens"],
          r["integrity"]["duplicated_tokens"], r["integrity"]["text_mismatch"],
          r["rss_mb"]["start"], r["rss_mb"]["warm"], r["rss_mb"]["peak"], r["rss_mb"]["end"],
          r["rss_mb"]["verdict"]] for r in runs]))
    if len(runs) == 2:
        print(f"speedup (tokens/s, {args.speculate} over off): "
              + ("-" if speedup is None else f"{speedup:.2f}x")
              + "; greedy requests with equal text in both modes: "
              + ("-" if equal is None else f"{equal:.0%} of {len(greedy or [])}"))
    print(f"memory: 'bounded' = the last RSS sample <= the highest of the first "
          f"{WARMUP_SHARE:.0%} of samples x {1 + args.rss_tolerance:g}")
    for r in runs:
        if r["errors"]:
            print(f"errors ({r['speculate']}): {'; '.join(r['errors'])}")
    if args.out_png:
        load = f"{args.duration:g} s" if args.duration > 0 else f"{args.requests} requests"
        _plot(Path(args.out_png), runs, f"{ckpt.name}: {args.clients} clients, {load}, "
              f"{args.sampled:.0%} sampled, {args.disconnect_share:.0%} hang up")
        print(f"wrote {args.out_png}")
    sys.stdout.flush()
    print_json({"checkpoint": str(args.checkpoint), "clients": args.clients,
                "requests": None if args.duration > 0 else args.requests,
                "duration_s": args.duration or None, "arrival": args.arrival,
                "rate": args.rate if args.arrival == "poisson" else None,
                "prompt_len": list(args.prompt_len), "max_tokens": list(args.max_tokens),
                "sampled_share": args.sampled, "disconnect_share": args.disconnect_share,
                "sampling": {"temperature": args.temperature, "top_p": args.top_p},
                "runs": runs, "speedup": speedup, "greedy_equal": equal})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
