/* The lean decoder's forward pass for Llama-family models on x86-64 CPUs with AVX-512, or
 * with AVX2 + FMA + F16C (most laptops and the AMD EPYC machines here).
 *
 * engine/fastdecode.py builds this file with the system C compiler (once per machine and
 * instruction set, cached) and calls it through ctypes. It computes one forward pass of a
 * few positions (the float32 check of drafted tokens, or one step of the 4-bit draft) in a
 * single call: no Python between operations, weights streamed at close to memory speed,
 * and the two (or more) cores working on every matrix product through a small thread pool
 * of its own.
 *
 * Which instruction set it is built for follows the compiler's target (engine/native.py
 * picks the flags from what the CPU reports): with __AVX512F__ a vector holds 16 floats,
 * otherwise 8 (AVX2). Both share every loop below; only the few helpers in "vector math"
 * and the int4 kernel's inner step differ. tl_isa() says which one a library was built for.
 *
 * Layout contract (all float32 unless said, all contiguous, all owned by Python):
 *   dense weight  [n_out, n_in] row-major, optional bias [n_out]
 *   int4 weight   blocks of 16 rows (the last one padded with zero rows) by 32 inputs,
 *                 320 bytes each: for j = 0..15, 16 bytes (byte r: row r's input j in the
 *                 low half, its input j + 16 in the high half), then the 16 rows' scales
 *                 and the 16 rows' minimums as float16: w = q * scale + minimum
 *   KV cache      per layer [kv_heads, capacity, head_dim] for keys and for values
 *   rotary tables [capacity, head_dim] cos and sin (rotate-half convention)
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GROUP 32
#define BLOCK_ROWS 16
#define BLOCK_BYTES 320
#define MAX_THREADS 64
#ifndef PREFETCH
#define PREFETCH 256 /* floats ahead in each weight row */
#endif

/* ---------------------------------------------------------------- thread pool */

typedef void (*task_fn)(int tid, int nthreads, void *arg);

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static atomic_int pool_gen;
static atomic_int pool_done;
static int pool_threads = 1;
static pid_t pool_pid; /* a forked child has no workers: it runs alone */
static int pool_sleeping;
static task_fn pool_task;
static void *pool_arg;
static atomic_int bar_count;
static atomic_int bar_sense;

/* Waiting threads spin for about a millisecond (time-stamp counter ticks, ~1-3 GHz)
   before they yield or sleep: long enough to stay awake between the calls of one
   decoding round, short enough to leave the cores to others between replies. */
#define SPIN_TICKS 2000000ULL

static int still_spinning(unsigned long long since) {
    _mm_pause();
    return __rdtsc() - since < SPIN_TICKS;
}

static void relax(unsigned long long since) {
    if (!still_spinning(since)) sched_yield();
}

static void barrier(int nthreads, int *sense) {
    if (nthreads == 1) return;
    *sense = !*sense;
    if (atomic_fetch_add(&bar_count, 1) == nthreads - 1) {
        atomic_store(&bar_count, 0);
        atomic_store(&bar_sense, *sense);
    } else {
        unsigned long long since = __rdtsc();
        while (atomic_load(&bar_sense) != *sense) relax(since);
    }
}

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    int seen = 0;
    for (;;) {
        unsigned long long since = __rdtsc();
        int gen;
        while ((gen = atomic_load(&pool_gen)) == seen) {
            if (still_spinning(since)) continue;
            pthread_mutex_lock(&pool_mu);
            pool_sleeping++;
            while (atomic_load(&pool_gen) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            pool_sleeping--;
            pthread_mutex_unlock(&pool_mu);
        }
        seen = gen;
        pool_task(tid, pool_threads, pool_arg);
        atomic_fetch_add(&pool_done, 1);
    }
    return NULL;
}

