"""The induction experiment's data and metric (paper sec. 4.1).

Children's stories are generated from a grammar of sentence templates. Every character has a
random name made of two syllables, and the experiment's tokenizer maps every name to EXACTLY
two tokens: the first syllable (e.g. "Bal") and the second as a continuation piece ("##mo").
Names are drawn fresh for every story from 200 x 200 syllable pairs, so they cannot be
memorised: the second token of a name can only be predicted at a later occurrence, by copying
it from the earlier one (induction). Held-out stories use the same distribution.

The tokenizer is a closed word-level vocabulary (every word of the grammar, punctuation, the
syllables) in a Hugging Face WordPiece model, wrapped in the project's `BPETokenizer` class
(the wrapper of any Hugging Face tokenizer): it saves to and loads from `tokenizer.json` like
the project's other tokenizers, so the trainer and checkpoints take it unchanged (point
`data.tokenizer` at the directory written by `save_tokenizer`). Its `name` is therefore "bpe".
The generator assigns token ids itself, piece by piece, from the same vocabulary, which is how
it knows the exact position of every name token; `encode(story.text)` gives the same ids.

Stories are single lines of text; each ends with "The end." so a file of many stories (one per
line) still marks where one story stops, since this tokenizer drops newlines.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from multitoken.errors import DataError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import BPETokenizer

# ---------------------------------------------------------------------------------------------
# The grammar. Slots: {A}, {B} are characters (A is the one a template is about); {A.he},
# {A.him}, {A.his} and capitalised {A.He} are A's pronouns; any other slot names a filler list
# (a trailing digit draws a second, independent value from the same list: {feeling2}).

KINDS = ("rabbit", "fox", "bear", "mouse", "duck", "frog", "owl", "cat", "dog", "turtle",
         "squirrel", "bird", "lion", "pig", "goat", "girl", "boy", "puppy", "kitten",
         "hedgehog", "deer", "wolf", "bee", "elephant", "hen", "lamb", "pony", "beaver")
CHAR_ADJECTIVES = ("little", "brave", "kind", "shy", "happy", "curious", "small", "clever",
                   "gentle", "silly", "friendly", "busy", "tiny", "young", "old", "quiet",
                   "playful", "lazy", "cheerful", "helpful", "funny", "careful", "proud")
PLACES = ("park", "forest", "river", "garden", "beach", "hill", "meadow", "pond", "farm", "lake",
          "playground", "village", "market", "school", "library", "field", "cave", "bridge",
          "castle", "mountain", "orchard", "barn", "harbor", "island", "valley", "bakery")
OBJECTS = ("ball", "kite", "box", "apple", "cake", "book", "hat", "boat", "flower", "shell",
           "stone", "cookie", "balloon", "drum", "basket", "map", "key", "feather", "blanket",
           "toy car", "puzzle", "painting", "sandwich", "lantern", "umbrella", "sock", "bell",
           "jar of honey", "pumpkin", "wagon", "ribbon", "teapot", "whistle", "scarf")
OBJECT_ADJECTIVES = ("red", "blue", "shiny", "big", "soft", "round", "old", "new", "green",
                     "yellow", "golden", "heavy", "funny", "pretty", "tiny", "strange", "purple",
                     "wet", "warm", "broken", "secret", "magic", "striped", "empty")
FEELINGS = ("happy", "sad", "scared", "excited", "proud", "tired", "angry", "surprised", "calm",
            "worried", "glad", "lonely", "sleepy", "hungry", "curious", "nervous", "grateful",
            "silly", "cheerful", "upset", "brave", "shy", "bored", "hopeful")
ACTIONS = ("play with", "look for", "share", "carry", "paint", "fix", "hide", "clean", "open",
           "draw", "find", "wash", "decorate", "count", "measure", "hold", "guard", "move")
ACTIVITIES = ("jumped over a log", "sang a happy song", "danced in the rain",
              "climbed a tall tree", "ran around in circles", "took a long nap",
              "counted the clouds", "picked some berries", "splashed in the water",
              "laughed out loud", "waved at the birds", "sat under a big tree",
              "hummed a little tune", "rolled down the hill", "looked at the stars",
              "ate a warm lunch", "told a funny story", "drew a picture of the sky",
              "planted a tiny seed", "built a sand castle", "skipped along the path",
              "played hide and seek", "chased a yellow butterfly", "made a paper boat",
              "found a hidden path", "baked some bread", "read a story aloud",
              "listened to the wind", "fed the ducks", "collected pretty leaves",
              "swam across the pond", "flew a kite", "clapped and cheered",
              "tiptoed past the sleeping cat", "whistled a merry tune")
HOBBIES = ("playing games", "reading books", "singing songs", "eating cookies",
           "climbing trees", "watching clouds", "making new friends", "building towers",
           "drawing pictures", "swimming in the lake", "telling jokes", "growing flowers",
           "collecting shells", "riding a bike", "baking pies", "counting stars")
CONNECTIVES = ("Then", "Later", "After that", "Soon", "Suddenly", "Next", "Meanwhile",
               "At last", "The next day", "Before long", "That afternoon", "After a while",
               "Just then", "A little later", "On the way home", "In the morning")
TIMES = ("morning", "afternoon", "evening", "day", "spring day", "summer morning",
         "rainy day", "windy afternoon", "winter evening", "sunny day", "quiet night")
SKIES = ("blue", "grey", "clear", "cloudy", "bright", "dark", "pink", "stormy")
SOUNDS = ("loud noise", "soft song", "funny sound", "strange whistle", "gentle knock",
          "tiny squeak", "happy laugh", "sad cry")
TOPICS = ("their dreams", "the weather", "the stars", "their favorite games", "the big storm",
          "the old castle", "the best cake", "the tall mountain", "the new school")
LESSONS = ("sharing makes everyone happy", "being kind is important", "friends help each other",
           "it is good to be brave", "every problem can be solved", "asking for help is smart",
           "patience brings good things", "saying sorry makes things better",
           "working together is more fun", "being honest is always right")

FILLERS: dict[str, tuple[str, ...]] = {
    "kind": KINDS, "cadj": CHAR_ADJECTIVES, "place": PLACES, "obj": OBJECTS,
    "oadj": OBJECT_ADJECTIVES, "feeling": FEELINGS, "act": ACTIONS, "activity": ACTIVITIES,
    "hobby": HOBBIES, "conn": CONNECTIVES, "time": TIMES, "sky": SKIES, "sound": SOUNDS,
    "topic": TOPICS, "lesson": LESSONS,
}

# The story's first character. {A} is new.
OPENINGS = (
    "Once upon a time, there was a {cadj} {kind} named {A}.",
    "There once lived a {cadj} {kind} called {A}.",
    "{A} was a {cadj} {kind} who loved {hobby}.",
    "In a small house near the {place}, there lived a {kind} named {A}.",
    "Long ago, a {cadj} {kind} named {A} lived by the {place}.",
    "One {time}, a {cadj} {kind} named {A} woke up early.",
    "Not far from the {place}, there was a {kind} called {A}.",
)
# Every later character: {A} is new, {B} was introduced before.
INTRODUCTIONS = (
    "{B} had a friend named {A}.",
    "One day, {B} met a {cadj} {kind} named {A}.",
    "{A}, a {cadj} {kind}, lived next door to {B}.",
    "Near the {place}, {B} saw a {kind} called {A}.",
    "{B} often played with a {cadj} {kind} named {A}.",
    "A {kind} named {A} was {B.his} best friend.",
    "At the {place}, {B} met {A}, a {cadj} {kind}.",
)
# Story body. Templates mentioning only {A} also repair a character mentioned too rarely.
MIDDLES = (
    "{A} and {B} went to the {place} together.",
    "{A} and {B} went to the {place} to {act} the {obj}.",
    "At the {place}, {A} found a {oadj} {obj}.",
    "{A} wanted to {act} the {obj}, but {B} was too {feeling}.",
    "{A} felt {feeling} because {B} {activity}.",
    "{conn}, {A} {activity}.",
    "{A} gave the {obj} to {B}, and {B} smiled.",
    "{A} looked at {B} and felt {feeling}.",
    "{B} ran to the {place} and {activity}.",
    "{A} was {feeling}, but {B} was {feeling2}.",
    "{A} asked {B} to {act} the {obj} with {A.him}.",
    "{A.He} {activity}, and {B} {activity2}.",
    "{A} said that the {obj} was very {oadj}.",
    "{conn}, {A} and {B} {activity}.",
    "{B} did not know where the {obj} was.",
    "{A} helped {B} {act} the {obj}.",
    "The sky was {sky}, so {A} {activity}.",
    "{A} told {B} about the {oadj} {obj} near the {place}.",
    "{A} and {B} {activity} until the {time} was over.",
    "{B} thanked {A} for the {oadj} {obj}.",
    "{A} hugged {B} and said thank you.",
    "{A} could not find {A.his} {obj}, so {B} helped {A.him} look for it.",
    "Every {time}, {A} liked to {act} the {obj}.",
    "{A} was a little {feeling} when {B} {activity}.",
    "With a big smile, {A} {activity}.",
    "{A} heard a {sound} coming from the {place}.",
    "{B} followed {A} all the way to the {place}.",
    "{A} and {B} sat near the {place} and talked about {topic}.",
    "{A} felt {feeling}, so {A.he} {activity}.",
    "{conn}, {A} saw a {oadj} {obj} in the {place}.",
    "{A} showed {B} how to {act} the {obj}.",
    "{A} shouted, and {B} came running from the {place}.",
    "{B} laughed when {A} {activity}.",
    "{A} wondered why {B} was so {feeling}.",
    "{conn}, {B} asked {A} a question about {topic}.",
    "{A} put the {obj} in {A.his} basket and walked to the {place}.",
)
CLOSINGS = (
    "In the end, {A} and {B} were the best of friends.",
    "{A} learned that {lesson}.",
    "That night, {A} went to sleep with a big smile.",
    "From that day on, {A} and {B} played together every day.",
    "{A} and {B} went home {feeling} and tired.",
    "{B} told {A} that {lesson}.",
)
THE_END = "The end."
PUNCTUATION = (".", ",", "!", "?")

# Names: a capitalised first syllable (onset + vowel + coda, e.g. "Bal") and a continuation
# syllable (onset + vowel, optionally + coda, e.g. "mo", "tin").
_ONSETS = "bdfghjklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "lmnrs"
N_SYLLABLES = 200  # per position: 200 x 200 = 40,000 names
CONTINUATION = "##"
UNK, EOS, PAD = "[UNK]", "<eos>", "<pad>"
_PIECE_RE = re.compile(r"\{[^}]+\}|[A-Za-z]+|[.,!?]")
_ALL_TEMPLATES = OPENINGS + INTRODUCTIONS + MIDDLES + CLOSINGS + (THE_END,)
# The body grows until it reaches a target length drawn from this range: stories have 66 words
# and more, about 140 at most (136 in 20,000 stories), and at most 190 tokens.
_MIN_TARGET_WORDS, _MAX_TARGET_WORDS = 66, 124


# ---------------------------------------------------------------------------------------------
# Vocabulary and tokenizer.


@dataclass(frozen=True)
class Vocabulary:
    """The closed vocabulary: ids of words, punctuation and syllables, and the syllable lists."""

    ids: dict[str, int]
    first_syllables: tuple[str, ...]  # capitalised, e.g. "Bal"
    second_syllables: tuple[str, ...]  # without the "##" prefix, e.g. "mo"

    def name(self, first: int, second: int) -> str:
        return self.first_syllables[first] + self.second_syllables[second]

    def name_ids(self, first: int, second: int) -> tuple[int, int]:
        return (self.ids[self.first_syllables[first]],
                self.ids[CONTINUATION + self.second_syllables[second]])


@cache
def template_pieces(template: str) -> tuple[str, ...]:
    """A template -> slots ("{A}") and literal words / punctuation, in order."""
    pieces = tuple(_PIECE_RE.findall(template))
    if "".join(pieces) != template.replace(" ", ""):
        raise ValueError(f"template has characters outside letters, slots and .,!?: {template!r}")
    return pieces


def _grammar_words() -> set[str]:
    words: set[str] = {"a", "an", "he", "she", "him", "her", "his", "He", "She"}
    for template in _ALL_TEMPLATES:
        pieces = template_pieces(template)
        words.update(p for p in pieces if not p.startswith("{"))
        # A filler that opens a sentence is capitalised: its first word needs that form too.
        if pieces[0].startswith("{") and _filler_name(pieces[0][1:-1]) in FILLERS:
            words.update(v.split()[0].capitalize() for v in FILLERS[_filler_name(pieces[0][1:-1])])
    for values in FILLERS.values():
        for v in values:
            words.update(v.split())
    return words


def _filler_name(slot: str) -> str:
    return slot.rstrip("0123456789")


@cache
def vocabulary() -> Vocabulary:
    """The experiment's fixed vocabulary (specials first, then sorted words, then syllables).

    First syllables that a grammar word equals or extends (e.g. "Bel" when "Bell" is a word)
    are left out: WordPiece matches the longest known prefix, so such a name would not split
    into exactly its two syllables.
    """
    words = _grammar_words()
    capital_prefixes = {w[:3] for w in words}
    firsts = [o.upper() + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    firsts = [s for s in firsts if s not in capital_prefixes and s not in words]
    seconds = [o + v + c for o in _ONSETS for v in _VOWELS for c in ("",) + tuple(_CODAS)]
    # A fixed draw (not the corpus seed): the vocabulary is part of the tokenizer's definition.
    pick = random.Random("multitoken-induction-syllables")
    first = tuple(sorted(pick.sample(firsts, N_SYLLABLES)))
    second = tuple(sorted(pick.sample(seconds, N_SYLLABLES)))
    ordered = ([UNK, EOS, PAD] + sorted(words | set(PUNCTUATION)) + list(first)
               + [CONTINUATION + s for s in second])
    return Vocabulary({w: i for i, w in enumerate(ordered)}, first, second)


def build_tokenizer() -> BPETokenizer:
    """A new instance of the experiment's tokenizer (see the module docstring)."""
    voc = vocabulary()
    hf = HFTokenizer(models.WordPiece(dict(voc.ids), unk_token=UNK,
                                      continuing_subword_prefix=CONTINUATION))
    # Splits on whitespace and on every punctuation character; case is kept.
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # cleanup=True glues "." "," "!" "?" back to the previous word, so decode(encode(story))
    # gives the story back (the grammar avoids the other contractions cleanup rewrites).
    hf.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
    hf.add_special_tokens([AddedToken(t, special=True) for t in (UNK, EOS, PAD)])
    return BPETokenizer(hf)


