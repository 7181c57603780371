# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-ls
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 9090

.PHONY: run test unit lint bench e2e clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Label Studio lives in its own environment: its pins clash with ours, and the
# end-to-end tests drive it as a separate server, as users run it.
$(LS_VENV)/.installed: requirements-label-studio.txt
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet -r requirements-label-studio.txt
	touch $@

run: $(VENV)/.installed
	$(BIN)/abn run --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.installed $(LS_VENV)/.installed lint
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/pytest -q

# Everything but the real-server, real-training and Label Studio tests: a few minutes.
unit: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow and not e2e"

e2e: $(VENV)/.installed $(LS_VENV)/.installed
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/pytest -q -m e2e

bench: $(VENV)/.installed
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/limits.py
	$(BIN)/python bench/first_model.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache
