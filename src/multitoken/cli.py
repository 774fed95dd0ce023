"""`multitoken` command line: train, eval, generate, serve, calibrate, distill, convert, bench.

Configuration flags are the dataclass fields themselves: `--model.n_future=2` or
`--model.n_future 2`, applied on top of `--config recipe.yaml`, strictly (unknown keys fail).
User errors print one line (`error: ...`) and exit with status 2; set MULTITOKEN_DEBUG=1 for
the traceback.

This module imports no torch at import time (the commands import their modules when run), so
`multitoken --help` and `multitoken --version` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

from multitoken import __version__, cliargs
from multitoken.errors import ConfigError, MultitokenError

BENCHES = {
    "train-memory": "multitoken.bench.train_memory",
    "train-speed": "multitoken.bench.train_speed",
    "decode": "multitoken.bench.decode",
    "serve": "multitoken.bench.serve",
}


def _split_overrides(rest: list[str]) -> list[str]:
    """['--model.dim=64', '--train.steps', '5'] -> ['model.dim=64', 'train.steps=5']."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {arg!r} (config overrides look like "
                              "--section.key=value)")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{arg[2:]}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg!r} needs a value")
    return out


def cmd_train(argv: list[str]) -> int:
    p = cliargs.ArgumentParser(prog="multitoken train", description=(
        "Train a multi-token prediction model. Any config field can be overridden with "
        "--section.key=value (see configs/*.yaml and multitoken/config.py)."))
    p.add_argument("--config", help="YAML recipe (e.g. configs/demo.yaml)")
    p.add_argument("--out", help="run directory (default: a new folder under runs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved config (--config and overrides "
                   "may change the schedule, e.g. --train.steps, not the model or data)")
    p.add_argument("--init", help="start from this checkpoint's weights, model config and "
                   "tokenizer (e.g. one made by `multitoken add-heads`); same as --train.init")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True,
                   help="print a sample generation at the end")
    args, rest = p.parse_known_args(argv)
    from multitoken.config import load_run_config
    from multitoken.train import TrainingInterrupted, resume_config, train

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    if args.init:
        rest = [*rest, f"--train.init={args.init}"]
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.resume:
        cfg, changes = resume_config(args.out, args.config, _split_overrides(rest))
        if changes and main_rank:
            print(f"resume: {'; '.join(changes)}", flush=True)
    else:
        cfg = load_run_config(args.config, _split_overrides(rest))
    try:
        result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except TrainingInterrupted as e:
        if main_rank:
            print(f"interrupted by {e}", file=sys.stderr)
        return 128 + e.signum
    if not main_rank:
        return leave_torchrun_child(0)
    print("\nvalidation per head:")
    print(f"{'head':>6} {'predicts':>9} {'loss':>8} {'top-1 acc':>10}")
    for i, (loss, acc) in enumerate(zip(result["head_loss"], result["head_acc"])):
        print(f"{i + 1:>6} {'t+' + str(i + 1):>9} {loss:>8.3f} {acc:>10.3f}")
    print(f"run directory: {result['run_dir']}")
    if args.sample:
        _print_sample(result["run_dir"], cfg.train.sample_prompt, cfg.train.sample_tokens)
    return leave_torchrun_child(0)


def leave_torchrun_child(rc: int) -> int:
    """rc, or, in a process that torchrun started (WORLD_SIZE > 1) whose run succeeded, exit
    now with os._exit(0), after flushing.

    By then `train` has met the other ranks and destroyed the process group, every file is
    closed and every result printed. Interpreter shutdown would only tear down C++ state.
    On gloo, that teardown aborted a finished rank now and then ("terminate called without an
    active exception", exit -6; one fresh-clone CI run of the FSDP resume test, 2026-11-29),
    which turned a completed run into a failed one for torchrun and for scripts that check its
    status. A failed run (rc != 0) exits normally: its atexit handlers meet the other ranks."""
    if rc != 0 or int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        return rc
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _print_sample(run_dir: str, prompt: str, n_tokens: int) -> None:
    from multitoken.checkpoint import load_checkpoint
    from multitoken.decoding.generate import generate

    model, tok = load_checkpoint(run_dir)
    ids = tok.encode_prompt(prompt)
    res = generate(model, ids, max_new_tokens=min(n_tokens, model.cfg.max_seq_len - len(ids)))
    print(f"\nsample (greedy, head 1):\n{prompt}{tok.decode(res.tokens[0])}")


def eval_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken eval",
                               description="Per-head loss and top-1 accuracy of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint (or run) directory")
    p.add_argument("--files", nargs="*", help="text files/folders/globs (default: the "
                   "checkpoint's validation split)")
    p.add_argument("--seq-len", type=cliargs.positive_int, default=None,
                   help="tokens per window (default: the run's train.seq_len, else 256 or the "
                   "model's context if shorter; at most the model's context)")
    p.add_argument("--batch-size", type=cliargs.positive_int, default=8,
                   help="windows per batch (default 8)")
    p.add_argument("--batches", type=cliargs.positive_int, default=32,
                   help="batches evaluated, evenly spaced over the text (default 32)")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    return p