def save_tokenizer(directory: str | Path) -> Path:
    """Write the tokenizer to `directory/tokenizer.json`; `data.tokenizer=directory` loads it."""
    build_tokenizer().save(directory)
    return Path(directory)


# ---------------------------------------------------------------------------------------------
# Stories.


@dataclass(frozen=True)
class Story:
    """One story, its token ids, and where every name occurs.

    name_starts[c] holds the token index of the FIRST token of every occurrence of character
    c's name, in order; the name's second token is at that index + 1.
    """

    text: str
    tokens: tuple[int, ...]
    names: tuple[str, ...]  # one per character, in order of introduction
    name_starts: tuple[tuple[int, ...], ...]

    @property
    def repeat_positions(self) -> tuple[int, ...]:
        """Token indices of the second token of every name at its 2nd and later occurrences."""
        return tuple(sorted(s + 1 for starts in self.name_starts for s in starts[1:]))

    @property
    def n_words(self) -> int:
        return len(self.text.split())


@dataclass
class _Character:
    first: int  # index into Vocabulary.first_syllables
    second: int  # index into Vocabulary.second_syllables
    he: str
    him: str
    his: str
    mentions: int = 0


_Piece = str | int  # a word / punctuation mark, or a character's index (its name)


def _fill(template: str, roles: dict[str, int], chars: list[_Character],
          rng: random.Random) -> list[_Piece]:
    """Template -> pieces, with fillers drawn from `rng` and "a" turned into "an" where due."""
    out: list[_Piece] = []
    for piece in template_pieces(template):
        if not piece.startswith("{"):
            out.append(piece)
            continue
        slot = piece[1:-1]
        role, _, pronoun = slot.partition(".")
        if role in roles and pronoun:
            word = getattr(chars[roles[role]], pronoun.lower())
            out.append(word.capitalize() if pronoun[0].isupper() else word)
        elif role in roles:
            out.append(roles[role])
        else:
            out.extend(rng.choice(FILLERS[_filler_name(slot)]).split())
    if isinstance(out[0], str):
        out[0] = out[0][0].upper() + out[0][1:]
    for i in range(len(out) - 1):
        nxt = out[i + 1]
        if out[i] == "a" and isinstance(nxt, str) and nxt[0] in "aeiou":
            out[i] = "an"
    return out


def _n_words(pieces: list[_Piece]) -> int:
    return sum(1 for p in pieces if p not in PUNCTUATION)


@cache
def _roles(template: str) -> tuple[str, ...]:
    """The character roles ("A", "B") a template mentions, by name or pronoun."""
    slots = {p[1:-1].partition(".")[0] for p in template_pieces(template) if p.startswith("{")}
    return tuple(sorted(slots & {"A", "B"}))


def _sentence(templates: Sequence[str], chars: list[_Character], rng: random.Random,
              focus: int | None = None, other: int | None = None) -> list[_Piece]:
    """One sentence from `templates` about `focus` (A) and `other` (B); random when None."""
    while True:
        template = rng.choice(templates)
        if not ("B" in _roles(template) and len(chars) < 2):
            break
    a = focus if focus is not None else rng.randrange(len(chars))
    roles = {"A": a}
    if len(chars) > 1:
        roles["B"] = other if other is not None else rng.choice(
            [i for i in range(len(chars)) if i != a])
    pieces = _fill(template, roles, chars, rng)
    for p in pieces:
        if isinstance(p, int):
            chars[p].mentions += 1
    return pieces


def _generate_story(rng: random.Random, voc: Vocabulary) -> Story:
    n_chars = rng.choice((2, 2, 3))
    # Distinct first syllables within a story: a name's first token then identifies the
    # earlier occurrence to copy the second token from.
    firsts = rng.sample(range(len(voc.first_syllables)), n_chars)
    chars = []
    for f in firsts:
        he, him, his = rng.choice((("he", "him", "his"), ("she", "her", "her")))
        chars.append(_Character(f, rng.randrange(len(voc.second_syllables)), he, him, his))

    sentences = [_sentence(OPENINGS, chars[:1], rng, focus=0)]
    for c in range(1, n_chars):
        sentences.append(_sentence(INTRODUCTIONS, chars[:c + 1], rng, focus=c,
                                   other=rng.randrange(c)))
    closing = _sentence(CLOSINGS, chars, rng)
    words = sum(map(_n_words, sentences)) + _n_words(closing) + 2  # + "The end."
    target = rng.randint(_MIN_TARGET_WORDS, _MAX_TARGET_WORDS)
    while words < target:
        # Favour the least-mentioned character, so that every name recurs.
        least = min(c.mentions for c in chars)
        focus = rng.choice([i for i, c in enumerate(chars) if c.mentions == least])
        s = _sentence(MIDDLES, chars, rng, focus=focus)
        sentences.append(s)
        words += _n_words(s)
    one_role = [t for t in MIDDLES if _roles(t) == ("A",)]
    for i, c in enumerate(chars):
        while c.mentions < 2:  # rare: the body is long enough to mention everyone twice
            sentences.append(_sentence(one_role, chars, rng, focus=i))
    sentences.append(closing)
    sentences.append(["The", "end", "."])
    return _assemble([p for s in sentences for p in s], chars, voc)


def _assemble(pieces: list[_Piece], chars: list[_Character], voc: Vocabulary) -> Story:
    """Pieces -> text and token ids; the name positions are counted here, never searched for."""
    text_parts: list[str] = []
    tokens: list[int] = []
    starts: list[list[int]] = [[] for _ in chars]
    for p in pieces:
        if isinstance(p, int):
            c = chars[p]
            starts[p].append(len(tokens))
            tokens.extend(voc.name_ids(c.first, c.second))
            word = voc.name(c.first, c.second)
        else:
            tokens.append(voc.ids[p])
            word = p
        if text_parts and word not in PUNCTUATION:
            text_parts.append(" ")
        text_parts.append(word)
    return Story(text="".join(text_parts), tokens=tuple(tokens),
                 names=tuple(voc.name(c.first, c.second) for c in chars),
                 name_starts=tuple(tuple(s) for s in starts))


def make_stories(n_stories: int, seed: int, split: str = "train") -> list[Story]:
    """`n_stories` stories; story i depends only on (seed, split, i).

    Different `split` strings ("train", "heldout", ...) are independent streams, so held-out
    stories never repeat training ones (beyond chance collisions of the templates), and the
    first k stories are the same whatever `n_stories` is.
    """
    if n_stories < 0:
        raise DataError(f"n_stories must be >= 0, got {n_stories}")
    voc = vocabulary()
    return [_generate_story(random.Random(f"induction:{seed}:{split}:{i}"), voc)
            for i in range(n_stories)]


