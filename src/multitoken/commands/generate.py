"""`multitoken generate --checkpoint DIR --prompt TEXT ...`: decode, streaming text as it comes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from multitoken import cliargs
from multitoken.checkpoint import load_checkpoint
from multitoken.decoding.calibrate import load_calibration, setting_calibration
from multitoken.decoding.generate import (
    SPECULATIVE_MODES,
    as_prompts,
    check_num_drafts,
    check_prompts,
    generate,
)
from multitoken.decoding.sampling import Sampling
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError
from multitoken.tokenizer import Tokenizer


class TextStream:
    """Print decoded text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: Tokenizer, prompt: str = "", file: TextIO | None = None) -> None:
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
        "--speculative auto uses the mode and tree stored by `multitoken calibrate` for the "
        "sampling setting being run (`calibrate --sampling`), else its greedy choice (chain "
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
    p.add_argument("--dynamic", default=None, metavar="TOP_KxBEAM",
                   help="with --speculative dynamic (token-conditioned heads): children per "
                   "expanded node x nodes expanded per depth (default: the calibrated shape, "
                   "else 2x2)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = read_prompt(args.prompt, args.prompt_file, sys.stdin)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device,
                                       dtype=cliargs.load_dtype(args.dtype))
    # the calibration of this sampling setting, else the greedy one
    calib, source = setting_calibration(
        load_calibration(args.checkpoint, model.tok_embeddings.weight.dtype), sampling)
    mode, num_drafts, tree = args.speculative, args.num_drafts, None
    if mode == "auto":
        mode = "off" if model.n_future == 1 else (calib or {}).get("best_mode", "chain")
    if calib and mode == "tree":
        tree = calib.get("tree")
    if calib and mode == "chain" and num_drafts is None:
        num_drafts = calib.get("best_k")
    dynamic = args.dynamic or (calib or {}).get("dynamic") or "2x2"
    check_num_drafts(model, mode, num_drafts)
    ids = tokenizer.encode_prompt(text)  # bos first where the model was trained with one
    # Lowered to fit (with a note) only after everything else is known to be valid, so a note
    # never precedes an error; a prompt that leaves no room at all is an error.
    room = model.cfg.max_seq_len - len(ids)
    max_new_tokens = min(args.max_new_tokens, room) if room > 0 else args.max_new_tokens
    check_prompts(model, as_prompts(ids), max_new_tokens)
    if max_new_tokens < args.max_new_tokens:
        print(f"note: max-new-tokens lowered to {max_new_tokens} to fit the model's context",
              file=sys.stderr)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    printer = TextStream(tokenizer, text)
    res = generate(model, ids, max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, speculative=mode, num_drafts=num_drafts,
                   stop=None if args.no_stop else tokenizer.eos_id, tree=tree,
                   dynamic=dynamic, generator=generator, stream=printer)
    printer.finish()
    s = res.stats
    desc = {"off": "plain (head 1 only)", "chain": f"chain, {s.num_drafts} drafts per step",
            "tree": f"tree, {s.tree_size} nodes, depth {s.num_drafts}, "
                    f"{source if tree else 'default'}",
            "dynamic": f"dynamic tree {dynamic}, {s.tree_size} nodes, depth {s.num_drafts}"}[mode]
    print(f"\n[{desc}] {s.new_tokens} tokens in {s.wall_time_s:.2f} s "
          f"({s.tokens_per_second:.1f} tok/s), {s.forwards} forwards + {s.prefill_forwards} "
          "prefill, "
          f"{s.tokens_per_forward:.2f} tokens/forward")
    if s.acceptance:
        acc = ", ".join(f"head {i + 2}: {a:.2f}" for i, a in enumerate(s.acceptance))
        print(f"acceptance (given the earlier drafts accepted): {acc}")
    return 0
