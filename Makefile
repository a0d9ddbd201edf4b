# Everyday verbs. `make serve` and `make test` are the README's two set-up commands.
PYTHON  ?= python3
VENV    ?= .venv
FLAVOUR ?= cpu
BIN      = $(VENV)/bin
DEMO    ?= outputs/demo
BUNDLE  ?= $(DEMO)/bundle
HOST    ?= 127.0.0.1
PORT    ?= 8000
GRPC_PORT ?= 8001
STAMP    = $(VENV)/.installed-$(FLAVOUR)

export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-fast lint serve demo bench docker-check docker-smoke clean

# pip's own output is the progress report (a bar on a terminal, one line per package otherwise).
$(STAMP): pyproject.toml
	@echo "make install: creating $(VENV) and installing promptdistill[$(FLAVOUR),dev] (torch 2.13.0 CPU, open_clip,"
	@echo "make install: onnxruntime, faiss, FastAPI, test tools; about 1.3 GB: minutes, longer on a slow network)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: never let pip pick a newer (CUDA) build.
	$(BIN)/pip install --progress-bar on -e ".[$(FLAVOUR),dev]"
	touch $@
	@echo "make install: done ($(VENV))"

install: $(STAMP)

# The whole suite (what CI runs), and the inner loop without the tests marked slow.
test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check models service training promptdistill bench tests
	$(BIN)/mypy models service training promptdistill bench

demo: install
	$(BIN)/promptdistill demo --out $(DEMO)

# Serve $(BUNDLE); offline and without a bundle, build the demo bundle first.
serve: install
	@test -f $(BUNDLE)/manifest.json || $(BIN)/promptdistill demo --out $(DEMO)
	$(BIN)/promptdistill serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) --state-dir $(DEMO)/state

bench: install
	$(BIN)/python -m bench all

# Static checks of the container files (no Docker engine needed): hadolint and compose v1's parser.
docker-check: install
	$(BIN)/hadolint Dockerfile Dockerfile.gpu scripts/smoke/Dockerfile.infra
	docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.yml --profile cluster config -q

# The CPU image built and run for real (root; starts and stops its own dockerd; ~15-25 min on 2
# cores, ~25 GB of scratch space under SMOKE_WORK, default /var/tmp). See scripts/docker-smoke.sh.
docker-smoke: install
	PYTHON=$(abspath $(BIN))/python scripts/docker-smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
