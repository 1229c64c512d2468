"""Old vs new Triton kernels, compiled ahead of time for a GPU target (no GPU needed).

Triton compiles for a target it does not have; ptxas and cuobjdump (shipped with Triton)
then report what the hardware would run: registers, spills (ptxas -v), shared memory
(static + Triton's dynamic), and the SASS of the inner K loop — its instruction count, its
global loads by width, and instructions per sign byte (loop instructions × 32 threads ×
warps / sign bytes consumed per iteration).

"Old" is the code at commit OLD_COMMIT (autotuned tl.dot kernels, read from git), "new" is
the working tree (triton_decode.py, triton_delta.py) at launch_table.DEFAULT's configs.
Shapes: N = K = 4096, fp16, strides of contiguous tensors (as Triton specializes them).
Also the paged attention kernel (decode, a prefill chunk) and the grouped lm_head GEMM at their
wrappers' launch configs, shapes in their rows; they read no signs (instructions per sign byte: None).

    python bench/compiled_kernels.py [--arch 90] [--out bench/results/kernels-compiled-sm90-triton<version>.json]
    python bench/compiled_kernels.py --compare [A.json B.json]   # side by side (default: Triton 3.6.0 vs 3.9.0)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
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


def specialize(fn, pointers: dict[str, str], values: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """Triton's specialization of a launch with these argument values, as its launcher makes it:
    an int equal to 1 becomes a constexpr, an int that is a multiple of 16 (0 included) is marked
    divisible by 16, an int past i32 is i64, a float is fp32; pointers (torch allocations) are
    16-byte aligned. Returns (signature, attrs, constexprs with the 1s folded in)."""
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            sig[name] = "fp32"
        elif values[name] == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if -2**31 <= values[name] < 2**31 else "i64"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def compile_kernel(fn, pointers, constexprs, num_warps, num_stages, arch, values=None):
    """values: every runtime argument's value (specialized as a launch would); None: signature()'s shapes."""
    if values is None:
        sig, attrs = signature(fn, pointers, constexprs)
    else:
        sig, attrs, constexprs = specialize(fn, pointers, values, constexprs)
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


def backward(text: str, address: int) -> bool:
    """Whether the SASS instruction at address is a branch back (a loop's closing branch)."""
    m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1]) if "BRA" in text else None
    return bool(m) and int(m.group(1), 16) < address


def inner_loop(sass: str, innermost: bool = False) -> dict:
    """The largest backward-branch loop of the SASS (the K loop with sign loads): counts.
    innermost: the largest loop with no loop inside it (a K loop nested in a loop over row tiles)."""
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
                if len(body) > len(best) and not (innermost and any(backward(t, b) for b, t in body[:-1])):
                    best = body
    ops = Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for _, t in best)
    live = Counter(t.split()[0] for _, t in best if not t.startswith("@!PT"))  # @!PT: never executed (padding)
    loads = {op: c for op, c in ops.items() if op.startswith("LDG")}
    return {"instructions": len(best), "global_loads": loads,
            "top_ops": dict(ops.most_common(10)), "shared_ops": sum(c for op, c in ops.items() if op.startswith(("LDS", "STS"))),
            # A layout conversion through shared memory is a store then a load back in the loop:
            # STS/STSM (LDGSTS, the async global->shared copy of the pipeline, is not one), and LDS
            # (LDSM, ldmatrix of the tensor-core operands, is the pipeline's read, not a round trip).
            "shared_stores": sum(c for op, c in live.items() if op.startswith("STS")),
            "shared_loads_not_ldsm": sum(c for op, c in live.items() if op.startswith("LDS") and not op.startswith("LDSM")),
            "barriers": sum(c for op, c in ops.items() if op.startswith("BAR"))}


