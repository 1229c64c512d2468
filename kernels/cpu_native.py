"""The CPU delta GEMV straight from the packed bits: a small C kernel, compiled once per machine.

Why C: every pure-torch formulation of x·sign(Δ)ᵀ either materializes the signs (fp32 ±1 is
32× the packed bytes, and at serving shapes the step is bound by reading them: 16 slots of
a 256×256 layer are 4 MiB of fp32 signs against 128 KiB of bits) or runs one small op per
slot and row (gather/embedding_bag LUTs, int8 GEMMs that reorder their weights per call),
each slower than the cached fp32 GEMM it replaces (numbers: cpu.py). Expanding bits in
registers, as the GPU kernels do, is what none of torch's CPU ops offers.

The kernel, for every segment of rows (grouping.py) whose slot t >= 0 (not BASE_SLOT) and every output n:

    y[m, n] += α_t[n] · (2·Σ_k bit[n, k]·x[m, k] − Σ_k x[m, k])       (S·x = 2·B·x − Σx)

With AVX-512 a 16-bit slice of a sign word is directly a lane mask, so Σ bit·x is one masked
add per 16 weights (`_mm512_mask_add_ps`), with up to 4 rows of a segment sharing each mask
load and 4 independent accumulators per row. With AVX2 only (most AMD CPUs before Zen 4) a
byte becomes an 8-lane mask by a broadcast, an AND with the lanes' bits and a compare, built
once per column and 8 weights and shared by the rows (an AND and an add per row). Elsewhere
a plain C loop.
fp32 accumulation throughout; the packed bits are read in place (nothing cached per slot).

Compiled with the system C compiler (`cc`, -O3 -march=native) into a cache directory
($DELTAFLEET_CPU_KERNEL_DIR, else ~/.cache/deltafleet, else the temp dir) keyed by the source,
the flags and the CPU's feature flags, and loaded with ctypes (one call per layer). Without a
compiler, or with DELTAFLEET_CPU_KERNEL=torch, `load()` returns None and cpu.py uses torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .grouping import SlotGroups

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef __AVX512F__
/* A 16-bit slice of a sign word is directly a lane mask: one masked add per 16 weights. */
typedef __m512 vec;
typedef __mmask16 lane_mask;
typedef uint16_t bit_chunk;   /* the sign bits of one vector of weights */
#define LANES 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VADD(a, b) _mm512_add_ps(a, b)
#define MASK_OF(bits) ((lane_mask)(bits))
#define MASKED_ADD(acc, m, x) _mm512_mask_add_ps(acc, m, acc, x)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define MASK_SETUP()
/* Columns per tile for 1, 2 and 4 rows: R * NB accumulators stay in the 32 zmm registers. */
#define NB1 8
#define NB2 8
#define NB4 4
#elif defined(__AVX2__)
/* No mask registers: a byte of a sign word becomes an 8-lane mask by broadcasting it and
   comparing each lane's bit (AND with 1, 2, 4, ... 128, compare equal); built once per
   (column, 8 weights) and shared by the R rows, each of which adds x AND mask. */
typedef __m256 vec;
typedef __m256 lane_mask;
typedef uint8_t bit_chunk;
#define LANES 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VADD(a, b) _mm256_add_ps(a, b)
#define MASK_SETUP() const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)
#define MASK_OF(bits) _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), sel), sel))
#define MASKED_ADD(acc, m, x) _mm256_add_ps(acc, _mm256_and_ps(m, x))
#define HSUM(v) hsum256(v)
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 16 ymm registers: R * NB accumulators, R x vectors, the selector and a mask. */
#define NB1 8
#define NB2 4
#define NB4 2
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
/* acc[r][j] = sum_k bit(n0 + j, k) * x[r][k] for r < nr <= R, j < nn <= NB: each x load feeds NB
   outputs and each mask R rows; R * NB accumulators stay in registers. The bits of weights
   LANES*c .. LANES*c + LANES-1 of a row are chunk c of its words (bit j of word w = column 32w + j). */
#define BIT_TILE(NAME, R, NB)                                                                          \
static void NAME(const float *const *xr, int nr, const int32_t *words, int64_t sn, int nn,          \
                 int64_t k, float out[R][NB]) {                                                      \
    MASK_SETUP();                                                                                    \
    vec acc[R][NB];                                                                                  \
    const bit_chunk *h[NB];                                                                          \
    for (int j = 0; j < NB; j++) h[j] = (const bit_chunk *)(words + (j < nn ? j : 0) * sn);         \
    for (int r = 0; r < R; r++)                                                                      \
        for (int j = 0; j < NB; j++) acc[r][j] = VZERO();                                            \
    for (int64_t c = 0; c < k / LANES; c++) {                                                        \
        vec xv[R];                                                                                   \
        for (int r = 0; r < R; r++) xv[r] = VLOAD(xr[r < nr ? r : 0] + LANES * c);                  \
        for (int j = 0; j < NB; j++) {                                                               \
            lane_mask m = MASK_OF(h[j][c]);                                                          \
            for (int r = 0; r < R; r++) acc[r][j] = MASKED_ADD(acc[r][j], m, xv[r]);               \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++)                                                                      \
        for (int j = 0; j < NB; j++) out[r][j] = HSUM(acc[r][j]);                                   \
}
BIT_TILE(tile_r1, 1, NB1)
BIT_TILE(tile_r2, 2, NB2)
BIT_TILE(tile_r4, 4, NB4)

static float row_sum(const float *x, int64_t k) {
    vec a = VZERO();
    for (int64_t i = 0; i < k; i += LANES) a = VADD(a, VLOAD(x + i));
    return HSUM(a);
}
#else
static float row_sum(const float *x, int64_t k) {
    float s = 0.0f;
    for (int64_t i = 0; i < k; i++) s += x[i];
    return s;
}

static float bit_dot(const float *x, const int32_t *words, int64_t k) {
    float acc[32];
    memset(acc, 0, sizeof acc);
    for (int64_t w = 0; w < k / 32; w++) {
        uint32_t bits = (uint32_t)words[w];
        const float *p = x + 32 * w;
        for (int j = 0; j < 32; j++) acc[j] += ((bits >> j) & 1u) ? p[j] : 0.0f;
    }
    float s = 0.0f;
    for (int j = 0; j < 32; j++) s += acc[j];
    return s;
}
#endif

/* y[m, :] += alpha_t * (x[m] . sign(D_t)^T) for every row m of every segment with slot t >= 0
   (a segment of slot -1, BASE_SLOT in Python, is the base alone: skipped).
   x [M, K] fp32 (row stride ldx), y [M, N] fp32 (row stride ldy), signs int32 words with
   strides (st, sn) and unit stride along K/32, scales with strides (sct, scn) (scn = 0: one per matrix),
   order [M] / seg_start [S + 1] / seg_slot [S] int32 as grouping.py builds them. K % 32 == 0. */
void deltafleet_delta_accumulate(const float *x, int64_t ldx, int64_t k, int64_t n,
                                 const int32_t *signs, int64_t st, int64_t sn,
                                 const float *scales, int64_t sct, int64_t scn,
                                 const int32_t *order, const int32_t *seg_start, const int32_t *seg_slot,
                                 int64_t nseg, float *y, int64_t ldy) {
    for (int64_t s = 0; s < nseg; s++) {
        int32_t t = seg_slot[s];
        if (t < 0) continue;  /* BASE_SLOT */
        const int32_t *sw = signs + t * st;  /* the slot's sign words */
        const float *alpha = scales + t * sct;
        int32_t a = seg_start[s], e = seg_start[s + 1];
        while (a < e) {
            int left = e - a;
            int R = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            const float *xr[4];
            float *yr[4], sum[4];
            for (int r = 0; r < R; r++) {
                int32_t row = order[a + r];
                xr[r] = x + (int64_t)row * ldx;
                yr[r] = y + (int64_t)row * ldy;
                sum[r] = row_sum(xr[r], k);
            }
#if defined(__AVX512F__) || defined(__AVX2__)
            int NB = R == 4 ? NB4 : R == 2 ? NB2 : NB1;
            for (int64_t j = 0; j < n; j += NB) {
                int nn = n - j < NB ? (int)(n - j) : NB;
                float out[32];  /* [R][NB], row-major */
                if (R == 4) tile_r4(xr, R, sw + j * sn, sn, nn, k, (float (*)[NB4])out);
                else if (R == 2) tile_r2(xr, R, sw + j * sn, sn, nn, k, (float (*)[NB2])out);
                else tile_r1(xr, R, sw + j * sn, sn, nn, k, (float (*)[NB1])out);
                for (int r = 0; r < R; r++)
                    for (int q = 0; q < nn; q++) yr[r][j + q] += alpha[(j + q) * scn] * (2.0f * out[r * NB + q] - sum[r]);
            }
#else
            for (int64_t j = 0; j < n; j++)
                for (int r = 0; r < R; r++)
                    yr[r][j] += alpha[j * scn] * (2.0f * bit_dot(xr[r], sw + j * sn, k) - sum[r]);
#endif
            a += R;
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpuinfo_line(*prefixes: str) -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(prefixes)), "")
    except OSError:
        return ""


def _cpu_key() -> str:
    return platform.machine() + _cpuinfo_line("flags", "Features")


def cpu_description() -> str:
    """The CPU's model and the vector ISA the kernel uses on it, e.g. "AMD EPYC (avx2)": CPU
    figures differ several-fold between an AVX-512 and an AVX2 machine, so benches record it."""
    model = _cpuinfo_line("model name").partition(":")[2].strip() or platform.processor() or platform.machine()
    flags = set(_cpuinfo_line("flags").partition(":")[2].split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{model} ({isa})"


def _cache_dirs() -> list[Path]:
    env = os.environ.get("DELTAFLEET_CPU_KERNEL_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [Path.home() / ".cache" / "deltafleet" / "cpu-kernels", Path(tempfile.gettempdir()) / "deltafleet-cpu-kernels"]


def _compile(cc: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    errors = []
    for d in _cache_dirs():
        lib = d / f"delta_bits_{key}.so"
        if lib.exists():
            return lib
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src = Path(tmp) / "delta_bits.c"
                src.write_text(SOURCE)
                out = Path(tmp) / lib.name
                subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, text=True, timeout=120)
                os.replace(out, lib)  # atomic: a concurrent compile of the same key writes the same file
            return lib
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{d}: {getattr(e, 'stderr', '') or e}")
    raise RuntimeError("; ".join(errors))


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, not little-endian, or DELTAFLEET_CPU_KERNEL=torch)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("DELTAFLEET_CPU_KERNEL", "native") == "torch" or sys.byteorder != "little":
                return None
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if cc is None:
                warnings.warn("deltafleet: no C compiler found; the CPU delta path falls back to torch ops (slower)", stacklevel=3)
                return None
            lib = ctypes.CDLL(str(_compile(cc)))
            f = lib.deltafleet_delta_accumulate
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int64]
            _lib = lib
        except Exception as e:  # a broken toolchain must not take serving down: torch ops still work
            warnings.warn(f"deltafleet: the native CPU delta kernel is unavailable ({e}); using torch ops", stacklevel=3)
        finally:
            _tried = True
        return _lib


def check_arguments(y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, groups: SlotGroups) -> None:
    """Everything the C code indexes with, checked first: it has no bounds checks of its own, so a
    wrong shape or grouping would read or write outside the tensors instead of raising. Shapes
    are checked per call (attribute reads); the groups once per step (`SlotGroups.problem`)."""
    m, k = x.shape
    n = y.shape[1]
    if not (x.dtype == y.dtype == scales.dtype == torch.float32 and signs.dtype == torch.int32):
        raise ValueError(f"cpu bit kernel: x, y and scales must be float32 and signs int32, got {x.dtype}, {y.dtype}, {scales.dtype}, {signs.dtype}")
    if not (x.device.type == y.device.type == signs.device.type == scales.device.type == "cpu"):
        raise ValueError("cpu bit kernel: every tensor must be on the CPU")
    if x.stride(1) != 1 or y.stride(1) != 1 or signs.stride(2) != 1 or y.shape[0] != m:
        raise ValueError("cpu bit kernel: x [M, K] and y [M, N] need unit inner strides and the same M; signs a unit stride along K/32")
    if k % 32 or signs.dim() != 3 or tuple(signs.shape[1:]) != (n, k // 32) or scales.shape[0] != signs.shape[0]:
        raise ValueError(f"cpu bit kernel: signs {tuple(signs.shape)} / scales {tuple(scales.shape)} do not fit x [{m}, {k}] -> y [{m}, {n}]")
    if scales.dim() == 2 and scales.shape[1] != n:
        raise ValueError(f"cpu bit kernel: per-row scales {tuple(scales.shape)} do not have N = {n} columns")
    for t in (groups.order, groups.seg_start, groups.seg_slot):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("cpu bit kernel: the groups' order, seg_start and seg_slot must be contiguous int32 CPU tensors")
    if groups.num_rows != m:
        raise ValueError(f"cpu bit kernel: groups for {groups.num_rows} rows, x has {m}")
    if groups.problem is not None:
        raise ValueError(f"cpu bit kernel: {groups.problem}")
    if groups.slots and max(groups.slots) >= signs.shape[0]:
        raise ValueError(f"cpu bit kernel: a segment's slot {max(groups.slots)} is outside the stack of {signs.shape[0]}")


def delta_accumulate(lib: ctypes.CDLL, y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor,
                     groups: SlotGroups) -> None:
    """y [M, N] fp32 += α_t·(x·sign(Δ_t)ᵀ) per row, in place. x [M, K] fp32; both with unit inner stride;
    signs [T, N, K/32] int32 with unit stride along K/32; groups: grouping.py's segments of x's rows."""
    m, k = x.shape
    n = y.shape[1]
    check_arguments(y, x, signs, scales, groups)
    order, seg_start, seg_slot = groups.order, groups.seg_start, groups.seg_slot
    sct, scn = (scales.stride(0), scales.stride(1)) if scales.dim() == 2 else (scales.stride(0), 0)
    lib.deltafleet_delta_accumulate(
        x.data_ptr(), x.stride(0), k, n,
        signs.data_ptr(), signs.stride(0), signs.stride(1),
        scales.data_ptr(), sct, scn,
        order.data_ptr(), seg_start.data_ptr(), seg_slot.data_ptr(), seg_slot.numel(),
        y.data_ptr(), y.stride(0),
    )
