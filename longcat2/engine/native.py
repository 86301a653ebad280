"""Optional compiled CPU kernels: C built on first use with the system's C compiler, called through ctypes.

Design choices:
- Only what PyTorch ops cannot do at the machine's speed goes here: the parts of LSA that are not GEMMs,
  and its small products, where an op per pass over memory costs more than the arithmetic (on the
  embedded model's 29K-token prefill, 4 heads and a 4 x 16 indexer, they took three quarters of it);
  and one large product that the BLAS runs slowly on AMD CPUs:
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
    tile, the ReLU and weighting done in registers. Only for head dims <= 32 (at LongCat-2.0's 64 x 128
    oneDNN's GEMM is the faster product).
  - `pv_rows`: the fp32 P·V of large gathered rows ([64 heads x ~1-2K keys] x [keys x 512] at
    LongCat-2.0 dims). MKL runs its AVX2 kernels on AMD CPUs (~90 GFLOP/s here) and oneDNN needs the
    values transposed (a copy per row costs what it saves). Blocked over 256 keys, register tiles of 4
    heads x 64 columns: 140-190 GFLOP/s, 1.5-1.7x `torch.mm` per row.
  - `slot_attend`: each row's absorbed attention over its own gathered keys, read in place from the pool
    (no gathered copy: the copy and two more passes over it were memory-bound), a few keys prefetched
    ahead, softmax with a polynomial exp2 in registers, P·V in register tiles. It returns the
    unnormalised block (o, max, sum) so the windowed path merges it with the shared window's block. Only
    for rows below `kernels.PER_ROW_MIN_MACS` (large rows are GEMMs at the machine's rate).
- Every kernel here has a pure-PyTorch twin in `kernels`, which is the reference its tests compare
  against, and the path on every other device, dtype or machine without a compiler. `LONGCAT2_NATIVE=0`
  turns the compiled path off.
- No torch headers and no build step at install: one C file compiled in about a second with
  `-O3 -march=native` into a cache directory (`$LONGCAT2_CACHE_DIR`, else `~/.cache/longcat2`; a temp
  directory where that is not writable) under a name that hashes the source, the flags, the compiler and
  the CPU's flags (a cache shared by different CPUs never loads a library built for another). The build writes to a temporary name and renames, so
  concurrent processes never load a half-written library. A failed build is reported once (a warning)
  and the PyTorch path is used.
- ctypes releases the GIL during a call, so every kernel splits its rows over `torch.get_num_threads()`
  Python threads (at least 16 rows each; one large P·V row each).
- Vector code is written with GCC/Clang vector extensions (no intrinsics), so the same source builds
  for AVX-512, AVX2 or NEON under -march=native.
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
#include <string.h>

/* 16-lane vectors (GCC/Clang vector extensions); unaligned loads and stores through memcpy. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint64_t v8u64 __attribute__((vector_size(64)));

static inline v16 vload(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, v16 v) { memcpy(p, &v, sizeof v); }

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
                float v = 0.0f;
                if (j < m) {
                    if (key_bf16) {
                        uint32_t u = (uint32_t)((const uint16_t *)keys)[(j0 + j) * key_ld + e] << 16;
                        memcpy(&v, &u, 4);
                    } else {
                        v = ((const float *)keys)[(j0 + j) * key_ld + e];
                    }
                }
                kt[e * KB + j] = v;
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

/* 16 floats of a pool row from element e on (fp32, or bf16 bit patterns widened); `left` < 16: zero tail. */
static inline v16 row_load(const void *base, int bf16, int64_t e, int64_t left) {
    if (left >= 16) {
        if (!bf16) return vload((const float *)base + e);
        vh16 h;
        memcpy(&h, (const uint16_t *)base + e, sizeof h);
        vi16 u = __builtin_convertvector(h, vi16) << 16;
        return (v16)u;
    }
    float tmp[16] = {0};
    for (int64_t k = 0; k < left; k++) {
        if (bf16) {
            uint32_t u = (uint32_t)((const uint16_t *)base)[e + k] << 16;
            memcpy(&tmp[k], &u, 4);
        } else {
            tmp[k] = ((const float *)base)[e + k];
        }
    }
    return vload(tmp);
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree of halves, not 16 dependent adds */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
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

/* P.V of large rows: o[i] (+)= p[i] @ v[i][:, :c] for rows 0 .. n-1, fp32. p [n, h, K] (row stride K,
   rows ldp apart), v: K keys per row with stride ldv (rows ldvr apart), o [n, h, c] contiguous. Blocked
   so the data stays near the FMA units: 64 keys at a time (64 x c floats, in L2) serve every 4-head x
   64-column register tile (16 accumulators over 4 loads and 4 broadcasts per key), whose partial sums
   pass through o (L1/L2) between key blocks. */
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
                            float q0 = p0[k], q1 = p1[k], q2 = p2[k], q3 = p3[k];
                            acc[0][0] += q0 * x0, acc[0][1] += q0 * x1, acc[0][2] += q0 * x2, acc[0][3] += q0 * x3;
                            acc[1][0] += q1 * x0, acc[1][1] += q1 * x1, acc[1][2] += q1 * x2, acc[1][3] += q1 * x3;
                            acc[2][0] += q2 * x0, acc[2][1] += q2 * x1, acc[2][2] += q2 * x2, acc[2][3] += q2 * x3;
                            acc[3][0] += q3 * x0, acc[3][1] += q3 * x1, acc[3][2] += q3 * x2, acc[3][3] += q3 * x3;
                        }
                    } else {
                        for (int64_t k = k0; k < k1; k++) {
                            const float *vr = vi + k * ldv;
                            v16 x[4];
                            for (int b = 0; b < 4; b++) x[b] = row_load(vr, 0, c0 + 16 * b, c - c0 - 16 * b);
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
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99"]
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


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LONGCAT2_NATIVE", "1") == "0" or os.name != "posix":
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
    lib.lc2_pv_rows.restype = None
    lib.lc2_pv_rows.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, p, ctypes.c_int]
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
    """The compiled kernels, built on first call; None where they cannot be (no compiler, not POSIX,
    LONGCAT2_NATIVE=0, a failed build, inside `disabled()`)."""
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
    with unit column stride (fresh when None). → scores, or None where the kernel does not apply."""
    lib = library()
    if lib is None or q.device.type != "cpu" or q.dim() != 3:
        return None
    for _, keys in pieces:
        if (
            keys.dtype not in (torch.float32, torch.bfloat16)
            or keys.device.type != "cpu"
            or keys.stride(-1) != 1
        ):
            return None
    t, h, d = q.shape
    if out is None:
        out = torch.empty(t, end - start, dtype=torch.float32)
    if out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != (t, end - start):
        return None
    qf = q.float().contiguous()  # [T, h, d]
    wf = w.float().reshape(t, h).contiguous()  # [T, h]

    def run(r0: int, r1: int) -> None:
        kt = torch.empty(d * 256, dtype=torch.float32)  # a transposed block of keys
        for pos, keys in pieces:
            if keys.shape[0] == 0:
                continue
            lib.lc2_index_scores(
                qf[r0].data_ptr(),
                wf[r0].data_ptr(),
                r1 - r0,
                h,
                d,
                keys.data_ptr(),
                keys.stride(0),
                int(keys.dtype == torch.bfloat16),
                keys.shape[0],
                out[r0, pos - start :].data_ptr(),
                out.stride(0),
                kt.data_ptr(),
            )

    _over_rows(t, run)
    return out


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
        or values.stride(2) != 1
        or not out.is_contiguous()
    ):
        return False
    n, h, k = probs.shape
    c = values.shape[2]

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
