"""The polynomial-arithmetic experiment's data and metric (paper sec. 4.2).

Elements of the ring F7[X]/(X^5) are tuples of 5 coefficients (c0, ..., c4), each in 0..6.
Expressions combine random leaf polynomials with four operations: negation (-a), addition
(a+b), multiplication (a*b) and composition (a o b = a(b(X))). Every operation is evaluated on
canonical representatives and truncated mod X^5; composition substitutes b into the
representative of a, then truncates. Addition, negation and multiplication are the ring's own;
composition is a function of the representatives, and `(p o q) o r == p o (q o r)` holds
whenever r(0) = 0 (then substitution maps multiples of X^5 to multiples of X^5), not in general.
An expression's value is defined by its tree, so this never makes a sample ambiguous.

Text format (one sample per line, every character one token of the byte tokenizer):

    polynomial   3X^4+X^2+6      descending degree, coefficient 1 omitted, "0" for zero
    leaf         [X^2+3]         a polynomial in brackets
    negation     -e
    binary       (a+b)  (a*b)  (aob)
    sample       <expression>=<answer polynomial>\\n

e.g. `([X+1]*[X+1])=X^2+2X+1`. The trainer reads the files from `write_corpus` with
`data.tokenizer: bytes`; `exact_match_accuracy` decodes greedily after "=" up to the newline.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from multitoken.decoding.generate import generate
from multitoken.errors import DataError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

MODULUS = 7
N_COEFFS = 5  # X^5 = 0
Poly = tuple[int, ...]  # exactly N_COEFFS coefficients, lowest degree first, each in 0..MODULUS-1

IN_DOMAIN = tuple(range(1, 6))  # operation counts seen in training
OUT_OF_DOMAIN = tuple(range(6, 11))
OPERATIONS = ("-", "+", "*", "o")  # negation, addition, multiplication, composition
BINARY_OPS = ("+", "*", "o")
LEAF_MAX_DEGREE = 3
SEPARATOR = "\n"  # ends every sample; a prompt is preceded by it, as in the training stream
ALPHABET = frozenset("0123456X^+*o-()[]=" + SEPARATOR)


# ---------------------------------------------------------------------------------------------
# The ring.


def poly(*coeffs: int) -> Poly:
    """Coefficients c0, c1, ... (lowest degree first) -> ring element (mod 7, mod X^5)."""
    c = [int(x) % MODULUS for x in coeffs[:N_COEFFS]]
    return tuple(c + [0] * (N_COEFFS - len(c)))


ZERO = poly()
ONE = poly(1)
X = poly(0, 1)


def add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % MODULUS for a, b in zip(p, q))


def neg(p: Poly) -> Poly:
    return tuple(-a % MODULUS for a in p)


def mul(p: Poly, q: Poly) -> Poly:
    """Product truncated mod X^5: terms of degree >= 5 are dropped."""
    out = [0] * N_COEFFS
    for i, a in enumerate(p):
        if a:
            for j in range(N_COEFFS - i):
                out[i + j] += a * q[j]
    return tuple(x % MODULUS for x in out)


def compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) mod X^5, by Horner's rule truncating at every step.

    Truncation is a ring homomorphism F7[X] -> F7[X]/(X^5), so truncating inside Horner gives
    the same result as substituting in full and truncating once.
    """
    out = ZERO
    for c in reversed(p):
        out = add(mul(out, q), poly(c))
    return out


# ---------------------------------------------------------------------------------------------
# Expressions.


@dataclass(frozen=True)
class Leaf:
    value: Poly


@dataclass(frozen=True)
class Neg:
    arg: Expr


@dataclass(frozen=True)
class BinOp:
    op: str  # one of BINARY_OPS
    left: Expr
    right: Expr


Expr = Leaf | Neg | BinOp


def evaluate(e: Expr) -> Poly:
    if isinstance(e, Leaf):
        return e.value
    if isinstance(e, Neg):
        return neg(evaluate(e.arg))
    a, b = evaluate(e.left), evaluate(e.right)
    if e.op == "+":
        return add(a, b)
    if e.op == "*":
        return mul(a, b)
    return compose(a, b)


def num_ops(e: Expr) -> int:
    """Number of operations (internal nodes) of the expression."""
    if isinstance(e, Leaf):
        return 0
    if isinstance(e, Neg):
        return 1 + num_ops(e.arg)
    return 1 + num_ops(e.left) + num_ops(e.right)


