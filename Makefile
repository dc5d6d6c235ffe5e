# gptkit — two commands from a fresh clone:
#   make demo   install into .venv, pretrain the bundled tiny GPT on CPU, print a sample from it
#   make test   install into .venv, run the whole test suite
#
# TORCH pins the CPU build CI uses. GPU users: `make install TORCH=torch` after installing the CUDA
# build of torch that matches their driver (see README, "Installing on a GPU machine").

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/gptkit pretrain pretrain/tiny --overwrite
	$(BIN)/gptkit generate runs/tiny --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 1

test: install
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/generation_throughput.py

clean:
	rm -rf $(VENV) runs
