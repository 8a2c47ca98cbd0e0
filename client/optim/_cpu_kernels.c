/* The fused path of LAMB and LANS on CPU (see _cpu_fused.py, which compiles this file on first use and
   calls it through ctypes). Each block's sums are kept apart and added per tensor in block order, in
   float64, so the result does not depend on the thread count or schedule.

   Two drivers share the per-block bodies:
   - lb_*_step: the whole update in one call. Consecutive tensors are taken in batches of at most
     BATCH_NUMEL elements (a bigger tensor alone); each batch goes whole to one thread, which runs its
     pass 1, its trust ratios, then its pass 2 backwards, so that pass 2 reads what pass 1 left in cache
     instead of memory (a step is bound by memory reads on CPU); for a batch of up to `keep` elements
     pass 1 also keeps the updates in a per-thread buffer, so pass 2 reads p and them instead of
     recomputing them from p, m, v (and g): no second square root and division per element. The
     threads take the batches one at a time, largest first: no barrier, so a descheduled thread holds
     up nobody (a barrier per batch, the threads sharing each batch, measured 3x slower at 2 threads
     on a busy machine).
   - lb_*_pass1 / lb_*_pass2: pass 1 over every tensor, then pass 2, the blocks handed to the threads
     dynamically: for a tensor bigger than a thread's share of the step (which one thread would hold
     up the others on), and for sharded parameters, whose norms are summed over the ranks in between
     (by the caller, in Python). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#ifndef BLOCK
#define BLOCK 16384  /* elements per work item; the build passes _cpu_fused._BLOCK */
#endif
#ifndef BATCH_NUMEL
#define BATCH_NUMEL (1 << 20)  /* elements per batch of small tensors; the build passes _cpu_fused._BATCH */
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

/* out[c * n + t] for tensors t0 .. t1-1: their blocks' sums of kind c, in block order */
static void fold(int64_t n, int64_t t0, int64_t t1, const int64_t *first, int kinds, int64_t items,
                 const double *part, double *out) {
    for (int c = 0; c < kinds; c++)
        for (int64_t t = t0; t < t1; t++) {
            double s = 0.0;
            for (int64_t k = first[t]; k < first[t + 1]; k++) s += part[c * items + k];
            out[c * n + t] = s;
        }
}

/* The trust ratio of torch's _tensors.trust_ratios (float64): phi(||x||) / ||u||, 1 where a norm is 0 */
static double ratio(double x_sq, double u_sq, int adapt, const double *phi) {
    if (!adapt) return 1.0;
    double x = sqrt(x_sq), u = sqrt(u_sq);
    double f = phi[0] != 0 ? fmin(fmax(x, phi[1]), phi[2]) : x;
    return (x > 0 && u > 0) ? f / u : 1.0;
}

/* The work items of a call (first[], freed by the caller, and their number), and item k's range. */
#define ITEMS int64_t *first = malloc((n + 1) * sizeof(int64_t)); int64_t items = build_first(n, numel, first);
#define ITEM_RANGE(k) int64_t t = owner(k, n, first);                                                   \
    int64_t lo = (k - first[t]) * BLOCK, hi = lo + BLOCK < numel[t] ? lo + BLOCK : numel[t];

/* Sums run on LANES accumulators, element j on lane j % LANES: independent chains of fma that the
   vectoriser keeps in registers (one accumulator waits out the fma latency on every element), added in
   a fixed order, so the result still does not depend on the thread count. */
#define LANES 32
#define QLANES (LANES / 4)  /* lanes per stream where four streams are read at once */
static inline double lanes_sum(const double *s) {
    double t = 0.0;
    for (int l = 0; l < LANES; l++) t += s[l];
    return t;
}

/* Pass 1's loop over j in [lo, hi): each operand read as two streams, the two halves of the block side
   by side (more reads in flight per core: measured 4-8% off pass 1 on BERT-base shapes at one thread),
   the first half on lanes 0 .. LANES/2-1, the second on the rest; the tail on lane 0. */
