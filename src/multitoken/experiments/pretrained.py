"""`multitoken experiment pretrained [--quick] [--out DIR] [--reference DIR]`: issue 12's
demonstration, bring your own model, as one command (docs/pretrained.md).

A user with a pretrained next-token model gives it draft heads and decodes faster. Nothing is
downloaded: the pretrained model is trained first, exported to Hugging Face format, and the
rest starts from that directory, as a user's would. Stages, each in DIR:

    n1/         train the n=1 recipe (configs/code-n1.yaml)         `multitoken train`
    n1-hf/      export it in Hugging Face format                    `convert --to-hf`
    converted/  read that directory back                            `convert --hf`
    n4-init/    heads 2..4 added, copies of head 1's layer          `add-heads --n-future 4`
    heads/      (a) heads 2..4 alone, the paper's loss on the corpus
                    `train --init n4-init --train.trainable=draft_heads`
    distill/    (b) heads 2..4 alone, self-distillation on the model's own continuations,
                    sampled at T=0.8 / top-p 0.95                    `distill --temperature ..`
    finetune/   (c) the whole model, n=1 -> n=4 fine-tuning         `train --init n4-init`
    stages/     one record per finished stage (what it measured, its FLOPs and seconds)

then each model is measured (`pretrained_report`: head-1 bits per byte; `bench decode`'s
tokens per forward and speedup at T=0.8/top-p 0.95, T=1 and greedy; plain decoding compared
with the n=1 model's token for token), and with `--reference` an n=4 model trained from
scratch (code-n4) is measured on the same prompts and windows. DIR gets results.json,
results.md and results.png; the last line printed is one JSON object {"experiment":
"pretrained", "results": [a row per model]}.

Equal compute: the budget is the training of the n=4 recipe (configs/code-n4.yaml); each way
of training the heads gets what the n=1 pretraining leaves of it, in estimated FLOPs
(`multitoken.flops`), which sets its steps. Wall time is reported beside.

A run stopped part way (Ctrl-C saves a training stage's checkpoint) continues when the same
command is run again with the same DIR: finished stages are not redone. A DIR that holds
results, or anything but this same run, is refused.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from multitoken import cliargs, flops
from multitoken.addheads import add_heads, run_config_with
from multitoken.bench.common import distinct_ngram_ratio
from multitoken.bench.decode import NGRAM, prompts_and_continuations
from multitoken.checkpoint import (
    check_tokenizer,
    find_checkpoint,
    load_checkpoint,
    model_config_from,
    read_config,
    save_checkpoint,
)
from multitoken.config import DistillConfig, RunConfig, from_dict
from multitoken.data import prepare_data
from multitoken.distill import distill
from multitoken.distill import plot as plot_distill
from multitoken.errors import ConfigError, MultitokenError
from multitoken.experiments.common import (
    RESULTS,
    claim_out_dir,
    eval_device,
    train_quietly,
    write_json,
    write_once,
)
from multitoken.experiments.pretrained_plan import NAME, RECIPES, Plan, check_reference, make_plan
from multitoken.experiments.pretrained_report import (
    VARIANTS,
    decode_runs,
    head_bits_per_byte,
    markdown,
    plot,
)
from multitoken.interop import HF_FAMILIES, export_hf, hf_family, load_hf
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import ByteTokenizer, load_tokenizer
from multitoken.train import TrainingInterrupted

# ---------------------------------------------------------------------------------------------
# The output directory.


# ---------------------------------------------------------------------------------------------
# The stages. Each returns its record (JSON); the driver adds its seconds and saves it.


class Pipeline:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.out = plan.out
        self.records: dict[str, dict[str, Any]] = {}
        self._val: np.ndarray | None = None

    def stages(self) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        variants = ["base", "heads", "distill", "finetune"]
        if self.plan.reference is not None:
            variants.append("reference")
        return [("pretrain", self.pretrain), ("export", self.export), ("convert", self.convert),
                ("add-heads", self.add_heads), ("heads", self.train_heads),
                ("distill", self.distill), ("finetune", self.finetune),
                *((f"measure-{v}", lambda v=v: self.measure(v)) for v in variants)]

    def pretrain(self) -> dict[str, Any]:
        res = train_quietly(copy.deepcopy(self.plan.n1), self.out / "n1")
        return {"flops": flops.train_flops(self.plan.n1), "steps": self.plan.n1.train.steps,
                "head_loss": res["head_loss"]}

    def export(self) -> dict[str, Any]:
        model, tok = load_checkpoint(self.out / "n1")
        target = write_once(self.out / "n1-hf", lambda tmp: export_hf(model, tmp, tok))
        return {"family": HF_FAMILIES[hf_family(model.cfg)],
                "files": sorted(p.name for p in target.iterdir())}

    def convert(self) -> dict[str, Any]:
        """`convert --hf n1-hf --out converted`, and whether the weights came back exactly."""
        hf = self.out / "n1-hf"
        model = load_hf(hf)
        tok = load_tokenizer(hf / "tokenizer.json")
        check_tokenizer(tok, model.cfg, None, hf)
        original, _ = load_checkpoint(self.out / "n1")
        a, b = model.state_dict(), original.state_dict()
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        save_checkpoint(self.out / "converted", model, tok, extra={"converted_from": str(hf)})
        return {"identical_weights": identical, "tokenizer": tok.name}

    def add_heads(self) -> dict[str, Any]:
        """`add-heads --checkpoint converted --n-future N --out n4-init`."""
        src = self.out / "converted"
        model, tok = load_checkpoint(src)
        new = add_heads(model, self.plan.budget["n_future"])
        run = run_config_with(read_config(src).get("run", {}), dataclasses.asdict(new.cfg))
        save_checkpoint(self.out / "n4-init", new, tok, run_config=run, step=0,
                        extra={"source": str(src)})
        return {"n_future": new.n_future, "params": new.num_params()}

    def _train_heads(self, cfg: RunConfig, name: str) -> dict[str, Any]:
        run = copy.deepcopy(cfg)
        # The model is the init checkpoint's, as the trainer makes it; set here as well, so that
        # continuing a stopped stage finds the config its checkpoint was saved with.
        init = find_checkpoint(run.train.init)
        run.model = model_config_from(read_config(init), init)
        res = train_quietly(run, self.out / name)
        return {"flops": flops.train_flops(cfg), "steps": cfg.train.steps,
                "head_loss": res["head_loss"]}

    def train_heads(self) -> dict[str, Any]:
        return self._train_heads(self.plan.heads, "heads")

    def finetune(self) -> dict[str, Any]:
        return self._train_heads(self.plan.finetune, "finetune")

    def distill(self) -> dict[str, Any]:
        """`distill --checkpoint n4-init --out distill` with the plan's settings."""
        src = self.out / "n4-init"
        cfg = self.plan.distill

        def write(tmp: Path) -> None:
            model, tok = load_checkpoint(src, device=eval_device())
            data = prepare_data(self.plan.n1.data, tok)
            tmp.mkdir(parents=True, exist_ok=True)
            with open(tmp / "distill.log", "w", encoding="utf-8") as log:
                metrics = distill(model, data.train, data.val, cfg,
                                  log=lambda *a: print(*a, file=log, flush=True))
            save_checkpoint(tmp / "checkpoint", model, tok,
                            run_config=read_config(src).get("run") or {}, step=cfg.steps,
                            extra={"distilled_from": str(src), "distill": metrics["config"]})
            (tmp / "distill.json").write_text(json.dumps(metrics, indent=1) + "\n")
            plot_distill(metrics, tmp / "distill.png")

        target = write_once(self.out / "distill", write)
        metrics = json.loads((target / "distill.json").read_text())
        d = flops.distill_flops(self.plan.heads.model, cfg)
        return {"flops": d["total"], "generation_flops": d["generation"], "steps": cfg.steps,
                **{f"{k}_{w}": metrics[w][k] for w in ("before", "after")
                   for k in ("top1", "accept", "chain_tokens_per_forward")}}

    def val(self) -> np.ndarray:
        if self._val is None:
            self._val = prepare_data(self.plan.n1.data, ByteTokenizer()).val
        return self._val

    def measure(self, variant: str) -> dict[str, Any]:
        where = {"base": "n1", "heads": "heads", "distill": "distill", "finetune": "finetune"}
        path = self.plan.reference if variant == "reference" else self.out / where[variant]
        assert path is not None
        model, _ = load_checkpoint(path, device=eval_device())
        s, t = self.plan.scale, self.plan.n1.train
        prompts, _ = prompts_and_continuations(self.val(), s.prompts, s.prompt_len, s.new_tokens)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as `bench decode` measures by default
        try:
            bpb = head_bits_per_byte(model, self.val(), t.seq_len, t.batch_size // t.grad_accum,
                                     t.eval_batches)
            runs, outputs = decode_runs(model, prompts, s.new_tokens, s.seed, model.n_future > 1)
        finally:
            torch.set_num_threads(threads)
        return {"checkpoint": str(find_checkpoint(path)), "n_future": model.n_future,
                "params": model.num_params(), "head_bits_per_byte": bpb, "runs": runs,
                "plain_outputs": outputs, "train_flops": self._own_flops(variant, model)}

    def _own_flops(self, variant: str, model: MultiTokenModel) -> float | None:
        """The reference's training (+ distillation) FLOPs from its saved configs, else None."""
        if variant != "reference":
            return None
        assert self.plan.reference is not None
        meta = read_config(self.plan.reference)
        try:
            total = flops.train_flops(from_dict(RunConfig, meta["run"]))
            if "distill" in meta:
                total += flops.distill_flops(model.cfg, from_dict(
                    DistillConfig, meta["distill"], prefix="distill."))["total"]
        except (KeyError, TypeError, MultitokenError):
            return None
        return total


