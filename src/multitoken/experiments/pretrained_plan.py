"""The plan of `multitoken experiment pretrained`: every configuration, fixed before anything
runs, from the two shipped recipes and the compute budget.

The budget is the training of the n=4 recipe (configs/code-n4.yaml); the n=1 recipe
(configs/code-n1.yaml) pretrains the model that gains heads; each way of training the heads
gets what the pretraining leaves, in estimated FLOPs (`multitoken.flops`), which
sets its number of steps: (a) heads 2..n alone with the paper's loss and (c) full fine-tuning
take the n=4 recipe's batch, window, loss and learning-rate schedule shape; (b) distillation
takes `DistillConfig` settings, sampled at T=0.8 / top-p 0.95, and pays for decoding its
training continuations out of the same budget.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken import flops
from multitoken.checkpoint import find_checkpoint, model_config_from, read_config
from multitoken.config import DistillConfig, ModelConfig, RunConfig, load_run_config
from multitoken.errors import ConfigError
from multitoken.tokenizer import ByteTokenizer, load_tokenizer

NAME = "pretrained"
RECIPES = {"n1": "code-n1.yaml", "n4": "code-n4.yaml"}
REPO = Path(__file__).resolve().parents[3]
# A text whose bytes the reference's tokenizer must give as the demonstration's does.
PROBE = "def f(x):\n    return x + 'h\u00e9llo \u2713'  # <eos>\n"


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one run: what is laid over both recipes, and the decoding measured."""

    overrides: tuple[str, ...]  # section.key=value onto both recipes (none: as shipped)
    n1_layers: int | None  # model.n_layers of the n=1 recipe (None: the recipe's)
    n4_layers: int | None
    distill: tuple[tuple[str, Any], ...]  # DistillConfig fields; its steps come from the budget
    prompts: int
    prompt_len: int
    new_tokens: int
    finetune_lr_scale: float = 0.5  # (c) fine-tunes a trained trunk: half the recipe's peak lr
    seed: int = 0  # sampling seed of the decoding measurements (batch i: seed + i)


SAMPLED = (("temperature", 0.8), ("top_p", 0.95))
SCALES: dict[str, DemoScale] = {
    "full": DemoScale(overrides=(), n1_layers=None, n4_layers=None,
                      distill=(("prompt_len", 128), ("new_tokens", 256), *SAMPLED),
                      prompts=16, prompt_len=128, new_tokens=256),
    "quick": DemoScale(
        overrides=("model.dim=32", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=64",
                   "train.batch_size=4", "train.steps=150", "train.eval_every=150",
                   "train.ckpt_every=50", "train.log_every=10", "train.eval_batches=2",
                   "train.compile=false", "optim.warmup_steps=10", "data.max_files=16"),
        n1_layers=3, n4_layers=6,
        distill=(("sequences", 16), ("prompt_len", 16), ("new_tokens", 24), ("gen_batch", 16),
                 ("eval_sequences", 4), ("batch_size", 4), ("warmup_steps", 2), *SAMPLED),
        prompts=2, prompt_len=16, new_tokens=24),
}


def recipe_path(name: str) -> Path:
    """A shipped recipe: configs/NAME from the current directory, else from the repository."""
    for root in (Path.cwd(), REPO):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise ConfigError(f"configs/{name} not found (run from the repository root)")


# ---------------------------------------------------------------------------------------------
# The plan: every configuration, fixed before anything runs.


@dataclass
class Plan:
    """Every configuration of one run; `as_json` is what plan.json holds (a run continues only
    with the same plan)."""

    scale_name: str
    scale: DemoScale
    out: Path
    n4: RunConfig  # the budget: the n=4 recipe's training
    n1: RunConfig  # the pretraining
    heads: RunConfig  # (a)
    distill: DistillConfig  # (b)
    finetune: RunConfig  # (c)
    budget: dict[str, Any]
    reference: Path | None

    def as_json(self) -> dict[str, Any]:
        d = {"experiment": NAME, "scale": self.scale_name, "n4": dataclasses.asdict(self.n4),
             "n1": dataclasses.asdict(self.n1), "heads": dataclasses.asdict(self.heads),
             "distill": dataclasses.asdict(self.distill),
             "finetune": dataclasses.asdict(self.finetune),
             "decode": {"prompts": self.scale.prompts, "prompt_len": self.scale.prompt_len,
                        "new_tokens": self.scale.new_tokens, "seed": self.scale.seed},
             "reference": None if self.reference is None else str(self.reference)}
        return json.loads(json.dumps(d))


