/* Exact per-row top-k of a float32 matrix, for TopK dictionaries on the CPU.

   Built and loaded by train/native.py (ctypes); train/selection.py is its only caller and keeps a
   pure-PyTorch path with the same results for machines without a C compiler.

   Per row (width n, k kept):
   1. Maxima of G column groups (group g = columns g, g + G, g + 2G, ...): a vertical max over
      the row's G-wide segments, so it vectorises with no horizontal reductions. G is about 4k.
   2. A threshold t with at least k group maxima >= t: bisection on the maxima (each step counts
      G values against a candidate in a few vector compares), stopping once at most k + 2
      maxima pass; infinite maxima bound nothing (see threshold_from_maxima). Those maxima are k distinct entries >= t, so the row's k-th largest value is
      >= t and no entry below t can be in the top k.
   3. One compare pass over the row (now in L1) collects the entries >= t, about k of them, and a
      quickselect keeps the k largest. Should the collected entries overflow the buffer (massive
      ties), it keeps the k largest so far, raises t to the smallest of them and, from there,
      collects only entries strictly above t: what it skips ties with or loses to k kept entries.

   torch.topk instead copies every (value, index) pair of a row and selects among them all; this
   touches each entry with two vector compares. A row holding a NaN is reported (the return
   value) and the caller takes torch.topk for the whole matrix, whose NaN ordering it keeps. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef struct {
    float value;
    int64_t column;
} entry_t;

/* Reorder a[0..n) so that its m largest values come first (Hoare quickselect). */
static void keep_largest_entries(entry_t *a, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2].value;
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i].value > pivot) i++;
            while (a[j].value < pivot) j--;
            if (i <= j) {
                entry_t swap = a[i];
                a[i] = a[j];
                a[j] = swap;
                i++;
                j--;
            }
        }
        if (m - 1 <= j) hi = j;
        else if (m - 1 >= i) lo = i;
        else return;
    }
}

/* ---- 8-wide helpers: AVX where the compiler targets it, plain loops elsewhere. */

