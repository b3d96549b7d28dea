/* The CPU backend's native loops (kernels/cpu/native.py builds this file with the system C compiler and calls it
 * through ctypes). Decode-shaped LoRA and bottleneck adapters in fp32: each slot's rows are read once for all of
 * its tokens, straight from the pages, one call per wrapped module. Why: at decode a module's delta work is reading
 * its rows once, and the torch plans pay ~15-20 us of dispatch per small op (a strided LoRA call is ~10 of them);
 * a loop the compiler vectorises reads the rows at 10-20 GB/s with one call (kernels/cpu/__init__.py, numbers).
 *
 * Each call reads the pages' per-slot tables itself (int32 / fp32, unit stride: start, rank, scale, row ...), as
 * the Triton kernels do, and walks the step's segments: int64 [n_segs, 3] = (slot, off, n), that slot's tokens
 * toks[off .. off + n). The segments depend on the step's token layout only, so one tensor serves every wrapped
 * module of a step; no per-module host work is left (that was ~40-60 us a module: host values, groups, checks).
 * Before anything is written a first pass checks every segment's slot and run against the tables' and rows'
 * sizes; a bad one returns its index + 1 and nothing is touched (the caller raises). 0 is success.
 * Every row pointer is a row of a [N, K] matrix with unit last stride and row stride ``*_rs`` (elements).
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

/* y[t] += scale[slot] * (x[t] @ A.T) @ B.T, A = a[start : start + r], B.T = b[start : start + r], r = rank[slot]
 * (0: nothing). One pass over the slot's rows, four at a time: their dots with x[t], then those four B rows into
 * y[t] (a LoRA term is a sum over its ranks, so nothing waits for the whole h). Rows j of A and B are one arena row
 * (A row | B column), so the pass streams each cell once, front to back: 1.2-1.4x faster than a shrink pass then an
 * expand pass (32 slots of ranks 4-64, one token each, rows cold: 1024 -> 1024 310 against 430 us, 19.4 GB/s). */
static int64_t lora_check(int64_t n_slots, int64_t n_rows, const int32_t *restrict start,
                          const int32_t *restrict rank, const int64_t *restrict segs, int64_t n_segs)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t s = segs[3 * g];
        if (s < 0 || s >= n_slots)
            return g + 1;
        const int64_t st = start[s], r = rank[s];
        if (r < 0 || (r > 0 && (st < 0 || st + r > n_rows)))
            return g + 1;
    }
    return 0;
}

static void lora_run(float *restrict y, int64_t y_rs, const float *restrict x, int64_t x_rs,
                     const float *restrict a, int64_t a_rs, const float *restrict b, int64_t b_rs,
                     int64_t in, int64_t out, const int32_t *restrict start, const int32_t *restrict rank,
                     const float *restrict scale, const int64_t *restrict segs, int64_t n_segs,
                     const int64_t *restrict toks)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t *sg = segs + 3 * g;
        const int64_t r = rank[sg[0]], st = start[sg[0]], off = sg[1], n = sg[2];
        if (r == 0)
            continue;
        const float sc = scale[sg[0]];
        int64_t j = 0;
        for (; j + 4 <= r; j += 4) {
            const float *a0 = a + (st + j) * a_rs, *a1 = a0 + a_rs, *a2 = a1 + a_rs, *a3 = a2 + a_rs;
            const float *b0 = b + (st + j) * b_rs;
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
            const float *a0 = a + (st + j) * a_rs, *b0 = b + (st + j) * b_rs;
            for (int64_t t = 0; t < n; t++) {
                const float s0 = dot(a0, x + toks[off + t] * x_rs, in);
                axpy1(y + toks[off + t] * y_rs, b0, s0 * sc, out);
            }
        }
    }
}