# ---------------------------------------------------------------------------------------------
# Summary.


def summarise(pipe: Pipeline, command: str, wall_s: float) -> dict[str, Any]:
    plan, records = pipe.plan, pipe.records
    b = plan.budget
    what = {"pretrain": f"n=1 pretraining, configs/{RECIPES['n1']}",
            "heads": VARIANTS["heads"], "distill": VARIANTS["distill"],
            "finetune": VARIANTS["finetune"]}
    stages = [{"stage": k, "what": w, "steps": records[k]["steps"], "flops": records[k]["flops"],
               "seconds": records[k]["seconds"]} for k, w in what.items()]
    base = records["measure-base"]
    rows = []
    for name in [k[len("measure-"):] for k in records if k.startswith("measure-")]:
        m = records[f"measure-{name}"]
        if name == "base":
            f, secs = records["pretrain"]["flops"], records["pretrain"]["seconds"]
        elif name == "reference":
            f, secs = m["train_flops"], None
        else:
            f = records["pretrain"]["flops"] + records[name]["flops"]
            secs = records["pretrain"]["seconds"] + records[name]["seconds"]
        same = None
        if name in ("heads", "distill", "finetune"):
            same = {lb: m["plain_outputs"][lb] == base["plain_outputs"][lb] for lb in m["runs"]}
        rows.append({
            "variant": name, "checkpoint": m["checkpoint"], "n_future": m["n_future"],
            "params": m["params"], "head1_bits_per_byte": m["head_bits_per_byte"][0],
            "head_bits_per_byte": m["head_bits_per_byte"], "train_flops": f,
            "train_flops_ratio": None if f is None else f / b["total"], "train_seconds": secs,
            "plain_equals_base": same, "runs": m["runs"]})
    s = plan.scale
    _, conts = prompts_and_continuations(pipe.val(), s.prompts, s.prompt_len, s.new_tokens)
    return {"experiment": NAME, "scale": plan.scale_name, "command": command,
            "wall_time_s": round(wall_s, 1),
            "budget": {**b, "stages": stages},
            "hf_roundtrip_identical": records["convert"]["identical_weights"],
            "decode": {"prompts": s.prompts, "prompt_len": s.prompt_len,
                       "new_tokens": s.new_tokens, "batch_size": 1, "seed": s.seed,
                       "heldout_distinct_8": distinct_ngram_ratio(conts, NGRAM)},
            # per stage: its record (a measurement's runs are in its row of "results")
            "stages": {k: {x: v for x, v in r.items() if x not in ("plain_outputs", "runs")}
                       for k, r in records.items()},
            "results": rows}


