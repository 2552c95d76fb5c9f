# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What this machine needs: its local CUDA-build wheels run on the CPU too. pyproject.toml declares ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR  ?= runs/demo
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[serve,log,test,track]' $(TORCH_PIN)
	# Peer implementations the tests compare against (their own dependencies are not needed).
	$(BIN)/pip install -q --no-deps fastreid==1.4.0 torchreid==0.2.5
	touch $@

demo: install
	$(BIN)/cgpn synth --out $(DEMO_DIR)/data --preset demo
	$(BIN)/cgpn train --config configs/demo.yaml --set data.root=$(DEMO_DIR)/data --set output_dir=$(DEMO_DIR) --resume auto
	$(BIN)/cgpn show --checkpoint $(DEMO_DIR)/last.pt --set data.root=$(DEMO_DIR)/data --out $(DEMO_DIR)/ranked_list.png

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -n $(PYTEST_WORKERS)

test-all: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m ''

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
