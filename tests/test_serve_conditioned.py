"""Token-conditioned heads in the server, step by step: greedy output equals plain decoding
whatever the drafts are, so these tests compare the drafts themselves: through how many of them
each step accepted, with `generate()`'s (solo, chunked prefill, seeded sampling) and with solo
runs; and, in a batch whose rows join, leave and move, every row's drafts (or q) after every
step with a full uncached forward over its tokens (the drafter's per-row state is exact)."""

from __future__ import annotations

import threading

import pytest
import torch

from helpers_decode import one_thread, trained_model  # noqa: F401 - fixture
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampling, process_logits
from multitoken.decoding.tree import Tree, default_tree
from multitoken.serve.rows import Group, RowDecoder
from multitoken.serve.scheduler import Scheduler, Sequence
from multitoken.tokenizer import ByteTokenizer
from test_serve_scheduler import PROMPTS, run

TC = "token_conditioned"
TREES = {"chain": Tree.chain(3), "tree": Tree(default_tree(3))}


def wrong_drafts(model, tree: Tree, seq: list[int], nodes: list[int], s: Sampling,
                 q: torch.Tensor | None) -> list[int]:
    """The drafts nodes (tree order) of a sequence whose last token is the root, against a full
    forward of head d+2 at the draft position over seq and v's path, for every node v with
    children (depth d): greedy, v's child of rank r must be its rank r (clear ranks only);
    sampling, q[v's group] its processed distribution. Returns the wrong nodes / groups."""
    t = tree.tensors(torch.device("cpu"))
    nodes = [-1, *nodes]  # node 0: the root
    wrong = []
    for grp, v in enumerate(t["group_node"].tolist()):
        path = [nodes[j] for j in t["path_nodes"][v, :t["depth"][v]].tolist()]
        logits = model(torch.tensor([seq + path]))[len(path) + 1, 0, len(seq) - 2]
        if not s.greedy:
            assert q is not None
            want = process_logits(logits[None].float(), s)[0]
            if not torch.allclose(q[grp], want, rtol=0, atol=2e-5):
                wrong.append(v)
            continue
        for c in t["group_children"][grp].tolist():
            if c < 0:
                continue
            r = tree.paths[c - 1][-1]
            top = logits.topk(r + 2)
            clear = top.values[r] - top.values[r + 1] > 1e-4 and (
                r == 0 or top.values[r - 1] - top.values[r] > 1e-4)
            if clear and nodes[c] != int(top.indices[r]):
                wrong.append(c)
    return wrong


def recording(sched: Scheduler, check: list | None = None) -> dict[int, list[int]]:
    """Per sequence id: the tokens each decode step gave it (accepted drafts + 1). With
    `check`, the drafts every step verifies (made by the prefill, the step before, or again
    for the step's tree) are compared with a full forward (`wrong_drafts`) for every row;
    mismatches are appended to it."""
    steps: dict[int, list[int]] = {}
    real = sched.decoder.step
    dec = sched.decoder

    def step(n, pos, groups, ti=0):
        seqs = list(sched.running)  # row r holds running[r] during the step
        if check is not None:
            dec._redraft(n, groups, ti)  # what the step does first (then: nothing to redo)
            tree = dec.trees[ti]
            for r, s in enumerate(seqs):
                seq = s.prompt + s.tokens  # the last one: the root
                bad = wrong_drafts(sched.model, tree, seq, dec.drafts[r, :tree.size].tolist(),
                                   s.sampling, None if dec.q is None else dec.q[r])
                if bad:
                    check.append((s.id, len(seq), ti, bad))
        res = real(n, pos, groups, ti)
        for s, toks in zip(seqs, res.tokens):
            steps.setdefault(s.id, []).append(len(toks))
        return res

    sched.decoder.step = step
    return steps


def generate_steps(model, tree: Tree, prompt: list[int], n: int, **kw) -> list[int]:
    got: list[int] = []
    generate(model, prompt, n, speculative="chain" if tree.is_chain else "tree",
             tree=tree.paths, on_step=lambda s: got.append(int(s.n[0]) + 1), **kw)
    return got


@pytest.mark.parametrize("name", list(TREES))
def test_alone_same_drafts_as_generate(name):
    """Every step accepts what generate()'s step accepts: the drafts are the same, after a
    batched prefill or a chunked one (the third prompt: two chunks), greedy or seeded."""
    model, tree = trained_model(TC, vocab=16), TREES[name]
    sched = Scheduler(model, ByteTokenizer(), tree, max_batch=3, prefill_tokens=16)
    steps = recording(sched)
    sched.start()
    try:
        for p in PROMPTS:
            s = Sequence(p, 30, Sampling())
            run(sched, [s])
            assert steps[s.id] == generate_steps(model, tree, p, 30)
            assert max(steps[s.id]) > 1
            s = Sequence(p, 30, Sampling(0.9, 8, 0.95), seed=7)
            run(sched, [s])
            g = torch.Generator().manual_seed(7)
            assert steps[s.id] == generate_steps(model, tree, p, 30, temperature=0.9, top_k=8,
                                                 top_p=0.95, generator=g)
    finally:
        assert sched.drain(10)


