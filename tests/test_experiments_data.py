"""Data generators and metrics of the induction and polynomial experiments (issue 11)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from multitoken.config import DataConfig, ModelConfig
from multitoken.data import prepare_data
from multitoken.errors import DataError, MultitokenError
from multitoken.experiments import induction as ind
from multitoken.experiments import polynomial as pm
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, make_tokenizer

# ---------------------------------------------------------------------------------------------
# Helpers.


def bigram_model(vocab_size: int, table: dict[int, int], max_seq_len: int = 256) -> MultiTokenModel:
    """A real MultiTokenModel whose head 1 predicts table[current token] (token 0 if unmapped).

    One transformer layer with every weight zero except the norms is the identity map; one-hot
    embeddings and an unembedding with a 1 at [table[u], u] make the logits a bigram lookup.
    """
    dim = vocab_size + vocab_size % 2  # one attention head of even size
    cfg = ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=1, n_heads=1, n_future=1,
                      ffn_hidden=8, max_seq_len=max_seq_len)
    model = MultiTokenModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0 if p.dim() == 1 else 0.0)
        model.tok_embeddings.weight[:, :vocab_size] = torch.eye(vocab_size)
        for u, v in table.items():
            model.output.weight[v, u] = 1.0
    return model


class LookupStub(nn.Module):
    """Head 1 predicts table[token]; only heads=[0] may be asked for (head 1 is what we score)."""

    def __init__(self, table: Sequence[int], max_seq_len: int = 64) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.table = nn.Parameter(torch.tensor(list(table)), requires_grad=False)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, idx: Tensor, heads: Sequence[int] | None = None) -> Tensor:
        assert heads is not None and list(heads) == [0], heads
        self.calls.append(tuple(idx.shape))
        pred = self.table[idx]  # [B, T]
        return nn.functional.one_hot(pred, len(self.table)).float()[None]  # [1, B, T, V]


@pytest.fixture(scope="module")
def stories() -> list[ind.Story]:
    return ind.make_stories(300, seed=11)


@pytest.fixture(scope="module")
def story_tok() -> BPETokenizer:
    return ind.build_tokenizer()


# ---------------------------------------------------------------------------------------------
# Induction: stories.


def test_stories_are_deterministic_per_seed_and_split() -> None:
    a = ind.make_stories(20, seed=3)
    assert a == ind.make_stories(20, seed=3)
    assert a[:5] == ind.make_stories(5, seed=3)  # story i does not depend on n_stories
    other = ind.make_stories(20, seed=4)
    held = ind.make_stories(20, seed=3, split="heldout")
    assert all(x.text != y.text for x, y in zip(a, other))
    assert not {s.text for s in a} & {s.text for s in held}
    assert ind.make_corpus(3, seed=3) == [s.text for s in a[:3]]


def test_every_name_of_the_space_is_exactly_two_tokens(story_tok: BPETokenizer) -> None:
    voc = ind.vocabulary()
    assert len(voc.first_syllables) == len(voc.second_syllables) == ind.N_SYLLABLES
    pairs = [(f, s) for f in range(ind.N_SYLLABLES) for s in range(ind.N_SYLLABLES)]
    names = [voc.name(f, s) for f, s in pairs]
    assert len(set(names)) == len(names) == 40_000
    encoded = story_tok.encode_batch(names)
    assert all(ids == list(voc.name_ids(f, s)) for ids, (f, s) in zip(encoded, pairs))
    # As a sentence's first word, mid-sentence and before punctuation alike.
    ids = story_tok.encode(f"{names[7]} saw {names[123]}, and {names[999]}.")
    assert ids[:2] == list(voc.name_ids(*pairs[7]))
    assert ids[3:5] == list(voc.name_ids(*pairs[123]))


def test_story_tokens_are_what_the_tokenizer_gives(stories: list[ind.Story],
        story_tok: BPETokenizer) -> None:
    unk = ind.vocabulary().ids[ind.UNK]
    for s in stories:
        assert story_tok.encode(s.text) == list(s.tokens)
        assert story_tok.decode(s.tokens) == s.text
        assert unk not in s.tokens


def test_names_recur_and_positions_point_at_their_second_token(stories: list[ind.Story],
        story_tok: BPETokenizer) -> None:
    voc = ind.vocabulary()
    continuation_ids = {voc.ids[ind.CONTINUATION + s] for s in voc.second_syllables}
    for s in stories:
        assert 2 <= len(s.names) <= 3
        assert 60 <= s.n_words <= 150
        # Distinct first syllables: the first token of a name identifies the character.
        assert len({s.tokens[starts[0]] for starts in s.name_starts}) == len(s.names)
        words = re.findall(r"[A-Za-z]+", s.text)
        expected = []
        for name, starts in zip(s.names, s.name_starts):
            assert len(starts) >= 2, (name, s.text)
            assert words.count(name) == len(starts)  # every occurrence is recorded
            for start in starts:
                assert story_tok.decode(s.tokens[start:start + 2]) == name
                assert s.tokens[start + 1] in continuation_ids
            expected += [start + 1 for start in starts[1:]]
        assert s.repeat_positions == tuple(sorted(expected))
        # Only name tokens are continuation pieces: nothing else can be predicted "by name".
        assert sum(t in continuation_ids for t in s.tokens) == sum(map(len, s.name_starts))


def test_names_are_drawn_fresh_per_story(stories: list[ind.Story]) -> None:
    names = [n for s in stories for n in s.names]
    assert len(set(names)) > 0.95 * len(names)
    held = {n for s in ind.make_stories(300, seed=11, split="heldout") for n in s.names}
    assert len(held & set(names)) < 0.05 * len(held)


def test_stories_are_varied(stories: list[ind.Story]) -> None:
    # Not a handful of fixed texts: few sentences repeat once names are blanked out.
    sentences = [re.sub(r"\b[A-Z][a-z]+\b", "N", x) for s in stories
                 for x in re.split(r"(?<=[.!?]) ", s.text)]
    assert len(set(sentences)) > 0.5 * len(sentences)


def test_tokenizer_saves_and_loads_through_the_project_loader(
        tmp_path: Path, story_tok: BPETokenizer) -> None:
    ind.save_tokenizer(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"),
                   make_tokenizer(str(tmp_path / "tok"), [], vocab_size=0)):
        assert loaded.fingerprint() == story_tok.fingerprint()
        assert loaded.vocab_size == len(ind.vocabulary().ids)
        assert (loaded.eos_id, loaded.pad_id) == (1, 2)
        text = ind.make_corpus(1, seed=0)[0]
        assert loaded.encode(text) == story_tok.encode(text)
    # The special tokens cannot be forged by text.
    assert story_tok.eos_id not in story_tok.encode("The end. <eos>")


def test_written_corpus_is_read_by_the_data_pipeline(tmp_path: Path) -> None:
    few = ind.make_stories(25, seed=2)
    files = ind.write_corpus(tmp_path / "corpus", few, stories_per_file=10)
    assert [f.name for f in files] == ["stories-00000.txt", "stories-00001.txt",
                                       "stories-00002.txt"]
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    assert lines == [s.text for s in few]
    ind.save_tokenizer(tmp_path / "tok")
    cfg = DataConfig(paths=[str(tmp_path / "corpus")], tokenizer=str(tmp_path / "tok"),
                     val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg)
    stream = [int(t) for t in list(data.train) + list(data.val)]
    eos = data.tokenizer.eos_id
    assert stream.count(eos) == len(files)
    assert sorted(t for t in stream if t != eos) == sorted(t for s in few for t in s.tokens)
    with pytest.raises(DataError, match="not empty"):
        ind.write_corpus(tmp_path / "corpus", few)


# ---------------------------------------------------------------------------------------------
# Induction: the metric.


def test_induction_accuracy_uses_head_one_at_the_previous_position() -> None:
    copy = LookupStub(range(10))  # predicts the next token = the current one
    story = [1, 2, 2, 3, 3, 3]
    assert ind.induction_accuracy(copy, [story], [[2, 4, 5]]) == 1.0
    # Position 3 (token 3) is predicted from position 2 (token 2): wrong. An off-by-one that
    # read the logits AT the position would score it right.
    assert ind.induction_accuracy(copy, [story], [[2, 3]]) == 0.5
    assert ind.induction_accuracy(copy, [story], [[1, 3]]) == 0.0


def test_induction_accuracy_pools_positions_over_stories_and_batches() -> None:
    table = list(range(10))
    table[5], table[8] = 6, 3  # 5 -> 6 is right in story 0, 8 -> 3 is wrong in story 1
    stub = LookupStub(table)
    stories = [[5, 6, 7, 5, 6], [8, 9, 8, 9, 8, 9], [4, 4, 4]]
    positions = [[4], [3, 5], [1, 2]]
    # Right: story 0 pos 4; story 2 pos 1 and 2 (4 -> 4). Wrong: story 1 pos 3 and 5.
    for batch_size in (1, 2, 8):
        assert ind.induction_accuracy(stub, stories, positions, batch_size=batch_size) == 3 / 5
    assert stub.calls[-1] == (3, 6)  # one right-padded batch of all three stories
    # A story with nothing to score still counts nothing (it is not an error on its own).
    assert ind.induction_accuracy(stub, stories + [[1, 2]], positions + [[]]) == 3 / 5


def test_induction_accuracy_on_a_real_model_with_known_predictions() -> None:
    vocab = 40
    table = {3: 7, 4: 9, 5: 5}
    model = bigram_model(vocab, table, max_seq_len=32)
    rng = random.Random(0)
    stories = [[rng.choice((3, 4, 5, 7, 9, 30)) for _ in range(n)] for n in (12, 30, 7, 19)]
    positions = [list(range(1, len(s))) for s in stories]
    right = sum(table.get(s[p - 1], 0) == s[p] for s, pos in zip(stories, positions) for p in pos)
    total = sum(map(len, positions))
    assert 0 < right < total  # the hand-made case has both outcomes
    for batch_size in (1, 3):
        assert ind.induction_accuracy(model, stories, positions, batch_size) == right / total
    assert model.training  # the metric restores the mode it found


def test_induction_accuracy_rejects_bad_input() -> None:
    stub = LookupStub(range(10), max_seq_len=4)
    with pytest.raises(MultitokenError, match="context"):
        ind.induction_accuracy(stub, [[1, 2, 3, 4, 5]], [[2]])
    with pytest.raises(MultitokenError, match="positions"):
        ind.induction_accuracy(stub, [[1, 2, 3]], [[0]])
    with pytest.raises(MultitokenError, match="positions"):
        ind.induction_accuracy(stub, [[1, 2, 3]], [[3]])
    with pytest.raises(MultitokenError, match="undefined"):
        ind.induction_accuracy(stub, [[1, 2, 3]], [[]])
    with pytest.raises(MultitokenError, match="2 stories"):
        ind.induction_accuracy(stub, [[1, 2], [1, 2]], [[1]])


# ---------------------------------------------------------------------------------------------
# Polynomials: the ring.


def test_hand_computed_values() -> None:
    x1 = pm.poly(1, 1)
    assert pm.mul(x1, x1) == pm.poly(1, 2, 1)  # (X+1)^2 = X^2+2X+1
    assert pm.mul(pm.poly(0, 0, 0, 0, 1), pm.X) == pm.ZERO  # X^4 * X = X^5 = 0
    assert pm.neg(pm.poly(0, 3)) == pm.poly(0, 4)  # -(3X) = 4X
    assert pm.add(pm.poly(5, 6), pm.poly(3, 1)) == pm.poly(1, 0)  # 8 + 7X = 1
    assert pm.mul(pm.poly(0, 3), pm.poly(0, 5)) == pm.poly(0, 0, 1)  # 15X^2 = X^2
    assert pm.compose(pm.poly(0, 0, 1), x1) == pm.poly(1, 2, 1)  # X^2 o (X+1)
    assert pm.compose(x1, pm.poly(0, 2)) == pm.poly(1, 2)  # (X+1) o 2X
    assert pm.compose(pm.poly(0, 0, 0, 1), pm.poly(0, 0, 1)) == pm.ZERO  # X^3 o X^2 = X^6
    assert pm.compose(pm.poly(0, 1, 1), pm.poly(3)) == pm.poly(5)  # 3 + 9 = 12 = 5
    # (X+1)^4 o ... : X^4 o (X+1) = X^4+4X^3+6X^2+4X+1
    assert pm.compose(pm.poly(0, 0, 0, 0, 1), x1) == pm.poly(1, 4, 6, 4, 1)
    assert pm.poly(8, -1, 0, 0, 0, 3) == pm.poly(1, 6)  # reduced mod 7, X^5 dropped
    assert pm.evaluate(pm.parse("([X+1]*[X+1])")) == pm.poly(1, 2, 1)
    assert pm.evaluate(pm.parse("-([3X]o[X^2+1])")) == pm.poly(4, 0, 4)


def _polys(rng: random.Random, n: int, zero_constant: bool = False) -> list[pm.Poly]:
    return [pm.poly(0 if zero_constant else rng.randrange(7), *(rng.randrange(7) for _ in range(4)))
            for _ in range(n)]


def test_ring_laws() -> None:
    rng = random.Random(0)
    for p, q, r in zip(_polys(rng, 300), _polys(rng, 300), _polys(rng, 300)):
        assert pm.add(p, q) == pm.add(q, p)
        assert pm.mul(p, q) == pm.mul(q, p)
        assert pm.add(pm.add(p, q), r) == pm.add(p, pm.add(q, r))
        assert pm.mul(pm.mul(p, q), r) == pm.mul(p, pm.mul(q, r))
        assert pm.mul(p, pm.add(q, r)) == pm.add(pm.mul(p, q), pm.mul(p, r))
        assert pm.add(p, pm.neg(p)) == pm.ZERO
        assert pm.mul(p, pm.ONE) == p and pm.add(p, pm.ZERO) == p
        assert pm.compose(p, pm.X) == p and pm.compose(pm.X, p) == p
        assert pm.compose(pm.add(p, q), r) == pm.add(pm.compose(p, r), pm.compose(q, r))
        assert pm.compose(pm.neg(p), r) == pm.neg(pm.compose(p, r))


def test_composition_laws_that_need_a_zero_constant_term() -> None:
    rng = random.Random(1)
    for p, q, r in zip(_polys(rng, 300), _polys(rng, 300), _polys(rng, 300, zero_constant=True)):
        assert pm.compose(pm.compose(p, q), r) == pm.compose(p, pm.compose(q, r))
        assert pm.compose(pm.mul(p, q), r) == pm.mul(pm.compose(p, r), pm.compose(q, r))
    # With r(0) != 0 they fail: X^4 o X^2 = X^8 = 0, but X^4 o (X^2 o (X+1)) = (X+1)^8 = 1+...
    p, q, r = pm.poly(0, 0, 0, 0, 1), pm.poly(0, 0, 1), pm.poly(1, 1)
    assert pm.compose(pm.compose(p, q), r) == pm.ZERO
    assert pm.compose(p, pm.compose(q, r))[0] == 1


# ---------------------------------------------------------------------------------------------
# Polynomials: expressions and text.


def test_random_expressions_have_the_requested_number_of_operations() -> None:
    rng = random.Random(2)
    for k in range(11):
        for _ in range(30):
            e = pm.random_expr(rng, k)
            assert pm.num_ops(e) == k
            assert pm.num_ops(pm.parse(pm.to_text(e))) == k
    ops = {pm.to_text(pm.random_expr(rng, 1))[:2] for _ in range(200)}
    assert {"-[", "(["} <= ops
    assert {"+", "*", "o"} <= {c for _ in range(200) for c in pm.to_text(pm.random_expr(rng, 1))}
    with pytest.raises(DataError):
        pm.random_expr(rng, -1)


def test_text_round_trips() -> None:
    assert pm.poly_to_text(pm.poly(1, 2, 1)) == "X^2+2X+1"
    assert pm.poly_to_text(pm.poly(0, 1, 0, 0, 6)) == "6X^4+X"
    assert pm.poly_to_text(pm.ZERO) == "0"
    e = pm.BinOp("o", pm.Neg(pm.Leaf(pm.poly(0, 3))), pm.BinOp("+", pm.Leaf(pm.X),
                                                                  pm.Leaf(pm.ZERO)))
    assert pm.to_text(e) == "(-[3X]o([X]+[0]))"
    assert pm.parse("(-[3X]o([X]+[0]))") == e
    for c in range(7 ** 5):
        p = pm.poly(*(c // 7 ** i % 7 for i in range(5)))
        assert pm.parse_poly(pm.poly_to_text(p)) == p
    rng = random.Random(3)
    for _ in range(300):
        e = pm.random_expr(rng, rng.randrange(11))
        assert pm.parse(pm.to_text(e)) == e


@pytest.mark.parametrize("bad", ["[X+X]", "[7]", "[0X]", "[1X]", "[X^1]", "[X^5]", "[1+X]",
                                 "[X^2X]", "[]", "[X++1]", "([1]+[2]", "([1]/[2])", "[1]x",
                                 "X", "-", "", "[3", "(-[1])"])
def test_parse_rejects_non_canonical_text(bad: str) -> None:
    with pytest.raises(DataError):
        pm.parse(bad)


# ---------------------------------------------------------------------------------------------
# Polynomials: samples.


def test_test_sets_are_deterministic_distinct_and_correct() -> None:
    sets = pm.make_test_sets(0, n_per_difficulty=100)
    assert sorted(sets) == list(range(1, 11))
    assert sets == pm.make_test_sets(0, n_per_difficulty=100)
    assert sets[3] != pm.make_test_sets(1, n_per_difficulty=100)[3]
    assert pm.make_test_sets(0, n_per_difficulty=100, difficulties=[3])[3] == sets[3]
    for k, samples in sets.items():
        assert len(samples) == len({s.expression for s in samples}) == 100
        for s in samples:
            assert s.n_ops == k == pm.num_ops(pm.parse(s.expression))
            assert pm.evaluate(pm.parse(s.expression)) == pm.parse_poly(s.answer)
            assert set(s.text) <= pm.ALPHABET and s.text.count("\n") == 1
            assert s.text == f"{s.expression}={s.answer}\n"


def test_full_test_sets_have_2000_samples_per_difficulty() -> None:
    sets = pm.make_test_sets(5)
    assert {k: len(v) for k, v in sets.items()} == {k: 2000 for k in range(1, 11)}


def test_train_samples_are_in_domain_deterministic_and_exclude_the_test_set() -> None:
    train = pm.make_train_samples(400, seed=0)
    assert train == pm.make_train_samples(400, seed=0)
    assert train[:50] == pm.make_train_samples(50, seed=0)
    assert {s.n_ops for s in train} == set(pm.IN_DOMAIN)
    banned = {s.expression for s in train[:100]}
    again = pm.make_train_samples(400, seed=0, exclude=banned)
    assert len(again) == 400 and not banned & {s.expression for s in again}
    tests = pm.make_test_sets(0, n_per_difficulty=300, difficulties=pm.IN_DOMAIN)
    test_exprs = {s.expression for v in tests.values() for s in v}
    # Short expressions collide without the exclusion (small leaf space at 1 operation) ...
    assert test_exprs & {s.expression for s in pm.make_train_samples(3000, seed=0)}
    # ... and never with it.
    assert not test_exprs & {s.expression for s in
                             pm.make_train_samples(3000, seed=0, exclude=test_exprs)}


def test_polynomial_corpus_files(tmp_path: Path) -> None:
    samples = pm.make_train_samples(25, seed=1)
    files = pm.write_corpus(tmp_path / "c", samples, samples_per_file=10)
    assert len(files) == 3
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    assert text == "".join(s.text for s in samples)
    with pytest.raises(DataError, match="not empty"):
        pm.write_corpus(tmp_path / "c", samples)


# ---------------------------------------------------------------------------------------------
# Polynomials: the metric.


def _chain(text: str) -> dict[int, int]:
    """Bigram table that, after "=", emits `text` (no repeated characters) then stops."""
    seq = [ord("=")] + [ord(c) for c in text] + [ord("\n")]
    return dict(zip(seq[:-1], seq[1:]))


def _sample(answer: str) -> pm.Sample:
    return pm.Sample("([X]+[1])", answer, 1)


def test_exact_match_counts_greedy_answers_that_stop() -> None:
    tok = ByteTokenizer()
    model = bigram_model(tok.vocab_size, _chain("X+1"))  # always answers "X+1"
    samples = [_sample("X+1"), _sample("X"), _sample("X+1"), _sample("X+12"),
               pm.Sample("(([X]+[1])*[1])", "X+1", 2)]
    for batch_size in (1, 2, 64):
        assert pm.exact_match_accuracy(model, tok, samples, batch_size) == 3 / 5


def test_exact_match_needs_the_stop_token() -> None:
    tok = ByteTokenizer()
    table = _chain("3")
    table[ord("3")] = ord("3")  # "3333...": right digits, but never stops
    assert pm.exact_match_accuracy(bigram_model(tok.vocab_size, table), tok,
                                   [_sample("3"), _sample("33")]) == 0.0
    table[ord("3")] = ord("\n")
    assert pm.exact_match_accuracy(bigram_model(tok.vocab_size, table), tok,
                                   [_sample("3"), _sample("33")]) == 0.5


def test_exact_match_rejects_bad_input() -> None:
    tok = ByteTokenizer()
    model = bigram_model(tok.vocab_size, {})
    with pytest.raises(MultitokenError, match="undefined"):
        pm.exact_match_accuracy(model, tok, [])
    with pytest.raises(MultitokenError, match="one token"):
        pm.exact_match_accuracy(model, ind.build_tokenizer(), [_sample("X")])
