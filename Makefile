# Thin wrappers; `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The host's CA bundle (this machine's proxy needs it); harmless where it is the system default.
export SSL_CERT_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

$(VENV)/.installed: requirements/lock.txt requirements/dev-lock.txt requirements/deepspeed-lock.txt pyproject.toml
	$(PYTHON) -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(PYTHON) -m uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	$(PYTHON) -m uv pip sync -q -p $(VENV)/bin/python --require-hashes \
		requirements/lock.txt requirements/dev-lock.txt
	# DeepSpeed (source only) builds against the torch installed above
	DS_BUILD_OPS=0 $(PYTHON) -m uv pip install -q -p $(VENV)/bin/python --require-hashes --no-deps \
		--no-build-isolation -r requirements/deepspeed-lock.txt
	$(PYTHON) -m uv pip install -q -p $(VENV)/bin/python --no-deps --no-build-isolation -e .
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Install the locked stack into .venv (host)

.PHONY: test
test: test-image test-container ## The whole test suite inside the frozen image, then the container tests (needs Docker)

.PHONY: test-host
test-host: $(VENV)/.installed ## The test suite on this machine's .venv (PYTEST_ARGS="-m 'not slow'" for the quick part)
	@# pytest exits 5 when it collected no tests: that is a broken suite, not a pass
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

.PHONY: test-faults
test-faults: $(VENV)/.installed ## Fault injection: FAULT_TRIALS (50) seeded SIGKILLs of `dreambooth run`, full disk, …
	FAULT_TRIALS=$${FAULT_TRIALS:-50} $(VENV)/bin/python -m pytest -m faults tests/test_faults.py $(PYTEST_ARGS)

.PHONY: demo
demo: $(VENV)/.installed ## The main job on the built-in tiny model (host; writes output/demo/)
	$(VENV)/bin/dreambooth demo --output output/demo

# ruff and pytest (requirements/dev-lock.txt, hash-checked) in a small venv: linting and the container tests
# need neither torch nor the 3 GB .venv
TOOLS ?= .tools
$(TOOLS)/.installed: requirements/dev-lock.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements/dev-lock.txt
	touch $@

.PHONY: lint
lint: $(TOOLS)/.installed ## ruff (Python); lint-docker checks the Dockerfiles, shell scripts and YAML
	$(TOOLS)/bin/ruff check .
	$(TOOLS)/bin/ruff format --check .

.PHONY: lock
lock: ## Re-generate requirements/*.txt (hashes) from requirements/*.in
	$(PYTHON) -m uv pip compile -q requirements/main.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements/lock.txt
	$(PYTHON) -m uv pip compile -q requirements/dev.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements/dev-lock.txt
	$(PYTHON) -m uv pip compile -q requirements/deepspeed.in -c requirements/lock.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--no-build-isolation-package deepspeed -p $(VENV)/bin/python -o requirements/deepspeed-lock.txt

.PHONY: help
help: ## This list
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# ---------------------------------------------------------------------------------------------------------------
# Docker: thin wrappers over compose.yaml and the Dockerfile. A bare Linux machine: docker/ci-bootstrap.sh first.
#   make build | train | doctor | test-image        MODEL=, DATA=, CONFIG=, PROMPT= pass through to `train`
#   GPU=1 / GPU=0 forces the GPU / CPU services (default: detected); BASE_IMAGE=... overrides the pinned base.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= dreambooth:$(VERSION)
TEST_IMAGE ?= $(IMAGE)-test
DOCKER ?= docker
COMPOSE ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
# In a WSL2 shell (Docker Desktop on Windows) the services run the WSL variant built from Dockerfile.windows.
WSL := $(shell grep -qsi microsoft /proc/sys/kernel/osrelease && echo 1)
RUN_IMAGE := $(IMAGE)$(if $(WSL),-wsl)

