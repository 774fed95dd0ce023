"""Interop: Meta's MTP release and Hugging Face models, by renaming weights (docs/weights.md).

    load_meta(dir)            params.json + consolidated.00.pth -> MultiTokenModel (all heads)
    hf_config(dir)            a Hugging Face config.json -> ModelConfig, or a one-line refusal
    load_hf(dir)              a Hugging Face Llama, Mistral, Qwen2 or Qwen3 directory
                              (safetensors) -> n_future=1 model, or every head when the
                              directory has mtp_heads.json + mtp_heads.safetensors
    export_hf(model, dir, tokenizer)  trunk + head 1 -> a directory of the Hugging Face family
                              whose layers are the model's (Llama, Qwen2 or Qwen3: `hf_family`),
                              heads 2..n beside it in mtp_heads.*; safetensors, config.json,
                              generation_config.json, tokenizer files

No modelling code is copied or forked: the model is ours, the formats are theirs. Meta's
`.pth` is read with `torch.load(weights_only=True)` (no arbitrary unpickling). Meta's rotary
embedding rotates interleaved pairs (2j, 2j+1); ours (and Hugging Face's) rotates halves
(j, j + hd/2), so Meta's wq/wk rows are permuted on load exactly as Hugging Face's own Llama
conversion script does. Hugging Face models need no permutation.

What is read from Hugging Face is what loads exactly: the families in HF_FAMILIES, rotary
`default` or `llama3`; anything else (another family, another rope type, biases or
activations the family does not have, quantized weights) is refused with one line naming the
supported ones, never loaded approximately. A sliding window is not modelled: such a model is
loaded with a context of at most its window, where it changes nothing (`_hf_context`).

An export loads with `AutoTokenizer` + `AutoModelForCausalLM` and decodes with `generate` as
multitoken does: the tokenizer gives the ids multitoken's `encode_prompt` gives for every text
(bos first exactly when the tokenizer's `add_bos` says so; bytes included, as a byte-level
`tokenizer.json`), and eos/bos/pad ids are in `config.json` and
`generation_config.json`. The JSON files are written directly, so exporting does not need
`transformers` installed; the tests load every file with `transformers` itself.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from multitoken import cliargs
from multitoken.checkpoint import (
    build_loaded,
    check_tokenizer,
    dtype_name,
    load_checkpoint,
    new_output_dir,
    read_weights,
    save_checkpoint,
)
from multitoken.config import ModelConfig
from multitoken.errors import CheckpointError, MultitokenError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import SPM_FILE, Tokenizer, hf_for_prompts, load_tokenizer

_LAYER = {  # ours -> Hugging Face, inside one transformer layer
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's FFN width rule (Meta's reference code)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def interleaved_to_halves(w: Tensor, n_heads: int) -> Tensor:
    """Permute the rows of a Meta q/k projection [n_heads * hd, D] from interleaved rotary
    pairs to rotate-half pairs (the permutation of HF's convert_llama_weights_to_hf.py)."""
    out, d = w.shape
    hd = out // n_heads
    return w.view(n_heads, hd // 2, 2, d).transpose(1, 2).reshape(out, d)


def _finish(cfg: ModelConfig, sd: dict[str, Tensor], where: Path,
            dtype: torch.dtype | Literal["auto"] | None) -> MultiTokenModel:
    """The model of `cfg` holding `sd` (our names), on the CPU, in `dtype` (None: fp32, "auto":
    the dtype most of the source's weights are in). `build_loaded` (shared with
    `load_checkpoint`): built on the meta device, each tensor cast once, never via fp32; `sd`
    holds views of the source file's memory map (see `read_weights`), whose pages the
    system can drop."""
    return build_loaded(cfg, sd, where, dtype, torch.device("cpu"))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _meta_weight_names(n_layers: int, n_future: int) -> set[str]:
    """Every weight Meta's MTP `model.py` has: `layers` holds the trunk and, last, head 1
    (`n_layers - n_future + 1` blocks); `extra_heads` holds heads 2..n (`n_future - 1` blocks)."""
    blocks = [f"layers.{i}" for i in range(n_layers - n_future + 1)]
    blocks += [f"extra_heads.{i}" for i in range(n_future - 1)]
    return ({"tok_embeddings.weight", "norm.weight", "output.weight"}
            | {f"{b}.{w}" for b in blocks for w in _LAYER})


def _meta_config(p: dict[str, Any], raw: dict[str, Tensor], max_seq_len: int,
                 where: Path) -> ModelConfig:
    """params.json -> ModelConfig. Both count every layer in `n_layers` (Meta's 7B n=4: 32 =
    28 trunk + head 1 + 3 extra heads), so it carries over as it is."""
    try:
        n_future = int(p.get("n_future_tokens", 1))
        n_layers = int(p["n_layers"])
        if n_future < 1 or n_layers < n_future:
            raise CheckpointError(
                f"{where}: n_layers ({n_layers}) must be >= n_future_tokens ({n_future}) >= 1: "
                "n_layers counts every layer, the trunk's and each head's")
        n_heads = int(p["n_heads"])
        n_kv = int(p.get("n_kv_heads") or n_heads)
        dim = int(p["dim"])
        vocab = int(p.get("vocab_size", -1))
        if vocab <= 0:  # Meta's params.json may leave it to the tokenizer (-1)
            vocab = int(raw["tok_embeddings.weight"].shape[0])
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv if n_kv != n_heads else None,
            ffn_hidden=_meta_hidden_dim(dim, int(p.get("multiple_of", 256)),
                                        p.get("ffn_dim_multiplier")),
            norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 1e4)),
            max_seq_len=max_seq_len, n_future=n_future)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot build a model config: {e}") from None