/* Start the pool with nthreads threads in all (the caller is thread 0). Once per process. */
int tl_init(int nthreads) {
    static int started;
    pthread_mutex_lock(&pool_mu);
    if (started) {
        pthread_mutex_unlock(&pool_mu);
        return pool_threads;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int made = 1;
    for (int t = 1; t < nthreads; t++) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, worker, (void *)(intptr_t)t) == 0) made++;
        pthread_attr_destroy(&attr);
        if (made != t + 1) break;
    }
    pool_threads = made;
    pool_pid = getpid();
    started = 1;
    pthread_mutex_unlock(&pool_mu);
    return made;
}

static void run_parallel(task_fn task, void *arg) {
    pthread_mutex_lock(&call_mu); /* one forward at a time per process */
    if (pool_threads == 1 || getpid() != pool_pid) {
        task(0, 1, arg);
        pthread_mutex_unlock(&call_mu);
        return;
    }
    pool_task = task;
    pool_arg = arg;
    atomic_store(&pool_done, 0);
    pthread_mutex_lock(&pool_mu);
    atomic_fetch_add(&pool_gen, 1);
    if (pool_sleeping) pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    task(0, pool_threads, arg);
    unsigned long long since = __rdtsc();
    while (atomic_load(&pool_done) < pool_threads - 1) relax(since);
    pthread_mutex_unlock(&call_mu);
}

/* ---------------------------------------------------------------- vector math */

/* exp's shared core: r = x - n ln 2 (in two parts), p = e^r by a degree-6 polynomial. */
#define EXP_POLY                                                                 \
    vec r = vfmadd(n, vset1(-0.693359375f), x);                                  \
    r = vfmadd(n, vset1(2.12194440e-4f), r);                                     \
    vec p = vset1(1.9875691500e-4f);                                             \
    p = vfmadd(p, r, vset1(1.3981999507e-3f));                                   \
    p = vfmadd(p, r, vset1(8.3334519073e-3f));                                   \
    p = vfmadd(p, r, vset1(4.1665795894e-2f));                                   \
    p = vfmadd(p, r, vset1(1.6666665459e-1f));                                   \
    p = vfmadd(p, r, vset1(5.0000001201e-1f));                                   \
    p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));

#if defined(__AVX512F__)
#define VW 16    /* floats per vector */
#define NCOLS 4  /* weight rows per step of the dense kernel: 6 x 4 accumulators fit 32 registers */
typedef __m512 vec;
static const char ISA[] = "avx512";
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps

static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }

/* exp(x) for x <= ~88, float32, about 1 ulp (range reduction by ln 2, degree-6 polynomial). */
static inline vec vexp(vec x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP_POLY
    return _mm512_scalef_ps(p, n);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
#define NCOLS 2  /* 6 x 2 accumulators + 2 weights + 1 input fit the 16 registers */
typedef __m256 vec;
static const char ISA[] = "avx2";
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps

static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The same exp as the AVX-512 one, 2^n built in the exponent bits: x is held at -87 or
   above (exp(-87) is near float32's smallest normal number; such terms come out as 0 or
   about 1e-38, which changes no sum here). */
static inline vec vexp(vec x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.7f));
    vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP_POLY
    /* 2^n as p * 2^(n - 1) * 2: n reaches 128 for x near 88.7, one past the largest exponent */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
}

#else
#error "lean.c needs AVX-512 (-mavx512f) or AVX2 with FMA and F16C (-mavx2 -mfma -mf16c)"
#endif

/* Which instruction set this library was built for: "avx512" or "avx2". */
const char *tl_isa(void) { return ISA; }

/* ---------------------------------------------------------------- model description */

typedef struct {
    const float *w;     /* dense [n_out, n_in] or NULL */
    const uint8_t *q;   /* int4 blocks or NULL */
    const float *bias;  /* [n_out] or NULL */
    int64_t n_out, n_in;
} Lin;

typedef struct {
    const float *ln1, *ln2;
    Lin qkv, o, gate_up, down;
} Layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    float eps;
    Layer *layer;
    const float *norm;
    Lin head;
} Model;

