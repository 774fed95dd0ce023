"""Decoding: plain (one token per forward) and self-speculative (chain, tree), batched.

    generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             speculative="off" | "chain" | "tree", num_drafts=None, stop=None, tree=None,
             generator=None, stream=None) -> GenerationResult

Batches: prompts of different lengths are right-padded into one prefill; every sequence then
keeps its own position (cache slot == position), so with speculation each sequence accepts its
own number of drafts per step. Finished sequences leave the batch (their cache rows are dropped),
so the others stop paying for them.

Conventions:
- A stop token ends its sequence and IS included in `tokens` (so a stop can be told apart from
  running out of `max_new_tokens`; `finish_reasons` says which).
- `temperature=0` is greedy (argmax of head 1). Otherwise logits are divided by the
  temperature, then top-k, then top-p (smallest set of tokens whose mass reaches top_p) are
  applied; speculative sampling is exact for exactly that processed distribution.
- A model with n_future=1 has no draft heads: asking it to speculate is an error (not a silent
  fallback), so a benchmark can never report a "speculative" number that was plain decoding.
- Stats: `forwards` counts decode model calls (the prefill is counted separately);
  `tokens_per_forward` = tokens appended per decode call per sequence, bonus token included
  (plain decoding: 1.0); `acceptance[i]` = how often draft i+1 was accepted when drafts 1..i
  were (chain), or how often depth i+1 of the tree was reached when depth i was and had children,
  for the drafts that were verified at least once (so it can be shorter than num_drafts, and is
  empty when no decode call ran). `max_new_tokens=0` runs nothing: no prefill, empty stats.
- Context: a prompt of L tokens with max_new_tokens N needs L + N <= max_seq_len.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor

from multitoken import cliargs
from multitoken.devices import resolve_device
from multitoken.engine import Engine, Forward
from multitoken.errors import ConfigError, MultitokenError
from multitoken.model import KVCache, MultiTokenModel, causal_context

SPECULATIVE_MODES = ("off", "chain", "tree")

# ---------------------------------------------------------------------------------------------
# Logits processing, shared by plain and speculative sampling.


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise MultitokenError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise MultitokenError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise MultitokenError(f"top_p must be in (0, 1], got {self.top_p}")


def process_logits(logits: Tensor, s: Sampling) -> Tensor:
    """Logits [..., V] -> the probabilities we sample from (temperature, top-k, top-p)."""
    logits = logits.float() / s.temperature
    V = logits.shape[-1]
    if s.top_k is not None and s.top_k < V:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1.0:
        sp, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass strictly before it is < top_p: the smallest prefix whose
        # mass reaches top_p (the most likely token is always kept).
        drop = (torch.cumsum(sp, dim=-1) - sp) >= s.top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of probs [..., V] (rows need not be normalised)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def pick(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """The next token from logits [..., V]: argmax when greedy, else a sample."""
    if s.greedy:
        return logits.argmax(-1)
    return sample(process_logits(logits, s), generator)


# ---------------------------------------------------------------------------------------------
# Plain decoding: gpt-fast style free functions.


def prefill(engine: Engine, cache: KVCache, idx: Tensor) -> Forward:
    """Run right-padded prompts idx [B, T] through the model, filling cache slots 0..T-1.

    Padding writes garbage past each prompt's end; those slots are rewritten before any query
    may attend to them (a query at position p sees slots <= p only).
    """
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    return engine.forward(idx, pos, causal_context(cache, pos, T))


def decode_one(engine: Engine, cache: KVCache, tok: Tensor, pos: Tensor, kv_len: int) -> Tensor:
    """Feed tok [B] at positions pos [B]; return head 1's logits [B, V] for the next token."""
    p = pos[:, None]
    fwd = engine.forward(tok[:, None], p, causal_context(cache, p, kv_len))
    return engine.logits(fwd.h0[:, 0])


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