#define HALVES(UPDATE)                                                                               \
    int64_t h = (hi - lo) / LANES * (LANES / 2);                                                     \
    for (int64_t j0 = lo; j0 < lo + h; j0 += LANES / 2) {                                            \
        _Pragma("omp simd")                                                                          \
        for (int l = 0; l < LANES / 2; l++) {                                                        \
            { int64_t j = j0 + l; int lane = l; UPDATE }                                             \
            { int64_t j = j0 + h + l; int lane = LANES / 2 + l; UPDATE }                             \
        }                                                                                            \
    }                                                                                                \
    for (int64_t j = lo + 2 * h; j < hi; j++) { int lane = 0; UPDATE }

/* One element of pass 1 (j, on accumulator lane `lane`; sums sx, su / sr, sc in float64, by fma: the
   squares are exact). */
#define LAMB_UPDATE(T, SQRT)                                                                         \
    T gj = gp[j] * inv_clip;                                                                         \
    T mj = mp[j] * b1 + gj * omb1;                                                                   \
    T vj = vp[j] * b2 + gj * gj * omb2;                                                              \
    mp[j] = mj; vp[j] = vj;                                                                          \
    T u = mj * r1 / (SQRT(vj) * rs2 + eps) + wd * pp[j];                                             \
    sx[lane] = fma((double)pp[j], (double)pp[j], sx[lane]);                                          \
    su[lane] = fma((double)u, (double)u, su[lane]);
#define LANS_UPDATE(T, SQRT)                                                                         \
    T gh = gp[j] * rgn;                                                                              \
    T mj = mp[j] * b1 + gh * omb1;                                                                   \
    T vj = vp[j] * b2 + gh * gh * omb2;                                                              \
    mp[j] = mj; vp[j] = vj;                                                                          \
    T inv = (T)1 / (SQRT(vj) * rs2 + eps);                                                           \
    T r = mj * r1 * inv + wd * pp[j];                                                                \
    T c = gh * inv + wd * pp[j];                                                                     \
    sx[lane] = fma((double)pp[j], (double)pp[j], sx[lane]);                                          \
    sr[lane] = fma((double)r, (double)r, sr[lane]);                                                  \
    sc[lane] = fma((double)c, (double)c, sc[lane]);

/* The same, keeping the update for pass 2 (up: LAMB's u; LANS's r, and c at cp). */
#define LAMB_KEEP(T, SQRT) LAMB_UPDATE(T, SQRT) up[j] = u;
#define LANS_KEEP(T, SQRT) LANS_UPDATE(T, SQRT) up[j] = r; cp[j] = c;

/* A thread's scratch for the updates it keeps between the passes (grown, never shrunk: the OpenMP
   threads live as long as the process, and so does one buffer each). NULL if it cannot grow. */
static _Thread_local void *kept = NULL;
static _Thread_local size_t kept_bytes = 0;
static void *keep_buffer(size_t bytes) {
    if (bytes > kept_bytes) {
        free(kept);
        kept = malloc(bytes);
        kept_bytes = kept ? bytes : 0;
    }
    return kept;
}

/* The per-block bodies of one dtype. hp: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay,
   clip factor (1: none). LANS: g_hat = g / gnorm[t]; r = m_hat/denom + wd p, c = g_hat/denom + wd p. */
#define BODIES(T, SUFFIX, SQRT)                                                                          \
static inline void lamb1_##SUFFIX(T *pp, const T *gp, T *mp, T *vp, T *up, int64_t lo, int64_t hi, T r1, \
                                  T rs2, const double *hp, double *sx_out, double *su_out) {         \
    const T b1 = (T)hp[0], omb1 = (T)hp[1], b2 = (T)hp[2], omb2 = (T)hp[3], eps = (T)hp[4];          \
    const T wd = (T)hp[5], inv_clip = (T)(1.0 / hp[6]);                                              \
    double sx[LANES] = {0}, su[LANES] = {0};                                                         \
    if (up) { HALVES(LAMB_KEEP(T, SQRT)) } else { HALVES(LAMB_UPDATE(T, SQRT)) }                     \
    *sx_out = lanes_sum(sx); *su_out = lanes_sum(su);                                                \
}                                                                                                    \
                                                                                                     \
