# Thin wrappers; `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The host's CA bundle (this machine's proxy needs it); harmless where it is the system default.
export SSL_CERT_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

$(VENV)/.installed: requirements/lock.txt requirements/dev-lock.txt pyproject.toml
	$(PYTHON) -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(PYTHON) -m uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	$(PYTHON) -m uv pip sync -q -p $(VENV)/bin/python --require-hashes --index-url https://pypi.org/simple \
		requirements/lock.txt requirements/dev-lock.txt
	$(PYTHON) -m uv pip install -q -p $(VENV)/bin/python --no-deps --no-build-isolation -e .
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Install the locked stack into .venv (host)

.PHONY: test
test: $(VENV)/.installed ## Run the whole test suite (PYTEST_ARGS="-m 'not slow'" for the quick part)
	@# pytest exits 5 when it collected no tests: that is a broken suite, not a pass
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

.PHONY: demo
demo: $(VENV)/.installed ## The main job on the built-in tiny model (host; writes output/demo/)
	$(VENV)/bin/dreambooth demo --output output/demo

.PHONY: lint
lint: $(VENV)/.installed ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: lock
lock: ## Re-generate requirements/*.txt (hashes) from requirements/*.in
	$(PYTHON) -m uv pip compile -q requirements/main.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple -o requirements/lock.txt
	$(PYTHON) -m uv pip compile -q requirements/dev.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple -o requirements/dev-lock.txt

.PHONY: help
help: ## This list
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
