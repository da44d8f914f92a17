/* hat_bpu._native: the conv requantization epilogue in one pass over memory.
 *
 * What it computes is the float64 expression the torch code writes as several whole-tensor
 * passes (hat_bpu.ir.simulator.sim_conv2d's epilogue, hat_bpu.quant.intmath.int_conv_fast),
 * operation for operation, each an IEEE-754 double operation rounded once (built with
 * -ffp-contract=off: no fused multiply-add), so the results are the same bits:
 *
 *     v   = (acc[i] + bias[c]) * mult[c]          (bias optional; acc float32 or float64)
 *     v   = v + res[i] * res_mult[c]              (residual float32, per-channel multiplier)
 *        or v + res[i]                            (residual float64, already multiplied)
 *     q   = clamp(round_half_even(v), lo, hi)     -> float32
 *     out = q * out_scale                         (float32 multiply, optional)
 *
 * with c the channel of element i in a tensor laid out as [outer][C][inner] (NHWC rows:
 * inner = 1; NCHW: outer = N, inner = H*W); out may be acc itself (float32: in place).
 * A float32 residual may also come as fake-quant values to quantize first: res[i] becomes
 * round_half_even(res[i] / res_div) (float64 division) before its multiplier. quantize() is
 * the input side: out[i] = round_half_even(x[i] / s) in float32 (an IEEE float division).
 * peak_abs gives max |acc[i] + bias[c]|, which the simulator needs to know whether the float64
 * form is exact. On x86 the loops exist twice, AVX2 (chosen at import where the CPU has it) and
 * baseline; set_isa switches (tests run both).
 *
 * Plain C99 and the CPython API only: no torch headers, so it builds wherever the package
 * builds; the Python side (hat_bpu.native) falls back to the torch passes when it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SPAN 1024 /* elements per step; the per-element constant tiles (3 x 8 KiB) stay in L1 */
#define MAGIC 6755399441055744.0 /* 1.5 * 2**52: (x + M) - M rounds half to even */

/* One loop per (accumulator type, residual kind, bias or not), each simple enough to vectorize:
 * out[k] = clamp(round_half_even((a[k] + b[k]) * m[k] [+ r[k] * rm[k] | + r[k]]), lo, hi) * s
 * (s = 1 when unscaled: an exact multiply). The constants are per-element tiles. */
#define RES_NONE(k, RX) v
#define RES_F32(k, RX) v + (double)r32[k] * rm[k]
#define RES_F64(k, RX) v + r64[k]
#define RES_F32Q(k, RX) v + RX((double)r32[k] / rdiv) * rm[k]
#define BIAS_0(k) v
#define BIAS_1(k) v + b[k]
#define MASK_0(k) (void)0
#define MASK_1(k) mk[k] = (uint8_t)(r == q) /* QAT: round(v) inside [lo, hi] */
#define LOOP(A, RES, BIAS, ROUND, ROUNDX, MASK)                                                \
    for (int64_t k = 0; k < n; k++) {                                                        \
        double v = (double)A[k];                                                             \
        v = BIAS(k);                                                                         \
        v = v * m[k];                                                                        \
        v = RES(k, ROUNDX);                                                                  \
        const double r = ROUND(v);                                                           \
        double q = r < lo ? lo : r;                                                          \
        q = q > hi ? hi : q;                                                                 \
        MASK(k);                                                                             \
        out[k] = (float)q * s;                                                               \
    }

/* round_half_even with torch's sign of zero (torch.round(-0.3) is -0.0); the clamps above as
 * torch clamps (a bound replaces a value only when strictly beyond it). NEAR: the hardware
 * rounding instruction (nearbyint in the default rounding mode). MAGIC, for CPUs without one
 * (x86-64's baseline SSE2): x held to [lo - 1, hi + 1] first (the same after rounding and
 * clamping: rounding is monotone and keeps integers), then (x + 1.5·2**52) - 1.5·2**52, exact
 * half to even for |x| < 2**51, with the sign of x. */
#define ROUND_NEAR(v) nearbyint(v)
#define ROUNDX_NEAR(x) nearbyint(x)
#define ROUNDF_NEAR(x) nearbyintf(x)
/* round_half_even of any x by the 2**52 addition on |x| (float: 2**23), sign restored; |x| at
 * or above it is an integer already */
static inline double roundx_magic(double x)
{
    const double ax = fabs(x), r = copysign((ax + 0x1p52) - 0x1p52, x);
    return ax < 0x1p52 ? r : x;
}
static inline float roundf_magic(float x)
{
    const float ax = fabsf(x), r = copysignf((ax + 0x1p23f) - 0x1p23f, x);
    return ax < 0x1p23f ? r : x;
}
#define ROUNDX_MAGIC(x) roundx_magic(x)
#define ROUNDF_MAGIC(x) roundf_magic(x)
#define ROUND_MAGIC(v) copysign((((v) < lo1 ? lo1 : (v) > hi1 ? hi1 : (v)) + MAGIC) - MAGIC, v)