def load_meta(directory: str | Path, *, max_seq_len: int = 4096,
              dtype: torch.dtype | Literal["auto"] | None = None) -> MultiTokenModel:
    """Meta's MTP release (`params.json` + `consolidated.00.pth` or `consolidated.pth`) as a
    MultiTokenModel with all of its heads, in `dtype` (None: fp32; "auto": as stored, bf16
    for Meta's release).

    Meta's `layers.{0..n_layers - n_future}`: the trunk, then head 1 (the last one);
    `extra_heads.{j}`: head j + 2. Every head reads the trunk's output (see docs/weights.md).
    """
    d = Path(directory)
    p = _read_json(d / "params.json")
    shards = sorted(d.glob("consolidated*.pth"))
    if len(shards) != 1:
        raise CheckpointError(f"{d}: expected exactly one consolidated.*.pth (model-parallel "
                              f"shards are not supported), found {len(shards)}")
    try:
        raw = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot read {shards[0]}: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{shards[0]} is not a state dict")
    cfg = _meta_config(p, raw, max_seq_len, d / "params.json")
    # rope.freqs: Meta's precomputed rotary table (Llama checkpoints); ours comes from rope_theta.
    names = {k for k in raw if k != "rope.freqs"}
    expected = _meta_weight_names(cfg.n_layers, cfg.n_future)
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{shards[0]} does not match params.json (n_layers={cfg.n_layers}, "
            f"n_future_tokens={cfg.n_future}): missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}")
    n_trunk = cfg.n_trunk_layers
    sd: dict[str, Tensor] = {}
    for name in names:
        t = raw[name]
        kind, _, rest = name.partition(".")
        if kind in ("layers", "extra_heads"):
            idx, _, weight = rest.partition(".")
            i = int(idx) if kind == "layers" else n_trunk + 1 + int(idx)  # Meta's layer number
            ours = f"layers.{i}.{weight}" if i < n_trunk else f"heads.{i - n_trunk}.{weight}"
            if weight == "attention.wq.weight":
                t = interleaved_to_halves(t, cfg.n_heads)
            elif weight == "attention.wk.weight":
                t = interleaved_to_halves(t, cfg.kv_heads)
        else:
            ours = name
        sd[ours] = t
    return _finish(cfg, sd, shards[0], dtype)


def meta_tokenizer_path(directory: str | Path) -> Path:
    """Meta's `tokenizer.model`: the release ships one beside its checkpoint folders
    (`tokenizer.model`, `7B_1T_4/`, ...), so look in `directory`, then in its parent."""
    d = Path(directory)
    for cand in (d / SPM_FILE, d.parent / SPM_FILE):
        if cand.is_file():
            return cand
    raise CheckpointError(f"no {SPM_FILE} in {d} or {d.parent}; give the tokenizer with "
                          "--tokenizer")


# -- Hugging Face: families, config.json -> ModelConfig ---------------------------------------

