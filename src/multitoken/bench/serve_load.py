"""`bench serve`'s client side: the request mix, the streaming clients (some of which hang up
mid-stream), the token-integrity check, and the server's resident memory over time.

Token integrity. Every request asks for `return_token_ids` (the server's extension): each
stream chunk carries the ids it adds beside its text. For a request that completed, with U =
`usage.completion_tokens` (the scheduler's count) and S = the ids of all chunks in order:

- lost tokens = max(0, U - len(S)), duplicated tokens = max(0, len(S) - U);
- text mismatch: the chunks' text, concatenated, differs from the tokenizer's text of S (the
  end-of-text id left out; the bench sends no stop strings, so nothing is cut).

A token dropped or sent twice anywhere between the scheduler and the client (event queue, SSE
framing, a disconnect race) shows in one of the three. What it cannot see is a wrong token
decided by the model's step itself: that is the exactness tests' job (and `greedy_equal`).

Disconnects. A request drawn for it (`--disconnect-share`) closes its connection once it has
received at least `disconnect_after` tokens (drawn uniformly in 1..max_tokens-1); one that ends
before that is a normal completion. A disconnect is counted apart, never as a failure; the
server should count it as `cancelled` and free its row (`rows_leaked` after the load: 0).

Memory. `RssSampler` reads the server process's resident set (/proc/PID/status, VmRSS) every
`interval` seconds. Verdict (`rss_summary`): the level after warm-up is the highest sample in
the first 20% of the run; the run is "bounded" when its last sample is at most that level
times (1 + tolerance), else "growing"; "n/a" with fewer than 5 samples.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

WARMUP_SHARE = 0.2  # the first 20% of a run's samples are its warm-up


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    disconnect_after: int | None = None  # hang up after this many tokens (None: never)


@dataclass
class Result:
    ok: bool = False  # completed: [DONE] received
    disconnected: bool = False  # the client hung up on purpose
    text: str = ""
    tokens: int = 0  # usage.completion_tokens
    ids: list[int] = field(default_factory=list)  # the chunks' token ids, in order
    ttft: float | None = None
    itl: float | None = None
    error: str = ""
    times: list[float] = field(default_factory=list)


class RequestMix:
    """Request i of the mix (the same for every mode): drawn from one seeded stream in order,
    so the first N are the same whether a run sends N or keeps going for a duration."""

    def __init__(self, args: Any, tokens: np.ndarray, context: int) -> None:
        self.args, self.tokens, self.context = args, tokens, context
        self.rng = random.Random(args.seed)
        # its own stream: the disconnect share does not change the prompts drawn
        self.drop_rng = random.Random(args.seed + 7)
        self.reqs: list[Req] = []

    def __getitem__(self, i: int) -> Req:
        while len(self.reqs) <= i:
            self.reqs.append(self._draw(len(self.reqs)))
        return self.reqs[i]

    def _draw(self, i: int) -> Req:
        a, rng, tokens = self.args, self.rng, self.tokens
        n = min(rng.randint(*a.prompt_len), self.context // 2, len(tokens) - 1)
        start = rng.randrange(0, len(tokens) - n)
        m = min(rng.randint(*a.max_tokens), self.context - n)
        sampled = rng.random() < a.sampled
        drop = self.drop_rng.random() < a.disconnect_share
        after = self.drop_rng.randint(1, m - 1) if drop and m > 1 else None
        return Req([int(t) for t in tokens[start:start + n]], m,
                   a.temperature if sampled else 0.0, a.top_p if sampled else None,
                   a.seed + i if sampled else None, after)


async def one_request(client: httpx.AsyncClient, url: str, r: Req, timeout: float) -> Result:
    body: dict[str, Any] = {"model": "bench", "prompt": r.prompt, "max_tokens": r.max_tokens,
                            "temperature": r.temperature, "stream": True,
                            "stream_options": {"include_usage": True},
                            "return_token_ids": True}
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
                    res.ids += c.get("token_ids", [])
                    if c.get("text"):
                        res.times.append(time.perf_counter() - t0)
                        res.text += c["text"]
                if (r.disconnect_after is not None and len(res.ids) >= r.disconnect_after
                        and not any(c.get("finish_reason") for c in obj.get("choices", []))):
                    # leaving the `async with` closes the connection mid-stream
                    res.disconnected = True
                    return res
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.ok = done
    if res.times:
        res.ttft = res.times[0]
        if res.tokens > 1:
            res.itl = (res.times[-1] - res.times[0]) / (res.tokens - 1)
    return res


async def run_load(url: str, mix: RequestMix, args: Any) -> tuple[list[Result], float]:
    """Closed loop or Poisson arrivals: --requests requests, or (--duration > 0) new requests
    for that many seconds, then the ones in flight finish. Returns the results in request
    order (request i of the mix) and the wall time."""
    results: dict[int, Result] = {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    counter = itertools.count()
    t0 = time.perf_counter()

    def more() -> int | None:
        """The next request's index, or None when the load is over."""
        if args.duration > 0:
            return next(counter) if time.perf_counter() - t0 < args.duration else None
        i = next(counter)
        return i if i < args.requests else None

    async with httpx.AsyncClient(limits=limits) as client:
        if args.arrival == "closed":

            async def worker() -> None:
                while (i := more()) is not None:
                    results[i] = await one_request(client, url, mix[i], args.timeout)

            await asyncio.gather(*(worker() for _ in range(args.clients)))
        else:
            sem = asyncio.Semaphore(args.clients)
            rng = random.Random(args.seed + 1)

            async def send(i: int) -> None:
                async with sem:
                    results[i] = await one_request(client, url, mix[i], args.timeout)

            tasks = []
            while (i := more()) is not None:
                tasks.append(asyncio.create_task(send(i)))
                await asyncio.sleep(rng.expovariate(args.rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return [results[i] for i in sorted(results)], wall


def integrity(results: list[Result], decode: Any, eos: int | None) -> dict[str, int]:
    """The token-integrity check (module docstring) over the completed requests."""
    out = {"checked": 0, "lost_tokens": 0, "duplicated_tokens": 0, "text_mismatch": 0}
    for r in results:
        if not r.ok:
            continue
        out["checked"] += 1
        out["lost_tokens"] += max(0, r.tokens - len(r.ids))
        out["duplicated_tokens"] += max(0, len(r.ids) - r.tokens)
        out["text_mismatch"] += r.text != decode([t for t in r.ids if t != eos])
    return out


def read_rss_mb(pid: int) -> float | None:
    """Resident memory of process pid in MiB (Linux /proc), None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssSampler:
    """A thread that samples a process's RSS every `interval` seconds: samples [(s, MiB)]."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while True:
            mb = read_rss_mb(self.pid)
            if mb is not None:
                self.samples.append((time.perf_counter() - self._t0, mb))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        mb = read_rss_mb(self.pid)  # the level when the load is over
        if mb is not None:
            self.samples.append((time.perf_counter() - self._t0, mb))


def rss_summary(samples: list[tuple[float, float]], tolerance: float) -> dict[str, Any]:
    """start / warm (the level after warm-up) / peak / end MiB, the growth after warm-up
    (MiB per minute, a least-squares line) and the verdict (module docstring)."""
    out: dict[str, Any] = {"start": None, "warm": None, "peak": None, "end": None,
                           "growth_mb_per_min": None, "tolerance": tolerance, "verdict": "n/a",
                           "samples": [[round(t, 2), round(m, 1)] for t, m in samples]}
    if not samples:
        return out
    mb = [m for _, m in samples]
    n_warm = max(1, int(len(samples) * WARMUP_SHARE))
    warm = max(mb[:n_warm])
    out.update(start=mb[0], warm=warm, peak=max(mb), end=mb[-1])
    after = samples[n_warm:]
    if len(after) >= 2 and after[-1][0] > after[0][0]:
        t, m = np.array([s[0] for s in after]), np.array([s[1] for s in after])
        out["growth_mb_per_min"] = float(np.polyfit(t, m, 1)[0] * 60)
    if len(samples) >= 5:
        out["verdict"] = "bounded" if mb[-1] <= warm * (1 + tolerance) else "growing"
    return out