@dataclass
class StepOut:
    """What one decode step appends: tokens[b, :n[b] + 1] (accepted drafts, then the bonus)."""

    tokens: Tensor  # [B, W]
    n: Tensor  # [B] drafts accepted
    tried: Tensor  # [B] drafts verified (for per-head acceptance)


# ---------------------------------------------------------------------------------------------
# Input checking.


def _as_prompts(prompt_ids: list[list[int]] | list[int] | Tensor) -> list[list[int]]:
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


def _check_prompts(model: MultiTokenModel, prompts: list[list[int]], max_new_tokens: int) -> None:
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
# The public entry point.


def generate(model: MultiTokenModel, prompt_ids: list[list[int]] | list[int] | Tensor,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, speculative: str = "off", num_drafts: int | None = None,
             stop: int | Sequence[int] | None = None, tree: Sequence[Sequence[int]] | None = None,
             generator: torch.Generator | None = None,
             stream: Callable[[list[list[int]]], None] | None = None) -> GenerationResult:
    """Decode up to `max_new_tokens` per prompt. See the module docstring for conventions.

    prompt_ids: one prompt (list of ids), several (list of lists, any lengths), or a tensor
    ([T] or [B, T], all rows prompts of length T). tree: for speculative="tree", a list of paths
    of top-k ranks, e.g. [(0,), (1,), (0, 0)] (default: `tree.default_tree`); num_drafts then
    caps its depth. stream: called after every step with the tokens each sequence gained.
    """
    from multitoken.speculative import ChainDecoder
    from multitoken.tree import Tree, TreeDecoder, default_tree

    prompts = _as_prompts(prompt_ids)
    sampling = Sampling(float(temperature), top_k, top_p)
    sampling.validate()
    k = check_num_drafts(model, speculative, num_drafts)
    _check_prompts(model, prompts, max_new_tokens)
    stop_set = {stop} if isinstance(stop, int) else set(stop or ())

    t0 = time.perf_counter()
    B = len(prompts)
    stats = GenerationStats(mode=speculative, num_drafts=k, batch_size=B)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    if max_new_tokens == 0:
        return GenerationResult(out, stats, reasons)

    if speculative == "tree":
        t = Tree(tree if tree is not None else default_tree(k), max_depth=k)
        decoder = TreeDecoder(model, t, sampling, generator)
        stats.num_drafts, stats.tree_size = t.depth, t.size
    elif speculative == "chain":
        decoder = ChainDecoder(model, k, sampling, generator)
    else:
        decoder = PlainDecoder(model, sampling, generator)

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
    stats.wall_time_s = time.perf_counter() - t0
    return GenerationResult(out, stats, reasons)


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
# Command line: multitoken generate --checkpoint DIR --prompt TEXT ...


