"""Hugging Face families both ways, against transformers' own models: Llama (with and without
Llama 3.1 rope scaling, in transformers 5's and in the Llama 3.1 files' config layout), Mistral
(with and without a sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim != hidden
/ heads), tied and untied. Each tiny random model is built with transformers' config class,
saved with save_pretrained (safetensors), converted, and compared with transformers: logits of
the full forward (<= 1e-4 in fp32) and greedy decoding through multitoken's KV-cache engine
against transformers' greedy `generate`; then exported with --to-hf and compared again.
Unsupported families and options are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.cli import main as cli_main
from multitoken.config import ModelConfig
from multitoken.decoding.generate import generate
from multitoken.errors import CheckpointError
from multitoken.interop import (
    MTP_JSON,
    MTP_WEIGHTS,
    export_hf,
    hf_config,
    load_hf,
    main,
)
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")

V = 260  # the byte tokenizer's vocabulary, so that the CLI can convert with it
PROMPTS = [[5, 17, 200, 3, 99], [250, 1], [7, 7, 7, 8, 9, 10, 11, 12, 40]]
NEW = 7  # new tokens per prompt: the longest prompt + NEW fits every context below (16)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 0.5,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# With head_dim 16 and theta 5e5 the rotary wavelengths are 6.3, 32, 167, ...: one below
# original / high_freq_factor (8, kept), one between (interpolated), the rest above
# original / low_freq_factor (64, divided by the factor), so every branch of the rule is used.


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(family: str, tie: bool, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return cls(**base)


def _hf_model(config: Any, seed: int = 0) -> Any:
    """transformers' model for `config`, every weight random: norm gains and biases too (which
    transformers initialises to 1 and 0), so that a weight read wrongly changes the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", dict(num_attention_heads=2, num_key_value_heads=1,
                                  rope_parameters=LLAMA3)),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=8)),
    "mistral-window": ("mistral", dict(sliding_window=16)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),  # 4 heads of 16 on hidden 32
}