/* pass 2 from the kept updates: the same values pass 2 would recompute, so the same bits */        \
static inline void lamb2k_##SUFFIX(T *pp, const T *up, int64_t lo, int64_t hi, T s) {              \
    _Pragma("omp simd")                                                                              \
    for (int64_t j = lo; j < hi; j++) pp[j] = pp[j] + up[j] * s;                                     \
}                                                                                                    \
                                                                                                     \
static inline void lamb2_##SUFFIX(T *pp, const T *mp, const T *vp, int64_t lo, int64_t hi, T r1, T rs2,   \
                                  const double *hp, T s) {                                           \
    const T eps = (T)hp[4], wd = (T)hp[5];                                                           \
    _Pragma("omp simd")                                                                              \
    for (int64_t j = lo; j < hi; j++) {                                                              \
        T u = mp[j] * r1 / (SQRT(vp[j]) * rs2 + eps) + wd * pp[j];                                   \
        pp[j] = pp[j] + u * s;                                                                       \
    }                                                                                                \
}                                                                                                    \
                                                                                                     \
static inline void lans1_##SUFFIX(T *pp, const T *gp, T *mp, T *vp, T *up, T *cp, int64_t lo, int64_t hi, \
                                  T r1, T rs2, T rgn, const double *hp, double *sums) {              \
    const T b1 = (T)hp[0], omb1 = (T)hp[1], b2 = (T)hp[2], omb2 = (T)hp[3], eps = (T)hp[4];          \
    const T wd = (T)hp[5];                                                                           \
    double sx[LANES] = {0}, sr[LANES] = {0}, sc[LANES] = {0};                                        \
    if (up) { HALVES(LANS_KEEP(T, SQRT)) } else { HALVES(LANS_UPDATE(T, SQRT)) }                     \
    sums[0] = lanes_sum(sx); sums[1] = lanes_sum(sr); sums[2] = lanes_sum(sc);                       \
}                                                                                                    \
                                                                                                     \
static inline void lans2_##SUFFIX(T *pp, const T *gp, const T *mp, const T *vp, int64_t lo, int64_t hi,   \
                                  T r1, T rs2, T rgn, const double *hp, T s_r, T s_c) {              \
    const T eps = (T)hp[4], wd = (T)hp[5];                                                           \
    _Pragma("omp simd")                                                                              \
    for (int64_t j = lo; j < hi; j++) {                                                              \
        T gh = gp[j] * rgn;                                                                          \
        T inv = (T)1 / (SQRT(vp[j]) * rs2 + eps);                                                    \
        T r = mp[j] * r1 * inv + wd * pp[j];                                                         \
        T c = gh * inv + wd * pp[j];                                                                 \
        pp[j] = pp[j] + r * s_r + c * s_c;                                                           \
    }                                                                                                \
}                                                                                                    \
                                                                                                     \
static inline void lans2k_##SUFFIX(T *pp, const T *up, const T *cp, int64_t lo, int64_t hi, T s_r,  \
                                   T s_c) {                                                          \
    _Pragma("omp simd")                                                                              \
    for (int64_t j = lo; j < hi; j++) pp[j] = pp[j] + up[j] * s_r + cp[j] * s_c;                     \
}

/* Batches: tensors t0 .. t1-1, consecutive, at most BATCH_NUMEL elements (or one bigger tensor). */
static int64_t batch_end(int64_t n, int64_t t0, const int64_t *numel) {
    int64_t t1 = t0 + 1, total = numel[t0];
    while (t1 < n && total + numel[t1] <= BATCH_NUMEL) total += numel[t1++];
    return t1;
}

