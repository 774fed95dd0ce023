"""Tokenizers: raw UTF-8 bytes (the paper's byte-level models) or byte-level BPE.

Both kinds save to `<dir>/tokenizer.json` so a checkpoint directory carries its tokenizer, and
both expose a `fingerprint()` used as a cache key for tokenized corpora and to catch a
checkpoint being decoded with the wrong tokenizer.

Special tokens are never produced from text: the literal string "<eos>" in a source file is
encoded as ordinary bytes / merges, exactly like the byte tokenizer does. Document boundaries
are marked only by `eos_id` inserted by the data pipeline, so a corpus cannot forge them.

Both kinds also exist as a Hugging Face `tokenizers.Tokenizer` with the same ids (`to_hf`), which
is what `multitoken convert --to-hf` writes as the exported model's `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from multitoken.errors import CheckpointError, ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
_BYTES_FORMAT = "multitoken-bytes"
# Bump when the BPE training recipe changes so cached tokenizers trained the old way are not reused.
_BPE_RECIPE_VERSION = 1
# Names tried, in order, when a foreign tokenizer.json does not use our <eos>/<pad> spellings.
_EOS_NAMES = ("<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
# Start-of-text and unknown-token spellings; a tokenizer.json may have neither (byte-level BPE
# never needs an unknown token). Only exports use them, to name the tokens for other tools.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
_UNK_NAMES = ("<unk>", "[UNK]")


def _short_hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared cache or checkpoint should be readable
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `name`, `vocab_size`, `eos_id` and `pad_id`."""

    name: str
    vocab_size: int
    eos_id: int  # separates documents in the token stream; the default stop token
    pad_id: int
    # Start-of-text and unknown tokens, where the vocabulary has them. The data pipeline never
    # inserts either (documents are only separated by eos); exports name them for other tools.
    bos_id: int | None = None
    unk_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Never raises on ids that form invalid UTF-8; special ids are skipped."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json` such that `load_tokenizer(directory)` round-trips."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable short hash of everything that decides the ids (vocab, merges, specials)."""

    @abstractmethod
    def to_hf(self) -> HFTokenizer:
        """A Hugging Face `tokenizers.Tokenizer` with the same ids for every text and the same
        decoded text for every id sequence, provided its special tokens are not matched in text
        (`encode_special_tokens = True`, transformers' `split_special_tokens`), as here."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like `encode_batch` but as integer arrays; the data pipeline's bulk path.

        Not part of the documented interface: subclasses override it to skip building Python
        lists of ints, which dominates the cost of tokenizing a corpus with the byte tokenizer.
        """
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus four specials: <bos>=256 <eos>=257 <pad>=258 <unk>=259."""

    name = "bytes"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    unk_id = 259
    vocab_size = 260
    _SPECIALS = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<unk>": 259}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Specials and anything out of range (e.g. a padded model vocab) are dropped, and a
        # model may emit half a multi-byte character: errors="replace" keeps decode total.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def _spec(self) -> dict[str, Any]:
        return {"type": _BYTES_FORMAT, "version": 1, "vocab_size": self.vocab_size,
                "special_tokens": self._SPECIALS}

    def save(self, directory: str | Path) -> None:
        _atomic_write_text(Path(directory) / TOKENIZER_FILE, json.dumps(self._spec(), indent=2) + "\n")

    def fingerprint(self) -> str:
        return _short_hash(self._spec())

    def to_hf(self) -> HFTokenizer:
        # GPT-2's byte-level scheme with no merges: the ByteLevel pre-tokenizer maps byte b to one
        # printable character, the vocabulary maps that character back to id b, and the
        # ByteLevel decoder joins the bytes and decodes UTF-8 with U+FFFD for invalid sequences,
        # as `decode` does. use_regex=False: no word splitting (there is nothing to merge).
        chars = _gpt2_byte_chars()
        hf = HFTokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        # Added tokens take the next free ids in order: <bos>=256 ... <unk>=259, as in _SPECIALS.
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)
                               for name in sorted(self._SPECIALS, key=self._SPECIALS.__getitem__)])
        hf.encode_special_tokens = True
        return hf


