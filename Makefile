# Two commands do everything on a fresh machine:
#   make demo   — build a toy base + fine-tune, compress, serve several tenants, query them
#   make test   — install Python deps, build + cache the test cluster binaries and helm, run every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install tools test demo crds bench clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

# etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built from pinned Go
# modules and cached under ~/.cache/deltafleet (first run: tens of minutes; then seconds).
tools: install
	bash tests/cluster/build-tools.sh

test: install tools
	PYTHONSAFEPATH=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/deltafleet demo

crds: install
	$(BIN)/deltafleet crds --out crds/ --out charts/deltafleet/files/crds/

bench: install
	$(BIN)/python bench/kernels.py && $(BIN)/python bench/fidelity.py && $(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) .pytest_cache