def case(label, fn, pointers, constexprs, num_warps, num_stages, sign_bytes_per_iter, arch, note, values=None,
         innermost=False):
    """One kernel compiled for sm_<arch>: its report row. sign_bytes_per_iter None: a kernel that reads
    no signs (attention, a dense GEMM), no instructions per sign byte. values, innermost:
    compile_kernel's, inner_loop's."""
    kernel = compile_kernel(fn, pointers, constexprs, num_warps, num_stages, arch, values)
    res = resources(kernel, arch)
    loop = inner_loop(res.pop("sass"), innermost)
    per_byte = None if sign_bytes_per_iter is None else round(loop["instructions"] * 32 * num_warps / sign_bytes_per_iter, 2)
    row = {"kernel": label, "config": {**{k: v for k, v in constexprs.items() if k.isupper()}, "num_warps": num_warps,
                                        "num_stages": num_stages},
           **res, "inner_loop": loop, "sign_bytes_per_iteration": sign_bytes_per_iter,
           "instructions_per_sign_byte": per_byte, "note": note}
    per_byte_text = "     -" if per_byte is None else f"{per_byte:6.2f}"
    print(f"{label:34s} regs {res['registers']:3d}  spill st/ld {res['spill_store_bytes']}/{res['spill_load_bytes']}  "
          f"smem {res['shared_bytes']:6d}  loop {loop['instructions']:4d} instr  {per_byte_text} instr/sign byte  "
          f"shared ld/st {loop['shared_ops']}  barriers {loop['barriers']}  loads {loop['global_loads']}", flush=True)
    return row


FP16 = {"y_ptr": "*fp16", "x_ptr": "*fp16", "w_ptr": "*fp16", "scale_ptr": "*fp32"}
UNIT = {"stride_xk": 1, "stride_wk": 1, "stride_sw": 1, "stride_yn": 1, "stride_an": 0}


def decode_case(cfg, arch: int) -> dict:
    """The decode kernel at one launch-table config (ROWS rows, one tenant each), compiled for sm_<arch>."""
    from deltafleet.kernels.triton_decode import _decode_kernel

    c = {"SCALE_PER_ROW": False, "ROWS": cfg.rows, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": 1,
         "EVEN_K": True, "INTERPRETED": False, **UNIT}
    return case(f"new decode ROWS={cfg.rows} BN={cfg.block_n}", _decode_kernel, FP16, c, cfg.num_warps,
                cfg.num_stages, cfg.rows * cfg.block_n * cfg.block_k // 8, arch,
                "base on tensor cores + delta in packed 16-bit pairs, one loop; sign bytes of ROWS rows "
                "per iteration (each row its own tenant: all unique); split_k=1")