/* A model from a flat table of addresses: per layer ln1, ln2, then (weight, int4, bias)
   for qkv, o, gate_up, down; then the final norm and (weight, int4, bias) of the head.
   A weight is used when non-zero, else the int4 blocks. */
void *tl_model(const int64_t *dims, const int64_t *ptrs, float eps) {
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    m->layers = dims[0];
    m->hidden = dims[1];
    m->heads = dims[2];
    m->kv_heads = dims[3];
    m->head_dim = dims[4];
    m->inter = dims[5];
    m->vocab = dims[6];
    m->eps = eps;
    m->layer = calloc((size_t)m->layers, sizeof(Layer));
    if (!m->layer) {
        free(m);
        return NULL;
    }
    int64_t qkv_out = (m->heads + 2 * m->kv_heads) * m->head_dim;
    const int64_t *p = ptrs;
#define TAKE_LIN(L, out, in)                        \
    do {                                            \
        (L).w = (const float *)(intptr_t)p[0];      \
        (L).q = (const uint8_t *)(intptr_t)p[1];    \
        (L).bias = (const float *)(intptr_t)p[2];   \
        (L).n_out = (out);                          \
        (L).n_in = (in);                            \
        p += 3;                                     \
    } while (0)
    for (int64_t i = 0; i < m->layers; i++) {
        Layer *l = &m->layer[i];
        l->ln1 = (const float *)(intptr_t)p[0];
        l->ln2 = (const float *)(intptr_t)p[1];
        p += 2;
        TAKE_LIN(l->qkv, qkv_out, m->hidden);
        TAKE_LIN(l->o, m->hidden, m->heads * m->head_dim);
        TAKE_LIN(l->gate_up, 2 * m->inter, m->hidden);
        TAKE_LIN(l->down, m->hidden, m->inter);
    }
    m->norm = (const float *)(intptr_t)p[0];
    p += 1;
    TAKE_LIN(m->head, m->vocab, m->hidden);
#undef TAKE_LIN
    return m;
}

void tl_model_free(void *model) {
    Model *m = model;
    if (!m) return;
    free(m->layer);
    free(m);
}

/* ---------------------------------------------------------------- matrix products */

/* y[r, n] (+)= sum_k x[r, k] * W[n, k] (+ bias[n]) for rows n in [n0, n1), R = rows of x:
   NCOLS weight rows at a time against all R rows of x (R x NCOLS accumulators in registers). */
