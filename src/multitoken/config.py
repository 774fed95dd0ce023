"""Dataclass configs: the single source of truth for models and training runs.

YAML recipes and `--section.key=value` command-line overrides are loaded into these dataclasses
strictly: an unknown key or a value of the wrong type is a `ConfigError`, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from multitoken.errors import ConfigError

HeadType = Literal["transformer", "linear", "causal", "anticausal", "token_conditioned"]
RopeScaling = Literal["none", "llama3"]
LossMethod = Literal["naive", "sequential", "chunked"]


@dataclass
class ModelConfig:
    """Shape of a multi-token prediction model.

    `n_layers` counts ALL transformer layers, as in the paper's parameter matching: with
    transformer-layer heads (`transformer`, `causal`, `anticausal`, `token_conditioned`) the
    trunk has
    `n_layers - n_future` layers and each of the n_future heads is one layer (Meta's 7B n=4
    model: 32 = 28 trunk + 4 heads). With `linear` heads the trunk keeps all `n_layers` layers
    and each head is a d x d linear map. `n_future=1` with transformer heads is a plain Llama.

    `token_conditioned` heads are DeepSeek-V3's MTP modules: head 1 is a transformer layer on
    the trunk as for `transformer`; head k >= 2 reads head k-1's hidden state at position t and
    the embedding of token t+k-1 (the token head k-1 predicts there: the ground truth in
    training, the previous draft when decoding), RMS-normalises each, projects their
    concatenation 2D -> D and runs one transformer layer (`model.TokenConditionedHead`). Each
    such head also holds that 2D x D projection and two norms beyond its layer.

    The last group of fields are options of pretrained Hugging Face families (docs/weights.md):
    their defaults are the original Llama layout, which every checkpoint written before they
    existed has.
    """

    vocab_size: int = 260
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_hidden: int | None = None  # None = Llama's rule: 2/3 * 4 * dim rounded to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    n_future: int = 4
    head_type: HeadType = "transformer"
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Width of one attention head; None = dim // n_heads. Qwen3 sets it so that
    # n_heads * head_dim != dim (e.g. Qwen3-0.6B: dim 1024, 16 heads of 128).
    head_dim_override: int | None = None
    qkv_bias: bool = False  # biases on the q, k and v projections, none on o (Qwen2/2.5)
    qk_norm: bool = False  # RMSNorm over each head's q and k, before rotary (Qwen3)
    # Rotary frequencies: "none" = theta^(-2j/hd); "llama3" = Llama 3.1's rescaling of them
    # (wavelengths above original_max_len / low_freq_factor divided by factor, below
    # original_max_len / high_freq_factor kept, interpolated in between).
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def layer_heads(self) -> bool:
        """True when each head is one transformer layer (moved out of the trunk)."""
        return self.head_type != "linear"

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_future if self.layer_heads else self.n_layers

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"model: {msg}")

        if self.n_future < 1:
            bad(f"n_future must be >= 1, got {self.n_future}")
        if self.vocab_size < 2:
            bad(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.dim < 1 or self.n_heads < 1:
            bad("dim and n_heads must be positive")
        if self.head_dim_override is None and self.dim % self.n_heads != 0:
            bad(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or "
                "head_dim_override set")
        if self.head_dim_override is not None and self.head_dim_override < 2:
            bad(f"head_dim_override must be >= 2, got {self.head_dim_override}")
        if self.head_dim % 2 != 0:
            bad(f"the head dimension ({self.head_dim}) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads != 0:
            bad(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.head_type not in typing.get_args(HeadType):
            bad(f"head_type must be one of {typing.get_args(HeadType)}, got {self.head_type!r}")
        if self.layer_heads and self.n_layers < self.n_future:
            bad(
                f"n_layers ({self.n_layers}) must be >= n_future ({self.n_future}): each "
                f"{self.head_type} head takes one of the model's layers"
            )
        if self.n_layers < 1:
            bad(f"n_layers must be >= 1, got {self.n_layers}")
        if self.max_seq_len < 2:
            bad(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.rope_scaling not in typing.get_args(RopeScaling):
            bad(f"rope_scaling must be one of {typing.get_args(RopeScaling)}, got "
                f"{self.rope_scaling!r}")
        if not self.rope_theta > 0:
            bad(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling == "llama3":
            if not self.rope_factor >= 1:
                bad(f"rope_factor must be >= 1, got {self.rope_factor}")
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                bad("llama3 rope scaling needs 0 < rope_low_freq_factor < "
                    f"rope_high_freq_factor, got {self.rope_low_freq_factor} and "
                    f"{self.rope_high_freq_factor}")
            if self.rope_original_max_len < 1:
                bad(f"rope_original_max_len must be >= 1, got {self.rope_original_max_len}")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    paths: list[str] = field(default_factory=list)  # files, folders, globs; empty = stdlib corpus
    tokenizer: str = "bytes"  # "bytes", "bpe", or a path to a tokenizer.json
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    max_files: int | None = None  # cap on corpus files (None = all), for quick runs
    seed: int = 0
    cache_dir: str = ".cache/multitoken"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class LossConfig:
    method: LossMethod = "sequential"
    # Per-head weights: "uniform" (the paper), "geometric:<r>" (head i weighted r^(i-1)),
    # or an explicit list with one weight per head.
    weights: str | list[float] = "uniform"

    def head_weights(self, n: int) -> list[float]:
        """The n per-head weights that `weights` describes."""
        spec = self.weights
        if isinstance(spec, list):
            if len(spec) != n:
                raise ConfigError(f"loss.weights has {len(spec)} entries but the model has {n} heads")
            if any(w < 0 for w in spec):
                raise ConfigError("loss.weights must be non-negative")
            return [float(w) for w in spec]
        if spec == "uniform":
            return [1.0] * n
        if spec.startswith("geometric:"):
            try:
                r = float(spec.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"loss.weights: bad ratio in {spec!r}") from None
            if r <= 0:
                raise ConfigError(f"loss.weights: geometric ratio must be > 0, got {r}")
            return [r**i for i in range(n)]
        raise ConfigError(f"loss.weights must be 'uniform', 'geometric:<r>' or a list, got {spec!r}")


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"  # "none" = single process
    timeout_s: int = 120  # collective timeout: a dead rank stops the others within this


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (global, across ranks)
    seq_len: int = 256
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype on CUDA
    compile: bool = False
    threads: int | None = None  # torch CPU threads (None = torch default)
    sample_prompt: str = "def "
    sample_tokens: int = 64
    # Start from this checkpoint's weights (e.g. one made by `multitoken add-heads`); the model
    # config and the tokenizer are the checkpoint's. None = random initialisation.
    init: str | None = None
    # "draft_heads": train heads 2..n only; the embeddings, trunk, head 1, norm and unembedding
    # stay frozen, so plain decoding (head 1) is exactly the initial model's.
    trainable: Literal["all", "draft_heads"] = "all"


@dataclass
class RunConfig:
    """Everything a `multitoken train` run needs; what a YAML recipe fills in."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        self.model.validate()
        t = self.train
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "ckpt_every",
                     "log_every", "eval_batches"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.batch_size % t.grad_accum != 0:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum "
                f"({t.grad_accum})"
            )
        if t.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if t.trainable == "draft_heads" and self.model.n_future < 2:
            raise ConfigError("train.trainable=draft_heads needs model.n_future >= 2 (heads 2..n "
                              "are the draft heads)")
        self.loss.head_weights(self.model.n_future)


