/* The fused path of LAMB and LANS on CPU: the two passes of each optimizer as OpenMP loops over
   every tensor of a group (see _cpu_fused.py, which compiles this file on first use and calls it
   through ctypes). Each block's sums are kept apart and added per tensor in block order, in float64,
   so the result does not depend on the thread count or schedule. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef BLOCK
#define BLOCK 16384  /* elements per work item; the build passes _cpu_fused._BLOCK */
#endif

/* Work items: tensor t owns items first[t] .. first[t+1]-1; item k covers elements
   [(k - first[t]) * BLOCK, min(numel[t], ...)). Sums go to part[kind * items + k]. */
static int64_t build_first(int64_t n, const int64_t *numel, int64_t *first) {
    first[0] = 0;
    for (int64_t t = 0; t < n; t++) first[t + 1] = first[t] + (numel[t] + BLOCK - 1) / BLOCK;
    return first[n];
}

static int64_t owner(int64_t k, int64_t n, const int64_t *first) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {  /* the last t with first[t] <= k */
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= k) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static void fold(int64_t n, const int64_t *first, int kinds, int64_t items, const double *part, double *out) {
    for (int c = 0; c < kinds; c++)
        for (int64_t t = 0; t < n; t++) {
            double s = 0.0;
            for (int64_t k = first[t]; k < first[t + 1]; k++) s += part[c * items + k];
            out[c * n + t] = s;
        }
}

/* The work items of a call (first[], freed by the caller, and their number), and item k's range. */
#define ITEMS int64_t *first = malloc((n + 1) * sizeof(int64_t)); int64_t items = build_first(n, numel, first);
#define ITEM_RANGE(k) int64_t t = owner(k, n, first);                                                   \
    int64_t lo = (k - first[t]) * BLOCK, hi = lo + BLOCK < numel[t] ? lo + BLOCK : numel[t];

#define KERNELS(T, SUFFIX, SQRT)                                                                          \
void lb_sumsq_##SUFFIX(int64_t n, T **g, const int64_t *numel, double *out, int threads) {           \
    ITEMS                                                                                            \
    double *part = malloc((items ? items : 1) * sizeof(double));                                     \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        const T *gp = g[t];                                                                          \
        double s = 0.0;                                                                              \
        _Pragma("omp simd reduction(+:s)")                                                           \
        for (int64_t j = lo; j < hi; j++) s += (double)gp[j] * (double)gp[j];                        \
        part[k] = s;                                                                                 \
    }                                                                                                \
    fold(n, first, 1, items, part, out);                                                             \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
/* hp: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, clip factor (1: none) */                      \
void lb_lamb_pass1_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *hp, int adapt,       \
                            double *out, int threads) {                                              \
    ITEMS                                                                                            \
    double *part = malloc((items ? 2 * items : 1) * sizeof(double));                                 \
    const T b1 = (T)hp[0], omb1 = (T)hp[1], b2 = (T)hp[2], omb2 = (T)hp[3], eps = (T)hp[4];          \
    const T wd = (T)hp[5], inv_clip = (T)(1.0 / hp[6]);                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        T *pp = p[t], *gp = g[t], *mp = m[t], *vp = v[t];                                            \
        const T r1 = (T)(1.0 / bc1[t]), rs2 = (T)(1.0 / sqrt(bc2[t]));                               \
        double sx = 0.0, su = 0.0;                                                                   \
        _Pragma("omp simd reduction(+:sx,su)")                                                       \
        for (int64_t j = lo; j < hi; j++) {                                                          \
            T gj = gp[j] * inv_clip;                                                                 \
            T mj = mp[j] * b1 + gj * omb1;                                                           \
            T vj = vp[j] * b2 + gj * gj * omb2;                                                      \
            mp[j] = mj; vp[j] = vj;                                                                  \
            T u = mj * r1 / (SQRT(vj) * rs2 + eps) + wd * pp[j];                                     \
            sx += (double)pp[j] * (double)pp[j];                                                     \
            su += (double)u * (double)u;                                                             \
        }                                                                                            \
        part[k] = sx; part[items + k] = su;                                                          \
    }                                                                                                \
    if (adapt) fold(n, first, 2, items, part, out);                                                  \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
