"""Plain decoding: KV cache vs full forward, batching, sampling, stop tokens, bad input, CLI."""

from __future__ import annotations

import io
import itertools
import math
import sys

import pytest
import torch

from helpers_decode import (  # noqa: F401 - one_thread is an autouse fixture
    make_checkpoint,
    one_thread,
    random_model,
    reference_greedy,
    trained_model,
)
from multitoken.decoding.engine import Engine
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, process_logits
from multitoken.errors import MultitokenError

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 0, 1]]


@pytest.mark.parametrize("head_type", ["transformer", "linear", "anticausal"])
def test_cached_greedy_equals_full_forward(head_type):
    model = random_model(head_type)
    res = generate(model, PROMPTS[0], 24)
    assert res.tokens == [reference_greedy(model, PROMPTS[0], 24)]
    assert res.stats.forwards == 23 and res.stats.prefill_forwards == 1
    assert res.stats.tokens_per_forward == 1.0 and res.finish_reasons == ["length"]


def test_batch_of_different_lengths_equals_one_by_one():
    model = random_model()
    batched = generate(model, PROMPTS, 20).tokens
    assert batched == [generate(model, p, 20).tokens[0] for p in PROMPTS]
    assert batched == [reference_greedy(model, p, 20) for p in PROMPTS]


def test_tensor_prompts():
    model = random_model()
    t = torch.tensor([PROMPTS[0], [5, 4, 3, 2, 1]])
    assert generate(model, t, 6).tokens == generate(model, t.tolist(), 6).tokens
    assert generate(model, t[0], 6).tokens == generate(model, PROMPTS[0], 6).tokens


def test_stop_token_is_included_and_ends_only_its_sequence():
    model = trained_model()
    free = generate(model, PROMPTS, 20).tokens
    stop = free[0][4]
    res = generate(model, PROMPTS, 20, stop=[stop])
    for b, seq in enumerate(free):
        if stop in seq:
            cut = seq.index(stop) + 1
            assert res.tokens[b] == seq[:cut] and res.finish_reasons[b] == "stop"
        else:
            assert res.tokens[b] == seq and res.finish_reasons[b] == "length"


def test_stream_receives_every_token_in_order():
    model = random_model()
    got: list[list[int]] = [[] for _ in PROMPTS]

    def stream(fresh):
        for b, toks in enumerate(fresh):
            got[b].extend(toks)

    res = generate(model, PROMPTS, 9, stream=stream)
    assert got == res.tokens


def test_zero_new_tokens():
    res = generate(random_model(), PROMPTS[0], 0)
    assert res.tokens == [[]] and res.stats.forwards == 0 and res.stats.prefill_forwards == 0
    assert res.stats.acceptance == []


@pytest.mark.parametrize("mode", ["off", "chain", "tree"])
def test_context_boundary(mode):
    """The rule: a prompt of L tokens and N new tokens need L + N <= max_seq_len (64 here)."""
    model = random_model()
    assert generate(model, [1] * 64, 0, speculative=mode).tokens == [[]]
    res = generate(model, [1] * 63, 1, speculative=mode)
    assert len(res.tokens[0]) == 1 and res.stats.prefill_forwards == 1
    assert len(generate(model, [1] * 60, 4, speculative=mode).tokens[0]) == 4
    for prompt, n in (([1] * 64, 1), ([1] * 60, 5)):
        with pytest.raises(MultitokenError, match="context of 64"):
            generate(model, prompt, n, speculative=mode)


@pytest.mark.parametrize("mode, drafts", [("chain", 1), ("chain", 3), ("tree", 3), ("tree", 2)])
def test_acceptance_only_for_heads_that_drafted(mode, drafts):
    """acceptance[i] exists only for drafts verified at least once: none when no decode call ran,
    at most num_drafts entries, and none after a head that was never accepted (the next head's
    draft is only verified when the earlier ones were accepted)."""
    for model in (random_model(), trained_model()):
        assert generate(model, PROMPTS[0], 1, speculative=mode,
                        num_drafts=drafts).stats.acceptance == []
        for prompt in PROMPTS:
            acc = generate(model, prompt, 20, speculative=mode, num_drafts=drafts).stats.acceptance
            assert 1 <= len(acc) <= drafts
            assert all(a > 0 for a in acc[:-1]), acc