# model_type -> the one architecture of that family that is read and written. What each adds to
# Llama's layer: Mistral nothing (its sliding window: see _hf_context), Qwen2 q/k/v biases,
# Qwen3 q/k RMSNorm per head (and head_dim set freely).
HF_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_SUPPORTED = ("supported: " + ", ".join(HF_FAMILIES.values())
              + " (rope_type default or llama3)")

_HF_OPTIONS = {  # ours -> Hugging Face, weights that only some families' layers have
    "attention.wq.bias": "self_attn.q_proj.bias",  # qkv_bias (Qwen2)
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # qk_norm (Qwen3)
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_HF_LAYER = {**_LAYER, **_HF_OPTIONS}

# Heads 2..n beside an exported Hugging Face model (written by export_hf, read by load_hf).
MTP_WEIGHTS, MTP_JSON, MTP_FORMAT = "mtp_heads.safetensors", "mtp_heads.json", "multitoken-mtp-heads"
MTP_HEAD_TYPES = ("transformer", "causal", "token_conditioned")
# Token-conditioned heads 2..n: DeepSeek-V3's MTP-module names (eh_proj, enorm, hnorm beside
# the module's decoder layer, whose weights carry the family's layer names).
_TC_EXTRA = ("eh_proj.weight", "hnorm.weight", "enorm.weight")


def _mtp_names(cfg: ModelConfig) -> dict[str, str]:
    """A draft head's weight names, ours -> mtp_heads.safetensors' (after `heads.{i}.`)."""
    if cfg.head_type != "token_conditioned":
        return dict(_HF_LAYER)
    return {**{f"block.{k}": v for k, v in _HF_LAYER.items()}, **{k: k for k in _TC_EXTRA}}


def _hf_rope(c: dict[str, Any], where: Path) -> dict[str, Any]:
    """The rotary settings of a config.json as ModelConfig fields. Both layouts are read:
    transformers 5's `rope_parameters` (theta inside) and the older top-level `rope_theta` with
    a `rope_scaling` dict (`rope_type` or `type`), the layout of Llama 3.1/3.2's files."""
    found = [r for r in (c.get("rope_parameters"), c.get("rope_scaling")) if r]
    for r in found:
        if not isinstance(r, dict) or any(isinstance(v, dict) for v in r.values()):
            raise CheckpointError(f"{where}: rope parameters {r!r} are not one flat mapping "
                                  f"(per-layer rope is not supported); {_SUPPORTED}")
    kinds = {r.get("rope_type", r.get("type", "default")) for r in found} or {"default"}
    if len(kinds) > 1:
        raise CheckpointError(f"{where}: rope_parameters and rope_scaling disagree "
                              f"({sorted(kinds)})")
    kind = kinds.pop()
    params: dict[str, Any] = {k: v for r in found for k, v in r.items()}
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor != 1 is not supported")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported; {_SUPPORTED}")
    try:
        return {**out, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                # transformers' fallbacks, in its order
                "rope_original_max_len": int(params.get(
                    "original_max_position_embeddings",
                    c.get("original_max_position_embeddings", c["max_position_embeddings"])))}
    except KeyError as e:
        raise CheckpointError(f"{where}: llama3 rope scaling without {e}") from None


def _hf_window(c: dict[str, Any], model_type: str, where: Path) -> int | None:
    """The sliding window that some layer of the model attends with, or None: Mistral's
    `sliding_window`; Qwen2/3's only with `use_sliding_window` (then on the layers that
    `layer_types` marks, or those from `max_window_layers` on), as transformers reads them."""
    if model_type == "llama":
        return None
    window = c.get("sliding_window")
    if model_type == "mistral" or window is None:
        return None if window is None else int(window)
    if not c.get("use_sliding_window", False):
        return None
    n = int(c["num_hidden_layers"])
    kinds = c.get("layer_types")
    if kinds is not None:
        if set(kinds) - {"full_attention", "sliding_attention"}:
            raise CheckpointError(f"{where}: layer_types {sorted(set(kinds))} are not supported")
        sliding = "sliding_attention" in kinds
    else:
        sliding = int(c.get("max_window_layers", n)) < n
    return int(window) if sliding else None


