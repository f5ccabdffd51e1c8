/* The lean decoder's forward pass for Llama-family models on x86-64 CPUs with AVX-512.
 *
 * engine/fastdecode.py builds this file with the system C compiler (once per machine,
 * cached) and calls it through ctypes. It computes one forward pass of a few positions
 * (the float32 check of drafted tokens, or one step of the 4-bit draft) in a single call:
 * no Python between operations, weights streamed at close to memory speed, and the two
 * (or more) cores working on every matrix product through a small thread pool of its own.
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

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* exp(x) for x <= ~88, float32, about 1 ulp (range reduction by ln 2, degree-6 polynomial). */
static inline __m512 vexp(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

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

/* y[r, n] (+)= sum_k x[r, k] * W[n, k] (+ bias[n]) for rows n in [n0, n1), R = rows of x. */
#define DENSE_KERNEL(R)                                                                          \
    static void dense_##R(const float *x, int64_t K, const float *W, const float *bias, float *y, \
                          int64_t N, int64_t n0, int64_t n1, int acc) {                          \
        int64_t n = n0;                                                                          \
        for (; n + 4 <= n1; n += 4) {                                                            \
            __m512 a[R][4];                                                                      \
            for (int r = 0; r < R; r++)                                                          \
                for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_ps();                       \
            const float *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;               \
            for (int64_t k = 0; k < K; k += 16) {                                                \
                _mm_prefetch((const char *)(w0 + k + PREFETCH), _MM_HINT_T0);                    \
                _mm_prefetch((const char *)(w1 + k + PREFETCH), _MM_HINT_T0);                    \
                _mm_prefetch((const char *)(w2 + k + PREFETCH), _MM_HINT_T0);                    \
                _mm_prefetch((const char *)(w3 + k + PREFETCH), _MM_HINT_T0);                    \
                __m512 b0 = _mm512_loadu_ps(w0 + k), b1 = _mm512_loadu_ps(w1 + k);               \
                __m512 b2 = _mm512_loadu_ps(w2 + k), b3 = _mm512_loadu_ps(w3 + k);               \
                for (int r = 0; r < R; r++) {                                                    \
                    __m512 xv = _mm512_loadu_ps(x + r * K + k);                                  \
                    a[r][0] = _mm512_fmadd_ps(xv, b0, a[r][0]);                                  \
                    a[r][1] = _mm512_fmadd_ps(xv, b1, a[r][1]);                                  \
                    a[r][2] = _mm512_fmadd_ps(xv, b2, a[r][2]);                                  \
                    a[r][3] = _mm512_fmadd_ps(xv, b3, a[r][3]);                                  \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < R; r++)                                                          \
                for (int c = 0; c < 4; c++) {                                                    \
                    float v = hsum(a[r][c]) + (bias ? bias[n + c] : 0.0f);                       \
                    float *out = y + r * N + n + c;                                              \
                    *out = acc ? *out + v : v;                                                   \
                }                                                                                \
        }                                                                                        \
        for (; n < n1; n++) {                                                                    \
            __m512 a[R];                                                                         \
            for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();                              \
            const float *w0 = W + n * K;                                                         \
            for (int64_t k = 0; k < K; k += 16) {                                                \
                __m512 b0 = _mm512_loadu_ps(w0 + k);                                             \
                for (int r = 0; r < R; r++)                                                      \
                    a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), b0, a[r]);            \
            }                                                                                    \
            for (int r = 0; r < R; r++) {                                                        \
                float v = hsum(a[r]) + (bias ? bias[n] : 0.0f);                                  \
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

static void dense_rows(const float *x, int64_t R, int64_t K, const float *W, const float *bias, float *y,
                       int64_t N, int64_t n0, int64_t n1, int acc) {
    /* rows of x in chunks the register file holds; the weights stay in cache between chunks */
    for (int64_t r = 0; r < R;) {
        int64_t take = R - r > 6 ? (R - r == 7 ? 4 : 6) : R - r;
        const float *xr = x + r * K;
        float *yr = y + r * N;
        switch (take) {
        case 1: dense_1(xr, K, W, bias, yr, N, n0, n1, acc); break;
        case 2: dense_2(xr, K, W, bias, yr, N, n0, n1, acc); break;
        case 3: dense_3(xr, K, W, bias, yr, N, n0, n1, acc); break;
        case 4: dense_4(xr, K, W, bias, yr, N, n0, n1, acc); break;
        case 5: dense_5(xr, K, W, bias, yr, N, n0, n1, acc); break;
        default: dense_6(xr, K, W, bias, yr, N, n0, n1, acc); break;
        }
        r += take;
    }
}

/* one row of x against the int4 row blocks [b0, b1); xs[g] = sum of x over group g */
static void int4_blocks(const float *x, const float *xs, int64_t K, const uint8_t *Q, const float *bias, float *y,
                        int64_t N, int64_t b0, int64_t b1, int acc) {
    const int64_t groups = K / GROUP;
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = Q + b * groups * BLOCK_BYTES;
        __m512 total = _mm512_setzero_ps(), mins = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++, blk += BLOCK_BYTES) {
            const float *xg = x + g * GROUP;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES + 192), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 4 * BLOCK_BYTES + 256), _MM_HINT_T0);
            for (int j = 0; j < 16; j += 2) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + j * 16)));
                __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + j * 16 + 16)));
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), _mm512_set1_ps(xg[j]), a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_set1_ps(xg[j + 16]), a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(u, low)), _mm512_set1_ps(xg[j + 1]), a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4)), _mm512_set1_ps(xg[j + 17]), a3);
            }
            __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
            __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
            total = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), scale, total);
            mins = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xs[g]), mins);
        }
        total = _mm512_add_ps(total, mins);
        int64_t n = b * BLOCK_ROWS, valid = N - n < BLOCK_ROWS ? N - n : BLOCK_ROWS;
        __mmask16 mask = (__mmask16)((1u << valid) - 1);
        if (bias) total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(mask, bias + n));
        if (acc) total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(mask, y + n));
        _mm512_mask_storeu_ps(y + n, mask, total);
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
        __m512 s = _mm512_setzero_ps();
        for (int64_t k = 0; k < D; k += 16) {
            __m512 v = _mm512_loadu_ps(xr + k);
            s = _mm512_fmadd_ps(v, v, s);
        }
        float scale = 1.0f / sqrtf(hsum(s) / (float)D + eps);
        __m512 sv = _mm512_set1_ps(scale);
        for (int64_t k = 0; k < D; k += 16)
            _mm512_storeu_ps(out + r * D + k,
                             _mm512_mul_ps(_mm512_loadu_ps(w + k), _mm512_mul_ps(_mm512_loadu_ps(xr + k), sv)));
    }
}

