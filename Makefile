# gptkit — two commands from a fresh clone:
#   make demo   install into .venv, pretrain the tiny GPT on CPU and sample it, fine-tune it to translate en->de, evaluate, translate
#   make test   install into .venv, run the whole test suite
#
# TORCH pins the CPU build CI uses. GPU users: `make install TORCH=torch` after installing the CUDA
# build of torch that matches their driver (see README, section "Install", "On a GPU machine").

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
	$(BIN)/gptkit generate runs/tiny --prompt "ROMEO:" --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 1
	$(BIN)/gptkit finetune translate/multi30k-tiny model.init_from=runs/tiny train.max_steps=300 \
		train.eval_every=150 finetune.eval_examples=50 data.test_files=[] --overwrite
	$(BIN)/gptkit eval --model runs/multi30k-tiny --data data/translate/multi30k_en_de_test.jsonl --limit 100
	$(BIN)/gptkit generate runs/multi30k-tiny/best --max-new-tokens 30 \
		--prompt "$$(printf 'English: Two dogs are playing in the snow.\nGerman:')"

test: install
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/generation_throughput.py

clean:
	rm -rf $(VENV) runs
