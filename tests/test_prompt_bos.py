"""Prompts start with bos exactly when the model's source says so (`Tokenizer.add_bos`,
`encode_prompt`), checked against independent references: transformers' own `AutoTokenizer` on
tiny Hugging Face Llama folders, and the `sentencepiece` package (`add_bos=True`) on a model
trained here as Meta's tokenizer.model stand-in. Training data (`encode`) never gets one, and
models trained by multitoken keep their prompt ids exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import multitoken.codeeval as codeeval
import multitoken.commands.generate as generate_command
import multitoken.decoding.generate as decoding_generate
from conftest import tiny_model
from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.cli import _print_sample
from multitoken.errors import CheckpointError
from multitoken.interop import export_hf_tokenizer, main
from multitoken.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
    post_processor_adds_bos,
    train_bpe,
)
from test_meta import MetaArgs, _train_spm, meta_model, write_release

transformers = pytest.importorskip("transformers")

TEXTS = ["def f(x):\n    return x + 1\n", "hello world", " print(self)", "value = 42", ""]
WORDS = ["def", "return", "value", "hello", "world", "x", "f", "=", "+", "(", ")", ":", "1",
         "42", "print", "self"]


def _llama_tokenizer(template_bos: bool, *, sequence: bool = False) -> HFTokenizer:
    """A small Llama-style BPE (Metaspace, <unk> <s> </s>) trained here; with `template_bos`
    its post-processor puts <s> first, as Llama's tokenizer.json does (inside a Sequence, as
    Llama 3's, with `sequence`)."""
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=gen))
             for _ in range(200)] + ["\n    \t"]
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    if template_bos:
        bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                            special_tokens=[("<s>", hf.token_to_id("<s>"))])
        hf.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
                             if sequence else bos)
    return hf


def _hf_dir(d: Path, hf: HFTokenizer, add_bos_token: bool | None, *,
            with_model: bool = True) -> Path:
    """A Hugging Face Llama folder: tokenizer.json, tokenizer_config.json (add_bos_token when
    given), and a tiny random LlamaForCausalLM made by transformers."""
    d.mkdir(parents=True)
    hf.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if with_model:
        config = transformers.LlamaConfig(
            vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=hf.token_to_id("<s>"), eos_token_id=hf.token_to_id("</s>"))
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d


def _config_add_bos(d: Path) -> bool:
    return json.loads((d / "tokenizer_config.json").read_text())["add_bos_token"]


@pytest.mark.parametrize("add_bos", [True, False])
def test_converted_hf_llama_prompts_as_transformers(tmp_path: Path, add_bos: bool) -> None:
    src = _hf_dir(tmp_path / "hf", _llama_tokenizer(template_bos=add_bos), add_bos)
    auto = transformers.AutoTokenizer.from_pretrained(src)
    assert main(["--hf", str(src), "--out", str(tmp_path / "ck")]) == 0
    _, tok = load_checkpoint(tmp_path / "ck")
    assert tok.add_bos is add_bos and tok.bos_id == auto.bos_token_id
    for s in TEXTS:
        ids = tok.encode_prompt(s)
        assert ids == auto(s).input_ids, s
        assert (ids[:1] == [tok.bos_id]) is add_bos, s
        # training data: never a bos
        assert tok.encode(s) == auto(s, add_special_tokens=False).input_ids, s
    assert _config_add_bos(tmp_path / "ck" / "tokenizer") is add_bos

    # --to-hf writes it back, for transformers and for `convert --hf`.
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "out")]) == 0
    assert _config_add_bos(tmp_path / "out") is add_bos
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for s in TEXTS:
        assert exported(s).input_ids == tok.encode_prompt(s), s
    assert main(["--hf", str(tmp_path / "out"), "--out", str(tmp_path / "back")]) == 0
    _, back = load_checkpoint(tmp_path / "back")
    assert back.add_bos is add_bos
    assert [back.encode_prompt(s) for s in TEXTS] == [tok.encode_prompt(s) for s in TEXTS]


