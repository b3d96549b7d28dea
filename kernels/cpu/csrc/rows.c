/* The CPU backend's native loops (kernels/cpu/native.py builds this file with the system C compiler and calls it
 * through ctypes). Decode-shaped LoRA and bottleneck adapters in fp32: each slot's rows are read once for all of
 * its tokens, straight from the pages, one call per wrapped module. Why: at decode a module's delta work is reading
 * its rows once, and the torch plans pay ~15-20 us of dispatch per small op (a strided LoRA call is ~10 of them);
 * a loop the compiler vectorises reads the rows at 10-20 GB/s with one call (kernels/cpu/__init__.py, numbers).
 *
 * Layout of a group (one active slot): int64 [slot, start, size, off, n (, ub_row, act)]: the slot's run of
 * ``size`` rows from ``start``, its tokens toks[off .. off + n). Every row pointer is a row of a [N, K] matrix with
 * unit last stride and row stride ``*_rs`` (elements). h (adapters) is fp32 scratch of at least max(n * size)
 * elements.
 * Sums run in fp32 in a different order from torch's GEMMs: equal to the float64 reference within fp32 rounding.
 */
#include <math.h>
#include <stdint.h>

/* yr[k] += h0 * r[k] + h1 * r[rs + k] + h2 * r[2 rs + k] + h3 * r[3 rs + k]: four rows of a cell into one output row
 * in a pass (the expand of LoRA and of adapters). */
static inline void axpy4(float *restrict yr, const float *restrict r, int64_t rs, float h0, float h1, float h2,
                         float h3, int64_t n)
{
    const float *r1 = r + rs, *r2 = r1 + rs, *r3 = r2 + rs;
#pragma omp simd
    for (int64_t k = 0; k < n; k++)
        yr[k] += h0 * r[k] + h1 * r1[k] + h2 * r2[k] + h3 * r3[k];
}

/* sum of a[k] * b[k] */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; k++)
        acc += a[k] * b[k];
    return acc;
}

/* yr[k] += h * r[k] */
static inline void axpy1(float *restrict yr, const float *restrict r, float h, int64_t n)
{
#pragma omp simd
    for (int64_t k = 0; k < n; k++)
        yr[k] += h * r[k];
}

/* y[t] += scale[slot] * (x[t] @ A.T) @ B.T, A = a[start : start + r], B.T = b[start : start + r]. One pass over the
 * slot's rows, four at a time: their dots with x[t], then those four B rows into y[t] (a LoRA term is a sum over
 * its ranks, so nothing waits for the whole h). Rows j of A and B are one arena row (A row | B column), so the pass
 * streams each cell once, front to back: 1.2-1.4x faster than a shrink pass then an expand pass (32 slots of
 * ranks 4-64, one token each, rows cold: 1024 -> 1024 310 against 430 us, 19.4 GB/s). */
void ds_lora_f32(float *restrict y, int64_t y_rs, const float *restrict x, int64_t x_rs,
                 const float *restrict a, int64_t a_rs, const float *restrict b, int64_t b_rs,
                 int64_t in, int64_t out, const float *restrict scale, int64_t scale_s,
                 const int64_t *restrict groups, int64_t n_groups, const int64_t *restrict toks)
{
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t *gr = groups + 5 * g;
        const int64_t start = gr[1], r = gr[2], off = gr[3], n = gr[4];
        const float sc = scale[gr[0] * scale_s];
        int64_t j = 0;
        for (; j + 4 <= r; j += 4) {
            const float *a0 = a + (start + j) * a_rs, *a1 = a0 + a_rs, *a2 = a1 + a_rs, *a3 = a2 + a_rs;
            const float *b0 = b + (start + j) * b_rs;
            for (int64_t t = 0; t < n; t++) {
                const float *xr = x + toks[off + t] * x_rs;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int64_t k = 0; k < in; k++) {
                    const float xv = xr[k];
                    s0 += a0[k] * xv;
                    s1 += a1[k] * xv;
                    s2 += a2[k] * xv;
                    s3 += a3[k] * xv;
                }
                axpy4(y + toks[off + t] * y_rs, b0, b_rs, s0 * sc, s1 * sc, s2 * sc, s3 * sc, out);
            }
        }
        for (; j < r; j++) {
            const float *a0 = a + (start + j) * a_rs, *b0 = b + (start + j) * b_rs;
            for (int64_t t = 0; t < n; t++) {
                const float s0 = dot(a0, x + toks[off + t] * x_rs, in);
                axpy1(y + toks[off + t] * y_rs, b0, s0 * sc, out);
            }
        }
    }
}

