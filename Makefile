# Entry points; the README's commands call these.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
PY          := $(VENV)/bin/python
CUDA_HOME   ?= /usr/local/cuda
DEMO_DATA   ?= data/shapes
DEMO_OUT    ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-cuda build-check bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $@

# Synthetic shapes data (COCO layout), then a tiny DETR + ENACT trained and evaluated on the
# CPU (a fresh run each time: the previous demo output is removed first).
demo: setup
	$(PY) tools/make_shapes_coco.py --out $(DEMO_DATA) --num_train 240 --num_val 60 \
		--min_size 96 --max_size 160 --seed 0
	rm -rf $(DEMO_OUT)
	$(PY) DETR-ENACT/main.py --coco_path $(DEMO_DATA) --output_dir $(DEMO_OUT) --smoothing_sigma 1 \
		--device cpu --backbone resnet18 --backbone_weights none --hidden_dim 64 --nheads 4 \
		--enc_layers 2 --dec_layers 2 --dim_feedforward 128 --dropout 0.0 --num_queries 20 \
		--train_sizes 128 --eval_size 128 --max_size 160 --batch_size 8 --lr 2e-4 \
		--lr_backbone 2e-5 --epochs 6 --lr_drop 5 --num_workers 1

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# On a GPU machine: only the tests that need CUDA.
test-cuda: setup
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

# Compile the CUDA extension without running it (works on a machine with nvcc and no GPU),
# into a fresh cache folder so that it really compiles.
build-check: setup
	tmp=$$(mktemp -d) && CUDA_HOME=$(CUDA_HOME) ENACT_CUDA_CACHE=$$tmp $(PY) -m enact_cuda.build \
		&& rm -rf $$tmp

bench: setup
	$(PY) benchmarks/bench_enact_kernels.py --profile --profile_sizes 25x38 --iters 20

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
