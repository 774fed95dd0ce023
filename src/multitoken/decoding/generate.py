"""The decoding driver: plain (one token per forward) and self-speculative (chain, tree), batched.

    generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             speculative="off" | "chain" | "tree" | "dynamic", num_drafts=None, stop=None,
             tree=None, dynamic="2x2", generator=None, stream=None,
             on_step=None) -> GenerationResult

Batches: prompts of different lengths are right-padded into one prefill; every sequence then
keeps its own position (cache slot == position), so with speculation each sequence accepts its
own number of drafts per step. Finished sequences leave the batch (their cache rows are dropped),
so the others stop paying for them.

Conventions:
- A stop token ends its sequence and IS included in `tokens` (so a stop can be told apart from
  running out of `max_new_tokens`; `finish_reasons` says which).
- Sampling: see `sampling.py` (temperature 0 = greedy; speculative sampling is exact for the
  processed distribution).
- speculative="chain" with k drafts is the tree `Tree.chain(k)`: one speculation path serves
  both (see `speculate.py`).
- speculative="dynamic" (token-conditioned heads only): a tree re-shaped per step and per row
  by cumulative draft probability, EAGLE-2 style (`dynamic.py`); dynamic="TOP_KxBEAM" its
  shape, num_drafts its depth.
- A model with n_future=1 has no draft heads: asking it to speculate is an error (not a silent
  fallback), so a benchmark can never report a "speculative" number that was plain decoding.
- Stats: `forwards` counts decode model calls (the prefill is counted separately);
  `tokens_per_forward` = tokens appended per decode call per sequence, bonus token included
  (plain decoding: 1.0); `acceptance[i]` = how often draft i+1 was accepted when drafts 1..i
  were (chain), or how often depth i+1 of the tree was reached when depth i was and had children,
  for the drafts that were verified at least once (so it can be shorter than num_drafts, and is
  empty when no decode call ran). `max_new_tokens=0` runs nothing: no prefill, empty stats.
- Context: a prompt of L tokens with max_new_tokens N needs L + N <= max_seq_len.
- Weights: every call decodes with the model's weights as they are at the call (it builds its
  own `Engine`), however they were changed before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from multitoken.decoding.conditioned import ConditionedDecoder
from multitoken.decoding.dynamic import DynamicDecoder, DynamicShape
from multitoken.decoding.engine import Engine, prefill
from multitoken.decoding.sampling import Sampling, pick
from multitoken.decoding.speculate import SpeculativeDecoder, StepOut
from multitoken.decoding.tree import Tree, default_tree
from multitoken.errors import MultitokenError
from multitoken.model import KVCache, MultiTokenModel, causal_context

SPECULATIVE_MODES = ("off", "chain", "tree", "dynamic")


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass
class GenerationStats:
    mode: str = "off"
    num_drafts: int = 0  # drafts per step (chain) or tree depth
    tree_size: int = 0  # tree nodes besides the root (tree mode)
    batch_size: int = 1
    forwards: int = 0  # decode model calls, prefill excluded
    sequence_forwards: int = 0  # (sequence, decode call) pairs: forwards x rows still decoding
    prefill_forwards: int = 0
    new_tokens: int = 0  # all sequences together
    tokens_per_forward: float = 0.0
    acceptance: list[float] = field(default_factory=list)
    # the counts behind `acceptance` (per depth: drafts verified, drafts accepted), so that
    # several calls can be pooled (a mean of per-call rates would weight short calls too much)
    draft_attempts: list[int] = field(default_factory=list)
    draft_accepted: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence (a final stop token included)
    stats: GenerationStats
    finish_reasons: list[str]  # "stop" or "length" per sequence


# ---------------------------------------------------------------------------------------------
# Input checking.


def as_prompts(prompt_ids: list[list[int]] | list[int] | Tensor) -> list[list[int]]:
    """One prompt, several, or a [T] / [B, T] tensor -> a list of prompts (lists of ids)."""
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()]
        if prompt_ids.dim() == 2:
            return prompt_ids.tolist()
        raise MultitokenError("prompt tensor must be 1-D or 2-D, got shape "
                              f"{tuple(prompt_ids.shape)}")
    if not isinstance(prompt_ids, (list, tuple)):
        raise MultitokenError(f"prompt must be a list of token ids or a list of such lists, got "
                              f"{type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise MultitokenError("empty prompt: give at least one token")
    if all(isinstance(t, int) for t in prompt_ids):
        return [list(prompt_ids)]
    if all(isinstance(p, (list, tuple)) for p in prompt_ids):
        return [[int(t) for t in p] for p in prompt_ids]
    raise MultitokenError("prompt must be a list of token ids or a list of such lists")


def check_prompts(model: MultiTokenModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt is non-empty, in the vocabulary, and leaves room for max_new_tokens."""
    cfg = model.cfg
    if max_new_tokens < 0:
        raise MultitokenError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for b, p in enumerate(prompts):
        where = f"prompt {b}" if len(prompts) > 1 else "prompt"
        if not p:
            raise MultitokenError(f"{where} is empty: give at least one token")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise MultitokenError(f"{where} has token ids outside the vocabulary "
                                  f"[0, {cfg.vocab_size})")
        # The rule: prompt + new tokens <= max_seq_len positions (the last new token is never
        # fed back, but a longer sequence could not be continued or re-read by the model).
        if len(p) + max_new_tokens <= cfg.max_seq_len:
            continue
        if len(p) > cfg.max_seq_len:
            raise MultitokenError(f"{where} has {len(p)} tokens, more than the model's context "
                                  f"of {cfg.max_seq_len} positions")
        if len(p) == cfg.max_seq_len:
            raise MultitokenError(
                f"{where} has {len(p)} tokens, which fill the model's context of "
                f"{cfg.max_seq_len} positions: no room for new tokens (a prompt of at most "
                f"{cfg.max_seq_len - 1} tokens leaves room for one)")
        raise MultitokenError(
            f"{where} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {cfg.max_seq_len}; at most {cfg.max_seq_len - len(p)} new "
            f"tokens fit")


def check_num_drafts(model: MultiTokenModel, mode: str, num_drafts: int | None) -> int:
    """Validate the mode against the model; the number of drafts (chain) or tree depth."""
    if mode not in SPECULATIVE_MODES:
        raise MultitokenError(f"unknown speculative mode {mode!r}: choose one of "
                              f"{', '.join(SPECULATIVE_MODES)}")
    if mode == "off":
        return 0
    n = model.n_future
    if n == 1:
        raise MultitokenError(f"speculative={mode!r} needs draft heads, but this model has "
                              "n_future=1; use speculative='off'")
    if num_drafts is None:
        return n - 1
    if not 1 <= num_drafts <= n - 1:
        raise MultitokenError(f"num_drafts must be in 1..{n - 1} for this model (n_future={n}: "
                              f"head 1 verifies, heads 2..{n} draft), got {num_drafts}")
    return num_drafts


# ---------------------------------------------------------------------------------------------
# Plain decoding: gpt-fast style free functions.


def decode_one(engine: Engine, cache: KVCache, tok: Tensor, pos: Tensor, kv_len: int) -> Tensor:
    """Feed tok [B] at positions pos [B]; return head 1's logits [B, V] for the next token."""
    p = pos[:, None]
    fwd = engine.forward(tok[:, None], p, causal_context(cache, p, kv_len))
    return engine.logits(fwd.h0[:, 0])