#define DENSE_KERNEL(R)                                                                          \
    static void dense_##R(const float *x, int64_t K, const float *W, const float *bias, float *y, \
                          int64_t N, int64_t n0, int64_t n1, int acc) {                          \
        int64_t n = n0;                                                                          \
        for (; n + NCOLS <= n1; n += NCOLS) {                                                    \
            vec a[R][NCOLS];                                                                     \
            const float *w[NCOLS];                                                               \
            for (int c = 0; c < NCOLS; c++) w[c] = W + (n + c) * K;                              \
            for (int r = 0; r < R; r++)                                                          \
                for (int c = 0; c < NCOLS; c++) a[r][c] = vzero();                               \
            for (int64_t k = 0; k < K; k += VW) {                                                \
                vec b[NCOLS];                                                                    \
                for (int c = 0; c < NCOLS; c++) {                                                \
                    _mm_prefetch((const char *)(w[c] + k + PREFETCH), _MM_HINT_T0);              \
                    b[c] = vload(w[c] + k);                                                      \
                }                                                                                \
                for (int r = 0; r < R; r++) {                                                    \
                    vec xv = vload(x + r * K + k);                                               \
                    for (int c = 0; c < NCOLS; c++) a[r][c] = vfmadd(xv, b[c], a[r][c]);         \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < R; r++)                                                          \
                for (int c = 0; c < NCOLS; c++) {                                                \
                    float v = vsum(a[r][c]) + (bias ? bias[n + c] : 0.0f);                       \
                    float *out = y + r * N + n + c;                                              \
                    *out = acc ? *out + v : v;                                                   \
                }                                                                                \
        }                                                                                        \
        for (; n < n1; n++) {                                                                    \
            vec a[R];                                                                            \
            for (int r = 0; r < R; r++) a[r] = vzero();                                          \
            const float *w0 = W + n * K;                                                         \
            for (int64_t k = 0; k < K; k += VW) {                                                \
                vec b0 = vload(w0 + k);                                                          \
                for (int r = 0; r < R; r++) a[r] = vfmadd(vload(x + r * K + k), b0, a[r]);       \
            }                                                                                    \
            for (int r = 0; r < R; r++) {                                                        \
                float v = vsum(a[r]) + (bias ? bias[n] : 0.0f);                                  \
                float *out = y + r * N + n;                                                      \
                *out = acc ? *out + v : v;                                                       \
            }                                                                                    \
        }                                                                                        \
    }

DENSE_KERNEL(1)
DENSE_KERNEL(2)
DENSE_KERNEL(3)
DENSE_KERNEL(4)
DENSE_KERNEL(5)
DENSE_KERNEL(6)

/* Bytes of weight rows one tile holds: small enough to stay in the L2 cache while every
   chunk of x's rows passes over it (a prompt of many positions), so the weights are read
   from memory once per pass. */
#define TILE_BYTES (256 * 1024)

static void dense_rows(const float *x, int64_t R, int64_t K, const float *W, const float *bias, float *y,
                       int64_t N, int64_t n0, int64_t n1, int acc) {
    int64_t tile = n1 - n0;
    if (R > 6) {
        tile = TILE_BYTES / (K * (int64_t)sizeof(float)) / NCOLS * NCOLS;
        if (tile < NCOLS) tile = NCOLS;
    }
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
        int64_t t1 = t0 + tile < n1 ? t0 + tile : n1;
        /* rows of x in chunks the register file holds */
        for (int64_t r = 0; r < R;) {
            int64_t take = R - r > 6 ? (R - r == 7 ? 4 : 6) : R - r;
            const float *xr = x + r * K;
            float *yr = y + r * N;
            switch (take) {
            case 1: dense_1(xr, K, W, bias, yr, N, t0, t1, acc); break;
            case 2: dense_2(xr, K, W, bias, yr, N, t0, t1, acc); break;
            case 3: dense_3(xr, K, W, bias, yr, N, t0, t1, acc); break;
            case 4: dense_4(xr, K, W, bias, yr, N, t0, t1, acc); break;
            case 5: dense_5(xr, K, W, bias, yr, N, t0, t1, acc); break;
            default: dense_6(xr, K, W, bias, yr, N, t0, t1, acc); break;
            }
            r += take;
        }
    }
}

/* Sixteen rows' dot products with one group of 32 inputs of x, not yet scaled: a block's
   bytes j (rows 0..15 at input j, and at input j + 16 in the high halves) times xg[j] and
   xg[j + 16]. AVX-512 holds the sixteen rows in one vector, AVX2 in two (lo: rows 0-7). */