def make_corpus(n_stories: int, seed: int, split: str = "train") -> list[str]:
    """The texts of `make_stories(n_stories, seed, split)`."""
    return [s.text for s in make_stories(n_stories, seed, split)]


def write_corpus(directory: str | Path, stories: Sequence[Story] | Sequence[str],
                 stories_per_file: int = 100) -> list[Path]:
    """Write stories, one per line, into `directory/stories-NNNNN.txt`; returns the files.

    The trainer reads the folder through `data.paths` and splits it by file into its own
    train/validation streams. The directory must be new or empty: files left over from another
    corpus would silently join this one.
    """
    if stories_per_file < 1:
        raise DataError(f"stories_per_file must be >= 1, got {stories_per_file}")
    if not stories:
        raise DataError("no stories to write")
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"corpus directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    texts = [s.text if isinstance(s, Story) else s for s in stories]
    files = []
    for k, lo in enumerate(range(0, len(texts), stories_per_file)):
        path = out / f"stories-{k:05d}.txt"
        path.write_text("\n".join(texts[lo:lo + stories_per_file]) + "\n", encoding="utf-8")
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# The metric.


def induction_accuracy(model: MultiTokenModel, stories_tokens: Sequence[Sequence[int]],
                       name_positions: Sequence[Sequence[int]], batch_size: int = 32) -> float:
    """Top-1 accuracy of head 1 on the given positions (pooled over all stories).

    `name_positions[i]` lists indices into `stories_tokens[i]` of tokens to predict (for this
    experiment: `Story.repeat_positions`, the second token of a name seen before); position p
    is predicted by head 1 from the logits at p - 1. Each story is one full forward from its
    first token, right-padded into batches (causal attention: padding never affects earlier
    positions). Of the model it uses `model(idx [B, T], heads=[0])` -> head 1's logits
    [1, B, T, V], `model.cfg.max_seq_len`, its parameters' device and train/eval mode (restored
    afterwards).
    """
    if len(stories_tokens) != len(name_positions):
        raise MultitokenError(f"{len(stories_tokens)} stories but {len(name_positions)} lists of "
                              "name positions")
    if batch_size < 1:
        raise MultitokenError(f"batch_size must be >= 1, got {batch_size}")
    max_len = model.cfg.max_seq_len
    total = sum(len(p) for p in name_positions)
    if total == 0:
        raise MultitokenError("no positions to score: the accuracy is undefined")
    for i, (toks, pos) in enumerate(zip(stories_tokens, name_positions)):
        if len(toks) > max_len:
            raise MultitokenError(f"story {i} has {len(toks)} tokens, more than the model's "
                                  f"context of {max_len}")
        if pos and not all(1 <= p < len(toks) for p in pos):
            raise MultitokenError(f"story {i}: positions must be in [1, {len(toks)}) (the "
                                  "token at position 0 has no prediction)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for lo in range(0, len(stories_tokens), batch_size):
                batch = [list(t) for t in stories_tokens[lo:lo + batch_size]]
                width = max(len(t) for t in batch)
                idx = torch.tensor([t + [0] * (width - len(t)) for t in batch], device=device)
                pred = model(idx, heads=[0])[0].argmax(-1)  # [B, T]: prediction for t + 1
                rows = [b for b, pos in enumerate(name_positions[lo:lo + batch_size])
                        for _ in pos]
                cols = [p for pos in name_positions[lo:lo + batch_size] for p in pos]
                if not cols:
                    continue
                r = torch.tensor(rows, device=device)
                c = torch.tensor(cols, device=device)
                correct += int((pred[r, c - 1] == idx[r, c]).sum())
    finally:
        model.train(was_training)
    return correct / total
