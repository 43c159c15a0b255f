/* CPU kernels for newtonlm: linear recurrences and sequential cell forwards.
 *
 * On a few CPU cores there is no parallelism over T worth buying with extra arithmetic: every
 * channel of a diagonal (or 2x2-block) recurrence is independent, so each thread owns a block of
 * channels and walks through time, vectorized over the block. Memory is [B, T, ..., N]
 * contiguous; a block of CH channels at one time step is contiguous.
 *
 * Work items are (batch row, block of CH channels), numbered w = b * ceil(N / CH) + block; each
 * function processes items [w_begin, w_end) so that the caller can split them over threads.
 * Compiled at first use by newtonlm/kernels/cpu_ext.py (gcc, cached), called through ctypes.
 * Every function exists for float (suffix _f32) and double (_f64).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CH 64 /* channels per work item: 256 B of fp32 state, stays in L1 */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* sigmoid and tanh, finite and accurate for every finite input, also under -ffast-math (which
 * assumes no infinities: the former forms returned NaN once exp overflowed, e.g. sigmoid(x) for
 * x < -88.7 in fp32 through the vectorized reciprocal of 1 + inf):
 *   sigmoid(x) = 1 / (1 + exp(min(-x, L))), L = 80 (fp32) or 700 (fp64): the clamp keeps exp
 *     finite; below -L the result is 1 / (1 + exp(L)) (1.8e-35 in fp32, 9.9e-305 in fp64)
 *     instead of the true value, which is smaller still: an absolute error below that bound;
 *   tanh(x) = sign(x) * -m / (2 + m), m = expm1(-2|x|) in [-1, 0]: no overflow, +-1 exactly in
 *     saturation, and a few ulp of relative error near 0 (the former 2 / (1 + exp(-2x)) - 1
 *     cancelled there: it lost ~log10(1/|x|) digits and returned 0 for |x| < 3e-8 in fp32).
 * glibc >= 2.35 (x86-64) vectorizes expm1 under -ffast-math (libmvec); older libms call the
 * scalar expm1 per element: correct, slower. */
static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + expf(fminf(-x, 80.0f))); }
static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp(fmin(-x, 700.0))); }

static inline float tanh_f32(float x) {
    float m = expm1f(-2.0f * fabsf(x));
    return copysignf(-m / (2.0f + m), x);
}

static inline double tanh_f64(double x) {
    double m = expm1(-2.0 * fabs(x));
    return copysign(-m / (2.0 + m), x);
}

#define SIGMOID(T_, x) SIGMOID_FN(x)