def _hf_context(c: dict[str, Any], model_type: str, max_seq_len: int | None,
                where: Path) -> tuple[int, list[str]]:
    """The context to load with, and notes on how it was chosen.

    multitoken has no sliding-window attention. A causal query attends to at most
    max_seq_len keys, its own included, and a window of W keys (transformers: key position >
    query position - W) hides none of them while max_seq_len <= W: within that context the
    sliding window IS full causal attention. So a model whose layers slide is loaded with a
    context of at most its window: by default min(max_position_embeddings, W), said in a
    note; a larger `max_seq_len` is refused.
    """
    mpe = int(c.get("max_position_embeddings", 4096))
    window = _hf_window(c, model_type, where)
    if max_seq_len is not None:
        if window is not None and max_seq_len > window:
            raise CheckpointError(
                f"{where}: max_seq_len {max_seq_len} exceeds the model's sliding window "
                f"({window}); multitoken has no sliding-window attention and loads such a "
                f"model with a context of at most the window")
        return max_seq_len, []
    if window is not None and window < mpe:
        return window, [f"sliding_window {window} < max_position_embeddings {mpe}: context "
                        f"(max_seq_len) set to {window}, within which sliding-window attention "
                        f"is full causal attention (multitoken has no sliding window)"]
    return mpe, []


@dataclass(frozen=True)
class HFImport:
    """What `config.json` (and `mtp_heads.json`, if any) of a Hugging Face directory say."""

    model_type: str  # a key of HF_FAMILIES
    config: ModelConfig
    notes: tuple[str, ...]  # how the context was chosen, if not max_position_embeddings