def random_leaf(rng: random.Random) -> Poly:
    """A polynomial of degree <= 3 whose coefficients are each 0 with probability 1/2.

    Sparse leaves keep expressions short; all 7^4 polynomials of degree <= 3 remain possible.
    """
    return poly(*(0 if rng.random() < 0.5 else rng.randint(1, MODULUS - 1)
                  for _ in range(LEAF_MAX_DEGREE + 1)))


def random_expr(rng: random.Random, n_ops: int) -> Expr:
    """A random expression with exactly `n_ops` operations, each uniform over the four.

    A binary operation splits its remaining operations uniformly between its two operands.
    """
    if n_ops < 0:
        raise DataError(f"the number of operations must be >= 0, got {n_ops}")
    if n_ops == 0:
        return Leaf(random_leaf(rng))
    op = rng.choice(OPERATIONS)
    if op == "-":
        return Neg(random_expr(rng, n_ops - 1))
    left = rng.randint(0, n_ops - 1)
    return BinOp(op, random_expr(rng, left), random_expr(rng, n_ops - 1 - left))


# ---------------------------------------------------------------------------------------------
# Text.


def poly_to_text(p: Poly) -> str:
    """Canonical text of a ring element, e.g. (1, 2, 1, 0, 0) -> "X^2+2X+1"."""
    terms = []
    for d in range(N_COEFFS - 1, -1, -1):
        c = p[d]
        if c == 0:
            continue
        coef = "" if c == 1 and d > 0 else str(c)
        var = "" if d == 0 else "X" if d == 1 else f"X^{d}"
        terms.append(coef + var)
    return "+".join(terms) if terms else "0"


def to_text(e: Expr) -> str:
    """Canonical text of an expression (see the module docstring)."""
    if isinstance(e, Leaf):
        return f"[{poly_to_text(e.value)}]"
    if isinstance(e, Neg):
        return "-" + to_text(e.arg)
    return f"({to_text(e.left)}{e.op}{to_text(e.right)})"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def fail(self, what: str) -> DataError:
        return DataError(f"cannot parse {self.text!r}: {what} at position {self.i}")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def take(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"expected {ch!r}")
        self.i += 1

    def expr(self) -> Expr:
        ch = self.peek()
        if ch == "[":
            self.i += 1
            end = self.text.find("]", self.i)
            if end < 0:
                raise self.fail("unclosed '['")
            value = parse_poly(self.text[self.i:end])
            self.i = end + 1
            return Leaf(value)
        if ch == "-":
            self.i += 1
            return Neg(self.expr())
        if ch == "(":
            self.i += 1
            left = self.expr()
            op = self.peek()
            if op not in BINARY_OPS:
                raise self.fail(f"expected one of {', '.join(BINARY_OPS)}")
            self.i += 1
            right = self.expr()
            self.take(")")
            return BinOp(op, left, right)
        raise self.fail("expected '[', '-' or '('")


def parse_poly(text: str) -> Poly:
    """Canonical polynomial text -> ring element; anything not canonical is a DataError."""
    coeffs = [0] * N_COEFFS
    if text != "0":
        for term in text.split("+"):
            head, x, power = term.partition("X")
            if x and power and not (power[0] == "^" and power[1:].isdigit()):
                raise DataError(f"cannot parse polynomial {text!r}: bad term {term!r}")
            if head and not (head.isdigit() and len(head) == 1):
                raise DataError(f"cannot parse polynomial {text!r}: bad coefficient in {term!r}")
            degree = (int(power[1:]) if power else 1) if x else 0
            if not (head or x) or degree >= N_COEFFS:
                raise DataError(f"cannot parse polynomial {text!r}: bad term {term!r}")
            coeffs[degree] = int(head) if head else 1
    p = tuple(coeffs)
    # Rejects 0 or >= 7 coefficients, repeated or unordered terms, "X^1", "1X", "X^0".
    if poly_to_text(p) != text or any(c >= MODULUS for c in coeffs):
        raise DataError(f"polynomial {text!r} is not in canonical form ({poly_to_text(p)!r})")
    return p


def parse(text: str) -> Expr:
    """Canonical expression text -> expression; `parse(to_text(e)) == e`."""
    parser = _Parser(text)
    e = parser.expr()
    if parser.i != len(text):
        raise parser.fail("unexpected trailing text")
    return e


# ---------------------------------------------------------------------------------------------
# Samples.


@dataclass(frozen=True)
class Sample:
    expression: str
    answer: str
    n_ops: int

    @property
    def prompt(self) -> str:
        return self.expression + "="

    @property
    def text(self) -> str:
        """The sample's line in a corpus file."""
        return self.prompt + self.answer + SEPARATOR


