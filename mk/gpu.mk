# make gpu-check — every GPU figure in one command, on a bare GPU machine from a clean checkout:
# installs from the lock (make install), prints device/driver/versions, runs the `gpu`-marked
# tests, the kernel benchmark at Llama-2-7B shapes, the compiled-resource report for the
# device's architecture and the serving benchmark at 7B shapes; each step under its own time
# limit (bench/gpu_check.py). JSON goes to bench/results/ and to $(OUT) when set. Exits
# non-zero if a test or a step failed. Budget: 8 minutes on one H100/H200.
.PHONY: gpu-check

gpu-check: install
	PYTHONSAFEPATH=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)