def _heads_run(n4: RunConfig, n1: RunConfig, model: ModelConfig, flops_left: float,
               trainable: flops.Trainable, lr_scale: float, init: Path) -> RunConfig:
    """Training of the added heads from `init`: the n=4 recipe's batch, window, loss and lr
    schedule shape, as many steps as `flops_left` pays for."""
    t = n4.train
    per_step = t.batch_size * t.seq_len * flops.train_token_flops(model, t.seq_len, trainable)
    steps = flops.steps_within(flops_left, per_step, f"training ({trainable})")
    cfg = RunConfig(
        model=copy.deepcopy(model), data=copy.deepcopy(n1.data), loss=copy.deepcopy(n4.loss),
        optim=dataclasses.replace(n4.optim, lr=n4.optim.lr * lr_scale,
                                  warmup_steps=min(n4.optim.warmup_steps, max(1, steps // 10))),
        train=dataclasses.replace(t, steps=steps, init=str(init), trainable=trainable,
                                  eval_every=min(t.eval_every, steps),
                                  ckpt_every=min(t.ckpt_every, steps),
                                  log_every=min(t.log_every, steps)),
        parallel=copy.deepcopy(n4.parallel))
    cfg.validate()
    return cfg


def make_plan(scale_name: str, out: Path, reference: Path | None) -> Plan:
    """The recipes at `scale_name` (their token caches under `out`), the budget, and the three
    ways of training the heads with the steps it pays for. Reads the recipes, writes nothing."""
    scale = SCALES[scale_name]
    common = [*scale.overrides, f"data.cache_dir={out / 'cache'}"]

    def recipe(key: str, layers: int | None) -> RunConfig:
        extra = [] if layers is None else [f"model.n_layers={layers}"]
        return load_run_config(recipe_path(RECIPES[key]), [*common, *extra])

    n4, n1 = recipe("n4", scale.n4_layers), recipe("n1", scale.n1_layers)
    if n1.model.n_future != 1 or n4.model.n_future < 2:
        raise ConfigError(f"configs/{RECIPES['n1']} must have n_future=1 and "
                          f"configs/{RECIPES['n4']} n_future >= 2")
    if n1.data != n4.data or n1.data.tokenizer != "bytes":
        raise ConfigError(f"configs/{RECIPES['n1']} and configs/{RECIPES['n4']} must train on the "
                          "same data with the bytes tokenizer (results are in bits per byte)")
    total, base = flops.train_flops(n4), flops.train_flops(n1)
    if base >= total:
        raise ConfigError(f"the n=1 pretraining ({base:.3g} FLOPs) leaves nothing of the budget "
                          f"({total:.3g} FLOPs) for training the heads")
    left = total - base
    n = n4.model.n_future
    model = dataclasses.replace(n1.model, n_future=n, n_layers=n1.model.n_trunk_layers + n)
    init = out / "n4-init"
    heads = _heads_run(n4, n1, model, left, "draft_heads", 1.0, init)
    finetune = _heads_run(n4, n1, model, left, "all", scale.finetune_lr_scale, init)
    dcfg = DistillConfig(**dict(scale.distill))
    d = flops.distill_flops(model, dcfg)
    dcfg = dataclasses.replace(dcfg, steps=flops.steps_within(
        left - d["generation"], d["per_step"], "distillation"))
    dcfg.validate()
    budget = {"recipe": f"configs/{RECIPES['n4']}", "total": total, "base": base,
              "left": left, "n_future": n}
    return Plan(scale_name, scale, out, n4, n1, heads, dcfg, finetune, budget, reference)


def check_reference(path: str, plan_n1: RunConfig, scale: DemoScale) -> Path:
    """The --reference checkpoint, checked before anything runs: it exists, has draft heads,
    decodes the prompts within its context, and tokenizes text as the bytes tokenizer does."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--reference {p}: no such checkpoint directory")
    ckpt = find_checkpoint(p)
    cfg = model_config_from(read_config(ckpt), ckpt)
    if cfg.n_future < 2:
        raise ConfigError(f"--reference {p}: n_future={cfg.n_future}; the reference needs draft "
                          "heads (an n=4 model trained from scratch, e.g. code-n4)")
    need = max(plan_n1.train.seq_len, scale.prompt_len + scale.new_tokens)
    if cfg.max_seq_len < need:
        raise ConfigError(f"--reference {p}: its context ({cfg.max_seq_len}) is shorter than the "
                          f"windows measured here ({need})")
    tok = load_tokenizer(ckpt / "tokenizer")
    if tok.vocab_size != ByteTokenizer.vocab_size or \
            tok.encode(PROBE) != ByteTokenizer().encode(PROBE):
        raise ConfigError(f"--reference {p}: its tokenizer ({tok.name}) is not the bytes "
                          "tokenizer the demonstration's models use")
    return ckpt.resolve()


__all__ = ["NAME", "RECIPES", "SCALES", "DemoScale", "Plan", "check_reference", "make_plan",
           "recipe_path"]