#if VW == 16
typedef struct { __m512 v; } rows16;
static inline rows16 rows16_zero(void) { return (rows16){_mm512_setzero_ps()}; }
static inline rows16 int4_group(const uint8_t *blk, const float *xg) {
    const __m512i low = _mm512_set1_epi32(15);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int j = 0; j < 16; j += 2) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + j * 16)));
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + j * 16 + 16)));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), _mm512_set1_ps(xg[j]), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_set1_ps(xg[j + 16]), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(u, low)), _mm512_set1_ps(xg[j + 1]), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4)), _mm512_set1_ps(xg[j + 17]), a3);
    }
    return (rows16){_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))};
}
/* total += dot * scale + minimum * xsum, the sixteen scales and minimums read as float16 */
static inline rows16 int4_scale(rows16 total, rows16 dot, const uint8_t *blk, float xsum) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
    __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
    return (rows16){_mm512_fmadd_ps(minimum, _mm512_set1_ps(xsum), _mm512_fmadd_ps(dot.v, scale, total.v))};
}
static inline void rows16_store(rows16 t, float *out) { _mm512_storeu_ps(out, t.v); }
#else
typedef struct { __m256 lo, hi; } rows16;
static inline rows16 rows16_zero(void) { return (rows16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline rows16 int4_group(const uint8_t *blk, const float *xg) {
    const __m256i low = _mm256_set1_epi32(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    for (int j = 0; j < 16; j++) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + j * 16)));
        __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + j * 16 + 8)));
        __m256 x0 = _mm256_set1_ps(xg[j]), x1 = _mm256_set1_ps(xg[j + 16]);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x1, a1);
        b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(u, low)), x0, b0);
        b1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4)), x1, b1);
    }
    return (rows16){_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)};
}
static inline rows16 int4_scale(rows16 total, rows16 dot, const uint8_t *blk, float xsum) {
    __m256 xs = _mm256_set1_ps(xsum);
    __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 256)));
    __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 272)));
    __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 288)));
    __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 304)));
    return (rows16){_mm256_fmadd_ps(m0, xs, _mm256_fmadd_ps(dot.lo, s0, total.lo)),
                    _mm256_fmadd_ps(m1, xs, _mm256_fmadd_ps(dot.hi, s1, total.hi))};
}
static inline void rows16_store(rows16 t, float *out) {
    _mm256_storeu_ps(out, t.lo);
    _mm256_storeu_ps(out + 8, t.hi);
}
#endif

/* one row of x against the int4 row blocks [b0, b1); xs[g] = sum of x over group g */
static void int4_blocks(const float *x, const float *xs, int64_t K, const uint8_t *Q, const float *bias, float *y,
                        int64_t N, int64_t b0, int64_t b1, int acc) {
    const int64_t groups = K / GROUP;
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = Q + b * groups * BLOCK_BYTES;
        rows16 total = rows16_zero();
        for (int64_t g = 0; g < groups; g++, blk += BLOCK_BYTES) {
            for (int line = 0; line < BLOCK_BYTES; line += 64)
                _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES + line), _MM_HINT_T0);
            total = int4_scale(total, int4_group(blk, x + g * GROUP), blk, xs[g]);
        }
        float out[BLOCK_ROWS];
        rows16_store(total, out);
        int64_t n = b * BLOCK_ROWS, valid = N - n < BLOCK_ROWS ? N - n : BLOCK_ROWS;
        for (int64_t r = 0; r < valid; r++) {
            float v = out[r] + (bias ? bias[n + r] : 0.0f);
            y[n + r] = acc ? y[n + r] + v : v;
        }
    }
}

/* y (+)= x @ L^T over this thread's share of L's rows */
static void linear(const Lin *L, const float *x, const float *xs, int64_t R, float *y, int tid, int nthreads,
                   int acc) {
    int64_t N = L->n_out;
    if (L->w) {
        int64_t per = (N + nthreads - 1) / nthreads;
        per = (per + 3) & ~(int64_t)3;
        int64_t n0 = tid * per, n1 = n0 + per > N ? N : n0 + per;
        if (n0 < n1) dense_rows(x, R, L->n_in, L->w, L->bias, y, N, n0, n1, acc);
        return;
    }
    int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
    int64_t per = (blocks + nthreads - 1) / nthreads;
    int64_t b0 = tid * per, b1 = b0 + per > blocks ? blocks : b0 + per;
    for (int64_t r = 0; b0 < b1 && r < R; r++)
        int4_blocks(x + r * L->n_in, xs + r * (L->n_in / GROUP), L->n_in, L->q, L->bias, y + r * N, N, b0, b1, acc);
}

/* ---------------------------------------------------------------- one forward pass */