/* The batches of the one-call drivers, largest first, so that threads taking them one at a time finish
   together (longest-processing-time order); ties in tensor order, so the order is the same every step. */
typedef struct { int64_t size, t0, t1; } Batch;

static int larger_first(const void *x, const void *y) {
    const Batch *a = x, *b = y;
    if (a->size != b->size) return a->size < b->size ? 1 : -1;
    return (a->t0 > b->t0) - (a->t0 < b->t0);
}

/* *out (freed by the caller) gets the batches; returns their number. */
static int64_t batches(int64_t n, const int64_t *numel, Batch **out) {
    Batch *b = malloc((n ? n : 1) * sizeof(Batch));
    int64_t count = 0;
    for (int64_t t0 = 0; t0 < n; count++) {
        int64_t t1 = batch_end(n, t0, numel), size = 0;
        for (int64_t t = t0; t < t1; t++) size += numel[t];
        b[count] = (Batch){size, t0, t1};
        t0 = t1;
    }
    qsort(b, (size_t)count, sizeof(Batch), larger_first);
    *out = b;
    return count;
}

/* at[t]: where tensor t starts in the concatenation of all (a batch's kept updates sit at at[t] - at[t0]). */
static int64_t *offsets(int64_t n, const int64_t *numel) {
    int64_t *at = malloc((n + 1) * sizeof(int64_t));
    at[0] = 0;
    for (int64_t t = 0; t < n; t++) at[t + 1] = at[t] + numel[t];
    return at;
}

#define KERNELS(T, SUFFIX, SQRT)                                                                          \
BODIES(T, SUFFIX, SQRT)                                                                              \
void lb_sumsq_##SUFFIX(int64_t n, T **g, const int64_t *numel, double *out, int threads) {           \
    ITEMS                                                                                            \
    double *part = malloc((items ? items : 1) * sizeof(double));                                     \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        /* four quarters of the block read side by side: one core keeps more reads in flight over \
           four streams than over one (alone, this pass read at half the bytes per second of AdamW's) */ \
        const T *a = g[t] + lo;                                                                      \
        int64_t q = (hi - lo) / (4 * QLANES) * QLANES;                                               \
        double s[4 * QLANES] = {0};                                                                  \
        for (int64_t j0 = 0; j0 < q; j0 += QLANES) {                                                 \
            _Pragma("omp simd")                                                                      \
            for (int l = 0; l < QLANES; l++) {                                                       \
                double x0 = a[j0 + l], x1 = a[q + j0 + l], x2 = a[2 * q + j0 + l], x3 = a[3 * q + j0 + l]; \
                s[l] = fma(x0, x0, s[l]); s[QLANES + l] = fma(x1, x1, s[QLANES + l]);                \
                s[2 * QLANES + l] = fma(x2, x2, s[2 * QLANES + l]);                                  \
                s[3 * QLANES + l] = fma(x3, x3, s[3 * QLANES + l]);                                  \
            }                                                                                        \
        }                                                                                            \
        for (int64_t j = 4 * q; j < hi - lo; j++) s[0] = fma((double)a[j], (double)a[j], s[0]);      \
        part[k] = lanes_sum(s);                                                                      \
    }                                                                                                \
    fold(n, 0, n, first, 1, items, part, out);                                                       \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
void lb_lamb_pass1_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *hp, int adapt,       \
                            double *out, int threads) {                                              \
    ITEMS                                                                                            \
    double *part = malloc((items ? 2 * items : 1) * sizeof(double));                                 \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        lamb1_##SUFFIX(p[t], g[t], m[t], v[t], NULL, lo, hi, (T)(1.0 / bc1[t]), (T)(1.0 / sqrt(bc2[t])), \
                       hp, &part[k], &part[items + k]);                                              \
    }                                                                                                \
    if (adapt) fold(n, 0, n, first, 2, items, part, out);                                            \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