def contiguous(*shape: int) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this shape (a size-1 dim's too, as torch gives them)."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def paged_attention_case(b: int, nq: int, context: int, arch: int) -> dict:
    """paged_attention_triton's kernel as its wrapper launches it: fp16, 32 query heads on 8 KV
    heads (GQA), head_dim 128, b sequences of nq queries over `context` positions (kv_index [b, context]),
    contiguous q/o [b, nq, 32, 128], pools [P, 8, 128], kv_index and q_pos int64."""
    from deltafleet.kernels.paged_attention import LOG2E, _paged_attention_kernel

    h, kvh, d = 32, 8, 128
    g = h // kvh
    values = {"Q": nq, "L": context, "qk_scale": LOG2E / math.sqrt(d), "window": 0,
              **dict(zip(("s_ob", "s_oq", "s_oh", "s_od"), contiguous(b, nq, h, d))),
              **dict(zip(("s_qb", "s_qq", "s_qh", "s_qd"), contiguous(b, nq, h, d))),
              **dict(zip(("s_kp", "s_kh", "s_kd"), contiguous(1, kvh, d))),  # the cache's row count is no stride
              **dict(zip(("s_vp", "s_vh", "s_vd"), contiguous(1, kvh, d))),
              **dict(zip(("s_ib", "s_il"), contiguous(b, context))), **dict(zip(("s_pb", "s_pq"), contiguous(b, nq)))}
    c = {"G": g, "D": d, "HAS_WINDOW": False, "FP32": False,
         "BLOCK_M": 16 if nq * g <= 16 else 64, "BLOCK_N": 64}  # paged_attention_triton's defaults
    pointers = {"o_ptr": "*fp16", "q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "kv_index_ptr": "*i64",
                "q_pos_ptr": "*i64"}
    return case(f"paged attention Q={nq} L={context}", _paged_attention_kernel, pointers, c, 4, 2, None, arch,
                f"q [{b}, {nq}, {h}, {d}] on KV heads {kvh}, kv_index [{b}, {context}]; loop = one BLOCK_N tile of "
                "context positions (K and V read in place through kv_index); no signs read", values)


def grouped_case(arch: int) -> dict:
    """grouped_mm_triton's kernel as its wrapper launches it for a decode step's whole lm_heads:
    x [16, 4096] fp16 sorted by tenant, weight [16, 32000, 4096], offs [16] int32."""
    from deltafleet.kernels.triton_grouped import _grouped_kernel, rows_per_tile

    m, k, e, n = 16, 4096, 16, 32000
    values = {"N": n, "K": k, "E": e, **dict(zip(("stride_ym", "stride_yn"), contiguous(m, n))),
              **dict(zip(("stride_xm", "stride_xk"), contiguous(m, k))),
              **dict(zip(("stride_we", "stride_wn", "stride_wk"), contiguous(e, n, k)))}
    c = {"BLOCK_M": rows_per_tile(m), "BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_E": max(16, triton.next_power_of_2(e)),
         "DOT_FP32": False, "IEEE": False}  # grouped_mm_triton's defaults on a GPU
    pointers = {"y_ptr": "*fp16", "x_ptr": "*fp16", "w_ptr": "*fp16", "offs_ptr": "*i32"}
    return case(f"grouped lm_head M={m} N={n} E={e}", _grouped_kernel, pointers, c, 4, 3, None, arch,
                f"x [{m}, {k}] · W[g]ᵀ, weight [{e}, {n}, {k}]; loop = the K loop (innermost, inside the loop over "
                "a group's row tiles); no signs read", values, innermost=True)


COMPARED = [("registers", "registers"), ("spill st/ld B", ("spill_store_bytes", "spill_load_bytes")),
            ("shared B", "shared_bytes"), ("loop instr/warp-step", ("inner_loop", "instructions")),
            ("instr/sign byte", "instructions_per_sign_byte"), ("loop shared ld/st", ("inner_loop", "shared_ops")),
            ("loop barriers", ("inner_loop", "barriers"))]


def figure(row: dict, key) -> str:
    if isinstance(key, str):
        return "-" if row.get(key) is None else str(row[key])  # None: a figure that does not apply (signs per byte)
    if key[0] == "inner_loop":
        return str(row["inner_loop"].get(key[1]))
    return "/".join(str(row.get(k)) for k in key)


def compare(a: Path, b: Path) -> str:
    """A markdown table of two reports (e.g. Triton 3.6 vs 3.9), kernel by kernel, figure by figure: `A → B`."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    by_b = {r["kernel"]: r for r in rb["kernels"]}
    head = f"{ra['target']}, N = K = {ra['shape'][0]}, {ra['dtype']}: Triton {ra['triton']} → {rb['triton']}"
    lines = [head, "", "| kernel | " + " | ".join(name for name, _ in COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for row in ra["kernels"]:
        other = by_b.get(row["kernel"])
        cells = [figure(row, k) + (f" → {figure(other, k)}" if other else " → (absent)") for _, k in COMPARED]
        lines.append(f"| {row['kernel']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs="*", metavar="JSON", default=None,
                    help="print two reports side by side, no compiling (default: the committed sm90 Triton 3.6.0 and 3.9.0)")
    args = ap.parse_args(argv)
    if args.compare is not None:
        files = [Path(f) for f in args.compare] or [ROOT / "bench" / "results" / f"kernels-compiled-sm90-triton{v}.json"
                                                    for v in ("3.6.0", "3.9.0")]
        if len(files) != 2:
            ap.error("--compare takes two reports (or none: the committed Triton 3.6.0 and 3.9.0 ones)")
        print(compare(*files))
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch = args.arch
    fp16, unit = FP16, UNIT
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
    from deltafleet.kernels.triton_delta import _prefill_delta_kernel

    for b in (1, 2, 4, 8, 16):
        rows.append(decode_case(DEFAULT.decode[b], arch))
    p = DEFAULT.prefill
    c = {"SCALE_PER_ROW": False, "BLOCK_M": p.block_m, "BLOCK_N": p.block_n, "BLOCK_K": p.block_k,
         **{k: v for k, v in unit.items() if k in _prefill_delta_kernel.arg_names}}
    rows.append(case(f"new prefill delta BM={p.block_m} BN={p.block_n}", _prefill_delta_kernel, fp16, c, p.num_warps,
                     p.num_stages, p.block_n * p.block_k // 8, arch, "delta only, after cuBLAS; BLOCK_M rows share a tile"))
    rows.append(paged_attention_case(64, 1, 2048, arch))  # decode: 64 sequences, one query each
    rows.append(paged_attention_case(1, 512, 1024, arch))  # a prefill chunk: 512 queries after 512 positions
    rows.append(grouped_case(arch))

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