#define SPAN_FN(name, ATTR, ROUND, ROUNDX)                                                     \
    ATTR static void name(const void *acc, int acc_f64, const double *restrict b,             \
                          const double *restrict m, const void *res, int res_kind,             \
                          const double *restrict rm, double rdiv, double lo, double hi,        \
                          float *restrict out, float s, uint8_t *restrict mk, int64_t n)       \
    {                                                                                        \
        const float *restrict a32 = (const float *)acc;                                      \
        const double *restrict a64 = (const double *)acc;                                    \
        const float *restrict r32 = (const float *)res;                                      \
        const double *restrict r64 = (const double *)res;                                    \
        const double lo1 = lo - 1.0, hi1 = hi + 1.0;                                         \
        (void)lo1, (void)hi1, (void)r32, (void)r64, (void)rm, (void)rdiv;                    \
        if (mk) { /* QAT's forward (bias always; residual none or fake-quant values) */     \
            switch (acc_f64 * 2 + (res_kind == 3)) {                                         \
            case 0: LOOP(a32, RES_NONE, BIAS_1, ROUND, ROUNDX, MASK_1) break;                \
            case 1: LOOP(a32, RES_F32Q, BIAS_1, ROUND, ROUNDX, MASK_1) break;                \
            case 2: LOOP(a64, RES_NONE, BIAS_1, ROUND, ROUNDX, MASK_1) break;                \
            default: LOOP(a64, RES_F32Q, BIAS_1, ROUND, ROUNDX, MASK_1) break;               \
            }                                                                                \
            return;                                                                          \
        }                                                                                    \
        switch (acc_f64 * 8 + res_kind * 2 + (b != NULL)) {                                  \
        case 0: LOOP(a32, RES_NONE, BIAS_0, ROUND, ROUNDX, MASK_0) break;                    \
        case 1: LOOP(a32, RES_NONE, BIAS_1, ROUND, ROUNDX, MASK_0) break;                    \
        case 2: LOOP(a32, RES_F32, BIAS_0, ROUND, ROUNDX, MASK_0) break;                     \
        case 3: LOOP(a32, RES_F32, BIAS_1, ROUND, ROUNDX, MASK_0) break;                     \
        case 4: LOOP(a32, RES_F64, BIAS_0, ROUND, ROUNDX, MASK_0) break;                     \
        case 5: LOOP(a32, RES_F64, BIAS_1, ROUND, ROUNDX, MASK_0) break;                     \
        case 6: LOOP(a32, RES_F32Q, BIAS_0, ROUND, ROUNDX, MASK_0) break;                    \
        case 7: LOOP(a32, RES_F32Q, BIAS_1, ROUND, ROUNDX, MASK_0) break;                    \
        case 8: LOOP(a64, RES_NONE, BIAS_0, ROUND, ROUNDX, MASK_0) break;                    \
        case 9: LOOP(a64, RES_NONE, BIAS_1, ROUND, ROUNDX, MASK_0) break;                    \
        case 10: LOOP(a64, RES_F32, BIAS_0, ROUND, ROUNDX, MASK_0) break;                    \
        case 11: LOOP(a64, RES_F32, BIAS_1, ROUND, ROUNDX, MASK_0) break;                    \
        case 12: LOOP(a64, RES_F64, BIAS_0, ROUND, ROUNDX, MASK_0) break;                    \
        case 13: LOOP(a64, RES_F64, BIAS_1, ROUND, ROUNDX, MASK_0) break;                    \
        case 14: LOOP(a64, RES_F32Q, BIAS_0, ROUND, ROUNDX, MASK_0) break;                   \
        default: LOOP(a64, RES_F32Q, BIAS_1, ROUND, ROUNDX, MASK_0) break;                   \
        }                                                                                    \
    }

/* out[k] = round_half_even(x[k] / s) in float32 (the input integers of a fake-quant conv) */
#define QUANT_FN(name, ATTR, ROUNDF)                                                           \
    ATTR static void name(const float *restrict x, float s, float *restrict out, int64_t n)  \
    {                                                                                        \
        for (int64_t k = 0; k < n; k++) {                                                    \
            const float v = x[k] / s;                                                        \
            out[k] = ROUNDF(v);                                                              \
        }                                                                                    \
    }

/* ir add of fake-quant inputs (intmath._int_sum_fast), per element: the integers
 * xi = round_half_even(float64(x_i) / s_i); the device's q = clamp(round_half_even(Σ xi·m_i /
 * 2**sh)) — Σ xi·m_i in float64, exact while Σ |xi|·|m_i| < 2**53 (the caller checks), the
 * division by 2**sh exact, so the int64 round-shift's value; the float form
 * y = clamp(round_half_even(Σ xi·mult_i)) (each product rounded, added in order) ·s; and
 * out = (q·s - y) + y in float32, as the torch code's straight-through form computes it.
 * Returns 1 when some |xi| exceeded xbound (then the float64 sum may not be exact: the
 * caller discards out and runs its int64 code). */
#define SUM_LOOP(NIN, ROUND, ROUNDX)                                                           \
    for (int64_t k = 0; k < n; k++) {                                                        \
        const double x0 = ROUNDX((double)xs[0][k] / si[0]);                                  \
        double acc = x0 * mi[0], v = x0 * multi[0], top = fabs(x0);                          \
        for (int i = 1; i < NIN; i++) {                                                      \
            const double xi = ROUNDX((double)xs[i][k] / si[i]);                              \
            top = fabs(xi) > top ? fabs(xi) : top;                                           \
            acc = acc + xi * mi[i];                                                          \
            v = v + xi * multi[i];                                                           \
        }                                                                                    \
        beyond = top > xbound ? 1.0 : beyond;                                                \
        double qy = ROUND(v), qt = ROUND(acc * inv2s);                                       \
        qy = qy < lo ? lo : qy;                                                              \
        qy = qy > hi ? hi : qy;                                                              \
        qt = qt < lo ? lo : qt;                                                              \
        qt = qt > hi ? hi : qt;                                                              \
        const float y = (float)qy * s, t = (float)qt * s;                                    \
        out[k] = (t - y) + y;                                                                \
    }

#define SUM_FN(name, ATTR, ROUND, ROUNDX)                                                      \
    ATTR static int name(const float *const *x, const double *si, const double *mi,           \
                         const double *multi, int nin, double inv2s, double lo, double hi,     \
                         float s, double xbound, float *restrict out, int64_t n)               \
    {                                                                                        \
        const float *restrict xs[4] = {x[0], x[1], x[2], x[3]};                              \
        double beyond = 0.0;                                                                 \
        switch (nin) {                                                                       \
        case 1: SUM_LOOP(1, ROUND, ROUNDX) break;                                            \
        case 2: SUM_LOOP(2, ROUND, ROUNDX) break;                                            \
        case 3: SUM_LOOP(3, ROUND, ROUNDX) break;                                            \
        default: SUM_LOOP(4, ROUND, ROUNDX) break;                                           \
        }                                                                                    \
        return beyond != 0.0;                                                                \
    }

/* QAT's activation fake quant (fake_quant._FakeQuantSTE) in one pass: r = round_half_even(x[k]
 * · inv) in float32, q = clamp(r, qmin, qmax) as torch clamps (NaN stays NaN), out = q · s,
 * mask = 1 where r == q (inside the range) else 0 (one byte): the straight-through gradient's
 * mask. Its backward, mask_mul: out = g · (mask ? 1 : 0), the float32 product torch's
 * ``grad * mask`` forms (so g · 0 keeps g's sign, NaN stays NaN). */
#define FQ_FN(name, ATTR, ROUNDF)                                                              \
    ATTR static void name(const float *restrict x, float inv, float qmin, float qmax, float s,  \
                          float *restrict out, uint8_t *restrict mask, int64_t n)              \
    {                                                                                        \
        if (mask)                                                                            \
            for (int64_t k = 0; k < n; k++) {                                                \
                const float r = ROUNDF(x[k] * inv);                                          \
                float q = r < qmin ? qmin : r;                                               \
                q = q > qmax ? qmax : q;                                                     \
                mask[k] = (uint8_t)(r == q);                                                 \
                out[k] = q * s;                                                              \
            }                                                                                \
        else /* no gradient wanted: no mask */                                               \
            for (int64_t k = 0; k < n; k++) {                                                \
                const float r = ROUNDF(x[k] * inv);                                          \
                float q = r < qmin ? qmin : r;                                               \
                q = q > qmax ? qmax : q;                                                     \
                out[k] = q * s;                                                              \
            }                                                                                \
    }

#define MMUL_FN(name, ATTR)                                                                    \
    ATTR static void name(const float *restrict g, const uint8_t *restrict mask,              \
                          float *restrict out, int64_t n)                                      \
    {                                                                                        \
        for (int64_t k = 0; k < n; k++) /* (a mask holds 0 or 1: its float is 0.0 or 1.0) */ \
            out[k] = g[k] * (float)mask[k];                                                  \
    }

/* The backward of QAT's conv epilogue (intmath._ConvEpilogue) in one pass, per element with
 * channel constants m (multiplier), rm (the residual's): g = float64(grad · s) · (mask ? 1 : 0)
 * (s the float32 output scale), the residual's gradient float32((g · rm) / res_div), then
 * g = g · m, kept in float64 (g64: the bias gradient's terms, summed by torch, or a float64
 * accumulator's gradient) and as float32 (g32: a float32 accumulator's gradient) — autograd's
 * operations in autograd's order. One loop per set of outputs (no branch inside: vectorized). */
#define W_0(k, e) (void)0
#define W_RES(k, e) gres[k] = (float)((e * rm[k]) / rdiv)
#define W_64(k, e) g64[k] = e
#define W_32(k, e) g32[k] = (float)e
#define GRAD_LOOP(WR, W6, W3)                                                                  \
    for (int64_t k = 0; k < n; k++) {                                                        \
        const double e = (double)(gr[k] * s) * (double)mk[k];                                \
        WR(k, e);                                                                            \
        const double f = e * m[k];                                                           \
        W6(k, f);                                                                            \
        W3(k, f);                                                                            \
    }
#define GRAD_FN(name, ATTR)                                                                    \
    ATTR static void name(const float *restrict gr, const uint8_t *restrict mk, float s,      \
                          const double *restrict m, const double *restrict rm, double rdiv,   \
                          float *restrict gres, double *restrict g64, float *restrict g32,    \
                          int64_t n)                                                           \
    {                                                                                        \
        switch ((gres != NULL) * 4 + (g64 != NULL) * 2 + (g32 != NULL)) {                    \
        case 1: GRAD_LOOP(W_0, W_0, W_32) break;                                             \
        case 2: GRAD_LOOP(W_0, W_64, W_0) break;                                             \
        case 3: GRAD_LOOP(W_0, W_64, W_32) break;                                            \
        case 5: GRAD_LOOP(W_RES, W_0, W_32) break;                                           \
        case 6: GRAD_LOOP(W_RES, W_64, W_0) break;                                           \
        case 7: GRAD_LOOP(W_RES, W_64, W_32) break;                                          \
        default: break;                                                                      \
        }                                                                                    \
    }

/* The simulator's ir add in exact integers, any multipliers (hat_bpu.ir.simulator.sim_add's
 * int64 form): v = Σ int64(x_i[k]) · m_i, q = clamp(round_shift(v, sh), lo, hi), out = q (float32
 * storage of int8/int16); round_shift(v, sh) = (v + 2**(sh-1) - 1 + ((v >> sh) & 1)) >> sh, the
 * same int64 operations torch runs (wrapping two's-complement sums, arithmetic shifts). */
static void add_int(const float *const *x, const int64_t *m, int nin, int sh, double lo, double hi,
                    float *restrict out, int64_t n)
{
    const uint64_t bias = sh > 0 ? ((uint64_t)1 << (sh - 1)) - 1 : 0;
    for (int64_t k = 0; k < n; k++) {
        uint64_t acc = 0;
        for (int i = 0; i < nin; i++)
            acc += (uint64_t)((int64_t)x[i][k]) * (uint64_t)m[i];
        int64_t v = (int64_t)acc;
        if (sh > 0)
            v = (int64_t)((uint64_t)v + bias + (uint64_t)((v >> sh) & 1)) >> sh;
        double q = (double)v;
        q = q < lo ? lo : q;
        q = q > hi ? hi : q;
        out[k] = (float)q;
    }
}

typedef void (*span_fn)(const void *, int, const double *, const double *, const void *, int,
                        const double *, double, double, double, float *, float, uint8_t *,
                        int64_t);
typedef void (*grad_fn)(const float *, const uint8_t *, float, const double *, const double *,
                        double, float *, double *, float *, int64_t);
typedef void (*quant_fn)(const float *, float, float *, int64_t);
typedef void (*fq_fn)(const float *, float, float, float, float, float *, uint8_t *, int64_t);
typedef void (*mmul_fn)(const float *, const uint8_t *, float *, int64_t);
typedef int (*sum_fn)(const float *const *, const double *, const double *, const double *, int,
                      double, double, double, float, double, float *, int64_t);

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AVX2 __attribute__((target("avx2")))
SPAN_FN(span_avx2, AVX2, ROUND_NEAR, ROUNDX_NEAR)
SPAN_FN(span_base, , ROUND_MAGIC, ROUNDX_MAGIC)
QUANT_FN(quant_avx2, AVX2, ROUNDF_NEAR)
QUANT_FN(quant_base, , ROUNDF_MAGIC)
SUM_FN(sum_avx2, AVX2, ROUND_NEAR, ROUNDX_NEAR)
FQ_FN(fq_avx2, AVX2, ROUNDF_NEAR)
FQ_FN(fq_base, , ROUNDF_MAGIC)
MMUL_FN(mmul_avx2, AVX2)
MMUL_FN(mmul_base, )
GRAD_FN(grad_avx2, AVX2)
GRAD_FN(grad_base, )
SUM_FN(sum_base, , ROUNDX_MAGIC, ROUNDX_MAGIC)
static int best_is_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#define HAVE_AVX2 1
#else
SPAN_FN(span_base, , ROUND_NEAR, ROUNDX_NEAR)
QUANT_FN(quant_base, , ROUNDF_NEAR)
SUM_FN(sum_base, , ROUND_NEAR, ROUNDX_NEAR)
FQ_FN(fq_base, , ROUNDF_NEAR)
MMUL_FN(mmul_base, )
GRAD_FN(grad_base, )
static int best_is_avx2(void) { return 0; }
#define HAVE_AVX2 0
#endif
static span_fn span = span_base; /* the loops in use (set_isa; module init: the best) */
static quant_fn quant = quant_base;
static sum_fn sum = sum_base;
static fq_fn fq = fq_base;
static mmul_fn mmul = mmul_base;
static grad_fn grad = grad_base;

static void use_isa(int avx2)
{
#if HAVE_AVX2
    span = avx2 ? span_avx2 : span_base;
    quant = avx2 ? quant_avx2 : quant_base;
    sum = avx2 ? sum_avx2 : sum_base;
    fq = avx2 ? fq_avx2 : fq_base;
    mmul = avx2 ? mmul_avx2 : mmul_base;
    grad = avx2 ? grad_avx2 : grad_base;
#else
    (void)avx2;
#endif
}

#define AT(p, size, i) ((const void *)((const char *)(p) + (size) * (size_t)(i)))

/* One call's operands; each pass reads what it needs (requant: acc..mask; grad: grad..g32;
 * peak: acc, res, rscale and accumulates lo/hi/nan). */
