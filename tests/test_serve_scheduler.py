"""The continuous-batching scheduler without HTTP: exactness against `generate()` (plain, chain,
tree; parallel and token-conditioned heads; greedy and seeded sampling), chunked prefill, rows
joining and leaving, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from helpers_decode import one_thread, random_model, trained_model  # noqa: F401 - fixture
from multitoken.commands.serve import choose_tree, setting_trees
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.tree import Tree, default_tree
from multitoken.errors import ConfigError
from multitoken.serve.scheduler import Event, QueueFull, Scheduler, Sequence
from multitoken.tokenizer import ByteTokenizer

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3, 4, 5], list(range(16)) + list(range(12))]
TREES = {"off": None, "chain": Tree.chain(3), "tree": Tree(default_tree(3))}
TC = "token_conditioned"
# (head type, tree) per fixture id: token-conditioned heads draft in decoding.conditioned
SERVED = {**{k: ("transformer", t) for k, t in TREES.items()},
          "tc-chain": (TC, Tree.chain(3)), "tc-tree": (TC, Tree(default_tree(3)))}


def run(sched: Scheduler, seqs: list[Sequence], timeout: float = 30) -> list[list[int]]:
    """Submit sequences together and wait for all of them; their tokens."""
    done = {s.id: threading.Event() for s in seqs}

    def sink_for(s: Sequence):
        return lambda e: done[s.id].set() if e.finish_reason else None

    for s in seqs:
        s.sink = sink_for(s)
    sched.submit(seqs)
    for e in done.values():
        assert e.wait(timeout)
    return [s.tokens for s in seqs]


def reference(model, tree, prompt, n, **kw):
    mode = "off" if tree is None else "chain" if tree.is_chain else "tree"
    return generate(model, prompt, n, speculative=mode,
                    tree=None if tree is None else tree.paths, **kw).tokens[0]


@pytest.fixture(params=list(SERVED))
def served(request):
    head_type, tree = SERVED[request.param]
    model = trained_model(head_type, vocab=16)
    # prefill_tokens=16: the third prompt (28 tokens) is prefilled in two chunks
    sched = Scheduler(model, ByteTokenizer(), tree, max_batch=4, max_queue=16,
                      prefill_tokens=16)
    sched.start()
    yield model, tree, sched
    assert sched.drain(10)


def test_alone_equals_generate(served):
    model, tree, sched = served
    for p in PROMPTS:
        assert run(sched, [Sequence(p, 30, Sampling())])[0] == reference(model, tree, p, 30)
        g = torch.Generator().manual_seed(5)
        s = Sampling(0.9, 8, 0.95)
        want = reference(model, tree, p, 30, temperature=0.9, top_k=8, top_p=0.95, generator=g)
        assert run(sched, [Sequence(p, 30, s, seed=5)])[0] == want


def test_batch_with_mixed_settings(served):
    """Greedy rows next to sampled ones (seeded and not), rows of different lengths leaving at
    different steps: greedy rows equal their solo output, seeded rows their solo draws."""
    model, tree, sched = served
    solo = [run(sched, [Sequence(p, 8 + 9 * i, Sampling())])[0] for i, p in enumerate(PROMPTS)]
    seeded = run(sched, [Sequence([5, 6], 25, Sampling(1.0), seed=3)])[0]
    seqs = [Sequence(p, 8 + 9 * i, Sampling()) for i, p in enumerate(PROMPTS)]
    seqs += [Sequence([5, 6], 25, Sampling(1.0), seed=3), Sequence([1], 30, Sampling(0.7))]
    out = run(sched, seqs)
    equal = sum(a == b for a, b in zip(out[:3], solo))
    assert equal >= 2, (out[:3], solo)  # near-identical: rounding may differ with the batch
    assert out[3] == seeded
    assert [len(o) for o in out] == [8, 17, 26, 25, 30]


def test_more_sequences_than_rows_and_stop_tokens(served):
    model, tree, sched = served
    free = reference(model, tree, PROMPTS[0], 20)
    stop = free[6]
    seqs = [Sequence(PROMPTS[0], 20, Sampling(), stop_ids=frozenset([stop])) for _ in range(9)]
    out = run(sched, seqs)
    cut = free.index(stop) + 1
    assert all(o == free[:cut] for o in out)
    assert all(s.finish_reason == "stop" for s in seqs)


@pytest.mark.parametrize("head_type", ["transformer", TC])
def test_acceptance_metrics(head_type):
    model = trained_model(head_type, vocab=16)
    sched = Scheduler(model, ByteTokenizer(), Tree.chain(3), max_batch=2)
    sched.start()
    run(sched, [Sequence(PROMPTS[0], 40, Sampling())])
    assert sched.drain(5)
    m = sched.metrics
    tokens, rows = m.step_tokens._value.get(), m.row_steps._value.get()
    assert tokens / rows > 1.5  # the trained heads' drafts are accepted often
    assert m.draft_accepted.labels("1")._value.get() > 0


def test_cancel_frees_the_row_before_the_next_step():
    model = random_model(vocab_size=260, max_seq_len=128)
    sched = Scheduler(model, ByteTokenizer(), Tree.chain(3), max_batch=2)
    events: list[Event] = []
    first = threading.Event()
    s = Sequence([1, 2, 3], 120, Sampling(0.8), seed=0,
                 sink=lambda e: (events.append(e), first.set()))
    sched.start()
    sched.submit([s])
    assert first.wait(10)
    s.cancel()
    assert sched.drain(5)
    assert events[-1].finish_reason == "cancelled" and len(s.tokens) < 120
    assert not sched.running


def test_queue_bound():
    sched = Scheduler(random_model(), ByteTokenizer(), None, max_batch=1, max_queue=2)
    sched.submit([Sequence([1], 2, Sampling()), Sequence([1], 2, Sampling())])
    sched.submit([Sequence([1], 2, Sampling())])  # one row is free: 3 = 2 queued + 1 row
    with pytest.raises(QueueFull):
        sched.submit([Sequence([1], 2, Sampling())])


def test_choose_tree():
    m4 = random_model()
    assert choose_tree(m4, "auto", None)[0].paths == Tree.chain(3).paths
    assert choose_tree(m4, "off", None)[0] is None
    assert choose_tree(m4, "chain-2", None)[0].paths == Tree.chain(2).paths
    cal = {"best_mode": "tree", "best_k": 2, "tree": [[0], [1], [0, 0]]}
    assert choose_tree(m4, "auto", cal)[0].paths == [(0,), (0, 0), (1,)]
    assert choose_tree(m4, "auto", {**cal, "best_mode": "chain"})[0].paths == Tree.chain(2).paths
    with pytest.raises(ConfigError, match="3 draft heads"):
        choose_tree(m4, "chain-4", None)
    one = random_model(n_future=1, n_layers=2)
    assert choose_tree(one, "auto", None)[0] is None
    with pytest.raises(ConfigError, match="n_future=1"):
        choose_tree(one, "chain-1", None)
    tc = random_model(TC)  # served speculatively like the other head types
    assert choose_tree(tc, "auto", None)[0].paths == Tree.chain(3).paths
    assert choose_tree(tc, "tree", None)[0].paths == Tree(default_tree(3)).paths
    assert choose_tree(tc, "chain-1", None)[0].paths == Tree.chain(1).paths
    # a calibrated dynamic tree (generate runs those): the server runs the best static one
    dyn = {"best_mode": "dynamic", "dynamic": "2x2", "static_mode": "tree", "best_k": 2,
           "tree": [[0], [1], [0, 0]]}
    assert choose_tree(tc, "auto", dyn)[0].paths == [(0,), (0, 0), (1,)]
    assert choose_tree(tc, "auto", {**dyn, "static_mode": "chain"})[0].paths == \
        Tree.chain(2).paths
    assert setting_trees(tc, "auto", Tree.chain(3), {"sampling": {"T=1": dyn}})["T=1"].paths \
        == [(0,), (0, 0), (1,)]


def test_a_failing_step_fails_its_sequences_and_the_loop_goes_on():
    model = random_model()
    sched = Scheduler(model, ByteTokenizer(), Tree.chain(2), max_batch=2)
    real = sched.decoder.step
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    sched.decoder.step = flaky
    sched.start()
    events: list[Event] = []
    done = threading.Event()
    s = Sequence([1, 2, 3], 10, Sampling(), sink=lambda e: (events.append(e),
                                                            e.finish_reason and done.set()))
    sched.submit([s])
    assert done.wait(10)
    assert events[-1].finish_reason == "error" and "boom" in events[-1].error
    assert run(sched, [Sequence([1, 2, 3], 10, Sampling())])[0] == reference(
        model, Tree.chain(2), [1, 2, 3], 10)
    assert sched.drain(5)


@pytest.mark.parametrize("head_type", ["transformer", TC])
def test_per_setting_tree_alone_and_mixed(head_type):
    """A setting with its own calibrated tree runs it when its rows are alone (== generate()
    with that tree, seeded draws included); a mixed batch runs the base tree, and rows whose
    drafts were made for the other tree draft again (greedy rows still near-identical).
    Token-conditioned heads: the base chain is 1 deep, the setting's tree 3 deep, so steps
    of the chain keep heads 2-3's caches exact for the tree's steps."""
    model = trained_model(head_type, vocab=16)
    s = Sampling(0.9, 8, 0.95)
    own = Tree(default_tree(3))
    sched = Scheduler(model, ByteTokenizer(), Tree.chain(1), max_batch=4,
                      setting_trees={s.label: own})
    used: list[int] = []
    real = sched.decoder.step
    sched.decoder.step = lambda n, pos, groups, ti=0: (used.append(ti), real(n, pos, groups,
                                                                              ti))[1]
    sched.start()
    try:
        g = torch.Generator().manual_seed(5)
        want = reference(model, own, PROMPTS[0], 30, temperature=0.9, top_k=8, top_p=0.95,
                         generator=g)
        assert run(sched, [Sequence(PROMPTS[0], 30, s, seed=5)])[0] == want
        assert set(used) == {1}
        solo = [reference(model, Tree.chain(1), p, 20) for p in PROMPTS]
        assert run(sched, [Sequence(PROMPTS[0], 20, Sampling())])[0] == solo[0]
        assert set(used[-1:]) == {0}
        used.clear()
        # the sampled row starts alone (its tree), then greedy rows join (the base tree)
        first = threading.Event()
        long = Sequence([1, 2, 3], 60, s, seed=1, sink=lambda e: first.set())
        sched.submit([long])
        assert first.wait(10)
        out = run(sched, [Sequence(p, 20, Sampling()) for p in PROMPTS])
        assert sum(o == w for o, w in zip(out, solo)) >= 2, (out, solo)
        tick = threading.Event()  # never set: a sleep
        while long.finish_reason is None:
            tick.wait(0.02)
        assert len(long.tokens) == 60 and 0 in used
    finally:
        assert sched.drain(10)


def test_setting_trees():
    m4 = random_model()
    cal = {"best_mode": "chain", "best_k": 2, "tree": [[0], [0, 0]], "sampling": {
        "T=0.8": {"best_mode": "tree", "best_k": 3, "tree": [[0], [1], [0, 0]]},
        "T=1": {"best_mode": "chain", "best_k": 9, "tree": [[0]]},
        "T=0.5": {"best_mode": "off", "best_k": 1, "tree": [[0]]}}}
    base = choose_tree(m4, "auto", cal)[0]
    got = setting_trees(m4, "auto", base, cal)
    assert got["T=0.8"].paths == [(0,), (0, 0), (1,)]
    assert got["T=1"].paths == Tree.chain(3).paths  # capped at the model's draft heads
    assert "T=0.5" not in got  # "off": the base tree serves it
    assert setting_trees(m4, "chain-2", base, cal) == {}
    assert setting_trees(m4, "auto", None, cal) == {}