def test_sampling_is_reproducible_with_a_generator():
    model = random_model()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, 10, temperature=1.0, top_k=5, generator=g).tokens

    assert run(1) == run(1) and run(1) != run(2)


def test_process_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = process_logits(logits, Sampling(1.0))
    assert torch.allclose(p, torch.softmax(logits, -1))
    p = process_logits(logits, Sampling(0.5, top_k=2))
    assert (p[0, 2:] == 0).all()
    assert torch.allclose(p[0, :2], torch.softmax(logits[0, :2] / 0.5, -1))
    full = torch.softmax(logits, -1)[0]
    # top_p: the smallest prefix whose mass reaches top_p (here the first two tokens)
    p = process_logits(logits, Sampling(1.0, top_p=float(full[0] + full[1] - 1e-4)))
    assert (p[0, 2:] == 0).all() and torch.allclose(p[0, :2], full[:2] / full[:2].sum())
    p = process_logits(logits, Sampling(1.0, top_p=1e-6))
    assert p[0, 0] == 1.0


# ---------------------------------------------------------------------------------------------
# Sampling exactness tools (shared with the speculative tests).


def exact_joint(model, prompt, n, s: Sampling) -> dict[tuple[int, ...], float]:
    """P(x_1..x_n) of plain sampling from head 1's processed distribution, by enumeration."""
    V = model.cfg.vocab_size
    conts = list(itertools.product(range(V), repeat=n - 1))
    idx = torch.tensor([prompt + list(c) for c in conts])
    with torch.no_grad():
        logits = model(idx, heads=[0])[0, :, len(prompt) - 1:]  # [V^(n-1), n, V]
    probs = process_logits(logits, s).double()
    out = {}
    for c, pr in zip(conts, probs):
        base = 1.0
        for j, x in enumerate(c):
            base *= float(pr[j, x])
        if base == 0.0:
            continue
        for x, q in enumerate(pr[n - 1].tolist()):
            if q > 0:
                out[tuple(c) + (x,)] = base * q
    return out


def chi_square_pvalue(samples: list[tuple[int, ...]], expected: dict, min_count: float = 5.0):
    """Pearson chi-square goodness of fit; cells with small expectation are pooled.
    p-value from the Wilson-Hilferty normal approximation (no scipy needed)."""
    N = len(samples)
    counts: dict = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if not set(counts) <= set(expected):
        return 0.0, 0  # sampled a sequence of probability 0
    stat, cells, pool_o, pool_e = 0.0, 0, 0, 0.0
    for key, p in expected.items():
        e = N * p
        if e < min_count:
            pool_o, pool_e = pool_o + counts.get(key, 0), pool_e + e
            continue
        stat += (counts.get(key, 0) - e) ** 2 / e
        cells += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        cells += 1
    df = max(cells - 1, 1)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2)), df