# what compose.yaml reads
export DREAMBOOTH_IMAGE := $(RUN_IMAGE)
export DREAMBOOTH_LINUX_IMAGE := $(IMAGE)
export DREAMBOOTH_WSL_IMAGE := $(IMAGE)-wsl
export DREAMBOOTH_TEST_IMAGE := $(TEST_IMAGE)
export CA_BUNDLE ?= $(or $(wildcard /etc/ssl/certs/ca-certificates.crt),/dev/null)
# the containers' user: yours, so that ./output stays yours; never root (as root: the image's own user, 1000:0)
HOST_UID := $(shell id -u)
export DREAMBOOTH_USER := $(if $(filter 0,$(HOST_UID)),1000:0,$(HOST_UID):$(shell id -g))
export VERSION
export REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
export SOURCE := $(or $(shell git config --get remote.origin.url 2>/dev/null),unknown)
export CREATED := $(shell git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
ifneq ($(strip $(BASE_IMAGE)),)
export BASE_IMAGE
endif
# Hosts that cannot pull (CI here: no registry): when the pinned base is not present locally but
# docker/ci-bootstrap.sh's debootstrapped one is, build from that (BASE_IMAGE=... always wins). Decided when the
# recipe runs, not when make reads this file: docker-ready may have just made it.
PINNED_BASE := $(shell sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
LOCAL_BASE ?= local/debian:bookworm
define with_base
if [ -z "$${BASE_IMAGE:-}" ] && ! $(DOCKER) image inspect $(PINNED_BASE) >/dev/null 2>&1 \
	&& $(DOCKER) image inspect $(LOCAL_BASE) >/dev/null 2>&1; then \
	export BASE_IMAGE=$(LOCAL_BASE); echo "notice: building from $(LOCAL_BASE) ($(PINNED_BASE) is not here to pull)" >&2; fi
endef
export MODEL DATA CONFIG PROMPT GPUS ADAPTER UI_PORT DREAMBOOTH_UI_TOKEN

# what compose.yaml's x-hardened sets, for the few plain `docker run`s (README "Security")
HARDENED := --read-only --tmpfs /tmp:size=1g --cap-drop ALL --security-opt no-new-privileges --network none
# `compose run --rm`, but with the container's exit status (docker/compose-run.sh says why)
COMPOSE_RUN = COMPOSE="$(COMPOSE)" DOCKER="$(DOCKER)" docker/compose-run.sh
# ./models/x, models/x → /models/x: host paths under the repo as the container sees them
cpath = $(if $(filter /%,$(1)),$(1),/$(patsubst ./%,%,$(1)))
# sets $$svc to $(2) (GPU) when Docker can give containers an NVIDIA GPU, else to $(1) with a one-line notice
define pick_service
if [ "$(GPU)" = 1 ]; then svc=$(2); \
elif [ "$(GPU)" != 0 ] && $(DOCKER) info 2>/dev/null | grep -i 'runtimes:' | grep -qw nvidia; then svc=$(2); \
elif [ "$(GPU)" != 0 ] && [ -n "$(WSL)" ] && nvidia-smi -L >/dev/null 2>&1; then svc=$(2); \
elif [ "$(GPU)" != 0 ] && nvidia-smi -L >/dev/null 2>&1; then svc=$(1); \
  echo "notice: a GPU is here but Docker has no NVIDIA runtime (install the NVIDIA Container Toolkit): running on the CPU" >&2; \
else svc=$(1); echo "notice: no NVIDIA GPU runtime on this Docker host: running on the CPU (slow; GPU=1 forces the GPU service)" >&2; fi
endef

.PHONY: docker-ready
docker-ready: # Docker and compose answer (and the linters are here); on a bare machine as root, bootstrap them first
	@if ! { $(DOCKER) info && $(COMPOSE) version && command -v hadolint shellcheck yamllint; } >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then echo "notice: Docker, compose or a linter is missing: running docker/ci-bootstrap.sh" >&2; \
			sh docker/ci-bootstrap.sh; \
		else echo "error: no Docker daemon, compose v2 or linter answers (docker info / $(COMPOSE) version)" >&2; \
			echo "hint: install Docker with compose v2 and start it, or run \`sudo docker/ci-bootstrap.sh\` once" >&2; exit 3; fi; \
	fi

.PHONY: build
build: docker-ready ## Build the image (IMAGE=dreambooth:VERSION); in WSL2 also the -wsl variant (Dockerfile.windows)
	@$(with_base); set -x; DREAMBOOTH_IMAGE=$(IMAGE) $(COMPOSE) build train
	$(DOCKER) tag $(IMAGE) dreambooth:latest
	@# each rebuild leaves the previous image untagged (~8 GB apparent); the disk is shared, so drop ours
	@$(DOCKER) image prune -f --filter label=org.opencontainers.image.title=dreambooth >/dev/null
	$(if $(WSL),$(COMPOSE) --profile wsl build wsl)

.PHONY: dirs
dirs:
	@mkdir -p models data output cache
	@# as root the containers run as 1000:0 (never root): give them the two folders they write
	@if [ "$(HOST_UID)" = 0 ]; then chown -R $(DREAMBOOTH_USER) output cache; fi

.PHONY: train
train: build dirs ## Train in the image: MODEL=./models/x.safetensors DATA=./data/alice [PROMPT=] | CONFIG=./data/run.toml | neither: tiny demo; [GPUS=2] [ADAPTER=lora]
	@$(call pick_service,train,train-gpu); set -x; $(COMPOSE_RUN) $$svc $(ARGS)

.PHONY: ui
ui: build dirs ## The web page in the image: http://127.0.0.1:7860 [UI_PORT=]; it prints the link with its token
	@# the page saves captions and uploaded photos in ./data; as root the container runs as 1000:0, so let group 0
	@# create files in data's folders (the photos themselves keep their owner and mode)
	@if [ "$(HOST_UID)" = 0 ]; then find data -type d -exec chmod g+rwx {} +; fi
	@set -x; $(COMPOSE) --profile ui up ui

.PHONY: demo-image
demo-image: build dirs ## The tiny offline demo inside the image (writes output/demo/)
	@$(call pick_service,train,train-gpu); set -x; $(COMPOSE_RUN) -e MODEL= -e DATA= -e CONFIG= $$svc $(ARGS)

.PHONY: convert
convert: build dirs ## Single file → diffusers folder in the image: MODEL=./models/x.safetensors [DEST=./output/base] [ARGS=--ema]
	@test -n "$(MODEL)" || { echo "error: MODEL is not set"; echo "hint: make convert MODEL=./models/v1-5-pruned.safetensors"; exit 2; } >&2
	$(COMPOSE_RUN) convert $(call cpath,$(MODEL)) $(call cpath,$(or $(DEST),./output/base)) $(ARGS)

.PHONY: export
export: build dirs ## Diffusers folder → A1111/ComfyUI file: [SRC=./output/base] [DEST=./output/export/model.safetensors] [ARGS=--half]
	$(COMPOSE_RUN) export $(call cpath,$(or $(SRC),./output/base)) \
		$(call cpath,$(or $(DEST),./output/export/model.safetensors)) $(ARGS)

.PHONY: doctor
doctor: build dirs ## Environment report inside the image (GPU, driver, versions, xformers/bnb ops, volumes, disk)
	@$(call pick_service,doctor,doctor-gpu); set -x; $(COMPOSE_RUN) $$svc $(ARGS)

.PHONY: test-image
test-image: build ## The test suite inside the frozen image (target `test`): PYTEST_ARGS="-m 'not slow'" for the quick part
	@$(with_base); set -x; $(COMPOSE) --profile test build test
	@# as `build` does for the image: drop the test image this rebuild left untagged (it has no OCI labels)
	@$(DOCKER) image prune -f --filter label=com.docker.compose.project=dreambooth \
		--filter label=com.docker.compose.service=test >/dev/null
	@# pytest exits 5 when it collected no tests: that is a broken suite (or image), not a pass
	$(COMPOSE_RUN) test python -m pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests in the image" >&2; exit 1; fi; exit $$rc

.PHONY: test-container
test-container: build $(TOOLS)/.installed ## Tests that drive the built image with docker (tests/container): hardened, non-root, read-only inputs, docker stop
	DREAMBOOTH_TEST_IMAGE_RUNTIME=$(IMAGE) DOCKER="$(DOCKER)" COMPOSE="$(COMPOSE)" \
		$(TOOLS)/bin/python -m pytest -p no:cacheprovider \
		--confcutdir=tests/container tests/container $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no container tests" >&2; exit 1; fi; exit $$rc

.PHONY: lint-docker
lint-docker: docker-ready ## hadolint (Dockerfiles), shellcheck (entrypoint/, docker/), compose config, yamllint
	hadolint Dockerfile Dockerfile.windows
	shellcheck entrypoint/*.sh docker/*.sh
	$(COMPOSE) --profile '*' config -q
	yamllint --strict compose.yaml .hadolint.yaml .yamllint

.PHONY: bench
bench: build dirs ## bench/convert.py inside the image (BENCH_ARGS="--json bench/results/convert-image.json")
	$(DOCKER) run --rm $(HARDENED) --user $(DREAMBOOTH_USER) --shm-size 8g \
		-v "$(CURDIR)/bench:/workspace/bench" -v "$(CURDIR)/output:/output" -v "$(CURDIR)/cache:/cache" \
		$(RUN_IMAGE) python bench/convert.py $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove this project's containers, images and dangling build cache (keeps output/, models/, data/, cache/)
	-$(COMPOSE) --profile '*' down --remove-orphans
	-$(DOCKER) image rm $(IMAGE) $(IMAGE)-wsl $(TEST_IMAGE) dreambooth:latest 2>/dev/null
	-$(DOCKER) image prune -f
	-$(DOCKER) builder prune -f