def _hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _check_same_as_hf(ours: MultiTokenModel, hf: Any, T: int = 16) -> None:
    """Logits of the full forward (head 1) and greedy decoding through the KV-cache engine
    equal transformers'."""
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, heads=[0])[0], hf(idx).logits, atol=1e-4,
                                   rtol=1e-4)
    for prompt in PROMPTS:
        assert generate(ours, prompt, NEW).tokens[0] == _hf_greedy(hf, prompt, NEW), prompt


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_family_loads_decodes_and_exports_like_transformers(tmp_path: Path, case: str,
                                                            tie: bool) -> None:
    family, kw = CASES[case]
    hf = _hf_model(_config(family, tie, **kw))
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    ours = load_hf(tmp_path / "hf")
    cfg = ours.cfg
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.tie_embeddings) == (family == "qwen2",
                                                              family == "qwen3", tie)
    assert cfg.rope_scaling == ("llama3" if case == "llama3-rope" else "none")
    assert cfg.max_seq_len == (16 if case == "mistral-window" else 64)
    _check_same_as_hf(ours, hf)

    export_hf(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    expect = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(family,
                                                                           "LlamaForCausalLM")
    assert written["architectures"] == [expect]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == expect
    _check_same_as_hf(ours, again)
    back = load_hf(tmp_path / "out")
    assert back.cfg == cfg
    for a, b in zip(back.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_llama31_config_layout_loads_with_its_rope_scaling(tmp_path: Path) -> None:
    """Llama 3.1/3.2's config.json: top-level rope_theta plus a rope_scaling dict (not
    transformers 5's rope_parameters). Read as the llama3 scaling it is, not as plain rope."""
    hf = _hf_model(_config("llama", False, num_attention_heads=2, num_key_value_heads=1,
                           rope_parameters=LLAMA3))
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    c = json.loads(path.read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    path.write_text(json.dumps(c))
    # transformers reads this layout as the same model ...
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reread(idx).logits, hf(idx).logits)
    # ... and so does multitoken, scaling included (plain rope with this theta is far off)
    ours = load_hf(tmp_path)
    assert (ours.cfg.rope_scaling, ours.cfg.rope_theta, ours.cfg.rope_factor,
            ours.cfg.rope_low_freq_factor, ours.cfg.rope_high_freq_factor,
            ours.cfg.rope_original_max_len) == ("llama3", 500000.0, 8.0, 0.5, 4.0, 32)
    _check_same_as_hf(ours, hf, T=30)
    plain = MultiTokenModel(ModelConfig(**{**ours.cfg.__dict__, "rope_scaling": "none"}))
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain.eval()(idx)[0] - hf(idx).logits).abs().max() > 1e-2


def test_sliding_window_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A window below max_position_embeddings: the context is clamped to the window (where
    sliding-window attention is full causal attention), and said so; a larger context is
    refused. Beyond the window transformers' Mistral differs from full attention, which is
    why."""
    hf = _hf_model(_config("mistral", False, sliding_window=16))
    hf.save_pretrained(tmp_path / "hf")
    assert load_hf(tmp_path / "hf").cfg.max_seq_len == 16
    assert load_hf(tmp_path / "hf", max_seq_len=12).cfg.max_seq_len == 12
    with pytest.raises(CheckpointError, match="max_seq_len 17 exceeds the model's sliding "
                                              "window \\(16\\)"):
        load_hf(tmp_path / "hf", max_seq_len=17)
    long = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(0))
    full = load_hf(tmp_path / "hf", max_seq_len=12)  # same weights, used past the window below
    full = MultiTokenModel(ModelConfig(**{**full.cfg.__dict__, "max_seq_len": 64}))
    full.load_state_dict(load_hf(tmp_path / "hf").state_dict())
    with torch.no_grad():
        assert (full.eval()(long)[0, :, 16:] - hf(long).logits[:, 16:]).abs().max() > 1e-3
    ByteTokenizer().save(tmp_path / "tok")
    assert main(["--hf", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "ck")]) == 0
    err = capsys.readouterr().err
    assert "note: sliding_window 16 < max_position_embeddings 64" in err
    assert load_checkpoint(tmp_path / "ck")[0].cfg.max_seq_len == 16
    with pytest.raises(CheckpointError, match="sliding window"):
        main(["--hf", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok"),
              "--out", str(tmp_path / "ck2"), "--max-seq-len", "64"])
    # Qwen2 with use_sliding_window and some sliding layers: the same rule
    qw = _hf_model(_config("qwen2", False, use_sliding_window=True, sliding_window=16,
                           max_window_layers=1))
    qw.save_pretrained(tmp_path / "qwen")
    assert load_hf(tmp_path / "qwen").cfg.max_seq_len == 16
    # ... but not without use_sliding_window (Qwen2.5's files: a window that is off)
    qw = _hf_model(_config("qwen2", False, use_sliding_window=False, sliding_window=16))
    qw.save_pretrained(tmp_path / "qwen-off")
    assert load_hf(tmp_path / "qwen-off").cfg.max_seq_len == 64


# -- multitoken models out and back ------------------------------------------------------------

EXPORTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "llama3": dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=0.5,
                   rope_original_max_len=32, n_heads=2, n_kv_heads=1),
    "qkv-bias": dict(qkv_bias=True),
    "qkv-bias-llama3": dict(qkv_bias=True, rope_scaling="llama3", rope_original_max_len=32),
    "qk-norm": dict(qk_norm=True, head_dim_override=16),
    "causal-heads": dict(head_type="causal", qk_norm=True, tie_embeddings=True),
    "token-conditioned": dict(head_type="token_conditioned", qkv_bias=True),
}


def _mt_model(n_future: int, **kw: Any) -> MultiTokenModel:
    """A random multitoken model; norm gains and biases random too."""
    cfg = dict(vocab_size=V, dim=32, n_layers=6, n_heads=4, n_kv_heads=2, n_future=n_future,
               max_seq_len=64, init_std=0.1)
    cfg.update(kw)
    torch.manual_seed(0)
    model = MultiTokenModel(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((0.5 if name.endswith("bias") else 1.0) * torch.randn_like(p)
                        + (0.0 if name.endswith("bias") else 1.0))
    return model


def _arch(cfg: ModelConfig) -> dict[str, Any]:
    """What the model computes: the config without init_std, the FFN width resolved."""
    out = {k: v for k, v in cfg.__dict__.items() if k not in ("init_std", "ffn_hidden")}
    return {**out, "hidden_dim": cfg.hidden_dim}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_n4_model_exports_to_its_family_and_every_head_comes_back(tmp_path: Path,
                                                                   case: str) -> None:
    model = _mt_model(4, **EXPORTS[case])
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    assert main(["--checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    arch = json.loads((out / "config.json").read_text())["architectures"]
    assert arch == [{"qk-norm": "Qwen3ForCausalLM", "causal-heads": "Qwen3ForCausalLM",
                     "qkv-bias": "Qwen2ForCausalLM", "token-conditioned": "Qwen2ForCausalLM",
                     "qkv-bias-llama3": "Qwen2ForCausalLM"}.get(case, "LlamaForCausalLM")]
    meta = json.loads((out / MTP_JSON).read_text())
    assert (meta["n_future"], meta["head_type"]) == (4, model.cfg.head_type)
    assert meta["names"] and all(n.startswith(("heads.1.", "heads.2.", "heads.3."))
                                 for n in meta["names"])
    # transformers: trunk + head 1, logits and greedy decoding
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _check_same_as_hf(model, hf)
    # back with --hf: every head, bit for bit
    assert main(["--hf", str(out), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_checkpoint(tmp_path / "back")
    assert _arch(back.cfg) == _arch(model.cfg)
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    if model.conditioned:  # DeepSeek-V3's module names beside the layer's
        assert {"heads.1.eh_proj.weight", "heads.3.enorm.weight",
                "heads.2.self_attn.q_proj.bias"} <= set(meta["names"])
    for mode in ("chain",) if model.conditioned else ("chain", "tree"):
        assert (generate(back, PROMPTS, NEW, speculative=mode).tokens
                == generate(model, PROMPTS, NEW).tokens)


def test_mtp_heads_files_are_checked(tmp_path: Path) -> None:
    model = _mt_model(3)
    export_hf(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / MTP_JSON).read_text())
    (tmp_path / "a" / MTP_JSON).write_text(json.dumps({**meta, "names": meta["names"][1:]}))
    with pytest.raises(CheckpointError, match="does not hold the weights"):
        load_hf(tmp_path / "a")
    (tmp_path / "a" / MTP_JSON).write_text(json.dumps({**meta, "head_type": "linear"}))
    with pytest.raises(CheckpointError, match="not a multitoken heads description"):
        load_hf(tmp_path / "a")
    (tmp_path / "a" / MTP_JSON).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf(tmp_path / "a")
    (tmp_path / "a" / MTP_JSON).unlink()
    with pytest.raises(CheckpointError, match=f"{MTP_WEIGHTS} without {MTP_JSON}"):
        load_hf(tmp_path / "a")
    # n_future in the JSON that the weights do not have
    export_hf(model, tmp_path / "b")
    (tmp_path / "b" / MTP_JSON).write_text(json.dumps({**meta, "n_future": 4}))
    with pytest.raises(CheckpointError, match="missing"):
        load_hf(tmp_path / "b")
    # a plain export has no heads files and loads as n_future=1
    export_hf(_mt_model(1), tmp_path / "c")
    assert not (tmp_path / "c" / MTP_JSON).exists()
    assert load_hf(tmp_path / "c").n_future == 1


def test_only_the_models_own_safetensors_are_read(tmp_path: Path) -> None:
    """A folder may hold other .safetensors (Mistral's repositories ship consolidated.safetensors
    beside the Hugging Face shards): only model.safetensors or the index's shards are read."""
    hf = _hf_model(_config("mistral", False, sliding_window=None))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read")
    _check_same_as_hf(load_hf(tmp_path), hf)


# -- refusals -----------------------------------------------------------------------------------

SUPPORTED = "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"


def _save_config(d: Path, config: Any) -> Path:
    d.mkdir()
    config.save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["gpt2", "gemma", "phi"])
def test_other_families_are_refused_naming_the_supported_ones(tmp_path: Path,
                                                              name: str) -> None:
    config = {"gpt2": transformers.GPT2Config, "gemma": transformers.GemmaConfig,
              "phi": transformers.PhiConfig}[name]()
    d = _save_config(tmp_path / name, config)
    with pytest.raises(CheckpointError, match=SUPPORTED) as e:
        hf_config(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, why", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope scaling 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope scaling 'dynamic' is not supported"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear",
                                                                  "factor": 2.0}},
     "rope scaling 'linear' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"architectures": ["MysteryForCausalLM"]}, SUPPORTED),
    ({"model_type": "mystery"}, SUPPORTED),
    ({"attention_bias": True}, "attention_bias: true is not supported"),
    ({"mlp_bias": True}, "mlp_bias: true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
     "llama3 rope scaling without 'factor'"),
])
def test_options_that_would_load_wrong_are_refused(tmp_path: Path, change: dict[str, Any],
                                                   why: str) -> None:
    hf = _hf_model(_config("llama", False))
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
    with pytest.raises(CheckpointError, match=why) as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)


def test_cli_refusal_is_one_error_line(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = _save_config(tmp_path / "gpt2", transformers.GPT2Config())
    assert cli_main(["convert", "--hf", str(d), "--out", str(tmp_path / "x")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and SUPPORTED in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, why", [
    (dict(head_type="linear", n_future=1), "linear heads have no Hugging Face equivalent"),
    (dict(head_type="linear", n_future=3), "linear heads have no Hugging Face equivalent"),
    (dict(head_type="anticausal", n_future=3), "anticausal heads"),
    (dict(qk_norm=True, qkv_bias=True), "both q/k norms"),
])
def test_exports_without_a_hugging_face_equivalent_are_refused(tmp_path: Path,
                                                               kw: dict[str, Any],
                                                               why: str) -> None:
    model = _mt_model(**{"n_future": 1, **kw})
    with pytest.raises(CheckpointError, match=why):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