typedef struct {
    const void *acc, *res;
    int acc_f64, res_kind, bias; /* bias: whether the tile tb holds one (requant) */
    size_t asz, rsz;
    double rdiv, lo, hi, rscale;
    float *out, s;
    uint8_t *mask;
    const float *grad;
    float *gres, *g32;
    double *g64;
    int nan;
} job;
typedef void (*span_job)(job *, int64_t, const double *, const double *, const double *, int64_t);

/* Threads: with OpenMP (built with -fopenmp, where the compiler has it), passes over at least
 * PAR_MIN elements split into n_threads contiguous parts — in the OpenMP runtime already loaded,
 * torch's own (its wheels ship the GNU one under the same soname), so the same pool of threads
 * as torch's kernels: no second pool spinning against it. hat_bpu.native sets n_threads to
 * torch's thread count; 1 = one thread. Every element's value is computed as with one thread
 * (no reduction but min/max/or, which do not depend on the order). */
static int n_threads = 1;
#define PAR_MIN (1 << 16)

static int threads_for(int64_t n) { return n >= PAR_MIN ? n_threads : 1; }

/* The whole tensor, [outer][c][inner], in spans of at most SPAN elements sharing one tile of
 * each per-channel constant (b, m, rm; absent ones read as 0): NHWC rows (inner = 1) SPAN / c
 * whole rows at a time, NCHW planes one plane (or a piece of one) at a time. fn(j, i, tiles,
 * n) does elements i .. i+n-1; spans p0 .. p1-1 of the nspan here. */
static void spans_part(job *j, span_job fn, const double *bias, const double *mult,
                       const double *res_mult, int64_t outer, int64_t c, int64_t inner,
                       int64_t p0, int64_t p1)
{
    double tb[SPAN], tm[SPAN], trm[SPAN];
    if (inner == 1 && c <= SPAN) {
        const int64_t t = (SPAN / c) * c, total = outer * c;
        for (int64_t k = 0; k < t; k++) {
            tb[k] = bias ? bias[k % c] : 0.0;
            tm[k] = mult ? mult[k % c] : 0.0;
            trm[k] = res_mult ? res_mult[k % c] : 0.0;
        }
        for (int64_t p = p0; p < p1; p++) {
            const int64_t i = p * t;
            fn(j, i, tb, tm, trm, total - i < t ? total - i : t);
        }
        return;
    }
    const int64_t seg = inner == 1 ? c : inner, per = (seg + SPAN - 1) / SPAN;
    int64_t tiled = -1; /* the channel the tiles hold (planes) */
    for (int64_t p = p0; p < p1; p++) {
        const int64_t g = p / per, k0 = (p % per) * SPAN;
        const int64_t n = seg - k0 < SPAN ? seg - k0 : SPAN, i = g * seg + k0;
        if (inner == 1) { /* rows longer than SPAN: the constants of channels k0.. */
            for (int64_t k = 0; k < n; k++) {
                tb[k] = bias ? bias[k0 + k] : 0.0;
                tm[k] = mult ? mult[k0 + k] : 0.0;
                trm[k] = res_mult ? res_mult[k0 + k] : 0.0;
            }
        } else if (tiled != g % c) {
            const int64_t ch = tiled = g % c, len = seg < SPAN ? seg : SPAN;
            for (int64_t k = 0; k < len; k++) {
                tb[k] = bias ? bias[ch] : 0.0;
                tm[k] = mult ? mult[ch] : 0.0;
                trm[k] = res_mult ? res_mult[ch] : 0.0;
            }
        }
        fn(j, i, tb, tm, trm, n);
    }
}

static void over_spans(job *j, span_job fn, const double *bias, const double *mult,
                       const double *res_mult, int64_t outer, int64_t c, int64_t inner)
{
    int64_t nspan;
    if (inner == 1 && c <= SPAN) {
        const int64_t t = (SPAN / c) * c;
        nspan = (outer * c + t - 1) / t;
    } else {
        const int64_t seg = inner == 1 ? c : inner;
        nspan = (inner == 1 ? outer : outer * c) * ((seg + SPAN - 1) / SPAN);
    }
    const int nt = threads_for(outer * c * inner);
#ifdef _OPENMP
    if (nt > 1 && nspan > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t p0 = nspan * t / T, p1 = nspan * (t + 1) / T;
            job local = *j; /* the peak's min/max/NaN per thread, merged below */
            spans_part(&local, fn, bias, mult, res_mult, outer, c, inner, p0, p1);
#pragma omp critical
            {
                j->lo = local.lo < j->lo ? local.lo : j->lo;
                j->hi = local.hi > j->hi ? local.hi : j->hi;
                j->nan |= local.nan;
            }
        }
        return;
    }
#endif
    (void)nt;
    spans_part(j, fn, bias, mult, res_mult, outer, c, inner, 0, nspan);
}

/* A flat pass over n elements in n_threads contiguous parts (64-element aligned): the body
 * (the variadic part) runs for elements LO .. HI-1. */