def cmd_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    # Imported here, not at the top: they import torch, which `--help` must not wait for.
    from multitoken.checkpoint import load_checkpoint, read_config
    from multitoken.config import DataConfig, from_dict
    from multitoken.data import prepare_data, resolve_files, tokenize_files, val_batches
    from multitoken.devices import resolve_device
    from multitoken.train import evaluate

    device = resolve_device(args.device)
    model, tok = load_checkpoint(args.checkpoint, device=device,
                                 dtype=cliargs.load_dtype(args.dtype))
    meta = read_config(args.checkpoint)
    seq_len = (args.seq_len or meta.get("run", {}).get("train", {}).get("seq_len")
               or min(256, model.cfg.max_seq_len))
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({model.cfg.max_seq_len})")
    dcfg = from_dict(DataConfig, meta.get("run", {}).get("data", {}), prefix="data.")
    if args.files:
        tokens = tokenize_files(resolve_files(args.files), tok, dcfg.cache_dir)
    else:
        tokens = prepare_data(dcfg, tok).val
    res = evaluate(model, val_batches(tokens, seq_len, args.batch_size, args.batches), device)
    print(f"{'head':>6} {'loss':>8} {'top-1 acc':>10}")
    for i, (loss, acc) in enumerate(zip(res["head_loss"], res["head_acc"])):
        print(f"{i + 1:>6} {loss:>8.3f} {acc:>10.3f}")
    print(json.dumps(res))
    return 0


def add_heads_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken add-heads", description=(
        "Give a trained model n_future heads: new heads start as copies of head 1's layer; "
        "the trunk and head 1 are unchanged, so plain decoding is too. Fewer heads than the "
        "source's drops the extra ones."))
    p.add_argument("--checkpoint", required=True, help="source checkpoint (or run) directory")
    p.add_argument("--n-future", type=cliargs.positive_int, required=True,
                   help="number of heads of the new model (head 1 included)")
    p.add_argument("--head-type", choices=["transformer", "token_conditioned"], default=None,
                   help="type of the new model's draft heads (default: the source's); "
                   "token_conditioned: DeepSeek-V3-style MTP modules")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
    return p


def cmd_add_heads(argv: list[str]) -> int:
    args = add_heads_parser().parse_args(argv)
    # Imported here, not at the top: they import torch, which `--help` must not wait for.
    from multitoken.addheads import add_heads, run_config_with
    from multitoken.checkpoint import load_checkpoint, new_output_dir, read_config, save_checkpoint

    out = new_output_dir(args.out, "--out")
    model, tok = load_checkpoint(args.checkpoint)
    new = add_heads(model, args.n_future, args.head_type)
    run = run_config_with(read_config(args.checkpoint).get("run", {}), new.cfg.__dict__)
    save_checkpoint(out, new, tok, run_config=run, step=0,
                    extra={"source": str(args.checkpoint)})
    print(f"{out}: {model.cfg.n_future} -> {new.cfg.n_future} heads ({new.cfg.head_type}) "
          f"({new.num_params() / 1e6:.2f}M non-embedding params; trunk and head 1 unchanged)")
    return 0


def cmd_module(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return int(importlib.import_module(module).main(argv) or 0)

    return run


def cmd_experiment(argv: list[str]) -> int:
    """`experiment pretrained` is a pipeline of its own (docs/pretrained.md), not a sweep."""
    if argv[:1] == ["pretrained"]:
        return cmd_module("multitoken.experiments.pretrained")(argv[1:])
    return cmd_module("multitoken.experiments.runner")(argv)


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        names = ", ".join(BENCHES)
        if argv and argv[0] not in ("-h", "--help"):
            raise ConfigError(f"unknown benchmark {argv[0]!r}; choose one of: {names}")
        print(f"usage: multitoken bench {{{names}}} [options]")
        return 0
    return cmd_module(BENCHES[argv[0]])(argv[1:])


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_module("multitoken.commands.generate"),
    "serve": cmd_module("multitoken.commands.serve"),
    "calibrate": cmd_module("multitoken.commands.calibrate"),
    "distill": cmd_module("multitoken.distill"),
    "convert": cmd_module("multitoken.interop"),
    "eval-code": cmd_module("multitoken.codeeval"),
    "add-heads": cmd_add_heads,
    "experiment": cmd_experiment,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"multitoken {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: multitoken COMMAND [options]\n"
              "       multitoken --version\n\n"
              "  train      train a multi-token prediction model (--config configs/demo.yaml)\n"
              "  eval       per-head validation loss and accuracy of a checkpoint\n"
              "  generate   decode from a checkpoint (plain or self-speculative)\n"
              "  serve      OpenAI-compatible HTTP server, continuous batching + speculation\n"
              "  calibrate  measure head acceptance and forward costs; choose the draft tree\n"
              "  distill    fine-tune the draft heads on the model's own output (greedy or sampled)\n"
              "  convert    import Meta's MTP release or a HF Llama; export to HF Llama\n"
              "  add-heads  give a trained model more (or fewer) heads; plain decoding unchanged\n"
              "  eval-code  HumanEval pass@k, completions run in a sandbox\n"
              "  experiment paper experiments: induction, polynomial, ntp-vs-mtp, byte-heads;\n"
              "             pretrained: an n=1 model gains heads (docs/pretrained.md)\n"
              "  bench      train-memory | train-speed | decode | serve\n\n"
              "`multitoken COMMAND --help` lists a command's options.")
        return 0
    cmd = COMMANDS.get(argv[0])
    try:
        if cmd is None:
            raise ConfigError(f"unknown command {argv[0]!r}; run `multitoken --help`")
        return cmd(argv[1:])
    except MultitokenError as e:
        if os.environ.get("MULTITOKEN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
