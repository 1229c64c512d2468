# Two commands do everything on a fresh machine:
#   make demo   — build a toy base + fine-tune, compress, serve several tenants, query them
#   make test   — install Python deps, build + cache the test cluster binaries and helm, run every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# uv installs the exact set in uv.lock; it is bootstrapped from PyPI into .uv (pinned here).
UV_VERSION := 0.13.9
UV     := .uv/bin/uv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install tools test demo crds bench clean lock
# Topic makefiles (mk/*.mk) add their own targets, and may add steps `make test` needs
# before pytest to TEST_PREREQS.
.DEFAULT_GOAL := install
TEST_PREREQS :=
-include $(sort $(wildcard mk/*.mk))
install: $(STAMP)

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# --locked: fail if uv.lock no longer matches pyproject.toml instead of silently re-resolving.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --python $(PYTHON)
	rm -f $(VENV)/.installed-*; touch $@

# After changing a range in pyproject.toml: re-resolve and commit uv.lock.
lock: $(UV)
	$(UV) lock

# etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built from pinned Go
# modules and cached under ~/.cache/deltafleet (first run: tens of minutes; then seconds);
# then the same control plane at the oldest supported minor, for the chart/CRD skew check.
tools: install
	bash tests/cluster/build-tools.sh
	bash tests/cluster/build-tools.sh --skew

test: install tools $(TEST_PREREQS)
	PYTHONSAFEPATH=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/deltafleet demo

crds: install
	$(BIN)/deltafleet crds --out crds/ --out charts/deltafleet/files/crds/

bench: install
	$(BIN)/python bench/kernels.py && $(BIN)/python bench/fidelity.py && $(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) .uv .pytest_cache
