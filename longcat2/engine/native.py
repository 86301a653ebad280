"""Optional compiled CPU kernels: C built on first use with the system's C compiler, called through ctypes.

Design choices:
- Only what PyTorch ops cannot do at the machine's speed goes here: the parts of LSA that are not GEMMs,
  and its small products, where an op per pass over memory costs more than the arithmetic (on the
  embedded model's 29K-token prefill, 4 heads and a 4 x 16 indexer, they took three quarters of it);
  large products that the BLAS runs slowly on AMD CPUs; and a decode step's products of a few rows,
  which are bound by reading their weights or cached keys:
  - `select_topk`: the kd largest indexer scores of each row, ties at the kd-th value to the larger
    positions (`kernels.select_dynamic`'s rule). `torch.topk` keeps a heap (O(n log k)) and the result is
    sorted again. Here: a threshold guessed from every 16th score (about 1.5 kd keys reach it), one pass
    that keeps those keys (16 at a time; a block with none costs a compare), and a radix select on the
    kept scores' order-preserving integer keys (four interleaved 2,048-bin histograms, a branch-free
    compaction to the boundary bin, two small refining passes), picks written in ascending column order.
    Exact: when fewer than kd keys reach the guess, the whole row goes through the radix select. 7x
    `torch.topk` + sort on this model's indexer scores (512 rows x 20K keys: 22 vs 165 ms).
  - `index_scores`: Σ_h w_h ReLU(q_h · k) per row and key. As a GEMM the inner dimension is the head
    dimension (16), and the ReLU, weight and head-sum passes over a [rows·h, keys] tile cost more than the
    product; here keys are transposed 256 at a time and each query vector meets 128 keys per register
    tile, the ReLU and weighting done in registers. For head dims <= 32 any number of rows; wider heads
    (LongCat-2.0's 64 x 128) only for a decode step's few rows, with the heads in the vector lanes (a
    register tile of 8 keys x 32 heads or 4 x 64, the row's queries transposed in L1): 1.5x oneDNN's
    [keys x 128] x [128 x 32] GEMM on cold keys. For prefill rows the GEMM is the faster product.
  - `pv_rows`: the fp32 P·V of large gathered rows ([64 heads x ~1-2K keys] x [keys x 512] at
    LongCat-2.0 dims). MKL runs its AVX2 kernels on AMD CPUs (~90 GFLOP/s here) and oneDNN needs the
    values transposed (a copy per row costs what it saves). Blocked over 256 keys, register tiles of 4
    heads x 64 columns: 140-190 GFLOP/s, 1.5-1.7x `torch.mm` per row.
  - `slot_attend`: each row's absorbed attention over its own gathered keys, read in place from the pool
    (no gathered copy: the copy and two more passes over it were memory-bound), a few keys prefetched
    ahead, softmax with a polynomial exp2 in registers, P·V in register tiles. It returns the
    unnormalised block (o, max, sum) so the windowed path merges it with the shared window's block. Only
    for rows below `kernels.PER_ROW_MIN_MACS`.
  - `slot_attention`: large fp32 rows (64 heads x 2,048 picks at LongCat-2.0 dims) the same way, in
    register tiles and one block of 64 keys at a time: a row's queries transposed to [D, h] so a score tile
    is 4 keys x 64 heads (4 broadcasts, 4 loads, 16 FMAs per element), the block's scores kept key-major,
    an online softmax by exp2 over vectors of 16 heads, then P·V while the block's keys are in cache, one
    64-column strip of them (in L1) serving every 4-head tile. Each key comes from memory once. The
    first version (1.3x the gather + oneDNN scores + `pv_rows` path) scored the whole row, then re-read
    its keys from L3 for P·V at ~110 GFLOP/s; this one is 1.3-1.4x that (8 rows of 2,048 random picks).
  - `linear` / `absorb` / `unabsorb`: products of a few rows (decode: a batch of 1-8 tokens) with a weight,
    read once and in place:
    register tiles of 1-2 rows x 8 weight rows with lane sums at the end ("NT", W [N, K]), or 1-4 rows x
    64-128 columns with the rows' values broadcast ("KN", W [K, N]), fp32 accumulation, bf16 results
    rounded to nearest even. MLA's absorbed form reads W_uk and W_uv straight out of `kv_b_proj`'s weight
    (no per-head copies). At LongCat-2.0's q_b_proj (1536 x 12288) 1.1-1.5x oneDNN (fp32, 1-8 rows) and
    1.3-1.5x (bf16, 1-2 rows; oneDNN's AVX512-BF16 dot products win from 4 rows).
  - `run_attend_pool`: a decode step's absorbed attention over each sequence's cached runs
    (`kernels.run_attention_segments`), every sequence in one call, split over the threads, each key read
    from memory once: tiles of 32 keys, scores in register tiles of 4 rows x 4 keys, an online softmax in
    log2 units, then P·V while the tile is in L1 (the next tile prefetched meanwhile). It replaced two C
    products of these tiles per sequence and sublayer (`rows_by_keys`, which read every key twice around a
    torch softmax with ~10 torch calls; a oneDNN bf16 GEMM builds a new primitive for every new key
    count, ~0.5 ms, and a decode step's key count is new every step). Against the two products, 600 keys, warm cache: bf16
    1.4-1.5x at 4-64 rows, fp32 1.2x at 4-8 rows and 0.95-1.0x at 16-64 (a cold cache favours reading each
    key once); the vs-vLLM model's bf16 decode step at batch 8: 7.8 → 5.8 ms (BENCHMARKS.md).
  - `experts`: a MoE's routed experts for the few rows each gets in a decode step (`cpu.CpuExperts`): every
    expert's gate and up products, the silu gating and the down product in one call, on the NT tiles
    above (bf16 intermediates rounded where the module rounds them). On CPU `torch._grouped_mm` costs
    ~100 µs per call at such sizes, three per MoE: 2-8x on the vs-vLLM model's experts.
  - `softmax_tile` / `scale_add` / `softmax_window`: the softmax between a prefill tile's two GEMMs
    (`kernels.dense_prefill_onednn`'s online step; `kernels.window_attention`'s shared window + dynamic
    picks) as one pass per row over the scores in place, in their own dtype: row max, 2^(s - m) written
    back (bf16 rounded to nearest even), row sum; the causal limit / sink + band / empty picks are index
    ranges, not mask tensors. As PyTorch ops these were seven passes and two fp32 copies; in bf16 they
    cost about as much as the GEMMs. 512 x 512 bf16 tile: 92 vs ~300 µs.
- Every kernel here has a pure-PyTorch twin in `kernels`, which is the reference its tests compare
  against, and the path on every other device, dtype or machine without a compiler. By default the
  kernels are used only on x86 CPUs with AVX-512 (`tuned_for_this_cpu`): their register tiles are sized
  for 32 512-bit registers, and built for AVX2 they spill and run slower than the PyTorch ops.
  `LONGCAT2_NATIVE=1` uses them on any CPU (the source builds for every x86 level and is tested there),
  `LONGCAT2_NATIVE=0` never.
- No torch headers and no build step at install: one C file compiled in about a second with
  `-O3 -march=native` into a cache directory (`$LONGCAT2_CACHE_DIR`, else `~/.cache/longcat2`; a temp
  directory where that is not writable) under a name that hashes the source, the flags, the compiler and
  the CPU's flags (a cache shared by different CPUs never loads a library built for another). The build writes to a temporary name and renames, so
  concurrent processes never load a half-written library. A failed build is reported once (a warning)
  and the PyTorch path is used.
- ctypes releases the GIL during a call, so every kernel splits its rows over `torch.get_num_threads()`
  Python threads (at least 16 rows each; one large P·V row each).
- Vector code is written with GCC/Clang vector extensions (no intrinsics), so the same source builds
  for AVX-512, AVX2 or NEON under -march=native (each x86 level's build is tested); with AVX-512 an
  empty asm statement keeps a tile's operands in registers where GCC would fold their loads into every
  FMA (`KEEP1` / `KEEP4`). One exception, behind
  `__AVX512BF16__`: softmax numerators are rounded to bf16 by the CPU's conversion instruction (1 instead
  of ~10 vector ops; 74 → 48 µs per 256K values), elsewhere by the portable `put16`. bf16 values are
  widened by a two-source shuffle with zeros (`bload`): GCC 12 compiles `__builtin_convertvector` to 32-bit
  lanes as five instructions where one does (1.15-1.45x on the bf16 products that widen keys or weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16-lane vectors (GCC/Clang vector extensions); unaligned loads and stores through memcpy. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint64_t v8u64 __attribute__((vector_size(64)));

static inline v16 vload(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* Element i of an fp32 row, or of a bf16 row (bit pattern widened). */
static inline float elem_load(const void *base, int bf16, int64_t i) {
    if (!bf16) return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__)
/* Keep vectors in registers: otherwise GCC folds their loads into every FMA that uses them (the slot
   scores' tile: 20 loads per 16 FMAs instead of 8). Only where a 16-float vector fits one register: on
   AVX2 it is two, and the constraint cannot be met (the build failed there, leaving only the PyTorch
   path). */
#define KEEP1(a) __asm__("" : "+v"(a))
#define KEEP4(a, b, c, d) __asm__("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d))
#else
#define KEEP1(a) ((void)0)
#define KEEP4(a, b, c, d) ((void)0)
#endif

/* Order-preserving unsigned key of a float (-0.0 is +0.0, as torch's == treats them). */
static inline uint32_t fkey(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Rows [t0, t1) of scores (row stride ld): in row t the candidates are columns 0 .. n-1 with
   n = min(width, limit[t] + 1) (n = width without limit). Writes the kd columns of the kd largest
   scores, ties at the kd-th value going to the larger columns, ascending, to out[t * kd ...].
   keys (uint32) and cand (int32): scratch of `width` entries. Returns -1, or the first row it cannot
   serve (fewer than kd candidates, or the kd-th largest is -inf): the caller takes the reference path. */
/* The kd largest of m keys (cand: their columns, ascending), ties at the kd-th key to the larger
   columns, written to o in ascending column order. keys and cand are reordered (compacted in place).
   Radix select: four interleaved 2,048-bin histograms of the top 11 bits (runs of equal bins do not
   serialise), a branch-free compaction to the keys at or above the boundary bin, two small passes that
   refine the exact kd-th key. Returns 0, or -1 when the kd-th largest is -inf (m >= kd is the caller's). */
static int radix_select(uint32_t *keys, int32_t *cand, int64_t m, int64_t kd, int64_t *o) {
    uint32_t hist4[4][2048];
    uint32_t *hist = hist4[0];
    memset(hist4, 0, sizeof hist4);
    int64_t j = 0;
    for (; j + 4 <= m; j += 4)
        for (int u = 0; u < 4; u++) hist4[u][keys[j + u] >> 21]++;
    for (; j < m; j++) hist4[0][keys[j] >> 21]++;
    for (int b = 0; b < 2048; b++) hist[b] += hist4[1][b] + hist4[2][b] + hist4[3][b];
    int64_t want = kd; /* how many still to take, counting down from the largest */
    uint32_t b = 2047;
    for (;; b--) {
        if (hist[b] >= want) break;
        want -= hist[b];
    }
    const uint32_t lo = b << 21;
    int64_t kept = 0;
    for (j = 0; j < m; j++) { /* branch-free: always write, advance when kept */
        uint32_t k = keys[j];
        int32_t col = cand[j];
        cand[kept] = col;
        keys[kept] = k;
        kept += k >= lo;
    }
    m = kept;
    uint32_t prefix = lo, pmask = 0xFFE00000u;
    const int shifts[2] = {10, 0}, widths[2] = {11, 10};
    for (int d = 0; d < 2; d++) { /* refine the kd-th key: bits 20..10, then 9..0 */
        const uint32_t nb = 1u << widths[d], shift = (uint32_t)shifts[d];
        memset(hist, 0, nb * sizeof(uint32_t));
        for (int64_t i = 0; i < m; i++) {
            uint32_t k = keys[i];
            if ((k & pmask) == prefix) hist[(k >> shift) & (nb - 1)]++;
        }
        for (b = nb - 1;; b--) {
            if (hist[b] >= want) break;
            want -= hist[b];
        }
        prefix |= b << shift;
        pmask |= (nb - 1) << shift;
    }
    const uint32_t kth = prefix; /* the kd-th largest key; `want` of the keys equal to it are taken */
    if (kth == 0x007FFFFFu) return -1; /* fkey(-inf) */
    int64_t equal = 0;
    for (int64_t i = 0; i < m; i++) equal += keys[i] == kth;
    int64_t skip = equal - want; /* ties: the smallest columns among the equal ones are dropped */
    int64_t w = 0;
    for (int64_t i = 0; i < m; i++) {
        uint32_t k = keys[i];
        if (k > kth) {
            o[w++] = cand[i];
        } else if (k == kth) {
            if (skip > 0) skip--;
            else o[w++] = cand[i];
        }
    }
    return 0;
}

/* Rows [t0, t1) of scores (row stride ld): in row t the candidates are columns 0 .. n-1 with
   n = min(width, limit[t] + 1) (n = width without limit). Writes the kd columns of the kd largest
   scores, ties at the kd-th value going to the larger columns, ascending, to out[t * kd ...].
   keys (uint32) and cand (int32): scratch of `width` entries. Long rows first guess a threshold: the
   (3/2 kd/16 + 4)-th largest of every 16th score, so that about 1.5 kd keys reach it. One branch-free
   pass keeps the keys at or above it; if at least kd do, the kd largest are among them (exact, ties
   included) and only those go through the radix select; else the whole row does. Returns -1, or the
   first row it cannot serve (fewer than kd candidates, or the kd-th largest is -inf): the caller takes
   the reference path. */
int64_t lc2_select_topk(const float *scores, int64_t t0, int64_t t1, int64_t width, int64_t ld,
                        const int64_t *limit, int64_t kd, int64_t *out, uint32_t *keys, int32_t *cand) {
    for (int64_t t = t0; t < t1; t++) {
        const float *row = scores + t * ld;
        int64_t n = width;
        if (limit && limit[t] + 1 < n) n = limit[t] + 1;
        if (n < kd || kd <= 0) return t;
        int64_t m = 0;
        const int64_t rank = kd * 3 / 32 + 4;
        if (n >= 64 * rank) {
            int64_t ns = 0;
            for (int64_t j = 0; j < n; j += 16) {
                keys[ns] = fkey(row[j]);
                cand[ns] = (int32_t)ns;
                ns++;
            }
            int64_t sample_out[64 * 16];
            uint32_t tau = 0;
            if (rank <= 64 * 16 && radix_select(keys, cand, ns, rank, sample_out) == 0) {
                tau = 0xFFFFFFFFu; /* the smallest of the sample's `rank` largest */
                for (int64_t i = 0; i < rank; i++) {
                    uint32_t k = fkey(row[sample_out[i] * 16]);
                    tau = k < tau ? k : tau;
                }
            }
            if (tau) {
                int64_t j = 0;
                for (; j + 16 <= n; j += 16) { /* 16 keys at a time; most blocks hold none >= tau */
                    vu16 u = (vu16)vload(row + j);
                    u &= ~(vu16)(u == 0x80000000u);                      /* -0.0 is +0.0 */
                    vu16 k = u ^ ((vu16)((vi16)u >> 31) | 0x80000000u); /* fkey, 16 lanes */
                    v8u64 hit = (v8u64)(k >= tau);
                    if (!((hit[0] | hit[1]) | (hit[2] | hit[3]) | (hit[4] | hit[5]) | (hit[6] | hit[7]))) continue;
                    for (int e = 0; e < 16; e++) {
                        cand[m] = (int32_t)(j + e);
                        keys[m] = k[e];
                        m += k[e] >= tau;
                    }
                }
                for (; j < n; j++) {
                    uint32_t k = fkey(row[j]);
                    cand[m] = (int32_t)j;
                    keys[m] = k;
                    m += k >= tau;
                }
                if (m < kd) m = 0; /* too few reached the guess: the whole row */
            }
        }
        if (m == 0) {
            for (int64_t j = 0; j < n; j++) {
                keys[j] = fkey(row[j]);
                cand[j] = (int32_t)j;
            }
            m = n;
        }
        if (radix_select(keys, cand, m, kd, out + t * kd)) return t;
    }
    return -1;
}

#define KB 256 /* keys per transposed block: [d][KB] floats stay in L1 for d <= 32 */
#define VB 8   /* vectors of 16 keys per register tile (8 accumulators hide the FMA latency) */

/* Indexer scores out[t, j] = sum_h w[t, h] * relu(q[t, h, :] . key[j, :]) for rows 0 .. T-1 and keys
   0 .. n-1 (fp32 accumulation). q [T, h, d] and w [T, h] fp32 contiguous; keys [n, d] with row stride
   key_ld, fp32 (key_bf16 = 0) or bf16 bit patterns (1); out row stride out_ld. kt: scratch of d * KB
   floats. Keys are transposed KB at a time so one query vector's dot products with 16 keys are 16-wide
   FMAs over the head dimension. */
void lc2_index_scores(const float *q, const float *w, int64_t T, int64_t h, int64_t d, const void *keys,
                      int64_t key_ld, int key_bf16, int64_t n, float *out, int64_t out_ld, float *kt) {
    for (int64_t j0 = 0; j0 < n; j0 += KB) {
        int64_t m = n - j0 < KB ? n - j0 : KB;
        int64_t mp = (m + 16 * VB - 1) / (16 * VB) * (16 * VB); /* padded to whole register tiles */
        if (mp > KB) mp = KB;
        for (int64_t j = 0; j < mp; j++) {
            for (int64_t e = 0; e < d; e++) {
                kt[e * KB + j] = j < m ? elem_load(keys, key_bf16, (j0 + j) * key_ld + e) : 0.0f;
            }
        }
        for (int64_t t = 0; t < T; t++) {
            const float *qt = q + t * h * d;
            const float *wt = w + t * h;
            float *o = out + t * out_ld + j0;
            for (int64_t jc = 0; jc < mp; jc += 16 * VB) {
                v16 s[VB];
                for (int i = 0; i < VB; i++) s[i] = (v16){0};
                for (int64_t hh = 0; hh < h; hh++) {
                    v16 a[VB];
                    for (int i = 0; i < VB; i++) a[i] = (v16){0};
                    const float *qh = qt + hh * d;
                    for (int64_t e = 0; e < d; e++) {
                        const float *row = kt + e * KB + jc;
                        float qv = qh[e];
                        for (int i = 0; i < VB; i++) a[i] += qv * vload(row + 16 * i);
                    }
                    float wv = wt[hh];
                    for (int i = 0; i < VB; i++) {
                        vi16 pos = a[i] > 0.0f; /* relu as a mask: all ones where positive */
                        s[i] += wv * (v16)((vi16)a[i] & pos);
                    }
                }
                int64_t left = m - jc;
                for (int i = 0; i < VB; i++) {
                    if (left >= 16) {
                        vstore(o + jc + 16 * i, s[i]);
                    } else if (left > 0) {
                        float tmp[16];
                        vstore(tmp, s[i]);
                        memcpy(o + jc + 16 * i, tmp, (size_t)left * 4);
                    }
                    left -= 16;
                }
            }
        }
    }
}

typedef uint16_t vh16 __attribute__((vector_size(32)));

typedef uint16_t vh32 __attribute__((vector_size(64)));

/* 16 bf16 values widened to fp32: each value becomes the high half of a 32-bit lane, the low half zero, by
   one two-source shuffle (GCC 12 turns a `__builtin_convertvector` to 32-bit lanes into two half-width
   widenings, an insert and a shift: 5 instructions instead of 1 on AVX-512). */
static inline v16 bload(const uint16_t *p) {
    vh16 h, z = {0};
    memcpy(&h, p, sizeof h);
    vh32 w = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                     10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    v16 f;
    memcpy(&f, &w, sizeof f);
    return f;
}

/* 16 floats of a pool row from element e on (fp32, or bf16 bit patterns widened); `left` < 16: the rest
   are `fill`. */
static inline v16 row_load_fill(const void *base, int bf16, int64_t e, int64_t left, float fill) {
    if (left >= 16) { /* (branches, not a select: GCC would load both ways and blend) */
        if (!bf16) return vload((const float *)base + e);
        return bload((const uint16_t *)base + e);
    }
    float tmp[16];
    for (int k = 0; k < 16; k++) tmp[k] = fill;
    for (int64_t k = 0; k < left; k++) tmp[k] = elem_load(base, bf16, e + k);
    return vload(tmp);
}

static inline v16 row_load(const void *base, int bf16, int64_t e, int64_t left) {
    return row_load_fill(base, bf16, e, left, 0.0f);
}

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree of halves, not 16 dependent adds */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline v16 vsel(vi16 m, v16 a, v16 b) { return (v16)(((vi16)a & m) | ((vi16)b & ~m)); }
static inline v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }

static inline float hmax(v16 v) { /* the largest lane: halves, then 8 compares */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v8 m8 = (v8)(((vi8)a & (a > b)) | ((vi8)b & ~(a > b)));
    float r = m8[0];
    for (int k = 1; k < 8; k++) r = m8[k] > r ? m8[k] : r;
    return r;
}

/* One register tile of `lc2_index_scores_wide`: kt keys x hv vectors of 16 heads (kt * hv <= 16
   accumulators), keys kb [kt, d] with row stride kld; o[a] = sum_h w_h relu(q_h . k_a) for a < m. */
static inline __attribute__((always_inline)) void wide_scan_tile(const float *qt, const float *w, const int hv,
                                                                 const int kt, const float *kb, int64_t kld,
                                                                 int64_t d, float *o, int64_t m) {
    v16 acc[16][4];
    for (int a = 0; a < kt; a++)
        for (int b = 0; b < hv; b++) acc[a][b] = (v16){0};
    for (int64_t e = 0; e < d; e++) {
        v16 qv[4];
        for (int b = 0; b < hv; b++) qv[b] = vload(qt + e * 16 * hv + 16 * b);
        for (int b = 0; b < hv; b++) KEEP1(qv[b]); /* (loaded once for the kt keys, not folded into each FMA) */
        for (int a = 0; a < kt; a++) {
            const float kv = kb[a * kld + e];
            for (int b = 0; b < hv; b++) acc[a][b] += kv * qv[b];
        }
    }
    for (int a = 0; a < m; a++) {
        v16 s = {0};
        for (int b = 0; b < hv; b++) s += vmax(acc[a][b], (v16){0}) * vload(w + 16 * b);
        o[a] = hsum(s);
    }
}

/* `lc2_index_scores` for wide heads and a few rows (a decode step: one query row against every cached
   key, at LongCat-2.0's 64 heads x 128 dims): h a multiple of 16 up to 64, heads in the vector lanes. A
   row's queries are transposed to qt [d, h] (in L1), and a register tile of 16 / (h / 16) keys x h heads
   takes one broadcast key value per dim and key; fp32 keys are read in place, bf16 ones widened a tile at
   a time into kw. As a GEMM this is [keys, d] x [d, h] with h small, which oneDNN ran at ~100 GFLOP/s
   here, with a ReLU / weight / head-sum pass after it. qt: T * d * h floats, kw: 16 * d floats. */
#define WIDE_AHEAD 8 /* tiles of keys fetched ahead */
void lc2_index_scores_wide(const float *q, const float *w, int64_t T, int64_t h, int64_t d, const void *keys,
                           int64_t key_ld, int key_bf16, int64_t n, float *out, int64_t out_ld, float *qt,
                           float *kw) {
    const int hv = (int)(h / 16), kt = hv == 1 ? 16 : hv == 2 ? 8 : hv == 3 ? 5 : 4;
    const int64_t esz = key_bf16 ? 2 : 4;
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < d; e++) /* (writes in order; the h rows read stay in L1) */
            for (int64_t hh = 0; hh < h; hh++) qt[(t * d + e) * h + hh] = q[(t * h + hh) * d + e];
    for (int64_t j0 = 0; j0 < n; j0 += kt) {
        const int64_t m = n - j0 < kt ? n - j0 : kt;
        const float *kb = (const float *)keys + j0 * key_ld;
        int64_t kld = key_ld;
        for (int64_t a = j0 + WIDE_AHEAD * kt; a < j0 + (WIDE_AHEAD + 1) * kt && a < n; a++)
            for (int64_t off = 0; off < d * esz; off += 64) __builtin_prefetch((const char *)keys + a * key_ld * esz + off);
        if (key_bf16 || m < kt) { /* widened (bf16) or zero-padded (a partial tile) into kw */
            for (int64_t a = 0; a < kt; a++)
                for (int64_t e = 0; e < d; e += 16)
                    vstore(kw + a * d + e, a < m ? row_load(keys, key_bf16, (j0 + a) * key_ld + e, d - e)
                                                 : (v16){0});
            kb = kw, kld = d;
        }
        for (int64_t t = 0; t < T; t++) {
            const float *qr = qt + t * d * h, *wr = w + t * h;
            float *o = out + t * out_ld + j0;
            switch (hv) {
            case 1: wide_scan_tile(qr, wr, 1, 16, kb, kld, d, o, m); break;
            case 2: wide_scan_tile(qr, wr, 2, 8, kb, kld, d, o, m); break;
            case 3: wide_scan_tile(qr, wr, 3, 5, kb, kld, d, o, m); break;
            default: wide_scan_tile(qr, wr, 4, 4, kb, kld, d, o, m); break;
            }
        }
    }
}

/* Row (h0 + a) of a [hn x 64-column] register tile into o (rows c floats apart), from column c0 on;
   columns past c are dropped. */
static inline void store_tile(float *o, v16 acc[4][4], int64_t hn, int64_t h0, int64_t c, int64_t c0) {
    for (int a = 0; a < hn; a++) {
        float *dst = o + (h0 + a) * c + c0;
        for (int b = 0; b < 4; b++) {
            int64_t left = c - c0 - 16 * b;
            if (left >= 16) {
                vstore(dst + 16 * b, acc[a][b]);
            } else if (left > 0) {
                float tmp[16];
                vstore(tmp, acc[a][b]);
                memcpy(dst + 16 * b, tmp, (size_t)left * 4);
            }
        }
    }
}

/* 2^x for x <= 0 (-inf and x < -126 give 0): x = k + f with k = round(x) (the 1.5 * 2^23 trick) and
   f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial (relative error < 3e-7), 2^k added to the
   exponent bits. */
static inline v16 vexp2(v16 x) {
    vi16 live = x >= -126.0f;
    v16 xc = (v16)(((vi16)x & live) | ((vi16)((v16){0} - 126.0f) & ~live));
    const float magic = 12582912.0f;
    v16 t = xc + magic;
    vi16 k = (vi16)t - (vi16)((v16){0} + magic);
    v16 f = xc - (t - magic);
    const float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381608f;
    v16 poly = 1.0f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * c6)))));
    return (v16)(((vi16)poly + (k << 23)) & live);
}

static inline float exp2_1(float x) { /* one 2^x, x <= 0 (-inf: 0) */
    v16 v = {x};
    return vexp2(v)[0];
}


/* P.V of large rows: o[i] (+)= p[i] @ v[i][:, :c] for rows 0 .. n-1, fp32. p [n, h, K] (row stride K,
   rows ldp apart), v: K keys per row with stride ldv (rows ldvr apart); o [n, h, c] contiguous. Blocked
   so the data stays near the FMA units: 256 keys at a time (256 x c floats, in L2) serve every 4-head x
   64-column register tile (16 accumulators over 4 loads and 4 broadcasts per key), whose partial sums
   pass through o (L1/L2) between key blocks. (Blocks of 64 keys with one 64-column strip serving every
   head group, as `lc2_slot_attention` does for keys at random places, ran at 0.8x here: o is swept 4x as
   often, and contiguous rows stream well without it.) */
void lc2_pv_rows(const float *p, int64_t n, int64_t h, int64_t kk, int64_t ldp, const float *v, int64_t ldv,
                 int64_t ldvr, int64_t c, float *o, int accumulate) {
    for (int64_t i = 0; i < n; i++) {
        const float *pi = p + i * ldp;
        const float *vi = v + i * ldvr;
        float *oi = o + i * h * c;
        if (!accumulate) memset(oi, 0, (size_t)(h * c) * sizeof(float));
        for (int64_t k0 = 0; k0 < kk; k0 += 256) {
            int64_t k1 = k0 + 256 < kk ? k0 + 256 : kk;
            for (int64_t h0 = 0; h0 < h; h0 += 4) {
                int64_t hn = h - h0 < 4 ? h - h0 : 4;
                for (int64_t c0 = 0; c0 < c; c0 += 64) {
                    v16 acc[4][4];
                    for (int a = 0; a < 4; a++)
                        for (int b = 0; b < 4; b++)
                            acc[a][b] = a < hn ? row_load(oi + (h0 + a) * c, 0, c0 + 16 * b, c - c0 - 16 * b)
                                               : (v16){0};
                    if (hn == 4 && c - c0 >= 64) { /* whole tile: constant trip counts, registers only */
                        const float *p0 = pi + h0 * kk, *p1 = p0 + kk, *p2 = p1 + kk, *p3 = p2 + kk;
                        for (int64_t k = k0; k < k1; k++) {
                            const float *vr = vi + k * ldv + c0;
                            v16 x0 = vload(vr), x1 = vload(vr + 16), x2 = vload(vr + 32), x3 = vload(vr + 48);
                            KEEP4(x0, x1, x2, x3); /* (loaded once for the 4 heads, not folded into each FMA) */
                            float q0 = p0[k], q1 = p1[k], q2 = p2[k], q3 = p3[k];
                            acc[0][0] += q0 * x0, acc[0][1] += q0 * x1, acc[0][2] += q0 * x2, acc[0][3] += q0 * x3;
                            acc[1][0] += q1 * x0, acc[1][1] += q1 * x1, acc[1][2] += q1 * x2, acc[1][3] += q1 * x3;
                            acc[2][0] += q2 * x0, acc[2][1] += q2 * x1, acc[2][2] += q2 * x2, acc[2][3] += q2 * x3;
                            acc[3][0] += q3 * x0, acc[3][1] += q3 * x1, acc[3][2] += q3 * x2, acc[3][3] += q3 * x3;
                        }
                    } else {
                        for (int64_t k = k0; k < k1; k++) {
                            v16 x[4];
                            for (int b = 0; b < 4; b++) x[b] = row_load(vi + k * ldv, 0, c0 + 16 * b, c - c0 - 16 * b);
                            for (int a = 0; a < hn; a++) {
                                float pv = pi[(h0 + a) * kk + k];
                                for (int b = 0; b < 4; b++) acc[a][b] += pv * x[b];
                            }
                        }
                    }
                    store_tile(oi, acc, hn, h0, c, c0);
                }
            }
        }
    }
}

/* Large rows' absorbed attention with the keys read in place (64 heads x 2,048 picks at LongCat-2.0 dims),
   one block of SA_KEYS keys at a time, so each key comes from memory once:
   - the block's scores in register tiles of 4 keys x 64 heads over the row's queries transposed to
     qt [D, h] (per element: 4 loads of qt, 4 broadcast key values, 16 FMAs), stored key-major sc [keys, h];
     the next tile's key rows are prefetched a cache line per 16 elements;
   - an online softmax in log2 units over whole vectors of 16 heads (running max m and sum l, the block's
     correction alpha);
   - P.V from cache: 4-head x 64-column register tiles whose accumulators start from o x alpha, one
     64-column strip of the block's values (in L1) serving every head group.
   Scores are scale * q . k (log2 units; the scale applied as qt is written); each block's max per head is
   kept as its scores are stored. o [n, h, c] = softmax(scores) v[:, :c] (a row with no valid slot:
   zeros); ws: (SA_KEYS + 3) * h floats, qt: D * h floats (scratch). 1.07x the same steps done for the
   whole row in turn (P.V re-reading the keys from L3), 1.23-1.25x session 15's kernel (8 rows of 64
   heads x 2,048 picks). */
#define SA_KEYS 64
void lc2_slot_attention(const float *q, int64_t n, int64_t h, int64_t D, int64_t c, const float *pool, int64_t ld,
                         const int64_t *slots, int64_t kk, float scale, float *o, float *ws, float *qt) {
    const float ninf = -__builtin_inff();
    float *sc = ws, *m = ws + SA_KEYS * h, *l = m + h, *alpha = l + h; /* alpha: the block's max first */
    for (int64_t i = 0; i < n; i++) {
        const float *qi = q + i * h * D;
        const int64_t *si = slots + i * kk;
        float *oi = o + i * h * c;
        for (int64_t e = 0; e < D; e++) /* (writes in order; the h rows read stay in L1) */
            for (int64_t hh = 0; hh < h; hh++) qt[e * h + hh] = scale * qi[hh * D + e];
        memset(oi, 0, (size_t)(h * c) * sizeof(float));
        for (int64_t hh = 0; hh < h; hh++) m[hh] = ninf, l[hh] = 0.0f;
        for (int64_t j0 = 0; j0 < kk; j0 += SA_KEYS) {
            const int64_t j1 = j0 + SA_KEYS < kk ? j0 + SA_KEYS : kk, nb = j1 - j0;
            for (int64_t hh = 0; hh < h; hh++) alpha[hh] = ninf;
            for (int64_t g0 = 0; g0 < h; g0 += 64) { /* the block's scores, key-major: sc [nb, h] */
                const int hv = h - g0 >= 64 ? 4 : (int)((h - g0) / 16);
                for (int64_t jt = j0; jt < j1; jt += 4) {
                    const float *kp[4], *nx[4];
                    for (int a = 0; a < 4; a++) {
                        int64_t j = jt + a, jn = jt + 4 + a;
                        kp[a] = pool + (j < j1 && si[j] >= 0 ? si[j] : 0) * ld;
                        nx[a] = pool + (jn < kk && si[jn] >= 0 ? si[jn] : 0) * ld;
                    }
                    v16 acc[4][4];
                    for (int a = 0; a < 4; a++)
                        for (int b = 0; b < 4; b++) acc[a][b] = (v16){0};
                    if (hv == 4) {
                        const float *k0 = kp[0], *k1 = kp[1], *k2 = kp[2], *k3 = kp[3];
                        v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
                        v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
                        for (int64_t e0 = 0; e0 < D; e0 += 16) {
                            for (int a = 0; a < 4; a++) __builtin_prefetch(nx[a] + e0);
                            const int64_t e1 = e0 + 16 < D ? e0 + 16 : D;
                            for (int64_t e = e0; e < e1; e++) {
                                const float *qe = qt + e * h + g0;
                                v16 q0 = vload(qe), q1 = vload(qe + 16), q2 = vload(qe + 32), q3 = vload(qe + 48);
                                KEEP4(q0, q1, q2, q3);
                                float x0 = k0[e], x1 = k1[e], x2 = k2[e], x3 = k3[e];
                                a00 += x0 * q0, a01 += x0 * q1, a02 += x0 * q2, a03 += x0 * q3;
                                a10 += x1 * q0, a11 += x1 * q1, a12 += x1 * q2, a13 += x1 * q3;
                                a20 += x2 * q0, a21 += x2 * q1, a22 += x2 * q2, a23 += x2 * q3;
                                a30 += x3 * q0, a31 += x3 * q1, a32 += x3 * q2, a33 += x3 * q3;
                            }
                        }
                        acc[0][0] = a00, acc[0][1] = a01, acc[0][2] = a02, acc[0][3] = a03;
                        acc[1][0] = a10, acc[1][1] = a11, acc[1][2] = a12, acc[1][3] = a13;
                        acc[2][0] = a20, acc[2][1] = a21, acc[2][2] = a22, acc[2][3] = a23;
                        acc[3][0] = a30, acc[3][1] = a31, acc[3][2] = a32, acc[3][3] = a33;
                    } else {
                        for (int64_t e = 0; e < D; e++) {
                            const float *qe = qt + e * h + g0;
                            for (int b = 0; b < hv; b++) {
                                v16 qv = vload(qe + 16 * b);
                                for (int a = 0; a < 4; a++) acc[a][b] += kp[a][e] * qv;
                            }
                        }
                    }
                    for (int a = 0; a < 4 && jt + a < j1; a++)
                        for (int b = 0; b < hv; b++) {
                            const v16 v = si[jt + a] < 0 ? (v16){0} + ninf : acc[a][b];
                            vstore(sc + (jt + a - j0) * h + g0 + 16 * b, v);
                            vstore(alpha + g0 + 16 * b, vmax(vload(alpha + g0 + 16 * b), v));
                        }
                }
            }
            for (int64_t hb = 0; hb < h; hb += 16) { /* online softmax, 16 heads a vector */
                v16 m_old = vload(m + hb), mx = vmax(m_old, vload(alpha + hb)), sum = {0};
                for (int64_t k = 0; k < nb; k++) {
                    v16 p = vexp2(vload(sc + k * h + hb) - mx); /* (-inf - -inf: NaN, which vexp2 makes 0) */
                    vstore(sc + k * h + hb, p);
                    sum += p;
                }
                v16 al = vexp2(m_old - mx);
                vstore(alpha + hb, al);
                vstore(l + hb, vload(l + hb) * al + sum);
                vstore(m + hb, mx);
            }
            for (int64_t c0 = 0; c0 < c; c0 += 64) { /* P.V, the block's keys now in L2 */
                for (int64_t h0 = 0; h0 < h; h0 += 4) {
                    v16 acc[4][4];
                    for (int a = 0; a < 4; a++)
                        for (int b = 0; b < 4; b++)
                            acc[a][b] = row_load(oi + (h0 + a) * c, 0, c0 + 16 * b, c - c0 - 16 * b) * alpha[h0 + a];
                    const float *ps = sc + h0;
                    if (c - c0 >= 64) {
                        for (int64_t k = 0; k < nb; k++) {
                            const int64_t sl = si[j0 + k];
                            const float *vr = pool + (sl < 0 ? 0 : sl) * ld + c0;
                            v16 x0 = vload(vr), x1 = vload(vr + 16), x2 = vload(vr + 32), x3 = vload(vr + 48);
                            KEEP4(x0, x1, x2, x3);
                            const float *pk = ps + k * h;
                            float q0 = pk[0], q1 = pk[1], q2 = pk[2], q3 = pk[3];
                            acc[0][0] += q0 * x0, acc[0][1] += q0 * x1, acc[0][2] += q0 * x2, acc[0][3] += q0 * x3;
                            acc[1][0] += q1 * x0, acc[1][1] += q1 * x1, acc[1][2] += q1 * x2, acc[1][3] += q1 * x3;
                            acc[2][0] += q2 * x0, acc[2][1] += q2 * x1, acc[2][2] += q2 * x2, acc[2][3] += q2 * x3;
                            acc[3][0] += q3 * x0, acc[3][1] += q3 * x1, acc[3][2] += q3 * x2, acc[3][3] += q3 * x3;
                        }
                    } else {
                        for (int64_t k = 0; k < nb; k++) {
                            const int64_t sl = si[j0 + k];
                            const float *vr = pool + (sl < 0 ? 0 : sl) * ld;
                            v16 x[4];
                            for (int b = 0; b < 4; b++) x[b] = row_load(vr, 0, c0 + 16 * b, c - c0 - 16 * b);
                            for (int a = 0; a < 4; a++)
                                for (int b = 0; b < 4; b++) acc[a][b] += ps[k * h + a] * x[b];
                        }
                    }
                    store_tile(oi, acc, 4, h0, c, c0);
                }
            }
        }
        for (int64_t hh = 0; hh < h; hh++) { /* normalised; a row with no valid key stays zero */
            const float inv = l[hh] > 0.0f ? 1.0f / l[hh] : 0.0f;
            for (int64_t e = 0; e < c; e++) oi[hh * c + e] *= inv;
        }
    }
}

/* Attention of each row over its own gathered keys, read in place from the pool (no gathered copy).
   Row i: s[hh, j] = scale * q[i, hh, :] . pool[slots[i, j], :dim] in log2 units (slot < 0: left out);
   m[i, hh] = max_j s; l[i, hh] = sum_j 2^(s - m); o[i, hh, :c] = sum_j 2^(s - m) pool[slots[i, j], :c].
   q [n, h, dim] fp32 contiguous; pool rows of stride ld elements, fp32 or bf16; slots [n, kd];
   o [n, h, c], m and l [n, h] fp32; ws: scratch of h * kd floats. A row with no valid slot gets m = -inf,
   l = 0, o = 0. Scores: four heads share each loaded key chunk; P.V: register tiles of 4 heads x 64
   latent dims over all of the row's keys (re-read from L2 per tile). */
void lc2_slot_attend(const float *q, int64_t n, int64_t h, int64_t dim, int64_t c, const void *pool,
                     int64_t ld, int bf16, const int64_t *slots, int64_t kd, float scale, float *o, float *m,
                     float *l, float *ws) {
    const size_t esz = bf16 ? 2 : 4;
    const float ninf = -__builtin_inff();
    for (int64_t i = 0; i < n; i++) {
        const float *qi = q + i * h * dim;
        const int64_t *si = slots + i * kd;
        for (int64_t j = 0; j < kd; j++) {
            if (si[j] < 0) {
                for (int64_t hh = 0; hh < h; hh++) ws[hh * kd + j] = ninf;
                continue;
            }
            const char *key = (const char *)pool + (size_t)si[j] * ld * esz;
            if (j + 8 < kd && si[j + 8] >= 0) { /* random rows: fetch a few keys ahead */
                const char *ahead = (const char *)pool + (size_t)si[j + 8] * ld * esz;
                for (size_t off = 0; off < (size_t)dim * esz; off += 64) __builtin_prefetch(ahead + off);
            }
            for (int64_t h0 = 0; h0 < h; h0 += 4) {
                int64_t hn = h - h0 < 4 ? h - h0 : 4;
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t e = 0; e < dim; e += 16) {
                    int64_t left = dim - e;
                    v16 k = row_load(key, bf16, e, left);
                    const float *qh = qi + h0 * dim + e;
                    a0 += row_load(qh, 0, 0, left) * k;
                    if (hn > 1) a1 += row_load(qh + dim, 0, 0, left) * k;
                    if (hn > 2) a2 += row_load(qh + 2 * dim, 0, 0, left) * k;
                    if (hn > 3) a3 += row_load(qh + 3 * dim, 0, 0, left) * k;
                }
                ws[h0 * kd + j] = scale * hsum(a0);
                if (hn > 1) ws[(h0 + 1) * kd + j] = scale * hsum(a1);
                if (hn > 2) ws[(h0 + 2) * kd + j] = scale * hsum(a2);
                if (hn > 3) ws[(h0 + 3) * kd + j] = scale * hsum(a3);
            }
        }
        for (int64_t hh = 0; hh < h; hh++) { /* softmax numerators in place, their max and sum */
            float *sh = ws + hh * kd;
            float mx = ninf;
            for (int64_t j = 0; j < kd; j++) mx = sh[j] > mx ? sh[j] : mx;
            m[i * h + hh] = mx;
            float sum = 0.0f;
            if (mx == ninf) {
                for (int64_t j = 0; j < kd; j++) sh[j] = 0.0f;
            } else {
                v16 acc = {0};
                int64_t j = 0;
                for (; j + 16 <= kd; j += 16) {
                    v16 p = vexp2(vload(sh + j) - mx);
                    vstore(sh + j, p);
                    acc += p;
                }
                sum = hsum(acc);
                if (j < kd) {
                    float tmp[16];
                    for (int64_t e = 0; e < 16; e++) tmp[e] = j + e < kd ? sh[j + e] - mx : ninf;
                    v16 p = vexp2(vload(tmp));
                    vstore(tmp, p);
                    for (int64_t e = 0; j + e < kd; e++) {
                        sh[j + e] = tmp[e];
                        sum += tmp[e];
                    }
                }
            }
            l[i * h + hh] = sum;
        }
        float *oi = o + i * h * c;
        for (int64_t h0 = 0; h0 < h; h0 += 4) {
            int64_t hn = h - h0 < 4 ? h - h0 : 4;
            for (int64_t c0 = 0; c0 < c; c0 += 64) {
                v16 acc[4][4];
                for (int a = 0; a < 4; a++)
                    for (int b = 0; b < 4; b++) acc[a][b] = (v16){0};
                for (int64_t j = 0; j < kd; j++) {
                    if (si[j] < 0) continue;
                    const char *key = (const char *)pool + (size_t)si[j] * ld * esz;
                    v16 k[4];
                    for (int b = 0; b < 4; b++) k[b] = row_load(key, bf16, c0 + 16 * b, c - c0 - 16 * b);
                    for (int a = 0; a < hn; a++) {
                        float pv = ws[(h0 + a) * kd + j];
                        for (int b = 0; b < 4; b++) acc[a][b] += pv * k[b];
                    }
                }
                store_tile(oi, acc, hn, h0, c, c0);
            }
        }
    }
}

/* ---- products of a few rows with a weight (decode): memory-bound, so the weight is streamed once ---- */

/* 16 floats to out[0..count) as fp32, or as bf16 rounded to nearest even (NaN stays a quiet NaN). */
static inline void put16(void *out, int bf16, int64_t i, v16 v, int64_t count) {
    if (!bf16) {
        if (count >= 16) vstore((float *)out + i, v);
        else { float tmp[16]; vstore(tmp, v); memcpy((float *)out + i, tmp, (size_t)count * 4); }
        return;
    }
    vu16 u;
    memcpy(&u, &v, sizeof u);
    vu16 nan = (vu16)((u & 0x7FFFFFFFu) > 0x7F800000u);
    u = (u & ~nan) | (0x7FC00000u & nan);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vh16 h = __builtin_convertvector(u, vh16);
    if (count >= 16) memcpy((uint16_t *)out + i, &h, sizeof h); /* (a fixed size: no memcpy call) */
    else memcpy((uint16_t *)out + i, &h, (size_t)count * 2);
}

static inline void put1(void *out, int bf16, int64_t i, float f) {
    v16 v = {f};
    put16(out, bf16, i, v, 1);
}

#define LOAD_0(p) vload(p)
#define LOAD_1(p) bload(p)
#define WTYPE_0 float
#define WTYPE_1 uint16_t

/* bf16 weight rows are prefetched this many elements (512 bytes) ahead: their tiles read half-lines per
   row and step, and without it the stream ran at 16-22 GB/s against fp32's 37 (20-26 with it). */
#define NT_BF16_PREFETCH 256

/* "NT": y[m, n] = sum_k x[m, k] W[n, k], n in [n0, n1): register tiles of MR rows x NR weight rows, each
   weight row read once per MR rows, dot products summed across lanes at the end. */
#define NT_TILE(MR, NR, WB)                                                                                   \
    static void nt_##MR##_##NR##_##WB(const float *x, int64_t M, int64_t xs, const void *W, int64_t ws,       \
                                       int64_t K, void *y, int yb, int64_t ys, int64_t n0, int64_t n1) {     \
        const int64_t k16 = K & ~(int64_t)15;                                                                \
        for (int64_t n = n0; n < n1; n += NR) {                                                              \
            int64_t nr = n1 - n < NR ? n1 - n : NR;                                                          \
            const WTYPE_##WB *w[NR];                                                                         \
            for (int j = 0; j < NR; j++) w[j] = (const WTYPE_##WB *)W + (n + (j < nr ? j : 0)) * ws;          \
            for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                         \
                int64_t mr = M - m0 < MR ? M - m0 : MR;                                                      \
                const float *xr[MR];                                                                         \
                for (int i = 0; i < MR; i++) xr[i] = x + (m0 + (i < mr ? i : 0)) * xs;                       \
                v16 acc[MR][NR];                                                                             \
                for (int i = 0; i < MR; i++)                                                                 \
                    for (int j = 0; j < NR; j++) acc[i][j] = (v16){0};                                       \
                for (int64_t k = 0; k < k16; k += 16) {                                                      \
                    v16 wv[NR];                                                                              \
                    if (WB && m0 == 0 && (k & 31) == 0) /* NT_BF16_PREFETCH elements ahead in each bf16 row */         \
                        for (int j = 0; j < NR; j++) __builtin_prefetch(w[j] + k + NT_BF16_PREFETCH);        \
                    for (int j = 0; j < NR; j++) wv[j] = LOAD_##WB(w[j] + k);                                 \
                    for (int j = 0; j < NR; j++) KEEP1(wv[j]); /* (loaded once, not per row) */              \
                    for (int i = 0; i < MR; i++) {                                                           \
                        v16 xv = vload(xr[i] + k);                                                           \
                        for (int j = 0; j < NR; j++) acc[i][j] += xv * wv[j];                                \
                    }                                                                                        \
                }                                                                                            \
                if (k16 < K) { /* a zero-filled tail */                                                      \
                    v16 wv[NR];                                                                              \
                    for (int j = 0; j < NR; j++) wv[j] = row_load(w[j], WB, k16, K - k16);                   \
                    for (int i = 0; i < MR; i++) {                                                           \
                        v16 xv = row_load(xr[i], 0, k16, K - k16);                                           \
                        for (int j = 0; j < NR; j++) acc[i][j] += xv * wv[j];                                \
                    }                                                                                        \
                }                                                                                            \
                for (int i = 0; i < mr; i++)                                                                 \
                    for (int j = 0; j < nr; j++) put1(y, yb, (m0 + i) * ys + n + j, hsum(acc[i][j]));         \
            }                                                                                                \
        }                                                                                                    \
    }
NT_TILE(1, 8, 0)
NT_TILE(2, 8, 0)
NT_TILE(1, 8, 1)
NT_TILE(2, 8, 1)

/* "KN": y[m, n] = sum_k x[m, k] W[k, n] (W's rows are k): x broadcast, MR rows x NB 16-column vectors. */
#define KN_TILE(MR, NB, WB)                                                                                   \
    static void kn_##MR##_##NB##_##WB(const float *x, int64_t M, int64_t xs, const void *W, int64_t ws,       \
                                       int64_t K, int64_t N, void *y, int yb, int64_t ys) {                 \
        for (int64_t c0 = 0; c0 < N; c0 += 16 * NB) {                                                        \
            const int full = N - c0 >= 16 * NB;                                                              \
            for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                         \
                int64_t mr = M - m0 < MR ? M - m0 : MR;                                                      \
                v16 acc[MR][NB];                                                                             \
                for (int i = 0; i < MR; i++)                                                                 \
                    for (int b = 0; b < NB; b++) acc[i][b] = (v16){0};                                       \
                const float *xr[MR];                                                                         \
                for (int i = 0; i < MR; i++) xr[i] = x + (m0 + (i < mr ? i : 0)) * xs;                       \
                for (int64_t k = 0; k < K; k++) {                                                            \
                    const WTYPE_##WB *wk = (const WTYPE_##WB *)W + k * ws + c0;                               \
                    v16 wv[NB];                                                                              \
                    if (full)                                                                                \
                        for (int b = 0; b < NB; b++) wv[b] = LOAD_##WB(wk + 16 * b);                          \
                    else                                                                                     \
                        for (int b = 0; b < NB; b++) wv[b] = row_load(wk, WB, 16 * b, N - c0 - 16 * b);      \
                    for (int i = 0; i < MR; i++) {                                                           \
                        float xv = xr[i][k];                                                                 \
                        for (int b = 0; b < NB; b++) acc[i][b] += xv * wv[b];                                \
                    }                                                                                        \
                }                                                                                            \
                for (int i = 0; i < mr; i++)                                                                 \
                    for (int b = 0; b < NB; b++) {                                                           \
                        int64_t left = N - c0 - 16 * b;                                                      \
                        if (left > 0) put16(y, yb, (m0 + i) * ys + c0 + 16 * b, acc[i][b], left);            \
                    }                                                                                        \
            }                                                                                                \
        }                                                                                                    \
    }
KN_TILE(1, 8, 0)
KN_TILE(4, 4, 0)
KN_TILE(1, 8, 1)
KN_TILE(4, 4, 1)

/* "NT" for more rows (fp32 W and y): the rows' values sit in the vector lanes and each weight element is
   broadcast from where it lies. x is first transposed into xt [K, mp] (mp: M rounded up to 16, zero
   rows); a register tile is NT_BC_ROWS weight rows x MV vectors of 16 x rows, its sums stored transposed.
   Every weight row is streamed once per 32 x rows, its elements read in place as the tile walks k (a
   weight panel packed first stalled on the copy: 0.6-0.8x). Against the 2-row tiles' horizontal sums,
   each weight element feeds 32 FMAs through one broadcast load. */
#define NT_BC_ROWS 12
#define NT_BC_TILE(MV)                                                                                        \
    static void nt_bc_##MV(const float *xt, int64_t mp, int64_t m0, int64_t M, const float *W, int64_t ws,     \
                           int64_t K, float *y, int64_t ys, int64_t n, int64_t nr) {                          \
        const float *w[NT_BC_ROWS];                                                                          \
        for (int j = 0; j < NT_BC_ROWS; j++) w[j] = W + (n + (j < nr ? j : 0)) * ws;                         \
        v16 acc[NT_BC_ROWS][MV];                                                                             \
        for (int j = 0; j < NT_BC_ROWS; j++)                                                                 \
            for (int v = 0; v < MV; v++) acc[j][v] = (v16){0};                                               \
        const float *xk = xt + m0;                                                                           \
        for (int64_t k = 0; k < K; k++, xk += mp) {                                                          \
            v16 xv[MV];                                                                                      \
            for (int v = 0; v < MV; v++) {                                                                   \
                xv[v] = vload(xk + 16 * v);                                                                  \
                KEEP1(xv[v]);                                                                                \
            }                                                                                                \
            for (int j = 0; j < NT_BC_ROWS; j++) {                                                           \
                float s = w[j][k];                                                                           \
                v16 b = {s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; /* one vbroadcastss from memory */ \
                for (int v = 0; v < MV; v++) acc[j][v] += b * xv[v];                                         \
            }                                                                                                \
        }                                                                                                    \
        float t[NT_BC_ROWS][16 * MV];                                                                        \
        for (int j = 0; j < NT_BC_ROWS; j++)                                                                 \
            for (int v = 0; v < MV; v++) vstore(&t[j][16 * v], acc[j][v]);                                   \
        int64_t mr = M - m0 < 16 * MV ? M - m0 : 16 * MV;                                                    \
        for (int64_t i = 0; i < mr; i++)                                                                     \
            for (int j = 0; j < nr; j++) y[(m0 + i) * ys + n + j] = t[j][i];                                  \
    }
NT_BC_TILE(1)
NT_BC_TILE(2)

/* → 0 (nothing written) where its scratch (the transposed rows) cannot be allocated. */
static int nt_bcast(const float *x, int64_t M, int64_t xs, const float *W, int64_t ws, int64_t K, float *y,
                    int64_t ys, int64_t n0, int64_t n1) {
    const int64_t mp = (M + 15) & ~(int64_t)15;
    float *xt = malloc((size_t)(K * mp) * sizeof(float));
    if (!xt) return 0;
    for (int64_t i = 0; i < mp; i++) /* row by row: x's rows may lie a power of two apart (a head's rows in
                                          [T, h, c]), and a walk down its columns then hits one cache set */
        for (int64_t k = 0; k < K; k++) xt[k * mp + i] = i < M ? x[i * xs + k] : 0.0f;
    for (int64_t n = n0; n < n1; n += NT_BC_ROWS) {
        int64_t nr = n1 - n < NT_BC_ROWS ? n1 - n : NT_BC_ROWS;
        for (int64_t m0 = 0; m0 < mp; m0 += 32) {
            if (mp - m0 >= 32) nt_bc_2(xt, mp, m0, M, W, ws, K, y, ys, n, nr);
            else nt_bc_1(xt, mp, m0, M, W, ws, K, y, ys, n, nr);
        }
    }
    free(xt);
    return 1;
}

/* y[:, n0 .. n1) = x W^T for M rows (NT: register tiles of 1 or 2 rows x 8 weight rows), W fp32 or bf16
   (row stride ws). */
static void nt_rows(const float *x, int64_t M, int64_t xs, const void *W, int wb, int64_t ws, int64_t K, void *y,
                    int yb, int64_t ys, int64_t n0, int64_t n1) {
    if (M == 1) { if (wb) nt_1_8_1(x, M, xs, W, ws, K, y, yb, ys, n0, n1); else nt_1_8_0(x, M, xs, W, ws, K, y, yb, ys, n0, n1); }
    else { if (wb) nt_2_8_1(x, M, xs, W, ws, K, y, yb, ys, n0, n1); else nt_2_8_0(x, M, xs, W, ws, K, y, yb, ys, n0, n1); }
}

/* Rows from which one weight's fp32 "NT" product takes the broadcast tiles (AVX-512 only: on AVX2 a tile's
   24 accumulators would be 48 registers). Not the per-head products of the absorbed form: a head's 128 x 512
   weight is too short to pay for transposing its rows (0.8x there). A variable, so that tests and
   benchmarks can compare the two kinds of tile. */
int lc2_nt_bc_min_rows = 9;

/* Heads [h0, h1) of y_h = x_h W_h^T ("NT", W_h [N, K]) or x_h W_h ("KN", W_h [K, N]), output columns
   [n0, n1) (NT only); x fp32 [M, K] per head (row stride xs, head stride xh), W fp32 or bf16 (row stride
   ws, head stride wh, in elements), y fp32 or bf16 (row stride ys, head stride yh). */
void lc2_heads_linear(const float *x, int64_t M, int64_t xs, int64_t xh, const void *W, int wb, int kn,
                      int64_t ws, int64_t wh, int64_t N, int64_t K, void *y, int yb, int64_t ys, int64_t yh,
                      int64_t h0, int64_t h1, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
    if (!kn && wh == 0 && h1 - h0 == 1 && M >= lc2_nt_bc_min_rows && !wb && !yb &&
        nt_bcast(x + h0 * xh, M, xs, W, ws, K, (float *)y + h0 * yh, ys, n0, n1))
        return;
#endif
    for (int64_t h = h0; h < h1; h++) {
        const float *xi = x + h * xh;
        const void *wi = (const char *)W + (size_t)(h * wh) * (wb ? 2 : 4);
        void *yi = (char *)y + (size_t)(h * yh) * (yb ? 2 : 4);
        if (kn) {
            if (M == 1) { if (wb) kn_1_8_1(xi, M, xs, wi, ws, K, N, yi, yb, ys); else kn_1_8_0(xi, M, xs, wi, ws, K, N, yi, yb, ys); }
            else { if (wb) kn_4_4_1(xi, M, xs, wi, ws, K, N, yi, yb, ys); else kn_4_4_0(xi, M, xs, wi, ws, K, N, yi, yb, ys); }
        } else {
            nt_rows(xi, M, xs, wi, wb, ws, K, yi, yb, ys, n0, n1);
        }
    }
}

/* ---- a MoE's routed experts for the few rows each gets in a decode step ---- */

/* v rounded to bf16's precision (nearest even), kept in fp32 lanes; a NaN stays a quiet NaN. */
static inline v16 vround_bf16(v16 v) {
    vu16 u;
    memcpy(&u, &v, sizeof u);
    vu16 nan = (vu16)((u & 0x7FFFFFFFu) > 0x7F800000u);
    vu16 r = ((u + 0x7FFFu + ((u >> 16) & 1u)) & ~nan) | ((u | 0x00400000u) & nan);
    r &= 0xFFFF0000u;
    memcpy(&v, &r, sizeof v);
    return v;
}

/* silu(v) = v sigmoid(v), with 2^(-|v| log2 e) <= 1 from vexp2. */
static inline v16 vsilu(v16 v) {
    vi16 neg = v < 0.0f;
    v16 a = (v16)((vi16)v & 0x7FFFFFFF); /* |v| */
    v16 e = vexp2(a * -1.4426950408889634f);
    v16 num = (v16)(((vi16)((v16){0} + 1.0f) & ~neg) | ((vi16)e & neg));
    return v * num / (1.0f + e);
}

/* Experts [e0, e1) of a MoE (`Experts.forward`) for rows sorted by expert, expert e's rows offs[e] ..
   offs[e + 1] - 1 of x [M, H] (fp32): y = (silu(x Wg^T) * (x Wu^T)) Wd^T with Wg, Wu [E, I, H] and Wd
   [E, H, I], fp32 or bf16 (wb), y [M, H] in the weights' dtype. With bf16 weights the intermediates are
   rounded where the bf16 module rounds them (each product's output, silu's, the product's). ws: 2 x
   (largest expert's rows) x I floats. */
void lc2_experts(const float *x, int64_t H, int64_t I, const int64_t *offs, const void *wg, const void *wu,
                 const void *wd, int wb, void *y, float *ws, int64_t e0, int64_t e1) {
    const size_t wsz = wb ? 2 : 4;
    for (int64_t e = e0; e < e1; e++) {
        const int64_t m = offs[e + 1] - offs[e];
        if (m <= 0) continue;
        const float *xe = x + offs[e] * H;
        float *g = ws, *u = ws + m * I;
        nt_rows(xe, m, H, (const char *)wg + (size_t)(e * I * H) * wsz, wb, H, H, g, 0, I, 0, I);
        nt_rows(xe, m, H, (const char *)wu + (size_t)(e * I * H) * wsz, wb, H, H, u, 0, I, 0, I);
        for (int64_t i = 0; i < m * I; i += 16) {
            const int64_t left = m * I - i;
            v16 gv = row_load(g, 0, i, left), uv = row_load(u, 0, i, left);
            v16 a;
            if (wb) a = vround_bf16(vround_bf16(vsilu(vround_bf16(gv))) * vround_bf16(uv));
            else a = vsilu(gv) * uv;
            put16(g, 0, i, a, left < 16 ? left : 16);
        }
        nt_rows(g, m, I, (const char *)wd + (size_t)(e * H * I) * wsz, wb, I, I, (char *)y + (size_t)(offs[e] * H) * wsz,
                wb, H, 0, H);
    }
}

/* ---- a decode step's absorbed attention over a sequence's cached runs, read once ---- */

/* The 16 lane sums of v[0..15] as one vector (lane i: the sum of v[i]): a tree of two-source shuffles,
   15 adds and 30 shuffles instead of 16 separate reductions. */
static inline v16 hsum16(const v16 *v) {
    v16 u[8], w[4], x[2];
    for (int k = 0; k < 8; k++)
        u[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)
        w[k] = __builtin_shufflevector(u[2 * k], u[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(u[2 * k], u[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)
        x[k] = __builtin_shufflevector(w[2 * k], w[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(w[2 * k], w[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static const vi16 run_lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#define RUN_KT 32
#define RUN_LOAD(p, e) (BF ? bload((const uint16_t *)(p) + (e)) : vload((const float *)(p) + (e)))

/* Scores of rows [a0, a0 + hn) (hn <= 4) against keys [0, kt) of a tile (rows ld elements apart):
   s[a, j] = q[a] . key[j] over D16 (a multiple of 16) columns, plus the tail up to D. */
static inline __attribute__((always_inline)) void run_scores_t(const float *const *qr, int64_t hn, const char *tile,
                                                              int64_t kt, int64_t ld, int64_t D, float *s,
                                                              const char *ahead, const int BF) {
    const size_t esz = BF ? 2 : 4;
    const int64_t D16 = D & ~(int64_t)15;
    for (int64_t j = 0; j < kt; j += 4) {
        const int64_t jn = kt - j < 4 ? kt - j : 4;
        const char *key[4];
        for (int b = 0; b < 4; b++) key[b] = tile + (size_t)((j + (b < jn ? b : 0)) * ld) * esz;
        if (ahead) /* the next tile's keys, while these are scored */
            for (int b = 0; b < 4; b++)
                for (size_t off = 0; off < (size_t)D * esz; off += 64)
                    __builtin_prefetch(ahead + ((j + b) * ld) * esz + off);
        v16 t[4][4];
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++) t[a][b] = (v16){0};
        for (int64_t e = 0; e < D16; e += 16) {
            v16 kv[4];
            for (int b = 0; b < 4; b++) kv[b] = RUN_LOAD(key[b], e);
            KEEP4(kv[0], kv[1], kv[2], kv[3]);
            for (int a = 0; a < 4; a++) {
                v16 qv = vload(qr[a] + e);
                KEEP1(qv); /* (loaded once for the 4 keys, not folded into each FMA) */
                for (int b = 0; b < 4; b++) t[a][b] += qv * kv[b];
            }
        }
        if (D16 < D) {
            for (int b = 0; b < 4; b++) {
                v16 kv = row_load(key[b], BF, D16, D - D16);
                for (int a = 0; a < 4; a++) t[a][b] += row_load(qr[a], 0, D16, D - D16) * kv;
            }
        }
        float sums[16];
        vstore(sums, hsum16(&t[0][0]));
        for (int a = 0; a < hn; a++) memcpy(s + a * RUN_KT + j, sums + 4 * a, (size_t)jn * 4);
    }
}

/* acc[a, c0 .. c0+64) += sum_j p[a, j] key[j, c0 .. c0+64) for rows a < hn (acc rows c apart). */
static inline __attribute__((always_inline)) void run_pv_t(float *acc, int64_t hn, int64_t c, const char *tile,
                                                          int64_t kt, int64_t ld, const float *s, const int BF) {
    const size_t esz = BF ? 2 : 4;
    for (int64_t c0 = 0; c0 < c; c0 += 64) {
        v16 o[4][4];
        if (c - c0 >= 64) {
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) o[a][b] = a < hn ? vload(acc + a * c + c0 + 16 * b) : (v16){0};
            for (int64_t j = 0; j < kt; j++) {
                const char *key = tile + (size_t)(j * ld) * esz;
                v16 kv[4];
                for (int b = 0; b < 4; b++) kv[b] = RUN_LOAD(key, c0 + 16 * b);
                for (int a = 0; a < 4; a++) {
                    const float pv = a < hn ? s[a * RUN_KT + j] : 0.0f;
                    for (int b = 0; b < 4; b++) o[a][b] += pv * kv[b];
                }
            }
        } else {
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    o[a][b] = a < hn ? row_load(acc + a * c, 0, c0 + 16 * b, c - c0 - 16 * b) : (v16){0};
            for (int64_t j = 0; j < kt; j++) {
                const char *key = tile + (size_t)(j * ld) * esz;
                v16 kv[4];
                for (int b = 0; b < 4; b++) kv[b] = row_load(key, BF, c0 + 16 * b, c - c0 - 16 * b);
                for (int a = 0; a < 4; a++) {
                    const float pv = a < hn ? s[a * RUN_KT + j] : 0.0f;
                    for (int b = 0; b < 4; b++) o[a][b] += pv * kv[b];
                }
            }
        }
        store_tile(acc, o, hn, 0, c, c0);
    }
}

/* Rows [r0, r1) of the absorbed attention of `kernels.run_attention`: row r = i h + j (query i, head j) sees
   the sequence's positions < start + i + 1. q [R, D] fp32, scaled by the softmax scale in log2 units; np runs
   of cached keys, run p at ptrs[p] with lens[p] rows ld elements apart (fp32 or bf16; the latent is the first
   c columns), positions consecutive from 0 across the runs. out [R, c] fp32 or bf16 (row stride c). The keys
   are read from memory once for all rows, a tile of RUN_KT at a time: scores in register tiles of 4 rows x
   4 keys, an online softmax (running max and sum per row; the accumulated output rescaled when the max
   grows), then P.V of the tile while its keys are in L1, into fp32 accumulators. ws: (r1 - r0) * (c +
   RUN_KT + 2) floats of scratch. */
void lc2_run_attend(const float *q, int64_t D, int64_t c, int64_t h, int64_t start, const int64_t *ptrs,
                    const int64_t *lens, int64_t np, int64_t ld, int bf16, void *out, int ob, float *ws,
                    int64_t r0, int64_t r1) {
    const size_t esz = bf16 ? 2 : 4;
    const float ninf = -__builtin_inff();
    const int64_t R = r1 - r0;
    float *acc = ws;           /* [R, c] */
    float *s = acc + R * c;    /* [R, RUN_KT] */
    float *m = s + R * RUN_KT; /* [R] */
    float *l = m + R;          /* [R] */
    memset(acc, 0, (size_t)(R * c) * 4);
    for (int64_t a = 0; a < R; a++) { m[a] = ninf; l[a] = 0.0f; }
    const int64_t seen = start + (r1 - 1) / h + 1; /* the positions the last row sees */
    const v16 neg = (v16){0} + ninf;
    int64_t pos0 = 0;
    for (int64_t p = 0; p < np && pos0 < seen; pos0 += lens[p], p++) {
        const char *run = (const char *)(intptr_t)ptrs[p];
        for (int64_t j0 = 0; j0 < lens[p] && pos0 + j0 < seen; j0 += RUN_KT) {
            const int64_t kt = lens[p] - j0 < RUN_KT ? lens[p] - j0 : RUN_KT;
            const char *tile = run + (size_t)(j0 * ld) * esz;
            for (int64_t a0 = 0; a0 < R; a0 += 4) {
                const int64_t hn = R - a0 < 4 ? R - a0 : 4;
                const float *qr[4];
                for (int a = 0; a < 4; a++) qr[a] = q + (r0 + a0 + (a < hn ? a : 0)) * D;
                /* (the next tile of this run, prefetched by the first row group, whole tiles only) */
                const char *ahead = a0 == 0 && j0 + 2 * RUN_KT <= lens[p] ? tile + (size_t)(RUN_KT * ld) * esz : 0;
                if (bf16) run_scores_t(qr, hn, tile, kt, ld, D, s + a0 * RUN_KT, ahead, 1);
                else run_scores_t(qr, hn, tile, kt, ld, D, s + a0 * RUN_KT, ahead, 0);
            }
            for (int64_t a = 0; a < R; a++) { /* online softmax over the tile's visible keys, 2 vectors */
                float *sa = s + a * RUN_KT;
                int64_t vis = start + (r0 + a) / h + 1 - (pos0 + j0);
                vis = vis < 0 ? 0 : (vis > kt ? kt : vis);
                const vi16 live0 = run_lane < (int)vis, live1 = run_lane + 16 < (int)vis;
                const v16 s0 = vsel(live0, vload(sa), neg), s1 = vsel(live1, vload(sa + 16), neg);
                const float mt = hmax(vmax(s0, s1));
                const float mn = mt > m[a] ? mt : m[a];
                if (mn == ninf) { /* nothing visible yet */
                    vstore(sa, (v16){0});
                    vstore(sa + 16, (v16){0});
                    continue;
                }
                const v16 p0 = vexp2(s0 - mn), p1 = vexp2(s1 - mn); /* (-inf: 0) */
                vstore(sa, p0);
                vstore(sa + 16, p1);
                const float corr = exp2_1(m[a] - mn); /* (m = -inf: 0) */
                l[a] = l[a] * corr + hsum(p0 + p1);
                m[a] = mn;
                if (corr != 1.0f) {
                    float *ar = acc + a * c;
                    int64_t e = 0;
                    for (; e + 16 <= c; e += 16) vstore(ar + e, vload(ar + e) * corr);
                    for (; e < c; e++) ar[e] *= corr;
                }
            }
            for (int64_t a0 = 0; a0 < R; a0 += 4) { /* P.V of the tile: 4 rows x 64 columns */
                const int64_t hn = R - a0 < 4 ? R - a0 : 4;
                if (bf16) run_pv_t(acc + a0 * c, hn, c, tile, kt, ld, s + a0 * RUN_KT, 1);
                else run_pv_t(acc + a0 * c, hn, c, tile, kt, ld, s + a0 * RUN_KT, 0);
            }
        }
    }
    for (int64_t a = 0; a < R; a++) {
        const float inv = l[a] > 0.0f ? 1.0f / l[a] : 0.0f;
        const float *ar = acc + a * c;
        for (int64_t e = 0; e < c; e += 16) {
            const int64_t left = c - e;
            put16(out, ob, (r0 + a) * c + e, row_load(ar, 0, e, left) * inv, left < 16 ? left : 16);
        }
    }
}

/* Segments [s0, s1) of a decode step's rows, each a sequence's queries over its own runs: segment g has
   t[g] queries (rows row0[g] h .. (row0[g] + t[g]) h - 1 of q and out) at positions start[g] ..., and runs
   run0[g] .. run0[g + 1] - 1 of (ptrs, lens). ws: scratch for the largest segment's rows. */
void lc2_run_attend_segs(const float *q, int64_t D, int64_t c, int64_t h, const int64_t *row0, const int64_t *t,
                         const int64_t *start, const int64_t *run0, const int64_t *ptrs, const int64_t *lens,
                         int64_t ld, int bf16, void *out, int ob, float *ws, int64_t s0, int64_t s1) {
    const size_t osz = ob ? 2 : 4;
    for (int64_t g = s0; g < s1; g++) {
        const int64_t r = row0[g] * h;
        lc2_run_attend(q + r * D, D, c, h, start[g], ptrs + run0[g], lens + run0[g], run0[g + 1] - run0[g], ld,
                       bf16, (char *)out + (size_t)(r * c) * osz, ob, ws, 0, t[g] * h);
    }
}

/* ---- softmax passes between two GEMMs (prefill): one pass per row instead of an op per pass ---- */

/* 16 values of a score row from element e on; `left` < 16: the rest are -inf. */
static inline v16 score_load(const void *row, int bf16, int64_t e, int64_t left) {
    return row_load_fill(row, bf16, e, left, -__builtin_inff());
}

/* Largest of row[from, to) (fp32 or bf16: `bf16` a constant where inlined); -inf when empty. */
static inline __attribute__((always_inline)) float span_max_t(const void *row, int bf16, int64_t from, int64_t to) {
    v16 m0 = (v16){0} - __builtin_inff(), m1 = m0, m2 = m0, m3 = m0; /* four chains: 1.5x one */
    int64_t j = from;
    for (; j + 64 <= to; j += 64) {
        m0 = vmax(m0, row_load(row, bf16, j, 16));
        m1 = vmax(m1, row_load(row, bf16, j + 16, 16));
        m2 = vmax(m2, row_load(row, bf16, j + 32, 16));
        m3 = vmax(m3, row_load(row, bf16, j + 48, 16));
    }
    m0 = vmax(vmax(m0, m1), vmax(m2, m3));
    for (; j + 16 <= to; j += 16) m0 = vmax(m0, row_load(row, bf16, j, 16));
    if (j < to) m0 = vmax(m0, score_load(row, bf16, j, to - j));
    return hmax(m0);
}

static float span_max(const void *row, int bf16, int64_t from, int64_t to) {
    return bf16 ? span_max_t(row, 1, from, to) : span_max_t(row, 0, from, to);
}

#if defined(__AVX512BF16__) && defined(__x86_64__)
#include <immintrin.h>
/* 16 probabilities to bf16 with the CPU's conversion (round to nearest even; one instruction instead of
   `put16`'s ten; it flushes results below bf16's normal range, ~1e-38, to zero). */
static inline void put16_prob(void *out, int bf16, int64_t i, v16 v, int64_t count) {
    if (!bf16 || count < 16) {
        put16(out, bf16, i, v, count);
        return;
    }
    __m512 x;
    memcpy(&x, &v, sizeof x);
    __m256bh h = _mm512_cvtneps_pbh(x);
    memcpy((uint16_t *)out + i, &h, sizeof h);
}
#else
#define put16_prob put16
#endif

/* row[j] = 2^(scale * row[j] - m) for j in [from, to), in place (bf16 rounded to nearest even); returns
   the sum of the fp32 values (before rounding). */
static inline __attribute__((always_inline)) float span_exp2_t(void *row, int bf16, int64_t from, int64_t to,
                                                               float scale, float m) {
    v16 acc = {0};
    int64_t j = from;
    for (; j + 16 <= to; j += 16) {
        v16 p = vexp2(row_load(row, bf16, j, 16) * scale - m);
        acc += p;
        put16_prob(row, bf16, j, p, 16);
    }
    if (j < to) {
        v16 p = vexp2(score_load(row, bf16, j, to - j) * scale - m);
        acc += p;
        put16_prob(row, bf16, j, p, to - j);
    }
    return hsum(acc);
}

static float span_exp2(void *row, int bf16, int64_t from, int64_t to, float scale, float m) {
    return bf16 ? span_exp2_t(row, 1, from, to, scale, m) : span_exp2_t(row, 0, from, to, scale, m);
}

static inline void span_zero(void *row, int bf16, int64_t from, int64_t to) {
    if (to > from) memset((char *)row + from * (bf16 ? 2 : 4), 0, (size_t)(to - from) * (bf16 ? 2 : 4));
}

/* One online-softmax step of a dense prefill tile, rows [r0, r1) of s [R, J] (row stride lds, fp32 or
   bf16, log2-unit scores), in place: row r sees columns [0, min(J, off + r)) (the causal limit); then
   m_new = max(m[r], row max), p = 2^(s - m_new) (0 past the limit), corr[r] = 2^(m[r] - m_new),
   l[r] = l[r] corr[r] + sum p, m[r] = m_new (`lc2_scale_add` then folds P.V into the running output). A
   row that has seen nothing yet keeps m = -inf, l = 0 and gets zeros. */
void lc2_softmax_tile(void *s, int bf16, int64_t r0, int64_t r1, int64_t J, int64_t lds, int64_t off, float *m,
                      float *l, float *corr) {
    const size_t es = bf16 ? 2 : 4;
    for (int64_t r = r0; r < r1; r++) {
        void *row = (char *)s + (size_t)(r * lds) * es;
        int64_t lim = off + r < J ? off + r : J;
        if (lim < 0) lim = 0;
        float mo = m[r];
        float mx = span_max(row, bf16, 0, lim);
        float mn = mx > mo ? mx : mo;
        span_zero(row, bf16, lim, J);
        corr[r] = 1.0f;
        if (mn == -__builtin_inff()) {
            span_zero(row, bf16, 0, lim);
            continue;
        }
        float sum = span_exp2(row, bf16, 0, lim, 1.0f, mn);
        corr[r] = exp2_1(mo - mn);
        l[r] = l[r] * corr[r] + sum;
        m[r] = mn;
    }
}

/* acc[r] = acc[r] * corr[r] + x[r] for rows [r0, r1): acc fp32 (row stride lda), x fp32 or bf16 (row
   stride ldx), vc columns. */
void lc2_scale_add(float *acc, int64_t lda, const float *corr, const void *x, int bf16, int64_t ldx, int64_t r0,
                   int64_t r1, int64_t vc) {
    for (int64_t r = r0; r < r1; r++) {
        float *a = acc + r * lda;
        const void *xr = (const char *)x + (size_t)(r * ldx) * (bf16 ? 2 : 4);
        const float c = corr[r];
        int64_t j = 0;
        for (; j + 16 <= vc; j += 16) vstore(a + j, vload(a + j) * c + row_load(xr, bf16, j, 16));
        for (; j < vc; j++) a[j] = a[j] * c + elem_load(xr, bf16, j);
    }
}

/* Indexer scores from a tile of dot products, rows [r0, r1): out[r, j] = sum_hh w[r, hh] max(0, dots[r, hh, j])
   for j < n; dots [rows, h, n] fp32 or bf16 (`bf16` a constant where inlined) contiguous, w [rows, h], out
   rows ldo apart. One pass over the tile (as PyTorch ops: ReLU, weight and a strided head sum, three).
   err (optional, rows ldo apart too): sum_hh |w[r, hh]| |dots[r, hh, j]| (the two-pass scan's error bound). */
static inline __attribute__((always_inline)) void relu_wsum_t(const void *dots, int bf16, int64_t r0, int64_t r1,
                                                              int64_t h, int64_t n, const float *w, float *out,
                                                              float *err, int64_t ldo) {
    const v16 zero = {0};
    const vi16 absmask = (vi16){0} + 0x7FFFFFFF;
    const size_t es = bf16 ? 2 : 4;
    for (int64_t r = r0; r < r1; r++) {
        const char *dr = (const char *)dots + (size_t)(r * h * n) * es;
        const float *wr = w + r * h;
        float *o = out + r * ldo;
        int64_t j = 0;
        if (err == NULL) {
            for (; j + 64 <= n; j += 64) {
                v16 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                for (int64_t hh = 0; hh < h; hh++) {
                    const void *d = dr + (size_t)(hh * n) * es;
                    const float wh = wr[hh];
                    a0 += vmax(row_load(d, bf16, j, 16), zero) * wh;
                    a1 += vmax(row_load(d, bf16, j + 16, 16), zero) * wh;
                    a2 += vmax(row_load(d, bf16, j + 32, 16), zero) * wh;
                    a3 += vmax(row_load(d, bf16, j + 48, 16), zero) * wh;
                }
                vstore(o + j, a0);
                vstore(o + j + 16, a1);
                vstore(o + j + 32, a2);
                vstore(o + j + 48, a3);
            }
        }
        for (; j < n; j += 16) {
            v16 a = zero, e = zero;
            for (int64_t hh = 0; hh < h; hh++) {
                v16 d = row_load(dr + (size_t)(hh * n) * es, bf16, j, n - j);
                a += vmax(d, zero) * wr[hh];
                e += (v16)((vi16)d & absmask) * __builtin_fabsf(wr[hh]);
            }
            put16(o, 0, j, a, n - j);
            if (err != NULL) put16(err + r * ldo, 0, j, e, n - j);
        }
    }
}

void lc2_relu_wsum(const void *dots, int bf16, int64_t r0, int64_t r1, int64_t h, int64_t n, const float *w,
                   float *out, float *err, int64_t ldo) {
    if (bf16) relu_wsum_t(dots, 1, r0, r1, h, n, w, out, err, ldo);
    else relu_wsum_t(dots, 0, r0, r1, h, n, w, out, err, ldo);
}

/* Exact indexer scores of marked keys (the two-pass scan's second pass), rows [t0, t1): for j <= limit[t]
   with cand[t, j], scores[t, j] = sum_hh w[t, hh] max(0, q[t, hh] . pool[pool_row[j]]) in fp32. qt [T, d, hp]:
   each row's queries transposed, heads zero-padded to hp (a multiple of 16); w [T, hp] likewise; pool rows
   ldp elements apart, fp32 or bf16. A key's d values are broadcast against the row's [d, hp] queries (hp / 16
   vectors of FMAs per value, one lane sum per key). */
void lc2_rescore(const float *qt, const float *w, int64_t hp, int64_t d, const void *pool, int bf16, int64_t ldp,
                 const int64_t *pool_row, const uint8_t *cand, int64_t R, const int64_t *limit, float *scores,
                 int64_t t0, int64_t t1) {
    const int64_t nv = hp / 16;
    const v16 zero = {0};
    const size_t es = bf16 ? 2 : 4;
    for (int64_t t = t0; t < t1; t++) {
        const float *qr = qt + t * d * hp;
        const uint8_t *ct = cand + t * R;
        float *st = scores + t * R;
        const int64_t last = limit[t] < R - 1 ? limit[t] : R - 1;
        int64_t j = 0;
        while (j <= last) {
            int64_t js[4], nk = 0; /* up to 4 marked keys: 4 x (up to 4) independent FMA chains */
            for (; j <= last && nk < 4; j++)
                if (ct[j]) js[nk++] = j;
            if (nk == 0) break;
            const char *kp[4];
            for (int k = 0; k < 4; k++) kp[k] = (const char *)pool + (size_t)(pool_row[js[k < nk ? k : 0]] * ldp) * es;
            float tot[4] = {0, 0, 0, 0};
            for (int64_t v0 = 0; v0 < nv; v0 += 4) { /* up to 64 heads per pass */
                const int64_t nb = nv - v0 < 4 ? nv - v0 : 4;
                v16 acc[4][4];
                for (int k = 0; k < 4; k++)
                    for (int b = 0; b < 4; b++) acc[k][b] = zero;
                for (int64_t e = 0; e < d; e++) {
                    float kv[4];
                    for (int k = 0; k < 4; k++) kv[k] = elem_load(kp[k], bf16, e);
                    const float *qe = qr + e * hp + v0 * 16;
                    for (int b = 0; b < nb; b++) {
                        v16 qv = vload(qe + 16 * b);
                        KEEP1(qv); /* (loaded once for the 4 keys) */
                        for (int k = 0; k < 4; k++) acc[k][b] += kv[k] * qv;
                    }
                }
                for (int k = 0; k < 4; k++) {
                    v16 sum = zero;
                    for (int b = 0; b < nb; b++) sum += vmax(acc[k][b], zero) * vload(w + t * hp + (v0 + b) * 16);
                    tot[k] += hsum(sum);
                }
            }
            for (int k = 0; k < nk; k++) st[js[k]] = tot[k];
        }
    }
}

/* Softmax numerators of LSA prefill rows [i0, i1) (windowed path), in place, for h heads each: a row's
   window scores sw [n, h, W] (row i sees the sink columns [0, init) and its band [init + i, init + i +
   local)) and its dynamic picks' scores sd [n, h, kd] (NULL: none; slots [n, kd], -1 = empty, left out),
   one softmax over both: p = 2^(scale s - m) with m the scaled max, 0 where not seen; l[i, hh] = sum p,
   m_out[i, hh] = m when given. A row with nothing seen: zeros, m = -inf, l = 0. */
void lc2_softmax_window(void *sw, void *sd, int bf16, int64_t i0, int64_t i1, int64_t h, int64_t W, int64_t kd,
                        float scale, int64_t init, int64_t local, const int64_t *slots, float *m_out,
                        float *l_out) {
    const size_t es = bf16 ? 2 : 4;
    const float ninf = -__builtin_inff();
    const uint16_t bninf = 0xFF80u;
    for (int64_t i = i0; i < i1; i++) {
        int64_t sink = init < W ? init : W;
        int64_t b0 = init + i < W ? init + i : W, b1 = init + i + local < W ? init + i + local : W;
        if (sd != NULL && slots != NULL) { /* empty picks: -inf in place */
            const int64_t *si = slots + i * kd;
            for (int64_t j = 0; j < kd; j++) {
                if (si[j] >= 0) continue;
                for (int64_t hh = 0; hh < h; hh++) {
                    char *at = (char *)sd + (size_t)((i * h + hh) * kd + j) * es;
                    if (bf16) memcpy(at, &bninf, 2); else memcpy(at, &ninf, 4);
                }
            }
        }
        for (int64_t hh = 0; hh < h; hh++) {
            void *rw = (char *)sw + (size_t)((i * h + hh) * W) * es;
            void *rd = sd != NULL ? (char *)sd + (size_t)((i * h + hh) * kd) * es : NULL;
            float mx = span_max(rw, bf16, 0, sink), t = span_max(rw, bf16, b0, b1);
            mx = t > mx ? t : mx;
            if (rd != NULL) {
                t = span_max(rd, bf16, 0, kd);
                mx = t > mx ? t : mx;
            }
            span_zero(rw, bf16, sink, b0);
            span_zero(rw, bf16, b1, W);
            if (mx == ninf) {
                span_zero(rw, bf16, 0, W);
                if (rd != NULL) span_zero(rd, bf16, 0, kd);
                l_out[i * h + hh] = 0.0f;
                if (m_out != NULL) m_out[i * h + hh] = ninf;
                continue;
            }
            float mn = mx * scale;
            float sum = span_exp2(rw, bf16, 0, sink, scale, mn) + span_exp2(rw, bf16, b0, b1, scale, mn);
            if (rd != NULL) sum += span_exp2(rd, bf16, 0, kd, scale, mn);
            l_out[i * h + hh] = sum;
            if (m_out != NULL) m_out[i * h + hh] = mn;
        }
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99", "-Wno-psabi"]
_MIN_ROWS_PER_THREAD = 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_off = False
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    env = os.environ.get("LONGCAT2_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "longcat2"


def _writable_dir() -> Path:
    """The cache directory's `native/`, or a per-user one under the temp dir where it cannot be written
    (a read-only home, as some CI sandboxes have)."""
    for base in (_cache_dir(), Path(tempfile.gettempdir()) / f"longcat2-{os.getuid()}"):
        out_dir = base / "native"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if os.access(out_dir, os.W_OK):
                return out_dir
        except OSError:
            continue
    raise OSError("no writable directory for the compiled kernels")


def _cpu_signature() -> str:
    """The CPU's feature flags (Linux), else the platform's processor string: -march=native depends on them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def tuned_for_this_cpu() -> bool:
    """Whether these kernels are tuned for this CPU: x86 with AVX-512, where a 16-float vector is one
    register. Their register tiles hold 16-24 such vectors; with AVX2 each is two registers, the tiles
    spill, and the kernels ran slower than the PyTorch ops (the embedded model's 29K prefill built for
    AVX2 on this box: 50.3 CPU s against 18.5 without the kernels and 7.9 with the AVX-512 build)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _build() -> ctypes.CDLL | None:
    mode = os.environ.get("LONGCAT2_NATIVE", "auto")
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"LONGCAT2_NATIVE: '0', '1' or 'auto', got {mode!r}")
    if mode == "0" or os.name != "posix" or (mode == "auto" and not tuned_for_this_cpu()):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        tag = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), version, _cpu_signature()]).encode())
        out_dir = _writable_dir()
        lib_path = out_dir / f"lc2_{tag.hexdigest()[:20]}.so"
        if not lib_path.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                src = Path(tmp) / "lc2.c"
                src.write_text(_SOURCE)
                tmp_lib = Path(tmp) / "lc2.so"
                res = subprocess.run(
                    [cc, *_FLAGS, "-o", str(tmp_lib), str(src)], capture_output=True, text=True, timeout=120
                )
                if res.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:500]}")
                os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never load a partial file
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"longcat2: compiled CPU kernels unavailable, using PyTorch ops ({e})", stacklevel=3)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lc2_select_topk.restype = i64
    lib.lc2_select_topk.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, p]
    lib.lc2_index_scores.restype = None
    lib.lc2_index_scores.argtypes = [p, p, i64, i64, i64, p, i64, ctypes.c_int, i64, p, i64, p]
    lib.lc2_index_scores_wide.restype = None
    lib.lc2_index_scores_wide.argtypes = [p, p, i64, i64, i64, p, i64, ctypes.c_int, i64, p, i64, p, p]
    lib.lc2_pv_rows.restype = None
    lib.lc2_pv_rows.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, p, ctypes.c_int]
    lib.lc2_slot_attention.restype = None
    lib.lc2_slot_attention.argtypes = [p, i64, i64, i64, i64, p, i64, p, i64, ctypes.c_float, p, p, p]
    lib.lc2_heads_linear.restype = None
    lib.lc2_heads_linear.argtypes = [p, i64, i64, i64, p, ctypes.c_int, ctypes.c_int, i64, i64, i64, i64, p]
    lib.lc2_heads_linear.argtypes += [ctypes.c_int, i64, i64, i64, i64, i64, i64]
    lib.lc2_softmax_tile.restype = None
    lib.lc2_softmax_tile.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, i64, p, p, p]
    lib.lc2_relu_wsum.restype = None
    lib.lc2_relu_wsum.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, p, p, p, i64]
    lib.lc2_rescore.restype = None
    lib.lc2_rescore.argtypes = [p, p, i64, i64, p, ctypes.c_int, i64, p, p, i64, p, p, i64, i64]
    lib.lc2_scale_add.restype = None
    lib.lc2_scale_add.argtypes = [p, i64, p, p, ctypes.c_int, i64, i64, i64, i64]
    lib.lc2_softmax_window.restype = None
    lib.lc2_softmax_window.argtypes = [p, p, ctypes.c_int, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64]
    lib.lc2_softmax_window.argtypes += [p, p, p]
    lib.lc2_slot_attend.restype = None
    lib.lc2_slot_attend.argtypes = [
        p,
        i64,
        i64,
        i64,
        i64,
        p,
        i64,
        ctypes.c_int,
        p,
        i64,
        ctypes.c_float,
        p,
        p,
        p,
        p,
    ]
    lib.lc2_experts.restype = None
    lib.lc2_experts.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_int, p, p, i64, i64]
    lib.lc2_run_attend_segs.restype = None
    lib.lc2_run_attend_segs.argtypes = [
        p,
        i64,
        i64,
        i64,
        p,
        p,
        p,
        p,
        p,
        p,
        i64,
        ctypes.c_int,
        p,
        ctypes.c_int,
    ]
    lib.lc2_run_attend_segs.argtypes += [p, i64, i64]
    return lib


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every kernel here declines, so the PyTorch paths run (tests compare the two)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None where they cannot be or should not be (no compiler,
    not POSIX, a CPU they are not tuned for unless LONGCAT2_NATIVE=1, LONGCAT2_NATIVE=0, a failed build,
    inside `disabled()`)."""
    global _lib, _tried
    if _off:
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < n:  # noqa: SLF001 (grow only)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="longcat2-native")
        return _pool