void lb_lamb_pass2_##SUFFIX(int64_t n, T **p, T **m, T **v, const int64_t *numel,                    \
                            const double *bc1, const double *bc2, const double *hp,                  \
                            const double *scale, int threads) {                                      \
    ITEMS                                                                                            \
    const T eps = (T)hp[4], wd = (T)hp[5];                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        T *pp = p[t], *mp = m[t], *vp = v[t];                                                        \
        const T r1 = (T)(1.0 / bc1[t]), rs2 = (T)(1.0 / sqrt(bc2[t])), s = (T)scale[t];              \
        _Pragma("omp simd")                                                                          \
        for (int64_t j = lo; j < hi; j++) {                                                          \
            T u = mp[j] * r1 / (SQRT(vp[j]) * rs2 + eps) + wd * pp[j];                               \
            pp[j] = pp[j] + u * s;                                                                   \
        }                                                                                            \
    }                                                                                                \
    free(first);                                                                                     \
}                                                                                                    \
                                                                                                     \
/* LANS: g_hat = g / gnorm[t]; r = m_hat/denom + wd p, c = g_hat/denom + wd p */                    \
void lb_lans_pass1_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *gnorm,               \
                            const double *hp, int adapt, double *out, int threads) {                 \
    ITEMS                                                                                            \
    double *part = malloc((items ? 3 * items : 1) * sizeof(double));                                 \
    const T b1 = (T)hp[0], omb1 = (T)hp[1], b2 = (T)hp[2], omb2 = (T)hp[3], eps = (T)hp[4];          \
    const T wd = (T)hp[5];                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        T *pp = p[t], *gp = g[t], *mp = m[t], *vp = v[t];                                            \
        const T r1 = (T)(1.0 / bc1[t]), rs2 = (T)(1.0 / sqrt(bc2[t])), rgn = (T)(1.0 / gnorm[t]);    \
        double sx = 0.0, sr = 0.0, sc = 0.0;                                                         \
        _Pragma("omp simd reduction(+:sx,sr,sc)")                                                    \
        for (int64_t j = lo; j < hi; j++) {                                                          \
            T gh = gp[j] * rgn;                                                                      \
            T mj = mp[j] * b1 + gh * omb1;                                                           \
            T vj = vp[j] * b2 + gh * gh * omb2;                                                      \
            mp[j] = mj; vp[j] = vj;                                                                  \
            T inv = (T)1 / (SQRT(vj) * rs2 + eps);                                                   \
            T r = mj * r1 * inv + wd * pp[j];                                                        \
            T c = gh * inv + wd * pp[j];                                                             \
            sx += (double)pp[j] * (double)pp[j];                                                     \
            sr += (double)r * (double)r;                                                             \
            sc += (double)c * (double)c;                                                             \
        }                                                                                            \
        part[k] = sx; part[items + k] = sr; part[2 * items + k] = sc;                                \
    }                                                                                                \
    if (adapt) fold(n, first, 3, items, part, out);                                                  \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
void lb_lans_pass2_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *gnorm,               \
                            const double *hp, const double *scale_r, const double *scale_c,          \
                            int threads) {                                                           \
    ITEMS                                                                                            \
    const T eps = (T)hp[4], wd = (T)hp[5];                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        T *pp = p[t], *gp = g[t], *mp = m[t], *vp = v[t];                                            \
        const T r1 = (T)(1.0 / bc1[t]), rs2 = (T)(1.0 / sqrt(bc2[t])), rgn = (T)(1.0 / gnorm[t]);    \
        const T s_r = (T)scale_r[t], s_c = (T)scale_c[t];                                            \
        _Pragma("omp simd")                                                                          \
        for (int64_t j = lo; j < hi; j++) {                                                          \
            T gh = gp[j] * rgn;                                                                      \
            T inv = (T)1 / (SQRT(vp[j]) * rs2 + eps);                                                \
            T r = mp[j] * r1 * inv + wd * pp[j];                                                     \
            T c = gh * inv + wd * pp[j];                                                             \
            pp[j] = pp[j] + r * s_r + c * s_c;                                                       \
        }                                                                                            \
    }                                                                                                \
    free(first);                                                                                     \
}

KERNELS(double, f64, sqrt)
KERNELS(float, f32, sqrtf)