def test_what_decides_add_bos_for_an_imported_tokenizer(tmp_path: Path) -> None:
    def imported(name: str, template_bos: bool, add_bos_token: bool | None,
                 sequence: bool = False) -> bool:
        d = _hf_dir(tmp_path / name, _llama_tokenizer(template_bos, sequence=sequence),
                    add_bos_token, with_model=False)
        return load_tokenizer(d / "tokenizer.json", imported=True).add_bos

    assert imported("config-wins", template_bos=True, add_bos_token=False) is False
    assert imported("config-true", template_bos=False, add_bos_token=True) is True
    assert imported("template", template_bos=True, add_bos_token=None) is True
    assert imported("llama3", template_bos=True, add_bos_token=None, sequence=True) is True
    assert imported("plain", template_bos=False, add_bos_token=None) is False
    # Not imported, and no add_bos_token beside it (a checkpoint written before the flag
    # existed): False, as it decoded then.
    (tmp_path / "old").mkdir()
    _llama_tokenizer(template_bos=True).save(str(tmp_path / "old" / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "old").add_bos is False
    # A bad value is one line naming the file.
    (tmp_path / "old" / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}')
    with pytest.raises(CheckpointError, match="tokenizer_config.json: add_bos_token must be "
                       "true or false") as e:
        load_tokenizer(tmp_path / "old")
    assert "\n" not in str(e.value)


def test_add_bos_without_a_bos_token_is_refused(tmp_path: Path) -> None:
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "<eos>": 1}, merges=[]))
    (tmp_path / "t").mkdir()
    hf.save(str(tmp_path / "t" / "tokenizer.json"))
    (tmp_path / "t" / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    with pytest.raises(CheckpointError, match="add_bos_token is true but the tokenizer has no "
                       "beginning-of-sequence token"):
        load_tokenizer(tmp_path / "t", imported=True)


def test_export_follows_the_flag_not_the_foreign_post_processor(tmp_path: Path) -> None:
    """add_bos_token false beside a bos-inserting post-processor: the exported tokenizer.json
    must not insert bos either, and the tokenizer itself is left as it is."""
    d = _hf_dir(tmp_path / "hf", _llama_tokenizer(template_bos=True), False, with_model=False)
    tok = load_tokenizer(d / "tokenizer.json", imported=True)
    assert isinstance(tok, BPETokenizer) and tok.add_bos is False
    before = tok.fingerprint()
    export_hf_tokenizer(tok, tmp_path / "out", max_seq_len=64)
    assert post_processor_adds_bos(tok.hf, tok.bos_id)  # unchanged
    assert tok.fingerprint() == before
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for s in TEXTS:
        assert auto(s).input_ids == tok.encode_prompt(s) == tok.encode(s), s
    assert _config_add_bos(tmp_path / "out") is False


def test_bytes_and_trained_tokenizers_never_add_bos(tmp_path: Path) -> None:
    byte = ByteTokenizer()
    assert byte.add_bos is False
    for s in TEXTS + ["héllo ✓"]:
        assert byte.encode_prompt(s) == byte.encode(s) == list(s.encode("utf-8"))
    save_checkpoint(tmp_path / "ck", tiny_model(vocab_size=260), byte)
    _, back = load_checkpoint(tmp_path / "ck")
    assert back.add_bos is False and back.encode_prompt("def f") == list(b"def f")
    # The byte checkpoint is written as before: no new file beside its tokenizer.json.
    assert sorted(p.name for p in (tmp_path / "ck" / "tokenizer").iterdir()) == \
        ["tokenizer.json"]
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "out")]) == 0
    assert _config_add_bos(tmp_path / "out") is False
    assert load_tokenizer(tmp_path / "out").add_bos is False  # read back as it was exported
    # A BPE trained here, and a foreign tokenizer a model is trained from scratch with.
    (tmp_path / "corpus.py").write_text("def f(x):\n    return x + 1\n" * 50)
    bpe = train_bpe([tmp_path / "corpus.py"], 300)
    assert bpe.add_bos is False and bpe.encode_prompt("def f") == bpe.encode("def f")
    bpe.save(tmp_path / "bpe")
    assert load_tokenizer(tmp_path / "bpe").add_bos is False
    src = _hf_dir(tmp_path / "hf", _llama_tokenizer(template_bos=True), True, with_model=False)
    assert load_tokenizer(src, imported=True).add_bos is True
    scratch = make_tokenizer(str(src), [], 0)
    assert scratch.add_bos is False and scratch.encode_prompt("x") == scratch.encode("x")


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return _train_spm(420)