def make_sample(rng: random.Random, n_ops: int) -> Sample:
    e = random_expr(rng, n_ops)
    return Sample(to_text(e), poly_to_text(evaluate(e)), n_ops)


def make_test_sets(seed: int, n_per_difficulty: int = 2000,
                   difficulties: Iterable[int] = IN_DOMAIN + OUT_OF_DOMAIN
                   ) -> dict[int, list[Sample]]:
    """{n_ops: n_per_difficulty distinct samples with n_ops operations}.

    Each difficulty has its own random stream, so adding a difficulty never changes another.
    """
    if n_per_difficulty < 1:
        raise DataError(f"n_per_difficulty must be >= 1, got {n_per_difficulty}")
    out = {}
    for k in difficulties:
        if k < 1:
            raise DataError(f"difficulties must be >= 1 operation, got {k}")
        rng = random.Random(f"polynomial:{seed}:test:{k}")
        seen: dict[str, Sample] = {}
        for _ in range(100 * n_per_difficulty):  # bounded: duplicates are rare
            s = make_sample(rng, k)
            seen.setdefault(s.expression, s)
            if len(seen) == n_per_difficulty:
                break
        else:
            raise DataError(f"could not draw {n_per_difficulty} distinct expressions with {k} "
                            "operations")
        out[k] = list(seen.values())
    return out


def make_train_samples(n: int, seed: int, exclude: Iterable[str] = (),
                       difficulties: Sequence[int] = IN_DOMAIN) -> list[Sample]:
    """`n` training samples, operation counts uniform over `difficulties`.

    Samples whose expression is in `exclude` (pass the test sets' expressions) are redrawn,
    so training and test are disjoint. The first k samples do not depend on `n`.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if not difficulties or min(difficulties) < 1:
        raise DataError(f"difficulties must be operation counts >= 1, got {list(difficulties)}")
    banned = set(exclude)
    rng = random.Random(f"polynomial:{seed}:train")
    out: list[Sample] = []
    while len(out) < n:
        s = make_sample(rng, rng.choice(difficulties))
        if s.expression not in banned:
            out.append(s)
    return out


def write_corpus(directory: str | Path, samples: Sequence[Sample],
                 samples_per_file: int = 2000) -> list[Path]:
    """Write samples, one per line, into `directory/samples-NNNNN.txt`; returns the files.

    The trainer reads the folder through `data.paths` (with `data.tokenizer: bytes`) and splits
    it by file into its own train/validation streams. The directory must be new or empty.
    """
    if samples_per_file < 1:
        raise DataError(f"samples_per_file must be >= 1, got {samples_per_file}")
    if not samples:
        raise DataError("no samples to write")
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"corpus directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, lo in enumerate(range(0, len(samples), samples_per_file)):
        path = out / f"samples-{k:05d}.txt"
        path.write_text("".join(s.text for s in samples[lo:lo + samples_per_file]),
                        encoding="utf-8")
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# The metric.


def exact_match_accuracy(model: MultiTokenModel, tokenizer: Tokenizer, samples: Sequence[Sample],
                         batch_size: int = 64) -> float:
    """Fraction of samples whose greedy answer (head 1) is exactly `sample.answer`.

    The prompt is SEPARATOR + expression + "=", as the sample appears in the training stream
    after the previous line. Decoding stops at the SEPARATOR token; an answer counts only if
    the model stopped there and the text before it equals the reference. A model that has not
    stopped one token after the reference's length is wrong whatever follows, so decoding is
    capped there.
    """
    if not samples:
        raise MultitokenError("no samples to score: the accuracy is undefined")
    if batch_size < 1:
        raise MultitokenError(f"batch_size must be >= 1, got {batch_size}")
    stop = tokenizer.encode(SEPARATOR)
    if len(stop) != 1:
        raise MultitokenError(f"the tokenizer must encode {SEPARATOR!r} as one token to stop on "
                              f"it, got {len(stop)} tokens")
    # Similar prompt lengths in a batch waste less on padding; the count does not depend on order.
    ordered = sorted(samples, key=lambda s: len(s.prompt))
    correct = 0
    for lo in range(0, len(ordered), batch_size):
        batch = ordered[lo:lo + batch_size]
        prompts = [tokenizer.encode(SEPARATOR + s.prompt) for s in batch]
        longest = max(len(tokenizer.encode(s.answer)) for s in batch)
        res = generate(model, prompts, max_new_tokens=longest + 1, stop=stop[0])
        for s, toks, reason in zip(batch, res.tokens, res.finish_reasons):
            if reason == "stop" and tokenizer.decode(toks[:-1]) == s.answer:
                correct += 1
    return correct / len(samples)
