# The GPU check (bench/gpu_check.py). The GPU machine this project is lent has no network and
# its own python3 (torch, Triton, transformers preinstalled), so the check needs no make and no
# install there: `make gpu-wheels` here writes .whl/ with the wheels that machine lacks
# (versions from uv.lock), and the one line in docs/testing.md ("GPU check") installs them
# with pip --no-index and runs the check. `make test` rehearses exactly that under `unshare -n`
# (tests/install/test_gpu_check_rehearsal.py).
#
# make gpu-check: the same check on a GPU machine that has network (installs from the lock).
.PHONY: gpu-check gpu-wheels

gpu-wheels: $(UV)
	.uv/bin/python bench/gpu_wheels.py

gpu-check: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)