#ifdef _OPENMP
#define ATOMIC_WRITE _Pragma("omp atomic write")
#define FLAT(n, LO, HI, ...)                                                                  \
    do {                                                                                     \
        const int nt_ = threads_for(n);                                                      \
        _Pragma("omp parallel num_threads(nt_) if (nt_ > 1)")                                \
        {                                                                                    \
            const int64_t t_ = omp_get_thread_num(), T_ = omp_get_num_threads();             \
            const int64_t LO = ((n) * t_ / T_) & ~(int64_t)63;                               \
            const int64_t HI = t_ + 1 == T_ ? (n) : ((n) * (t_ + 1) / T_) & ~(int64_t)63;    \
            if (HI > LO) {                                                                   \
                __VA_ARGS__;                                                                 \
            }                                                                                \
        }                                                                                    \
    } while (0)
#else
#define ATOMIC_WRITE
#define FLAT(n, LO, HI, ...)                                                                  \
    do {                                                                                     \
        const int64_t LO = 0, HI = (n);                                                      \
        if (HI > LO) {                                                                       \
            __VA_ARGS__;                                                                     \
        }                                                                                    \
    } while (0)
#endif

static void requant_span(job *j, int64_t i, const double *tb, const double *tm,
                         const double *trm, int64_t n)
{
    span(AT(j->acc, j->asz, i), j->acc_f64, j->bias ? tb : NULL, tm,
         j->res ? AT(j->res, j->rsz, i) : NULL, j->res_kind, trm, j->rdiv, j->lo, j->hi,
         j->out + i, j->s, j->mask ? j->mask + i : NULL, n);
}

static void grad_span(job *j, int64_t i, const double *tb, const double *tm, const double *trm,
                      int64_t n)
{
    (void)tb;
    grad(j->grad + i, j->mask + i, j->s, tm, trm, j->rdiv, j->gres ? j->gres + i : NULL,
         j->g64 ? j->g64 + i : NULL, j->g32 ? j->g32 + i : NULL, n);
}

/* QAT's range update of a conv output (fake_quant.ActFQ.track): min and max of
 * y = (float64(acc) + b) · as [+ round_half_even(float64(res) / rdiv) · rscale], as the torch
 * code forms y; nan set when some y is NaN (torch's min/max are NaN then). */
static void peak_span(job *j, int64_t i, const double *tb, const double *tm, const double *trm,
                      int64_t n)
{
    const float *a32 = (const float *)AT(j->acc, j->asz, i);
    const double *a64 = (const double *)AT(j->acc, j->asz, i);
    const float *r32 = j->res ? (const float *)AT(j->res, sizeof(float), i) : NULL;
    double lo = j->lo, hi = j->hi;
    int nan = 0;
    (void)trm;
    for (int64_t k = 0; k < n; k++) {
        double y = ((j->acc_f64 ? a64[k] : (double)a32[k]) + tb[k]) * tm[k];
        if (r32)
            y = y + nearbyint((double)r32[k] / j->rdiv) * j->rscale;
        lo = y < lo ? y : lo;
        hi = y > hi ? y : hi;
        nan |= y != y;
    }
    j->lo = lo, j->hi = hi, j->nan |= nan;
}

static void requant(const void *acc, int acc_f64, const double *bias, const double *mult,
                    const void *res, int res_f64, const double *res_mult, double rdiv, double lo,
                    double hi, float *out, float s, uint8_t *mask, int64_t outer, int64_t c,
                    int64_t inner)
{
    job j = {0};
    j.acc = acc, j.acc_f64 = acc_f64, j.res = res, j.rdiv = rdiv, j.lo = lo, j.hi = hi;
    j.asz = acc_f64 ? sizeof(double) : sizeof(float);
    j.rsz = res_f64 ? sizeof(double) : sizeof(float);
    j.res_kind = res ? (res_f64 ? 2 : rdiv != 0.0 ? 3 : 1) : 0;
    j.out = out, j.s = s, j.mask = mask;
    j.bias = bias != NULL;
    over_spans(&j, requant_span, bias, mult, res_mult, outer, c, inner);
}

/* max |acc[i] + bias[c]|: whether the float64 form of the simulator is exact */
static double peak_abs(const void *acc, int acc_f64, const double *bias, int64_t outer, int64_t c,
                       int64_t inner)
{
    double hi = 0.0, lo = 0.0;
    int64_t i = 0;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t ch = 0; ch < c; ch++) {
            const double b = bias ? bias[ch] : 0.0;
            for (int64_t k = 0; k < inner; k++, i++) {
                const double x = (acc_f64 ? ((const double *)acc)[i] : ((const float *)acc)[i]) + b;
                hi = x > hi ? x : hi;
                lo = x < lo ? x : lo;
            }
        }
    return hi > -lo ? hi : -lo;
}

