"""Interop: Meta's MTP release and Hugging Face Llama, by renaming weights (docs/weights.md).

    load_meta(dir)            params.json + consolidated.00.pth -> MultiTokenModel (all heads)
    load_hf_llama(dir)        a Hugging Face Llama directory (safetensors) -> n_future=1 model
    export_hf_llama(model, dir, tokenizer)  trunk + head 1 -> a LlamaForCausalLM directory
                              (safetensors, config.json, generation_config.json, tokenizer files)

No modelling code is copied or forked: the model is ours, the formats are theirs. Meta's
`.pth` is read with `torch.load(weights_only=True)` (no arbitrary unpickling). Meta's rotary
embedding rotates interleaved pairs (2j, 2j+1); ours (and Hugging Face's) rotates halves
(j, j + hd/2), so Meta's wq/wk rows are permuted on load exactly as Hugging Face's own Llama
conversion script does. Hugging Face Llama needs no permutation.

An export loads with `AutoTokenizer` + `AutoModelForCausalLM` and decodes with `generate` as
multitoken does: the tokenizer gives multitoken's ids for every text (bytes included, as a
byte-level `tokenizer.json`), and eos/bos/pad ids are in `config.json` and
`generation_config.json`. The JSON files are written directly, so exporting does not need
`transformers` installed; the tests load every file with `transformers` itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from multitoken import cliargs
from multitoken.config import ModelConfig
from multitoken.errors import CheckpointError
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import SPM_FILE, Tokenizer, load_tokenizer

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
            dtype: torch.dtype | None) -> MultiTokenModel:
    from multitoken.checkpoint import load_state_dict_checked

    model = MultiTokenModel(cfg)
    load_state_dict_checked(model, sd, where)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


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
              dtype: torch.dtype | None = None) -> MultiTokenModel:
    """Meta's MTP release (`params.json` + `consolidated.00.pth` or `consolidated.pth`) as a
    MultiTokenModel with all of its heads.

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


def _hf_rope_theta(c: dict[str, Any]) -> float:
    if "rope_theta" in c:
        return float(c["rope_theta"])
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rp.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope scaling {rp.get('rope_type')!r} is not supported")
    return float(rp.get("rope_theta", 1e4))


def load_hf_llama(directory: str | Path, *, dtype: torch.dtype | None = None) -> MultiTokenModel:
    """A Hugging Face Llama directory (config.json + *.safetensors) as an n_future=1 model."""
    from safetensors.torch import load_file

    d = Path(directory)
    c = _read_json(d / "config.json")
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{d}: model_type {c.get('model_type')!r} is not 'llama'")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no .safetensors weights (pickled .bin files are not read)")
    raw: dict[str, Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    n = int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise CheckpointError(f"{d}: head_dim != hidden_size / num_attention_heads")
    cfg = ModelConfig(vocab_size=int(c["vocab_size"]), dim=int(c["hidden_size"]), n_layers=n,
                      n_heads=heads, n_kv_heads=kv if kv != heads else None,
                      ffn_hidden=int(c["intermediate_size"]), norm_eps=float(c["rms_norm_eps"]),
                      rope_theta=_hf_rope_theta(c),
                      max_seq_len=int(c.get("max_position_embeddings", 4096)), n_future=1,
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    back = {v: k for k, v in _LAYER.items()}
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
    `tokenizer.encode` gives and decodes them back to the same text.

    Two settings make that hold: `split_special_tokens` (a literal "<eos>" in a text is text, as
    in multitoken's data pipeline) and `clean_up_tokenization_spaces: false` (transformers would
    otherwise delete spaces before punctuation when decoding). No bos is prepended: multitoken
    trains without one. A foreign tokenizer.json keeps its own post-processor, if it has one.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(tokenizer.to_hf().to_str(pretty=True) + "\n",
                                      encoding="utf-8")
    specials = _special_tokens(tokenizer)
    _write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False, **specials})
    _write_json(d / "special_tokens_map.json", specials)
    return d


