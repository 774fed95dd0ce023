"""`multitoken serve --checkpoint DIR`: an OpenAI-compatible HTTP server (docs/serving.md).

SIGTERM (or Ctrl-C): the server stops accepting connections, answers 503 to new requests on
open ones, lets the requests in flight finish (at most --drain-timeout seconds, then they are
cancelled), and exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn

from multitoken import cliargs
from multitoken.checkpoint import find_checkpoint, load_checkpoint
from multitoken.decoding.calibrate import load_calibration
from multitoken.decoding.tree import Tree, default_tree
from multitoken.devices import resolve_device
from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel
from multitoken.serve.api import ServerState, create_app
from multitoken.serve.metrics import Metrics
from multitoken.serve.scheduler import Scheduler
from multitoken.serve.text import ChatTemplate


def speculate_arg(text: str) -> str:
    """argparse type of --speculate: auto, off, tree or chain-K."""
    if text in ("auto", "off", "tree"):
        return text
    if text.startswith("chain-") and text[6:].isdigit() and int(text[6:]) >= 1:
        return text
    import argparse

    raise argparse.ArgumentTypeError(f"expected auto, off, tree or chain-K (K >= 1), got {text!r}")


def choose_tree(model: MultiTokenModel, spec: str,
                calib: dict[str, Any] | None) -> tuple[Tree | None, str]:
    """The draft tree every step of the batch runs (None: plain decoding) and its description.
    auto: the stored calibration's greedy choice (the base tree: it serves a batch of mixed
    settings; `setting_trees` gives the per-setting ones), else a chain of all draft heads;
    plain for n_future=1. Every head type alike (token-conditioned heads draft through
    `decoding.conditioned`, see `serve.rows.ConditionedRows`)."""
    n = model.n_future
    if spec == "off":
        return None, "off"
    if n == 1:
        if spec == "auto":
            return None, "off (n_future=1: no draft heads)"
        raise ConfigError(f"--speculate {spec} needs draft heads, but this model has n_future=1")
    if spec.startswith("chain-"):
        k = int(spec[6:])
        if k > n - 1:
            raise ConfigError(f"--speculate {spec}: this model has {n - 1} draft heads "
                              f"(n_future={n}); use chain-1..chain-{n - 1}")
        return Tree.chain(k), f"chain-{k}"
    if spec == "tree":
        if calib:
            return Tree(calib["tree"], max_depth=n - 1), "tree (calibrated)"
        return Tree(default_tree(n - 1), max_depth=n - 1), "tree (default, no calibration)"
    # auto
    if not calib:
        return Tree.chain(n - 1), f"chain-{n - 1} (no calibration)"
    mode = static_mode(calib)
    if mode == "tree":
        return Tree(calib["tree"], max_depth=n - 1), "tree (calibrated)"
    if mode == "off":
        return None, "off (calibrated)"
    k = min(int(calib.get("best_k", n - 1)), n - 1)
    return Tree.chain(k), f"chain-{k} (calibrated)"


def static_mode(calib: dict[str, Any]) -> str:
    """The calibrated mode among those the server runs: where a dynamic tree won (`generate`
    runs those), the best static candidate's mode."""
    mode = calib.get("best_mode", "chain")
    return calib.get("static_mode", "chain") if mode == "dynamic" else mode


def setting_trees(model: MultiTokenModel, spec: str, base: Tree | None,
                  calib: dict[str, Any] | None) -> dict[str, Tree]:
    """With --speculate auto, the tree each calibrated sampling setting (`calibrate --sampling`)
    chose, by `Sampling.label`: a step whose rows all share that setting runs it instead of the
    base tree (`Scheduler`). None for a setting calibrated "off" (it keeps the base tree: plain
    steps would leave no drafts to switch back with), nor when the base is plain."""
    if spec != "auto" or base is None or not calib:
        return {}
    n = model.n_future
    out: dict[str, Tree] = {}
    for label, part in (calib.get("sampling") or {}).items():
        mode = static_mode(part)
        if mode == "tree":
            out[label] = Tree(part["tree"], max_depth=n - 1)
        elif mode == "chain":
            out[label] = Tree.chain(min(int(part.get("best_k", n - 1)), n - 1))
    return out


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the scheduler to drain when a signal arrives."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.scheduler.draining = True
        super().handle_exit(sig, frame)


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(prog="multitoken serve", description=(
        "Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics) with continuous batching and "
        "self-speculative decoding inside the batch (docs/serving.md)."))
    p.add_argument("--checkpoint", required=True, help="checkpoint (or run) directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=cliargs.non_negative_int, default=8000,
                   help="port (default 8000; 0 = any free port, printed at start)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=cliargs.positive_int, default=16,
                   help="KV-cache rows: sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=cliargs.non_negative_int, default=64,
                   help="sequences waiting for a row before new requests get 429 (default 64)")
    p.add_argument("--prefill-tokens", type=cliargs.positive_int, default=512,
                   help="prompt tokens prefilled per scheduler iteration; longer prompts are "
                   "prefilled in chunks of this size (default 512)")
    p.add_argument("--speculate", type=speculate_arg, default="auto",
                   help="auto (default: the stored calibration's choice, else a chain of all "
                   "draft heads), off, chain-K, or tree")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight get to finish (default 30)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random stream shared by sampled requests without a seed")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
    cliargs.add_device_argument(p)
    cliargs.add_dtype_argument(p)
    cliargs.add_threads_argument(p)
    return p


def build_state(args: Any) -> ServerState:
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device,
                                       dtype=cliargs.load_dtype(args.dtype))
    model.eval()
    calib = load_calibration(args.checkpoint, model.tok_embeddings.weight.dtype)
    tree, desc = choose_tree(model, args.speculate, calib)
    per_setting = setting_trees(model, args.speculate, tree, calib)
    if per_setting:
        desc += "; when every running request has one setting, its own: " + ", ".join(
            f"{label}: " + (f"chain-{t.depth}" if t.is_chain else "tree")
            for label, t in per_setting.items())
    metrics = Metrics()
    sched = Scheduler(model, tokenizer, tree, max_batch=args.max_batch, max_queue=args.max_queue,
                      prefill_tokens=args.prefill_tokens, metrics=metrics, seed=args.seed,
                      setting_trees=per_setting)
    ckpt = find_checkpoint(args.checkpoint)
    name = args.model_name or Path(args.checkpoint).resolve().name
    chat = ChatTemplate.for_checkpoint(ckpt, tokenizer)
    return ServerState(sched, tokenizer, name, chat, metrics, speculation=desc)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.drain_timeout >= 0:
        raise ConfigError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    state = build_state(args)
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(args.drain_timeout, 0.1),
                            access_log=False)
    sched = state.scheduler
    server = _Server(config, sched)

    # uvicorn takes over SIGINT/SIGTERM while it runs and raises the signal again once it has
    # shut down; these handlers (restored by then) turn that into a clean exit 0.
    def ignore(signum: int, frame: Any) -> None:
        sched.draining = True

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    sched.start()
    print(f"serving {state.model_name} on http://{args.host}:{port}/v1 (speculation: "
          f"{state.speculation}, max batch {args.max_batch}, {sched.device.type})", flush=True)
    server.run(sockets=[sock])
    clean = sched.drain(args.drain_timeout)
    if not clean:
        print("note: the drain timeout cancelled requests in flight", file=sys.stderr)
    print("server stopped", flush=True)
    return 0
