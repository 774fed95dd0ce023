"""`multitoken experiment NAME [--quick] [--seeds N] [--out DIR] [--head-types T,..]`: the
paper's small-scale experiments, one command each.

Each experiment generates its data from the seed, trains every configuration of its sweep with
`multitoken.train.train` (the code path of `multitoken train`, so a sweep also runs under
torchrun), loads each checkpoint, evaluates it, and writes into DIR:

    results.json   {"experiment", "scale", "seeds", "command", "wall_time_s", "results": [...]}
    results.md     the command, the wall time and the table (mean ± std over seeds)
    results.png    the figure
    plan.json      the sweep's settings (checked when the same DIR is run again)
    runs/KEY/      each configuration's run directory (checkpoint, metrics, train.log) and its
                   result.json; data/ and cache/ hold the generated data and token caches

The last line printed is one JSON object {"experiment": NAME, "results": [row, ...]}, a row per
configuration and seed: {"n_future", "params" (non-embedding), "seed", <metrics>...}.

`--head-types` (ntp-vs-mtp only) sweeps several head types side by side; without it, or with
`transformer` alone, the sweep, its folders and its plan are those of earlier versions.

A sweep stopped part way (Ctrl-C saves the running configuration's checkpoint) continues when
the same command is run again with the same --out: finished configurations are not redone.
A DIR that already holds results, or holds anything else, is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from multitoken import cliargs
from multitoken.checkpoint import load_checkpoint
from multitoken.config import ParallelConfig, to_dict
from multitoken.distributed import DistGroup, join
from multitoken.errors import ConfigError
from multitoken.experiments.common import (
    RESULTS,
    SCALES,
    Experiment,
    Job,
    claim_out_dir,
    eval_device,
    train_quietly,
    write_json,
)
from multitoken.experiments.exp_byte_heads import ByteHeadsExperiment
from multitoken.experiments.exp_induction import InductionExperiment
from multitoken.experiments.exp_ntp_vs_mtp import NtpVsMtpExperiment
from multitoken.experiments.exp_polynomial import PolynomialExperiment
from multitoken.train import TrainingInterrupted

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    InductionExperiment(), PolynomialExperiment(), NtpVsMtpExperiment(), ByteHeadsExperiment())}



def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def run_job(exp: Experiment, job: Job, scale: Any, out: Path, group: DistGroup
            ) -> dict[str, Any]:
    """Train (or continue) one configuration, evaluate it; its rows and the seconds it took."""
    t0 = time.perf_counter()
    exp.prepare(job, scale, out)
    run_dir = out / "runs" / job.key
    result = train_quietly(job.cfg, run_dir)
    model, tokenizer = load_checkpoint(run_dir, device=eval_device())
    metrics = exp.evaluate(job, model, tokenizer, result, scale, out)
    rows = exp.rows(job, model.num_params(), metrics)
    record = {"rows": rows, "seconds": time.perf_counter() - t0}
    if group.is_main:
        write_json(_record(out, job), record)
    return record


def _record(out: Path, job: Job) -> Path:
    """A finished configuration's rows and seconds: what a continued sweep does not redo."""
    return out / "runs" / job.key / "result.json"