int64_t ds_lora_f32(float *restrict y, int64_t y_rs, const float *restrict x, int64_t x_rs,
                    const float *restrict a, int64_t a_rs, const float *restrict b, int64_t b_rs,
                    int64_t in, int64_t out, const int32_t *restrict start, const int32_t *restrict rank,
                    const float *restrict scale, int64_t n_slots, int64_t n_rows,
                    const int64_t *restrict segs, int64_t n_segs, const int64_t *restrict toks)
{
    const int64_t bad = lora_check(n_slots, n_rows, start, rank, segs, n_segs);
    if (bad)
        return bad;
    lora_run(y, y_rs, x, x_rs, a, a_rs, b, b_rs, in, out, start, rank, scale, segs, n_segs, toks);
    return 0;
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

/* y[t] += scale[slot] * (act(u[t] @ D.T + db) @ U.T + ub): m = width[slot] (0: nothing), D = down[start : start + m],
 * db = dbias[start ..], U.T = up[start : start + m], ub = ubias[ub_row[slot]], act = act_code[slot]. u may be y: a
 * segment reads its tokens' u rows (shrink) before it writes their y rows, and no other segment touches them. h is
 * fp32 scratch of h_cap elements; a segment needs n * m of them. */
int64_t ds_bottleneck_f32(float *y, int64_t y_rs, const float *u, int64_t u_rs,
                          const float *restrict down, int64_t d_rs, const float *restrict up, int64_t up_rs,
                          const float *restrict dbias, int64_t db_s, const float *restrict ubias, int64_t ub_rs,
                          int64_t hid, const int32_t *restrict start, const int32_t *restrict width,
                          const float *restrict scale, const int32_t *restrict ub_row, const int32_t *restrict act_code,
                          int64_t n_slots, int64_t n_rows, int64_t n_ub_rows,
                          const int64_t *restrict segs, int64_t n_segs, const int64_t *restrict toks,
                          float *restrict h, int64_t h_cap)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t s = segs[3 * g];
        if (s < 0 || s >= n_slots)
            return g + 1;
        const int64_t st = start[s], m = width[s];
        if (m < 0 || (m > 0 && (st < 0 || st + m > n_rows || ub_row[s] < 0 || ub_row[s] >= n_ub_rows ||
                                act_code[s] < 0 || act_code[s] > 3 || segs[3 * g + 2] * m > h_cap)))
            return g + 1;
    }
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t *sg = segs + 3 * g;
        const int64_t m = width[sg[0]], st = start[sg[0]], off = sg[1], n = sg[2], code = act_code[sg[0]];
        if (m == 0)
            continue;
        const float sc = scale[sg[0]];
        const float *ub = ubias + ub_row[sg[0]] * ub_rs;
        for (int64_t j = 0; j < m; j++) {
            const float *drow = down + (st + j) * d_rs;
            const float bj = dbias[(st + j) * db_s];
            for (int64_t t = 0; t < n; t++) {
                h[t * m + j] = act(dot(drow, u + toks[off + t] * u_rs, hid) + bj, code);
            }
        }
        for (int64_t t = 0; t < n; t++) {
            float *yr = y + toks[off + t] * y_rs;
            const float *ht = h + t * m;
            const float *u0 = up + st * up_rs;
            /* d = act(h) @ U.T + ub, then y += scale * d: the up bias joins before the scale, as in the reference */
            int64_t j = 0;
            for (; j + 4 <= m; j += 4)
                axpy4(yr, u0 + j * up_rs, up_rs, sc * ht[j], sc * ht[j + 1], sc * ht[j + 2], sc * ht[j + 3], hid);
            for (; j < m; j++)
                axpy1(yr, u0 + j * up_rs, sc * ht[j], hid);
            axpy1(yr, ub, sc, hid);
        }
    }
    return 0;
}

/* One-row terms: y[t] += rows[row[slot]] (op 0: BitFit, biases) or y[t] *= rows[row[slot]] (op 1: (IA)3 scales).
 * Tokens of slots whose row is ``skip`` (the layer's neutral row, zeros or ones; -1: none) are not touched: the
 * caller need not restrict the step to the slots that have the term (a restricted step meta cost ~25 us a call). */
static int64_t rows_check(const int32_t *restrict row, int64_t n_slots, int64_t n_rows, int64_t skip,
                          const int64_t *restrict segs, int64_t n_segs)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t s = segs[3 * g];
        if (s < 0 || s >= n_slots || ((int64_t)row[s] != skip && (row[s] < 0 || row[s] >= n_rows)))
            return g + 1;
    }
    return 0;
}

static void rows_run(float *restrict y, int64_t y_rs, const float *restrict rows, int64_t r_rs, int64_t n_cols,
                     const int32_t *restrict row, int64_t skip, const int64_t *restrict segs, int64_t n_segs,
                     const int64_t *restrict toks, int64_t op)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t *sg = segs + 3 * g;
        const int64_t rw = row[sg[0]];
        if (rw == skip)
            continue;
        const float *v = rows + rw * r_rs;
        for (int64_t t = 0; t < sg[2]; t++) {
            float *yr = y + toks[sg[1] + t] * y_rs;
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
}

int64_t ds_rows_f32(float *restrict y, int64_t y_rs, const float *restrict rows, int64_t r_rs, int64_t n_cols,
                    const int32_t *restrict row, int64_t n_slots, int64_t n_rows, int64_t skip,
                    const int64_t *restrict segs, int64_t n_segs, const int64_t *restrict toks, int64_t op)
{
    const int64_t bad = rows_check(row, n_slots, n_rows, skip, segs, n_segs);
    if (bad)
        return bad;
    rows_run(y, y_rs, rows, r_rs, n_cols, row, skip, segs, n_segs, toks, op);
    return 0;
}

/* DoRA's column scale: y[t] = y[t] * scale[row[slot]] + shift[row[slot]] for the tokens of slots with flag != 0;
 * the rows of the others are not touched. */
static int64_t affine_check(const int32_t *restrict row, const int32_t *restrict flag, int64_t n_slots,
                            int64_t n_rows, const int64_t *restrict segs, int64_t n_segs)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t s = segs[3 * g];
        if (s < 0 || s >= n_slots || (flag[s] && (row[s] < 0 || row[s] >= n_rows)))
            return g + 1;
    }
    return 0;
}