class PlainDecoder:
    """One token per forward from head 1 only: the baseline every speedup is measured against."""

    width = 1
    depth = 0

    def __init__(self, model: MultiTokenModel, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        # (Anticausal heads compute head 1 last, from all the others: the engine runs parents.)
        self.engine = Engine(model, 1)
        self.sampling, self.generator = sampling, generator

    def start(self, cache: KVCache, idx: Tensor, last: Tensor) -> Tensor:
        fwd = prefill(self.engine, cache, idx)
        h = fwd.h0[torch.arange(idx.shape[0], device=idx.device), last]
        self.tok = pick(self.engine.logits(h), self.sampling, self.generator)
        return self.tok

    def select(self, rows: Tensor) -> None:
        self.tok = self.tok[rows]

    def step(self, cache: KVCache, pos: Tensor, kv_len: int) -> StepOut:
        logits = decode_one(self.engine, cache, self.tok, pos, kv_len)
        self.tok = pick(logits, self.sampling, self.generator)
        zero = torch.zeros_like(self.tok)
        return StepOut(self.tok[:, None], zero, zero)


# ---------------------------------------------------------------------------------------------
# The public entry point.


def generate(model: MultiTokenModel, prompt_ids: list[list[int]] | list[int] | Tensor,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, speculative: str = "off", num_drafts: int | None = None,
             stop: int | Sequence[int] | None = None, tree: Sequence[Sequence[int]] | None = None,
             dynamic: str = "2x2", generator: torch.Generator | None = None,
             stream: Callable[[list[list[int]]], None] | None = None,
             on_step: Callable[[StepOut], None] | None = None) -> GenerationResult:
    """Decode up to `max_new_tokens` per prompt. See the module docstring for conventions.

    prompt_ids: one prompt (list of ids), several (list of lists, any lengths), or a tensor
    ([T] or [B, T], all rows prompts of length T). tree: for speculative="tree", a list of paths
    of child indices, e.g. [(0,), (1,), (0, 0)] (greedy: top-k ranks; sampling: draw order, the
    tree gives the shape; default: `tree.default_tree`); num_drafts then caps its depth.
    dynamic: for speculative="dynamic", "TOP_KxBEAM" (children per expanded node x nodes
    expanded per depth; `dynamic.DynamicShape`), num_drafts deep.
    stream: called after every step with the tokens each sequence gained. on_step: called
    with every decode step's raw `StepOut` (one row per sequence still decoding, before
    truncation at a stop token or max_new_tokens), e.g. to count the accepted tree nodes
    (`StepOut.node`).
    """
    prompts = as_prompts(prompt_ids)
    sampling = Sampling(float(temperature), top_k, top_p)
    sampling.validate()
    k = check_num_drafts(model, speculative, num_drafts)
    check_prompts(model, prompts, max_new_tokens)
    stop_set = {stop} if isinstance(stop, int) else set(stop or ())

    t0 = time.perf_counter()
    B = len(prompts)
    stats = GenerationStats(mode=speculative, num_drafts=k, batch_size=B)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    if max_new_tokens == 0:
        return GenerationResult(out, stats, reasons)

    decoder: PlainDecoder | SpeculativeDecoder | ConditionedDecoder | DynamicDecoder
    if speculative == "off":
        decoder = PlainDecoder(model, sampling, generator)
    elif speculative == "dynamic":
        decoder = DynamicDecoder(model, DynamicShape.parse(dynamic, k), sampling, generator)
        stats.tree_size = decoder.shape.size
    else:
        if speculative == "chain":
            t = Tree.chain(k)
        else:
            t = Tree(tree if tree is not None else default_tree(k), max_depth=k)
            stats.tree_size = t.size
        # Token-conditioned draft heads draft each node's children from that node's token.
        decoder = (ConditionedDecoder if model.conditioned else SpeculativeDecoder)(
            model, t, sampling, generator)
        stats.num_drafts = t.depth

    with torch.inference_mode():
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        device = decoder.engine.device
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
        # Cache room: a sequence still decoding feeds positions < len + max_new_tokens - 1,
        # plus one step's width of speculative tokens.
        cache = decoder.engine.new_cache(B, T + max_new_tokens + decoder.width)
        last = torch.tensor(lengths, device=device) - 1
        first = decoder.start(cache, idx, last).tolist()
        stats.prefill_forwards = 1
        stats.prefill_time_s = time.perf_counter() - t0

        rows = list(range(B))  # the sequence in each batch row; finished ones are dropped
        pos = list(lengths)  # per sequence: position of the next token to feed
        fresh = [[tok] for tok in first]  # per sequence: tokens gained in the last call
        attempts = [0] * decoder.depth
        accepted = [0] * decoder.depth
        appended = rows_run = 0  # tokens appended by decode calls; (sequence, call) pairs
        while True:
            alive = []
            for r, b in enumerate(rows):
                new = fresh[b][: max_new_tokens - len(out[b])]
                for j, tok in enumerate(new):
                    if tok in stop_set:
                        new, reasons[b] = new[: j + 1], "stop"
                        break
                out[b].extend(new)
                fresh[b] = new
                if stats.forwards:
                    appended += len(new)
                if reasons[b] != "stop" and len(out[b]) < max_new_tokens:
                    alive.append(r)
            if stream is not None:
                stream(fresh)
            fresh = [[] for _ in range(B)]
            if not alive:
                break
            if len(alive) < len(rows):
                # Drop finished sequences so the rest of the batch stops paying for them
                # (copies the cache once per finishing event, not per step).
                keep = torch.tensor(alive, device=device)
                cache.select_rows(keep)
                decoder.select(keep)
                rows = [rows[r] for r in alive]
            step = decoder.step(cache, torch.tensor([pos[b] for b in rows], device=device),
                                max(pos[b] for b in rows) + decoder.width)
            if on_step is not None:
                on_step(step)
            stats.forwards += 1
            rows_run += len(rows)
            n_l, tried_l, toks_l = step.n.tolist(), step.tried.tolist(), step.tokens.tolist()
            for r, b in enumerate(rows):
                n = n_l[r]
                fresh[b] = toks_l[r][: n + 1]
                pos[b] += n + 1
                for i in range(tried_l[r]):
                    attempts[i] += 1
                    accepted[i] += i < n
    stats.new_tokens = sum(len(o) for o in out)
    stats.sequence_forwards = rows_run
    stats.tokens_per_forward = appended / rows_run if rows_run else 0.0
    # Only drafts that were verified at least once: a head that never drafted has no
    # acceptance rate (attempts never increase with depth, so this is a prefix).
    stats.acceptance = [a / t for a, t in zip(accepted, attempts) if t]
    stats.draft_attempts = [t for t in attempts if t]
    stats.draft_accepted = [a for a, t in zip(accepted, attempts) if t]
    stats.wall_time_s = time.perf_counter() - t0
    return GenerationResult(out, stats, reasons)