void lb_lamb_pass2_##SUFFIX(int64_t n, T **p, T **m, T **v, const int64_t *numel,                    \
                            const double *bc1, const double *bc2, const double *hp,                  \
                            const double *scale, int threads) {                                      \
    ITEMS                                                                                            \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        lamb2_##SUFFIX(p[t], m[t], v[t], lo, hi, (T)(1.0 / bc1[t]), (T)(1.0 / sqrt(bc2[t])), hp,     \
                       (T)scale[t]);                                                                 \
    }                                                                                                \
    free(first);                                                                                     \
}                                                                                                    \
                                                                                                     \
/* lr_phi: lr, then 1 and phi's bounds (or 0: none); scale: the step's -lr * ratio per tensor */    \
void lb_lamb_step_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,             \
                           const double *bc1, const double *bc2, const double *hp, int adapt,        \
                           const double *lr_phi, double *scale, int64_t keep, int threads) {         \
    ITEMS                                                                                            \
    double *part = malloc((items ? 2 * items : 1) * sizeof(double));                                 \
    double *sq = malloc((n ? 2 * n : 1) * sizeof(double));                                           \
    int64_t *at = offsets(n, numel);                                                                 \
    Batch *bounds; int64_t nb = batches(n, numel, &bounds);                                          \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                            \
    for (int64_t i = 0; i < nb; i++) {                                                               \
        int64_t t0 = bounds[i].t0, t1 = bounds[i].t1;                                                \
        T *us = bounds[i].size <= keep ? keep_buffer((size_t)bounds[i].size * sizeof(T)) : NULL;     \
        for (int64_t k = first[t0]; k < first[t1]; k++) {                                            \
            ITEM_RANGE(k)                                                                            \
            lamb1_##SUFFIX(p[t], g[t], m[t], v[t], us ? us + (at[t] - at[t0]) : NULL, lo, hi,       \
                           (T)(1.0 / bc1[t]), (T)(1.0 / sqrt(bc2[t])), hp, &part[k], &part[items + k]); \
        }                                                                                            \
        fold(n, t0, t1, first, 2, items, part, sq);                                                  \
        for (int64_t t = t0; t < t1; t++)                                                            \
            scale[t] = -lr_phi[0] * ratio(sq[t], sq[n + t], adapt, lr_phi + 1);                      \
        for (int64_t k = first[t1] - 1; k >= first[t0]; k--) {                                       \
            ITEM_RANGE(k)                                                                            \
            if (us)                                                                                  \
                lamb2k_##SUFFIX(p[t], us + (at[t] - at[t0]), lo, hi, (T)scale[t]);                   \
            else                                                                                     \
                lamb2_##SUFFIX(p[t], m[t], v[t], lo, hi, (T)(1.0 / bc1[t]), (T)(1.0 / sqrt(bc2[t])), \
                               hp, (T)scale[t]);                                                     \
        }                                                                                            \
    }                                                                                                \
    free(bounds); free(at);                                                                          \
    free(sq); free(part); free(first);                                                               \
}                                                                                                    \
                                                                                                     \
void lb_lans_pass1_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *gnorm,               \
                            const double *hp, int adapt, double *out, int threads) {                 \
    ITEMS                                                                                            \
    double *part = malloc((items ? 3 * items : 1) * sizeof(double));                                 \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        double sums[3];                                                                              \
        lans1_##SUFFIX(p[t], g[t], m[t], v[t], NULL, NULL, lo, hi, (T)(1.0 / bc1[t]),                 \
                       (T)(1.0 / sqrt(bc2[t])), (T)(1.0 / gnorm[t]), hp, sums);                      \
        part[k] = sums[0]; part[items + k] = sums[1]; part[2 * items + k] = sums[2];                 \
    }                                                                                                \
    if (adapt) fold(n, 0, n, first, 3, items, part, out);                                            \
    free(part); free(first);                                                                         \
}                                                                                                    \
                                                                                                     \