/* h_t = J_t h_{t-1} + r_t  (reverse: h_t = J_t h_{t+1} + r_t); J, r, out: [B, T, N]; h0: [B, N] or NULL */
#define DEF_SCAN_DIAG(SUF, T_)                                                                  \
    void scan_diag_##SUF(const T_ *J, const T_ *r, const T_ *h0, T_ *out, int64_t B, int64_t T, \
                         int64_t N, int reverse, int64_t w_begin, int64_t w_end) {                                \
        int64_t nblk = (N + CH - 1) / CH;                                                       \
        for (int64_t w = w_begin; w < w_end; w++) {                                                \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                \
            T_ h[CH];                                                                           \
            for (int64_t j = 0; j < len; j++) h[j] = h0 ? h0[b * N + n0 + j] : (T_)0;           \
            for (int64_t s = 0; s < T; s++) {                                                   \
                int64_t t = reverse ? T - 1 - s : s;                                            \
                int64_t o = (b * T + t) * N + n0;                                               \
                const T_ *Jt = J + o, *rt = r + o;                                              \
                T_ *ot = out + o;                                                               \
                _Pragma("omp simd")                                                             \
                for (int64_t j = 0; j < len; j++) {                                             \
                    h[j] = Jt[j] * h[j] + rt[j];                                                \
                    ot[j] = h[j];                                                               \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

/* 2x2 blocks: state [B, T, 2, N], J [B, T, 2, 2, N] (J[i][j] = d s_i / d s_prev_j), h0 [B, 2, N] */
#define DEF_SCAN_BLOCK2(SUF, T_)                                                                  \
    void scan_block2_##SUF(const T_ *J, const T_ *r, const T_ *h0, T_ *out, int64_t B, int64_t T, \
                           int64_t N, int reverse, int64_t w_begin, int64_t w_end) {                                \
        int64_t nblk = (N + CH - 1) / CH;                                                         \
        for (int64_t w = w_begin; w < w_end; w++) {                                                  \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                  \
            T_ x0[CH], x1[CH];                                                                    \
            for (int64_t j = 0; j < len; j++) {                                                   \
                x0[j] = h0 ? h0[(b * 2 + 0) * N + n0 + j] : (T_)0;                                \
                x1[j] = h0 ? h0[(b * 2 + 1) * N + n0 + j] : (T_)0;                                \
            }                                                                                     \
            for (int64_t s = 0; s < T; s++) {                                                     \
                int64_t t = reverse ? T - 1 - s : s;                                              \
                const T_ *Jt = J + (b * T + t) * 4 * N + n0;                                      \
                const T_ *rt = r + (b * T + t) * 2 * N + n0;                                      \
                T_ *ot = out + (b * T + t) * 2 * N + n0;                                          \
                _Pragma("omp simd")                                                               \
                for (int64_t j = 0; j < len; j++) {                                               \
                    T_ a = Jt[j] * x0[j] + Jt[N + j] * x1[j] + rt[j];                             \
                    T_ c = Jt[2 * N + j] * x0[j] + Jt[3 * N + j] * x1[j] + rt[N + j];             \
                    x0[j] = a;                                                                    \
                    x1[j] = c;                                                                    \
                    ot[j] = a;                                                                    \
                    ot[N + j] = c;                                                                \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* ParaGRU applied step by step. u [B, T, 3, N] rows (z, r, h); A [3, N]; h0 [B, N] or NULL. */
#define DEF_GRU_SEQ(SUF, T_)                                                                       \
    void gru_sequential_##SUF(const T_ *u, const T_ *A, const T_ *h0, T_ *out, int64_t B,         \
                              int64_t T, int64_t N, int64_t w_begin, int64_t w_end) {                                \
        int64_t nblk = (N + CH - 1) / CH;                                                          \
        for (int64_t w = w_begin; w < w_end; w++) {                                                   \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                   \
            T_ h[CH];                                                                              \
            const T_ *Az = A + n0, *Ar = A + N + n0, *Ah = A + 2 * N + n0;                         \
            for (int64_t j = 0; j < len; j++) h[j] = h0 ? h0[b * N + n0 + j] : (T_)0;              \
            for (int64_t t = 0; t < T; t++) {                                                      \
                const T_ *ut = u + (b * T + t) * 3 * N + n0;                                       \
                T_ *ot = out + (b * T + t) * N + n0;                                               \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < len; j++) {                                                \
                    T_ z = SIGMOID(T_, Az[j] * h[j] + ut[j]);                                      \
                    T_ rg = SIGMOID(T_, Ar[j] * h[j] + ut[N + j]);                                 \
                    T_ c = TANH(Ah[j] * (h[j] * rg) + ut[2 * N + j]);                              \
                    h[j] = h[j] + z * (c - h[j]);                                                  \
                    ot[j] = h[j];                                                                  \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

/* ParaLSTM (CIFG + peepholes) applied step by step. u [B, T, 3, N] rows (f, o, c); A [3, N] rows
 * (f, o, c); C [2, N] rows (f, o); s0 [B, 2, N] (c, h) or NULL; out [B, T, 2, N]. */
#define DEF_LSTM_SEQ(SUF, T_)                                                                      \
    void lstm_sequential_##SUF(const T_ *u, const T_ *A, const T_ *C, const T_ *s0, T_ *out,      \
                               int64_t B, int64_t T, int64_t N, int64_t w_begin, int64_t w_end) {                    \
        int64_t nblk = (N + CH - 1) / CH;                                                          \
        for (int64_t w = w_begin; w < w_end; w++) {                                                   \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                   \
            T_ c[CH], h[CH];                                                                       \
            const T_ *Af = A + n0, *Ao = A + N + n0, *Ac = A + 2 * N + n0;                         \
            const T_ *Cf = C + n0, *Co = C + N + n0;                                               \
            for (int64_t j = 0; j < len; j++) {                                                    \
                c[j] = s0 ? s0[(b * 2 + 0) * N + n0 + j] : (T_)0;                                  \
                h[j] = s0 ? s0[(b * 2 + 1) * N + n0 + j] : (T_)0;                                  \
            }                                                                                      \
            for (int64_t t = 0; t < T; t++) {                                                      \
                const T_ *ut = u + (b * T + t) * 3 * N + n0;                                       \
                T_ *ot = out + (b * T + t) * 2 * N + n0;                                           \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < len; j++) {                                                \
                    T_ f = SIGMOID(T_, ut[j] + Af[j] * h[j] + Cf[j] * c[j]);                       \
                    T_ ct = TANH(ut[2 * N + j] + Ac[j] * h[j]);                                    \
                    T_ cn = ct + f * (c[j] - ct);                                                  \
                    T_ o = SIGMOID(T_, ut[N + j] + Ao[j] * h[j] + Co[j] * cn);                     \
                    c[j] = cn;                                                                     \
                    h[j] = o * TANH(cn);                                                           \
                    ot[j] = c[j];                                                                  \
                    ot[N + j] = h[j];                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }


/* ParaGRU adjoint, fused: walks time backwards once per block of channels.
 * lambda_t = g_t + J_{t+1}^T lambda_{t+1}; the carried J_{t+1}^T lambda_{t+1} is exactly the VJP of
 * step t+1 with respect to h_t, so the reversed linear solve and the local VJPs are one pass.
 * u [B, T, 3, N], A [3, N], h0 [B, N] or NULL, h [B, T, N], g [B, T, N] -> du [B, T, 3, N],
 * dA_part [B, 3, N] (summed over t; the caller sums over B), dh0 [B, N] (may be NULL). */
#define DEF_GRU_ADJ(SUF, T_)                                                                       \
    void gru_adjoint_##SUF(const T_ *u, const T_ *A, const T_ *h0, const T_ *h, const T_ *g,      \
                           T_ *du, T_ *dA_part, T_ *dh0, int64_t B, int64_t T, int64_t N,         \
                           int64_t w_begin, int64_t w_end) {                                                         \
        int64_t nblk = (N + CH - 1) / CH;                                                          \
        for (int64_t w = w_begin; w < w_end; w++) {                                                   \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                   \
            T_ carry[CH], az[CH], ar[CH], ah[CH];                                                  \
            const T_ *Az = A + n0, *Ar = A + N + n0, *Ah = A + 2 * N + n0;                         \
            for (int64_t j = 0; j < len; j++) carry[j] = az[j] = ar[j] = ah[j] = (T_)0;            \
            for (int64_t t = T - 1; t >= 0; t--) {                                                 \
                const T_ *ut = u + (b * T + t) * 3 * N + n0;                                       \
                const T_ *gt = g + (b * T + t) * N + n0;                                           \
                const T_ *hp = t > 0 ? h + (b * T + t - 1) * N + n0 : (h0 ? h0 + b * N + n0 : 0);  \
                T_ *dut = du + (b * T + t) * 3 * N + n0;                                           \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < len; j++) {                                                \
                    T_ hv = hp ? hp[j] : (T_)0;                                                    \
                    T_ lam = gt[j] + carry[j];                                                     \
                    T_ z = SIGMOID(T_, Az[j] * hv + ut[j]);                                        \
                    T_ rg = SIGMOID(T_, Ar[j] * hv + ut[N + j]);                                   \
                    T_ c = TANH(Ah[j] * (hv * rg) + ut[2 * N + j]);                                \
                    T_ gpz = lam * (c - hv) * z * ((T_)1 - z);                                     \
                    T_ gpc = lam * z * ((T_)1 - c * c);                                            \
                    T_ gpr = gpc * Ah[j] * hv * rg * ((T_)1 - rg);                                 \
                    dut[j] = gpz;                                                                  \
                    dut[N + j] = gpr;                                                              \
                    dut[2 * N + j] = gpc;                                                          \
                    az[j] += gpz * hv;                                                             \
                    ar[j] += gpr * hv;                                                             \
                    ah[j] += gpc * hv * rg;                                                        \
                    carry[j] = lam * ((T_)1 - z) + gpz * Az[j] + gpr * Ar[j] + gpc * Ah[j] * rg;   \
                }                                                                                  \
            }                                                                                      \
            T_ *dA = dA_part + b * 3 * N + n0;                                                     \
            for (int64_t j = 0; j < len; j++) {                                                    \
                dA[j] = az[j];                                                                     \
                dA[N + j] = ar[j];                                                                 \
                dA[2 * N + j] = ah[j];                                                             \
                if (dh0) dh0[b * N + n0 + j] = carry[j];                                           \
            }                                                                                      \
        }                                                                                          \
    }

/* ParaLSTM adjoint, fused as above. s, g [B, T, 2, N] (c, h); s0 [B, 2, N] or NULL ->
 * du [B, T, 3, N], dA_part [B, 3, N], dC_part [B, 2, N], ds0 [B, 2, N] (may be NULL). */
#define DEF_LSTM_ADJ(SUF, T_)                                                                      \
    void lstm_adjoint_##SUF(const T_ *u, const T_ *A, const T_ *C, const T_ *s0, const T_ *s,     \
                            const T_ *g, T_ *du, T_ *dA_part, T_ *dC_part, T_ *ds0, int64_t B,    \
                            int64_t T, int64_t N, int64_t w_begin, int64_t w_end) {                                  \
        int64_t nblk = (N + CH - 1) / CH;                                                          \
        for (int64_t w = w_begin; w < w_end; w++) {                                                   \
            int64_t b = w / nblk, n0 = (w % nblk) * CH, len = min64(CH, N - n0);                   \
            T_ kc[CH], kh[CH], af[CH], ao[CH], ac[CH], cf[CH], co[CH];                             \
            const T_ *Af = A + n0, *Ao = A + N + n0, *Ac = A + 2 * N + n0;                         \
            const T_ *Cf = C + n0, *Co = C + N + n0;                                               \
            for (int64_t j = 0; j < len; j++)                                                      \
                kc[j] = kh[j] = af[j] = ao[j] = ac[j] = cf[j] = co[j] = (T_)0;                     \
            for (int64_t t = T - 1; t >= 0; t--) {                                                 \
                const T_ *ut = u + (b * T + t) * 3 * N + n0;                                       \
                const T_ *gt = g + (b * T + t) * 2 * N + n0;                                       \
                const T_ *sp = t > 0 ? s + (b * T + t - 1) * 2 * N + n0                            \
                                     : (s0 ? s0 + b * 2 * N + n0 : 0);                             \
                T_ *dut = du + (b * T + t) * 3 * N + n0;                                           \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < len; j++) {                                                \
                    T_ cp = sp ? sp[j] : (T_)0, hp = sp ? sp[N + j] : (T_)0;                       \
                    T_ lc = gt[j] + kc[j], lh = gt[N + j] + kh[j];                                 \
                    T_ f = SIGMOID(T_, ut[j] + Af[j] * hp + Cf[j] * cp);                           \
                    T_ ct = TANH(ut[2 * N + j] + Ac[j] * hp);                                      \
                    T_ c = ct + f * (cp - ct);                                                     \
                    T_ o = SIGMOID(T_, ut[N + j] + Ao[j] * hp + Co[j] * c);                        \
                    T_ tc = TANH(c);                                                               \
                    T_ gpo = lh * tc * o * ((T_)1 - o);                                            \
                    T_ gc = lc + lh * o * ((T_)1 - tc * tc) + gpo * Co[j];                         \
                    T_ gpf = gc * (cp - ct) * f * ((T_)1 - f);                                     \
                    T_ gpc = gc * ((T_)1 - f) * ((T_)1 - ct * ct);                                 \
                    dut[j] = gpf;                                                                  \
                    dut[N + j] = gpo;                                                              \
                    dut[2 * N + j] = gpc;                                                          \
                    af[j] += gpf * hp;                                                             \
                    ao[j] += gpo * hp;                                                             \
                    ac[j] += gpc * hp;                                                             \
                    cf[j] += gpf * cp;                                                             \
                    co[j] += gpo * c;                                                              \
                    kc[j] = gc * f + gpf * Cf[j];                                                  \
                    kh[j] = gpf * Af[j] + gpo * Ao[j] + gpc * Ac[j];                               \
                }                                                                                  \
            }                                                                                      \
            T_ *dA = dA_part + b * 3 * N + n0, *dC = dC_part + b * 2 * N + n0;                     \
            for (int64_t j = 0; j < len; j++) {                                                    \
                dA[j] = af[j];                                                                     \
                dA[N + j] = ao[j];                                                                 \
                dA[2 * N + j] = ac[j];                                                             \
                dC[j] = cf[j];                                                                     \
                dC[N + j] = co[j];                                                                 \
                if (ds0) {                                                                         \
                    ds0[b * 2 * N + n0 + j] = kc[j];                                               \
                    ds0[b * 2 * N + N + n0 + j] = kh[j];                                           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

#define SIGMOID_FN sigmoid_f32
#define TANH tanh_f32
DEF_SCAN_DIAG(f32, float)
DEF_SCAN_BLOCK2(f32, float)
DEF_GRU_SEQ(f32, float)
DEF_LSTM_SEQ(f32, float)
DEF_GRU_ADJ(f32, float)
DEF_LSTM_ADJ(f32, float)
#undef SIGMOID_FN
#undef TANH

#define SIGMOID_FN sigmoid_f64
#define TANH tanh_f64
DEF_SCAN_DIAG(f64, double)
DEF_SCAN_BLOCK2(f64, double)
DEF_GRU_SEQ(f64, double)
DEF_LSTM_SEQ(f64, double)
DEF_GRU_ADJ(f64, double)
DEF_LSTM_ADJ(f64, double)
#undef SIGMOID_FN
#undef TANH