def hf_config(directory: str | Path, *, max_seq_len: int | None = None) -> HFImport:
    """Read a Hugging Face directory's config.json (+ mtp_heads.json) into a ModelConfig, or
    refuse with one CheckpointError line anything that would not load exactly."""
    d = Path(directory)
    c = _read_json(d / "config.json")
    mt, archs = c.get("model_type"), c.get("architectures")
    if mt not in HF_FAMILIES:
        raise CheckpointError(f"{d}: model_type {mt!r} (architectures {archs}) is not "
                              f"supported; {_SUPPORTED}")
    if archs is not None and archs != [HF_FAMILIES[mt]]:
        raise CheckpointError(f"{d}: architectures {archs} is not supported; {_SUPPORTED}")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{d}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    for key in ("attention_bias", "mlp_bias"):  # Qwen2's q/k/v biases are not a config key
        if c.get(key):
            raise CheckpointError(f"{d}: {key}: true is not supported ({_SUPPORTED})")
    if c.get("quantization_config"):
        raise CheckpointError(f"{d}: quantized weights are not supported")
    mtp = _read_mtp_json(d)
    n_future = 1 if mtp is None else mtp["n_future"]
    try:
        n = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        dim = int(c["hidden_size"])
        head_dim = c.get("head_dim")
        context, notes = _hf_context(c, mt, max_seq_len, d / "config.json")
        cfg = ModelConfig(
            vocab_size=int(c["vocab_size"]), dim=dim, n_layers=n + n_future - 1,
            n_heads=heads, n_kv_heads=kv if kv != heads else None,
            ffn_hidden=int(c["intermediate_size"]), norm_eps=float(c["rms_norm_eps"]),
            max_seq_len=context, n_future=n_future,
            head_type="transformer" if mtp is None else mtp["head_type"],
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim_override=(int(head_dim) if head_dim is not None and int(head_dim) * heads
                               != dim else None),
            qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3", **_hf_rope(c, d / "config.json"))
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{d / 'config.json'}: cannot build a model config: {e}") from None
    return HFImport(mt, cfg, tuple(notes))


def _read_mtp_json(d: Path) -> dict[str, Any] | None:
    """mtp_heads.json, checked: None when the directory has no extra heads."""
    path = d / MTP_JSON
    if not path.exists():
        if (d / MTP_WEIGHTS).exists():
            raise CheckpointError(f"{d}: {MTP_WEIGHTS} without {MTP_JSON}")
        return None
    m = _read_json(path)
    n, kind, names = m.get("n_future"), m.get("head_type"), m.get("names")
    if (m.get("format") != MTP_FORMAT or not isinstance(n, int) or n < 2
            or kind not in MTP_HEAD_TYPES or not isinstance(names, list)):
        raise CheckpointError(f"{path}: not a multitoken heads description (format "
                              f"{MTP_FORMAT!r}, n_future >= 2, head_type one of "
                              f"{', '.join(MTP_HEAD_TYPES)}, names)")
    return m


def _hf_weight_files(d: Path) -> list[Path]:
    """The model's safetensors: the shards named by model.safetensors.index.json, else
    model.safetensors. Nothing else is read (a folder may also hold e.g. Mistral's own
    consolidated.safetensors, or mtp_heads.safetensors)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        return [d / f for f in sorted(set(weight_map.values()))]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json "
                          "(pickled .bin files are not read)")


def load_hf(directory: str | Path, *, max_seq_len: int | None = None,
            dtype: torch.dtype | Literal["auto"] | None = None) -> MultiTokenModel:
    """A Hugging Face Llama, Mistral, Qwen2 or Qwen3 directory (config.json + safetensors) as
    a MultiTokenModel: n_future=1, or every head when `--to-hf` wrote mtp_heads.* beside it.
    The last decoder layer is head 1. `max_seq_len`: see `_hf_context` (None: the model's).
    `dtype`: None is fp32, "auto" the dtype of the safetensors (not config.json's)."""
    d = Path(directory)
    spec = hf_config(d, max_seq_len=max_seq_len)
    cfg = spec.config
    raw: dict[str, Tensor] = {}
    for f in _hf_weight_files(d):
        raw.update(read_weights(f))
    n = cfg.n_trunk_layers + 1  # the Hugging Face model's layers: trunk + head 1
    back = {v: k for k, v in _HF_LAYER.items()}
    sd: dict[str, Tensor] = {}
    for name, t in raw.items():
        if name == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            sd["norm.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd["output.weight"] = t
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            if rest not in back:
                raise CheckpointError(f"{d}: unexpected weight {name}")
            i = int(idx)
            prefix = f"layers.{i}" if i < n - 1 else "heads.0"  # the last layer is head 1
            sd[f"{prefix}.{back[rest]}"] = t
        elif not name.endswith("rotary_emb.inv_freq"):
            raise CheckpointError(f"{d}: unexpected weight {name}")
    if cfg.n_future > 1:
        extra = read_weights(d / MTP_WEIGHTS)
        names = _read_json(d / MTP_JSON)["names"]
        back = {v: k for k, v in _mtp_names(cfg).items()}
        if sorted(extra) != sorted(names):
            raise CheckpointError(f"{d / MTP_WEIGHTS} does not hold the weights {MTP_JSON} names")
        for name, t in extra.items():
            head, _, rest = name.partition(".")[2].partition(".")
            if (not name.startswith("heads.") or not head.isdigit()
                    or not 1 <= int(head) < cfg.n_future or rest not in back):
                raise CheckpointError(f"{d / MTP_WEIGHTS}: unexpected weight {name}")
            sd[f"heads.{head}.{back[rest]}"] = t
    return _finish(cfg, sd, d, dtype)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """transformers' special-token roles -> token strings, for the roles the tokenizer has."""
    hf = tokenizer.to_hf()
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
           "pad_token": tokenizer.pad_id, "unk_token": tokenizer.unk_id}
    out: dict[str, str] = {}
    for role, i in ids.items():
        if i is not None and (name := hf.id_to_token(i)) is not None:
            out[role] = name
    return out


def export_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, max_seq_len: int) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` so that
    `transformers.AutoTokenizer.from_pretrained(directory)` encodes every text to the ids
    `tokenizer.encode_prompt` gives (`tokenizer.encode`'s with add_special_tokens=False) and
    decodes them back to the same text.

    Two settings make that hold: `split_special_tokens` (a literal "<eos>" in a text is text, as
    in multitoken's data pipeline) and `clean_up_tokenization_spaces: false` (transformers would
    otherwise delete spaces before punctuation when decoding). Bos is prepended exactly when
    `tokenizer.add_bos` (never for models trained here: multitoken trains without one), by the
    tokenizer.json post-processor, which is what transformers follows, and recorded as
    `add_bos_token` so that `convert --hf` reads the flag back.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(hf_for_prompts(tokenizer).to_str(pretty=True) + "\n",
                                      encoding="utf-8")
    specials = _special_tokens(tokenizer)
    _write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False,
        "add_bos_token": tokenizer.add_bos, **specials})
    _write_json(d / "special_tokens_map.json", specials)
    return d


def hf_family(cfg: ModelConfig) -> str:
    """The Hugging Face family (a key of HF_FAMILIES) whose layers are exactly this config's:
    Qwen3 for q/k norms, Qwen2 for q/k/v biases, Llama otherwise (a Mistral without sliding
    window is a Llama, so a converted Mistral is written as one)."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise CheckpointError("no supported Hugging Face family has both q/k norms (Qwen3) and "
                              "q/k/v biases (Qwen2)")
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def _hf_config_json(cfg: ModelConfig, family: str, dtype: torch.dtype,
                    ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of `family` for the trunk + head 1. The rotary settings use the layout that
    transformers 4.x and 5 both read: top-level rope_theta, plus rope_scaling when scaled."""
    c: dict[str, Any] = {
        "architectures": [HF_FAMILIES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_trunk_layers + 1, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), **ids,
    }
    if cfg.rope_scaling == "llama3":
        c["rope_scaling"] = {
            "rope_type": "llama3", "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
    if family == "llama":
        c.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2 (whose q/k/v biases are not optional) and Qwen3: every layer full attention
        c.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=cfg.n_trunk_layers + 1)
        if family == "qwen3":
            c["attention_bias"] = False  # (would add an o_proj bias too)
    return c


def export_hf(model: MultiTokenModel, directory: str | Path,
              tokenizer: Tokenizer | None = None) -> Path:
    """Write the trunk + head 1 as a Hugging Face model of the family `hf_family` names
    (config.json, generation_config.json, model.safetensors, and the tokenizer files when
    `tokenizer` is given), and heads 2..n beside it: mtp_heads.safetensors (each head one
    decoder layer under the family's names, `heads.{i}.self_attn.q_proj.weight`, ...) and
    mtp_heads.json (n_future, head_type, names), which transformers ignores and `load_hf`
    reads back. Without a tokenizer the bos/eos/pad ids are null."""
    cfg = model.cfg
    if not cfg.layer_heads:
        raise CheckpointError("linear heads have no Hugging Face equivalent: head 1 must be one "
                              "transformer layer on the trunk (head_type transformer or causal)")
    if cfg.head_type == "anticausal" and cfg.n_future > 1:
        raise CheckpointError("anticausal heads have no Hugging Face equivalent: head 1 reads "
                              "head 2's output, not the trunk's")
    family = hf_family(cfg)
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    out: dict[str, Tensor] = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
                              "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    extra: dict[str, Tensor] = {}
    n_trunk = cfg.n_trunk_layers
    mtp_names = _mtp_names(cfg)
    for name, t in sd.items():
        parts = name.split(".", 2)
        if parts[0] == "layers":
            out[f"model.layers.{parts[1]}.{_HF_LAYER[parts[2]]}"] = t
        elif parts[0] == "heads" and parts[1] == "0":
            out[f"model.layers.{n_trunk}.{_HF_LAYER[parts[2]]}"] = t
        elif parts[0] == "heads":
            extra[f"heads.{parts[1]}.{mtp_names[parts[2]]}"] = t
    save_file({k: v.detach().cpu().contiguous() for k, v in out.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    if extra:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                  str(d / MTP_WEIGHTS), metadata={"format": "pt"})
        _write_json(d / MTP_JSON, {
            "format": MTP_FORMAT, "n_future": cfg.n_future, "head_type": cfg.head_type,
            "about": (f"heads 2..{cfg.n_future} of a multitoken model whose head 1 is the last "
                      f"layer of model.safetensors; heads.{{i}} (i >= 1) predicts token t+i+1 "
                      f"and is one decoder layer (names as in model.safetensors) on the output "
                      f"of the layers before head 1 (transformer) or of head i (causal); "
                      f"token_conditioned: DeepSeek-V3's MTP module, eh_proj([hnorm(h_i); "
                      f"enorm(embed(x_(t+i)))]) into that layer; every head ends in the "
                      f"shared model.norm and lm_head"),
            "names": sorted(extra)})
    ids: dict[str, int | None] = {
        "bos_token_id": None if tokenizer is None else tokenizer.bos_id,
        "eos_token_id": None if tokenizer is None else tokenizer.eos_id,
        "pad_token_id": None if tokenizer is None else tokenizer.pad_id,
    }
    _write_json(d / "config.json",
                _hf_config_json(cfg, family, model.tok_embeddings.weight.dtype, ids))
    # Greedy, stopping at eos (multitoken's default stop token). No max_length: transformers
    # warns when a call's max_new_tokens meets a stored max_length; without one its own default
    # length applies.
    _write_json(d / "generation_config.json", {**ids, "do_sample": False})
    if tokenizer is not None:
        export_hf_tokenizer(tokenizer, d, cfg.max_seq_len)
    return d


# The names these functions had when Llama was the only Hugging Face family.
load_hf_llama = load_hf
export_hf_llama = export_hf


def main(argv: list[str]) -> int:
    """`multitoken convert`: Meta or Hugging Face weights <-> multitoken checkpoints."""
    p = cliargs.ArgumentParser(prog="multitoken convert", description=(
        "Import Meta's MTP release or a Hugging Face Llama, Mistral, Qwen2 or Qwen3 as a "
        "multitoken checkpoint, or export a checkpoint as a Hugging Face model (trunk + head 1; "
        "heads 2..n in mtp_heads.safetensors beside it)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--meta", help="Meta release checkpoint directory (params.json, "
                     "consolidated.00.pth), e.g. 7B_1T_4/")
    src.add_argument("--hf", help="Hugging Face directory (config.json, model.safetensors or "
                     "its index) of " + ", ".join(HF_FAMILIES.values()) + "; every head when "
                     "it has mtp_heads.json (written by --to-hf)")
    src.add_argument("--checkpoint", help="multitoken checkpoint to export (with --to-hf)")
    p.add_argument("--tokenizer", help="tokenizer.json, SentencePiece tokenizer.model, or a "
                   "multitoken tokenizer directory; default for --hf: its tokenizer.json; for "
                   "--meta: tokenizer.model in the directory or its parent")
    p.add_argument("--out", help="new multitoken checkpoint directory (with --meta / --hf)")
    p.add_argument("--to-hf", help="output directory for a Hugging Face model (with "
                   "--checkpoint)")
    p.add_argument("--max-seq-len", type=cliargs.positive_int, default=None, help=(
        "the model's context; default for --meta 4096, for --hf max_position_embeddings, at "
        "most the sliding window of a model whose layers slide (a larger value is refused)"))
    p.add_argument("--dtype", choices=cliargs.DTYPES, default="auto", help=(
        "the dtype the weights are written in; auto (default): the source's, i.e. that of "
        "most of its floating-point weights (Meta's release: bfloat16), as transformers' "
        "torch_dtype='auto' loads them"))
    args = p.parse_args(argv)
    dtype = cliargs.load_dtype(args.dtype)

    def fresh(path: str | None, flag: str) -> Path:
        if not path:
            raise MultitokenError(f"{flag} is required here")
        return new_output_dir(path, flag)

    if args.checkpoint:
        out = fresh(args.to_hf, "--to-hf")
        model, tokenizer = load_checkpoint(args.checkpoint, dtype=dtype)
        export_hf(model, out, tokenizer)
        heads = (f"heads 2..{model.n_future} in {MTP_WEIGHTS}" if model.n_future > 1
                 else "no extra heads")
        print(f"wrote {out} ({HF_FAMILIES[hf_family(model.cfg)]}: trunk + head 1; {heads}; "
              f"{tokenizer.name} tokenizer; {dtype_name(model.tok_embeddings.weight.dtype)})")
        return 0
    out = fresh(args.out, "--out")
    if args.meta:
        # The tokenizer first: a missing one is reported before reading gigabytes of weights.
        tokenizer = load_tokenizer(args.tokenizer or meta_tokenizer_path(args.meta), imported=True)
        model = load_meta(args.meta, max_seq_len=args.max_seq_len or 4096, dtype=dtype)
    else:
        spec = hf_config(args.hf, max_seq_len=args.max_seq_len)  # refuses before any weights
        for note in spec.notes:
            print(f"note: {note}", file=sys.stderr)
        model = load_hf(args.hf, max_seq_len=args.max_seq_len, dtype=dtype)
        tokenizer = load_tokenizer(args.tokenizer or Path(args.hf) / "tokenizer.json",
                                   imported=True)
    check_tokenizer(tokenizer, model.cfg, None, args.tokenizer or args.meta or args.hf)
    save_checkpoint(out, model, tokenizer, extra={"converted_from": args.meta or args.hf})
    print(f"wrote {out}: {model.num_params() / 1e6:.1f}M non-embedding parameters, "
          f"{model.n_future} head(s), {dtype_name(model.tok_embeddings.weight.dtype)}")
    return 0