def sample_many(model, prompt, n, s: Sampling, mode="off", N=4000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    res = generate(model, [prompt] * N, n, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, speculative=mode, generator=g, **kw)
    return [tuple(t) for t in res.tokens], res.stats


def test_plain_sampling_matches_enumeration():
    model = trained_model()
    s = Sampling(1.5, top_k=6)
    samples, _ = sample_many(model, [3, 5, 7, 9], 3, s)
    p, _ = chi_square_pvalue(samples, exact_joint(model, [3, 5, 7, 9], 3, s))
    assert p > 1e-3


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative="medusa"), "unknown speculative mode"),
    (dict(speculative="chain", num_drafts=4), "num_drafts must be in 1..3"),
    (dict(speculative="chain", num_drafts=0), "num_drafts must be in 1..3"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(MultitokenError, match=message):
        generate(random_model(), PROMPTS[0], 4, **kwargs)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_n_future_1_model_cannot_speculate(mode):
    model = random_model(n_future=1)
    assert len(generate(model, PROMPTS[0], 3).tokens[0]) == 3
    with pytest.raises(MultitokenError, match="n_future=1"):
        generate(model, PROMPTS[0], 3, speculative=mode)


def test_bad_prompts():
    model = random_model()  # max_seq_len 64
    with pytest.raises(MultitokenError, match="empty prompt"):
        generate(model, [], 4)
    with pytest.raises(MultitokenError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(MultitokenError, match="64 tokens, which fill the model's context of 64 "
                       "positions: no room for new tokens"):
        generate(model, [1] * 64, 1)
    with pytest.raises(MultitokenError, match="65 tokens, more than the model's context of 64"):
        generate(model, [1] * 65, 0)
    with pytest.raises(MultitokenError, match="exceeds the model's context of 64; at most 14"):
        generate(model, [1] * 50, 15)
    with pytest.raises(MultitokenError, match="outside the vocabulary"):
        generate(model, [1, 99], 2)
    with pytest.raises(MultitokenError, match="max_new_tokens"):
        generate(model, [1, 2], -1)
    # exactly filling the context is fine, in every mode
    for mode in ("off", "chain", "tree"):
        assert len(generate(model, [1] * 50, 14, speculative=mode).tokens[0]) == 14


# ---------------------------------------------------------------------------------------------
# Command line.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("decode_ck"))


def test_cli_generate_streams_text_and_stats(checkpoint, capsys):
    from multitoken.commands.generate import main

    assert main(["--checkpoint", str(checkpoint), "--prompt", "def f(x):", "--max-new-tokens",
                 "12", "--speculative", "chain", "--no-stop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and "tokens/forward" in out and "12 tokens" in out


def test_cli_generate_errors_are_multitoken_errors(checkpoint, capsys):
    from multitoken.commands.generate import main

    with pytest.raises(MultitokenError, match="num_drafts"):
        main(["--checkpoint", str(checkpoint), "--prompt", "x", "--speculative", "chain",
              "--num-drafts", "9"])
    assert capsys.readouterr().out == ""  # the prompt is not echoed before the error
    with pytest.raises(MultitokenError, match="empty"):
        main(["--checkpoint", str(checkpoint), "--prompt", ""])


def _cli(argv, capsys):
    """multitoken generate ARGV through the command line's error handling: (rc, out, err)."""
    from multitoken.cli import main

    rc = main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prompt_from_file_and_stdin(checkpoint, tmp_path, capsys, monkeypatch):
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--no-stop",
            "--speculative", "off"]
    f = tmp_path / "prompt.txt"
    f.write_text("def f(x):\n")
    rc, out, _ = _cli([*args, "--prompt-file", str(f)], capsys)
    assert rc == 0 and out.startswith("def f(x):\n")
    expected = out
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):\n"))
    rc, out, _ = _cli([*args, "--prompt", "-"], capsys)
    assert rc == 0 and out == expected.replace(_stats_line(expected), _stats_line(out))
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):\n"))  # piped, no --prompt
    rc, out, _ = _cli(args, capsys)
    assert rc == 0 and out.startswith("def f(x):\n")


def _stats_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("[plain"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_no_prompt_at_a_terminal_is_an_error(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Terminal())
    rc, out, err = _cli(["--checkpoint", str(checkpoint)], capsys)
    assert rc == 2 and err.startswith("error: no prompt: give --prompt") and out == ""
    assert err.count("\n") == 1


def test_cli_zero_new_tokens_reports_no_prefill(checkpoint, capsys):
    rc, out, _ = _cli(["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens",
                       "0", "--speculative", "chain"], capsys)
    assert rc == 0 and out.startswith("ab\n")
    assert "0 tokens" in out and "0 forwards + 0 prefill" in out
    assert "acceptance" not in out  # no draft was ever verified


def test_cli_acceptance_lists_only_heads_that_drafted(checkpoint, capsys):
    rc, out, _ = _cli(["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens",
                       "1", "--speculative", "chain"], capsys)
    assert rc == 0 and "acceptance" not in out  # the prefill's token only: no decode call
    rc, out, _ = _cli(["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens",
                       "8", "--speculative", "chain", "--num-drafts", "1", "--no-stop"], capsys)
    line = next(ln for ln in out.splitlines() if ln.startswith("acceptance"))
    assert "head 2:" in line and "head 3" not in line


def test_cli_context_boundary_and_the_lowering_note(checkpoint, capsys):
    """The checkpoint's context is 128 positions; the byte tokenizer makes one token a char."""
    base = ["--checkpoint", str(checkpoint), "--speculative", "off", "--no-stop"]
    rc, out, err = _cli([*base, "--prompt", "a" * 127, "--max-new-tokens", "1"], capsys)
    assert rc == 0 and err == "" and "1 tokens" in out
    rc, out, err = _cli([*base, "--prompt", "a" * 126, "--max-new-tokens", "5"], capsys)
    assert rc == 0 and err == "note: max-new-tokens lowered to 2 to fit the model's context\n"
    rc, out, err = _cli([*base, "--prompt", "a" * 128, "--max-new-tokens", "1"], capsys)
    assert rc == 2 and out == "" and err.startswith("error: prompt has 128 tokens, which fill")
    rc, out, err = _cli([*base, "--prompt", "a" * 128, "--max-new-tokens", "0"], capsys)
    assert rc == 0 and "0 tokens" in out


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--speculative", "chain",
                                                           "--num-drafts", "9"],
                                  ["--top-p", "2"], ["--device", "bogus"]])