static float act(float v, int64_t code)
{  /* kernels/activations.py ACT_CODES */
    switch (code) {
    case 0: return v > 0.f ? v : 0.f;
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v / (1.f + expf(-v));
    }
}

/* y[t] += scale[slot] * (act(u[t] @ D.T + db) @ U.T + ub): D = down[start : start + m], db = dbias[start ..],
 * U.T = up[start : start + m], ub = ubias[ub_row]. u may be y: a group reads its tokens' u rows (shrink) before
 * it writes their y rows, and no other group touches them. groups are [slot, start, m, off, n, ub_row, act]. */
void ds_bottleneck_f32(float *y, int64_t y_rs, const float *u, int64_t u_rs,
                       const float *restrict down, int64_t d_rs, const float *restrict up, int64_t up_rs,
                       const float *restrict dbias, int64_t db_s, const float *restrict ubias, int64_t ub_rs,
                       int64_t hid, const float *restrict scale, int64_t scale_s,
                       const int64_t *restrict groups, int64_t n_groups, const int64_t *restrict toks,
                       float *restrict h)
{
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t *gr = groups + 7 * g;
        const int64_t start = gr[1], m = gr[2], off = gr[3], n = gr[4], code = gr[6];
        const float sc = scale[gr[0] * scale_s];
        const float *ub = ubias + gr[5] * ub_rs;
        for (int64_t j = 0; j < m; j++) {
            const float *drow = down + (start + j) * d_rs;
            const float bj = dbias[(start + j) * db_s];
            for (int64_t t = 0; t < n; t++) {
                h[t * m + j] = act(dot(drow, u + toks[off + t] * u_rs, hid) + bj, code);
            }
        }
        for (int64_t t = 0; t < n; t++) {
            float *yr = y + toks[off + t] * y_rs;
            const float *ht = h + t * m;
            const float *u0 = up + start * up_rs;
            /* d = act(h) @ U.T + ub, then y += scale * d: the up bias joins before the scale, as in the reference */
            int64_t j = 0;
            for (; j + 4 <= m; j += 4)
                axpy4(yr, u0 + j * up_rs, up_rs, sc * ht[j], sc * ht[j + 1], sc * ht[j + 2], sc * ht[j + 3], hid);
            for (; j < m; j++)
                axpy1(yr, u0 + j * up_rs, sc * ht[j], hid);
            axpy1(yr, ub, sc, hid);
        }
    }
}

/* One-row terms: for each pair [token, row], y[token] += rows[row] (op 0: BitFit, biases) or y[token] *= rows[row]
 * (op 1: (IA)3 scales). Pairs of tokens without the term are absent. */
void ds_rows_f32(float *restrict y, int64_t y_rs, const float *restrict rows, int64_t r_rs, int64_t n_cols,
                 const int64_t *restrict pairs, int64_t n_pairs, int64_t op)
{
    for (int64_t p = 0; p < n_pairs; p++) {
        float *yr = y + pairs[2 * p] * y_rs;
        const float *v = rows + pairs[2 * p + 1] * r_rs;
        if (op == 0) {
#pragma omp simd
            for (int64_t k = 0; k < n_cols; k++)
                yr[k] += v[k];
        } else {
#pragma omp simd
            for (int64_t k = 0; k < n_cols; k++)
                yr[k] *= v[k];
        }
    }
}

/* DoRA's column scale: for each pair [token, row], y[token] = y[token] * scale[row] + shift[row]. Pairs of
 * unflagged slots' tokens are absent: those rows are not touched. */
void ds_affine_f32(float *restrict y, int64_t y_rs, const float *restrict scale, int64_t s_rs,
                   const float *restrict shift, int64_t sh_rs, int64_t n_cols, const int64_t *restrict pairs,
                   int64_t n_pairs)
{
    for (int64_t p = 0; p < n_pairs; p++) {
        float *yr = y + pairs[2 * p] * y_rs;
        const float *g = scale + pairs[2 * p + 1] * s_rs, *c = shift + pairs[2 * p + 1] * sh_rs;
#pragma omp simd
        for (int64_t k = 0; k < n_cols; k++)
            yr[k] = yr[k] * g[k] + c[k];
    }
}
