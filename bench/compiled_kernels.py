"""Old vs new Triton kernels, compiled ahead of time for a GPU target (no GPU needed).

Triton compiles for a target it does not have; ptxas and cuobjdump (shipped with Triton)
then report what the hardware would run: registers, spills (ptxas -v), shared memory
(static + Triton's dynamic), and the SASS of the inner K loop — its instruction count, its
global loads by width, and instructions per sign byte (loop instructions × 32 threads ×
warps / sign bytes consumed per iteration).

"Old" is the code at commit OLD_COMMIT (autotuned tl.dot kernels, read from git), "new" is
the working tree (triton_decode.py, triton_delta.py) at launch_table.DEFAULT's configs.
Shapes: N = K = 4096, fp16, strides of contiguous tensors (as Triton specializes them).

    python bench/compiled_kernels.py [--arch 90] [--out bench/results/kernels-compiled-sm90-triton<version>.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Compiling for a GPU target needs real JIT functions: under the interpreter (TRITON_INTERPRET,
# which the CPU test suite sets) triton.jit returns interpreted ones, which cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "9bc626a"  # the kernels before issue 12
OLD_FILES = ["__init__.py", "grouping.py", "packing.py", "validation.py", "triton_configs.py", "triton_delta.py", "triton_fused.py"]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
N = K = 4096


def old_package() -> str:
    """Write the old kernel files into a temporary package `oldkernels`; return its parent dir."""
    parent = Path(tempfile.mkdtemp(prefix="oldkernels-"))
    pkg = parent / "oldkernels"
    pkg.mkdir()
    for name in OLD_FILES:
        if name == "__init__.py":
            (pkg / name).write_text("")
            continue
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:kernels/{name}"],
                             capture_output=True, text=True, check=True).stdout
        (pkg / name).write_text(src)
    return str(parent)


def signature(fn, pointers: dict[str, str], constexprs: dict) -> tuple[dict, dict]:
    """Triton's specialization of a launch with contiguous 16-byte-aligned tensors and N = K = 4096."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name not in ("M", "ROWS_BUCKET"):  # sizes and strides of these shapes are multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(fn, pointers, constexprs, num_warps, num_stages, arch):
    sig, attrs = signature(fn, pointers, constexprs)
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel


def resources(kernel, arch) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = Path(d) / "k.cubin", Path(d) / "k.ptx"
        cubin.write_bytes(kernel.asm["cubin"])
        ptx.write_text(kernel.asm["ptx"])
        usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        verbose = subprocess.run([get_ptxas(arch).path, f"-arch={target}", "-v", ptx, "-o", Path(d) / "v.cubin"],
                                 capture_output=True, text=True).stderr
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    static_smem = int(re.search(r"SHARED:(\d+)", usage).group(1))
    spill_st = re.search(r"(\d+) bytes spill stores", verbose)
    spill_ld = re.search(r"(\d+) bytes spill loads", verbose)
    return {
        "registers": reg,
        "spill_store_bytes": int(spill_st.group(1)) if spill_st else None,
        "spill_load_bytes": int(spill_ld.group(1)) if spill_ld else None,
        "stack_bytes": stack,
        "shared_bytes": static_smem + kernel.metadata.shared,
        "sass": sass,
    }