def write_results(out: Path, summary: dict[str, Any]) -> None:
    minutes = summary["wall_time_s"] / 60
    (out / "results.md").write_text(
        f"# Bring your own model: an n=1 model gains draft heads ({summary['scale']} scale)\n\n"
        "A next-token model is trained, exported to Hugging Face format, read back from there, "
        "given 3 more heads, and the heads are trained three ways at equal total training "
        "compute with an n=4 model trained from scratch.\n\n"
        f"Command: `{summary['command']}`\n\nWall time: {minutes:.1f} min. Weights after the "
        "Hugging Face round trip identical to the trained model's: "
        f"{'yes' if summary['hf_roundtrip_identical'] else 'NO'}.\n\n{markdown(summary)}\n\n"
        "![results](results.png)\n\nEverything per stage: `results.json`.\n", encoding="utf-8")
    plot(summary["results"], out / "results.png")
    write_json(out / RESULTS, summary)


# ---------------------------------------------------------------------------------------------
# The driver.


def run_demo(scale_name: str, out: Path, reference: str | None,
             progress: bool = True) -> dict[str, Any]:
    """Every stage not yet finished in `out`, then the results (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("experiment pretrained runs in one process (not under torchrun)")
    t0 = time.perf_counter()
    out = out.resolve()
    plan = make_plan(scale_name, out, None)
    if reference is not None:
        plan.reference = check_reference(reference, plan.n1, plan.scale)
    claim_out_dir(out, plan.as_json(), "run", "scale, reference")
    (out / "stages").mkdir(exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # what an interrupted stage left half written
        shutil.rmtree(stale, ignore_errors=True)
    pipe = Pipeline(plan)
    earlier = 0.0  # seconds spent on stages by an earlier, stopped invocation
    stages = pipe.stages()
    bar = tqdm(total=len(stages), desc=NAME, unit="stage", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    with bar:
        for name, fn in stages:
            bar.set_postfix_str(name)
            path = out / "stages" / f"{name}.json"
            if path.is_file():
                record = json.loads(path.read_text(encoding="utf-8"))
                earlier += record["seconds"]
            else:
                t = time.perf_counter()
                record = fn()
                record["seconds"] = time.perf_counter() - t
                write_json(path, record)
            pipe.records[name] = record
            bar.update(1)
    command = (f"multitoken experiment {NAME}" + (" --quick" if scale_name == "quick" else "")
               + (f" --reference {reference}" if reference else "") + f" --out {out}")
    summary = summarise(pipe, command, time.perf_counter() - t0 + earlier)
    write_results(out, summary)
    return summary


def build_parser() -> cliargs.ArgumentParser:
    p = cliargs.ArgumentParser(
        prog=f"multitoken experiment {NAME}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Issue 12's demonstration: train an n=1 model (configs/code-n1.yaml), export "
        "it to Hugging Face format, convert it back, add 3 heads, train them three ways (heads "
        "only, self-distillation, full fine-tuning) at equal total compute with "
        "configs/code-n4.yaml, and measure decoding speed and head-1 loss of each.",
        epilog="docs/pretrained.md describes the stages, the compute budget and the figures.")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, few steps: the whole pipeline in about a minute on 2 CPU "
                   "cores (the full run takes well over an hour)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/experiments/pretrained-TIMESTAMP); "
                   "the same directory again continues a stopped run")
    p.add_argument("--reference", default=None,
                   help="an n=4 checkpoint trained from scratch (e.g. runs/code-n4-v2-distill) to "
                   "measure beside the variants; omitted: no reference row")
    p.add_argument("--threads", type=cliargs.positive_int, default=None,
                   help="torch CPU threads for the training stages (default: torch's); decoding "
                   "is measured with 1 thread, as `bench decode` does")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    scale = "quick" if args.quick else "full"
    out = Path(args.out) if args.out else Path(
        "runs", "experiments", f"{NAME}-{time.strftime('%Y%m%d-%H%M%S')}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = run_demo(scale, out, args.reference, not args.no_progress)
    except TrainingInterrupted as e:
        print(f"interrupted by {signal.Signals(e.signum).name}: {e.run_dir} saved at step "
              f"{e.step}; run the same command again to continue", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"interrupted: the finished stages are kept in {out}; run the same command again "
              "to continue", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {out / RESULTS}, {out / 'results.md'}, {out / 'results.png'}")
    print(json.dumps({"experiment": NAME, "results": summary["results"]}), flush=True)
    return 0


__all__ = ["Pipeline", "build_parser", "claim_out_dir", "main", "run_demo"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