def run_sweep(exp: Experiment, scale_name: str, n_seeds: int | None, out: Path,
              progress: bool = True, group: DistGroup | None = None,
              head_types: str | None = None) -> dict[str, Any]:
    """The whole sweep; returns what results.json holds (written, with the table and figure).

    Under torchrun (`group` joined by every rank), every rank trains every job together (the
    trainer reuses the group) and evaluates it; rank 0 alone checks and writes DIR, and decides
    which jobs a continued sweep skips, so that all ranks skip the same ones. `head_types`:
    `--head-types` (None: the experiment's default).
    """
    group = group or DistGroup()
    t0 = time.perf_counter()
    scale = exp.scale(scale_name)
    if head_types is not None:
        scale = exp.with_head_types(scale, head_types)
    options = exp.options(scale)
    seeds = list(range(n_seeds if n_seeds is not None else exp.default_seeds(scale)))
    out = out.resolve()
    jobs = exp.jobs(scale, seeds, out)
    plan = json.loads(json.dumps({
        "experiment": exp.name, "scale": scale_name, "seeds": seeds,
        **({"options": options} if options else {}),  # absent: plans of earlier versions match
        "jobs": {j.key: to_dict(j.cfg) for j in jobs}}))
    finished: set[str] = set()
    with group.agreement():  # rank 0's verdict on DIR: every rank goes on, or every rank stops
        if group.is_main and claim_out_dir(out, plan, "sweep",
                                          "experiment, scale, seeds, options"):
            finished = {j.key for j in jobs if _record(out, j).is_file()}
    finished = group.broadcast_object(finished)
    rows: list[dict[str, Any]] = []
    earlier_s = 0.0  # time spent on configurations by an earlier, stopped invocation
    bar = tqdm(total=len(jobs), desc=exp.name, unit="run", file=sys.stderr, dynamic_ncols=True,
               disable=not (progress and group.is_main))
    with bar:
        for job in jobs:
            bar.set_postfix_str(job.key)
            if job.key in finished:
                record = json.loads(_record(out, job).read_text(encoding="utf-8"))
                earlier_s += record["seconds"]
            else:
                record = run_job(exp, job, scale, out, group)
            rows.extend(record["rows"])
            bar.update(1)
    command = f"multitoken experiment {exp.name}" + {"full": "", "quick": " --quick"}.get(
        scale_name, f" --scale {scale_name}") + f" --seeds {len(seeds)} --out {out}" + (
        f" {options}" if options else "")
    summary = {"experiment": exp.name, "scale": scale_name, "seeds": seeds, "command": command,
               "wall_time_s": round(time.perf_counter() - t0 + earlier_s, 1), "results": rows}
    if group.is_main:
        table = exp.table(rows)
        minutes = summary["wall_time_s"] / 60
        (out / "results.md").write_text(
            f"# Experiment `{exp.name}` ({scale_name} scale)\n\n{exp.summary}.\n\n"
            f"Command: `{command}`\n\nWall time: {minutes:.1f} min; seeds: "
            f"{', '.join(map(str, seeds))} (mean ± sample std over seeds).\n\n{table}\n\n"
            f"![{exp.name}](results.png)\n\nPer-seed rows: `results.json`.\n", encoding="utf-8")
        exp.plot(rows, out / "results.png")
        write_json(out / RESULTS, summary)
    return summary


def build_parser() -> cliargs.ArgumentParser:
    names = "\n".join(f"  {n:<11} {e.summary}" for n, e in EXPERIMENTS.items())
    names += "\n  pretrained  n=1 model -> HF -> add heads -> train them 3 ways (its own --help)"
    p = cliargs.ArgumentParser(
        prog="multitoken experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one of the paper's experiments: generate its data, train every "
        "configuration, evaluate, write results.json, results.md and results.png.",
        epilog=f"experiments:\n{names}")
    p.add_argument("name", help="which experiment (see below)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced sweep (tiny models, few steps, 1 seed): under 3 minutes on 2 "
                   "CPU cores")
    p.add_argument("--seeds", type=cliargs.positive_int, default=None,
                   help="number of seeds (0..N-1) per configuration (default: 3, --quick: 1)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/experiments/NAME-TIMESTAMP)")
    p.add_argument("--threads", type=cliargs.positive_int, default=1,
                   help="torch CPU threads for training and evaluation (default 1: these models "
                   "are small, and a second thread on a busy machine costs far more than it gains)")
    p.add_argument("--head-types", default=None, metavar="T,..",
                   help="ntp-vs-mtp only: the head types to sweep side by side, comma-separated, "
                   "from transformer (the paper's parallel heads) and token_conditioned "
                   "(DeepSeek-V3's MTP modules); default transformer. n=1 is one model for all")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--scale", choices=SCALES, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    exp = get_experiment(args.name)
    scale = args.scale or ("quick" if args.quick else "full")
    out = Path(args.out) if args.out else Path(
        "runs", "experiments", f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        # Under torchrun: one process group for the whole sweep (the trainer joins it).
        with join(ParallelConfig()) as group:
            summary = run_sweep(exp, scale, args.seeds, out, not args.no_progress, group,
                                args.head_types)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted by {signal.Signals(e.signum).name}: {e.run_dir} saved at step "
                  f"{e.step}; run the same command again to continue the sweep", file=sys.stderr)
        return 128 + e.signum
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
    if group.is_main:
        print((out / "results.md").read_text(encoding="utf-8"))
        print(f"wrote {out / RESULTS}, {out / 'results.md'}, {out / 'results.png'}")
        print(json.dumps({"experiment": exp.name, "results": summary["results"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