static PyObject *py_requant(PyObject *self, PyObject *args)
{
    unsigned long long acc, bias, mult, res, res_mult, out, mask;
    int acc_f64, res_f64, scaled;
    double rdiv, lo, hi, out_scale;
    long long outer, c, inner;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKKKiKdddKidKLLL", &acc, &acc_f64, &bias, &mult, &res, &res_f64,
                          &res_mult, &rdiv, &lo, &hi, &out, &scaled, &out_scale, &mask, &outer,
                          &c, &inner))
        return NULL;
    if (mask && (!bias || (res && (res_f64 || rdiv == 0.0)))) {
        PyErr_SetString(PyExc_ValueError, "requant with a mask: a bias, and no residual or a "
                                          "fake-quant one");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    requant((const void *)(uintptr_t)acc, acc_f64, (const double *)(uintptr_t)bias,
            (const double *)(uintptr_t)mult, (const void *)(uintptr_t)res, res_f64,
            (const double *)(uintptr_t)res_mult, rdiv, lo, hi, (float *)(uintptr_t)out,
            scaled ? (float)out_scale : 1.0f, (uint8_t *)(uintptr_t)mask, outer, c, inner);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_requant_grad(PyObject *self, PyObject *args)
{
    unsigned long long gr, mask, mult, res_mult, gres, g64, g32;
    double s, rdiv;
    long long outer, c, inner;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKdKKdKKKLLL", &gr, &mask, &s, &mult, &res_mult, &rdiv, &gres,
                          &g64, &g32, &outer, &c, &inner))
        return NULL;
    if (gres && !res_mult) {
        PyErr_SetString(PyExc_ValueError, "requant_grad: a residual gradient needs res_mult");
        return NULL;
    }
    job j = {0};
    j.grad = (const float *)(uintptr_t)gr, j.mask = (uint8_t *)(uintptr_t)mask, j.s = (float)s;
    j.rdiv = rdiv, j.gres = (float *)(uintptr_t)gres, j.g64 = (double *)(uintptr_t)g64;
    j.g32 = (float *)(uintptr_t)g32;
    Py_BEGIN_ALLOW_THREADS
    over_spans(&j, grad_span, NULL, (const double *)(uintptr_t)mult,
               (const double *)(uintptr_t)res_mult, outer, c, inner);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_peak(PyObject *self, PyObject *args)
{
    unsigned long long acc, bias, scale, res;
    int acc_f64;
    double rdiv, rscale;
    long long outer, c, inner;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKKKddLLL", &acc, &acc_f64, &bias, &scale, &res, &rdiv, &rscale,
                          &outer, &c, &inner))
        return NULL;
    job j = {0};
    j.acc = (const void *)(uintptr_t)acc, j.acc_f64 = acc_f64, j.res = (const void *)(uintptr_t)res;
    j.asz = acc_f64 ? sizeof(double) : sizeof(float), j.rdiv = rdiv, j.rscale = rscale;
    j.lo = INFINITY, j.hi = -INFINITY;
    Py_BEGIN_ALLOW_THREADS
    over_spans(&j, peak_span, (const double *)(uintptr_t)bias, (const double *)(uintptr_t)scale,
               NULL, outer, c, inner);
    Py_END_ALLOW_THREADS
    if (j.nan)
        return Py_BuildValue("(dd)", NAN, NAN);
    return Py_BuildValue("(dd)", j.lo, j.hi);
}

static PyObject *py_mask_mul(PyObject *self, PyObject *args)
{
    unsigned long long g, mask, out;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKL", &g, &mask, &out, &n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    const float *gp = (const float *)(uintptr_t)g;
    const uint8_t *mp = (const uint8_t *)(uintptr_t)mask;
    float *op = (float *)(uintptr_t)out;
    FLAT(n, lo, hi, mmul(gp + lo, mp + lo, op + lo, hi - lo));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_quantize(PyObject *self, PyObject *args)
{
    unsigned long long x, out;
    double s;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KdKL", &x, &s, &out, &n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    const float *xp = (const float *)(uintptr_t)x;
    float *op = (float *)(uintptr_t)out;
    const float sf = (float)s;
    FLAT(n, lo, hi, quant(xp + lo, sf, op + lo, hi - lo));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_int_sum(PyObject *self, PyObject *args)
{
    unsigned long long xp[4], out;
    double si[4], mi[4], multi[4], inv2s, lo, hi, s, xbound;
    int nin, beyond;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "(KKKK)(dddd)(dddd)(dddd)idddddKL", &xp[0], &xp[1], &xp[2], &xp[3],
                          &si[0], &si[1], &si[2], &si[3], &mi[0], &mi[1], &mi[2], &mi[3],
                          &multi[0], &multi[1], &multi[2], &multi[3], &nin, &inv2s, &lo, &hi, &s,
                          &xbound, &out, &n))
        return NULL;
    if (nin < 1 || nin > 4) {
        PyErr_SetString(PyExc_ValueError, "int_sum: 1 to 4 inputs");
        return NULL;
    }
    const float *x[4];
    for (int i = 0; i < 4; i++)
        x[i] = (const float *)(uintptr_t)xp[i];
    float *op = (float *)(uintptr_t)out;
    beyond = 0;
    Py_BEGIN_ALLOW_THREADS
    FLAT(n, k0, k1, {
        const float *xs[4] = {x[0] + k0, x[1] ? x[1] + k0 : NULL, x[2] ? x[2] + k0 : NULL,
                              x[3] ? x[3] + k0 : NULL};
        if (sum(xs, si, mi, multi, nin, inv2s, lo, hi, (float)s, xbound, op + k0, k1 - k0)) {
            ATOMIC_WRITE
            beyond = 1;
        }
    });
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!beyond);
}

