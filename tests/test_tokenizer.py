"""Tokenizers: byte round-trips, BPE training/saving/loading, and the BPE cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from multitoken.errors import CheckpointError, ConfigError
from multitoken.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)

TEXT = "def héllo(x):\n    return x * 2  # 日本語 ✓ <eos>\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for i in range(4):
        f = root / f"mod{i}.py"
        body = "".join(
            f"def function_{i}_{j}(value):\n    return value + {j}  # café {j}\n\n"
            for j in range(60)
        )
        f.write_text(body, encoding="utf-8")
        files.append(f)
    return files


@pytest.fixture(scope="module")
def bpe(corpus: list[Path]) -> BPETokenizer:
    return train_bpe(corpus, 300)


def test_byte_specials_and_vocab() -> None:
    tok = ByteTokenizer()
    assert tok.name == "bytes"
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (256, 257, 258, 259)


def test_byte_round_trip_non_ascii() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "", "a"]) == [ids, [], [97]]


def test_byte_decode_is_total() -> None:
    tok = ByteTokenizer()
    # Half of a 3-byte character, a lone continuation byte, specials and out-of-range ids.
    bad = [0xE6, 0x97, 0x41, 0x80, tok.eos_id, tok.pad_id, 999, -1, 0x42]
    out = tok.decode(bad)
    assert "A" in out and out.endswith("B") and "\ufffd" in out


def test_byte_save_load(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == tok.fingerprint()


def test_bpe_round_trip(bpe: BPETokenizer) -> None:
    assert bpe.name == "bpe"
    assert bpe.vocab_size == 300
    assert {bpe.eos_id, bpe.pad_id} == {0, 1}
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    # Literal "<eos>" in text stays text: only the pipeline inserts the eos id.
    assert bpe.eos_id not in ids
    assert len(bpe.encode("def function_1_2(value):")) < len("def function_1_2(value):")
    assert bpe.encode_batch([TEXT, "x"]) == [ids, bpe.encode("x")]


def test_bpe_decode_is_total(bpe: BPETokenizer) -> None:
    byte_ff = bpe.hf.token_to_id("ÿ")  # byte-level alphabet symbol for the lone byte 0xFF
    assert isinstance(bpe.decode([byte_ff, bpe.eos_id, -5, 10**6]), str)


def test_bpe_save_load_round_trip(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(TEXT) == bpe.encode(TEXT)
    assert loaded.fingerprint() == bpe.fingerprint()
    # A path straight to the json works too.
    assert load_tokenizer(tmp_path / "ckpt" / "tokenizer.json").fingerprint() == bpe.fingerprint()
    assert bpe.fingerprint() != ByteTokenizer().fingerprint()


def test_load_tokenizer_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nonsense"}}', "[1, 2]"])
def test_load_tokenizer_corrupt(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match="corrupt tokenizer file") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_make_tokenizer_specs(corpus: list[Path], bpe: BPETokenizer, tmp_path: Path) -> None:
    assert isinstance(make_tokenizer("bytes", [], 0), ByteTokenizer)
    bpe.save(tmp_path)
    assert make_tokenizer(str(tmp_path), [], 0).fingerprint() == bpe.fingerprint()
    with pytest.raises(ConfigError, match="no such file"):
        make_tokenizer("bpee", corpus, 300)
    with pytest.raises(ConfigError, match="bpe_vocab_size"):
        make_tokenizer("bpe", corpus, 100)


def test_make_tokenizer_bpe_cache(corpus: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = make_tokenizer("bpe", corpus, 300, cache)
    entries = list((cache / "tokenizers").glob("*.json"))
    assert len(entries) == 1
    mtime = entries[0].stat().st_mtime_ns
    second = make_tokenizer("bpe", corpus, 300, cache)
    assert second.fingerprint() == first.fingerprint()
    assert entries[0].stat().st_mtime_ns == mtime  # loaded, not retrained and rewritten
    # Training is deterministic, and the key depends on the vocab size.
    assert train_bpe(corpus, 300).fingerprint() == first.fingerprint()
    make_tokenizer("bpe", corpus, 280, cache)
    assert len(list((cache / "tokenizers").glob("*.json"))) == 2


def test_byte_to_hf_same_ids_and_text() -> None:
    tok = ByteTokenizer()
    hf = tok.to_hf()
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size
    assert [hf.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>", "<unk>")] == [256, 257, 258, 259]
    # Each byte's symbol is the byte-level alphabet's (what the ByteLevel decoder inverts).
    assert {hf.id_to_token(b) for b in range(256)} == set(pre_tokenizers.ByteLevel.alphabet())
    every_byte = "".join(map(chr, [*range(128), 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF]))
    for text in [TEXT, every_byte, "a\r\n\tb", "", "<eos><pad>"]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
    bad = [0xE6, 0x97, 0x41, 0x80, tok.eos_id, tok.pad_id, 0x42, 0xFF]
    assert hf.decode(bad, skip_special_tokens=True) == tok.decode(bad)


def test_bpe_bos_and_unk_ids(bpe: BPETokenizer) -> None:
    assert bpe.bos_id is None and bpe.unk_id is None  # trained BPEs have <eos> and <pad> only
    assert bpe.to_hf() is bpe.hf
    hf = HFTokenizer.from_str(bpe.hf.to_str())
    hf.add_special_tokens([AddedToken("<s>", special=True), AddedToken("[UNK]", special=True)])
    foreign = BPETokenizer(hf)
    assert (foreign.bos_id, foreign.unk_id) == (300, 301)
    assert (ByteTokenizer().bos_id, ByteTokenizer().unk_id) == (256, 259)
