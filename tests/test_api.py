"""The documented public API (`from multitoken import ...`) in any import order.

The decoding code lives in `multitoken.decoding`, so no submodule shares the name of the public
function `multitoken.generate`: importing any module first must not change what the public names
are. Each order runs on a freshly imported package: in a subprocess, with every `multitoken`
module dropped from sys.modules between orders (torch, slow to import, stays loaded).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

ORDERS = [
    "",
    "import multitoken",
    "import multitoken.cli",
    "from multitoken.decoding.generate import generate as g0",
    "from multitoken.decoding.sampling import Sampling",
    "import multitoken.decoding.generate",
    "import multitoken.decoding",
    "import multitoken.decoding.speculate, multitoken.decoding.tree, multitoken.decoding.calibrate",
    "import multitoken.commands.generate, multitoken.commands.calibrate",
    "import multitoken; multitoken.generate; import multitoken.decoding.generate",
    "from multitoken import load_checkpoint; import multitoken.commands.generate",
    "from multitoken import *",
]

CHECK = textwrap.dedent("""
    import importlib, importlib.util, sys, types

    def fresh():
        for name in [m for m in sys.modules if m == "multitoken" or m.startswith("multitoken.")]:
            del sys.modules[name]

    def check(before):
        fresh()
        exec(before, {})
        from multitoken import (ModelConfig, MultiTokenModel, MultitokenError, RunConfig,
                                generate, load_checkpoint, save_checkpoint)
        import multitoken
        module = importlib.import_module("multitoken.decoding.generate")
        assert isinstance(module, types.ModuleType), before
        assert generate is module.generate and multitoken.generate is generate, (before, generate)
        assert importlib.util.find_spec("multitoken.generate") is None  # no module of that name
        assert callable(importlib.import_module("multitoken.commands.generate").main)
        assert load_checkpoint is importlib.import_module("multitoken.checkpoint").load_checkpoint
        assert save_checkpoint is importlib.import_module("multitoken.checkpoint").save_checkpoint
        assert ModelConfig is importlib.import_module("multitoken.config").ModelConfig
        assert RunConfig is importlib.import_module("multitoken.config").RunConfig
        assert MultiTokenModel is importlib.import_module("multitoken.model").MultiTokenModel
        assert issubclass(MultitokenError, Exception)
        assert sorted(multitoken.__all__) == sorted(
            ["ModelConfig", "MultiTokenModel", "MultitokenError", "RunConfig", "generate",
             "load_checkpoint", "save_checkpoint"])

    for before in ORDERS:
        check(before)

    # The README's use: build, save, load, decode.
    fresh()
    import torch
    from multitoken import ModelConfig, MultiTokenModel, generate, load_checkpoint, save_checkpoint
    from multitoken.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = MultiTokenModel(ModelConfig(dim=32, n_layers=3, n_heads=2, n_future=2,
                                        max_seq_len=32)).eval()
    save_checkpoint(sys.argv[1], model, ByteTokenizer())
    loaded, tok = load_checkpoint(sys.argv[1])
    a = generate(loaded, tok.encode("ab"), 5).tokens
    b = generate(loaded, tok.encode("ab"), 5, speculative="chain").tokens
    assert a == b == generate(model, tok.encode("ab"), 5).tokens and len(a[0]) == 5
    print("ok")
""")


def test_public_api_in_any_import_order(tmp_path):
    code = f"ORDERS = {ORDERS!r}\n{CHECK}"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_generate_is_the_function_in_this_process():
    import multitoken
    import multitoken.commands.generate
    import multitoken.decoding.generate  # noqa: F401 - binds submodules of the package
    from multitoken import generate

    assert callable(generate) and generate.__name__ == "generate"
    assert generate is sys.modules["multitoken.decoding.generate"].generate
    assert multitoken.generate is generate