def export_hf_llama(model: MultiTokenModel, directory: str | Path,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write the trunk + head 1 as a Hugging Face LlamaForCausalLM (config.json,
    generation_config.json, model.safetensors, and the tokenizer files when `tokenizer` is
    given); the extra heads are dropped (HF Llama has none). Without a tokenizer the bos/eos/pad
    ids are null."""
    from safetensors.torch import save_file

    cfg = model.cfg
    if cfg.head_type not in ("transformer", "causal") and cfg.n_future > 1:
        raise CheckpointError(f"{cfg.head_type} heads have no Llama equivalent: head 1 must be "
                              "one transformer layer on the trunk")
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
    n_trunk = cfg.n_trunk_layers
    for name, t in sd.items():
        parts = name.split(".", 2)
        if parts[0] == "layers":
            out[f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"] = t
        elif parts[0] == "heads" and parts[1] == "0":
            out[f"model.layers.{n_trunk}.{_LAYER[parts[2]]}"] = t
    save_file({k: v.detach().cpu().contiguous() for k, v in out.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    ids: dict[str, int | None] = {
        "bos_token_id": None if tokenizer is None else tokenizer.bos_id,
        "eos_token_id": None if tokenizer is None else tokenizer.eos_id,
        "pad_token_id": None if tokenizer is None else tokenizer.pad_id,
    }
    _write_json(d / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": n_trunk + 1, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), **ids,
    })
    # Greedy, stopping at eos (multitoken's default stop token). No max_length: transformers
    # warns when a call's max_new_tokens meets a stored max_length; without one its own default
    # length applies.
    _write_json(d / "generation_config.json", {**ids, "do_sample": False})
    if tokenizer is not None:
        export_hf_tokenizer(tokenizer, d, cfg.max_seq_len)
    return d


def main(argv: list[str]) -> int:
    """`multitoken convert`: Meta or Hugging Face weights <-> multitoken checkpoints."""

    from multitoken.checkpoint import (
        check_tokenizer,
        load_checkpoint,
        new_output_dir,
        save_checkpoint,
    )
    from multitoken.errors import MultitokenError

    p = cliargs.ArgumentParser(prog="multitoken convert", description=(
        "Import Meta's MTP release or a Hugging Face Llama as a multitoken checkpoint, or "
        "export a checkpoint's trunk + head 1 as a Hugging Face Llama."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--meta", help="Meta release checkpoint directory (params.json, "
                     "consolidated.00.pth), e.g. 7B_1T_4/")
    src.add_argument("--hf", help="Hugging Face Llama directory (config.json, *.safetensors)")
    src.add_argument("--checkpoint", help="multitoken checkpoint to export (with --to-hf)")
    p.add_argument("--tokenizer", help="tokenizer.json, SentencePiece tokenizer.model, or a "
                   "multitoken tokenizer directory; default for --hf: its tokenizer.json; for "
                   "--meta: tokenizer.model in the directory or its parent")
    p.add_argument("--out", help="new multitoken checkpoint directory (with --meta / --hf)")
    p.add_argument("--to-hf", help="output directory for a Hugging Face Llama (with --checkpoint)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="context for --meta models")
    args = p.parse_args(argv)

    def fresh(path: str | None, flag: str) -> Path:
        if not path:
            raise MultitokenError(f"{flag} is required here")
        return new_output_dir(path, flag)

    if args.checkpoint:
        out = fresh(args.to_hf, "--to-hf")
        model, tokenizer = load_checkpoint(args.checkpoint)
        export_hf_llama(model, out, tokenizer)
        print(f"wrote {out} (trunk + head 1; {model.n_future - 1} extra heads dropped; "
              f"{tokenizer.name} tokenizer)")
        return 0
    out = fresh(args.out, "--out")
    if args.meta:
        # The tokenizer first: a missing one is reported before reading gigabytes of weights.
        tokenizer = load_tokenizer(args.tokenizer or meta_tokenizer_path(args.meta))
        model = load_meta(args.meta, max_seq_len=args.max_seq_len)
    else:
        model = load_hf_llama(args.hf)
        tokenizer = load_tokenizer(args.tokenizer or Path(args.hf) / "tokenizer.json")
    check_tokenizer(tokenizer, model.cfg, None, args.tokenizer or args.meta or args.hf)
    save_checkpoint(out, model, tokenizer, extra={"converted_from": args.meta or args.hf})
    print(f"wrote {out}: {model.num_params() / 1e6:.1f}M non-embedding parameters, "
          f"{model.n_future} head(s)")
    return 0
