# One command sets up and runs the main job (make demo); one sets up and runs the tests (make test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
PRETRAINED_DIR ?= runs/pretrained-$(shell date +%Y%m%d-%H%M%S)
REFERENCE ?=
GPU_CHECK_OUT ?= runs/gpu-check-$(shell date +%Y%m%d-%H%M%S)
GPU_CHECK_ARGS ?=

.PHONY: setup demo pretrained-demo test lint clean-cache gpu-check

setup: $(VENV)/.installed

# torch is installed first, pinned, so that pip never resolves a plain `torch` requirement to a
# multi-GB CUDA build; an environment that already has torch >= 2.13 keeps it.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 13))" 2>/dev/null \
		|| $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# train -> fit the draft heads to the model's own greedy output -> plain vs speculative decoding
# (sampled at T=0.8 / top-p 0.95, then greedy, each with the distinct-8-gram ratio of its text)
demo: setup
	$(BIN)/multitoken train --config configs/demo.yaml --out $(DEMO_DIR)
	$(BIN)/multitoken distill --checkpoint $(DEMO_DIR) --out $(DEMO_DIR)/distilled --sequences 256 --prompt-len 64 --new-tokens 128 --steps 150
	$(BIN)/multitoken bench decode --checkpoint $(DEMO_DIR)/distilled --prompts 4 --prompt-len 64 --new-tokens 128 --sampling 0.8:0.95,greedy --out-png $(DEMO_DIR)/decode.png

# issue 12's demonstration (docs/pretrained.md): n=1 model -> Hugging Face -> add heads -> train
# them three ways at equal compute with code-n4 -> decoding speed. 83 min measured on 2 quiet
# cores. REFERENCE=runs/code-n4 adds the n=4 model trained from scratch; the same
# PRETRAINED_DIR again continues a stopped run.
pretrained-demo: setup
	$(BIN)/multitoken experiment pretrained --out $(PRETRAINED_DIR) $(if $(REFERENCE),--reference $(REFERENCE))

# issue 20 (docs/gpu.md): the CUDA path's checks in one run of at most 8 minutes on one H100,
# figures in $(GPU_CHECK_OUT)/results.{json,md}; sets up its own venv on a bare GPU machine.
# GPU_CHECK_ARGS=--cpu-smoke runs the same plumbing at tiny sizes on the CPU (< 1 min).
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests
