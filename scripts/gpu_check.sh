#!/usr/bin/env bash
# The CUDA path in one time-boxed run (issue 20, docs/gpu.md):
#
#   scripts/gpu_check.sh OUT_DIR [--cpu-smoke] [--budget-s S] [--only stage,stage]
#
# Sets itself up from the repo alone, then runs `python -m multitoken.bench.gpu_check`: pytest -m
# cuda, torchrun (nccl, world size 1: DDP and FSDP2) against one process, train-memory and
# train-speed at ~1B parameters, decode forward costs and eager vs CUDA-graph vs compiled decode
# steps, and the demo recipe trained and decoded on the GPU. Writes OUT_DIR/results.json,
# results.md and log.txt; exits 1 if any check failed. --cpu-smoke: the same at tiny sizes on the
# CPU (< 1 min).
#
# Set-up: a venv (default .cache/gpu-check-venv, GPU_CHECK_VENV to move it) on top of the first
# Python that has torch (GPU_CHECK_PYTHON, this repo's .venv, python3, /opt/torch/.venv): it sees
# that Python's packages (the machine's CUDA torch wheel, which a machine without internet cannot
# download) and this repo's src/. With no such Python, torch and the project come from the
# package index (pip: torch's default Linux wheel is the CUDA build).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--cpu-smoke] [--budget-s S] [--only STAGES]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -*) usage ;; esac
OUT_DIR=$1
shift
SMOKE=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && SMOKE=1; done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GPU_CHECK_VENV:-$ROOT/.cache/gpu-check-venv}
mkdir -p "$OUT_DIR" || exit 2
T0=$(date +%s.%N)

log() { echo "[gpu_check] $*" >&2; }

# Does $1 import torch (and, for a GPU run, see a CUDA device)?
has_torch() {
    local want="True"
    [ "$SMOKE" = 1 ] && want=""
    "$1" -c "import sys, torch; sys.exit(0 if (not '$want' or torch.cuda.is_available()) else 3)" \
        >/dev/null 2>&1
}

# The project's imports, in the environment the checks will run in.
imports_ok() {
    "$1" -c "import torch, numpy, yaml, safetensors, tokenizers, tqdm, matplotlib, pytest; \
import multitoken.cli, multitoken.train, multitoken.decoding.generate" >/dev/null 2>&1
}

PY=""
if [ -x "$VENV/bin/python" ] && has_torch "$VENV/bin/python" && imports_ok "$VENV/bin/python"; then
    PY=$VENV/bin/python
    log "set-up: reusing $VENV"
else
    BASE=""
    for c in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python" python3 /opt/torch/.venv/bin/python3 python; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
        if has_torch "$c"; then BASE=$c; break; fi
    done
    rm -rf "$VENV"
    if [ -n "$BASE" ]; then
        log "set-up: venv on $BASE ($("$BASE" -c 'import torch; print("torch", torch.__version__)'))"
        if "$BASE" -m venv --without-pip "$VENV"; then
            SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            # This repo's src first, then the base Python's site-packages (its .pth files too).
            "$BASE" - "$ROOT/src" >"$SITE/00-gpu-check.pth" <<'EOF'
import os, site, sys
print(sys.argv[1])
dirs = [*site.getsitepackages(), site.getusersitepackages(),
        *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
for d in dict.fromkeys(d for d in dirs if os.path.isdir(d)):
    print(f"import site; site.addsitedir({d!r})")
EOF
            PY=$VENV/bin/python
        else  # no venv module: the base Python itself, with this repo's src on its path
            log "set-up: no venv; using $BASE with PYTHONPATH=$ROOT/src"
            PY=$BASE
            export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
        fi
        if ! imports_ok "$PY"; then  # a package the base lacks: try the index (may be offline)
            log "set-up: installing the project's missing dependencies"
            "$PY" -m pip install -q --no-input numpy pyyaml safetensors tokenizers tqdm matplotlib pytest \
                >&2 || true
        fi
    else
        log "set-up: no Python with torch found; installing torch and the project from the index"
        python3 -m venv "$VENV" || exit 2
        PY=$VENV/bin/python
        "$PY" -m pip install -q --upgrade pip >&2
        "$PY" -m pip install -q torch >&2 && "$PY" -m pip install -q -e "$ROOT[dev]" >&2 || exit 2
    fi
    if ! imports_ok "$PY"; then
        log "set-up failed: $PY cannot import the project and its dependencies:"
        "$PY" -c "import torch, numpy, yaml, safetensors, tokenizers, tqdm, matplotlib, pytest; import multitoken.cli, multitoken.train" >&2
        exit 2
    fi
fi
SETUP_S=$("$PY" -c "import time; print(round(time.time() - $T0, 1))" 2>/dev/null || echo 0)
log "set-up: ${SETUP_S} s, python $PY"

cd "$ROOT" || exit 2
exec "$PY" -m multitoken.bench.gpu_check --out "$OUT_DIR" --setup-s "$SETUP_S" "$@"