#if defined(__AVX__)
/* maxima[0..8) = max(maxima, src) element-wise; returns nonzero if src holds a NaN. */
static inline int max_into8(float *maxima, const float *src) {
    __m256 v = _mm256_loadu_ps(src);
    _mm256_storeu_ps(maxima, _mm256_max_ps(_mm256_loadu_ps(maxima), v));
    return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
/* Bit t set where src[t] >= threshold (strict: >). */
static inline unsigned passing8(const float *src, float threshold, int strict) {
    __m256 v = _mm256_loadu_ps(src), t = _mm256_set1_ps(threshold);
    return (unsigned)_mm256_movemask_ps(strict ? _mm256_cmp_ps(v, t, _CMP_GT_OQ) : _mm256_cmp_ps(v, t, _CMP_GE_OQ));
}
#else
static inline int max_into8(float *maxima, const float *src) {
    int nan = 0;
    for (int t = 0; t < 8; t++) {
        nan |= src[t] != src[t];
        maxima[t] = src[t] > maxima[t] ? src[t] : maxima[t];
    }
    return nan;
}
static inline unsigned passing8(const float *src, float threshold, int strict) {
    unsigned bits = 0;
    for (int t = 0; t < 8; t++) bits |= (unsigned)(strict ? src[t] > threshold : src[t] >= threshold) << t;
    return bits;
}
#endif

static inline int count_at_least(const float *maxima, int64_t groups, float threshold) {
    int count = 0;
    for (int64_t g = 0; g < groups; g += 8) count += __builtin_popcount(passing8(maxima + g, threshold, 0));
    return count;
}

/* Step 2: a threshold that at least k of the group maxima reach. Infinite maxima stay out of the
   bisection's bounds: +inf ones reach any threshold, -inf ones none above -inf (with fewer than k
   maxima above -inf the threshold is -inf, and the pass collects every entry). */
static float threshold_from_maxima(const float *maxima, int64_t groups, int64_t k) {
    float lo = INFINITY, hi = -INFINITY;
    int64_t above_minus_infinity = 0;
    for (int64_t g = 0; g < groups; g++) {
        const float m = maxima[g];
        if (m == -INFINITY) continue;
        above_minus_infinity++;
        if (m == INFINITY) continue;
        lo = m < lo ? m : lo;
        hi = m > hi ? m : hi;
    }
    if (above_minus_infinity < k) return -INFINITY;
    if (lo > hi) return INFINITY; /* every maximum above -inf is +inf */
    /* Invariant: at least k maxima are >= lo (all the finite ones, and the +inf ones). */
    for (int step = 0; step < 24; step++) {
        float mid = 0.5f * lo + 0.5f * hi; /* no overflow, unlike (lo + hi) / 2 */
        if (mid <= lo || mid >= hi) break;
        int count = count_at_least(maxima, groups, mid);
        if (count >= k) {
            lo = mid;
            if (count <= k + 2) break;
        } else {
            hi = mid;
        }
    }
    return lo;
}

typedef struct {
    const float *matrix;
    int64_t width, k, groups;
    float *values;
    int64_t *columns;
    int64_t first_row, end_row;
    int saw_nan;
} rows_job_t;

static void *select_rows(void *argument) {
    rows_job_t *job = argument;
    const int64_t width = job->width, k = job->k, groups = job->groups;
    const int64_t segmented = width / groups * groups; /* columns in whole G-wide segments */
    const int64_t capacity = 4 * k + 8;
    entry_t *kept = malloc(sizeof(entry_t) * (capacity + 8));
    float *maxima = malloc(sizeof(float) * groups);
    if (!kept || !maxima) {
        free(kept);
        free(maxima);
        job->saw_nan = -1; /* allocation failure: the caller falls back */
        return NULL;
    }
    for (int64_t r = job->first_row; r < job->end_row; r++) {
        const float *row = job->matrix + r * width;
        int nan = 0;
        for (int64_t g = 0; g < groups; g++) maxima[g] = row[g];
        for (int64_t s = 0; s < segmented; s += groups)
            for (int64_t g = 0; g < groups; g += 8) nan |= max_into8(maxima + g, row + s + g);
        for (int64_t c = segmented; c < width; c++) {
            nan |= row[c] != row[c];
            if (row[c] > maxima[c - segmented]) maxima[c - segmented] = row[c];
        }
        if (nan) {
            job->saw_nan = 1;
            break;
        }
        float threshold = threshold_from_maxima(maxima, groups, k);
        int64_t count = 0;
        int strict = 0;
        int64_t c = 0;
        for (; c + 8 <= width; c += 8) {
            unsigned bits = passing8(row + c, threshold, strict);
            while (bits) {
                int lane = __builtin_ctz(bits);
                bits &= bits - 1;
                kept[count].value = row[c + lane];
                kept[count].column = c + lane;
                count++;
            }
            if (count >= capacity) {
                keep_largest_entries(kept, count, k);
                count = k;
                threshold = kept[0].value;
                for (int64_t q = 1; q < k; q++) threshold = kept[q].value < threshold ? kept[q].value : threshold;
                strict = 1;
            }
        }
        for (; c < width; c++)
            if (strict ? row[c] > threshold : row[c] >= threshold) {
                kept[count].value = row[c];
                kept[count].column = c;
                count++;
            }
        keep_largest_entries(kept, count, k);
        for (int64_t q = 0; q < k; q++) {
            job->values[r * k + q] = kept[q].value;
            job->columns[r * k + q] = kept[q].column;
        }
    }
    free(kept);
    free(maxima);
    return NULL;
}

/* values/columns: [rows, k] outputs. groups: a multiple of 8 with k <= groups <= width.
   Returns 0, 1 if a row holds a NaN (outputs then incomplete), -1 on a resource failure.

   Built with OpenMP (train/native.py tries -fopenmp first), the rows are shared out by the same
   OpenMP runtime PyTorch's CPU kernels run on (its bundled libgomp.so.1 is already loaded, and the
   loader binds this library to it): the threads that just ran the encoder matmul are still
   spinning in that runtime and take the rows at once. Threads of our own would contend with
   them for the cores instead (measured: ~40% slower right after a matmul on 2 cores). Without
   OpenMP, POSIX threads. */
#ifdef _OPENMP
int lexica_topk_rows_f32(const float *matrix, int64_t rows, int64_t width, int64_t k, int64_t groups,
                         float *values, int64_t *columns, int threads) {
    if (k < 1 || groups < k || groups > width || groups % 8) return -1;
    if (threads < 1) threads = 1;
    int64_t chunks = rows < 4 * (int64_t)threads ? rows : 4 * (int64_t)threads; /* some slack for balance */
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : status)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        rows_job_t job = {matrix, width, k, groups, values, columns, rows * chunk / chunks,
                          rows * (chunk + 1) / chunks, 0};
        select_rows(&job);
        status |= job.saw_nan < 0 ? 2 : job.saw_nan;
    }
    return status & 2 ? -1 : status;
}
#else
#define MAX_THREADS 256

int lexica_topk_rows_f32(const float *matrix, int64_t rows, int64_t width, int64_t k, int64_t groups,
                         float *values, int64_t *columns, int threads) {
    if (k < 1 || groups < k || groups > width || groups % 8) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    rows_job_t jobs[MAX_THREADS];
    pthread_t workers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t per_thread = (rows + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        int64_t first = t * per_thread, end = first + per_thread < rows ? first + per_thread : rows;
        jobs[t] = (rows_job_t){matrix, width, k, groups, values, columns, first, end, 0};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&workers[t], NULL, select_rows, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t]) select_rows(&jobs[t]); /* no thread to spare: do its rows here */
    select_rows(&jobs[0]);
    int status = 0;
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(workers[t], NULL);
    for (int t = 0; t < threads; t++) {
        if (jobs[t].saw_nan < 0) return -1;
        if (jobs[t].saw_nan) status = 1;
    }
    return status;
}
#endif