static void affine_run(float *restrict y, int64_t y_rs, const float *restrict scale, int64_t s_rs,
                       const float *restrict shift, int64_t sh_rs, int64_t n_cols, const int32_t *restrict row,
                       const int32_t *restrict flag, const int64_t *restrict segs, int64_t n_segs,
                       const int64_t *restrict toks)
{
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t *sg = segs + 3 * g;
        if (!flag[sg[0]])
            continue;
        const float *gr = scale + row[sg[0]] * s_rs, *c = shift + row[sg[0]] * sh_rs;
        for (int64_t t = 0; t < sg[2]; t++) {
            float *yr = y + toks[sg[1] + t] * y_rs;
#pragma omp simd
            for (int64_t k = 0; k < n_cols; k++)
                yr[k] = yr[k] * gr[k] + c[k];
        }
    }
}

int64_t ds_affine_f32(float *restrict y, int64_t y_rs, const float *restrict scale, int64_t s_rs,
                      const float *restrict shift, int64_t sh_rs, int64_t n_cols, const int32_t *restrict row,
                      const int32_t *restrict flag, int64_t n_slots, int64_t n_rows,
                      const int64_t *restrict segs, int64_t n_segs, const int64_t *restrict toks)
{
    const int64_t bad = affine_check(row, flag, n_slots, n_rows, segs, n_segs);
    if (bad)
        return bad;
    affine_run(y, y_rs, scale, s_rs, shift, sh_rs, n_cols, row, flag, segs, n_segs, toks);
    return 0;
}

/* One wrapped module's LoRA, DoRA and one-row terms of a step in one call, in the order of ``prog``: records of
 * int64, each an op code and that op's pages arguments, in the order of its ds_*_f32 function (pointers as
 * integers; kernels/cpu/native_step.py packs them once per module and terms):
 *     TERM_ADD_ROWS / TERM_MUL_ROWS   rows, r_rs, n_cols, row, n_slots, n_rows, skip
 *     TERM_LORA                       a, a_rs, b, b_rs, in, out, start, rank, scale, n_slots, n_rows
 *     TERM_AFFINE                     scale, s_rs, shift, sh_rs, n_cols, row, flag, n_slots, n_rows
 * Why: one ctypes call a module instead of one per term (a call and its Python were ~15-25 us inside a decode
 * step, ~2.4 terms a module on the demo model's served mix). Every record's segments are checked before any is
 * run: a refusal (or an unknown record) returns its record's index + 1 and writes nothing, and the caller then
 * runs the terms one by one, whose own checks name what is wrong. */
enum { TERM_ADD_ROWS = 0, TERM_MUL_ROWS = 1, TERM_LORA = 2, TERM_AFFINE = 3 };

static int64_t term_len(int64_t code)
{
    switch (code) {
    case TERM_ADD_ROWS: case TERM_MUL_ROWS: return 8;
    case TERM_LORA: return 12;
    case TERM_AFFINE: return 10;
    default: return 0;
    }
}

#define P_F(v) ((const float *)(intptr_t)(v))
#define P_I(v) ((const int32_t *)(intptr_t)(v))

int64_t ds_terms_f32(float *restrict y, int64_t y_rs, const float *restrict x, int64_t x_rs,
                     const int64_t *restrict prog, int64_t n_prog,
                     const int64_t *restrict segs, int64_t n_segs, const int64_t *restrict toks)
{
    int64_t k = 0;
    for (int64_t i = 0, n; i < n_prog; i += n, k++) {
        const int64_t *p = prog + i;
        n = term_len(p[0]);
        if (n == 0 || i + n > n_prog)
            return k + 1;
        int64_t bad = 0;
        if (p[0] == TERM_LORA)
            bad = lora_check(p[10], p[11], P_I(p[7]), P_I(p[8]), segs, n_segs);
        else if (p[0] == TERM_AFFINE)
            bad = affine_check(P_I(p[6]), P_I(p[7]), p[8], p[9], segs, n_segs);
        else
            bad = rows_check(P_I(p[4]), p[5], p[6], p[7], segs, n_segs);
        if (bad)
            return k + 1;
    }
    for (int64_t i = 0; i < n_prog; i += term_len(prog[i])) {
        const int64_t *p = prog + i;
        if (p[0] == TERM_LORA)
            lora_run(y, y_rs, x, x_rs, P_F(p[1]), p[2], P_F(p[3]), p[4], p[5], p[6], P_I(p[7]), P_I(p[8]),
                     P_F(p[9]), segs, n_segs, toks);
        else if (p[0] == TERM_AFFINE)
            affine_run(y, y_rs, P_F(p[1]), p[2], P_F(p[3]), p[4], p[5], P_I(p[6]), P_I(p[7]), segs, n_segs, toks);
        else
            rows_run(y, y_rs, P_F(p[1]), p[2], p[3], P_I(p[4]), p[7], segs, n_segs, toks, p[0]);
    }
    return 0;
}