@pytest.mark.parametrize("name", list(TREES))
def test_batch_rows_keep_their_drafts(name):
    """More sequences than rows, of different lengths and settings: rows join (prefilled
    beside running ones), leave and move into freed rows with their drafter state, and the
    drafts every step verifies are exact for every row. Per-setting trees: the first row's
    setting has a 1-deep chain, run while it is alone, greedy a 2-deep one, run once only
    greedy rows are left, so rows (moved ones too) draft again for another tree; the steps
    of mixed batches run the base tree."""
    model, tree = trained_model(TC, vocab=16), TREES[name]
    own = Sampling(0.8)
    sched = Scheduler(model, ByteTokenizer(), tree, max_batch=3, prefill_tokens=64,
                      setting_trees={own.label: Tree.chain(1),
                                     Sampling().label: Tree.chain(2)})
    wrong: list = []
    recording(sched, wrong)
    sched.start()
    try:
        lengths = [9, 30, 14, 22, 5, 26]
        prompts = [PROMPTS[i % 3][: 4 + 3 * i] for i in range(6)]
        used: set[int] = set()
        real = sched.decoder.step
        sched.decoder.step = lambda n, pos, groups, ti=0: (used.add(ti), real(n, pos, groups,
                                                                              ti))[1]
        seqs = [Sequence(p, n, Sampling()) for p, n in zip(prompts, lengths)]
        seqs.insert(2, Sequence([5, 6], 25, Sampling(1.0), seed=3))
        first = threading.Event()
        long = Sequence([1, 2, 3], 40, own, sink=lambda e: first.set())
        sched.submit([long])  # running (unseeded, sampled) before the others arrive
        assert first.wait(10)
        out = run(sched, seqs)
        assert [len(o) for o in out] == [9, 30, 25, 14, 22, 5, 26]
        assert not wrong
        assert used == {0, 1, 2}
    finally:
        assert sched.drain(10)


@pytest.mark.parametrize("s", [Sampling(0.0), Sampling(1.0)], ids=["greedy", "sampled"])
def test_moved_rows_draft_again_exactly(s):
    """RowDecoder alone: a row moved into a freed one keeps its drafter state (cache, carry,
    draft position), and drafts again exactly for trees of other depths (the base 3-deep
    chain keeps every head exact, so the 1-deep chain's steps leave heads 2-3 complete for
    the tree's); sampled: the draft distributions q against the full forward (strict)."""
    model = trained_model(TC, vocab=16)
    dec = RowDecoder(model, Tree.chain(3), 4, (Tree(default_tree(3)), Tree.chain(1)))
    gen = torch.Generator().manual_seed(0)
    seqs = [[1, 2, 3, 4, 5], [6, 7], [3, 4, 5, 6, 7, 8, 9]]
    wrong: list = []

    def check(n: int, ti: int) -> None:
        tree = dec.trees[ti]
        for r in range(n):
            bad = wrong_drafts(model, tree, seqs[r], dec.drafts[r, :tree.size].tolist(), s,
                               None if dec.q is None else dec.q[r])
            if bad:
                wrong.append((r, len(seqs[r]), ti, bad))

    def step(n: int, ti: int) -> None:
        res = dec.step(n, [len(q) - 1 for q in seqs[:n]], [Group(list(range(n)), s, gen)], ti)
        for q, toks in zip(seqs, res.tokens):
            q.extend(toks)
        check(n, ti)

    with torch.inference_mode():
        T = max(map(len, seqs))
        idx = torch.tensor([q + [0] * (T - len(q)) for q in seqs])
        last = torch.tensor([len(q) - 1 for q in seqs])
        for q, t in zip(seqs, dec.prefill(0, idx, 0, last, [Group([0, 1, 2], s, gen)])):
            q.append(t)
        check(3, 0)
        for _ in range(3):
            step(3, 0)
        dec.move(2, 0)  # row 0 leaves, the last row takes its place
        seqs[0] = seqs.pop()
        for ti in (1, 2, 0, 2):
            dec._redraft(2, [Group([0, 1], s, gen)], ti)
            check(2, ti)
            step(2, ti)
    assert not wrong


@pytest.mark.parametrize("name", list(TREES))
def test_up_to_the_end_of_the_context(name):
    """A request that fills the context (64 positions): the last steps' drafts and the draft
    heads' scratch slots run past it, within the rows' room."""
    model, tree = trained_model(TC, vocab=16), TREES[name]
    sched = Scheduler(model, ByteTokenizer(), tree, max_batch=2)
    sched.start()
    try:
        prompt = [1, 2, 3, 4, 5, 6, 7] * 4
        for p in (prompt, prompt[:-1], prompt[:-2], prompt[:-3], prompt[:-5]):
            n = model.cfg.max_seq_len - len(p)
            want = generate(model, p, n).tokens[0]
            assert run(sched, [Sequence(p, n, Sampling()), Sequence(p, n, Sampling())]) == [
                want, want]
    finally:
        assert sched.drain(10)