def test_sentencepiece_prompts_start_with_bos(spm_model: bytes, tmp_path: Path) -> None:
    ref = spm.SentencePieceProcessor(model_proto=spm_model)
    args = MetaArgs(dim=32, n_layers=3, n_heads=4, vocab_size=420, n_future_tokens=2)
    release = tmp_path / "release"
    write_release(meta_model(args), release / "7B_tiny_2")
    (release / "tokenizer.model").write_bytes(spm_model)
    assert main(["--meta", str(release / "7B_tiny_2"), "--out", str(tmp_path / "ck"),
                 "--max-seq-len", "64"]) == 0
    model, tok = load_checkpoint(tmp_path / "ck")
    assert isinstance(tok, SentencePieceTokenizer) and tok.add_bos is True
    for s in TEXTS:
        assert tok.encode_prompt(s) == ref.encode(s, add_bos=True), s
        assert tok.encode(s) == ref.encode(s), s
    assert _config_add_bos(tmp_path / "ck" / "tokenizer") is True

    # --to-hf: transformers prompts the export the same way; `convert --hf` reads it back.
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "out")]) == 0
    assert _config_add_bos(tmp_path / "out") is True
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for s in TEXTS:
        assert auto(s).input_ids == ref.encode(s, add_bos=True), s
        assert auto(s, add_special_tokens=False).input_ids == ref.encode(s), s
    assert main(["--hf", str(tmp_path / "out"), "--out", str(tmp_path / "back")]) == 0
    _, back = load_checkpoint(tmp_path / "back")
    assert back.add_bos is True and back.encode_prompt(TEXTS[0]) == ref.encode(TEXTS[0],
                                                                              add_bos=True)

    # A checkpoint converted before the flag existed has no tokenizer_config.json: False.
    (tmp_path / "ck" / "tokenizer" / "tokenizer_config.json").unlink()
    _, old = load_checkpoint(tmp_path / "ck")
    assert old.add_bos is False and old.encode_prompt("x") == ref.encode("x")


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every prompt handed to `generate` by the commands under test."""
    calls: list = []
    real = decoding_generate.generate

    def spy(model, prompts, *args, **kwargs):
        calls.append(prompts)
        return real(model, prompts, *args, **kwargs)

    for module in (generate_command, codeeval, decoding_generate):
        monkeypatch.setattr(module, "generate", spy)
    return calls


@pytest.mark.parametrize("kind", ["hf-bos", "bytes"])
def test_prompting_commands_encode_with_encode_prompt(tmp_path: Path, kind: str, seen: list,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "bytes":
        save_checkpoint(tmp_path / "ck", tiny_model(vocab_size=260, max_seq_len=64),
                        ByteTokenizer())
    else:
        src = _hf_dir(tmp_path / "hf", _llama_tokenizer(template_bos=True), True)
        assert main(["--hf", str(src), "--out", str(tmp_path / "ck")]) == 0
    model, tok = load_checkpoint(tmp_path / "ck")
    expected = tok.encode_prompt("hello world")
    assert (expected[:1] == [tok.bos_id]) is (kind != "bytes")
    if kind == "bytes":
        assert expected == list(b"hello world")

    assert generate_command.main(["--checkpoint", str(tmp_path / "ck"), "--prompt",
                                  "hello world", "--max-new-tokens", "2", "--no-stop"]) == 0
    assert seen.pop() == expected
    _print_sample(str(tmp_path / "ck"), "hello world", 2)  # train --sample
    assert seen.pop() == expected
    codeeval.sample_completions(model, tok, [{"task_id": "t", "prompt": "hello world"}], 1,
                                max_new_tokens=2)
    assert seen.pop() == [expected]
    # A prompt cut to fit the context keeps its bos and its last tokens.
    long = "hello world " * 40
    codeeval.sample_completions(model, tok, [{"task_id": "t", "prompt": long}], 1,
                                max_new_tokens=8)
    kept = seen.pop()[0]
    full = tok.encode_prompt(long)
    assert len(full) > model.cfg.max_seq_len and len(kept) + 8 <= model.cfg.max_seq_len
    if kind == "bytes":
        assert kept == full[-len(kept):]
    else:
        assert kept[0] == tok.bos_id and kept[1:] == full[-(len(kept) - 1):]
    capsys.readouterr()