def inner_loop(sass: str) -> dict:
    """The largest backward-branch loop of the SASS (the K loop with sign loads): counts."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {a: i for i, (a, _) in enumerate(ins)}
    best = []
    for i, (a, text) in enumerate(ins):
        if "BRA" in text:
            m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
                body = ins[index[int(m.group(1), 16)] : i + 1]
                if len(body) > len(best):
                    best = body
    ops = Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for _, t in best)
    loads = {op: c for op, c in ops.items() if op.startswith("LDG")}
    return {"instructions": len(best), "global_loads": loads,
            "top_ops": dict(ops.most_common(10)), "shared_ops": sum(c for op, c in ops.items() if op.startswith(("LDS", "STS"))),
            "barriers": sum(c for op, c in ops.items() if op.startswith("BAR"))}


def case(label, fn, pointers, constexprs, num_warps, num_stages, sign_bytes_per_iter, arch, note):
    kernel = compile_kernel(fn, pointers, constexprs, num_warps, num_stages, arch)
    res = resources(kernel, arch)
    loop = inner_loop(res.pop("sass"))
    per_byte = loop["instructions"] * 32 * num_warps / sign_bytes_per_iter
    row = {"kernel": label, "config": {**{k: v for k, v in constexprs.items() if k.isupper()}, "num_warps": num_warps,
                                        "num_stages": num_stages},
           **res, "inner_loop": loop, "sign_bytes_per_iteration": sign_bytes_per_iter,
           "instructions_per_sign_byte": round(per_byte, 2), "note": note}
    print(f"{label:34s} regs {res['registers']:3d}  spill st/ld {res['spill_store_bytes']}/{res['spill_load_bytes']}  "
          f"smem {res['shared_bytes']:6d}  loop {loop['instructions']:4d} instr  {per_byte:6.2f} instr/sign byte  "
          f"shared ld/st {loop['shared_ops']}  barriers {loop['barriers']}  loads {loop['global_loads']}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch = args.arch
    fp16 = {"y_ptr": "*fp16", "x_ptr": "*fp16", "w_ptr": "*fp16", "scale_ptr": "*fp32"}
    unit = {"stride_xk": 1, "stride_wk": 1, "stride_sw": 1, "stride_yn": 1, "stride_an": 0}
    rows = []

    try:
        sys.path.insert(0, old_package())
        old_delta = importlib.import_module("oldkernels.triton_delta")._delta_kernel.fn
        old_fused = importlib.import_module("oldkernels.triton_fused")._fused_kernel.fn
        old_note = None
    except (subprocess.CalledProcessError, OSError) as e:  # a shallow clone has no old commit
        old_note = f"old kernels skipped: commit {OLD_COMMIT} not readable ({e})"
        print(old_note, flush=True)
    for bn in (16, 64, 128) if old_note is None else ():  # decode configs of the old autotune list (BLOCK_M = 16, 3 stages)
        c = {"SCALE_PER_ROW": False, "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 256,
             **{k: v for k, v in unit.items() if k in old_delta.arg_names}}
        rows.append(case(f"old delta (tl.dot) BN={bn}", old_delta, fp16, c, 4, 3, bn * 256 // 8, arch,
                         "one tenant per program; 16 padded rows; unique sign bytes per iteration"))
        c = {**c, **{k: v for k, v in unit.items() if k in old_fused.arg_names}}
        rows.append(case(f"old fused (tl.dot) BN={bn}", old_fused, fp16, c, 4, 3, bn * 256 // 8, arch,
                         "base + delta, one tenant per program; 16 padded rows"))

    from deltafleet.kernels.launch_table import DEFAULT
    from deltafleet.kernels.triton_decode import _decode_kernel
    from deltafleet.kernels.triton_delta import _prefill_delta_kernel

    for b in (1, 2, 4, 8, 16):
        cfg = DEFAULT.decode[b]
        c = {"SCALE_PER_ROW": False, "ROWS": cfg.rows, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": 1,
             "EVEN_K": True, "INTERPRETED": False, **unit}
        rows.append(case(f"new decode ROWS={cfg.rows} BN={cfg.block_n}", _decode_kernel, fp16, c, cfg.num_warps,
                         cfg.num_stages, cfg.rows * cfg.block_n * cfg.block_k // 8, arch,
                         "base on tensor cores + delta in packed 16-bit pairs, one loop; sign bytes of ROWS rows "
                         "per iteration (each row its own tenant: all unique); split_k=1"))
    p = DEFAULT.prefill
    c = {"SCALE_PER_ROW": False, "BLOCK_M": p.block_m, "BLOCK_N": p.block_n, "BLOCK_K": p.block_k,
         **{k: v for k, v in unit.items() if k in _prefill_delta_kernel.arg_names}}
    rows.append(case(f"new prefill delta BM={p.block_m} BN={p.block_n}", _prefill_delta_kernel, fp16, c, p.num_warps,
                     p.num_stages, p.block_n * p.block_k // 8, arch, "delta only, after cuBLAS; BLOCK_M rows share a tile"))

    report = {"target": f"sm_{arch}", "triton": triton.__version__, "shape": [N, K], "dtype": "float16",
              "old_commit": OLD_COMMIT, "notes": [old_note] if old_note else [],
              "method": "triton.compile(ASTSource) for GPUTarget('cuda', arch, 32); cuobjdump --dump-resource-usage, "
                        "ptxas -v on the PTX, SASS inner loop = largest backward-branch loop",
              "kernels": rows}
    out = Path(args.out or ROOT / "bench" / "results" / f"kernels-compiled-sm{arch}-triton{triton.__version__}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / out.name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
