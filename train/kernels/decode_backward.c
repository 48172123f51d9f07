/* Backward of a sparse decode, out = Σ_pairs value · W_dec[latent] per row, on the CPU.

   Built and loaded by train/native.py (ctypes); train/sparse.py calls it and keeps a PyTorch path
   (a sampled dense-dense product and an embedding_bag) with the same results.

   Given the output's gradient G [rows, d], it returns both
     grad_values[p] = <G[row_p], W_dec[latent_p]>          (the code's gradient), and
     grad_W_dec[l]  = Σ_{p of latent l} value_p · G[row_p]  (the decoder's gradient)
   in one latent-major pass: each pair's G row is read once, for the dot product and the
   accumulation together. The latent's pairs go in groups of 64, and the row in chunks of 32
   columns: a chunk of the decoder row and of its gradient stay in registers while every pair of
   the group passes over it (the pairs' partial dot products wait in L1), each pair prefetching
   its next chunk; the pairs' rows come in no order. ≈2× the two PyTorch kernels at 4096 × 512,
   k 32 (the sampled product and an embedding_bag). The
   PyTorch path reads every G row twice, in two kernels. Latents are shared out across OpenMP
   threads (PyTorch's, see topk_rows.c) in chunks; each writes only its latents' rows, so no two
   threads write the same memory. */

#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

#define GROUP 64 /* pairs whose partial dot products are kept while the row is walked in chunks */

static void latent_backward(const float *G, const float *w, const float *values, const int64_t *by_latent,
                            const int64_t *rows_by_latent, int64_t first, int64_t end, int64_t d,
                            float *grad_values, float *grad_w) {
    const int64_t chunked = d / 32 * 32;
    v8 dots[GROUP];
    float tails[GROUP];
    if (first == end) { /* a latent no row chose */
        memset(grad_w, 0, sizeof(float) * d);
        return;
    }
    for (int64_t start = first; start < end; start += GROUP) {
        const int64_t count = end - start < GROUP ? end - start : GROUP;
        for (int64_t j = 0; j < count; j++) {
            dots[j] = (v8){0};
            tails[j] = 0.0f;
        }
        /* 32 columns at a time: the decoder row's and the gradient row's pieces stay in
           registers while every pair of the group passes over them. */
        for (int64_t c = 0; c < chunked; c += 32) {
            const v8 w0 = load8(w + c), w1 = load8(w + c + 8), w2 = load8(w + c + 16), w3 = load8(w + c + 24);
            v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            if (start > first) {
                s0 = load8(grad_w + c), s1 = load8(grad_w + c + 8), s2 = load8(grad_w + c + 16), s3 = load8(grad_w + c + 24);
            }
            for (int64_t j = 0; j < count; j++) {
                const float *g = G + rows_by_latent[start + j] * d + c;
                __builtin_prefetch(g + 32);
                __builtin_prefetch(g + 48);
                const float value = values[by_latent[start + j]];
                const v8 v = {value, value, value, value, value, value, value, value};
                const v8 g0 = load8(g), g1 = load8(g + 8), g2 = load8(g + 16), g3 = load8(g + 24);
                dots[j] += g0 * w0 + g1 * w1 + g2 * w2 + g3 * w3;
                s0 += v * g0;
                s1 += v * g1;
                s2 += v * g2;
                s3 += v * g3;
            }
            store8(grad_w + c, s0);
            store8(grad_w + c + 8, s1);
            store8(grad_w + c + 16, s2);
            store8(grad_w + c + 24, s3);
        }
        for (int64_t c = chunked; c < d; c++) {
            float sum = start > first ? grad_w[c] : 0.0f;
            for (int64_t j = 0; j < count; j++) {
                const float g = G[rows_by_latent[start + j] * d + c];
                tails[j] += g * w[c];
                sum += values[by_latent[start + j]] * g;
            }
            grad_w[c] = sum;
        }
        for (int64_t j = 0; j < count; j++) {
            float dot = tails[j];
            for (int t = 0; t < 8; t++) dot += dots[j][t];
            grad_values[by_latent[start + j]] = dot;
        }
    }
}

/* G [rows, d]; W_dec, grad_W_dec [d_sae, d]; values, grad_values [pairs] in pair order;
   by_latent [pairs] (pair order → latent-major order), rows_by_latent [pairs] (row of each
   latent-major pair), latent_starts [d_sae + 1]. */
void lexica_decode_backward_f32(const float *G, const float *W_dec, const float *values, const int64_t *by_latent,
                                const int64_t *latent_starts, const int64_t *rows_by_latent, int64_t d_sae,
                                int64_t d, float *grad_values, float *grad_W_dec, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t latent = 0; latent < d_sae; latent++)
        latent_backward(G, W_dec + latent * d, values, by_latent, rows_by_latent, latent_starts[latent],
                        latent_starts[latent + 1], d, grad_values, grad_W_dec + latent * d);
}