def _over_rows(n: int, run: Callable[[int, int], T], min_rows: int = _MIN_ROWS_PER_THREAD) -> list[T]:
    """run(r0, r1) over contiguous row ranges covering 0 .. n-1: one per thread of
    `torch.get_num_threads()`, at least `min_rows` rows each (ctypes releases the GIL). → their results."""
    if n == 0:
        return []
    n_threads = max(1, min(torch.get_num_threads(), n // min_rows))
    bounds = [n * i // n_threads for i in range(n_threads + 1)]
    if n_threads == 1:
        return [run(0, n)]
    return list(_executor(n_threads).map(run, bounds[:-1], bounds[1:]))


def select_topk(scores: torch.Tensor, kd: int, limit: torch.Tensor | None = None) -> torch.Tensor | None:
    """`kernels.select_dynamic` (with `lsa_rows`' candidate limit) in C: scores [T, R] fp32 CPU, unit
    column stride; limit [T] (optional): row t's candidates are columns 0 .. limit[t]. → columns of the
    kd selected keys per row [T, kd] ascending, or None where the kernel does not apply (not built, another
    dtype/device/layout, a row with fewer than kd candidates or whose kd-th score is -inf): the caller
    takes the PyTorch path."""
    lib = library()
    if (
        lib is None
        or kd <= 0
        or scores.dim() != 2
        or scores.dtype != torch.float32
        or scores.device.type != "cpu"
        or scores.stride(1) != 1
        or scores.shape[1] >= 2**31
    ):
        return None
    t, r = scores.shape
    out = torch.empty(t, kd, dtype=torch.int64)
    lim = None
    if limit is not None:
        lim = limit.to(device="cpu", dtype=torch.int64).contiguous()

    def run(r0: int, r1: int) -> int:
        keys = torch.empty(r, dtype=torch.int32)  # uint32 keys (bit patterns)
        cand = torch.empty(r, dtype=torch.int32)
        return lib.lc2_select_topk(
            scores.data_ptr(),
            r0,
            r1,
            r,
            scores.stride(0),
            lim.data_ptr() if lim is not None else None,
            kd,
            out.data_ptr(),
            keys.data_ptr(),
            cand.data_ptr(),
        )

    if any(failed >= 0 for failed in _over_rows(t, run)):
        return None
    return out


SCAN_MAX_DIM = 32
"""Head dims up to which `index_scores` runs any number of rows (keys transposed into L1 blocks, each
query vector meets 128 keys per register tile); beyond, the wide-head kernel for a few rows."""
WIDE_SCAN_MAX_ROWS = 4
"""Rows up to which the wide-head scan (each row re-reads the keys) runs; more take a GEMM."""
WIDE_SCAN_MIN_KEYS = 2048
"""Keys per thread at least, when the wide-head scan splits a few rows' keys over the threads."""


def _scan_keys_ok(keys: torch.Tensor) -> bool:
    """Keys the scan kernels read in place: fp32 or bf16 on CPU, unit column stride."""
    return (
        keys.dtype in (torch.float32, torch.bfloat16) and keys.device.type == "cpu" and keys.stride(-1) == 1
    )


def _scan_kernel(lib: ctypes.CDLL, rows: int, h: int, d: int) -> tuple[Callable[..., None], tuple[int, ...]]:
    """The scan kernel for `rows` query rows of h x d heads and the sizes of its fp32 scratch buffers: the
    wide-head one (the rows' queries transposed, [d, h] each; a widened / padded tile of keys) beyond
    SCAN_MAX_DIM, else the narrow one (a transposed block of keys)."""
    if d > SCAN_MAX_DIM:
        return lib.lc2_index_scores_wide, (rows * d * h, 16 * d + 16)
    return lib.lc2_index_scores, (d * 256,)


def _scan_piece(
    kernel: Callable[..., None],
    bufs: list[torch.Tensor],
    qf: torch.Tensor,
    wf: torch.Tensor,
    keys: torch.Tensor,
    out_row: torch.Tensor,
    out_ld: int,
) -> None:
    """One run of keys scored by `kernel` for the rows of qf [T, h, d] / wf [T, h] (contiguous fp32) into
    out_row (the first row's first column of the run; rows out_ld apart)."""
    if keys.shape[0]:
        t, h, d = qf.shape
        kernel(
            qf.data_ptr(), wf.data_ptr(), t, h, d, keys.data_ptr(), keys.stride(0),
            int(keys.dtype == torch.bfloat16), keys.shape[0], out_row.data_ptr(), out_ld,
            *(b.data_ptr() for b in bufs),
        )  # fmt: skip


def index_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    pieces: list[tuple[int, torch.Tensor]],
    start: int,
    end: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`kernels.index_scan` in C: q [T, h, d], w [T, h], pieces = [(first position, keys [n, d])] covering
    [start, end), fp32 or bf16 keys with unit column stride, on CPU; out: an fp32 [T, end - start] buffer
    with unit column stride (fresh when None). Narrow heads (d <= SCAN_MAX_DIM) any number of rows; wide
    ones (h a multiple of 16 up to 64) up to WIDE_SCAN_MAX_ROWS rows, each re-reading the keys (beyond,
    a GEMM reads them once for all rows). → scores, or None where the kernel does not apply."""
    lib = library()
    if lib is None or q.device.type != "cpu" or q.dim() != 3:
        return None
    t, h, d = q.shape
    wide = d > SCAN_MAX_DIM
    if wide and (h % 16 != 0 or h > 64 or t > WIDE_SCAN_MAX_ROWS):
        return None
    if not all(_scan_keys_ok(keys) for _, keys in pieces):
        return None
    if out is None:
        out = torch.empty(t, end - start, dtype=torch.float32)
    if out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != (t, end - start):
        return None
    qf = q.float().contiguous()  # [T, h, d]
    wf = w.float().reshape(t, h).contiguous()  # [T, h]

    def run(r0: int, r1: int, parts: list[tuple[int, torch.Tensor]]) -> None:
        kernel, scratch = _scan_kernel(lib, r1 - r0, h, d)
        bufs = [torch.empty(n, dtype=torch.float32) for n in scratch]
        for pos, keys in parts:
            _scan_piece(kernel, bufs, qf[r0:r1], wf[r0:r1], keys, out[r0, pos - start :], out.stride(0))

    if wide and (n_threads := min(torch.get_num_threads(), (end - start) // WIDE_SCAN_MIN_KEYS)) > 1:
        groups = _split_keys(pieces, n_threads)  # a decode row: its keys split over the threads
        list(_executor(len(groups)).map(lambda g: run(0, t, g), groups))
    else:
        _over_rows(t, lambda r0, r1: run(r0, r1, pieces))
    return out


def index_scores_rows(
    q: torch.Tensor,
    w: torch.Tensor,
    row_pieces: list[list[tuple[int, torch.Tensor]]],
    start: int,
    out: torch.Tensor,
) -> torch.Tensor | None:
    """`index_scores` for R rows that each have keys of their own (a decode step's rows of different
    sequences): q [R, h, d], w [R, h], row i's pieces [(first position, keys [n, d])] scored into
    out[i, pos - start :] (fp32 [R, W], unit column stride); columns past a row's pieces are left as they
    are. One call for the step's rows, split over the threads by rows (each row's work is ~60 MFLOP at
    LongCat-2.0's 32 x 128 and 8K keys), where per-row calls of `index_scores` cost ~50 µs of Python each.
    → out, or None where the kernel does not apply."""
    lib = library()
    if lib is None or q.device.type != "cpu" or q.dim() != 3 or len(row_pieces) != q.shape[0]:
        return None
    r, h, d = q.shape
    if d > SCAN_MAX_DIM and (h % 16 != 0 or h > 64):
        return None
    if out.dtype != torch.float32 or out.stride(1) != 1 or out.shape[0] != r:
        return None
    if not all(
        _scan_keys_ok(keys) and start <= pos and pos - start + keys.shape[0] <= out.shape[1]
        for pieces in row_pieces
        for pos, keys in pieces
    ):
        return None
    qf = q.float().contiguous()  # [R, h, d]
    wf = w.float().reshape(r, h).contiguous()  # [R, h]
    kernel, scratch = _scan_kernel(lib, 1, h, d)

    def run(r0: int, r1: int) -> None:
        bufs = [torch.empty(n, dtype=torch.float32) for n in scratch]
        for i in range(r0, r1):
            for pos, keys in row_pieces[i]:
                _scan_piece(
                    kernel, bufs, qf[i : i + 1], wf[i : i + 1], keys, out[i, pos - start :], out.stride(0)
                )

    _over_rows(r, run, min_rows=1)
    return out


def _split_keys(pieces: list[tuple[int, torch.Tensor]], parts: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Runs of keys [(first position, keys)] cut into `parts` groups of about equal key counts."""
    per = -(-sum(k.shape[0] for _, k in pieces) // parts)
    groups: list[list[tuple[int, torch.Tensor]]] = [[]]
    room = per
    for pos, keys in pieces:
        o = 0
        while o < keys.shape[0]:
            if room == 0:
                groups.append([])
                room = per
            m = min(room, keys.shape[0] - o)
            groups[-1].append((pos + o, keys[o : o + m]))
            o, room = o + m, room - m
    return groups


def slot_attend(
    q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, latent_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's attention over its own gathered keys, read in place (no gathered copy): q [n, h, D]
    (latent | rope query), pool [P, >= D] fp32/bf16 (latent | rope keys), slots [n, kd] (-1 = empty),
    scores = scale · q·k in log2 units. → (o [n, h, latent_dim], m [n, h], l [n, h]) fp32: the
    unnormalised softmax block (o / l is the attention; m and l merge it with other key blocks). None
    where the kernel does not apply (not built, not CPU, another dtype or layout)."""
    lib = library()
    if (
        lib is None
        or q.device.type != "cpu"
        or pool.device.type != "cpu"
        or pool.dtype not in (torch.float32, torch.bfloat16)
        or pool.stride(1) != 1
        or pool.shape[1] < q.shape[-1]
    ):
        return None
    n, h, dim = q.shape
    qf = q.float().contiguous()
    sl = slots.to(torch.int64).contiguous()
    kd = sl.shape[1]
    o = torch.empty(n, h, latent_dim, dtype=torch.float32)
    m = torch.empty(n, h, dtype=torch.float32)
    l_sum = torch.empty(n, h, dtype=torch.float32)

    def run(r0: int, r1: int) -> None:
        ws = torch.empty(h * max(kd, 1), dtype=torch.float32)  # one row's scores / probabilities
        lib.lc2_slot_attend(
            qf[r0].data_ptr(),
            r1 - r0,
            h,
            dim,
            latent_dim,
            pool.data_ptr(),
            pool.stride(0),
            int(pool.dtype == torch.bfloat16),
            sl[r0].data_ptr(),
            kd,
            scale,
            o[r0].data_ptr(),
            m[r0].data_ptr(),
            l_sum[r0].data_ptr(),
            ws.data_ptr(),
        )

    _over_rows(n, run)
    return o, m, l_sum


def _softmax_ok(lib: ctypes.CDLL | None, *scores: torch.Tensor) -> bool:
    return lib is not None and all(
        s.device.type == "cpu" and s.dtype in (torch.float32, torch.bfloat16) and s.is_contiguous()
        for s in scores
    )


def softmax_tile(
    scores: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, corr: torch.Tensor, offset: int
) -> bool:
    """One online-softmax step of a dense prefill tile in place (`kernels.dense_prefill_onednn`): scores
    [R, J] (fp32 or bf16, log2 units; row r sees columns < offset + r) become the numerators 2^(s - m_new)
    in their own dtype (0 where not seen); m, l_sum [R, 1] (running max and sum, fp32) are updated and
    corr [R] (fp32) gets each row's rescale 2^(m - m_new) for `scale_add`. → False where the kernel does
    not apply (the caller's PyTorch passes run)."""
    lib = library()
    if (
        not _softmax_ok(lib, scores)
        or scores.dim() != 2
        or any(t.dtype != torch.float32 or t.stride(0) != 1 for t in (m, l_sum, corr))
    ):
        return False
    rows, width = scores.shape
    bf16 = int(scores.dtype == torch.bfloat16)

    def run(r0: int, r1: int) -> None:
        lib.lc2_softmax_tile(
            scores.data_ptr(),
            bf16,
            r0,
            r1,
            width,
            width,
            offset,
            m.data_ptr(),
            l_sum.data_ptr(),
            corr.data_ptr(),
        )

    _over_rows(rows, run)
    return True


def scale_add(acc: torch.Tensor, corr: torch.Tensor, x: torch.Tensor) -> bool:
    """acc = acc * corr[:, None] + x in one pass (the online softmax's output update): acc [R, v] fp32, corr
    [R] fp32, x [R, v] fp32 or bf16, unit column strides, CPU. → False where the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or acc.dtype != torch.float32
        or corr.dtype != torch.float32
        or x.dtype not in (torch.float32, torch.bfloat16)
        or acc.stride(1) != 1
        or x.stride(1) != 1
        or corr.stride(0) != 1
        or acc.shape != x.shape
        or any(t.device.type != "cpu" for t in (acc, corr, x))
    ):
        return False
    rows, cols = acc.shape

    def run(r0: int, r1: int) -> None:
        lib.lc2_scale_add(
            acc.data_ptr(),
            acc.stride(0),
            corr.data_ptr(),
            x.data_ptr(),
            int(x.dtype == torch.bfloat16),
            x.stride(0),
            r0,
            r1,
            cols,
        )

    _over_rows(rows, run)
    return True


def relu_wsum(
    dots: torch.Tensor, w: torch.Tensor, out: torch.Tensor, err: torch.Tensor | None = None
) -> bool:
    """Indexer scores from a tile of dot products in one pass (`kernels.index_scan_torch`'s prefill tiles):
    out[r, j] = Σ_h w[r, h] · ReLU(dots[r, h, j]); dots [rows, h, n] fp32 or bf16 contiguous, w [rows, h]
    fp32, out [rows, n] fp32 with unit column stride (a view into the scan's score buffer); err (optional,
    out's shape and strides): Σ_h |w[r, h]| · |dots[r, h, j]|. → False where the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or dots.dim() != 3
        or dots.dtype not in (torch.float32, torch.bfloat16)
        or any(x.dtype != torch.float32 for x in (w, out))
        or any(x.device.type != "cpu" for x in (dots, w, out))
        or not dots.is_contiguous()
        or w.shape != dots.shape[:2]
        or out.shape != (dots.shape[0], dots.shape[2])
        or out.stride(1) != 1
        or (
            err is not None
            and (err.dtype != torch.float32 or err.stride() != out.stride() or err.shape != out.shape)
        )
    ):
        return False
    rows, h, n = dots.shape
    wc = w.contiguous()

    def run(r0: int, r1: int) -> None:
        bf16 = int(dots.dtype == torch.bfloat16)
        lib.lc2_relu_wsum(
            dots.data_ptr(), bf16, r0, r1, h, n, wc.data_ptr(), out.data_ptr(),
            None if err is None else err.data_ptr(), out.stride(0),
        )  # fmt: skip

    _over_rows(rows, run, min_rows=1)
    return True


def rescore(
    q: torch.Tensor,
    w: torch.Tensor,
    pool: torch.Tensor,
    pool_row: torch.Tensor,
    cand: torch.Tensor,
    limit: torch.Tensor,
    scores: torch.Tensor,
) -> bool:
    """Exact indexer scores of the marked keys in place (`kernels.index_scan_bf16_rows`' second pass):
    scores[t, j] = Σ_h w[t, h] · ReLU(q[t, h] · pool[pool_row[j]]) in fp32 for j <= limit[t] with
    cand[t, j]; q [T, h, d], w [T, h], pool [P, d] fp32 / bf16 (unit column stride), pool_row [R],
    cand [T, R] bool, limit [T], scores [T, R] fp32 contiguous. → False where the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or pool.dtype not in (torch.float32, torch.bfloat16)
        or pool.stride(1) != 1
        or scores.dtype != torch.float32
        or not scores.is_contiguous()
        or cand.dtype != torch.bool
        or cand.shape != scores.shape
        or any(x.device.type != "cpu" for x in (q, w, pool, pool_row, cand, limit, scores))
    ):
        return False
    t, h, d = q.shape
    hp = -(-h // 16) * 16
    qt = torch.zeros(t, d, hp, dtype=torch.float32)
    qt[..., :h] = q.float().transpose(1, 2)
    wp = torch.zeros(t, hp, dtype=torch.float32)
    wp[:, :h] = w.float()
    rows = pool_row.to(torch.int64).contiguous()
    lim = limit.to(torch.int64).contiguous()
    cc = cand.contiguous()

    def run(t0: int, t1: int) -> None:
        lib.lc2_rescore(
            qt.data_ptr(), wp.data_ptr(), hp, d, pool.data_ptr(), int(pool.dtype == torch.bfloat16),
            pool.stride(0), rows.data_ptr(), cc.data_ptr(), scores.shape[1], lim.data_ptr(),
            scores.data_ptr(), t0, t1,
        )  # fmt: skip

    _over_rows(t, run, min_rows=1)
    return True


def softmax_window(
    s_w: torch.Tensor,
    s_d: torch.Tensor | None,
    slots: torch.Tensor | None,
    init: int,
    local: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax numerators of a block of windowed LSA rows in place (`kernels.window_attention`): s_w
    [n, h, W] window scores (row i sees columns [0, init) and [init + i, init + i + local)), s_d
    [n, h, kd] its dynamic picks' scores or None, slots [n, kd] (-1 = empty, left out) or None; fp32 or
    bf16 (one dtype), p = 2^(scale·s - m) with m the row's scaled max over both parts. → (m, l) [n, h]
    fp32 (l = Σ p), or None where the kernel does not apply."""
    lib = library()
    parts = (s_w,) if s_d is None else (s_w, s_d)
    if not _softmax_ok(lib, *parts) or s_w.dim() != 3 or (s_d is not None and s_d.dtype != s_w.dtype):
        return None
    n, h, width = s_w.shape
    kd = 0 if s_d is None else s_d.shape[-1]
    sl = None if slots is None or s_d is None else slots.to(torch.int64).contiguous()
    m = torch.empty(n, h, dtype=torch.float32)
    l_sum = torch.empty(n, h, dtype=torch.float32)

    def run(r0: int, r1: int) -> None:
        lib.lc2_softmax_window(
            s_w.data_ptr(),
            None if s_d is None else s_d.data_ptr(),
            int(s_w.dtype == torch.bfloat16),
            r0,
            r1,
            h,
            width,
            kd,
            scale,
            init,
            local,
            None if sl is None else sl.data_ptr(),
            m.data_ptr(),
            l_sum.data_ptr(),
        )

    _over_rows(n, run, min_rows=1)
    return m, l_sum


def pv_rows(probs: torch.Tensor, values: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> bool:
    """out [n, h, c] (+)= probs [n, h, K] @ values [n, K, c] per row, fp32 on CPU (values may be a
    column slice of a wider gathered tensor; probs rows and out contiguous). False (out untouched) where
    the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (probs, values, out))
        or probs.dim() != 3
        or probs.stride(2) != 1
        or probs.stride(1) != probs.shape[2]
        or values.stride(-1) != 1
        or not out.is_contiguous()
    ):
        return False
    n, h, k = probs.shape
    c = out.shape[2]

    def run(r0: int, r1: int) -> None:
        lib.lc2_pv_rows(
            probs[r0].data_ptr(),
            r1 - r0,
            h,
            k,
            probs.stride(0),
            values[r0].data_ptr(),
            values.stride(1),
            values.stride(0),
            c,
            out[r0].data_ptr(),
            int(accumulate),
        )

    _over_rows(n, run, min_rows=1)  # rows are large: one per thread is enough
    return True


LINEAR_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 2}
"""Rows up to which `linear` streams the weight faster than oneDNN / the BLAS (session 15 microbenchmarks:
fp32 1.1-1.6x at 1-8 rows; bf16 1.3-1.5x at 1-2 rows, slower beyond, where oneDNN's AVX512-BF16 dot
products compute twice as fast as the widening loads here)."""
LINEAR_BROADCAST_ROWS = frozenset([*range(12, 17), *range(28, 33)])
"""fp32 rows beyond LINEAR_MAX_ROWS that `linear` also takes, with the broadcast tiles (`lc2_nt_bc_min_rows`
in the C source): the rows sit in 16-lane vectors, so they win where they fill those to within 4 lanes
(`bench/linear_rows.py`, cold weights, 1 thread, GFLOP/s C / oneDNN: LongCat-2.0's 1536 x 12288 q_b_proj
97 / 86 at 16 rows, 142 / 108 at 32; its 8192 x 512 o_proj 82 / 73 and 112 / 106). Not at 24 or 40 rows
(a third or a sixth of the lanes idle: 0.75-1.07x), nor from 48, where oneDNN catches up."""
ABSORB_MAX_ROWS = {torch.float32: 64, torch.bfloat16: 2}
"""The same for `absorb` / `unabsorb`: the alternative is a batched GEMM per head, which fp32 runs through
MKL's `bmm` (its AVX2 kernels on AMD CPUs). 64 heads x 128 x 512, cold weights: C / `torch.matmul` 1.55 /
1.73 ms at 8 rows, 2.10 / 3.74 at 32, 3.33 / 6.39 at 64 (absorb; unabsorb alike); bf16 as `linear`."""
LINEAR_MIN_WEIGHT = 1 << 20
"""Weight elements below which a one-row fp32 product declines: a small weight stays in cache between
steps, where the BLAS's lower fixed cost wins (the embedded model's 4096 x 128 LM head: 1.7 % of its decode
step slower through the C call). bf16 products have no floor: a bf16 oneDNN call costs 13-60 µs before it
computes (1-2 rows x 128-4096 x 256: C 12-58 µs, `F.linear` 13-61 µs; the absorbed form's bf16 `bmm`
at 4 heads x 128 x 512: ~59 µs per call)."""
LINEAR_MIN_WEIGHT_ROWS = 1 << 16
"""The same floor for fp32 products of 2+ rows: there MKL's small-M GEMM is the slow one (a 256 x 1024
weight at 8 rows: 41 µs here, 61 through `F.linear`, 51 through oneDNN; the absorbed form of a 4-head
model at 8 rows: 33 vs 78 µs)."""


def linear_worth(rows: int, weight: torch.Tensor, max_rows: dict | None = None) -> bool:
    """Whether a product of `rows` rows with `weight` goes to the C kernels (cheap: checked before the
    call; the kernels check the rest); `max_rows`: LINEAR_MAX_ROWS (and LINEAR_BROADCAST_ROWS), or
    ABSORB_MAX_ROWS for the absorbed form."""
    if rows < 1 or rows > (max_rows or LINEAR_MAX_ROWS).get(weight.dtype, 0):
        if not (max_rows is None and weight.dtype == torch.float32 and rows in LINEAR_BROADCAST_ROWS):
            return False
    if weight.dtype == torch.bfloat16:  # (oneDNN's bf16 call costs more than this at every size)
        return True
    return weight.numel() >= (LINEAR_MIN_WEIGHT_ROWS if rows > 1 else LINEAR_MIN_WEIGHT)


def _weight_ok(w: torch.Tensor) -> bool:
    return (
        w.dtype in (torch.float32, torch.bfloat16)
        and w.device.type == "cpu"
        and type(w) in (torch.nn.Parameter, torch.Tensor)  # (a DTensor shard is not a plain pointer)
        and w.is_contiguous()
    )


def _heads_linear(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    w: torch.Tensor,
    w_offset: int,
    w_row: int,
    w_head: int,
    kn: bool,
    n: int,
    k: int,
    y: torch.Tensor,
) -> None:
    """y[h] = x[h] @ W_h^T (NT: W_h [n, k]) or x[h] @ W_h (KN: W_h [k, n]) for the heads of x [H, M, k] fp32
    and y [H, M, n] (unit last strides); W_h starts at element w_offset + h * w_head of w, rows w_row apart.
    Split over heads, or over output columns when there is one head (NT)."""
    heads, m = x.shape[0], x.shape[1]
    wp = w.data_ptr() + w_offset * w.element_size()

    def run(a: int, b: int, by_heads: bool) -> None:
        h0, h1, n0, n1 = (a, b, 0, n) if by_heads else (0, heads, a, b)
        lib.lc2_heads_linear(
            x.data_ptr(),
            m,
            x.stride(1),
            x.stride(0),
            wp,
            int(w.dtype == torch.bfloat16),
            int(kn),
            w_row,
            w_head,
            n,
            k,
            y.data_ptr(),
            int(y.dtype == torch.bfloat16),
            y.stride(1),
            y.stride(0),
            h0,
            h1,
            n0,
            n1,
        )

    if torch.get_num_threads() == 1:
        run(0, heads, True)
    elif heads > 1 or kn:
        _over_rows(heads, lambda a, b: run(a, b, True), min_rows=8)
    else:  # one weight: each thread streams at least ~1 MB of it
        _over_rows(n, lambda a, b: run(a, b, False), min_rows=max(64, (1 << 18) // max(k, 1)))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] @ weight [N, K]^T for the products `linear_worth` admits (a few decode rows), fp32 or
    bf16 (x and weight of one dtype, no bias), the weight streamed once with fp32 accumulation; bf16
    results rounded to nearest even, as a bf16 GEMM rounds. → [..., N] in x's dtype, or None where the
    kernel does not apply (the caller takes F.linear). The size rule is checked first, so a small layer's
    call costs almost nothing."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not linear_worth(rows, weight):
        return None
    lib = library()
    if (
        lib is None
        or x.dtype != weight.dtype
        or x.device.type != "cpu"
        or weight.dim() != 2
        or not _weight_ok(weight)
        or x.shape[-1] != weight.shape[1]
    ):
        return None
    n, k = weight.shape
    xf = x.reshape(rows, k).float()  # [M, K] (a copy only for bf16 or strided rows)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype)
    if torch.get_num_threads() == 1:  # (a decode step's common call, without `_heads_linear`'s views)
        bf16 = int(weight.dtype == torch.bfloat16)
        lib.lc2_heads_linear(
            xf.data_ptr(), rows, xf.stride(0), 0, weight.data_ptr(), bf16, 0, k, 0, n, k,
            y.data_ptr(), bf16, n, 0, 0, 1, 0, n,
        )  # fmt: skip
    else:
        _heads_linear(lib, xf[None], weight, 0, k, 0, False, n, k, y[None])
    return y.view(*x.shape[:-1], n)


def _kv_b_ok(lib: ctypes.CDLL | None, x: torch.Tensor, kv_b: torch.Tensor) -> bool:
    return (
        lib is not None
        and x.dim() == 3
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and kv_b.dim() == 2
        and _weight_ok(kv_b)
    )


def absorb(q_nope: torch.Tensor, kv_b: torch.Tensor, nope: int, v: int) -> torch.Tensor | None:
    """MLA's absorbed queries read straight from kv_b_proj's weight (no per-head copies): q_nope [T, h,
    nope] (a few decode rows), kv_b [h * (nope + v), c] → q_nope · W_uk per head [T, h, c] in the weight's
    dtype (`MLA.absorb`), or None where the kernel does not apply (`linear_worth` first, as `linear`)."""
    if not linear_worth(q_nope.shape[0], kv_b, ABSORB_MAX_ROWS):
        return None
    lib = library()
    if (
        not _kv_b_ok(lib, q_nope, kv_b)
        or q_nope.shape[2] != nope
        or kv_b.shape[0] != q_nope.shape[1] * (nope + v)
    ):
        return None
    t, h, _ = q_nope.shape
    c = kv_b.shape[1]
    x = q_nope.to(kv_b.dtype).float()  # [T, h, nope] (the model's GEMM takes the weight's dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(t, h, c, dtype=kv_b.dtype)
    _heads_linear(lib, x.transpose(0, 1), kv_b, 0, c, (nope + v) * c, True, c, nope, y.transpose(0, 1))
    return y


def unabsorb(o_latent: torch.Tensor, kv_b: torch.Tensor, nope: int, v: int) -> torch.Tensor | None:
    """Attended latents [T, h, c] → values [T, h * v] through W_uv, read straight from kv_b_proj's weight
    [h * (nope + v), c] (`MLA.unabsorb`), in the weight's dtype; None where the kernel does not apply."""
    if not linear_worth(o_latent.shape[0], kv_b, ABSORB_MAX_ROWS):
        return None
    lib = library()
    if not _kv_b_ok(lib, o_latent, kv_b) or o_latent.shape[2] != kv_b.shape[1]:
        return None
    t, h, c = o_latent.shape
    if kv_b.shape[0] != h * (nope + v):
        return None
    x = o_latent.to(kv_b.dtype).float()  # [T, h, c] (rounded to the weight's dtype first, as the model)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(t, h, v, dtype=kv_b.dtype)
    _heads_linear(lib, x.transpose(0, 1), kv_b, nope * c, c, (nope + v) * c, False, v, c, y.transpose(0, 1))
    return y.view(t, h * v)


SLOT_ATTENTION_KEYS = 64  # SA_KEYS in the C source: keys per block of `slot_attention`


def slot_attention(
    q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, latent_dim: int, scale: float
) -> torch.Tensor | None:
    """Large rows' absorbed attention with their keys read in place from the pool (no gathered copy):
    q [n, h, D] (latent | rope query), pool [P, >= D] (latent | rope keys), slots [n, K] (-1 = empty),
    scores = scale · q·k in log2 units (softmax by exp2). Per row and block of SLOT_ATTENTION_KEYS keys:
    the scores in register tiles, an online softmax, then P·V over the latent columns while the block's
    keys are in cache. fp32 on CPU, h a multiple of 16. → attended latents [n, h, latent_dim] fp32, or
    None where the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, pool))
        or q.dim() != 3
        or q.shape[1] % 16 != 0
        or pool.stride(1) != 1
        or pool.shape[1] < q.shape[2]
        or latent_dim > q.shape[2]
    ):
        return None
    n, h, d = q.shape
    kk = slots.shape[1]
    qc = q.contiguous()  # [n, h, D] (scaled to log2 units in C)
    sl = slots.to(torch.int64).contiguous()
    o = torch.empty(n, h, latent_dim, dtype=torch.float32)

    def run(r0: int, r1: int) -> None:
        ws = torch.empty(h * (SLOT_ATTENTION_KEYS + 3), dtype=torch.float32)  # a block's scores, m, l, alpha
        qt = torch.empty(d * h, dtype=torch.float32)  # one row's queries, transposed
        lib.lc2_slot_attention(
            qc[r0].data_ptr(),
            r1 - r0,
            h,
            d,
            latent_dim,
            pool.data_ptr(),
            pool.stride(0),
            sl[r0].data_ptr(),
            kk,
            scale,
            o[r0].data_ptr(),
            ws.data_ptr(),
            qt.data_ptr(),
        )

    _over_rows(n, run, min_rows=1)
    return o


EXPERTS_MAX_ROWS = {torch.float32: 64, torch.bfloat16: 16}
"""Rows per expert up to which `experts` runs a MoE's routed experts in C (decode: a batch of 1-8 tokens
spreads ~k rows per token over the experts); beyond, the grouped GEMM. Measured on 8 experts of 256 x 128
(the vs-vLLM model), C / `torch._grouped_mm`: fp32 23 / 60 µs at 1 row per expert, 117 / 233 at 8, 702 /
1,044 at 64; bf16 20 / 162 at 1, 163 / 374 at 8, 300 / 398 at 16, 580 / 455 at 32."""


def experts(
    x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor | None:
    """`Experts.forward` for rows sorted by expert (counts[e] rows each), gate / up [E, I, H], down [E, H, I]:
    one C call for every expert's three products and the silu gating, the weights streamed once per
    one or two rows. On CPU `torch._grouped_mm` costs ~100 µs per call at a decode step's few rows (three per
    MoE), this ~10. → [M, H] in the weights' dtype, or None where the kernel does not apply (more than
    EXPERTS_MAX_ROWS rows for an expert, other dtypes or devices, a DTensor shard)."""
    lib = library()
    n_exp = gate.shape[0]
    if (
        lib is None
        or not counts
        or max(counts) > EXPERTS_MAX_ROWS.get(x.dtype, 0)
        or len(counts) != n_exp
        or x.dim() != 2
        or not all(_weight_ok(w) and w.dtype == x.dtype and w.dim() == 3 for w in (gate, up, down))
        or x.device.type != "cpu"
    ):
        return None
    i, h = gate.shape[1], gate.shape[2]
    if up.shape != gate.shape or down.shape != (n_exp, h, i) or x.shape != (sum(counts), h):
        return None
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    offs_a = (ctypes.c_int64 * len(offs))(*offs)
    xf = x.float().contiguous()  # [M, H] (a copy for bf16)
    y = torch.empty(x.shape, dtype=x.dtype)
    per = 2 * max(counts) * i
    busy = [e for e, c in enumerate(counts) if c]
    n_threads = max(1, min(torch.get_num_threads(), len(busy)))
    ws = torch.empty(n_threads * per, dtype=torch.float32)
    wb = int(x.dtype == torch.bfloat16)
    # experts split over the threads by rows: range t covers experts [bounds[t], bounds[t + 1])
    bounds = [0] + [busy[len(busy) * t // n_threads] for t in range(1, n_threads)] + [n_exp]

    def run(t: int) -> None:
        lib.lc2_experts(
            xf.data_ptr(),
            h,
            i,
            offs_a,
            gate.data_ptr(),
            up.data_ptr(),
            down.data_ptr(),
            wb,
            y.data_ptr(),
            ws.data_ptr() + t * per * 4,
            bounds[t],
            bounds[t + 1],
        )

    if n_threads == 1:
        run(0)
    else:
        list(_executor(n_threads).map(run, range(n_threads)))
    return y


RUN_ATTEND_KT = 32  # keys per tile of lc2_run_attend (RUN_KT in the C source)


def run_attend_pool(
    q: torch.Tensor,
    pool: torch.Tensor,
    segs: list[tuple[int, int, int, list[tuple[int, int]]]],
    out: torch.Tensor,
) -> bool:
    """`kernels.run_attention`'s absorbed attention for every sequence of a decode step in one call, each
    cached key read once (`lc2_run_attend`): q [N*h, D] fp32 contiguous with the softmax scale and log2 e
    folded in (query i of a sequence, head j at its row i*h + j; query i sees positions <= start + i);
    segs = [(row offset, T, start, runs)] as `StepContext` plans them (the sequence's queries are rows
    off*h .. (off+T)*h - 1 of q and out [N*h, c]; runs = [(first pool row, count)] in position order,
    covering positions 0 .. start+T-1);
    pool [P, D] the sublayer's cache (fp32 or bf16, unit column stride), the latent its first c columns.
    Sequences are split over the threads. False (out untouched) where the kernel does not apply."""
    lib = library()
    if (
        lib is None
        or not segs
        or q.dtype != torch.float32
        or pool.dtype not in (torch.float32, torch.bfloat16)
        or out.dtype not in (torch.float32, torch.bfloat16)
        or not (q.is_contiguous() and out.is_contiguous() and pool.stride(1) == 1)
        or any(x.device.type != "cpu" for x in (q, pool, out))
        or q.shape[1] != pool.shape[1]
        or out.shape[1] > pool.shape[1]
    ):
        return False
    n_rows, c = out.shape
    n_q = sum(t for _, t, _, _ in segs)
    h = n_rows // n_q
    if h * n_q != n_rows or q.shape[0] != n_rows:
        return False
    esz, ld, base = pool.element_size(), pool.stride(0), pool.data_ptr()
    ptrs, lens, run0 = [], [], [0]
    for _, t, start, runs in segs:
        if sum(m for _, m in runs) < start + t or any(r < 0 or r + m > pool.shape[0] for r, m in runs):
            return False
        ptrs += [base + r * ld * esz for r, _ in runs]
        lens += [m for _, m in runs]
        run0.append(len(ptrs))
    n = len(segs)

    def arr(xs: list[int]) -> ctypes.Array:
        return (ctypes.c_int64 * len(xs))(*xs)

    row0, ts, starts = arr([s[0] for s in segs]), arr([s[1] for s in segs]), arr([s[2] for s in segs])
    run0_a, ptrs_a, lens_a = arr(run0), arr(ptrs), arr(lens)
    per_row = c + RUN_ATTEND_KT + 2
    max_rows = max(t for _, t, _, _ in segs) * h
    n_threads = max(1, min(torch.get_num_threads(), n))
    ws = torch.empty(n_threads * max_rows * per_row, dtype=torch.float32)
    args = (q.shape[1], c, h, row0, ts, starts, run0_a, ptrs_a, lens_a, ld, int(esz == 2), out.data_ptr())

    slot = {n * i // n_threads: i for i in range(n_threads)}  # `_over_rows`' range starts → own scratch

    def run(s0: int, s1: int) -> None:
        ws_ptr = ws.data_ptr() + slot[s0] * max_rows * per_row * 4
        lib.lc2_run_attend_segs(q.data_ptr(), *args, int(out.dtype == torch.bfloat16), ws_ptr, s0, s1)

    _over_rows(n, run, min_rows=1)
    return True