typedef struct {
    Model *m;
    float *x;          /* [R, hidden] in: embeddings; out: final hidden states */
    int64_t R, start;  /* rows and the position of the first */
    float **kc, **vc;  /* per layer caches */
    int64_t capacity;
    const float *cos, *sin;
    float *logits;     /* [R_out, vocab] */
    int last_only;
    float *h, *xs, *qkv, *att, *gu, *act; /* scratch */
    float *scores;     /* attention weights: per thread, `span` floats */
    int64_t span;
} Pass;

static void rms_norm_rows(const float *x, const float *w, float *out, int64_t R, int64_t D, float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        vec s = vzero();
        for (int64_t k = 0; k < D; k += VW) {
            vec v = vload(xr + k);
            s = vfmadd(v, v, s);
        }
        vec sv = vset1(1.0f / sqrtf(vsum(s) / (float)D + eps));
        for (int64_t k = 0; k < D; k += VW) vstore(out + r * D + k, vmul(vload(w + k), vmul(vload(xr + k), sv)));
    }
}

static void group_sums(const float *x, float *xs, int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t g = 0; g < D / GROUP; g++) {
            const float *xg = x + r * D + g * GROUP;
            vec s = vload(xg);
            for (int k = VW; k < GROUP; k += VW) s = vadd(s, vload(xg + k));
            xs[r * (D / GROUP) + g] = vsum(s);
        }
}

static void rotate(float *v, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    float tmp[512];
    memcpy(tmp, v, (size_t)hd * sizeof(float));
    for (int64_t i = 0; i < half; i++) {
        v[i] = tmp[i] * cos[i] - tmp[i + half] * sin[i];
        v[i + half] = tmp[i + half] * cos[i + half] + tmp[i] * sin[i + half];
    }
}

static void attend(Pass *p, int64_t layer, int tid, int nthreads) {
    Model *m = p->m;
    int64_t hd = m->head_dim, per_kv = m->heads / m->kv_heads;
    int64_t qkv_out = (m->heads + 2 * m->kv_heads) * hd;
    int64_t jobs = p->R * m->heads;
    float scale = 1.0f / sqrtf((float)hd);
    float *scores = p->scores + tid * p->span;
    for (int64_t job = tid; job < jobs; job += nthreads) {
        int64_t r = job / m->heads, h = job % m->heads, kvh = h / per_kv;
        const float *q = p->qkv + r * qkv_out + h * hd;
        const float *K = p->kc[layer] + kvh * p->capacity * hd;
        const float *V = p->vc[layer] + kvh * p->capacity * hd;
        int64_t T = p->start + r + 1;
        float top = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
            vec s = vzero();
            for (int64_t k = 0; k < hd; k += VW) s = vfmadd(vload(q + k), vload(K + t * hd + k), s);
            float v = vsum(s) * scale;
            scores[t] = v;
            if (v > top) top = v;
        }
        /* the scores buffer has VW floats of room past T: the last vector is padded with
           scores of -inf (weight 0) instead of masked */
        int64_t padded = (T + VW - 1) / VW * VW;
        for (int64_t t = T; t < padded; t++) scores[t] = -INFINITY;
        vec tv = vset1(top), sum = vzero();
        for (int64_t t = 0; t < padded; t += VW) {
            vec e = vexp(vsub(vload(scores + t), tv));
            vstore(scores + t, e);
            sum = vadd(sum, e);
        }
        float inv = 1.0f / vsum(sum);
        vec o[512 / VW];
        int64_t chunks = hd / VW;
        for (int64_t c = 0; c < chunks; c++) o[c] = vzero();
        for (int64_t u = 0; u < T; u++) {
            vec w = vset1(scores[u]);
            for (int64_t c = 0; c < chunks; c++) o[c] = vfmadd(w, vload(V + u * hd + c * VW), o[c]);
        }
        float *out = p->att + r * m->heads * hd + h * hd;
        vec iv = vset1(inv);
        for (int64_t c = 0; c < chunks; c++) vstore(out + c * VW, vmul(o[c], iv));
    }
}