class _TextStream:
    """Print decoded text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer, prompt: str = "", file=None) -> None:  # noqa: ANN001
        self.tok, self.file = tokenizer, file if file is not None else sys.stdout
        self.prompt = prompt  # echoed with the first tokens, so a bad-input error prints alone
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, fresh: list[list[int]]) -> None:
        if self.prompt:
            self.file.write(self.prompt)
            self.prompt = ""
        self.ids.extend(fresh[0])
        text = self.tok.decode(self.ids)
        end = len(text.rstrip("\ufffd"))  # a multi-byte character may still be arriving
        if end > self.printed:
            self.file.write(text[self.printed:end])
            self.file.flush()
            self.printed = end

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        self.file.write(self.prompt + text[self.printed:] + "\n")
        self.file.flush()


def read_prompt(prompt: str | None, prompt_file: str | None, stdin: TextIO | None) -> str:
    """The prompt text: --prompt TEXT, --prompt-file PATH, or standard input (`--prompt -`, or
    no prompt given while stdin is not a terminal). Files and stdin are used exactly as read,
    a final newline included (it is part of the text the model continues)."""
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file: no such file: {path}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--prompt-file: {path} is not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"--prompt-file: cannot read {path}: {e.strerror}") from None
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and (stdin is None or stdin.isatty()):
        raise ConfigError("no prompt: give --prompt TEXT or --prompt-file PATH, or pipe the "
                          "prompt on standard input")
    if stdin is None:
        raise ConfigError("--prompt -: there is no standard input to read")
    try:
        return stdin.read()
    except UnicodeDecodeError:
        raise ConfigError("the prompt on standard input is not UTF-8 text") from None


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken generate", description=(
        "Decode from a checkpoint, streaming text as it is accepted, then print the stats. "
        "The prompt comes from --prompt, --prompt-file, or standard input. "
        "--speculative auto uses the mode and tree stored by `multitoken calibrate` (chain "
        "with all draft heads when there is no calibration; plain for n_future=1 models)."))
    p.add_argument("--checkpoint", required=True, help="checkpoint (or run) directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None,
                        help="prompt text; '-' reads it from standard input (also the default "
                        "when neither --prompt nor --prompt-file is given and stdin is not a "
                        "terminal)")
    source.add_argument("--prompt-file", default=None, metavar="PATH",
                        help="read the prompt from this UTF-8 file (used exactly, a final "
                        "newline included)")
    p.add_argument("--max-new-tokens", type=cliargs.non_negative_int, default=256,
                   help="tokens to generate (default 256; lowered, with a note, to what the "
                   "model's context leaves after the prompt)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=cliargs.positive_int, default=None,
                   help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose mass reaches p, in (0, 1]")
    p.add_argument("--speculative", default="auto", choices=("auto",) + SPECULATIVE_MODES,
                   help="decoding mode (default auto: the calibrated one)")
    p.add_argument("--num-drafts", type=cliargs.positive_int, default=None,
                   help="drafts per step (chain) or maximum tree depth")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    cliargs.add_device_argument(p)
    cliargs.add_threads_argument(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from multitoken.calibrate import load_calibration
    from multitoken.checkpoint import load_checkpoint

    text = read_prompt(args.prompt, args.prompt_file, sys.stdin)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device)
    calib = load_calibration(args.checkpoint)
    mode, num_drafts, tree = args.speculative, args.num_drafts, None
    if mode == "auto":
        mode = "off" if model.n_future == 1 else (calib or {}).get("best_mode", "chain")
    if calib and mode == "tree":
        tree = calib.get("tree")
    if calib and mode == "chain" and num_drafts is None:
        num_drafts = calib.get("best_k")
    check_num_drafts(model, mode, num_drafts)
    ids = tokenizer.encode(text)
    # Lowered to fit (with a note) only after everything else is known to be valid, so a note
    # never precedes an error; a prompt that leaves no room at all is an error.
    room = model.cfg.max_seq_len - len(ids)
    max_new_tokens = min(args.max_new_tokens, room) if room > 0 else args.max_new_tokens
    _check_prompts(model, _as_prompts(ids), max_new_tokens)
    if max_new_tokens < args.max_new_tokens:
        print(f"note: max-new-tokens lowered to {max_new_tokens} to fit the model's context",
              file=sys.stderr)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    printer = _TextStream(tokenizer, text)
    res = generate(model, ids, max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, speculative=mode, num_drafts=num_drafts,
                   stop=None if args.no_stop else tokenizer.eos_id, tree=tree,
                   generator=generator, stream=printer)
    printer.finish()
    s = res.stats
    desc = {"off": "plain (head 1 only)", "chain": f"chain, {s.num_drafts} drafts per step",
            "tree": f"tree, {s.tree_size} nodes, depth {s.num_drafts}"}[mode]
    print(f"\n[{desc}] {s.new_tokens} tokens in {s.wall_time_s:.2f} s "
          f"({s.tokens_per_second:.1f} tok/s), {s.forwards} forwards + {s.prefill_forwards} "
          "prefill, "
          f"{s.tokens_per_forward:.2f} tokens/forward")
    if s.acceptance:
        acc = ", ".join(f"head {i + 2}: {a:.2f}" for i, a in enumerate(s.acceptance))
        print(f"acceptance (given the earlier drafts accepted): {acc}")
    return 0