static void group_sums(const float *x, float *xs, int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t g = 0; g < D / GROUP; g++)
            xs[r * (D / GROUP) + g] = hsum(_mm512_add_ps(_mm512_loadu_ps(x + r * D + g * GROUP),
                                                         _mm512_loadu_ps(x + r * D + g * GROUP + 16)));
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
            __m512 s = _mm512_setzero_ps();
            for (int64_t k = 0; k < hd; k += 16)
                s = _mm512_fmadd_ps(_mm512_loadu_ps(q + k), _mm512_loadu_ps(K + t * hd + k), s);
            float v = hsum(s) * scale;
            scores[t] = v;
            if (v > top) top = v;
        }
        __m512 tv = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= T; t += 16) {
            __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(scores + t), tv));
            _mm512_storeu_ps(scores + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (t < T) {
            __mmask16 mask = (__mmask16)((1u << (T - t)) - 1);
            __m512 e = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + t), tv));
            _mm512_mask_storeu_ps(scores + t, mask, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
        }
        float inv = 1.0f / hsum(sum);
        __m512 o[32];
        int64_t chunks = hd / 16;
        for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_setzero_ps();
        for (int64_t u = 0; u < T; u++) {
            __m512 w = _mm512_set1_ps(scores[u]);
            for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(V + u * hd + c * 16), o[c]);
        }
        float *out = p->att + r * m->heads * hd + h * hd;
        __m512 iv = _mm512_set1_ps(inv);
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(o[c], iv));
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
                for (int64_t k = 0; k < inter; k += 16) {
                    __m512 gv = _mm512_loadu_ps(g + k);
                    __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
                    _mm512_storeu_ps(a + k, _mm512_mul_ps(sg, _mm512_loadu_ps(u + k)));
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