/* out = rms_norm(x) @ L^T, every thread waiting for the norm and for the product */
static void normed_linear(Pass *p, const float *norm, const Lin *L, float *out, int tid, int nthreads, int *sense) {
    Model *m = p->m;
    if (tid == 0) {
        rms_norm_rows(p->x, norm, p->h, p->R, m->hidden, m->eps);
        if (!L->w) group_sums(p->h, p->xs, p->R, m->hidden);
    }
    barrier(nthreads, sense);
    linear(L, p->h, p->xs, p->R, out, tid, nthreads, 0);
    barrier(nthreads, sense);
}

static void forward_task(int tid, int nthreads, void *arg) {
    Pass *p = arg;
    Model *m = p->m;
    int sense = atomic_load(&bar_sense); /* the barriers' phase carries over between calls */
    int64_t D = m->hidden, R = p->R, hd = m->head_dim;
    int64_t qkv_out = (m->heads + 2 * m->kv_heads) * hd, inter = m->inter;
    for (int64_t i = 0; i < m->layers; i++) {
        Layer *l = &m->layer[i];
        normed_linear(p, l->ln1, &l->qkv, p->qkv, tid, nthreads, &sense);
        if (tid == 0) {
            for (int64_t r = 0; r < R; r++) {
                int64_t pos = p->start + r;
                float *row = p->qkv + r * qkv_out;
                const float *c = p->cos + pos * hd, *s = p->sin + pos * hd;
                for (int64_t h = 0; h < m->heads + m->kv_heads; h++) rotate(row + h * hd, c, s, hd);
                for (int64_t h = 0; h < m->kv_heads; h++) {
                    memcpy(p->kc[i] + (h * p->capacity + pos) * hd, row + (m->heads + h) * hd, hd * sizeof(float));
                    memcpy(p->vc[i] + (h * p->capacity + pos) * hd, row + (m->heads + m->kv_heads + h) * hd,
                           hd * sizeof(float));
                }
            }
        }
        barrier(nthreads, &sense);
        attend(p, i, tid, nthreads);
        barrier(nthreads, &sense);
        if (tid == 0 && !l->o.w) group_sums(p->att, p->xs, R, m->heads * hd);
        barrier(nthreads, &sense);
        linear(&l->o, p->att, p->xs, R, p->x, tid, nthreads, 1);
        barrier(nthreads, &sense);
        normed_linear(p, l->ln2, &l->gate_up, p->gu, tid, nthreads, &sense);
        if (tid == 0) {
            for (int64_t r = 0; r < R; r++) {
                const float *g = p->gu + r * 2 * inter, *u = g + inter;
                float *a = p->act + r * inter;
                for (int64_t k = 0; k < inter; k += VW) {
                    vec gv = vload(g + k);
                    vec sg = vdiv(gv, vadd(vset1(1.0f), vexp(vsub(vzero(), gv))));
                    vstore(a + k, vmul(sg, vload(u + k)));
                }
            }
            if (!l->down.w) group_sums(p->act, p->xs, R, inter);
        }
        barrier(nthreads, &sense);
        linear(&l->down, p->act, p->xs, R, p->x, tid, nthreads, 1);
        barrier(nthreads, &sense);
    }
    int64_t first = p->last_only ? R - 1 : 0, rows = R - first;
    if (tid == 0) {
        rms_norm_rows(p->x + first * D, m->norm, p->h, rows, D, m->eps);
        if (!m->head.w) group_sums(p->h, p->xs, rows, D);
    }
    barrier(nthreads, &sense);
    linear(&m->head, p->h, p->xs, rows, p->logits, tid, nthreads, 0);
}

/* The scratch buffers of a pass of R positions, carved from `base` (when p is not NULL);
   returns how many floats they take. */