def _gpt2_byte_chars() -> list[str]:
    """The printable character standing for each byte 0..255 in byte-level BPE (GPT-2's
    `bytes_to_unicode`, which `tokenizers`' ByteLevel pre-tokenizer and decoder implement):
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars: list[str] = []
    shifted = 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE) behind the `Tokenizer` interface."""

    name = "bpe"

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        # Literal "<eos>" text in the corpus must stay text (see the module docstring).
        hf.encode_special_tokens = True
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        eos = _first_token_id(hf, _EOS_NAMES)
        if eos is None:
            raise CheckpointError(
                f"tokenizer has no end-of-sequence token (looked for {', '.join(_EOS_NAMES)})"
            )
        self.eos_id = eos
        pad = _first_token_id(hf, _PAD_NAMES)
        self.pad_id = eos if pad is None else pad  # padding is masked out, so eos is a safe stand-in
        self.bos_id = _first_token_id(hf, _BOS_NAMES)
        self.unk_id = _first_token_id(hf, _UNK_NAMES)
        self._fingerprint: str | None = None

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a foreign tokenizer's post-processor (e.g. a BOS prefix)
        # must not insert ids; the pipeline places eos itself.
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.hf.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        # The Rust side raises OverflowError on negative ids and ignores unknown large ones.
        clean = [int(i) for i in ids if int(i) >= 0]
        return self.hf.decode(clean, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        _atomic_write_text(Path(directory) / TOKENIZER_FILE, self.hf.to_str(pretty=True) + "\n")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            spec = json.loads(self.hf.to_str())
            # Truncation/padding settings do not change ids of a plain encode; leave them out
            # so toggling them does not invalidate caches or flag a false mismatch.
            spec.pop("truncation", None)
            spec.pop("padding", None)
            self._fingerprint = _short_hash(spec)
        return self._fingerprint

    def to_hf(self) -> HFTokenizer:
        """The wrapped tokenizer itself (not a copy)."""
        return self.hf


def _first_token_id(hf: Any, names: Sequence[str]) -> int | None:
    for name in names:
        tid = hf.token_to_id(name)
        if tid is not None:
            return int(tid)
    return None


def _read_texts(files: list[Path]) -> list[str]:
    """UTF-8 contents of `files`; files that are not valid UTF-8 or unreadable are left out."""
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def train_bpe(files: list[Path], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on `files` (the training split only) with Hugging Face tokenizers."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<eos>", "<pad>"]
    if vocab_size < len(alphabet) + len(specials):
        raise ConfigError(
            f"data.bpe_vocab_size must be >= {len(alphabet) + len(specials)} "
            f"(256 bytes + {len(specials)} specials), got {vocab_size}"
        )
    # Read the files ourselves rather than tok.train(paths): the Rust reader fails on the first
    # non-UTF-8 file, while the rest of the pipeline skips such files.
    texts = _read_texts(files)
    if not texts:
        raise DataError("cannot train a BPE tokenizer: no readable UTF-8 training files")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,  # every byte is a token, so nothing is ever <unk>
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return BPETokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory written by `Tokenizer.save` or any Hugging Face tokenizer.json."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise CheckpointError(f"tokenizer not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt tokenizer file {p}: {str(e).splitlines()[0]}") from None
    if isinstance(spec, dict) and spec.get("type") == _BYTES_FORMAT:
        tok = ByteTokenizer()
        if spec.get("vocab_size") != tok.vocab_size or spec.get("special_tokens") != tok._SPECIALS:
            raise CheckpointError(f"corrupt tokenizer file {p}: unexpected byte tokenizer layout")
        return tok
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # the Rust parser raises a bare Exception
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupt tokenizer file {p}: {msg}") from None
    try:
        return BPETokenizer(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None


def _bpe_cache_key(train_files: list[Path], vocab_size: int) -> str:
    entries = []
    for f in train_files:
        st = f.stat()
        entries.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return _short_hash({"recipe": _BPE_RECIPE_VERSION, "vocab_size": vocab_size, "files": entries})


def make_tokenizer(
    spec: str, train_files: list[Path], vocab_size: int, cache_dir: str | Path | None = None
) -> Tokenizer:
    """`spec` is "bytes", "bpe" (trained on `train_files`, cached) or a tokenizer path."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "bpe":
        if not train_files:
            raise DataError("cannot train a BPE tokenizer: the training split has no files")
        if cache_dir is None:
            return train_bpe(train_files, vocab_size)
        key = _bpe_cache_key(train_files, vocab_size)
        cached = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
        if cached.is_file():
            try:
                return load_tokenizer(cached)
            except CheckpointError:
                pass  # unreadable cache entry: retrain and overwrite it
        tok = train_bpe(train_files, vocab_size)
        _atomic_write_text(cached, tok.hf.to_str() + "\n")
        return tok
    if not Path(spec).exists():
        raise ConfigError(
            f"data.tokenizer must be 'bytes', 'bpe' or a path to a tokenizer.json; "
            f"no such file or directory: {spec}"
        )
    return load_tokenizer(spec)
