"""Multi-process training on CPU with gloo: DDP and FSDP2 match one process, exactly enough.

Each run is a real launch (torchrun, or two launchers for the 2-node case) of
`python -m multitoken train` on a tiny model and corpus. The single-process run with the same
global batch is the reference: per-step losses and final weights must agree within 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_corpus import make_corpus
from multitoken.errors import CheckpointError

pytestmark = pytest.mark.slow

STEPS = 6
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MULTITOKEN_TEST_SIGNAL", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(root / "corpus")
    overrides = [f"--data.paths=[{str(corpus)!r}]", f"--data.cache_dir={root / 'cache'}",
                 "--data.val_fraction=0.2", "--model.dim=32", "--model.n_layers=4",
                 "--model.n_heads=4", "--model.n_kv_heads=2", "--model.n_future=2",
                 "--model.max_seq_len=64", f"--train.steps={STEPS}", "--train.batch_size=8",
                 "--train.seq_len=32", "--train.eval_every=3", "--train.eval_batches=2",
                 "--train.ckpt_every=3", "--train.log_every=1", "--train.threads=1",
                 "--train.device=cpu", "--optim.warmup_steps=2", "--parallel.timeout_s=60"]
    return root, overrides


def _train_args(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--no-progress", "--no-sample", *overrides, *extra]


def _run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None,
         ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if ok and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def _torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "multitoken", *args], **kw)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]


def _assert_same_run(a: Path, b: Path, tol: float = TOL) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    assert len([r for r in ma if r["kind"] == "train"]) == STEPS
    for ra, rb in zip(ma, mb):
        assert abs(ra["loss"] - rb["loss"]) < tol, (ra, rb)
        for x, y in zip(ra["head_loss"], rb["head_loss"]):
            assert abs(x - y) < tol, (ra, rb)
    wa = load_file(str(a / "checkpoint" / "model.safetensors"))
    wb = load_file(str(b / "checkpoint" / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < tol, k


@pytest.fixture(scope="module")
def reference(setup):
    root, overrides = setup
    out = root / "single"
    _run([sys.executable, "-m", "multitoken", *_train_args(out, overrides)])
    return out


@pytest.fixture(scope="module")
def fsdp_run(setup):
    root, overrides = setup
    out = root / "fsdp"
    _torchrun(2, _train_args(out, overrides, "--parallel.strategy=fsdp"))
    return out


def test_ddp_matches_single_process(setup, reference):
    root, overrides = setup
    out = root / "ddp"
    res = _torchrun(2, _train_args(out, overrides, "--parallel.strategy=ddp"))
    _assert_same_run(reference, out)
    assert res.stdout.count("run: ") == 1  # only rank 0 prints
    assert "device cpu x2" in res.stdout


def test_fsdp_matches_single_process(reference, fsdp_run):
    _assert_same_run(reference, fsdp_run)
    ckpt = fsdp_run / "checkpoint"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    assert not (fsdp_run / "checkpoint.dcp.tmp").exists()


def test_two_nodes_match_single_process(setup, reference):
    """Two torchrun launchers (one process each) meeting through c10d rendezvous."""
    root, overrides = setup
    out = root / "two_nodes"
    port = _free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=mt-test", "-m", "multitoken",
             *_train_args(out, overrides, "--parallel.strategy=ddp")] for n in (0, 1)]
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    _assert_same_run(reference, out)


def test_fsdp_crash_mid_save_then_resume(setup, fsdp_run, tmp_path):
    """SIGKILL while committing the step-6 checkpoint: step 3 stays usable; resuming from it
    reproduces the uninterrupted run's loss curve and weights."""
    root, overrides = setup
    out = root / "fsdp_crash"
    # Rank 0 dies after the new checkpoint's files (dcp/ included) are written to
    # checkpoint.tmp, just before config.json marks it complete and the renames commit it.
    crasher = tmp_path / "crash_in_commit.py"
    crasher.write_text(
        "import os, signal, sys\n"
        "from multitoken import checkpoint\n"
        "orig = checkpoint._write_json\n"
        "def write(path, data):\n"
        f"    if data.get('step') == {STEPS}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    orig(path, data)\n"
        "checkpoint._write_json = write\n"
        "from multitoken.cli import main\n"
        "sys.exit(main())\n")
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(crasher),
                *_train_args(out, overrides, "--parallel.strategy=fsdp")], ok=False)
    assert res.returncode != 0
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["step"] == 3
    assert (out / "checkpoint.tmp" / "dcp").is_dir()  # the interrupted save's leftovers

    _torchrun(2, _train_args(out, overrides, "--parallel.strategy=fsdp", "--resume"))
    _assert_same_run(fsdp_run, out, tol=1e-6)
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.dcp.tmp").exists()

    # A sharded checkpoint cannot silently resume as an unsharded one.
    from multitoken.config import load_run_config
    from multitoken.train import train

    cfg = load_run_config(None, [o[2:] for o in overrides])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(CheckpointError, match="parallel.strategy=fsdp"):
            train(cfg, out, resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_consolidated_export_loads_in_one_process(reference, fsdp_run, capsys):
    from multitoken.checkpoint import load_checkpoint
    from multitoken.cli import main
    from multitoken.decoding.generate import generate

    model, tok = load_checkpoint(fsdp_run)
    ref_model, _ = load_checkpoint(reference)
    for (name, p), (_, q) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert (p - q).abs().max().item() < TOL, name
    ids = tok.encode("def f(x):\n    return")
    got = generate(model, ids, max_new_tokens=8).tokens[0]
    assert got == generate(ref_model, ids, max_new_tokens=8).tokens[0]
    assert len(got) == 8
    with torch.no_grad():  # greedy decoding is the argmax of head 1, token by token
        seq = list(ids)
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]), heads=[0])[0, 0, -1].argmax()))
    assert seq[len(ids):] == list(got)
    assert main(["eval", "--checkpoint", str(fsdp_run), "--batches", "2",
                 "--batch-size", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["head_loss"]) == 2


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_dead_or_stalled_rank_stops_the_other(setup, sig):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-training: rank 0 exits non-zero, with a
    clear message, within the collective timeout. Launched without torchrun, whose agent
    would otherwise kill rank 0 for us and hide a hang."""
    root, overrides = setup
    out = root / f"dead_{sig}"
    port, timeout_s = _free_port(), 5
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "multitoken", *_train_args(
                out, overrides, "--parallel.strategy=fsdp", f"--parallel.timeout_s={timeout_s}",
                "--train.steps=100000", "--train.eval_every=100000",
                "--train.ckpt_every=100000")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").is_file():  # both ranks are in the training loop
            assert time.monotonic() < deadline and procs[0].poll() is None, "run did not start"
            time.sleep(0.1)
        procs[1].send_signal(getattr(signal, sig))
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 40)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert "rank 0/2: a collective operation failed" in err, err[-2000:]
    assert elapsed < timeout_s + 30


def _launch_without_agent(args_per_rank: list[list[str]], timeout: float = 150
                          ) -> list[tuple[int, str, str]]:
    """Start one `multitoken` process per rank (RANK/WORLD_SIZE set by hand, no torchrun agent
    that would stop the others when one fails, or hide a hang); (exit code, stdout, stderr)
    of each. A rank still running after `timeout` seconds fails the test."""
    port, world = _free_port(), len(args_per_rank)
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "multitoken", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# parallel.timeout_s is far above the subprocess timeouts: a rank that waited for a collective to
# time out instead of stopping at once fails the test.
PATIENT = "--parallel.timeout_s=600"


def test_error_on_rank0_only_is_reported_once_and_stops_every_rank(setup, reference):
    """Rank 0 alone checks whether --out already holds a run. The user sees that message once
    (from rank 0), every rank exits non-zero, the existing run is untouched.

    Launched without torchrun: its agent stops the other ranks as soon as one exits, which
    hides both a hang and (most of the time) the other ranks' own messages."""
    _, overrides = setup
    before = (reference / "checkpoint" / "model.safetensors").read_bytes()
    args = _train_args(reference, overrides, "--parallel.strategy=ddp", PATIENT)
    (rc0, out0, err0), (rc1, out1, err1) = _launch_without_agent([args, args])
    assert rc0 == 2 and rc1 == 2, (err0[-2000:], err1[-2000:])
    assert len(_error_lines(err0)) == 1 and "already holds a run" in _error_lines(err0)[0], err0
    assert not _error_lines(err1) and "Traceback" not in err1, err1  # rank 1 stops quietly
    assert (reference / "checkpoint" / "model.safetensors").read_bytes() == before


def test_error_on_another_rank_is_reported_by_rank0(setup, tmp_path):
    """A data error on rank 1 only (its corpus path does not exist): rank 0 reports rank 1's
    message, once; both exit non-zero; no run folder is left behind."""
    _, overrides = setup
    out = tmp_path / "run"
    good = _train_args(out, overrides, "--parallel.strategy=fsdp", PATIENT)
    bad = [*good, f"--data.paths=[{str(tmp_path / 'missing')!r}]"]
    (rc0, _, err0), (rc1, _, err1) = _launch_without_agent([good, bad])
    assert rc0 == 2 and rc1 == 2, (err0[-2000:], err1[-2000:])
    lines = _error_lines(err0)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1/2: "), err0
    assert "missing" in lines[0]
    assert not _error_lines(err1) and "Traceback" not in err1, err1
    assert not out.exists()



def test_token_conditioned_heads_ddp_and_fsdp_match_single_process(setup):
    """Token-conditioned heads (n=4: head 4's attention gap in play) with the sequential loss:
    DDP and FSDP2 on 2 ranks follow the single-process run (same global batch) within 1e-5.
    (Gradient accumulation draws other rows than one big batch: tested in-process,
    tests/test_conditioned.py.)"""
    root, overrides = setup
    tc = [o for o in overrides if not o.startswith(("--model.n_future", "--model.n_layers"))]
    tc += ["--model.head_type=token_conditioned", "--model.n_future=4", "--model.n_layers=5",
           "--loss.method=sequential"]
    ref = root / "tc-single"
    _run([sys.executable, "-m", "multitoken", *_train_args(ref, tc)])
    for strategy in ("ddp", "fsdp"):
        out = root / f"tc-{strategy}"
        _torchrun(2, _train_args(out, tc, f"--parallel.strategy={strategy}"))
        _assert_same_run(ref, out)