def test_cli_validates_before_the_lowering_note(checkpoint, capsys, bad):
    # the default --max-new-tokens (256) does not fit after this prompt: it would be lowered
    rc, out, err = _cli(["--checkpoint", str(checkpoint), "--prompt", "def ", *bad], capsys)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Decoding uses the model's current weights, however they were changed.


def _copy_data(model, new):
    for name, p in model.named_parameters():
        p.data.copy_(new[name])  # how EMA / weight averaging write weights: no version bump


def _ema(model, new):
    for name, p in model.named_parameters():
        p.data.mul_(0.5).add_(new[name], alpha=0.5)


def _optimizer_step(model, new):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for name, p in model.named_parameters():
        p.grad = p.detach() - new[name]
    opt.step()


def _to(model, new):
    model.to(torch.float64)  # new storages; decoding now runs in float64


WEIGHT_CHANGES = {"p.data.copy_": _copy_data, "ema": _ema,
                  "load_state_dict": lambda m, new: m.load_state_dict(new),
                  "optimizer step": _optimizer_step, ".to()": _to}


@pytest.mark.parametrize("change", list(WEIGHT_CHANGES))
@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_decoding_follows_weight_changes(change, head_type):
    """Decode, change the weights, decode again: the output is that of a freshly built model
    holding the new weights, in every mode (nothing decodes with a stale copy of a layer).
    (`.to()` changes no value that greedy tokens would show, only the storage and dtype.)"""
    model = random_model(head_type)
    new = random_model(head_type, seed=1).state_dict()
    modes = [dict(speculative="off"), dict(speculative="chain"),
             dict(speculative="tree", tree=[(0,), (1,), (0, 0), (0, 0, 0)])]
    before = [generate(model, PROMPTS, 12, **m).tokens for m in modes]
    WEIGHT_CHANGES[change](model, new)
    fresh = random_model(head_type, seed=2).to(model.tok_embeddings.weight.dtype)
    fresh.load_state_dict(model.state_dict())
    after = [generate(fresh, PROMPTS, 12, **m).tokens for m in modes]
    assert after != before or change == ".to()"  # the change is visible in the output
    assert [generate(model, PROMPTS, 12, **m).tokens for m in modes] == after


def test_layouts_are_reused_only_while_the_weights_are_bitwise_unchanged():
    model = random_model()
    first = Engine(model, 4).layers
    assert Engine(model, 4).layers is first  # unchanged weights: laid out once
    w = model.heads[2].feed_forward.w2.weight  # a draft head's weight
    w.data[0, 0] = 0.0
    zero = Engine(model, 4).layers
    assert zero is not first and Engine(model, 4).layers is zero
    w.data[0, 0] = -0.0  # equal as numbers, another bit pattern: a change
    assert Engine(model, 4).layers is not zero