static PyObject *py_fake_quant(PyObject *self, PyObject *args)
{
    unsigned long long x, out, mask;
    double inv, qmin, qmax, s;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KddddKKL", &x, &inv, &qmin, &qmax, &s, &out, &mask, &n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    const float *xp = (const float *)(uintptr_t)x;
    float *op = (float *)(uintptr_t)out;
    uint8_t *mp = (uint8_t *)(uintptr_t)mask;
    FLAT(n, lo, hi, fq(xp + lo, (float)inv, (float)qmin, (float)qmax, (float)s, op + lo,
                       mp ? mp + lo : NULL, hi - lo));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_add_int(PyObject *self, PyObject *args)
{
    unsigned long long xp[4], out;
    long long m[4], n;
    int nin, sh;
    double lo, hi;
    (void)self;
    if (!PyArg_ParseTuple(args, "(KKKK)(LLLL)iiddKL", &xp[0], &xp[1], &xp[2], &xp[3], &m[0], &m[1],
                          &m[2], &m[3], &nin, &sh, &lo, &hi, &out, &n))
        return NULL;
    if (nin < 1 || nin > 4 || sh < 0 || sh > 62) {
        PyErr_SetString(PyExc_ValueError, "add_int: 1 to 4 inputs, shift 0..62");
        return NULL;
    }
    const float *x[4];
    int64_t mm[4];
    for (int i = 0; i < 4; i++) {
        x[i] = (const float *)(uintptr_t)xp[i];
        mm[i] = (int64_t)m[i];
    }
    float *op = (float *)(uintptr_t)out;
    Py_BEGIN_ALLOW_THREADS
    FLAT(n, k0, k1, {
        const float *xs[4] = {x[0] + k0, x[1] ? x[1] + k0 : NULL, x[2] ? x[2] + k0 : NULL,
                              x[3] ? x[3] + k0 : NULL};
        add_int(xs, mm, nin, sh, lo, hi, op + k0, k1 - k0);
    });
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_peak_abs(PyObject *self, PyObject *args)
{
    unsigned long long acc, bias;
    int acc_f64;
    long long outer, c, inner;
    double peak;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKLLL", &acc, &acc_f64, &bias, &outer, &c, &inner))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    peak = peak_abs((const void *)(uintptr_t)acc, acc_f64, (const double *)(uintptr_t)bias, outer,
                    c, inner);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(peak);
}

static PyObject *py_set_threads(PyObject *self, PyObject *args)
{
    int n;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
#ifdef _OPENMP
    n_threads = n < 1 ? 1 : n;
#else
    n_threads = 1;
#endif
    return PyLong_FromLong(n_threads);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args)
{
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    if (strcmp(name, "base") != 0 && strcmp(name, "best") != 0) {
        PyErr_SetString(PyExc_ValueError, "isa: 'base' or 'best'");
        return NULL;
    }
    use_isa(strcmp(name, "best") == 0 && best_is_avx2());
    return PyUnicode_FromString(span == span_base ? "base" : "avx2");
}

static PyMethodDef methods[] = {
    {"set_threads", py_set_threads, METH_VARARGS,
     "set_threads(n) -> the threads the passes now use (1 where built without OpenMP)"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa('base' | 'best') -> the loops now used: 'avx2' or 'base' (tests run both)"},
    {"requant", py_requant, METH_VARARGS,
     "requant(acc, acc_f64, bias, mult, res, res_f64, res_mult, res_div, lo, hi, out, scaled,"
     " out_scale, mask, outer, c, inner); pointers as integers (0 = absent), res_div 0 = none;"
     " mask (uint8, QAT): round(v) inside [lo, hi]"},
    {"requant_grad", py_requant_grad, METH_VARARGS,
     "requant_grad(grad, mask, s, mult, res_mult, res_div, g_res, g64, g32, outer, c, inner):"
     " the backward of requant with a mask"},
    {"peak", py_peak, METH_VARARGS,
     "peak(acc, acc_f64, bias, scale, res, res_div, res_scale, outer, c, inner) -> (min, max) of"
     " (acc + bias)*scale [+ round(res/res_div)*res_scale] (NaN, NaN when some is NaN)"},
    {"mask_mul", py_mask_mul, METH_VARARGS, "mask_mul(g, mask, out, n): out = g * (mask ? 1 : 0)"},
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(x, s, out, n): out = round_half_even(x / s) in float32"},
    {"int_sum", py_int_sum, METH_VARARGS,
     "int_sum((x0..x3), (s_i), (m_i), (mult_i), n_in, 2**-shift, lo, hi, s_out, xbound, out, n)"
     " -> True when every |integer| <= xbound (else out is not to be used)"},
    {"fake_quant", py_fake_quant, METH_VARARGS,
     "fake_quant(x, inv, qmin, qmax, s, out, mask, n): out = clamp(round(x*inv))*s, mask"},
    {"add_int", py_add_int, METH_VARARGS,
     "add_int((x0..x3), (m_i), n_in, shift, lo, hi, out, n): the simulator's int64 add"},
    {"peak_abs", py_peak_abs, METH_VARARGS,
     "peak_abs(acc, acc_f64, bias, outer, c, inner) -> max |acc + bias|"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void)
{
    use_isa(best_is_avx2());
    return PyModule_Create(&module);
}