@dataclass
class DistillConfig:
    """`multitoken distill`: fine-tune the draft heads on the model's own output, greedy
    (temperature 0, the default) or sampled at the temperature / top-k / top-p it will decode
    with.

    The trunk, head 1, the shared norm and the unembedding stay frozen, so plain decoding
    (and every speculative output, which equals it) is unchanged bit for bit; only how often
    the drafts are accepted changes. See multitoken/distill.py.
    """

    sequences: int = 768  # greedy continuations generated from training-split prompts
    prompt_len: int = 128
    # Tokens decoded per prompt; None = fill the model's context, at most 256 (the decode
    # benchmark's default): drafts must be good at every position decoding reaches.
    new_tokens: int | None = None
    gen_batch: int = 64  # sequences decoded together while generating
    eval_sequences: int = 64  # held-out (validation-split) continuations for before/after
    steps: int = 400
    batch_size: int = 16  # sequences per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    target: Literal["soft", "hard"] = "soft"  # head 1's distribution, or its argmax token
    # How the continuations are decoded, and which processed distribution of head 1 the soft
    # targets are: 0 = greedy (targets: head 1's softmax); > 0 = sampled at this temperature,
    # top-k and top-p (targets: head 1's processed distribution p, which speculative sampling
    # verifies drafts against). The held-out measurements use the same settings.
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0  # data order, and the sampled continuations
    threads: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):  # also refuses nan
            raise ConfigError(f"distill.temperature must be a finite number >= 0, got "
                              f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"distill.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0.0 and (self.top_k is not None or self.top_p is not None):
            # Greedy decoding ignores them; silently distilling for greedy would mislead.
            raise ConfigError("distill.top_k / distill.top_p apply only when sampling: set "
                              "distill.temperature > 0")
        for name in ("sequences", "prompt_len", "new_tokens", "gen_batch", "eval_sequences",
                     "steps", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"distill.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"distill.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"distill.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"distill.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ConfigError(f"distill.grad_clip must be > 0, got {self.grad_clip}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"distill.threads must be >= 1, got {self.threads}")


# ---------------------------------------------------------------------------------------------
# Strict loading: dicts (from YAML) and dotted overrides into the dataclasses above.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        # A bracketed string ("[1, 0.5]") or a YAML list means the list alternative.
        listy = isinstance(value, list) or (isinstance(value, str) and value.strip().startswith("["))
        ordered = sorted(args, key=lambda a: typing.get_origin(a) is not list) if listy else args
        for arg in ordered:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot interpret {value!r} as {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(e)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = RunConfig) -> dict[str, Any]:
    """Apply `section.key=value` strings onto a nested dict (values parsed later, strictly)."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.split(".")
        node = data
        target_cls = cls
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(target_cls)
            if part not in hints:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(f"unknown key {dotted!r}: {where} has no field {part!r}")
            if i == len(parts) - 1:
                tp = hints[part]
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {dotted!r} names a section, not a value")
                # A bracketed value of a list field is a YAML list ("[a.txt, 'b c.txt']"):
                # parsed here, where a syntax error can name the override.
                union = typing.get_origin(tp) in (typing.Union, types.UnionType)
                options = typing.get_args(tp) if union else (tp,)
                if raw.strip().startswith("[") and any(typing.get_origin(a) is list
                                                       for a in options):
                    try:
                        node[part] = yaml.safe_load(raw)
                    except yaml.YAMLError as e:
                        why = getattr(e, "problem", None) or str(e).splitlines()[0]
                        raise ConfigError(f"override {dotted}={raw} is not a valid YAML list: "
                                          f"{why}") from None
                else:
                    node[part] = raw
            else:
                target_cls = hints[part]
                if not dataclasses.is_dataclass(target_cls):
                    raise ConfigError(f"unknown key {dotted!r}: {part!r} is not a section")
                node = node.setdefault(part, {})
                if node is None:
                    node = data[part] = {}
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe file (optional) + dotted overrides -> a validated RunConfig."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


# What a resumed run may not change: the model, the data and tokenizer, the objective, and what
# fixes the order of the training batches. Everything else (steps, schedule, logging,
# evaluation, device, threads) may be changed when resuming, e.g. to train for longer.
RESUME_FIXED = ("model.", "data.", "loss.weights", "train.seq_len", "train.batch_size",
                "train.grad_accum", "train.seed", "train.init", "train.trainable")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resume_run_config(saved: dict[str, Any], path: str | Path | None = None,
                      overrides: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """The config of a resumed run: the run's own saved config, with what the recipe file and
    the overrides ask for applied on top. Changing a field in RESUME_FIXED is an error naming
    it; returns (config, ["train.steps: 1000 -> 2000", ...]) for the fields that do change."""
    before = from_dict(RunConfig, saved)
    asked = apply_overrides(load_yaml(path) if path else {}, overrides or [])
    after = from_dict(RunConfig, _merge(to_dict(before), asked))
    after.validate()
    old, new = _flatten(to_dict(before)), _flatten(to_dict(after))
    changes = [k for k in new if new[k] != old.get(k)]
    fixed = [k for k in changes if k.startswith(RESUME_FIXED)]
    if fixed:
        k = fixed[0]
        raise ConfigError(
            f"--resume: {k}={new[k]!r} differs from the run's {k}={old.get(k)!r}; a resumed run "
            "keeps its model, data, tokenizer and batches (start a new run with another --out)")
    return after, [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changes]
