"""Tokenizers: raw UTF-8 bytes (the paper's byte-level models) or byte-level BPE.

Both kinds save to `<dir>/tokenizer.json` so a checkpoint directory carries its tokenizer, and
both expose a `fingerprint()` used as a cache key for tokenized corpora and to catch a
checkpoint being decoded with the wrong tokenizer.

Special tokens are never produced from text: the literal string "<eos>" in a source file is
encoded as ordinary bytes / merges, exactly like the byte tokenizer does. Document boundaries
are marked only by `eos_id` inserted by the data pipeline, so a corpus cannot forge them.

Both kinds also exist as a Hugging Face `tokenizers.Tokenizer` with the same ids (`to_hf`), which
is what `multitoken convert --to-hf` writes as the exported model's `tokenizer.json`.

A third kind, `SentencePieceTokenizer`, wraps a SentencePiece model file as it is (the Llama 2
`tokenizer.model` of Meta's MTP release): the `sentencepiece` package encodes and decodes, so
its ids are SentencePiece's own; it saves as `<dir>/tokenizer.model`.

Prompts (`encode_prompt`, for decoding) start with bos when `add_bos` says the model was
trained so. It is set where a model is imported (`load_tokenizer(..., imported=True)`, for
`convert --hf / --meta`): a Hugging Face directory's `tokenizer_config.json` `add_bos_token`,
else whether its tokenizer.json post-processor puts bos first (as transformers does); True for
a SentencePiece model (Llama's convention: Meta's generation code prepends bos). It is never
set for the byte tokenizer or a tokenizer a model is trained from scratch with here: the data
pipeline never inserts bos. `save` records it beside the tokenizer as `tokenizer_config.json`
`add_bos_token` (transformers' key), and a checkpoint without that file (written before the
flag existed) loads with False, as it decoded then.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer

from multitoken.errors import CheckpointError, ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"  # a SentencePiece model (Meta's Llama tokenizers), kept as it is
CONFIG_FILE = "tokenizer_config.json"  # beside either: `add_bos_token` (transformers' key)
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
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared cache or checkpoint should be readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    # Whether a prompt starts with bos (`encode_prompt`); see the module docstring.
    add_bos: bool = False

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a model is prompted with for decoding: `encode(text)`, after bos where
        `add_bos` says the model was trained with one. Training data uses `encode` (no bos)."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Never raises on ids that form invalid UTF-8; special ids are skipped."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json` (a SentencePiece model: `directory/tokenizer.model`)
        such that `load_tokenizer(directory)` round-trips."""

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
        _save_add_bos(directory, self.add_bos)

    def fingerprint(self) -> str:
        # `add_bos` is left out: it changes no id `encode` gives, and checkpoints written before
        # it existed must still match their recorded fingerprint.
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


def post_processor_adds_bos(hf: Any, bos_id: int | None) -> bool:
    """Whether encoding with `hf`'s post-processor (add_special_tokens=True, what transformers
    does by default) puts `bos_id` before the text's ids. Asked of the tokenizer itself rather
    than read from the JSON, so every processor kind (TemplateProcessing, a Sequence holding
    one, RobertaProcessing) answers the same way."""
    if bos_id is None or hf.post_processor is None:
        return False
    plain = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    return full[:1] == [bos_id] and full[1:len(plain) + 1] == plain


def hf_for_prompts(tokenizer: Tokenizer) -> HFTokenizer:
    """`tokenizer.to_hf()` whose post-processor puts bos first exactly when `add_bos`, so that
    encoding with its defaults (add_special_tokens=True, as transformers does) gives
    `encode_prompt`'s ids, and without special tokens `encode`'s. A post-processor that
    already agrees is kept; the object `to_hf` returns is never changed."""
    hf = tokenizer.to_hf()
    bos_id = tokenizer.bos_id
    if post_processor_adds_bos(hf, bos_id) == tokenizer.add_bos:
        return hf
    hf = HFTokenizer.from_str(hf.to_str())  # BPETokenizer.to_hf is the wrapped tokenizer itself
    hf.encode_special_tokens = True
    if tokenizer.add_bos and bos_id is not None:
        bos = hf.id_to_token(bos_id)
        # Llama's template: bos before each sequence of a pair too.
        hf.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", f"{bos}:1", "$B:1"],
            special_tokens=[(bos, bos_id)])
    else:
        hf.post_processor = None
    return hf


