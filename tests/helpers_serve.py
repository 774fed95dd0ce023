"""The serve tests' tiny checkpoint and an in-process server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import uvicorn

from multitoken.checkpoint import save_checkpoint
from multitoken.config import ModelConfig
from multitoken.model import MultiTokenModel
from multitoken.serve.api import ServerState, create_app
from multitoken.tokenizer import ByteTokenizer

CONTEXT = 128


def tiny_checkpoint(path: Path, n_future: int = 3, seed: int = 0, **kw) -> Path:
    """A random byte-level model (3 layers: a trunk layer and 2 heads; dim 32) saved by the project's checkpoint code."""
    cfg = dict(vocab_size=260, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, n_future=n_future,
               max_seq_len=CONTEXT)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = MultiTokenModel(ModelConfig(**cfg)).eval()
    save_checkpoint(path, model, ByteTokenizer(), step=1)
    return path


def server_args(checkpoint: Path, **kw) -> SimpleNamespace:
    """The namespace `commands.serve.build_state` reads (the CLI's defaults)."""
    args = dict(checkpoint=str(checkpoint), model_name="tiny", max_batch=8, max_queue=16,
                prefill_tokens=512, speculate="auto", seed=0, device="cpu", dtype="auto",
                threads=1)
    args.update(kw)
    return SimpleNamespace(**args)


class RunningServer:
    """uvicorn in a thread (no signal handlers: not the main thread) on 127.0.0.1:<free>."""

    def __init__(self, state: ServerState, start_scheduler: bool = True) -> None:
        self.state = state
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(create_app(state), log_level="error", access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        if start_scheduler:
            state.scheduler.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.scheduler.drain(5)