void lb_lans_pass2_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,            \
                            const double *bc1, const double *bc2, const double *gnorm,               \
                            const double *hp, const double *scale_r, const double *scale_c,          \
                            int threads) {                                                           \
    ITEMS                                                                                            \
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")                                \
    for (int64_t k = 0; k < items; k++) {                                                            \
        ITEM_RANGE(k)                                                                                \
        lans2_##SUFFIX(p[t], g[t], m[t], v[t], lo, hi, (T)(1.0 / bc1[t]), (T)(1.0 / sqrt(bc2[t])),   \
                       (T)(1.0 / gnorm[t]), hp, (T)scale_r[t], (T)scale_c[t]);                       \
    }                                                                                                \
    free(first);                                                                                     \
}                                                                                                    \
                                                                                                     \
/* lr_phi as for LAMB; scale: -beta1 lr ratio_r per tensor, then -(1-beta1) lr ratio_c */            \
void lb_lans_step_##SUFFIX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,             \
                           const double *bc1, const double *bc2, const double *gnorm,                \
                           const double *hp, int adapt, const double *lr_phi, double *scale,         \
                           int64_t keep, int threads) {                                              \
    ITEMS                                                                                            \
    double *part = malloc((items ? 3 * items : 1) * sizeof(double));                                 \
    double *sq = malloc((n ? 3 * n : 1) * sizeof(double));                                           \
    int64_t *at = offsets(n, numel);                                                                 \
    Batch *bounds; int64_t nb = batches(n, numel, &bounds);                                          \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                            \
    for (int64_t i = 0; i < nb; i++) {                                                               \
        int64_t t0 = bounds[i].t0, t1 = bounds[i].t1, size = bounds[i].size;                         \
        T *us = size <= keep ? keep_buffer(2 * (size_t)size * sizeof(T)) : NULL;                     \
        for (int64_t k = first[t0]; k < first[t1]; k++) {                                            \
            ITEM_RANGE(k)                                                                            \
            double sums[3];                                                                          \
            T *up = us ? us + (at[t] - at[t0]) : NULL;                                               \
            lans1_##SUFFIX(p[t], g[t], m[t], v[t], up, up ? up + size : NULL, lo, hi, (T)(1.0 / bc1[t]), \
                           (T)(1.0 / sqrt(bc2[t])), (T)(1.0 / gnorm[t]), hp, sums);                  \
            part[k] = sums[0]; part[items + k] = sums[1]; part[2 * items + k] = sums[2];             \
        }                                                                                            \
        fold(n, t0, t1, first, 3, items, part, sq);                                                  \
        for (int64_t t = t0; t < t1; t++) {                                                          \
            scale[t] = -hp[0] * lr_phi[0] * ratio(sq[t], sq[n + t], adapt, lr_phi + 1);              \
            scale[n + t] = -hp[1] * lr_phi[0] * ratio(sq[t], sq[2 * n + t], adapt, lr_phi + 1);      \
        }                                                                                            \
        for (int64_t k = first[t1] - 1; k >= first[t0]; k--) {                                       \
            ITEM_RANGE(k)                                                                            \
            if (us)                                                                                  \
                lans2k_##SUFFIX(p[t], us + (at[t] - at[t0]), us + size + (at[t] - at[t0]), lo, hi,   \
                                (T)scale[t], (T)scale[n + t]);                                       \
            else                                                                                     \
                lans2_##SUFFIX(p[t], g[t], m[t], v[t], lo, hi, (T)(1.0 / bc1[t]),                    \
                               (T)(1.0 / sqrt(bc2[t])), (T)(1.0 / gnorm[t]), hp, (T)scale[t],        \
                               (T)scale[n + t]);                                                     \
        }                                                                                            \
    }                                                                                                \
    free(bounds); free(at);                                                                          \
    free(sq); free(part); free(first);                                                               \
}

KERNELS(double, f64, sqrt)
KERNELS(float, f32, sqrtf)
