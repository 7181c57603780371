# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-ls
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 9090

LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
CHROMIUM := /usr/bin/chromium

.PHONY: run test unit lint bench e2e clean lock docker-test results

# Tests, lint and bench tools come from the dev lock; the image installs requirements.lock only.
$(VENV)/.installed: requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Regenerate both locks from pyproject.toml after changing a pin there. Existing pins are kept
# where they still satisfy it; a scratch environment holds pip-tools and is removed after.
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS)
	$(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --extra=bench --extra=dev \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host --strip-extras \
		--output-file=requirements-dev.lock pyproject.toml
	$(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --constraint=requirements-dev.lock \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host --strip-extras \
		--output-file=requirements.lock pyproject.toml
	rm -rf $(LOCK_VENV)

# The browser test drives Debian's chromium; installed here the way the tests' Label Studio is.
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

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
	$(BIN)/hadolint Dockerfile

test: $(VENV)/.installed $(LS_VENV)/.installed $(CHROMIUM) lint
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/pytest -q

# Everything but the real-server, real-training and Label Studio tests: a few minutes.
unit: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow and not e2e"

e2e: $(VENV)/.installed $(LS_VENV)/.installed $(CHROMIUM)
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/pytest -q -m e2e

bench: $(VENV)/.installed
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/limits.py
	$(BIN)/python bench/first_model.py

# Everything in docs/results/, regenerated with the commands each report names (offline, CPU;
# hours on two cores: see docs/results/README.md). Checkpoints and datasets go to runs/.
results: $(VENV)/.installed
	$(BIN)/python -m model reproduce --data decoy-digits --out docs/results/decoy-digits \
		--checkpoint-dir runs/decoy-digits --gamma 3 --control
	$(BIN)/abn sweep --data decoy-digits --out docs/results/gamma.md --gammas 0,0.3,1,3,10 \
		--budgets all --selections misclassified \
		--extra confidence:52:3,confidence:400:3,misclassified:10:3
	$(BIN)/python -m model round-study --data decoy-digits --out docs/results/round-study \
		--work-dir runs/round-study \
		--strategies random,least-confident,misclassified,map-entropy,map-disagreement \
		--rounds 5 --size 20 --seeds 0,1,2 --epochs 10 --finetune-epochs 4 --image-size 64 \
		--device cpu --replay 200
	$(BIN)/python -m model round-study --data decoy-digits --out docs/results/round-study-guided \
		--work-dir runs/round-study \
		--strategies random,least-confident,misclassified,map-entropy,map-disagreement \
		--rounds 5 --size 20 --seeds 0,1,2 --epochs 10 --finetune-epochs 4 --image-size 64 \
		--device cpu --replay 200 --counterfactuals 2 --learning-stages 1 --guided-copies
	$(BIN)/python -m model round-study --data texture-shapes \
		--out docs/results/round-study-texture-shapes --work-dir runs/round-study \
		--strategies random,least-confident,misclassified,map-entropy,map-disagreement \
		--rounds 5 --size 20 --seeds 0,1,2 --epochs 4 --finetune-epochs 4 --image-size 64 \
		--device cpu --counterfactuals 4 --learning-stages 1 --replay 200
	$(BIN)/python -m model round-study --data texture-shapes \
		--out docs/results/round-study-texture-shapes-gentle --work-dir runs/round-study \
		--strategies random,least-confident,misclassified,map-entropy,map-disagreement \
		--rounds 5 --size 20 --seeds 0,1,2 --epochs 4 --finetune-epochs 4 --image-size 64 \
		--device cpu --counterfactuals 4 --learning-stages 1 --replay 200 --finetune-lr 0.00125
	$(BIN)/python -m model round-study --data decoy-digits \
		--out docs/results/gate-study/decoy-digits-guided --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 10 --replay 200 \
		--counterfactuals 2 --learning-stages 1 --guided-copies
	$(BIN)/python -m model round-study --data decoy-digits \
		--out docs/results/round-study-balanced --work-dir runs/round-study \
		--strategies random,class-balanced --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 10 --replay 200 \
		--counterfactuals 2 --learning-stages 1 --guided-copies
	$(BIN)/python -m model round-study --data texture-shapes \
		--out docs/results/round-study-balanced-texture-shapes --work-dir runs/round-study \
		--strategies random,class-balanced --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 4 --replay 200 \
		--counterfactuals 4 --learning-stages 1
	$(BIN)/python -m model round-study --data decoy-digits \
		--out docs/results/gate-study/decoy-digits-paper --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 10 --replay 200
	$(BIN)/python -m model round-study --data texture-shapes \
		--out docs/results/gate-study/texture-shapes --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 4 --replay 200 \
		--counterfactuals 4 --learning-stages 1
	$(BIN)/python -m model reproduce --data texture-shapes \
		--out docs/results/objectives/texture-shapes --objective counterfactual \
		--objective dont-look --objective counterfactual-layer3 \
		--objective counterfactual-propagated --seeds 0,1,2 --epochs 4 \
		--finetune-epochs 4 --image-size 64
	$(BIN)/python -m model round-study --data decoy-digits \
		--out docs/results/gate-study/decoy-digits-guided-follow-tasks --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 10 --replay 200 \
		--counterfactuals 2 --learning-stages 1 --guided-copies --follow-gate tasks
	$(BIN)/python -m model round-study --data decoy-digits \
		--out docs/results/gate-study/decoy-digits-guided-follow-views --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 10 --replay 200 \
		--counterfactuals 2 --learning-stages 1 --guided-copies --follow-gate counterfactual
	$(BIN)/python -m model reproduce --data background-shapes \
		--out docs/results/objectives/background-shapes --objective counterfactual \
		--objective counterfactual-layer3 --objective counterfactual-propagated \
		--seeds 0,1,2 --epochs 4 --finetune-epochs 4 --image-size 64
	$(BIN)/python -m model round-study --data background-shapes \
		--out docs/results/gate-study/background-shapes --work-dir runs/round-study \
		--strategies random,map-disagreement --rounds 5 --size 20 --seeds 0,1,2 \
		--finetune-epochs 4 --image-size 64 --device cpu --epochs 4 --replay 200 \
		--counterfactuals 4 --learning-stages 1
	$(BIN)/python -m model reproduce --data decoy-digits \
		--out docs/results/objectives/decoy-digits --objective counterfactual \
		--objective dont-look --objective counterfactual-layer3 \
		--objective counterfactual-propagated --seeds 0,1,2 --epochs 10 \
		--finetune-epochs 5 --image-size 64

# Builds the image and runs backend, worker and Redis from it (podman and buildah, as root):
# a prediction, a correction and a training to a new version, then removes everything.
docker-test:
	scripts/docker_test.sh

clean:
	rm -rf $(VENV) $(LS_VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
