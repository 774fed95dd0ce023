"""--dtype of the commands that decode or score with a checkpoint (generate, calibrate, eval,
eval-code, bench decode): the model each command runs is in the dtype asked for; the default,
auto, is the dtype the weights are stored in (fp32 for models trained here, so their commands
behave as before); decoding in bf16 works end to end, speculative greedy equal to plain greedy
token for token; a bad value is one error line."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    trained_model,
)
from multitoken import cliargs, codeeval, train
from multitoken.bench import decode as bench_decode
from multitoken.checkpoint import load_checkpoint, read_config, save_checkpoint
from multitoken.cli import main
from multitoken.commands import calibrate as calibrate_command
from multitoken.commands import generate as generate_command
from multitoken.config import ModelConfig
from multitoken.decoding.generate import generate
from multitoken.errors import ConfigError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer

# Each command, tiny, and the function it hands its model to (module, name): the spy there sees
# the model the command actually runs, not just what was loaded.
COMMANDS: dict[str, tuple[list[str], Any, str]] = {
    "generate": (["generate", "--checkpoint", "{ck}", "--prompt", "def ", "--max-new-tokens",
                  "4", "--speculative", "chain"], generate_command, "generate"),
    "calibrate": (["calibrate", "--checkpoint", "{ck}", "--prompts", "1", "--prompt-len", "8",
                   "--gen-len", "4", "--max-nodes", "2", "--reps", "1"],
                  calibrate_command, "calibrate"),
    "eval": (["eval", "--checkpoint", "{ck}", "--seq-len", "16", "--batches", "1",
              "--batch-size", "1"], train, "evaluate"),
    "eval-code": (["eval-code", "--checkpoint", "{ck}", "--samples", "1", "--problems", "1",
                   "--max-new-tokens", "2", "--timeout", "5", "--no-progress"],
                  codeeval, "sample_completions"),
    "bench decode": (["bench", "decode", "--checkpoint", "{ck}", "--prompts", "1",
                      "--prompt-len", "8", "--new-tokens", "2", "--reps", "1", "--no-tree"],
                     bench_decode, "time_forwards"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same random byte-level model (with a corpus for its validation split) stored in
    fp32, as trained here, and in bf16, as `convert --dtype auto` writes a bf16 release."""
    root = tmp_path_factory.mktemp("dtype")
    fp32 = make_checkpoint(root)
    model, tok = load_checkpoint(fp32)
    bf16 = save_checkpoint(root / "ck-bf16", model.to(torch.bfloat16), tok,
                           run_config=read_config(fp32)["run"], step=1)
    return {"float32": fp32, "bfloat16": bf16}


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[set[torch.dtype]]:
    """Wrap module.name (called with the model first); returns the list of the parameter dtypes
    of the models it was called with."""
    seen: list[set[torch.dtype]] = []
    real: Callable[..., Any] = getattr(module, name)

    @functools.wraps(real)
    def spy(model: MultiTokenModel, *args: Any, **kwargs: Any) -> Any:
        seen.append({p.dtype for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("stored, flag, want", [
    # the default, auto, on a model trained here: as before
    pytest.param("float32", [], torch.float32, id="fp32-default"),
    pytest.param("float32", ["--dtype", "auto"], torch.float32, id="fp32-auto"),
    # a bf16 release is not widened to fp32
    pytest.param("bfloat16", [], torch.bfloat16, id="bf16-default"),
    pytest.param("float32", ["--dtype", "bfloat16"], torch.bfloat16, id="fp32-as-bf16"),
    pytest.param("bfloat16", ["--dtype", "float32"], torch.float32, id="bf16-as-fp32"),
])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_runs_its_model_in_the_dtype_asked_for(
        command: str, stored: str, flag: list[str], want: torch.dtype,
        checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv, module, name = COMMANDS[command]
    seen = _spy(monkeypatch, module, name)
    argv = [a.format(ck=checkpoints[stored]) for a in argv] + flag
    assert main(argv) == 0, capsys.readouterr().err
    assert seen and all(dtypes == {want} for dtypes in seen), seen


def test_generate_runs_in_float16(checkpoints: dict[str, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, generate_command, "generate")
    assert main(["generate", "--checkpoint", str(checkpoints["float32"]), "--prompt", "def ",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--speculative", "tree",
                 "--seed", "0", "--dtype", "float16"]) == 0
    assert seen == [{torch.float16}]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("bad", ["bf16", "fp32", "float64", ""])
def test_bad_dtype_is_one_error_line_and_exit_2(command: str, bad: str,
                                                checkpoints: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(ck=checkpoints["float32"]) for a in COMMANDS[command][0]]
    assert main([*argv, "--dtype", bad]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --dtype: invalid choice")
    assert "bfloat16" in lines[0] and "Traceback" not in out + err


def test_load_dtype() -> None:
    assert cliargs.load_dtype("auto") == "auto"
    assert [cliargs.load_dtype(n) for n in cliargs.DTYPES[1:]] == [
        torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ConfigError, match="unknown dtype 'float64'"):
        cliargs.load_dtype("float64")


# ---------------------------------------------------------------------------------------------
# Decoding in bf16, end to end: speculative greedy is plain greedy, token for token.

TEXT = "def f(x):\n    return x + 1\n"  # the pattern the tiny model below learns


@pytest.fixture(scope="module")
def trained_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level model trained briefly on TEXT repeated (so its draft heads are accepted
    often), stored in bf16."""
    tok = ByteTokenizer()
    data = torch.tensor(tok.encode(TEXT * 40))
    torch.manual_seed(0)
    model = MultiTokenModel(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=5,
                                        n_heads=4, n_future=4, max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(1)
    n, T = model.n_future, 64  # windows as long as what is decoded below
    for _ in range(120):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=g)
        idx = torch.stack([data[s:s + T] for s in starts])
        logits = model(idx)  # [n, B, T, V]
        loss = sum(F.cross_entropy(logits[i, :, :T - i - 1].reshape(-1, tok.vocab_size),
                                   idx[:, i + 1:].reshape(-1)) for i in range(n))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(tmp_path_factory.mktemp("trained") / "ck",
                           model.eval().to(torch.bfloat16), tok, step=120)


def _generate(ck: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, str]:
    """(text, stats) of `multitoken generate` on ck at its stored dtype (auto)."""
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "def f(x):\n    ret",
                 "--max-new-tokens", "48", "--no-stop", *extra]) == 0
    text, _, stats = capsys.readouterr().out.partition("\n\n[")
    return text, stats


def test_bf16_speculative_greedy_is_plain_greedy_from_the_cli(
        trained_bf16: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, generate_command, "generate")
    plain, stats = _generate(trained_bf16, capsys, "--speculative", "off")
    assert stats.startswith("plain") and "return x + 1" in plain  # it learned the pattern
    for mode in ("chain", "tree"):
        text, stats = _generate(trained_bf16, capsys, "--speculative", mode)
        assert text == plain, mode
        per_forward = float(re.search(r"([\d.]+) tokens/forward", stats).group(1))
        assert per_forward > 1.5, stats  # drafts were accepted: the comparison means something
    assert seen == [{torch.bfloat16}] * 3


@pytest.mark.parametrize("head_type", ["transformer", "causal"])  # stacked heads; head modules
def test_bf16_speculative_greedy_is_plain_greedy(head_type: str) -> None:
    model = copy.deepcopy(trained_model(head_type)).to(torch.bfloat16)  # the cached one stays
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6]]
    plain = generate(model, prompts, 40, speculative="off")
    for mode in ("chain", "tree"):
        res = generate(model, prompts, 40, speculative=mode)
        assert res.tokens == plain.tokens, mode
        assert res.stats.tokens_per_forward > 1.5, res.stats


def test_bf16_speculative_sampling_runs(trained_bf16: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Sampling in bf16: probabilities are computed in fp32 from the bf16 logits (no NaN, no
    zero-mass rows), and the same seed gives the same text."""
    runs = [_generate(trained_bf16, capsys, "--speculative", "chain", "--temperature", "0.8",
                      "--top-p", "0.95", "--seed", "3") for _ in range(2)]
    assert runs[0][0] == runs[1][0]  # the text; the stats line has timings
    assert len(runs[0][0]) > len("def f(x):\n    ret")


def test_bf16_eval_matches_fp32_closely(checkpoints: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Scoring in bf16 gives nearly the fp32 losses (the cross-entropy itself is fp32)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["eval", "--checkpoint", str(checkpoints["float32"]), "--seq-len", "32",
                     "--batches", "2", "--batch-size", "2", "--dtype", dtype]) == 0
        losses[dtype] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["head_loss"]
    assert losses["float32"] != losses["bfloat16"]  # it did run in another dtype
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
