"""Continuous batching: one thread that owns the model, admits requests into free KV-cache rows
between decode steps and retires each one the moment it is done.

One iteration of the loop:

1. drop cancelled sequences (a client that went away): their rows are free before the step;
2. prefill newcomers, at most `prefill_tokens` prompt tokens per iteration (padded tokens
   counted): short prompts are prefilled together in one forward; a prompt longer than that is
   prefilled in chunks of `prefill_tokens`, one chunk per iteration (it holds the last cache row
   meanwhile), so the running rows never wait for more than one chunk's forward;
3. one decode step (plain, or speculative: chain or tree) for every running row at once; each
   row appends its own number of tokens; rows that hit a stop token, a stop string or their
   `max_tokens` leave now, and the last row moves into the freed one.

Trees. Every speculative step runs one tree for the whole batch: the base tree (the greedy
calibration's) unless every running row has the same sampling setting and that setting has a
calibration of its own (`calibrate --sampling`; `setting_trees`), then that one. Drafts are made
for the tree of the step they are made in; a row whose drafts are for another tree than the next
step's (the mix of settings changed) drafts again from its stored draft-head outputs
(`RowDecoder._redraft`). A request alone thus runs its setting's calibrated tree, as
`multitoken generate` does.

A newcomer is running from the iteration its prefill ends: its first token (picked from the
prefill) is delivered at once, and it joins the next step.

Threads: the asyncio server calls `submit` and `Sequence.cancel`; every event of a sequence
(text, the end) goes to its `sink`, called from the scheduler thread (the API layer hands them
to its event loop). Nothing else touches the model.

Exactness. A request alone in the batch runs exactly `generate()`'s arithmetic (tested, token for
token, plain and speculative); with others, the same decisions on the logits of a bigger batch,
whose matmuls may round differently: greedy output is then near-identical to solo, not
guaranteed identical (measured in the tests and by `bench serve`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from multitoken.decoding.sampling import Sampling
from multitoken.decoding.tree import Tree
from multitoken.model import MultiTokenModel
from multitoken.serve.metrics import Metrics
from multitoken.serve.rows import Group, RowDecoder
from multitoken.serve.text import TextTracker
from multitoken.tokenizer import Tokenizer


class QueueFull(Exception):
    """The waiting queue is at its bound: the API answers 429."""


class Draining(Exception):
    """The server is shutting down and takes no new requests: the API answers 503."""


@dataclass
class Event:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None


_ids = itertools.count()


@dataclass
class Sequence:
    """One sequence to decode (one choice of one request)."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: list[str] = field(default_factory=list)
    sink: Callable[[Event], None] = lambda e: None
    id: int = field(default_factory=lambda: next(_ids))
    # state (scheduler thread)
    tokens: list[int] = field(default_factory=list)
    pos: int = 0  # position of the root (the next token to feed)
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill)
    generator: torch.Generator | None = None
    tracker: TextTracker | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float = 0.0
    finish_reason: str | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Thread-safe: the scheduler frees the row before its next step."""
        self.cancelled = True


class Scheduler:
    """See the module docstring. `tree=None`: plain decoding."""

    def __init__(self, model: MultiTokenModel, tokenizer: Tokenizer, tree: Tree | None,
                 max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 512,
                 metrics: Metrics | None = None, seed: int = 0,
                 setting_trees: dict[str, Tree] | None = None) -> None:
        """setting_trees: per sampling setting (`Sampling.label`), the tree its own calibration
        chose; a step whose rows all share such a setting runs it, any other step `tree`."""
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ValueError("max_batch, prefill_tokens >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        extra = dict(setting_trees or {}) if tree is not None else {}
        self.tree_index = {label: i + 1 for i, label in enumerate(extra)}
        self.decoder = RowDecoder(model, tree, max_batch, tuple(extra.values()))
        self.device = self.decoder.device
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.metrics = metrics or Metrics()
        # unseeded sampled rows share one stream; a seeded row has its own
        self.shared_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row r holds running[r]
        self.partial: Sequence | None = None  # a long prompt in chunked prefill (last row)
        self.admitting: list[Sequence] = []  # out of the queue, not running yet (prefill)
        self.cond = threading.Condition()
        self.draining = False
        self.stopped = False
        self.steps = 0
        self._thread: threading.Thread | None = None

    # -- the API side --------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request (all or none)."""
        with self.cond:
            if self.draining or self.stopped:
                raise Draining("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue + self._free_rows():
                raise QueueFull(f"the server is at capacity ({self.max_batch} running, "
                                f"{len(self.waiting)} waiting, queue limit {self.max_queue}); "
                                "retry later")
            now = time.perf_counter()
            for s in seqs:
                s.t_submit = now
                self.waiting.append(s)
            self.metrics.waiting.set(len(self.waiting))
            self.cond.notify()

    def _free_rows(self) -> int:
        return self.max_batch - len(self.running) - (self.partial is not None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="multitoken-scheduler",
                                        daemon=True)
        self._thread.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests, let the queued and running ones finish (at most `timeout`
        seconds; then they are cancelled), stop the thread. True if nothing was cancelled."""
        with self.cond:
            self.draining = True
            self.cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        clean = True
        while self._thread is not None and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                clean = False
                with self.cond:
                    for s in [*self.waiting, *self.running,
                              *([self.partial] if self.partial else [])]:
                        s.cancel()
                    self.cond.notify()
                deadline = None
            self._thread.join(0.05)
        return clean

    @property
    def busy(self) -> int:
        return len(self.running) + len(self.waiting) + (self.partial is not None)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            with torch.inference_mode():
                while True:
                    try:
                        if not self._iterate():
                            return
                    except Exception as e:  # a bug: fail what is in flight, keep serving
                        self._fail_all(f"{type(e).__name__}: {e}")
        finally:
            self.stopped = True

    def _fail_all(self, message: str) -> None:
        with self.cond:
            # the queue too: a failing forward would likely fail for them as well
            seqs = [*self.waiting, *self.running, *self.admitting,
                    *([self.partial] if self.partial else [])]
            self.waiting.clear()
        self.running.clear()
        self.admitting = []
        self.partial = None
        for s in seqs:
            self.metrics.finished.labels("error").inc()
            s.sink(Event(finish_reason="error", error=message))

    def _iterate(self) -> bool:
        with self.cond:
            while not (self.waiting or self.running or self.partial):
                if self.draining:
                    return False
                self.cond.wait(0.5)
            for s in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(s)
                self._finish(s, "cancelled")
        self._retire([r for r, s in enumerate(self.running) if s.cancelled], "cancelled")
        if self.partial is not None and self.partial.cancelled:
            self._finish(self.partial, "cancelled")
            self.partial = None
        t0 = time.perf_counter()
        prefilled = self._admit()
        if prefilled:
            self.metrics.step_seconds.labels("prefill").observe(time.perf_counter() - t0)
        if self.running:
            t0 = time.perf_counter()
            self._step()
            self.metrics.step_seconds.labels("decode").observe(time.perf_counter() - t0)
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
        return True

    # -- admission and prefill ------------------------------------------------------------------
    def _tree(self, seqs: list[Sequence]) -> int:
        """The tree (index into `decoder.trees`) for a batch of these rows: their setting's own
        when they all share one that has it, else the base (greedy calibration's) tree."""
        labels = {s.sampling.label for s in seqs}
        return self.tree_index.get(labels.pop(), 0) if len(labels) == 1 else 0

    def _groups(self, seqs: list[Sequence]) -> list[Group]:
        """Rows (indices into seqs) that verify and draft together (see rows.py)."""
        greedy: list[int] = []
        shared: dict[Sampling, list[int]] = {}
        own: list[Group] = []
        for i, s in enumerate(seqs):
            if s.sampling.greedy:
                greedy.append(i)
            elif s.generator is not None:
                own.append(Group([i], s.sampling, s.generator))
            else:
                shared.setdefault(s.sampling, []).append(i)
        groups = [Group(greedy, Sampling(), None)] if greedy else []
        groups += [Group(rows, sm, self.shared_gen) for sm, rows in shared.items()]
        return groups + own

    def _prepare(self, s: Sequence) -> None:
        if s.seed is not None and not s.sampling.greedy:
            s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        s.tracker = TextTracker(self.tokenizer, s.stop_strings)

    def _admit(self) -> int:
        """Prefill within this iteration's budget; returns the prompt tokens fed."""
        budget = self.prefill_tokens
        fed = 0
        if self.partial is not None:
            fed += self._chunk(self.partial)
            if self.partial is not None:
                return fed  # its chunks take the whole budget until it is done
            budget -= fed
        batch: list[Sequence] = []
        longest = 0
        with self.cond:
            while self.waiting and len(self.running) + len(batch) < self.max_batch:
                s = self.waiting[0]
                n = len(s.prompt)
                if n > self.prefill_tokens:  # chunked, alone, from a fresh budget
                    if batch or budget < self.prefill_tokens:
                        break
                    self.waiting.popleft()
                    self.partial = s
                    break
                if (len(batch) + 1) * max(longest, n) > budget:
                    break
                batch.append(self.waiting.popleft())
                longest = max(longest, n)
        if self.partial is not None and fed == 0:
            self._prepare(self.partial)
            self.metrics.queue_seconds.observe(time.perf_counter() - self.partial.t_submit)
            return self._chunk(self.partial)
        if batch:
            for s in batch:
                self._prepare(s)
                self.metrics.queue_seconds.observe(time.perf_counter() - s.t_submit)
            self.admitting = batch
            start = len(self.running)
            T = longest
            idx = torch.tensor([s.prompt + [0] * (T - len(s.prompt)) for s in batch],
                               device=self.device)
            last = torch.tensor([len(s.prompt) - 1 for s in batch], device=self.device)
            first = self.decoder.prefill(start, idx, 0, last, self._groups(batch),
                                         self._tree(self.running + batch))
            assert first is not None
            self.running.extend(batch)
            self.admitting = []
            for s, tok in zip(batch, first):
                s.pos = len(s.prompt)
                self._deliver(s, [tok])
            self._retire([start + i for i, s in enumerate(batch) if s.finish_reason], None)
            fed += len(batch) * T
        return fed

    def _chunk(self, s: Sequence) -> int:
        """The next chunk of a long prompt, in the last cache row; when it is the final one,
        the sequence joins the running rows."""
        row = self.max_batch - 1
        a = s.prefilled
        b = min(len(s.prompt), a + self.prefill_tokens)
        idx = torch.tensor([s.prompt[a:b]], device=self.device)
        final = b == len(s.prompt)
        last = torch.tensor([b - a - 1], device=self.device) if final else None
        first = self.decoder.prefill(row, idx, a, last, self._groups([s]),
                                     self._tree([*self.running, s]))
        s.prefilled = b
        if first is not None:
            self.partial = None
            r = len(self.running)
            if r != row:
                self.decoder.move(row, r)
            self.running.append(s)
            s.pos = len(s.prompt)
            self._deliver(s, first)
            if s.finish_reason:
                self._retire([r], None)
        return b - a

    # -- decoding ------------------------------------------------------------------------------
    def _step(self) -> None:
        rows = self.running
        n = len(rows)
        res = self.decoder.step(n, [s.pos for s in rows], self._groups(rows), self._tree(rows))
        self.steps += 1
        m = self.metrics
        m.row_steps.inc(n)
        attempts = [0] * self.decoder.depth
        accepted = [0] * self.decoder.depth
        done = []
        for r, s in enumerate(rows):
            new = res.tokens[r]
            s.pos += len(new)
            m.step_tokens.inc(len(new))
            for i in range(res.tried[r]):
                attempts[i] += 1
                accepted[i] += i < len(new) - 1
            self._deliver(s, new)
            if s.finish_reason:
                done.append(r)
        for d in range(self.decoder.depth):
            if attempts[d]:
                m.draft_attempts.labels(str(d + 1)).inc(attempts[d])
                m.draft_accepted.labels(str(d + 1)).inc(accepted[d])
        self._retire(done, None)

    def _deliver(self, s: Sequence, new: list[int]) -> None:
        """Append what a step produced for s (cut at max_tokens and at a stop token), send the
        text, and mark s finished when it is done."""
        new = new[: s.max_tokens - len(s.tokens)]
        for j, tok in enumerate(new):
            if tok in s.stop_ids:
                new, s.finish_reason = new[: j + 1], "stop"
                break
        s.tokens.extend(new)
        assert s.tracker is not None
        text = s.tracker.add([t for t in new if t not in s.stop_ids])
        if s.tracker.stopped:
            s.finish_reason = "stop"
        elif s.finish_reason is None and len(s.tokens) >= s.max_tokens:
            s.finish_reason = "length"
        now = time.perf_counter()
        m = self.metrics
        if s.t_first is None:
            s.t_first = now
            m.ttft.observe(now - s.t_submit)
        elif new:
            gap = (now - s.t_last) / len(new)
            for _ in new:
                m.itl.observe(gap)
        s.t_last = now
        m.generation_tokens.inc(len(new))
        if s.finish_reason:
            text += s.tracker.flush()
        if text or new or s.finish_reason is None:  # every token goes out (token ids)
            s.sink(Event(text=text, tokens=new))
        if s.finish_reason:
            self._finish(s, s.finish_reason)

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        self.metrics.finished.labels(reason).inc()
        s.sink(Event(finish_reason=reason, completion_tokens=len(s.tokens)))

    def _retire(self, rows: list[int], reason: str | None) -> None:
        """Free rows (a finished or cancelled sequence's): the last running row moves into each
        (descending order, so the last row is always a live one or the row itself)."""
        for r in sorted(set(rows), reverse=True):
            s = self.running[r]
            if reason is not None:
                self._finish(s, reason)
            last = len(self.running) - 1
            if r != last:
                self.decoder.move(last, r)
                self.running[r] = self.running[last]
            self.running.pop()

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "steps": self.steps, "prefilling": self.partial is not None}