def _save_add_bos(directory: str | Path, add_bos: bool) -> None:
    _atomic_write_text(Path(directory) / CONFIG_FILE,
                       json.dumps({"add_bos_token": add_bos}, indent=2) + "\n")


def _configured_add_bos(tokenizer_file: Path) -> bool | None:
    """`add_bos_token` of the tokenizer_config.json beside a tokenizer.json or tokenizer.model
    (a Hugging Face directory's, or the one `save` writes); None when there is no such file or
    it does not set the key. A differently named tokenizer file has no such companion."""
    if tokenizer_file.name not in (TOKENIZER_FILE, SPM_FILE):
        return None
    p = tokenizer_file.parent / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt tokenizer file {p}: {str(e).splitlines()[0]}") from None
    value = cfg.get("add_bos_token") if isinstance(cfg, dict) else None
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{p}: add_bos_token must be true or false, got {value!r}")
    return value


def _first_token_id(hf: Any, names: Sequence[str]) -> int | None:
    for name in names:
        tid = hf.token_to_id(name)
        if tid is not None:
            return int(tid)
    return None


# ---------------------------------------------------------------------------------------------
# SentencePiece (Meta's Llama `tokenizer.model`)

# Field numbers of sentencepiece_model.proto (stable: they are the file format).
_PB_PIECES, _PB_TRAINER, _PB_NORMALIZER, _PB_DENORMALIZER = 1, 2, 3, 5
_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED, _SPM_UNUSED = 1, 2, 3, 4, 5
_SPM_BPE = 2
_SPM_SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space


def _pb_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _pb_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """One protobuf message -> {field number: values in order}: varints as ints, fixed32 as
    their 4 raw bytes, length-delimited fields as bytes (strings and sub-messages)."""
    out: dict[int, list[int | bytes]] = {}
    i = 0
    while i < len(buf):
        key, i = _pb_varint(buf, i)
        wire = key & 7
        value: int | bytes
        if wire == 0:
            value, i = _pb_varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        elif wire == 2:
            n, i = _pb_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        out.setdefault(key >> 3, []).append(value)
    return out