static int64_t scratch_layout(const Model *m, int64_t R, float *base, Pass *p) {
    int64_t qkv_out = (m->heads + 2 * m->kv_heads) * m->head_dim;
    int64_t widest = m->inter > m->hidden ? m->inter : m->hidden;
    if (m->heads * m->head_dim > widest) widest = m->heads * m->head_dim;
    int64_t sizes[6] = {R * m->hidden, R * (widest / GROUP + 1), R * qkv_out, R * m->heads * m->head_dim,
                        R * 2 * m->inter, R * m->inter};
    int64_t used = 0;
    for (int i = 0; i < 6; i++) {
        if (p) {
            float **slot[6] = {&p->h, &p->xs, &p->qkv, &p->att, &p->gu, &p->act};
            *slot[i] = base + used;
        }
        used += sizes[i];
    }
    return used;
}

/* One forward pass of R positions starting at `start`: x holds their embeddings (and is
   overwritten); their keys and values go into the caches; logits of every position (or of
   the last one) go to `logits`. `scratch` has room for tl_scratch_floats(model, R).
   Returns 0, -1 for shapes the kernels do not handle, -2 when out of memory. */
int tl_forward(void *model, float *x, int64_t R, int64_t start, const int64_t *k_caches, const int64_t *v_caches,
               int64_t capacity, const float *cos, const float *sin, float *logits, int last_only, float *scratch) {
    Model *m = model;
    if (R < 1 || start + R > capacity || m->head_dim > 512 || m->head_dim % 16 || m->hidden % GROUP ||
        m->inter % GROUP)
        return -1;
    Pass p;
    p.m = m;
    p.x = x;
    p.R = R;
    p.start = start;
    p.kc = (float **)k_caches;
    p.vc = (float **)v_caches;
    p.capacity = capacity;
    p.cos = cos;
    p.sin = sin;
    p.logits = logits;
    p.last_only = last_only;
    scratch_layout(m, R, scratch, &p);
    p.span = start + R + 16;
    p.scores = malloc(sizeof(float) * (size_t)(p.span * pool_threads)); /* one span per thread */
    if (!p.scores) return -2;
    run_parallel(forward_task, &p);
    free(p.scores);
    return 0;
}

int64_t tl_scratch_floats(void *model, int64_t R) { return scratch_layout(model, R, NULL, NULL); }

/* Pack a float32 [n, k] weight into int4 blocks (see the layout above); out has
   ceil(n / 16) * (k / 32) * 320 bytes. Returns 0, or -1 when k is not a multiple of 32. */
int tl_pack_int4(const float *w, int64_t n, int64_t k, uint8_t *out) {
    if (k % GROUP) return -1;
    int64_t groups = k / GROUP, blocks = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
    memset(out, 0, (size_t)(blocks * groups * BLOCK_BYTES));
    for (int64_t r = 0; r < n; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float *src = w + r * k + g * GROUP;
            float lo = src[0], hi = src[0];
            for (int j = 1; j < GROUP; j++) {
                if (src[j] < lo) lo = src[j];
                if (src[j] > hi) hi = src[j];
            }
            uint16_t s16 = _cvtss_sh((hi - lo) / 15.0f, 0), m16 = _cvtss_sh(lo, 0);
            float scale = _cvtsh_ss(s16), low = _cvtsh_ss(m16);
            uint8_t *blk = out + ((r / BLOCK_ROWS) * groups + g) * BLOCK_BYTES;
            int64_t row = r % BLOCK_ROWS;
            for (int j = 0; j < 16; j++) {
                int a = scale > 0 ? (int)lrintf((src[j] - low) / scale) : 0;
                int b = scale > 0 ? (int)lrintf((src[j + 16] - low) / scale) : 0;
                a = a < 0 ? 0 : a > 15 ? 15 : a;
                b = b < 0 ? 0 : b > 15 ? 15 : b;
                blk[j * 16 + row] = (uint8_t)(a | (b << 4));
            }
            memcpy(blk + 256 + 2 * row, &s16, 2);
            memcpy(blk + 288 + 2 * row, &m16, 2);
        }
    return 0;
}