@dataclass
class _SpmModel:
    """What a SentencePiece model file says beyond what `SentencePieceProcessor` exposes: piece
    types, the model type and the normalizer options (sentencepiece_model.proto, read from the
    wire format so that no generated protobuf module, tied to one protobuf runtime, is needed)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    normalizer_charsmap: bytes
    denormalizer_charsmap: bytes

    @classmethod
    def parse(cls, proto: bytes) -> _SpmModel:
        top = _pb_fields(proto)

        def sub(n: int) -> dict[int, list[int | bytes]]:
            raw = top.get(n, [b""])[-1]
            return _pb_fields(raw) if isinstance(raw, bytes) else {}

        def get(msg: dict[int, list[int | bytes]], n: int, default: Any) -> Any:
            return msg[n][-1] if n in msg else default

        pieces, scores, types = [], [], []
        for raw in top.get(_PB_PIECES, []):
            p = _pb_fields(raw) if isinstance(raw, bytes) else {}
            pieces.append(bytes(get(p, 1, b"")).decode("utf-8"))
            scores.append(struct.unpack("<f", get(p, 2, bytes(4)))[0])
            types.append(int(get(p, 3, _SPM_NORMAL)))
        trainer, norm, denorm = sub(_PB_TRAINER), sub(_PB_NORMALIZER), sub(_PB_DENORMALIZER)
        return cls(pieces=pieces, scores=scores, types=types,
                   model_type=int(get(trainer, 3, 1)),
                   byte_fallback=bool(get(trainer, 35, 0)),
                   treat_whitespace_as_suffix=bool(get(trainer, 24, 0)),
                   add_dummy_prefix=bool(get(norm, 3, 1)),
                   remove_extra_whitespaces=bool(get(norm, 4, 1)),
                   escape_whitespaces=bool(get(norm, 5, 1)),
                   normalizer_charsmap=bytes(get(norm, 2, b"")),
                   denormalizer_charsmap=bytes(get(denorm, 2, b"")))

    def unsupported_by_hf(self) -> list[str]:
        """Options `to_hf` cannot reproduce exactly (empty for Llama's tokenizer.model)."""
        why = []
        if self.model_type != _SPM_BPE:
            why.append("model type is not BPE")
        if not self.byte_fallback:
            why.append("no byte fallback")
        if self.normalizer_charsmap or self.denormalizer_charsmap:
            why.append("a normalization rule other than 'identity'")
        if self.remove_extra_whitespaces:
            why.append("remove_extra_whitespaces")
        if not self.escape_whitespaces or self.treat_whitespace_as_suffix:
            why.append("whitespace not escaped as a '▁' prefix")
        if _SPM_USER_DEFINED in self.types:
            why.append("user-defined symbols")
        if _SPM_UNUSED in self.types:
            why.append("unused pieces")
        return why


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. the Llama 2 `tokenizer.model` Meta's MTP release ships),
    encoded and decoded by the `sentencepiece` package itself, so the ids are SentencePiece's.

    Saved as `<dir>/tokenizer.model` (the model file, unchanged). Like every tokenizer here it
    adds no bos/eos when encoding and never produces a control token (<s>, </s>) from text.
    """

    name = "sentencepiece"

    def __init__(self, proto: bytes) -> None:
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"not a SentencePiece model: {msg}") from None
        self.sp = sp
        self.proto = proto
        self.vocab_size = int(sp.get_piece_size())
        if sp.eos_id() < 0:
            raise CheckpointError("SentencePiece model has no end-of-sequence token (eos_id = -1)")
        self.eos_id = int(sp.eos_id())
        self.pad_id = int(sp.pad_id()) if sp.pad_id() >= 0 else self.eos_id  # padding is masked
        self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.unk_id = int(sp.unk_id()) if sp.unk_id() >= 0 else None
        # Ids `decode` drops: control tokens (<s>, </s>, ...) and <unk>, as `to_hf` marks them
        # special and exported decoding skips special tokens.
        self._special = {i for i in range(self.vocab_size)
                         if sp.is_control(i) or sp.is_unknown(i)}

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {p}: {e.strerror}") from None
        try:
            return cls(data)
        except CheckpointError as e:
            raise CheckpointError(f"corrupt tokenizer file {p}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(list(texts), out_type=int)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        # SentencePiece raises on an out-of-range id; a padded model vocab can emit one.
        clean = [int(i) for i in ids
                 if 0 <= int(i) < self.vocab_size and int(i) not in self._special]
        return self.sp.decode(clean)

    def save(self, directory: str | Path) -> None:
        _atomic_write_bytes(Path(directory) / SPM_FILE, self.proto)
        _save_add_bos(directory, self.add_bos)

    def fingerprint(self) -> str:
        return _short_hash({"type": "sentencepiece",
                            "sha256": hashlib.sha256(self.proto).hexdigest()})

    def to_hf(self) -> HFTokenizer:
        """The model as a `tokenizers` BPE with byte fallback, built the way Hugging Face converts
        Llama's tokenizer.model: the vocabulary and ids unchanged; merges from the vocabulary,
        ranked by the merged piece's score (SentencePiece merges the highest-scoring pair
        first); normalizer "prepend ▁ (the dummy prefix), spaces -> ▁"; decoder "▁ -> space,
        byte pieces -> bytes, drop the dummy prefix's space". Only Llama-style models convert:
        anything else is refused rather than exported with different ids.

        Encoding gives SentencePiece's ids. Decoding gives `decode`'s text except where byte
        pieces form invalid UTF-8: there Hugging Face's ByteFallback decoder replaces the whole
        run of bytes with U+FFFD, SentencePiece only the invalid bytes."""
        try:
            m = _SpmModel.parse(self.proto)
        except (ValueError, IndexError) as e:  # sentencepiece loaded it, so unlikely
            raise CheckpointError(f"cannot read the SentencePiece model file: {e}") from None
        why = m.unsupported_by_hf()
        if why:
            raise CheckpointError("cannot express this SentencePiece model as a tokenizer.json: "
                                  + ", ".join(why))
        vocab = {piece: i for i, piece in enumerate(m.pieces)}
        normal = {p for p, t in zip(m.pieces, m.types) if t == _SPM_NORMAL}
        ranked = sorted((i for i, t in enumerate(m.types) if t == _SPM_NORMAL),
                        key=lambda i: (-m.scores[i], i))
        merges = []
        for i in ranked:
            piece = m.pieces[i]
            for k in range(1, len(piece)):
                if piece[:k] in normal and piece[k:] in normal:
                    merges.append((piece[:k], piece[k:]))
        unk = m.types.index(_SPM_UNKNOWN) if _SPM_UNKNOWN in m.types else None
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                    unk_token=None if unk is None else m.pieces[unk]))
        steps = [normalizers.Replace(" ", _SPM_SPACE)]
        if m.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend(_SPM_SPACE))
        hf.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if m.add_dummy_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        hf.decoder = decoders.Sequence(dec)
        hf.add_special_tokens([AddedToken(p, special=True, normalized=False)
                               for p, t in zip(m.pieces, m.types)
                               if t in (_SPM_CONTROL, _SPM_UNKNOWN)])
        hf.encode_special_tokens = True
        return hf


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


def load_tokenizer(path: str | Path, *, imported: bool = False) -> Tokenizer:
    """Load a directory written by `Tokenizer.save`, any Hugging Face tokenizer.json, or a
    SentencePiece model (a `.model` file, or a directory holding `tokenizer.model` and no
    `tokenizer.json`).

    `add_bos` is the `add_bos_token` of a tokenizer_config.json beside tokenizer.json /
    tokenizer.model. Where that says nothing it is False, unless `imported` (the tokenizer of a
    model from elsewhere): then it is what the tokenizer itself does, see `source_adds_bos`.
    The byte tokenizer never adds bos."""
    p = Path(path)
    if p.is_dir():
        if (p / SPM_FILE).is_file() and not (p / TOKENIZER_FILE).exists():
            p = p / SPM_FILE
        else:
            p = p / TOKENIZER_FILE
    tok = _load_tokenizer_file(p)
    if isinstance(tok, ByteTokenizer):
        return tok
    add_bos = _configured_add_bos(p)
    if add_bos is None:
        add_bos = imported and source_adds_bos(tok)
    if add_bos and tok.bos_id is None:
        raise CheckpointError(f"{p.parent / CONFIG_FILE}: add_bos_token is true but the "
                              f"tokenizer has no beginning-of-sequence token (looked for "
                              f"{', '.join(_BOS_NAMES)})")
    tok.add_bos = add_bos
    return tok


def source_adds_bos(tok: Tokenizer) -> bool:
    """Whether the model a tokenizer came with expects bos first when nothing says otherwise:
    a Hugging Face tokenizer.json when its post-processor puts bos first (Llama 3's does, and
    transformers encodes prompts with it); a SentencePiece model when it has a bos (Meta's
    Llama generation code prepends it to every prompt)."""
    if isinstance(tok, BPETokenizer):
        return post_processor_adds_bos(tok.hf, tok.bos_id)
    return isinstance(tok, SentencePieceTokenizer) and tok.bos_id is not None


def _load_tokenizer_file(p: Path) -> Tokenizer:
    if p.suffix == ".model" and p.is_file():
        return SentencePieceTokenizer.from_file(p)
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
    tok = load_tokenizer(spec)
    # A model trained from scratch here sees no bos (the pipeline only separates documents with
    # eos), so it is prompted without one, whatever a tokenizer_config.json beside it says.
    tok.add_bos = False
    return tok
